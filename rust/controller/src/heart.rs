//! Heartbeat bookkeeping: which ping payload belongs to which beat.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

pub struct Heart {
    pub period: Duration,
    pub max_misses: u64,
    pub beat: u64,
    started: Instant,
    /// Recent ping payloads with the beat they count for.
    recent: VecDeque<(Vec<u8>, u64)>,
    pub next_beat: Instant,
    /// Quick extra pings while registrations are pending (so new engines answer at once).
    pub next_fast_ping: Option<Instant>,
    /// A check of every engine after a heartbeat connection closed (see [`Probe`]).
    pub probe: Option<Probe>,
}

/// After an engine's heartbeat connection closes (its process died, most often), every engine
/// is pinged quickly for [`PROBE_GRACE`]: those that answer none of these pings are dropped
/// at its end, their running tasks failing with `EngineError` within seconds instead of after
/// `max_misses` heartbeat periods. An engine's pongs come from its I/O thread, not from the
/// Python thread that may be busy running a task, so a live engine answers within
/// milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    /// The beat of the first probe ping: an engine whose last answered beat is older did not
    /// answer any of them.
    pub beat: u64,
    pub deadline: Instant,
    pub next_ping: Instant,
}

/// How long engines have to answer a probe.
pub const PROBE_GRACE: Duration = Duration::from_secs(2);
/// Interval of the probe pings.
pub const PROBE_PING: Duration = Duration::from_millis(100);

/// Interval of the extra pings sent while an engine waits for its first heartbeat.
pub const FAST_PING: Duration = Duration::from_millis(20);
const RECENT: usize = 64;

impl Heart {
    pub fn new(period: Duration, max_misses: u64) -> Heart {
        let now = Instant::now();
        Heart {
            period,
            max_misses,
            beat: 1,
            started: now,
            recent: VecDeque::new(),
            next_beat: now,
            next_fast_ping: None,
            probe: None,
        }
    }

    /// A new ping payload for the current beat.
    pub fn ping_payload(&mut self) -> Vec<u8> {
        let payload = format!("{:.6}", self.started.elapsed().as_secs_f64()).into_bytes();
        if self.recent.len() >= RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back((payload.clone(), self.beat));
        payload
    }

    /// The most recent ping payload.
    pub fn last_payload(&self) -> Option<&[u8]> {
        self.recent.back().map(|(p, _)| p.as_slice())
    }

    /// The beat a pong payload answers, if it is one of ours.
    pub fn beat_of(&self, payload: &[u8]) -> Option<u64> {
        self.recent
            .iter()
            .rev()
            .find(|(p, _)| p == payload)
            .map(|(_, b)| *b)
    }
}
