//! Exactly-once admission of observations, in memory.
//!
//! An observation is a duplicate when its id, or its `(evidence_ref,
//! primitive)` pair, was admitted before. Both keys are kept as 128-bit
//! hashes (random keys per process, so nobody can aim collisions at it) for
//! the last `capacity` admitted observations; older ones are forgotten, and
//! that horizon is the promise: a store with this admission recognises a
//! duplicate that arrives within `capacity` observations of the original.
//!
//! Admission is transactional: what a transaction admitted is either kept
//! ([`Dedupe::commit`]) or taken back ([`Dedupe::rollback`]), so a batch
//! that failed to commit is admitted again when it is redelivered.

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, Hasher};

use ahash::RandomState;

pub struct Dedupe {
    keys: HashSet<u128, BuildU128>,
    /// Committed admissions, oldest first: (id key, evidence key).
    order: VecDeque<(u128, u128)>,
    /// Admitted by the open transaction.
    pending: Vec<(u128, u128)>,
    capacity: usize,
    a: RandomState,
    b: RandomState,
}

/// The keys are already uniform hashes: use their low bits as they are.
#[derive(Clone, Default)]
pub struct BuildU128;

#[derive(Default)]
pub struct U128Hasher(u64);

impl Hasher for U128Hasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut buf = [0u8; 8];
            buf[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(buf);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

impl BuildHasher for BuildU128 {
    type Hasher = U128Hasher;
    fn build_hasher(&self) -> U128Hasher {
        U128Hasher::default()
    }
}

impl Dedupe {
    pub fn new(capacity: usize) -> Dedupe {
        Dedupe {
            keys: HashSet::with_hasher(BuildU128),
            order: VecDeque::new(),
            pending: Vec::new(),
            capacity: capacity.max(1),
            a: RandomState::new(),
            b: RandomState::new(),
        }
    }

    fn h(&self, parts: &[&str]) -> u128 {
        let mut x = self.a.build_hasher();
        let mut y = self.b.build_hasher();
        for p in parts {
            x.write(p.as_bytes());
            x.write_u8(0xff);
            y.write(p.as_bytes());
            y.write_u8(0xff);
        }
        (u128::from(x.finish()) << 64) | u128::from(y.finish())
    }

    fn keys_of(&self, id: &str, evidence_ref: &str, primitive: &str) -> (u128, u128) {
        // the tags keep an id from ever equalling an evidence pair
        (
            self.h(&["id", id]),
            self.h(&["ev", evidence_ref, primitive]),
        )
    }

    /// Admit one observation into the open transaction: false when it is a
    /// duplicate (of an admitted one, or of one earlier in this transaction).
    pub fn admit(&mut self, id: &str, evidence_ref: &str, primitive: &str) -> bool {
        let (k1, k2) = self.keys_of(id, evidence_ref, primitive);
        if self.keys.contains(&k1) || self.keys.contains(&k2) {
            return false;
        }
        self.keys.insert(k1);
        self.keys.insert(k2);
        self.pending.push((k1, k2));
        true
    }

    /// True when the observation would be refused as a duplicate now.
    pub fn seen(&self, id: &str, evidence_ref: &str, primitive: &str) -> bool {
        let (k1, k2) = self.keys_of(id, evidence_ref, primitive);
        self.keys.contains(&k1) || self.keys.contains(&k2)
    }

    /// Keep what the transaction admitted; forget the oldest beyond capacity.
    pub fn commit(&mut self) {
        self.order.extend(self.pending.drain(..));
        while self.order.len() > self.capacity {
            if let Some((k1, k2)) = self.order.pop_front() {
                self.keys.remove(&k1);
                self.keys.remove(&k2);
            }
        }
    }

    /// Take back what the transaction admitted.
    pub fn rollback(&mut self) {
        for (k1, k2) in self.pending.drain(..) {
            self.keys.remove(&k1);
            self.keys.remove(&k2);
        }
    }

    /// Observations remembered (committed).
    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn clear(&mut self) {
        self.keys.clear();
        self.order.clear();
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_evidence_pairs_are_both_keys() {
        let mut d = Dedupe::new(10);
        assert!(d.admit("a", "e1", "p"));
        assert!(!d.admit("a", "e2", "p"), "same id");
        assert!(!d.admit("b", "e1", "p"), "same evidence and primitive");
        assert!(d.admit("c", "e1", "q"), "same evidence, other primitive");
        d.commit();
        assert_eq!(d.len(), 2);
    }

    #[test]
    fn a_rollback_takes_admissions_back() {
        let mut d = Dedupe::new(10);
        assert!(d.admit("a", "e", "p"));
        d.rollback();
        assert!(d.admit("a", "e", "p"));
        d.commit();
        assert!(!d.admit("a", "e", "p"));
    }

    #[test]
    fn the_horizon_is_the_capacity() {
        let mut d = Dedupe::new(2);
        for id in ["a", "b", "c"] {
            assert!(d.admit(id, id, "p"));
            d.commit();
        }
        assert_eq!(d.len(), 2);
        assert!(d.admit("a", "a", "p"), "forgotten beyond the horizon");
        assert!(!d.admit("c", "c", "p"));
    }
}
