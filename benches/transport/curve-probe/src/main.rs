//! CURVE probe: libzmq (via `zmq` 0.10 + patched zmq-sys with libsodium).
//!
//!   fp-curve-probe facts
//!   fp-curve-probe echo  tcp://127.0.0.1:PORT SERVER_SECRET_Z85
//!   fp-curve-probe check tcp://127.0.0.1:PORT SERVER_PUBLIC_Z85 [n=5000]
//!   fp-curve-probe quit  tcp://127.0.0.1:PORT SERVER_PUBLIC_Z85
//!
//! Same E/Q tags as the main benchmark (../src/common.rs); `check` does a
//! CURVE-encrypted echo, then measures round-trip latency over CURVE.
use std::time::{Duration, Instant};

fn z85(s: &str) -> Vec<u8> {
    zmq::z85_decode(s).expect("z85 key")
}

fn facts() {
    let (a, b, c) = zmq::version();
    println!("FACT libzmq {a}.{b}.{c}, zmq::has(\"curve\") = {:?}", zmq::has("curve"));
    let kp = zmq::CurveKeyPair::new().expect("keypair");
    println!("FACT CurveKeyPair::new() ok, public z85 = {}", zmq::z85_encode(&kp.public_key).unwrap());
}

fn echo(ep: &str, secret: &str) {
    let ctx = zmq::Context::new();
    let s = ctx.socket(zmq::ROUTER).unwrap();
    s.set_linger(0).unwrap();
    s.set_curve_server(true).unwrap();
    s.set_curve_secretkey(&z85(secret)).unwrap();
    s.bind(ep).unwrap();
    loop {
        let parts = s.recv_multipart(0).unwrap();
        s.send_multipart(&parts, 0).unwrap();
        if parts.get(1).map(|t| &t[..]) == Some(b"Q") {
            std::thread::sleep(Duration::from_millis(100));
            return;
        }
    }
}

fn client(ctx: &zmq::Context, ep: &str, server_public: &str) -> zmq::Socket {
    let s = ctx.socket(zmq::DEALER).unwrap();
    let kp = zmq::CurveKeyPair::new().unwrap();
    s.set_linger(0).unwrap();
    s.set_rcvtimeo(10_000).unwrap();
    s.set_curve_serverkey(&z85(server_public)).unwrap();
    s.set_curve_publickey(&kp.public_key).unwrap();
    s.set_curve_secretkey(&kp.secret_key).unwrap();
    s.connect(ep).unwrap();
    s
}

fn check(ep: &str, server_public: &str, n: usize) {
    let ctx = zmq::Context::new();
    let s = client(&ctx, ep, server_public);
    let msg: Vec<Vec<u8>> = vec![b"E".to_vec(), vec![b'h'; 35], vec![7u8; 64]];
    s.send_multipart(&msg, 0).unwrap();
    let ok = s.recv_multipart(0).map(|r| r == msg).unwrap_or(false);
    println!("CHECK client=libzmq+curve curve_echo {}", if ok { "PASS" } else { "FAIL" });
    if !ok {
        std::process::exit(1);
    }
    let mut lat = Vec::with_capacity(n);
    for i in 0..n + 1000 {
        let t = Instant::now();
        s.send_multipart(&msg, 0).unwrap();
        s.recv_multipart(0).unwrap();
        if i >= 1000 {
            lat.push(t.elapsed().as_nanos() as f64 / 1000.0);
        }
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let p = |q: f64| lat[((lat.len() - 1) as f64 * q).round() as usize];
    println!("RESULT impl=libzmq+curve test=lat n={n} median_us={:.1} p99_us={:.1}", p(0.5), p(0.99));
}

fn quit(ep: &str, server_public: &str) {
    let ctx = zmq::Context::new();
    let s = client(&ctx, ep, server_public);
    s.send_multipart([&b"Q"[..]], 0).unwrap();
    let _ = s.recv_multipart(0);
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let arg = |i: usize| a.get(i).cloned().unwrap_or_default();
    if a.len() > 2 && !arg(2).starts_with("tcp://127.0.0.1:") {
        eprintln!("loopback endpoints only");
        std::process::exit(2);
    }
    match arg(1).as_str() {
        "facts" => facts(),
        "echo" => echo(&arg(2), &arg(3)),
        "check" => check(&arg(2), &arg(3), arg(4).parse().unwrap_or(5000)),
        "quit" => quit(&arg(2), &arg(3)),
        _ => {
            eprintln!("see the doc comment in src/main.rs");
            std::process::exit(2)
        }
    }
}
