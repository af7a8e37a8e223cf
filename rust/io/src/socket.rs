//! Socket specifications and creation.

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
        }
    }

    /// Create, configure, bind and connect. Returns the socket and its resolved bound endpoints.
    pub(crate) fn create(&self, ctx: &zmq::Context) -> Result<(zmq::Socket, Vec<String>), String> {
        let err = |what: &str, e: zmq::Error| format!("socket {:?}: {what}: {e}", self.name);
        let sock = ctx.socket(self.kind.zmq()).map_err(|e| err("create", e))?;
        sock.set_linger(self.linger_ms)
            .map_err(|e| err("linger", e))?;
        sock.set_sndhwm(0).map_err(|e| err("sndhwm", e))?;
        sock.set_rcvhwm(0).map_err(|e| err("rcvhwm", e))?;
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
        Ok((sock, bound))
    }
}
