//! Where the I/O thread leaves received messages for the caller, in batches.

use fp_wire::Parts;
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::outframe::RecvFrame;

/// What arrived on a socket.
pub enum Delivery {
    /// A verified, unpacked message.
    Message {
        idents: Vec<RecvFrame>,
        parts: Parts,
        buffers: Vec<RecvFrame>,
    },
    /// Unparsed frames (raw sockets).
    Raw(Vec<RecvFrame>),
}

pub struct Incoming {
    pub socket: Arc<str>,
    pub delivery: Delivery,
}

/// A message that was dropped: which socket, the error class name, and the reason.
#[derive(Debug, Clone)]
pub struct DropReport {
    pub socket: Arc<str>,
    pub kind: &'static str,
    pub text: String,
}

const MAX_DROP_REPORTS: usize = 1000;

#[derive(Default)]
struct State {
    queue: VecDeque<Incoming>,
    drops: VecDeque<DropReport>,
    closed: bool,
}

/// A queue with a condition variable: the I/O thread pushes, callers wait and take batches.
#[derive(Default)]
pub struct Inbox {
    state: Mutex<State>,
    cond: Condvar,
}

impl Inbox {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn push_batch(&self, batch: Vec<Incoming>, drops: Vec<DropReport>) {
        if batch.is_empty() && drops.is_empty() {
            return;
        }
        let mut st = self.lock();
        st.queue.extend(batch);
        for d in drops {
            if st.drops.len() >= MAX_DROP_REPORTS {
                st.drops.pop_front();
            }
            st.drops.push_back(d);
        }
        drop(st);
        self.cond.notify_all();
    }

    /// Record drops found by the consumer (e.g. values that cannot be converted).
    pub fn report(&self, drops: Vec<DropReport>) {
        self.push_batch(Vec::new(), drops);
    }

    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.cond.notify_all();
    }

    /// Wait at most `timeout` for at least one message, then take up to `max` of them.
    /// Returns the batch and whether the inbox is closed.
    pub fn wait_batch(&self, timeout: Duration, max: usize) -> (Vec<Incoming>, bool) {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        while st.queue.is_empty() && !st.closed {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            st = match self.cond.wait_timeout(st, deadline - now) {
                Ok((guard, _)) => guard,
                Err(e) => e.into_inner().0,
            };
        }
        let n = st.queue.len().min(max.max(1));
        let batch: Vec<Incoming> = st.queue.drain(..n).collect();
        (batch, st.closed)
    }

    /// Number of messages waiting.
    pub fn pending(&self) -> usize {
        self.lock().queue.len()
    }

    /// Take every drop report.
    pub fn take_drops(&self) -> Vec<DropReport> {
        self.lock().drops.drain(..).collect()
    }
}
