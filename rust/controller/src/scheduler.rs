//! The load balancer: picks an engine for a task according to the scheme and the HWM.

use crate::config::Scheme;

/// One engine as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct Slot {
    pub uuid: Vec<u8>,
    pub load: usize,
}

/// Engines in least-recently-used order (front = least recently assigned) with their loads.
#[derive(Debug)]
pub struct Balancer {
    pub scheme: Scheme,
    pub hwm: usize,
    pub slots: Vec<Slot>,
    rng: u64,
}

impl Balancer {
    pub fn new(scheme: Scheme, hwm: usize) -> Balancer {
        use std::hash::BuildHasher;
        let seed = std::collections::hash_map::RandomState::new().hash_one(fp_wire::new_id());
        Balancer {
            scheme,
            hwm,
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
            self.slots.insert(0, Slot { uuid, load: 0 });
        }
    }

    pub fn remove(&mut self, uuid: &[u8]) {
        self.slots.retain(|s| s.uuid != uuid);
    }

    pub fn finished(&mut self, uuid: &[u8]) {
        if let Some(s) = self.slots.iter_mut().find(|s| s.uuid == uuid) {
            s.load = s.load.saturating_sub(1);
        }
    }

    /// True if some engine (optionally among `targets`) is below the HWM.
    pub fn has_capacity(&self) -> bool {
        self.slots
            .iter()
            .any(|s| self.hwm == 0 || s.load < self.hwm)
    }

    /// Pick an engine for a task, mark it loaded and move it to the back (most recently used).
    /// `allowed` filters candidates (targets, blacklists).
    pub fn pick(&mut self, allowed: &dyn Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
        let hwm = self.hwm;
        let candidates: Vec<usize> = (0..self.slots.len())
            .filter(|&i| (hwm == 0 || self.slots[i].load < hwm) && allowed(&self.slots[i].uuid))
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
        let uuid = slot.uuid.clone();
        self.slots.push(slot);
        Some(uuid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn balancer(scheme: Scheme, hwm: usize) -> Balancer {
        let mut b = Balancer::new(scheme, hwm);
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
}
