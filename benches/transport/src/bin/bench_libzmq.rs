//! libzmq (C++, vendored by zmq-sys/zeromq-src) through the `zmq` 0.10 crate.
//! Blocking API: one thread per socket, as the echo server / client below.

#[path = "../common.rs"]
mod common;

use common::*;
use std::os::raw::c_void;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

const IMP: &str = "libzmq";

fn ctx_socket(ty: zmq::SocketType) -> (zmq::Context, zmq::Socket) {
    let ctx = zmq::Context::new();
    let s = ctx.socket(ty).expect("socket");
    s.set_linger(0).unwrap();
    s.set_rcvtimeo(60_000).unwrap(); // never hang a benchmark forever
    s.set_sndtimeo(60_000).unwrap();
    (ctx, s)
}

/// Receive one whole multipart message, reusing `parts` (frames are moved
/// out of the socket without copying).
fn recv_parts(s: &zmq::Socket, parts: &mut Vec<zmq::Message>) -> zmq::Result<()> {
    parts.clear();
    loop {
        let mut m = zmq::Message::new();
        s.recv(&mut m, 0)?;
        let more = m.get_more();
        parts.push(m);
        if !more {
            return Ok(());
        }
    }
}

fn send_parts<I: IntoIterator<Item = zmq::Message>>(s: &zmq::Socket, parts: I) -> zmq::Result<()> {
    let mut it = parts.into_iter().peekable();
    while let Some(m) = it.next() {
        let flags = if it.peek().is_some() { zmq::SNDMORE } else { 0 };
        s.send(m, flags)?;
    }
    Ok(())
}

fn echo(endpoint: &str) {
    let (_ctx, s) = ctx_socket(zmq::ROUTER);
    s.set_rcvtimeo(-1).unwrap();
    s.bind(endpoint).expect("bind");
    eprintln!("libzmq ROUTER echo bound on {endpoint}");
    let mut parts = Vec::with_capacity(8);
    loop {
        recv_parts(&s, &mut parts).expect("recv");
        if parts.len() < 2 {
            continue;
        }
        let tag: Vec<u8> = parts[1].to_vec();
        match &tag[..] {
            TAG_ECHO => send_parts(&s, parts.drain(..)).expect("send"),
            TAG_ACK => {
                let total: usize = parts[2..].iter().map(|m| m.len()).sum();
                let id = parts.swap_remove(0);
                let reply = vec![id, zmq::Message::from(TAG_ACK), zmq::Message::from(&(total as u64).to_le_bytes()[..])];
                send_parts(&s, reply).expect("send");
            }
            TAG_IDENT => {
                let id = parts.swap_remove(0);
                let idcopy = zmq::Message::from(&id[..]);
                send_parts(&s, vec![id, zmq::Message::from(TAG_IDENT), idcopy]).expect("send");
            }
            TAG_QUIT => {
                let id = parts.swap_remove(0);
                send_parts(&s, vec![id, zmq::Message::from(TAG_QUIT)]).expect("send");
                std::thread::sleep(Duration::from_millis(100));
                return;
            }
            _ => eprintln!("unknown tag {tag:?}"),
        }
    }
}

fn dealer(endpoint: &str) -> (zmq::Context, zmq::Socket) {
    let (ctx, s) = ctx_socket(zmq::DEALER);
    let mut parts = Vec::new();
    for _ in 0..idle_peers() {
        let idle = ctx.socket(zmq::DEALER).unwrap();
        idle.set_linger(0).unwrap();
        idle.set_rcvtimeo(10_000).unwrap();
        idle.connect(endpoint).expect("connect");
        send_parts(&idle, vec![zmq::Message::from(TAG_ECHO), zmq::Message::from("idle")]).unwrap();
        recv_parts(&idle, &mut parts).expect("idle peer round trip");
        Box::leak(Box::new(idle)); // stays connected until the process exits
    }
    s.connect(endpoint).expect("connect");
    (ctx, s)
}

fn send_small(s: &zmq::Socket, header: &[u8], body: &[u8]) -> zmq::Result<()> {
    s.send(TAG_ECHO, zmq::SNDMORE)?;
    s.send(header, zmq::SNDMORE)?;
    s.send(body, 0)
}

/// Receive a whole message into `scratch` (a reused Message) and return the part count.
fn recv_count(s: &zmq::Socket, scratch: &mut zmq::Message) -> zmq::Result<usize> {
    let mut n = 0;
    loop {
        s.recv(scratch, 0)?;
        n += 1;
        if !scratch.get_more() {
            return Ok(n);
        }
    }
}

fn lat(endpoint: &str, n: usize) {
    let (_ctx, s) = dealer(endpoint);
    let (h, b) = small_frames();
    let mut scratch = zmq::Message::new();
    let warm = 2000.min(n);
    let mut samples = Vec::with_capacity(n);
    for i in 0..warm + n {
        let t = Instant::now();
        send_small(&s, &h, &b).unwrap();
        let parts = recv_count(&s, &mut scratch).unwrap();
        let dt = t.elapsed();
        assert_eq!(parts, 3);
        if i >= warm {
            samples.push(dt.as_nanos() as u64);
        }
    }
    report_lat(IMP, &mut samples);
}

fn thr(endpoint: &str, n: usize, window: usize) {
    let (_ctx, s) = dealer(endpoint);
    let (h, b) = small_frames();
    let mut scratch = zmq::Message::new();
    // connection warm-up
    send_small(&s, &h, &b).unwrap();
    recv_count(&s, &mut scratch).unwrap();
    let t = Instant::now();
    let mut sent = 0;
    while sent < window.min(n) {
        send_small(&s, &h, &b).unwrap();
        sent += 1;
    }
    let mut got = 0;
    while got < n {
        let parts = recv_count(&s, &mut scratch).unwrap();
        debug_assert_eq!(parts, 3);
        got += 1;
        if sent < n {
            send_small(&s, &h, &b).unwrap();
            sent += 1;
        }
    }
    report_thr(IMP, n, window, t.elapsed());
}

fn read_ack(s: &zmq::Socket, scratch: &mut Vec<zmq::Message>) -> u64 {
    recv_parts(s, scratch).unwrap();
    assert_eq!(&scratch[0][..], TAG_ACK);
    u64::from_le_bytes(scratch[1][..].try_into().unwrap())
}

/// One-way bandwidth: a single `mib` MiB frame DEALER -> ROUTER, the ROUTER
/// answers with a 8-byte ack. Time = send start .. ack received.
/// `ffi == true` sends through zmq_msg_init_data with our own free callback
/// (the path a Python buffer would take) instead of `Message::from(Vec<u8>)`.
fn bw(endpoint: &str, mib: usize, reps: usize, ffi: bool) {
    let (_ctx, mut s) = dealer(endpoint);
    let len = mib * 1024 * 1024;
    let template = big_payload(len, 7);
    let mut scratch = Vec::new();
    let mut rates = Vec::new();
    for rep in 0..reps + 1 {
        let buf = template.clone(); // copy happens outside the timed region
        let t = Instant::now();
        s.send(TAG_ACK, zmq::SNDMORE).unwrap();
        if ffi {
            let owner = Box::new(Foreign { buf, released: None });
            send_foreign(&mut s, owner, 0).unwrap();
        } else {
            // Vec<u8> -> Box<[u8]> -> zmq_msg_init_data: no copy.
            s.send(zmq::Message::from(buf), 0).unwrap();
        }
        let got = read_ack(&s, &mut scratch);
        let dt = t.elapsed();
        assert_eq!(got as usize, len);
        if rep > 0 {
            rates.push(mib as f64 / dt.as_secs_f64());
        }
    }
    let name = if ffi { "libzmq-ffi" } else { IMP };
    report_bw(name, mib, &rates);
}

// ---------------------------------------------------------------------------
// Zero-copy send of a buffer we do not own as a Box<[u8]> (e.g. a Python
// buffer): zmq_msg_init_data with a custom free callback, via zmq-sys.

type Released = Arc<(Mutex<Option<ThreadId>>, Condvar)>;

struct Foreign {
    buf: Vec<u8>, // stands in for a PyBuffer / memoryview export
    released: Option<Released>,
}

unsafe extern "C" fn release_foreign(_data: *mut c_void, hint: *mut c_void) {
    // SAFETY: hint is the Box<Foreign> leaked in send_foreign.
    let owner: Box<Foreign> = unsafe { Box::from_raw(hint as *mut Foreign) };
    if let Some(r) = &owner.released {
        *r.0.lock().unwrap() = Some(std::thread::current().id());
        r.1.notify_all();
    }
    drop(owner);
}

fn send_foreign(s: &mut zmq::Socket, owner: Box<Foreign>, flags: i32) -> zmq::Result<()> {
    let data = owner.buf.as_ptr() as *mut c_void;
    let len = owner.buf.len();
    let hint = Box::into_raw(owner) as *mut c_void;
    // SAFETY: the buffer stays alive until libzmq calls release_foreign,
    // which frees `owner`; zmq_msg_t is plain memory initialised by libzmq.
    unsafe {
        let mut msg: zmq_sys::zmq_msg_t = std::mem::zeroed();
        if zmq_sys::zmq_msg_init_data(&mut msg, data, len, Some(release_foreign), hint) != 0 {
            drop(Box::from_raw(hint as *mut Foreign));
            return Err(zmq::Error::from_raw(zmq_sys::zmq_errno()));
        }
        if zmq_sys::zmq_msg_send(&mut msg, s.as_mut_ptr(), flags) == -1 {
            let e = zmq::Error::from_raw(zmq_sys::zmq_errno());
            zmq_sys::zmq_msg_close(&mut msg); // runs release_foreign
            return Err(e);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------

fn expect_echo(s: &zmq::Socket, frames: &[Vec<u8>]) -> Result<(), String> {
    send_parts(s, frames.iter().map(|f| zmq::Message::from(&f[..]))).map_err(|e| e.to_string())?;
    let mut parts = Vec::new();
    recv_parts(s, &mut parts).map_err(|e| e.to_string())?;
    if parts.len() != frames.len() {
        return Err(format!("got {} frames, want {}", parts.len(), frames.len()));
    }
    for (i, (a, b)) in parts.iter().zip(frames).enumerate() {
        if &a[..] != &b[..] {
            return Err(format!("frame {i} differs"));
        }
    }
    Ok(())
}

fn check(endpoint: &str) {
    let mut c = Checks::new(IMP);
    let (ctx, mut s) = dealer(endpoint);
    let (h, b) = small_frames();
    let r = expect_echo(&s, &[TAG_ECHO.to_vec(), h.clone(), b.clone()]);
    c.record("small_multipart_echo", r.is_ok(), &format!("{r:?}"));
    let r = expect_echo(&s, &check_frames());
    c.record("empty+long_frames_echo", r.is_ok(), &format!("{r:?}"));

    // 1000 pipelined messages come back complete and in order
    for i in 0..1000u32 {
        send_parts(&s, vec![zmq::Message::from(TAG_ECHO), zmq::Message::from(&i.to_le_bytes()[..])]).unwrap();
    }
    let mut ok = true;
    let mut parts = Vec::new();
    for i in 0..1000u32 {
        if recv_parts(&s, &mut parts).is_err() || &parts[1][..] != &i.to_le_bytes()[..] {
            ok = false;
            break;
        }
    }
    c.record("pipelined_order_1000", ok, "");

    // zero-copy send through zmq_msg_init_data + custom free callback
    let released: Released = Arc::new((Mutex::new(None), Condvar::new()));
    let len = 16 * 1024 * 1024;
    s.send(TAG_ACK, zmq::SNDMORE).unwrap();
    let owner = Box::new(Foreign { buf: big_payload(len, 3), released: Some(released.clone()) });
    let sent = send_foreign(&mut s, owner, 0);
    let mut scratch = Vec::new();
    let got = sent.as_ref().ok().map(|_| read_ack(&s, &mut scratch));
    let (lock, cv) = &*released;
    let guard = cv
        .wait_timeout_while(lock.lock().unwrap(), Duration::from_secs(5), |t| t.is_none())
        .unwrap()
        .0;
    let freed_on = *guard;
    let ok = got == Some(len as u64) && freed_on.is_some();
    c.record(
        "ffi_zero_copy_send_16MiB",
        ok,
        &format!(
            "ack={got:?} free_callback_ran={} on_caller_thread={}",
            freed_on.is_some(),
            freed_on == Some(std::thread::current().id())
        ),
    );
    drop(s);

    // routing id chosen by the DEALER is what the ROUTER sees
    let s2 = ctx.socket(zmq::DEALER).unwrap();
    s2.set_linger(0).unwrap();
    s2.set_rcvtimeo(10_000).unwrap();
    s2.set_identity(b"fp-engine-7").unwrap();
    s2.connect(endpoint).unwrap();
    s2.send(TAG_IDENT, 0).unwrap();
    let r = recv_parts(&s2, &mut parts);
    let ok = r.is_ok() && parts.len() == 2 && &parts[1][..] == b"fp-engine-7";
    c.record("dealer_routing_id", ok, "");
    c.finish()
}

fn quit(endpoint: &str) {
    let (_ctx, s) = dealer(endpoint);
    s.set_rcvtimeo(5_000).unwrap();
    s.send(TAG_QUIT, 0).unwrap();
    let mut p = Vec::new();
    let _ = recv_parts(&s, &mut p);
}

// ---------------------------------------------------------------------------
// Facts about the build and the crate's types, printed by `facts`.

struct Probe<T>(std::marker::PhantomData<T>);
#[allow(dead_code)]
trait Fallback {
    fn send(&self) -> bool {
        false
    }
    fn sync(&self) -> bool {
        false
    }
}
impl<T> Fallback for Probe<T> {}
#[allow(dead_code)]
impl<T: Send> Probe<T> {
    fn send(&self) -> bool {
        true
    }
}
struct SyncProbe<T>(std::marker::PhantomData<T>);
impl<T> Fallback for SyncProbe<T> {}
#[allow(dead_code)]
impl<T: Sync> SyncProbe<T> {
    fn sync(&self) -> bool {
        true
    }
}
macro_rules! traits_of {
    ($t:ty) => {
        println!(
            "FACT {}: Send={} Sync={}",
            stringify!($t),
            Probe::<$t>(std::marker::PhantomData).send(),
            SyncProbe::<$t>(std::marker::PhantomData).sync()
        )
    };
}

fn facts() {
    let (a, b, c) = zmq::version();
    println!("FACT libzmq version {a}.{b}.{c} (statically linked, built by zeromq-src)");
    for cap in ["curve", "ipc", "pgm", "tipc", "norm", "gssapi", "draft"] {
        println!("FACT zmq::has({cap:?}) = {:?}", zmq::has(cap));
    }
    let ctx = zmq::Context::new();
    let s = ctx.socket(zmq::ROUTER).unwrap();
    let r = s.set_curve_server(true);
    println!("FACT set_curve_server(true) -> {r:?}");
    let kp = zmq::CurveKeyPair::new();
    println!("FACT CurveKeyPair::new() -> {:?}", kp.map(|_| "ok"));
    let x = ctx.socket(zmq::XPUB).map(|_| "ok");
    println!("FACT XPUB socket -> {x:?}");
    println!(
        "FACT default sndhwm={:?} rcvhwm={:?} linger={:?}",
        s.get_sndhwm(),
        s.get_rcvhwm(),
        s.get_linger()
    );
    traits_of!(zmq::Message);
    traits_of!(zmq::Socket);
    traits_of!(zmq::Context);
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("facts") {
        return facts();
    }
    let a = parse_args("bench-libzmq");
    match a.cmd.as_str() {
        "echo" => echo(&a.endpoint),
        "lat" => lat(&a.endpoint, arg_usize(&a.rest, 0, 20_000)),
        "thr" => thr(&a.endpoint, arg_usize(&a.rest, 0, 200_000), arg_usize(&a.rest, 1, 500)),
        "bw" => bw(&a.endpoint, arg_usize(&a.rest, 0, 128), arg_usize(&a.rest, 1, 5), false),
        "bw-ffi" => bw(&a.endpoint, arg_usize(&a.rest, 0, 128), arg_usize(&a.rest, 1, 5), true),
        "check" => check(&a.endpoint),
        "quit" => quit(&a.endpoint),
        _ => usage("bench-libzmq"),
    }
}
