//! Handshake results of connecting sockets, from libzmq's socket monitor.
//!
//! A peer that is refused during the ZMTP handshake (a NULL client at a CURVE server, a CURVE
//! client with the wrong server key) sees no error from `connect` or `send`: libzmq just keeps
//! reconnecting. The I/O thread therefore watches the handshake events of every connecting
//! socket, so that a caller that times out can say why.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The last handshake outcome of one socket.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HandshakeState {
    /// Successful handshakes so far.
    pub succeeded: u64,
    /// Failed handshakes so far.
    pub failed: u64,
    /// Endpoint and description of the last failure, while no handshake succeeded since.
    pub failing: Option<(String, String)>,
}

/// Handshake states by socket name, shared between the I/O thread and its callers.
#[derive(Debug, Default)]
pub struct Handshakes {
    states: Mutex<HashMap<Arc<str>, HandshakeState>>,
}

impl Handshakes {
    pub(crate) fn record(&self, socket: &Arc<str>, event: u16, value: u32, endpoint: String) {
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        let state = states.entry(socket.clone()).or_default();
        if u32::from(event) == zmq_sys::ZMQ_EVENT_HANDSHAKE_SUCCEEDED {
            state.succeeded += 1;
            state.failing = None;
        } else {
            state.failed += 1;
            state.failing = Some((endpoint, describe(event, value)));
        }
    }

    /// Sockets whose last handshake failed, as `(socket, endpoint, reason)`, sorted by name.
    pub fn failures(&self) -> Vec<(String, String, String)> {
        let states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<_> = states
            .iter()
            .filter_map(|(name, st)| {
                st.failing
                    .as_ref()
                    .map(|(ep, why)| (name.to_string(), ep.clone(), why.clone()))
            })
            .collect();
        out.sort();
        out
    }

    /// The state of one socket (default when nothing happened yet).
    pub fn state(&self, socket: &str) -> HandshakeState {
        let states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        states.get(socket).cloned().unwrap_or_default()
    }
}

/// A readable reason for a failed handshake event.
pub fn describe(event: u16, value: u32) -> String {
    let event = u32::from(event);
    if event == zmq_sys::ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL {
        match value {
            zmq_sys::ZMQ_PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH => {
                "security mechanism mismatch: one side uses CurveZMQ encryption and the other \
                 does not (is curve_serverkey missing from the connection info, or set when the \
                 controller does not use CURVE?)"
                    .into()
            }
            zmq_sys::ZMQ_PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC => {
                "CurveZMQ cryptographic error: the keys do not match (wrong curve_serverkey?)"
                    .into()
            }
            v => format!("ZMTP protocol error 0x{v:08x} during the handshake"),
        }
    } else if event == zmq_sys::ZMQ_EVENT_HANDSHAKE_FAILED_AUTH {
        format!("authentication refused by the peer (status {value})")
    } else {
        "the peer closed the connection during the handshake; with CurveZMQ this means the \
         server could not authenticate us: the curve_serverkey is probably wrong"
            .into()
    }
}

/// Parse one monitor message: `[event u16 + value u32 (native endian), endpoint]`.
pub(crate) fn parse_event(frames: &[Vec<u8>]) -> Option<(u16, u32, String)> {
    let head = frames.first()?;
    if head.len() < 6 {
        return None;
    }
    let event = u16::from_ne_bytes([head[0], head[1]]);
    let value = u32::from_ne_bytes([head[2], head[3], head[4], head[5]]);
    let endpoint = frames
        .get(1)
        .map(|f| String::from_utf8_lossy(f).into_owned())
        .unwrap_or_default();
    Some((event, value, endpoint))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_failures_until_a_success() {
        let h = Handshakes::default();
        let name: Arc<str> = Arc::from("query");
        let mismatch = zmq_sys::ZMQ_PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH;
        h.record(
            &name,
            zmq_sys::ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL as u16,
            mismatch,
            "tcp://127.0.0.1:5".into(),
        );
        let f = h.failures();
        assert_eq!(f.len(), 1);
        assert!(f[0].2.contains("mechanism mismatch"), "{f:?}");
        h.record(
            &name,
            zmq_sys::ZMQ_EVENT_HANDSHAKE_SUCCEEDED as u16,
            0,
            String::new(),
        );
        assert!(h.failures().is_empty());
        assert_eq!(h.state("query").succeeded, 1);
        assert_eq!(h.state("query").failed, 1);
    }

    #[test]
    fn parses_monitor_frames() {
        let mut head = 2048u16.to_ne_bytes().to_vec();
        head.extend_from_slice(&7u32.to_ne_bytes());
        let parsed = parse_event(&[head, b"tcp://x:1".to_vec()]);
        assert_eq!(parsed, Some((2048, 7, "tcp://x:1".into())));
        assert_eq!(parse_event(&[vec![1, 2]]), None);
        assert_eq!(parse_event(&[]), None);
    }
}
