//! Messages sent in a quick succession leave together (decision 0010).
//!
//! Each message a thread hands to libzmq makes libzmq wake its own I/O thread when that thread
//! had gone to sleep, which on a loaded 2-vCPU VM it nearly always has between two
//! `apply_async` calls: one wake-up (and one `write` to the socket) per message, on the client,
//! and downstream the same again on the controller and the engine, which receive one message
//! per wake-up. When batching is on, a send that follows the previous one by less than
//! [`GAP`] is held back in the socket's queue, and the held messages leave together: when
//! [`CAP`] of them are waiting, when a thread starts waiting for replies, or at the latest
//! [`DELAY`] after the first of them (the I/O thread's deadline). A send after a pause leaves at
//! once, so a lone request, a synchronous call or the first of a burst loses no time.
//!
//! Messages leave in the order they were sent, across sockets too (a request, then an abort
//! or a query about it): only one socket holds messages at a time, and a message for another
//! socket, or one that leaves at once, first sends everything held.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// A send this soon after the previous one belongs to a burst and may be held back.
pub const GAP: Duration = Duration::from_micros(200);
/// Longest time a held message waits for its burst.
pub const DELAY: Duration = Duration::from_micros(500);
/// Held messages on one socket that make the sender flush them itself.
pub const CAP: usize = 64;

/// The batching state of one I/O thread, shared by the threads that send.
pub(crate) struct Batching {
    enabled: AtomicBool,
    epoch: Instant,
    /// When the last send happened, in ns since `epoch` (0: never).
    last_send: AtomicU64,
    /// When the I/O thread must send what is held, in ns since `epoch`; 0 when nothing is held
    /// (or a flush is already under way).
    flush_at: AtomicU64,
    /// The socket whose messages are held, if any.
    held_on: Mutex<Option<String>>,
}

/// What a sender must do before its own send (see [`Batching::before_send`]).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Before {
    /// Nothing: hold this message (behind those of the same socket) or send it at once.
    Nothing,
    /// Send everything held first (another socket holds messages, or this one leaves now).
    SendHeld,
}

impl Batching {
    pub(crate) fn new() -> Batching {
        Batching {
            enabled: AtomicBool::new(false),
            epoch: Instant::now(),
            last_send: AtomicU64::new(0),
            flush_at: AtomicU64::new(0),
            held_on: Mutex::new(None),
        }
    }

    /// Before a send on `socket` (`hold`: it is to be held): whether what is held must leave
    /// first to keep the order. Records `socket` as the holding one when `hold`.
    pub(crate) fn before_send(&self, socket: &str, hold: bool) -> Before {
        let mut held_on = self.held_on.lock().unwrap_or_else(PoisonError::into_inner);
        let before = match held_on.as_deref() {
            None => Before::Nothing,
            Some(s) if hold && s == socket => return Before::Nothing,
            Some(_) => Before::SendHeld,
        };
        *held_on = hold.then(|| socket.to_owned());
        before
    }

    /// Forget the holding socket (everything held is being sent).
    pub(crate) fn clear_held(&self) {
        *self.held_on.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    pub(crate) fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::SeqCst);
    }

    pub(crate) fn enabled(&self) -> bool {
        self.enabled.load(Ordering::SeqCst)
    }

    /// Nanoseconds since the epoch, never 0.
    pub(crate) fn now(&self) -> u64 {
        (self.epoch.elapsed().as_nanos() as u64).max(1)
    }

    /// Record a send at `now`; true when it follows the previous one closely enough to be held.
    pub(crate) fn hold(&self, now: u64) -> bool {
        let prev = self.last_send.swap(now, Ordering::SeqCst);
        self.enabled() && prev != 0 && now.saturating_sub(prev) < GAP.as_nanos() as u64
    }

    /// A message was held at `now`: set the I/O thread's deadline unless one is set. True when
    /// it was not: the caller must wake the I/O thread so that it sees the deadline.
    ///
    /// The caller queues its message before calling this. The I/O thread clears the deadline
    /// ([`Batching::take_due`]) before it looks at the queues, so a message queued while the
    /// deadline was still set is seen by that look, and one queued after it sets a new one.
    pub(crate) fn arm(&self, now: u64) -> bool {
        let at = now + DELAY.as_nanos() as u64;
        self.flush_at
            .compare_exchange(0, at, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// For the I/O thread: true (and the deadline cleared) when held messages are due now.
    pub(crate) fn take_due(&self, now: u64) -> bool {
        let at = self.flush_at.load(Ordering::SeqCst);
        at != 0
            && now >= at
            && self
                .flush_at
                .compare_exchange(at, 0, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
    }

    /// Clear the deadline: the caller is about to send everything held.
    pub(crate) fn disarm(&self) {
        self.flush_at.store(0, Ordering::SeqCst);
    }

    /// `timeout_ms` shortened to end when held messages are due (at least 0, rounded up).
    pub(crate) fn poll_timeout(&self, timeout_ms: i32, now: u64) -> i32 {
        let at = self.flush_at.load(Ordering::SeqCst);
        if at == 0 {
            return timeout_ms;
        }
        let left_ms = at.saturating_sub(now).div_ceil(1_000_000);
        let left_ms = i32::try_from(left_ms).unwrap_or(i32::MAX);
        if timeout_ms < 0 {
            left_ms
        } else {
            timeout_ms.min(left_ms)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sends_in_a_burst_are_held_and_only_when_enabled() {
        let b = Batching::new();
        let t0 = 1_000_000_000;
        assert!(!b.hold(t0), "the first send leaves at once");
        assert!(!b.hold(t0 + 1_000), "disabled: nothing is held");
        b.set_enabled(true);
        assert!(b.hold(t0 + 2_000));
        let after_pause = t0 + 2_000 + GAP.as_nanos() as u64 + 1;
        assert!(!b.hold(after_pause), "a send after a pause leaves at once");
    }

    #[test]
    fn one_socket_holds_at_a_time() {
        let b = Batching::new();
        assert_eq!(b.before_send("mux", true), Before::Nothing);
        assert_eq!(
            b.before_send("mux", true),
            Before::Nothing,
            "same socket: keep holding"
        );
        assert_eq!(
            b.before_send("control", true),
            Before::SendHeld,
            "another socket"
        );
        assert_eq!(
            b.before_send("control", false),
            Before::SendHeld,
            "one that leaves now"
        );
        assert_eq!(
            b.before_send("mux", false),
            Before::Nothing,
            "nothing held any more"
        );
        assert_eq!(b.before_send("mux", true), Before::Nothing);
        b.clear_held();
        assert_eq!(b.before_send("task", false), Before::Nothing);
    }

    #[test]
    fn the_deadline_is_armed_once_and_taken_once() {
        let b = Batching::new();
        let now = 5_000_000;
        assert!(b.arm(now), "the first held message wakes the I/O thread");
        assert!(!b.arm(now + 10), "later ones do not");
        assert_eq!(
            b.poll_timeout(100, now),
            1,
            "the poll ends when they are due"
        );
        assert!(!b.take_due(now + 1), "not due yet");
        let due = now + DELAY.as_nanos() as u64;
        assert!(b.take_due(due));
        assert!(!b.take_due(due), "taken once");
        assert_eq!(b.poll_timeout(100, due), 100);
        assert!(b.arm(due), "a new burst arms again");
        b.disarm();
        assert_eq!(b.poll_timeout(-1, due), -1);
    }
}
