//! Controller configuration (built by the Python layer from CLI flags and config files).

use fp_wire::Packer;

/// The channels the controller binds, in a fixed order.
pub const CHANNELS: [&str; 14] = [
    "registration",
    "notification",
    "mux_client",
    "mux_engine",
    "control_client",
    "control_engine",
    "task_client",
    "task_engine",
    "iopub_client",
    "iopub_engine",
    "hb_ping",
    "hb_pong",
    "broadcast_client",
    "broadcast_engine",
];

/// Task scheduling schemes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    LeastLoad,
    Lru,
    TwoBin,
    Weighted,
    PlainRandom,
}

impl Scheme {
    pub fn from_name(name: &str) -> Result<Scheme, String> {
        Ok(match name {
            "leastload" => Scheme::LeastLoad,
            "lru" => Scheme::Lru,
            "twobin" => Scheme::TwoBin,
            "weighted" => Scheme::Weighted,
            "plainrandom" => Scheme::PlainRandom,
            other => {
                return Err(format!(
                    "unknown scheme {other:?}: use leastload, lru, twobin, weighted or plainrandom"
                ))
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Scheme::LeastLoad => "leastload",
            Scheme::Lru => "lru",
            Scheme::TwoBin => "twobin",
            Scheme::Weighted => "weighted",
            Scheme::PlainRandom => "plainrandom",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ControllerConfig {
    pub ip: String,
    /// Port per channel (index as in [`CHANNELS`]); 0 = random.
    pub ports: [u16; 14],
    pub key: Vec<u8>,
    pub signature_scheme: String,
    pub packer: Packer,
    pub hb_period_ms: u64,
    pub hb_max_misses: u64,
    pub registration_timeout_ms: u64,
    pub scheme: Scheme,
    /// Outstanding tasks per engine; 0 = unlimited.
    pub hwm: usize,
    /// Queue budget of the adaptive depth in ms (engines with short tasks may hold more than
    /// `hwm`, see `scheduler`); 0 = exactly `hwm`.
    pub hwm_budget_ms: f64,
    pub db: String,
    pub db_path: Option<String>,
    pub restore: bool,
    /// In-memory records: most records kept, and most bytes.
    pub db_record_limit: usize,
    pub db_size_limit: usize,
    pub engine_state_file: Option<String>,
    /// CurveZMQ secret key of the controller: every bound socket becomes a CURVE server.
    /// `None`: no encryption (NULL mechanism).
    pub curve_secretkey: Option<fp_io::CurveKey>,
    /// Also bind every channel on `ipc://<prefix><channel>` (peers on this host connect there:
    /// no TCP stack between processes of one machine). `None`: TCP only.
    pub ipc_prefix: Option<String>,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            ip: "127.0.0.1".into(),
            ports: [0; 14],
            key: Vec::new(),
            signature_scheme: "hmac-sha256".into(),
            packer: Packer::Msgpack,
            hb_period_ms: 3000,
            hb_max_misses: 10,
            registration_timeout_ms: 30_000,
            scheme: Scheme::LeastLoad,
            hwm: 1,
            hwm_budget_ms: 2.0,
            db: "memory".into(),
            db_path: None,
            restore: false,
            db_record_limit: crate::records::DEFAULT_RECORD_LIMIT,
            db_size_limit: crate::records::DEFAULT_SIZE_LIMIT,
            engine_state_file: None,
            curve_secretkey: None,
            ipc_prefix: None,
        }
    }
}

impl ControllerConfig {
    /// The extra `ipc://` endpoint of channel `name`, if IPC is on.
    pub fn ipc_endpoint(&self, name: &str) -> Option<String> {
        self.ipc_prefix
            .as_ref()
            .map(|prefix| format!("ipc://{prefix}{name}"))
    }

    pub fn endpoint(&self, index: usize) -> String {
        match self.ports[index] {
            0 => format!("tcp://{}:*", self.ip),
            p => format!("tcp://{}:{p}", self.ip),
        }
    }
}
