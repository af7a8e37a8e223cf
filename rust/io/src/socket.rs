//! Socket specifications and creation.

use crate::curve::Curve;

/// ZMQ socket types we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketKind {
    Dealer,
    Router,
    Pub,
    Sub,
    XPub,
    XSub,
    Pair,
    Push,
    Pull,
    Req,
    Rep,
}

impl SocketKind {
    pub fn from_name(name: &str) -> Result<SocketKind, String> {
        Ok(match name.to_ascii_uppercase().as_str() {
            "DEALER" => SocketKind::Dealer,
            "ROUTER" => SocketKind::Router,
            "PUB" => SocketKind::Pub,
            "SUB" => SocketKind::Sub,
            "XPUB" => SocketKind::XPub,
            "XSUB" => SocketKind::XSub,
            "PAIR" => SocketKind::Pair,
            "PUSH" => SocketKind::Push,
            "PULL" => SocketKind::Pull,
            "REQ" => SocketKind::Req,
            "REP" => SocketKind::Rep,
            other => {
                return Err(format!(
                    "unknown socket kind {other:?}: use one of DEALER ROUTER PUB SUB XPUB XSUB \
                     PAIR PUSH PULL REQ REP"
                ))
            }
        })
    }

    fn zmq(self) -> zmq::SocketType {
        match self {
            SocketKind::Dealer => zmq::DEALER,
            SocketKind::Router => zmq::ROUTER,
            SocketKind::Pub => zmq::PUB,
            SocketKind::Sub => zmq::SUB,
            SocketKind::XPub => zmq::XPUB,
            SocketKind::XSub => zmq::XSUB,
            SocketKind::Pair => zmq::PAIR,
            SocketKind::Push => zmq::PUSH,
            SocketKind::Pull => zmq::PULL,
            SocketKind::Req => zmq::REQ,
            SocketKind::Rep => zmq::REP,
        }
    }

    /// Whether the socket can receive at all (PUB and PUSH cannot).
    pub fn receives(self) -> bool {
        !matches!(self, SocketKind::Pub | SocketKind::Push)
    }
}

/// How to create one socket.
#[derive(Debug, Clone)]
pub struct SocketSpec {
    pub name: String,
    pub kind: SocketKind,
    pub connect: Vec<String>,
    pub bind: Vec<String>,
    pub identity: Option<Vec<u8>>,
    /// SUB/XSUB subscriptions; `None` subscribes to everything.
    pub subscribe: Option<Vec<Vec<u8>>>,
    /// Deliver unparsed frames instead of verified messages.
    pub raw: bool,
    pub linger_ms: i32,
    /// Relay every received frame list, unchanged, to this socket (no delivery to the caller).
    pub forward_to: Option<String>,
    /// CurveZMQ role and keys; `None` is the NULL mechanism (no encryption).
    pub curve: Option<Curve>,
    /// Largest inbound message in bytes (`ZMQ_MAXMSGSIZE`): a peer announcing a larger one is
    /// disconnected before its bytes are buffered. `None`: no limit.
    pub max_msg_size: Option<i64>,
}

impl SocketSpec {
    pub fn new(name: &str, kind: SocketKind) -> SocketSpec {
        SocketSpec {
            name: name.to_owned(),
            kind,
            connect: Vec::new(),
            bind: Vec::new(),
            identity: None,
            subscribe: None,
            raw: false,
            linger_ms: 1000,
            forward_to: None,
            curve: None,
            max_msg_size: None,
        }
    }

    /// Create, configure, bind and connect. Returns the socket, its resolved bound endpoints
    /// and, when `monitor` names an inproc endpoint, a PAIR socket receiving its handshake
    /// events (set up before any connection is made, so no event is missed).
    pub(crate) fn create(
        &self,
        ctx: &crate::Context,
        monitor: Option<&str>,
    ) -> Result<(zmq::Socket, Vec<String>, Option<zmq::Socket>), String> {
        let err = |what: &str, e: zmq::Error| format!("socket {:?}: {what}: {e}", self.name);
        let sock = ctx.socket(self.kind.zmq()).map_err(|e| err("create", e))?;
        if let Some(curve) = &self.curve {
            curve
                .apply(&sock)
                .map_err(|e| format!("socket {:?}: {e}", self.name))?;
        }
        let monitor = match monitor {
            Some(endpoint) => {
                Some(open_monitor(ctx, &sock, endpoint).map_err(|e| err("monitor", e))?)
            }
            None => None,
        };
        sock.set_linger(self.linger_ms)
            .map_err(|e| err("linger", e))?;
        sock.set_sndhwm(0).map_err(|e| err("sndhwm", e))?;
        sock.set_rcvhwm(0).map_err(|e| err("rcvhwm", e))?;
        if let Some(limit) = self.max_msg_size {
            sock.set_maxmsgsize(limit)
                .map_err(|e| err("maxmsgsize", e))?;
        }
        if let Some(id) = &self.identity {
            sock.set_identity(id).map_err(|e| err("identity", e))?;
        }
        if matches!(self.kind, SocketKind::Sub) {
            match &self.subscribe {
                None => sock.set_subscribe(b"").map_err(|e| err("subscribe", e))?,
                Some(topics) => {
                    for t in topics {
                        sock.set_subscribe(t).map_err(|e| err("subscribe", e))?;
                    }
                }
            }
        }
        let mut bound = Vec::new();
        for ep in &self.bind {
            sock.bind(ep).map_err(|e| err(&format!("bind {ep}"), e))?;
            match sock.get_last_endpoint() {
                Ok(Ok(s)) => bound.push(s),
                _ => bound.push(ep.clone()),
            }
        }
        for ep in &self.connect {
            sock.connect(ep)
                .map_err(|e| err(&format!("connect {ep}"), e))?;
        }
        if matches!(self.kind, SocketKind::XSub) {
            let topics = self.subscribe.clone().unwrap_or_else(|| vec![Vec::new()]);
            for t in topics {
                let mut frame = Vec::with_capacity(t.len() + 1);
                frame.push(1u8);
                frame.extend_from_slice(&t);
                sock.send(frame, 0).map_err(|e| err("xsub subscribe", e))?;
            }
        }
        Ok((sock, bound, monitor))
    }
}

/// Handshake events the I/O thread watches on connecting sockets.
static MONITOR_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A fresh inproc endpoint for the handshake monitor of a connecting socket (None for a socket
/// that only binds: it has no handshakes of its own to report).
pub(crate) fn monitor_endpoint(spec: &SocketSpec) -> Option<String> {
    (!spec.connect.is_empty()).then(|| {
        let n = MONITOR_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("inproc://fp-io-monitor-{}-{n}", std::process::id())
    })
}

pub(crate) const HANDSHAKE_EVENTS: i32 = (zmq_sys::ZMQ_EVENT_HANDSHAKE_SUCCEEDED
    | zmq_sys::ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq_sys::ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq_sys::ZMQ_EVENT_HANDSHAKE_FAILED_AUTH) as i32;

fn open_monitor(
    ctx: &crate::Context,
    sock: &zmq::Socket,
    endpoint: &str,
) -> Result<zmq::Socket, zmq::Error> {
    sock.monitor(endpoint, HANDSHAKE_EVENTS)?;
    let pair = ctx.socket(zmq::PAIR)?;
    pair.set_linger(0)?;
    pair.connect(endpoint)?;
    Ok(pair)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::curve::{keypair, Curve};
    use crate::handshake::parse_event;
    use std::time::{Duration, Instant};

    const SECRET_TEXT: &[u8] = b"fp-io curve test: plaintext that must arrive intact";

    fn server(secret: crate::CurveKey) -> (zmq::Socket, String) {
        let mut spec = SocketSpec::new("server", SocketKind::Router);
        spec.bind = vec!["tcp://127.0.0.1:*".into()];
        spec.curve = Some(Curve::server(secret).expect("server role"));
        let (sock, bound, monitor) = spec.create(crate::context(), None).expect("server socket");
        assert!(monitor.is_none());
        sock.set_rcvtimeo(200).expect("rcvtimeo");
        (sock, bound[0].clone())
    }

    fn client(name: &str, endpoint: &str, curve: Option<Curve>) -> (zmq::Socket, zmq::Socket) {
        let mut spec = SocketSpec::new(name, SocketKind::Dealer);
        spec.connect = vec![endpoint.to_owned()];
        spec.curve = curve;
        let monitor = format!("inproc://fp-io-test-monitor-{name}");
        let (sock, _, monitor) = spec
            .create(crate::context(), Some(&monitor))
            .expect("client socket");
        sock.set_rcvtimeo(200).expect("rcvtimeo");
        (sock, monitor.expect("monitor"))
    }

    /// Collect handshake events of `monitor` for up to `wait`, stopping at the first one.
    fn first_event(monitor: &zmq::Socket, wait: Duration) -> Option<(u16, u32)> {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if monitor.poll(zmq::POLLIN, 50).unwrap_or(0) > 0 {
                let frames = monitor.recv_multipart(0).ok()?;
                let (event, value, _endpoint) = parse_event(&frames)?;
                return Some((event, value));
            }
        }
        None
    }

    #[test]
    fn curve_pair_round_trip() {
        let (public, secret) = keypair().expect("keypair");
        let (srv, endpoint) = server(secret);
        let (cli, monitor) = client(
            "good",
            &endpoint,
            Some(Curve::client(public).expect("role")),
        );
        let (event, _) = first_event(&monitor, Duration::from_secs(10)).expect("event");
        assert_eq!(u32::from(event), zmq_sys::ZMQ_EVENT_HANDSHAKE_SUCCEEDED);
        cli.send(SECRET_TEXT, 0).expect("send");
        let mut got = None;
        for _ in 0..50 {
            if let Ok(frames) = srv.recv_multipart(0) {
                got = Some(frames);
                break;
            }
        }
        let frames = got.expect("the server received the message");
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[1], SECRET_TEXT);
        srv.send_multipart([&frames[0][..], b"reply"], 0)
            .expect("reply");
        let mut reply = None;
        for _ in 0..50 {
            if let Ok(r) = cli.recv_bytes(0) {
                reply = Some(r);
                break;
            }
        }
        assert_eq!(reply.as_deref(), Some(&b"reply"[..]));
    }

    #[test]
    fn curve_server_refuses_peers_without_its_key() {
        let (_, secret) = keypair().expect("keypair");
        let (srv, endpoint) = server(secret);
        let (wrong_public, _) = keypair().expect("keypair");
        let cases = [
            ("null", None, zmq_sys::ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL),
            (
                "wrong",
                Some(Curve::client(wrong_public).expect("role")),
                zmq_sys::ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL,
            ),
        ];
        for (name, curve, expected) in cases {
            let (cli, monitor) = client(name, &endpoint, curve);
            cli.send(SECRET_TEXT, 0).expect("queued");
            let (event, value) =
                first_event(&monitor, Duration::from_secs(10)).expect("handshake event");
            assert_eq!(u32::from(event), expected, "{name}");
            if name == "null" {
                assert_eq!(value, zmq_sys::ZMQ_PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH);
            }
            assert!(
                srv.recv_multipart(0).is_err(),
                "{name}: nothing may get through"
            );
        }
    }
}
