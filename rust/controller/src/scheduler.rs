//! The load balancer: picks an engine for a task according to the scheme and the HWM.
//!
//! **Adaptive depth.** The HWM bounds the tasks an engine holds (running + queued), which keeps
//! uneven work balanced but makes an engine wait a controller round trip for its next task
//! whenever the queue runs dry. With a *queue budget* (default 2 ms) an engine whose tasks are
//! short may hold more: as many as its measured service time fits into the budget (at most
//! [`MAX_DEPTH`]), never fewer than the HWM. The estimate is an EWMA of each task's service
//! time (reply time minus the later of its assignment and the previous reply, since an engine
//! runs its tasks in order). An engine whose oldest task has been out longer than the budget is
//! busy with something long and is held to the HWM again, so short tasks stop piling up behind
//! a long one after at most one budget's worth.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config::Scheme;

/// Most tasks an engine may hold under the adaptive depth.
pub const MAX_DEPTH: usize = 32;
/// How long an engine's oldest task must have been out before an idle engine takes back the
/// tasks queued behind it: long enough that a scheduling hiccup of a busy machine (a few ms)
/// does not look like a long task.
pub const STEAL_AFTER: Duration = Duration::from_millis(20);
/// Weight of the newest sample in the service-time average.
const EWMA_NEW: f64 = 0.2;

/// One engine as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct Slot {
    pub uuid: Vec<u8>,
    pub load: usize,
    /// Assignment times of the tasks it holds, oldest first.
    assigned: VecDeque<Instant>,
    last_reply: Option<Instant>,
    /// Average service time in seconds (None until a task finished).
    service: Option<f64>,
}

impl Slot {
    fn new(uuid: Vec<u8>) -> Slot {
        Slot {
            uuid,
            load: 0,
            assigned: VecDeque::new(),
            last_reply: None,
            service: None,
        }
    }

    /// Tasks this engine may hold now.
    fn limit(&self, hwm: usize, budget: Duration, now: Instant) -> usize {
        if hwm == 0 {
            return usize::MAX;
        }
        let Some(service) = self.service else {
            return hwm;
        };
        if budget.is_zero() {
            return hwm;
        }
        if let Some(oldest) = self.assigned.front() {
            if now.saturating_duration_since(*oldest) > budget {
                return hwm;
            }
        }
        let depth = (budget.as_secs_f64() / service.max(1e-7)) as usize;
        depth.clamp(hwm, MAX_DEPTH.max(hwm))
    }
}

/// Engines in least-recently-used order (front = least recently assigned) with their loads.
#[derive(Debug)]
pub struct Balancer {
    pub scheme: Scheme,
    pub hwm: usize,
    /// Queue budget of the adaptive depth; zero keeps every engine at the HWM.
    pub budget: Duration,
    pub slots: Vec<Slot>,
    rng: u64,
}

impl Balancer {
    pub fn new(scheme: Scheme, hwm: usize, budget: Duration) -> Balancer {
        use std::hash::BuildHasher;
        let seed = std::collections::hash_map::RandomState::new().hash_one(fp_wire::new_id());
        Balancer {
            scheme,
            hwm,
            budget,
            slots: Vec::new(),
            rng: seed | 1,
        }
    }

    fn rand(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn add(&mut self, uuid: Vec<u8>) {
        if !self.slots.iter().any(|s| s.uuid == uuid) {
            self.slots.insert(0, Slot::new(uuid));
        }
    }

    pub fn remove(&mut self, uuid: &[u8]) {
        self.slots.retain(|s| s.uuid != uuid);
    }

    /// A task of `uuid` finished (its reply arrived): one slot free, service time measured.
    pub fn finished(&mut self, uuid: &[u8]) {
        let now = Instant::now();
        if let Some(s) = self.slots.iter_mut().find(|s| s.uuid == uuid) {
            s.load = s.load.saturating_sub(1);
            if let Some(at) = s.assigned.pop_front() {
                let start = s.last_reply.map_or(at, |r| r.max(at));
                let sample = now.saturating_duration_since(start).as_secs_f64();
                s.service = Some(match s.service {
                    Some(avg) => avg + EWMA_NEW * (sample - avg),
                    None => sample,
                });
            }
            s.last_reply = Some(now);
        }
    }

    /// Tasks `uuid` holds (None for an unknown engine).
    pub fn load_of(&self, uuid: &[u8]) -> Option<usize> {
        self.slots.iter().find(|s| s.uuid == uuid).map(|s| s.load)
    }

    /// An engine other than `idle` holding queued tasks behind one that has been out longer
    /// than the budget and [`STEAL_AFTER`] (the most loaded such engine), for work stealing.
    pub fn stuck(&self, idle: &[u8]) -> Option<Vec<u8>> {
        let now = Instant::now();
        let after = self.budget.max(STEAL_AFTER);
        self.slots
            .iter()
            .filter(|s| {
                s.uuid != idle
                    && s.load >= 2
                    && s.assigned
                        .front()
                        .is_some_and(|at| now.saturating_duration_since(*at) > after)
            })
            .max_by_key(|s| s.load)
            .map(|s| s.uuid.clone())
    }

    /// Undo the last [`pick`](Self::pick) of `uuid` (the task could not be sent).
    pub fn unpick(&mut self, uuid: &[u8]) {
        if let Some(s) = self.slots.iter_mut().find(|s| s.uuid == uuid) {
            s.load = s.load.saturating_sub(1);
            s.assigned.pop_back();
        }
    }

    /// True if some engine has room for another task.
    pub fn has_capacity(&self) -> bool {
        let now = Instant::now();
        self.slots
            .iter()
            .any(|s| s.load < s.limit(self.hwm, self.budget, now))
    }

    /// Pick an engine for a task, mark it loaded and move it to the back (most recently used).
    /// `allowed` filters candidates (targets, blacklists).
    pub fn pick(&mut self, allowed: &dyn Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
        let (hwm, budget, now) = (self.hwm, self.budget, Instant::now());
        let candidates: Vec<usize> = (0..self.slots.len())
            .filter(|&i| {
                let s = &self.slots[i];
                s.load < s.limit(hwm, budget, now) && allowed(&s.uuid)
            })
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let chosen = match self.scheme {
            Scheme::Lru => candidates[0],
            Scheme::LeastLoad => {
                let mut best = candidates[0];
                for &i in &candidates[1..] {
                    if self.slots[i].load < self.slots[best].load {
                        best = i;
                    }
                }
                best
            }
            Scheme::PlainRandom => candidates[(self.rand() % candidates.len() as u64) as usize],
            Scheme::TwoBin => {
                let a = candidates[(self.rand() % candidates.len() as u64) as usize];
                let b = candidates[(self.rand() % candidates.len() as u64) as usize];
                a.min(b)
            }
            Scheme::Weighted => {
                let weights: Vec<f64> = candidates
                    .iter()
                    .map(|&i| 1.0 / (self.slots[i].load as f64 + 1e-6))
                    .collect();
                let total: f64 = weights.iter().sum();
                let draw = |rng: u64| {
                    let mut x = (rng as f64 / u64::MAX as f64) * total;
                    for (k, w) in weights.iter().enumerate() {
                        if x < *w {
                            return candidates[k];
                        }
                        x -= w;
                    }
                    candidates[candidates.len() - 1]
                };
                let (r1, r2) = (self.rand(), self.rand());
                let a = draw(r1);
                let b = draw(r2);
                if self.slots[a].load <= self.slots[b].load {
                    a
                } else {
                    b
                }
            }
        };
        let mut slot = self.slots.remove(chosen);
        slot.load += 1;
        slot.assigned.push_back(now);
        let uuid = slot.uuid.clone();
        self.slots.push(slot);
        Some(uuid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn balancer(scheme: Scheme, hwm: usize) -> Balancer {
        let mut b = Balancer::new(scheme, hwm, Duration::ZERO);
        for u in [b"a", b"b", b"c"] {
            b.add(u.to_vec());
        }
        b
    }

    #[test]
    fn leastload_spreads_and_respects_hwm() {
        let mut b = balancer(Scheme::LeastLoad, 1);
        let mut got: Vec<Vec<u8>> = (0..3).filter_map(|_| b.pick(&|_| true)).collect();
        got.sort();
        assert_eq!(got, vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
        assert!(b.pick(&|_| true).is_none());
        b.finished(b"b");
        assert_eq!(b.pick(&|_| true), Some(b"b".to_vec()));
    }

    #[test]
    fn targets_filter_and_every_scheme_picks_allowed() {
        for scheme in [
            Scheme::LeastLoad,
            Scheme::Lru,
            Scheme::TwoBin,
            Scheme::Weighted,
            Scheme::PlainRandom,
        ] {
            let mut b = balancer(scheme, 0);
            for _ in 0..50 {
                assert_eq!(b.pick(&|u| u == b"c"), Some(b"c".to_vec()));
            }
            assert!(b.pick(&|_| false).is_none());
        }
    }

    #[test]
    fn an_engine_holding_tasks_behind_a_long_one_is_stuck() {
        let mut b = Balancer::new(Scheme::LeastLoad, 2, Duration::from_millis(2));
        b.add(b"a".to_vec());
        b.add(b"b".to_vec());
        let only_a = |u: &[u8]| u == b"a";
        assert!(b.pick(&only_a).is_some() && b.pick(&only_a).is_some());
        assert_eq!((b.load_of(b"a"), b.load_of(b"b")), (Some(2), Some(0)));
        assert_eq!(b.load_of(b"zz"), None);
        // young tasks: not (yet) a reason to take anything back
        assert_eq!(b.stuck(b"b"), None);
        std::thread::sleep(STEAL_AFTER + Duration::from_millis(5));
        assert_eq!(b.stuck(b"b"), Some(b"a".to_vec()));
        assert_eq!(b.stuck(b"a"), None); // never from the idle engine itself
                                         // one task left: nothing queued behind it
        b.unpick(b"a");
        assert_eq!(b.stuck(b"b"), None);
    }

    #[test]
    fn short_tasks_earn_a_deeper_queue_and_long_ones_lose_it() {
        let mut b = Balancer::new(Scheme::LeastLoad, 2, Duration::from_millis(50));
        b.add(b"a".to_vec());
        // no measurement yet: the HWM
        assert!(b.pick(&|_| true).is_some() && b.pick(&|_| true).is_some());
        assert!(b.pick(&|_| true).is_none());
        // two quick tasks: service time ~0, depth grows up to MAX_DEPTH
        b.finished(b"a");
        b.finished(b"a");
        let mut n = 0;
        while b.pick(&|_| true).is_some() {
            n += 1;
            assert!(n <= MAX_DEPTH, "depth must stay bounded");
        }
        assert_eq!(n, MAX_DEPTH);
        // the oldest task has now been out longer than the budget: back to the HWM
        std::thread::sleep(Duration::from_millis(60));
        assert!(!b.has_capacity());
        for _ in 0..MAX_DEPTH - 1 {
            b.finished(b"a");
        }
        // one task left, but it has been out for 60 ms > budget: HWM 2 allows one more
        assert!(b.pick(&|_| true).is_some());
        assert!(b.pick(&|_| true).is_none());
    }

    #[test]
    fn zero_budget_or_unpick_keep_the_plain_hwm() {
        let mut b = balancer(Scheme::Lru, 1);
        let u = b.pick(&|u| u == b"a").expect("a has room");
        b.unpick(&u);
        assert_eq!(b.pick(&|u| u == b"a"), Some(b"a".to_vec()));
        b.finished(b"a");
        b.finished(b"a");
        assert_eq!(b.pick(&|u| u == b"a"), Some(b"a".to_vec()));
        assert!(b.pick(&|u| u == b"a").is_none());
    }
}
