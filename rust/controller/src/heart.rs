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
}

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
