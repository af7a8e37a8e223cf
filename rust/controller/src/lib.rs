//! The ferroparallel controller, without any Python: the hub (registration, queries,
//! notifications), the MUX and control relays, the IOPub relay, the task scheduler and the
//! heartbeat, on one native event-loop thread.

//! # fast_maps
//!
//! The maps touched for every message (in-flight requests by msg_id, engines by uuid, task
//! records, outcomes, links) hash with `foldhash` (fast, seeded per map from a per-process
//! random seed) instead of std's SipHash, which was 4% of the loop's time under a stream of
//! tasks. Their keys are not an untrusted peer's free choice: msg_ids and identities come
//! from messages whose HMAC was verified (or from the controller itself: connection and
//! engine ids), so whoever could pick colliding keys holds the cluster key and can run code
//! on the engines anyway; without a key (`--no-key`) nothing is authenticated in the first
//! place. Lookups by an unverified key (a routing identity) only read.

mod broadcast;
mod config;
mod engines;
#[doc(hidden)]
pub mod fuzzing;
mod heart;
pub mod links;
pub mod log;
mod messages;
pub mod records;
mod scheduler;
mod server;
mod tasks;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

pub use config::{ControllerConfig, Scheme, CHANNELS};
pub use server::Stats;

use server::{
    Server, BCAST_C, BCAST_E, CTL_C, CTL_E, HB_PING, HB_PONG, IOP_C, IOP_E, MUX_C, MUX_E, NOTIF,
    REG, TASK_C, TASK_E,
};

/// A running controller.
pub struct Controller {
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
    pub ports: Ports,
    pub ipc: IpcEndpoints,
    /// The link endpoint (`ipc://@...`), when clients and engines on this host can open links.
    pub link: Option<String>,
    pub stats: Arc<Stats>,
    engines: Arc<Mutex<Vec<(i64, String)>>>,
    engine_info: Arc<Mutex<fp_wire::Value>>,
}

fn port_of(endpoint: &str) -> u16 {
    endpoint
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0)
}

/// Bound port of each channel.
pub type Ports = Vec<(&'static str, u16)>;

/// Bound `ipc://` endpoint of each channel (empty without IPC).
pub type IpcEndpoints = Vec<(&'static str, String)>;

/// A socket of the right type and options for channel `i`, not yet bound; a CurveZMQ server
/// when `curve` is given.
fn channel_socket(
    i: usize,
    name: &str,
    curve: Option<&fp_io::Curve>,
) -> Result<zmq::Socket, String> {
    let ctx = fp_io::context();
    let kind = match i {
        REG | MUX_C | MUX_E | CTL_C | CTL_E | TASK_C | TASK_E | HB_PONG | BCAST_C | BCAST_E => {
            zmq::ROUTER
        }
        NOTIF | IOP_C | HB_PING => zmq::PUB,
        IOP_E => zmq::SUB,
        _ => return Err(format!("no socket type for channel {name}")),
    };
    let err = |what: &str, e: zmq::Error| format!("{name}: {what}: {e}");
    let sock = ctx.socket(kind).map_err(|e| err("create", e))?;
    if let Some(curve) = curve {
        curve.apply(&sock).map_err(|e| format!("{name}: {e}"))?;
    }
    sock.set_linger(500).map_err(|e| err("linger", e))?;
    sock.set_sndhwm(0).map_err(|e| err("sndhwm", e))?;
    sock.set_rcvhwm(0).map_err(|e| err("rcvhwm", e))?;
    let engine_side = match i {
        MUX_E => Some(&b"mux_out"[..]),
        CTL_E => Some(&b"control_out"[..]),
        TASK_E => Some(&b"task_out"[..]),
        BCAST_E => Some(broadcast::LEAF_IDENTITY),
        _ => None,
    };
    if let Some(identity) = engine_side {
        sock.set_identity(identity)
            .map_err(|e| err("identity", e))?;
        sock.set_router_mandatory(true)
            .map_err(|e| err("router_mandatory", e))?;
    }
    if matches!(i, MUX_C | CTL_C | TASK_C | REG | BCAST_C) {
        // A client that went away must not make sends fail; drop silently like ipyparallel.
        sock.set_router_mandatory(false)
            .map_err(|e| err("router_mandatory", e))?;
    }
    if i == IOP_E {
        sock.set_subscribe(b"").map_err(|e| err("subscribe", e))?;
    }
    // What peers send to the publishing sockets is only subscriptions, and heartbeat
    // replies are one short frame: refuse anything large instead of storing it.
    let max_in: Option<i64> = match i {
        NOTIF | IOP_C | HB_PING => Some(4096),
        HB_PONG => Some(1024),
        _ => None,
    };
    if let Some(limit) = max_in {
        sock.set_maxmsgsize(limit)
            .map_err(|e| err("maxmsgsize", e))?;
    }
    Ok(sock)
}

/// What [`bind_all`] bound: the sockets, the TCP port and the IPC endpoint of each channel.
type Bound = (Vec<zmq::Socket>, Ports, IpcEndpoints);

fn bind_all(cfg: &ControllerConfig) -> Result<Bound, String> {
    let curve = match &cfg.curve_secretkey {
        Some(secret) => Some(fp_io::Curve::server(*secret)?),
        None => None,
    };
    let mut socks = Vec::with_capacity(CHANNELS.len());
    let mut ports = Vec::with_capacity(CHANNELS.len());
    let mut ipc = Vec::new();
    for (i, name) in CHANNELS.iter().enumerate() {
        let sock = channel_socket(i, name, curve.as_ref())?;
        let endpoint = cfg.endpoint(i);
        sock.bind(&endpoint)
            .map_err(|e| format!("{name}: bind {endpoint}: {e}"))?;
        let bound = match sock.get_last_endpoint() {
            Ok(Ok(s)) => s,
            _ => endpoint,
        };
        ports.push((*name, port_of(&bound)));
        if let Some(url) = cfg.ipc_endpoint(name) {
            sock.bind(&url)
                .map_err(|e| format!("{name}: bind {url}: {e}"))?;
            ipc.push((*name, url));
        }
        socks.push(sock);
    }
    // the heartbeat socket's closed connections (an engine process gone) start a probe
    let monitor = heartbeat_monitor(&socks[HB_PONG])?;
    socks.push(monitor);
    Ok((socks, ports, ipc))
}

/// A PAIR socket receiving the `DISCONNECTED` events of `hb_pong` (index `server::HB_MON`).
fn heartbeat_monitor(hb_pong: &zmq::Socket) -> Result<zmq::Socket, String> {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let endpoint = format!(
        "inproc://fp-controller-hb-monitor-{}-{n}",
        std::process::id()
    );
    let err = |what: &str, e: zmq::Error| format!("heartbeat monitor: {what}: {e}");
    hb_pong
        .monitor(&endpoint, zmq::SocketEvent::DISCONNECTED.to_raw() as i32)
        .map_err(|e| err("monitor", e))?;
    let pair = fp_io::context()
        .socket(zmq::PAIR)
        .map_err(|e| err("socket", e))?;
    pair.set_linger(0).map_err(|e| err("linger", e))?;
    pair.connect(&endpoint).map_err(|e| err("connect", e))?;
    Ok(pair)
}

/// Where links are served: next to the IPC endpoints (clients and engines on this host), on
/// an abstract socket, unless CurveZMQ is on (a link is not encrypted) or the environment says
/// off (see `links`).
fn link_endpoint(cfg: &ControllerConfig) -> Option<String> {
    if cfg.curve_secretkey.is_some() || !links::enabled_by_env() {
        return None;
    }
    let url = cfg.ipc_endpoint("engine_link")?;
    url.starts_with("ipc://@").then_some(url)
}

impl Controller {
    /// Bind every socket and start the event loop.
    pub fn start(cfg: ControllerConfig) -> Result<Controller, String> {
        let (socks, ports, ipc) = bind_all(&cfg)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Stats::default());
        let link = match link_endpoint(&cfg) {
            Some(url) => Some((links::listen(&url)?, url)),
            None => None,
        };
        let mut server = Server::new(cfg, socks, stop.clone(), stats.clone())?;
        let link = link.map(|(listener, url)| {
            server.set_link_listener(listener);
            url
        });
        let engines = server.shared_engines.clone();
        let engine_info = server.engine_info.clone();
        let thread = std::thread::Builder::new()
            .name("ferroparallel-controller".into())
            .spawn(move || server.run())
            .map_err(|e| format!("cannot start the controller thread: {e}"))?;
        Ok(Controller {
            stop,
            thread: Mutex::new(Some(thread)),
            ports,
            ipc,
            link,
            stats,
            engines,
            engine_info,
        })
    }

    /// What `registration_reply` carries as `connection_info` from now on.
    pub fn set_engine_info(&self, info: fp_wire::Value) {
        if let Ok(mut v) = self.engine_info.lock() {
            *v = info;
        }
    }

    /// True while the event loop runs.
    pub fn running(&self) -> bool {
        self.thread
            .lock()
            .map(|t| t.as_ref().is_some_and(|h| !h.is_finished()))
            .unwrap_or(false)
    }

    /// Ask the loop to publish `shutdown_notification` and stop; waits for it.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }

    /// Registered engines as (id, uuid).
    pub fn engines(&self) -> Vec<(i64, String)> {
        self.engines.lock().map(|e| e.clone()).unwrap_or_default()
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.stop();
    }
}
