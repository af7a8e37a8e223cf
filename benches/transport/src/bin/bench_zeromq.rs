//! Pure-Rust ZMTP (`zeromq` 0.7 crate) on tokio.
//!
//! Runtime flavour: FP_TOKIO=multi (default, 2 worker threads = the core
//! count of the reference machine) or FP_TOKIO=current.

#[path = "../common.rs"]
mod common;

use bytes::Bytes;
use common::*;
use std::sync::Arc;
use std::time::{Duration, Instant};
use zeromq::util::PeerIdentity;
use zeromq::{DealerSocket, RouterSocket, Socket, SocketOptions, SocketRecv, SocketSend, ZmqMessage};

const IMP: &str = "zeromq";
const TIMEOUT: Duration = Duration::from_secs(60);

fn msg(frames: Vec<Bytes>) -> ZmqMessage {
    ZmqMessage::try_from(frames).expect("non-empty")
}

async fn recv_to<R: SocketRecv>(s: &mut R) -> ZmqMessage {
    tokio::time::timeout(TIMEOUT, s.recv()).await.expect("recv timed out").expect("recv")
}

async fn echo(endpoint: &str) {
    let mut s = RouterSocket::new();
    s.bind(endpoint).await.expect("bind");
    eprintln!("zeromq ROUTER echo bound on {endpoint}");
    loop {
        let m = s.recv().await.expect("recv");
        if m.len() < 2 {
            continue;
        }
        let id = m.get(0).unwrap().clone();
        let tag = m.get(1).unwrap().clone();
        match &tag[..] {
            TAG_ECHO => s.send(m).await.expect("send"),
            TAG_ACK => {
                let total: usize = m.iter().skip(2).map(|f| f.len()).sum();
                let ack = Bytes::copy_from_slice(&(total as u64).to_le_bytes());
                s.send(msg(vec![id, tag, ack])).await.expect("send")
            }
            TAG_IDENT => s.send(msg(vec![id.clone(), tag, id])).await.expect("send"),
            TAG_QUIT => {
                s.send(msg(vec![id, tag])).await.expect("send");
                tokio::time::sleep(Duration::from_millis(100)).await;
                return;
            }
            _ => eprintln!("unknown tag {tag:?}"),
        }
    }
}

async fn dealer_with(endpoint: &str, opts: SocketOptions) -> DealerSocket {
    for _ in 0..idle_peers() {
        let mut idle = DealerSocket::new();
        idle.connect(endpoint).await.expect("connect");
        idle.send(msg(vec![Bytes::from_static(TAG_ECHO), Bytes::from_static(b"idle")])).await.unwrap();
        recv_to(&mut idle).await;
        std::mem::forget(idle); // stays connected until the process exits
    }
    let mut s = DealerSocket::with_options(opts);
    s.connect(endpoint).await.expect("connect");
    s
}

async fn dealer(endpoint: &str) -> DealerSocket {
    dealer_with(endpoint, SocketOptions::default()).await
}

fn small_msg(h: &Bytes, b: &Bytes) -> ZmqMessage {
    msg(vec![Bytes::from_static(TAG_ECHO), h.clone(), b.clone()])
}

async fn lat(endpoint: &str, n: usize) {
    let mut s = dealer(endpoint).await;
    let (h, b) = small_frames();
    let (h, b) = (Bytes::from(h), Bytes::from(b));
    let warm = 2000.min(n);
    let mut samples = Vec::with_capacity(n);
    for i in 0..warm + n {
        let t = Instant::now();
        s.send(small_msg(&h, &b)).await.unwrap();
        let r = recv_to(&mut s).await;
        let dt = t.elapsed();
        assert_eq!(r.len(), 3);
        if i >= warm {
            samples.push(dt.as_nanos() as u64);
        }
    }
    report_lat(IMP, &mut samples);
}

async fn thr(endpoint: &str, n: usize, window: usize) {
    let mut s = dealer(endpoint).await;
    let (h, b) = small_frames();
    let (h, b) = (Bytes::from(h), Bytes::from(b));
    s.send(small_msg(&h, &b)).await.unwrap(); // warm-up
    recv_to(&mut s).await;
    let (mut tx, mut rx) = s.split();
    let permits = Arc::new(tokio::sync::Semaphore::new(window));
    let t = Instant::now();
    let p2 = permits.clone();
    let sender = tokio::spawn(async move {
        for _ in 0..n {
            p2.acquire().await.unwrap().forget();
            tx.send(small_msg(&h, &b)).await.unwrap();
        }
        tx
    });
    for _ in 0..n {
        let r = recv_to(&mut rx).await;
        debug_assert_eq!(r.len(), 3);
        permits.add_permits(1);
    }
    let elapsed = t.elapsed();
    let _tx = sender.await.unwrap();
    report_thr(IMP, n, window, elapsed);
}

async fn bw(endpoint: &str, mib: usize, reps: usize) {
    let mut s = dealer(endpoint).await;
    let len = mib * 1024 * 1024;
    let template = big_payload(len, 7);
    let mut rates = Vec::new();
    for rep in 0..reps + 1 {
        // a fresh buffer each time, like the libzmq client (copied outside the timing)
        let big = Bytes::from(template.clone());
        let t = Instant::now();
        s.send(msg(vec![Bytes::from_static(TAG_ACK), big])).await.unwrap();
        let r = recv_to(&mut s).await;
        let dt = t.elapsed();
        assert_eq!(&r.get(0).unwrap()[..], TAG_ACK);
        let got = u64::from_le_bytes(r.get(1).unwrap()[..].try_into().unwrap());
        assert_eq!(got as usize, len);
        if rep > 0 {
            rates.push(mib as f64 / dt.as_secs_f64());
        }
    }
    report_bw(IMP, mib, &rates);
}

async fn expect_echo(s: &mut DealerSocket, frames: &[Vec<u8>]) -> Result<(), String> {
    let m = msg(frames.iter().map(|f| Bytes::copy_from_slice(f)).collect());
    s.send(m).await.map_err(|e| e.to_string())?;
    let r = tokio::time::timeout(Duration::from_secs(20), s.recv())
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| e.to_string())?;
    if r.len() != frames.len() {
        return Err(format!("got {} frames, want {}", r.len(), frames.len()));
    }
    for (i, (a, b)) in r.iter().zip(frames).enumerate() {
        if &a[..] != &b[..] {
            return Err(format!("frame {i} differs"));
        }
    }
    Ok(())
}

async fn check(endpoint: &str) {
    let mut c = Checks::new(IMP);
    let mut s = dealer(endpoint).await;
    let (h, b) = small_frames();
    let r = expect_echo(&mut s, &[TAG_ECHO.to_vec(), h, b]).await;
    c.record("small_multipart_echo", r.is_ok(), &format!("{r:?}"));
    let r = expect_echo(&mut s, &check_frames()).await;
    c.record("empty+long_frames_echo", r.is_ok(), &format!("{r:?}"));

    for i in 0..1000u32 {
        let m = msg(vec![Bytes::from_static(TAG_ECHO), Bytes::copy_from_slice(&i.to_le_bytes())]);
        s.send(m).await.unwrap();
    }
    let mut ok = true;
    for i in 0..1000u32 {
        match tokio::time::timeout(Duration::from_secs(20), s.recv()).await {
            Ok(Ok(r)) if &r.get(1).unwrap()[..] == &i.to_le_bytes()[..] => {}
            _ => {
                ok = false;
                break;
            }
        }
    }
    c.record("pipelined_order_1000", ok, "");

    // 16 MiB frame through the ack path
    let len = 16 * 1024 * 1024;
    s.send(msg(vec![Bytes::from_static(TAG_ACK), Bytes::from(big_payload(len, 3))])).await.unwrap();
    let r = recv_to(&mut s).await;
    let got = u64::from_le_bytes(r.get(1).unwrap()[..].try_into().unwrap());
    c.record("ack_16MiB", got as usize == len, &format!("ack={got}"));
    drop(s);

    let mut opts = SocketOptions::default();
    opts.peer_identity(PeerIdentity::try_from(b"fp-engine-7".to_vec()).unwrap());
    let mut s2 = dealer_with(endpoint, opts).await;
    s2.send(ZmqMessage::from(Bytes::from_static(TAG_IDENT))).await.unwrap();
    let ok = match tokio::time::timeout(Duration::from_secs(10), s2.recv()).await {
        Ok(Ok(r)) => r.len() == 2 && &r.get(1).unwrap()[..] == b"fp-engine-7",
        _ => false,
    };
    c.record("dealer_routing_id", ok, "");
    c.finish()
}

async fn quit(endpoint: &str) {
    let mut s = dealer(endpoint).await;
    s.send(ZmqMessage::from(Bytes::from_static(TAG_QUIT))).await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.recv()).await;
}

fn main() {
    let a = parse_args("bench-zeromq");
    let flavour = std::env::var("FP_TOKIO").unwrap_or_else(|_| "multi".into());
    let rt = match flavour.as_str() {
        "current" => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        _ => tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build(),
    }
    .unwrap();
    rt.block_on(async {
        match a.cmd.as_str() {
            "echo" => echo(&a.endpoint).await,
            "lat" => lat(&a.endpoint, arg_usize(&a.rest, 0, 20_000)).await,
            "thr" => thr(&a.endpoint, arg_usize(&a.rest, 0, 200_000), arg_usize(&a.rest, 1, 500)).await,
            "bw" => bw(&a.endpoint, arg_usize(&a.rest, 0, 128), arg_usize(&a.rest, 1, 5)).await,
            "check" => check(&a.endpoint).await,
            "quit" => quit(&a.endpoint).await,
            _ => usage("bench-zeromq"),
        }
    });
}
