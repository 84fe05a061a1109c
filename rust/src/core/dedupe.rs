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
use std::sync::OnceLock;

use ahash::RandomState;

/// An observation's two admission keys: its id, and its `(evidence_ref,
/// primitive)` pair, each a 128-bit hash.
pub type Keys = (u128, u128);

/// The hash keys of this process (random, chosen once): every [`Dedupe`]
/// of the process derives the same [`Keys`] from an observation, so a batch
/// hashes its items once however many admissions look at it.
fn seeds() -> &'static (RandomState, RandomState) {
    static SEEDS: OnceLock<(RandomState, RandomState)> = OnceLock::new();
    SEEDS.get_or_init(|| (RandomState::new(), RandomState::new()))
}

fn h(parts: &[&str]) -> u128 {
    let (a, b) = seeds();
    let mut x = a.build_hasher();
    let mut y = b.build_hasher();
    for p in parts {
        x.write(p.as_bytes());
        x.write_u8(0xff);
        y.write(p.as_bytes());
        y.write_u8(0xff);
    }
    (u128::from(x.finish()) << 64) | u128::from(y.finish())
}

/// The admission keys of an observation.
pub fn keys_of(id: &str, evidence_ref: &str, primitive: &str) -> Keys {
    (h(&["id", id]), h(&["ev", evidence_ref, primitive]))
}

pub struct Dedupe {
    keys: HashSet<u128, BuildU128>,
    /// Committed admissions, oldest first: (id key, evidence key).
    order: VecDeque<(u128, u128)>,
    /// Admitted by open transactions, each admission with its
    /// transaction's tag (several may be open on a pipelined writer).
    pending: Vec<(u64, u128, u128)>,
    /// The tag of the transaction admitting now ([`Dedupe::begin`]).
    tag: u64,
    capacity: usize,
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
            tag: 0,
            capacity: capacity.max(1),
        }
    }

    pub fn admit(&mut self, id: &str, evidence_ref: &str, primitive: &str) -> bool {
        self.admit_keys(keys_of(id, evidence_ref, primitive))
    }

    /// [`Dedupe::admit`] with the keys already made ([`keys_of`]).
    pub fn admit_keys(&mut self, (k1, k2): Keys) -> bool {
        if self.keys.contains(&k1) || self.keys.contains(&k2) {
            return false;
        }
        self.keys.insert(k1);
        self.keys.insert(k2);
        self.pending.push((self.tag, k1, k2));
        true
    }

    pub fn seen(&self, id: &str, evidence_ref: &str, primitive: &str) -> bool {
        self.seen_keys(keys_of(id, evidence_ref, primitive))
    }

    /// [`Dedupe::seen`] with the keys already made ([`keys_of`]).
    pub fn seen_keys(&self, (k1, k2): Keys) -> bool {
        self.keys.contains(&k1) || self.keys.contains(&k2)
    }

    /// Later admissions belong to the transaction `tag`.
    pub fn begin(&mut self, tag: u64) {
        self.tag = tag;
    }

    /// The admissions of the transaction `tag` (of every open one: None),
    /// no longer pending.
    fn settle(&mut self, tag: Option<u64>) -> Vec<(u128, u128)> {
        let (mine, rest) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition::<Vec<_>, _>(|p| tag.is_none_or(|t| p.0 == t));
        self.pending = rest;
        mine.into_iter().map(|(_, k1, k2)| (k1, k2)).collect()
    }

    /// Keep what the transaction `tag` admitted (every open one: None); the
    /// others stay open.
    pub fn commit(&mut self, tag: Option<u64>) {
        let kept = self.settle(tag);
        self.order.extend(kept);
        while self.order.len() > self.capacity {
            if let Some((k1, k2)) = self.order.pop_front() {
                self.keys.remove(&k1);
                self.keys.remove(&k2);
            }
        }
    }

    /// Take back what the transaction `tag` admitted (every open one: None);
    /// the others stay open.
    pub fn rollback(&mut self, tag: Option<u64>) {
        for (k1, k2) in self.settle(tag) {
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
        d.commit(None);
        assert_eq!(d.len(), 2);
    }

    #[test]
    fn keys_made_once_serve_every_dedupe_of_the_process() {
        let k = keys_of("a", "e", "p");
        assert_eq!(k, keys_of("a", "e", "p"));
        assert_ne!(k.0, keys_of("b", "e", "p").0);
        assert_ne!(k.1, keys_of("a", "e", "q").1);
        // "id" and "ev" keep the two kinds of key apart
        assert_ne!(keys_of("x", "", "").0, keys_of("", "x", "").1);
        let (mut d1, mut d2) = (Dedupe::new(10), Dedupe::new(10));
        assert!(d1.admit_keys(k));
        assert!(d2.admit_keys(k));
        assert!(d1.seen("a", "other", "p") && !d1.seen("b", "other", "p"));
    }

    #[test]
    fn a_rollback_takes_admissions_back() {
        let mut d = Dedupe::new(10);
        assert!(d.admit("a", "e", "p"));
        d.rollback(None);
        assert!(d.admit("a", "e", "p"));
        d.commit(None);
        assert!(!d.admit("a", "e", "p"));
    }

    #[test]
    fn tagged_transactions_commit_and_roll_back_apart() {
        let mut d = Dedupe::new(10);
        d.begin(1);
        assert!(d.admit("a", "e1", "p"));
        d.begin(2);
        assert!(d.admit("b", "e2", "p"));
        assert!(!d.admit("a", "e9", "p")); // pending admissions count as seen
        d.rollback(Some(1));
        assert!(!d.seen("a", "e1", "p"));
        assert!(d.seen("b", "e2", "p"));
        d.commit(Some(2));
        assert_eq!(d.len(), 1);
        d.rollback(Some(2)); // nothing of 2 is pending any more
        assert!(d.seen("b", "e2", "p"));
    }

    #[test]
    fn the_horizon_is_the_capacity() {
        let mut d = Dedupe::new(2);
        for id in ["a", "b", "c"] {
            assert!(d.admit(id, id, "p"));
            d.commit(None);
        }
        assert_eq!(d.len(), 2);
        assert!(d.admit("a", "a", "p"), "forgotten beyond the horizon");
        assert!(!d.admit("c", "c", "p"));
    }
}
