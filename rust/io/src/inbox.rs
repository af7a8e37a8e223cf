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
        /// The header frame as received (packed), kept by sockets whose receiver replies
        /// with it as the parent (see `DirectSockets`); None elsewhere.
        header: Option<Vec<u8>>,
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
    /// Callers waiting with [`Waiter::Priority`]: plain waiters leave messages to them.
    priority_waiters: usize,
    /// Bumped by [`Inbox::wake`]: priority waiters that saw an older value return at once.
    generation: u64,
}

/// How a caller of [`Inbox::wait_batch`] waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Waiter {
    /// Takes messages unless a priority waiter is waiting (a background dispatcher).
    Plain,
    /// Takes messages first; returns early (maybe empty) once the generation differs from
    /// `since` (a thread waiting for its own replies, see [`Inbox::wake`]).
    Priority { since: u64 },
}

/// What [`Inbox::wait_batch`] returns.
pub struct Taken {
    pub batch: Vec<Incoming>,
    pub closed: bool,
    /// A priority wait ended because the generation changed.
    pub woken: bool,
}

/// A queue with a condition variable: the I/O thread pushes, callers wait and take batches.
#[derive(Default)]
pub struct Inbox {
    state: Mutex<State>,
    /// Plain waiters wait here.
    cond: Condvar,
    /// Priority waiters wait here (so that messages and wake-ups meant for them do not wake a
    /// plain waiter only for it to wait again).
    priority_cond: Condvar,
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
        let priority = st.priority_waiters > 0;
        drop(st);
        if priority {
            self.priority_cond.notify_all();
        } else {
            self.cond.notify_all();
        }
    }

    /// Record drops found by the consumer (e.g. values that cannot be converted).
    pub fn report(&self, drops: Vec<DropReport>) {
        self.push_batch(Vec::new(), drops);
    }

    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.cond.notify_all();
        self.priority_cond.notify_all();
    }

    /// Wait at most `timeout` for at least one message, then take up to `max` of them.
    /// Returns the batch and whether the inbox is closed.
    pub fn wait_batch(&self, timeout: Duration, max: usize) -> (Vec<Incoming>, bool) {
        let taken = self.wait_batch_as(timeout, max, Waiter::Plain);
        (taken.batch, taken.closed)
    }

    /// [`Inbox::wait_batch`] as a plain or a priority waiter (see [`Waiter`]).
    pub fn wait_batch_as(&self, timeout: Duration, max: usize, waiter: Waiter) -> Taken {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        let since = match waiter {
            Waiter::Priority { since } => {
                st.priority_waiters += 1;
                Some(since)
            }
            Waiter::Plain => None,
        };
        let mut woken = false;
        loop {
            if st.closed {
                break;
            }
            if let Some(since) = since {
                if !st.queue.is_empty() {
                    break;
                }
                if st.generation != since {
                    woken = true;
                    break;
                }
            } else if !st.queue.is_empty() && st.priority_waiters == 0 {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let cond = if since.is_some() {
                &self.priority_cond
            } else {
                &self.cond
            };
            st = match cond.wait_timeout(st, deadline - now) {
                Ok((guard, _)) => guard,
                Err(e) => e.into_inner().0,
            };
        }
        let mut hand_over = false;
        if since.is_some() {
            st.priority_waiters -= 1;
            // messages this waiter leaves behind go to the plain waiters again
            hand_over = st.priority_waiters == 0;
        }
        let may_take = since.is_some() || st.priority_waiters == 0;
        let n = if may_take {
            st.queue.len().min(max.max(1))
        } else {
            0
        };
        let batch: Vec<Incoming> = st.queue.drain(..n).collect();
        hand_over &= !st.queue.is_empty();
        let closed = st.closed;
        drop(st);
        if hand_over {
            self.cond.notify_all();
        }
        Taken {
            batch,
            closed,
            woken,
        }
    }

    /// Count the caller as a priority waiter until [`Inbox::leave_priority`] (a thread that
    /// receives for itself: what it delivers must not go to the plain waiters meanwhile).
    pub fn enter_priority(&self) {
        self.lock().priority_waiters += 1;
    }

    /// Undo [`Inbox::enter_priority`]; what is left goes to the plain waiters again.
    pub fn leave_priority(&self) {
        let mut st = self.lock();
        st.priority_waiters = st.priority_waiters.saturating_sub(1);
        let hand_over = st.priority_waiters == 0 && !st.queue.is_empty();
        drop(st);
        if hand_over {
            self.cond.notify_all();
        }
    }

    /// The current generation (see [`Inbox::wake`]).
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Bump the generation and wake every waiter: priority waiters that started before return
    /// (a thread that settled replies tells the threads waiting for their own to look again).
    pub fn wake(&self) {
        let mut st = self.lock();
        st.generation = st.generation.wrapping_add(1);
        let waiting = st.priority_waiters > 0;
        drop(st);
        if waiting {
            self.priority_cond.notify_all();
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::thread;

    fn raw(text: &str) -> Incoming {
        Incoming {
            socket: Arc::from("mux"),
            delivery: Delivery::Raw(vec![RecvFrame::from_bytes(text.as_bytes())]),
        }
    }

    const LONG: Duration = Duration::from_secs(10);

    #[test]
    fn priority_waiter_takes_messages_before_a_plain_waiter() {
        let inbox = Arc::new(Inbox::default());
        let since = inbox.generation();
        let (tx, rx) = mpsc::channel();
        let plain = {
            let inbox = inbox.clone();
            thread::spawn(move || {
                let taken = inbox.wait_batch_as(LONG, 100, Waiter::Plain);
                tx.send(taken.batch.len()).ok();
            })
        };
        let prio = {
            let inbox = inbox.clone();
            thread::spawn(move || inbox.wait_batch_as(LONG, 1, Waiter::Priority { since }))
        };
        while inbox.lock().priority_waiters == 0 {
            thread::yield_now();
        }
        inbox.push_batch(vec![raw("a"), raw("b")], Vec::new());
        let taken = prio.join().expect("priority waiter");
        assert_eq!(taken.batch.len(), 1);
        assert!(!taken.woken);
        // what the priority waiter left goes to the plain waiter
        assert_eq!(rx.recv_timeout(LONG).expect("plain waiter"), 1);
        plain.join().expect("plain waiter");
    }

    #[test]
    fn wake_ends_a_priority_wait_that_started_before_it() {
        let inbox = Arc::new(Inbox::default());
        let since = inbox.generation();
        inbox.wake();
        let taken = inbox.wait_batch_as(LONG, 10, Waiter::Priority { since });
        assert!(taken.woken && taken.batch.is_empty() && !taken.closed);

        let since = inbox.generation();
        let waiter = {
            let inbox = inbox.clone();
            thread::spawn(move || inbox.wait_batch_as(LONG, 10, Waiter::Priority { since }))
        };
        while inbox.lock().priority_waiters == 0 {
            thread::yield_now();
        }
        inbox.wake();
        let taken = waiter.join().expect("waiter");
        assert!(taken.woken && taken.batch.is_empty());
        assert_eq!(inbox.lock().priority_waiters, 0);
    }

    #[test]
    fn a_plain_wait_times_out_empty_while_a_priority_waiter_waits() {
        let inbox = Arc::new(Inbox::default());
        inbox.push_batch(vec![raw("a")], Vec::new());
        inbox.lock().priority_waiters = 1; // as if a priority waiter were about to take it
        let (batch, closed) = inbox.wait_batch(Duration::from_millis(20), 10);
        assert!(batch.is_empty() && !closed);
        inbox.lock().priority_waiters = 0;
        let (batch, _) = inbox.wait_batch(Duration::from_millis(20), 10);
        assert_eq!(batch.len(), 1);
    }
}
