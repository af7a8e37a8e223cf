//! Pieces shared by both benchmark binaries: the tiny echo protocol, the
//! payloads, the statistics and the result line format.
//!
//! Protocol between the measuring DEALER and the echo ROUTER (the ROUTER sees
//! the peer's routing id as an extra first frame):
//!
//! * `[b"E", ...]`  -> echo every frame back unchanged
//! * `[b"A", ...]`  -> reply `[b"A", total_len_of_rest as u64 LE]` (bandwidth ack)
//! * `[b"I"]`       -> reply `[b"I", routing_id_seen_by_router]`
//! * `[b"Q"]`       -> reply `[b"Q"]` and exit
//!
//! The same protocol is implemented by `interop.py` (pyzmq), so any client
//! can talk to any server.
#![allow(dead_code)]

use std::time::Duration;

pub const TAG_ECHO: &[u8] = b"E";
pub const TAG_ACK: &[u8] = b"A";
pub const TAG_IDENT: &[u8] = b"I";
pub const TAG_QUIT: &[u8] = b"Q";

/// Small 3-frame message used by `lat` and `thr`: tag (1 B) + header (35 B)
/// + body (64 B) = 100 bytes of payload.
pub fn small_frames() -> (Vec<u8>, Vec<u8>) {
    let header: Vec<u8> = (0..35u8).map(|i| b'a' + (i % 26)).collect();
    let body: Vec<u8> = (0..64u32).map(|i| (i * 7 + 3) as u8).collect();
    (header, body)
}

/// Deterministic, non-constant content for big frames.
pub fn big_payload(len: usize, seed: u8) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let mut x: u32 = 0x9e37_79b9 ^ seed as u32;
    for chunk in v.chunks_mut(4) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
    v
}

/// `FP_IDLE_PEERS=N`: the client first connects N extra DEALERs to the echo
/// ROUTER (each does one round trip, then stays connected and idle) so the
/// ROUTER is measured with several peers instead of one.
pub fn idle_peers() -> usize {
    std::env::var("FP_IDLE_PEERS").ok().and_then(|v| v.parse().ok()).unwrap_or(0)
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    percentile(&s, 0.5)
}

pub fn max(v: &[f64]) -> f64 {
    v.iter().cloned().fold(f64::NAN, f64::max)
}

/// One machine-readable line per measurement; `run.sh` greps for `RESULT`.
pub fn result_line(imp: &str, test: &str, kv: &[(&str, String)]) {
    let mut s = format!("RESULT impl={imp} test={test}");
    for (k, v) in kv {
        s.push_str(&format!(" {k}={v}"));
    }
    println!("{s}");
}

pub fn report_lat(imp: &str, samples_ns: &mut [u64]) {
    samples_ns.sort_unstable();
    let us: Vec<f64> = samples_ns.iter().map(|&n| n as f64 / 1000.0).collect();
    result_line(
        imp,
        "lat",
        &[
            ("n", us.len().to_string()),
            ("median_us", format!("{:.1}", percentile(&us, 0.5))),
            ("p99_us", format!("{:.1}", percentile(&us, 0.99))),
            ("min_us", format!("{:.1}", us[0])),
        ],
    );
}

pub fn report_thr(imp: &str, n: usize, window: usize, elapsed: Duration) {
    let rate = n as f64 / elapsed.as_secs_f64();
    result_line(
        imp,
        "thr",
        &[
            ("n", n.to_string()),
            ("window", window.to_string()),
            ("secs", format!("{:.3}", elapsed.as_secs_f64())),
            ("msgs_per_s", format!("{:.0}", rate)),
        ],
    );
}

pub fn report_bw(imp: &str, mib: usize, per_rep_mibs: &[f64]) {
    let reps: Vec<String> = per_rep_mibs.iter().map(|x| format!("{x:.0}")).collect();
    result_line(
        imp,
        "bw",
        &[
            ("mib", mib.to_string()),
            ("reps", reps.join(",")),
            ("best_mib_s", format!("{:.0}", max(per_rep_mibs))),
            ("median_mib_s", format!("{:.0}", median(per_rep_mibs))),
        ],
    );
}

pub struct Args {
    pub cmd: String,
    pub endpoint: String,
    pub rest: Vec<String>,
}

pub fn usage(bin: &str) -> ! {
    eprintln!(
        "usage:\n  {bin} echo <endpoint>\n  {bin} lat <endpoint> [n=20000]\n  \
         {bin} thr <endpoint> [n=200000] [window=500]\n  {bin} bw <endpoint> [mib=128] [reps=5]\n  \
         {bin} check <endpoint>\n  {bin} quit <endpoint>\n\
         endpoint must be tcp://127.0.0.1:PORT"
    );
    std::process::exit(2)
}

pub fn parse_args(bin: &str) -> Args {
    let mut it = std::env::args().skip(1);
    let cmd = it.next().unwrap_or_else(|| usage(bin));
    let endpoint = it.next().unwrap_or_else(|| usage(bin));
    if !endpoint.starts_with("tcp://127.0.0.1:") {
        eprintln!("refusing endpoint {endpoint}: loopback (tcp://127.0.0.1:PORT) only");
        std::process::exit(2);
    }
    Args {
        cmd,
        endpoint,
        rest: it.collect(),
    }
}

pub fn arg_usize(rest: &[String], i: usize, default: usize) -> usize {
    rest.get(i).map(|s| s.parse().expect("integer argument")).unwrap_or(default)
}

/// Interop check bookkeeping: prints `CHECK <name> PASS|FAIL` lines and a
/// final summary line.
pub struct Checks {
    imp: String,
    pub passed: usize,
    pub failed: usize,
}

impl Checks {
    pub fn new(imp: &str) -> Self {
        Checks { imp: imp.to_string(), passed: 0, failed: 0 }
    }
    pub fn record(&mut self, name: &str, ok: bool, detail: &str) {
        if ok {
            self.passed += 1;
            println!("CHECK client={} {name} PASS {detail}", self.imp);
        } else {
            self.failed += 1;
            println!("CHECK client={} {name} FAIL {detail}", self.imp);
        }
    }
    pub fn finish(self) -> ! {
        println!("{} passed, {} failed", self.passed, self.failed);
        std::process::exit(if self.failed == 0 { 0 } else { 1 })
    }
}

/// A 5 MiB and a 300-byte frame with an empty delimiter frame in between:
/// exercises short and long ZMTP frame headers and empty frames.
pub fn check_frames() -> Vec<Vec<u8>> {
    vec![
        TAG_ECHO.to_vec(),
        b"".to_vec(),
        big_payload(300, 1),
        big_payload(5 * 1024 * 1024 + 3, 2),
        b"tail".to_vec(),
    ]
}
