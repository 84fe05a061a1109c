//! Per-key storage: one contiguous block per key holding its metadata, the
//! ts of its retained window and the value ids, so merging an observation
//! touches two or three adjacent cache lines instead of several arrays.
//!
//! Block layout in `u64` words, for a window capacity `cap` (= 2N):
//!
//! ```text
//! [0] count                 [1] ident | prim << 32
//! [2] ext | len << 32 | kind << 40 | live << 48
//! [3] epoch | touched << 32 (batch bookkeeping)
//! [4] cached state: confidence (f64)
//! [5] cached state: current value (raw id, or f64 bits for numeric keys)
//! [6 .. 6+cap]              ts (f64)
//! [6+cap .. 6+cap+cap/2]    value ids (u32, two per word)
//!
//! The cached state is the key's state as of its last merge (code in bits
//! 56..63 of word 2, 0 = none), so a batch gets a key's old state without
//! merging it again.
//! ```

use super::intern::Id;
use super::merge::{Kind, State};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Meta {
    pub count: u64,
    pub ident: u32,
    pub prim: u32,
    /// Index into the numeric arena (numeric) or the hash windows (hash).
    pub ext: u32,
    pub len: u8,
    pub kind: Kind,
    pub live: bool,
    /// Batch that last touched the key, and its index in that batch's
    /// change list.
    pub epoch: u32,
    pub touched: u32,
}

fn kind_code(k: Kind) -> u64 {
    match k {
        Kind::Categorical => 0,
        Kind::Numeric => 1,
        Kind::Hash => 2,
    }
}

fn kind_of(code: u64) -> Kind {
    match code {
        1 => Kind::Numeric,
        2 => Kind::Hash,
        _ => Kind::Categorical,
    }
}

pub struct Blocks {
    cap: usize,
    stride: usize,
    words: Vec<u64>,
}

const HEADER: usize = 6;

/// A key's state as of its last merge.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cached {
    pub state: State,
    pub confidence: f64,
    /// Raw value id (categorical, hash: holds one reference) or f64 bits
    /// (numeric).
    pub current: u64,
}

fn state_code(s: State) -> u64 {
    match s {
        State::Unknown => 1,
        State::Stable => 2,
        State::Drifting => 3,
        State::Conflicted => 4,
        State::MultiActor => 5,
    }
}

fn state_of_code(c: u64) -> Option<State> {
    Some(match c {
        1 => State::Unknown,
        2 => State::Stable,
        3 => State::Drifting,
        4 => State::Conflicted,
        5 => State::MultiActor,
        _ => return None,
    })
}

/// View `u64` words as `f64`s.
fn as_f64(w: &[u64]) -> &[f64] {
    // SAFETY: f64 and u64 have the same size and alignment and every bit
    // pattern is a valid f64; the length is preserved.
    unsafe { std::slice::from_raw_parts(w.as_ptr().cast::<f64>(), w.len()) }
}

fn as_f64_mut(w: &mut [u64]) -> &mut [f64] {
    // SAFETY: as in `as_f64`; the exclusive borrow is carried over.
    unsafe { std::slice::from_raw_parts_mut(w.as_mut_ptr().cast::<f64>(), w.len()) }
}

/// View `u64` words as twice as many `u32`s.
fn as_u32(w: &[u64]) -> &[u32] {
    // SAFETY: u32 needs less alignment than u64, has no invalid bit
    // patterns, and 2*len u32s cover exactly the same bytes.
    unsafe { std::slice::from_raw_parts(w.as_ptr().cast::<u32>(), w.len() * 2) }
}

fn as_u32_mut(w: &mut [u64]) -> &mut [u32] {
    // SAFETY: as in `as_u32`; the exclusive borrow is carried over.
    unsafe { std::slice::from_raw_parts_mut(w.as_mut_ptr().cast::<u32>(), w.len() * 2) }
}

impl Blocks {
    pub fn new(cap: usize) -> Blocks {
        Blocks {
            cap,
            stride: HEADER + cap + cap.div_ceil(2),
            words: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.words.len() / self.stride
    }

    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// Append a zeroed block; returns its slot.
    pub fn push(&mut self) -> u32 {
        let slot = self.len() as u32;
        self.words.resize(self.words.len() + self.stride, 0);
        slot
    }

    fn block(&self, slot: u32) -> &[u64] {
        let b = slot as usize * self.stride;
        &self.words[b..b + self.stride]
    }

    fn block_mut(&mut self, slot: u32) -> &mut [u64] {
        let b = slot as usize * self.stride;
        &mut self.words[b..b + self.stride]
    }

    pub fn meta(&self, slot: u32) -> Meta {
        let w = self.block(slot);
        Meta {
            count: w[0],
            ident: w[1] as u32,
            prim: (w[1] >> 32) as u32,
            ext: w[2] as u32,
            len: (w[2] >> 32) as u8,
            kind: kind_of((w[2] >> 40) & 0xff),
            live: (w[2] >> 48) & 1 == 1,
            epoch: w[3] as u32,
            touched: (w[3] >> 32) as u32,
        }
    }

    pub fn set_meta(&mut self, slot: u32, m: &Meta) {
        let w = self.block_mut(slot);
        w[0] = m.count;
        w[1] = u64::from(m.ident) | (u64::from(m.prim) << 32);
        let cache_bits = w[2] & (0xff << 56);
        w[2] = u64::from(m.ext)
            | (u64::from(m.len) << 32)
            | (kind_code(m.kind) << 40)
            | (u64::from(m.live) << 48)
            | cache_bits;
        w[3] = u64::from(m.epoch) | (u64::from(m.touched) << 32);
    }

    pub fn cached(&self, slot: u32) -> Option<Cached> {
        let w = self.block(slot);
        let state = state_of_code(w[2] >> 56)?;
        Some(Cached {
            state,
            confidence: f64::from_bits(w[4]),
            current: w[5],
        })
    }

    /// Store (or with `None` clear) the cached state; returns the previous one
    /// so the caller can release its value reference.
    pub fn set_cached(&mut self, slot: u32, c: Option<Cached>) -> Option<Cached> {
        let prev = self.cached(slot);
        let w = self.block_mut(slot);
        match c {
            Some(c) => {
                w[2] = (w[2] & !(0xff << 56)) | (state_code(c.state) << 56);
                w[4] = c.confidence.to_bits();
                w[5] = c.current;
            }
            None => w[2] &= !(0xff << 56),
        }
        prev
    }

    pub fn set_touched(&mut self, slot: u32, epoch: u32, touched: u32) {
        self.block_mut(slot)[3] = u64::from(epoch) | (u64::from(touched) << 32);
    }

    /// The window's ts (all `cap` of them; `len` are used).
    pub fn ts(&self, slot: u32) -> &[f64] {
        as_f64(&self.block(slot)[HEADER..HEADER + self.cap])
    }

    pub fn ids(&self, slot: u32) -> &[Id] {
        let cap = self.cap;
        &as_u32(&self.block(slot)[HEADER + cap..])[..cap]
    }

    /// Mutable ts and ids of a block.
    pub fn ring_mut(&mut self, slot: u32) -> (&mut [f64], &mut [Id]) {
        let cap = self.cap;
        let (ts, ids) = self.block_mut(slot)[HEADER..].split_at_mut(cap);
        (as_f64_mut(ts), &mut as_u32_mut(ids)[..cap])
    }

    pub fn heap_bytes(&self) -> usize {
        self.words.capacity() * 8
    }

    /// Reset every block's batch epoch (when the epoch counter wraps).
    pub fn clear_epochs(&mut self) {
        let stride = self.stride;
        for b in self.words.chunks_mut(stride) {
            b[3] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trips_and_rings_are_separate() {
        let mut b = Blocks::new(10);
        let s0 = b.push();
        let s1 = b.push();
        let m = Meta {
            count: u64::MAX - 3,
            ident: 7,
            prim: u32::MAX,
            ext: 12345,
            len: 10,
            kind: Kind::Hash,
            live: true,
            epoch: 9,
            touched: 77,
        };
        b.set_meta(s1, &m);
        assert_eq!(b.meta(s1), m);
        {
            let (ts, ids) = b.ring_mut(s1);
            ts[9] = 1.5;
            ids[9] = 42;
        }
        assert_eq!(b.ts(s1)[9], 1.5);
        assert_eq!(b.ids(s1)[9], 42);
        assert_eq!(b.ts(s0)[9], 0.0);
        assert_eq!(b.ids(s0)[9], 0);
        assert_eq!(b.meta(s1), m, "ring writes leave the header alone");
        assert_eq!(b.cached(s1), None);
        let c = Cached {
            state: State::MultiActor,
            confidence: 0.6,
            current: 7,
        };
        assert_eq!(b.set_cached(s1, Some(c)), None);
        assert_eq!(b.cached(s1), Some(c));
        assert_eq!(b.meta(s1), m, "the cache leaves the header alone");
        b.set_meta(s1, &m);
        assert_eq!(
            b.cached(s1),
            Some(c),
            "and the header leaves the cache alone"
        );
        assert_eq!(b.set_cached(s1, None), Some(c));
        assert_eq!(b.cached(s1), None);
        // odd capacity
        let mut o = Blocks::new(3);
        let s = o.push();
        o.ring_mut(s).1[2] = 5;
        assert_eq!(o.ids(s), &[0, 0, 5]);
    }
}
