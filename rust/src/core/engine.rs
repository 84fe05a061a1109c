//! The incremental engine: per `(identity, primitive)` key, only what the
//! v0 rules read — the last 2N observations in series order (ts, ties in
//! arrival order), the observation count and, for hash keys, the classes
//! seen inside the look-back window with their latest ts. A key's state is
//! always equal to the merger over its whole ts-sorted series, late
//! arrivals included, while memory per key stays constant.
//!
//! Storage is columnar: per key a 24-byte [`Meta`], and 2N slots of ts
//! (f64) and value ids (u32) in shared arenas; numeric keys keep their
//! floats in a separate arena and hash keys a [`HashWindow`].

use std::collections::HashSet;
use std::sync::Arc;

use ahash::RandomState;
use hashbrown::HashMap;

use super::hashwin::{HashWindow, Upsert};
use super::intern::{Id, Interner};
use super::merge::{self, Current, Kind, Outcome, State, Thresholds};
use super::registry::Registry;
use super::slots::{Blocks, Cached, Meta};
use super::value::{write_json_str, Value, ValueRef};

/// Input limits. Anything above them is rejected per item.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_value_bytes: usize,
    pub max_name_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_value_bytes: 8192,
            max_name_bytes: 256,
        }
    }
}

/// One observation, borrowed from the caller's batch.
#[derive(Clone, Copy, Debug)]
pub struct Obs<'a> {
    pub identity: &'a str,
    pub primitive: &'a str,
    pub value: ValueRef<'a>,
    pub ts: f64,
    pub kind: Option<Kind>,
}

/// A rejected item: its index in the batch and why.
#[derive(Clone, Debug, PartialEq)]
pub struct ItemError {
    pub index: usize,
    pub reason: String,
}

/// A merged state (`AttributionState` on the Python side).
#[derive(Clone, Debug, PartialEq)]
pub struct StateOut {
    pub current: Value,
    pub state: State,
    pub confidence: f64,
    pub count: u64,
    pub last_ts: f64,
}

impl StateOut {
    pub fn empty() -> StateOut {
        StateOut {
            current: Value::Null,
            state: State::Unknown,
            confidence: 0.0,
            count: 0,
            last_ts: 0.0,
        }
    }
}

/// One record per key touched by a batch.
#[derive(Clone, Debug)]
pub struct Change {
    pub identity: Arc<str>,
    pub primitive: Arc<str>,
    pub old: Option<StateOut>,
    pub new: StateOut,
}

impl Change {
    pub fn state_changed(&self) -> bool {
        self.old.as_ref().is_none_or(|o| o.state != self.new.state)
    }
}

#[derive(Debug, Default)]
pub struct BatchResult {
    pub changes: Vec<Change>,
    pub errors: Vec<ItemError>,
    pub accepted: usize,
    /// The batch's epoch (which keys it touched already).
    epoch: u32,
}

/// Why a key's state is what it is.
#[derive(Clone, Debug)]
pub struct Explanation {
    pub identity: Arc<str>,
    pub primitive: Arc<str>,
    pub kind: Kind,
    pub count: u64,
    /// The retained window, oldest first: (ts, value).
    pub window: Vec<(f64, Value)>,
    /// Hash keys: the classes inside the look-back window, (value, latest ts).
    pub hash_window: Vec<(Value, f64)>,
    pub outcome: Outcome,
    pub state: StateOut,
}

#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub accepted: u64,
    pub rejected: u64,
    pub unknown_primitive_observations: u64,
}

/// (identity, primitive) → slot: per identity a small vector of
/// (primitive id, slot) sorted by primitive. An identity's keys are looked
/// up together (a session is a burst of its primitives), so the lookup
/// costs one cache line instead of a hash-map probe per observation.
#[derive(Default)]
struct KeyIndex {
    by_ident: Vec<Vec<(u32, u32)>>,
    count: usize,
}

impl KeyIndex {
    fn get(&self, ident: u32, prim: u32) -> Option<u32> {
        let v = self.by_ident.get(ident as usize)?;
        let i = v.partition_point(|e| e.0 < prim);
        v.get(i).filter(|e| e.0 == prim).map(|e| e.1)
    }

    fn insert(&mut self, ident: u32, prim: u32, slot: u32) {
        if self.by_ident.len() <= ident as usize {
            self.by_ident.resize_with(ident as usize + 1, Vec::new);
        }
        let v = &mut self.by_ident[ident as usize];
        let i = v.partition_point(|e| e.0 < prim);
        if v.get(i).is_some_and(|e| e.0 == prim) {
            v[i].1 = slot;
        } else {
            v.insert(i, (prim, slot));
            self.count += 1;
        }
    }

    fn remove(&mut self, ident: u32, prim: u32) {
        let Some(v) = self.by_ident.get_mut(ident as usize) else {
            return;
        };
        let i = v.partition_point(|e| e.0 < prim);
        if v.get(i).is_some_and(|e| e.0 == prim) {
            v.remove(i);
            self.count -= 1;
            if v.is_empty() {
                *v = Vec::new(); // give the memory back
            }
        }
    }

    fn iter(&self) -> impl Iterator<Item = (u32, u32, u32)> + '_ {
        self.by_ident
            .iter()
            .enumerate()
            .flat_map(|(i, v)| v.iter().map(move |&(p, s)| (i as u32, p, s)))
    }

    fn heap_bytes(&self) -> usize {
        self.by_ident.capacity() * std::mem::size_of::<Vec<(u32, u32)>>()
            + self
                .by_ident
                .iter()
                .map(|v| v.capacity() * 8)
                .sum::<usize>()
    }
}

/// Reference-counted name table (identities, primitives).
#[derive(Default)]
struct Names {
    map: HashMap<Arc<str>, u32, RandomState>,
    entries: Vec<Option<(Arc<str>, u32)>>,
    free: Vec<u32>,
    last: std::cell::RefCell<Option<(u32, Arc<str>)>>,
}

impl Names {
    fn find(&self, s: &str) -> Option<u32> {
        self.map.get(s).copied()
    }

    /// `find`, remembering the last hit: observations arrive in per-session
    /// bursts (up to 38 primitives of one attacker), so consecutive lookups
    /// are usually for the same identity.
    fn find_cached(&self, s: &str) -> Option<u32> {
        if let Some((id, name)) = &*self.last.borrow() {
            if name.as_ref() == s {
                return Some(*id);
            }
        }
        let id = self.find(s)?;
        *self.last.borrow_mut() = self.entries[id as usize]
            .as_ref()
            .map(|(n, _)| (id, n.clone()));
        Some(id)
    }

    fn acquire(&mut self, s: &str) -> u32 {
        if let Some(&id) = self.map.get(s) {
            if let Some(e) = self.entries[id as usize].as_mut() {
                e.1 += 1;
            }
            return id;
        }
        let name: Arc<str> = Arc::from(s);
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                self.entries.push(None);
                (self.entries.len() - 1) as u32
            }
        };
        self.entries[id as usize] = Some((name.clone(), 1));
        self.map.insert(name, id);
        id
    }

    fn release(&mut self, id: u32) {
        let Some(e) = self.entries[id as usize].as_mut() else {
            return;
        };
        e.1 -= 1;
        if e.1 == 0 {
            if let Some((name, _)) = self.entries[id as usize].take() {
                self.map.remove(&name);
            }
            self.free.push(id);
            let mut last = self.last.borrow_mut();
            if last.as_ref().is_some_and(|(l, _)| *l == id) {
                *last = None;
            }
        }
    }

    fn name(&self, id: u32) -> Arc<str> {
        match &self.entries[id as usize] {
            Some((n, _)) => n.clone(),
            None => Arc::from(""),
        }
    }

    fn heap_bytes(&self) -> usize {
        self.map.capacity() * 24
            + self.entries.capacity() * 24
            + self
                .entries
                .iter()
                .flatten()
                .map(|(n, _)| n.len() + 16)
                .sum::<usize>()
    }
}

pub struct Engine {
    th: Thresholds,
    cap: usize,
    limits: Limits,
    overrides: HashMap<String, Kind>,
    values: Interner,
    idents: Names,
    prims: Names,
    /// Per primitive id: (default kind, known to the registry/overrides).
    prim_info: Vec<(Kind, bool)>,
    map: KeyIndex,
    slots: Blocks,
    free_slots: Vec<u32>,
    nums: Vec<f64>,
    free_nums: Vec<u32>,
    wins: Vec<HashWindow>,
    free_wins: Vec<u32>,
    stats: Stats,
    unknown_prims: HashSet<String>,
    scratch: Vec<Id>,
    epoch: u32,
}

const MAX_UNKNOWN_NAMES: usize = 1000;

fn quote(s: &str) -> String {
    let mut out = String::new();
    let cut: String = s.chars().take(80).collect();
    write_json_str(&mut out, &cut);
    if cut.len() < s.len() {
        out.push('…');
    }
    out
}

fn describe(v: ValueRef<'_>) -> String {
    match v {
        ValueRef::Str(s) => quote(s),
        ValueRef::Json(s) => {
            let cut: String = s.chars().take(80).collect();
            if cut.len() < s.len() {
                format!("{cut}…")
            } else {
                cut
            }
        }
        other => {
            let mut s = String::new();
            other.write_json(&mut s);
            s
        }
    }
}

/// Insert `(t, v)` into a ts-sorted ring of `*len` used slots; ties go after
/// existing equal ts (arrival order). If the ring is full the oldest entry
/// is dropped and returned. The caller has checked that the observation
/// does not fall before a full window.
fn ring_insert<T: Copy>(
    ts: &mut [f64],
    vals: &mut [T],
    len: &mut usize,
    t: f64,
    v: T,
) -> Option<T> {
    let cap = ts.len();
    let p = ts[..*len].partition_point(|&x| x <= t);
    if *len == cap {
        let evicted = vals[0];
        ts.copy_within(1..p, 0);
        vals.copy_within(1..p, 0);
        ts[p - 1] = t;
        vals[p - 1] = v;
        Some(evicted)
    } else {
        ts.copy_within(p..*len, p + 1);
        vals.copy_within(p..*len, p + 1);
        ts[p] = t;
        vals[p] = v;
        *len += 1;
        None
    }
}

impl Engine {
    pub fn new(th: Thresholds, limits: Limits) -> Result<Engine, String> {
        th.validate()?;
        let cap = th.retained();
        Ok(Engine {
            th,
            cap,
            limits,
            overrides: HashMap::new(),
            values: Interner::new(),
            idents: Names::default(),
            prims: Names::default(),
            prim_info: Vec::new(),
            map: KeyIndex::default(),
            slots: Blocks::new(cap),
            free_slots: Vec::new(),
            nums: Vec::new(),
            free_nums: Vec::new(),
            wins: Vec::new(),
            free_wins: Vec::new(),
            stats: Stats::default(),
            unknown_prims: HashSet::new(),
            scratch: Vec::new(),
            epoch: 0,
        })
    }

    pub fn thresholds(&self) -> &Thresholds {
        &self.th
    }

    /// Set the merger kind of a primitive for keys created from now on.
    pub fn set_kind(&mut self, primitive: &str, kind: Kind) {
        self.overrides.insert(primitive.to_owned(), kind);
        if let Some(p) = self.prims.find(primitive) {
            self.prim_info[p as usize] = (kind, true);
        }
    }

    pub fn len(&self) -> usize {
        self.map.count
    }

    pub fn is_empty(&self) -> bool {
        self.map.count == 0
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn unknown_primitives(&self) -> Vec<String> {
        let mut v: Vec<String> = self.unknown_prims.iter().cloned().collect();
        v.sort();
        v
    }

    pub fn interned_values(&self) -> usize {
        self.values.len()
    }

    /// Default kind of a primitive for a new key, and whether the registry
    /// (or the engine's `kinds`) knew it.
    fn default_kind(&self, primitive: &str) -> (Kind, bool) {
        if let Some(k) = self.overrides.get(primitive) {
            return (*k, true);
        }
        match Registry::get().kind(primitive) {
            Some(k) => (k, true),
            None => (Kind::Categorical, false),
        }
    }

    fn find_slot(&self, identity: &str, primitive: &str) -> Option<u32> {
        let i = self.idents.find(identity)?;
        let p = self.prims.find(primitive)?;
        self.map.get(i, p)
    }

    fn check_name(&self, what: &str, s: &str) -> Result<(), String> {
        if s.is_empty() {
            return Err(format!("{what} must be a non-empty string"));
        }
        if s.len() > self.limits.max_name_bytes {
            return Err(format!(
                "{what} is {} bytes, above the limit of {}",
                s.len(),
                self.limits.max_name_bytes
            ));
        }
        Ok(())
    }

    /// Validate one observation; returns the key's slot if it exists, the
    /// kind to use, and whether the primitive is known.
    fn check(&self, o: &Obs<'_>) -> Result<(Option<u32>, Kind, bool), String> {
        self.check_name("identity_uuid", o.identity)?;
        self.check_name("primitive", o.primitive)?;
        if !o.ts.is_finite() {
            return Err("ts must be a finite number".into());
        }
        let size = o.value.byte_len();
        if size > self.limits.max_value_bytes {
            return Err(format!(
                "value of {} is {size} bytes, above the limit of {}",
                o.primitive, self.limits.max_value_bytes
            ));
        }
        let prim = self.prims.find(o.primitive);
        let (default, known) = match prim {
            Some(p) => self.prim_info[p as usize],
            None => self.default_kind(o.primitive),
        };
        let slot = match (prim, self.idents.find_cached(o.identity)) {
            (Some(p), Some(i)) => self.map.get(i, p),
            _ => None,
        };
        let kind = match slot {
            Some(s) => {
                let k = self.slots.meta(s).kind;
                if let Some(req) = o.kind {
                    if req != k {
                        return Err(format!(
                            "value_kind {:?} conflicts with the key's kind {:?}",
                            req.as_str(),
                            k.as_str()
                        ));
                    }
                }
                k
            }
            None => o.kind.unwrap_or(default),
        };
        if kind == Kind::Numeric && o.value.to_float().is_none() {
            return Err(format!(
                "{} is numeric but the value {} is not a finite number",
                o.primitive,
                describe(o.value)
            ));
        }
        Ok((slot, kind, known))
    }

    fn create(&mut self, identity: &str, primitive: &str, kind: Kind) -> u32 {
        let ident = self.idents.acquire(identity);
        let prim = self.prims.acquire(primitive);
        if self.prim_info.len() <= prim as usize {
            self.prim_info
                .resize(prim as usize + 1, (Kind::Categorical, false));
        }
        self.prim_info[prim as usize] = self.default_kind(primitive);
        let ext = match kind {
            Kind::Categorical => 0,
            Kind::Numeric => match self.free_nums.pop() {
                Some(e) => e,
                None => {
                    let e = (self.nums.len() / self.cap) as u32;
                    self.nums.resize(self.nums.len() + self.cap, 0.0);
                    e
                }
            },
            Kind::Hash => match self.free_wins.pop() {
                Some(e) => e,
                None => {
                    self.wins.push(HashWindow::Empty);
                    (self.wins.len() - 1) as u32
                }
            },
        };
        let slot = match self.free_slots.pop() {
            Some(s) => s,
            None => self.slots.push(),
        };
        self.slots.set_meta(
            slot,
            &Meta {
                count: 0,
                ident,
                prim,
                ext,
                len: 0,
                kind,
                live: true,
                epoch: 0,
                touched: 0,
            },
        );
        self.map.insert(ident, prim, slot);
        slot
    }

    /// Merge one validated observation into a key.
    fn apply(&mut self, slot: u32, value: ValueRef<'_>, t: f64) {
        let cap = self.cap;
        let mut m = self.slots.meta(slot);
        let mut len = m.len as usize;
        let outside = len == cap && t < self.slots.ts(slot)[0];
        match m.kind {
            Kind::Numeric => {
                if !outside {
                    // validated by `check`
                    let f = value.to_float().unwrap_or(0.0);
                    let nb = m.ext as usize * cap;
                    let (ts, _) = self.slots.ring_mut(slot);
                    ring_insert(ts, &mut self.nums[nb..nb + cap], &mut len, t, f);
                }
            }
            Kind::Categorical => {
                if !outside {
                    let id = self.values.acquire(value);
                    let (ts, ids) = self.slots.ring_mut(slot);
                    if let Some(ev) = ring_insert(ts, ids, &mut len, t, id) {
                        self.values.release(ev);
                    }
                }
            }
            Kind::Hash => {
                let prev_max = if len > 0 {
                    self.slots.ts(slot)[len - 1]
                } else {
                    f64::NEG_INFINITY
                };
                let id = self.values.acquire(value);
                let cid = self.values.canon_of(id);
                let max = prev_max.max(t);
                let cutoff = max - self.th.hash_window_secs;
                let win = &mut self.wins[m.ext as usize];
                if t > prev_max {
                    let mut dropped = std::mem::take(&mut self.scratch);
                    win.prune(cutoff, &mut dropped);
                    for c in dropped.drain(..) {
                        self.values.release_canon(c);
                    }
                    self.scratch = dropped;
                }
                if !value.is_null() && t >= cutoff {
                    self.values.retain_canon(cid);
                    if self.wins[m.ext as usize].upsert(cid, t) == Upsert::Existing {
                        self.values.release_canon(cid);
                    }
                }
                if outside {
                    self.values.release(id);
                } else {
                    let (ts, ids) = self.slots.ring_mut(slot);
                    if let Some(ev) = ring_insert(ts, ids, &mut len, t, id) {
                        self.values.release(ev);
                    }
                }
            }
        }
        m.len = len as u8;
        m.count += 1;
        self.slots.set_meta(slot, &m);
    }

    fn outcome(&self, slot: u32) -> Outcome {
        let m = self.slots.meta(slot);
        let len = m.len as usize;
        let th = if self.th.has_scoped() {
            self.th.scoped(&self.prims.name(m.prim), m.kind).0
        } else {
            &self.th
        };
        match m.kind {
            Kind::Categorical => {
                let mut canon = [0 as Id; 128];
                for (c, &id) in canon.iter_mut().zip(&self.slots.ids(slot)[..len]) {
                    *c = self.values.canon_of(id);
                }
                merge::categorical(th, m.count, &canon[..len])
            }
            Kind::Numeric => {
                let nb = m.ext as usize * self.cap;
                merge::numeric(th, m.count, &self.nums[nb..nb + len])
            }
            Kind::Hash => merge::hash(th, self.wins[m.ext as usize].len(), len.saturating_sub(1)),
        }
    }

    fn resolve(&self, slot: u32, o: &Outcome) -> StateOut {
        let m = self.slots.meta(slot);
        let len = m.len as usize;
        if m.count == 0 || len == 0 {
            return StateOut::empty();
        }
        let current = match o.current {
            Current::Index(i) => self.values.value(self.slots.ids(slot)[i]).clone(),
            Current::Float(f) => Value::Float(f),
            Current::Null => Value::Null,
        };
        StateOut {
            current,
            state: o.state,
            confidence: o.confidence,
            count: m.count,
            last_ts: self.slots.ts(slot)[len - 1],
        }
    }

    fn state_of(&self, slot: u32) -> StateOut {
        self.resolve(slot, &self.outcome(slot))
    }

    /// The key's state from its cache (no merge), if cached.
    fn cached_state(&self, slot: u32) -> Option<StateOut> {
        let c = self.slots.cached(slot)?;
        let m = self.slots.meta(slot);
        let len = m.len as usize;
        if len == 0 {
            return None;
        }
        let current = if m.kind == Kind::Numeric {
            Value::Float(f64::from_bits(c.current))
        } else {
            self.values.value(c.current as Id).clone()
        };
        Some(StateOut {
            current,
            state: c.state,
            confidence: c.confidence,
            count: m.count,
            last_ts: self.slots.ts(slot)[len - 1],
        })
    }

    /// Merge, remember the result in the key's cache, and return it.
    fn refresh(&mut self, slot: u32) -> StateOut {
        let o = self.outcome(slot);
        let out = self.resolve(slot, &o);
        let m = self.slots.meta(slot);
        let current = match (m.kind, o.current) {
            (Kind::Numeric, Current::Float(f)) => Some(f.to_bits()),
            (Kind::Numeric, _) => None,
            (_, Current::Index(i)) => {
                let id = self.slots.ids(slot)[i];
                self.values.retain(id);
                Some(u64::from(id))
            }
            _ => None,
        };
        let new = current.map(|current| Cached {
            state: o.state,
            confidence: o.confidence,
            current,
        });
        self.set_cache(slot, m.kind, new);
        out
    }

    fn set_cache(&mut self, slot: u32, kind: Kind, c: Option<Cached>) {
        if let Some(prev) = self.slots.set_cached(slot, c) {
            if kind != Kind::Numeric {
                self.values.release(prev.current as Id);
            }
        }
    }

    /// Merge a batch. Bad items are reported and skipped; the rest apply.
    /// The new state of a key is computed right after its observation is
    /// merged (while its block is in cache), once per observation.
    pub fn ingest<'a, I>(&mut self, batch: I) -> BatchResult
    where
        I: IntoIterator<Item = (usize, Result<Obs<'a>, String>)>,
    {
        let mut out = self.begin();
        self.ingest_more(&mut out, batch);
        out
    }

    /// Start a batch that arrives in several parts (see [`Self::ingest_more`]).
    pub fn begin(&mut self) -> BatchResult {
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.slots.clear_epochs();
            self.epoch = 1;
        }
        BatchResult {
            epoch: self.epoch,
            ..BatchResult::default()
        }
    }

    /// Merge one more part of a batch begun with [`Self::begin`]: a key
    /// touched by several parts still gets one change record (its state
    /// before the first part, after the last). No other batch may run on
    /// this engine in between.
    pub fn ingest_more<'a, I>(&mut self, out: &mut BatchResult, batch: I)
    where
        I: IntoIterator<Item = (usize, Result<Obs<'a>, String>)>,
    {
        let batch = batch.into_iter();
        out.changes.reserve(batch.size_hint().0);
        let epoch = out.epoch;
        for (index, item) in batch {
            let checked = item.and_then(|o| self.check(&o).map(|c| (o, c)));
            let (o, (slot, kind, known)) = match checked {
                Ok(v) => v,
                Err(reason) => {
                    self.stats.rejected += 1;
                    out.errors.push(ItemError { index, reason });
                    continue;
                }
            };
            if !known {
                self.stats.unknown_primitive_observations += 1;
                if self.unknown_prims.len() < MAX_UNKNOWN_NAMES
                    && !self.unknown_prims.contains(o.primitive)
                {
                    self.unknown_prims.insert(o.primitive.to_owned());
                }
            }
            let slot = match slot {
                Some(s) => s,
                None => self.create(o.identity, o.primitive, kind),
            };
            let m = self.slots.meta(slot);
            let pos = if m.epoch == epoch {
                m.touched as usize
            } else {
                let old = if m.count > 0 {
                    Some(
                        self.cached_state(slot)
                            .unwrap_or_else(|| self.state_of(slot)),
                    )
                } else {
                    None
                };
                out.changes.push(Change {
                    identity: self.idents.name(m.ident),
                    primitive: self.prims.name(m.prim),
                    old,
                    new: StateOut::empty(),
                });
                let pos = out.changes.len() - 1;
                self.slots.set_touched(slot, epoch, pos as u32);
                pos
            };
            self.apply(slot, o.value, o.ts);
            out.changes[pos].new = self.refresh(slot);
            self.stats.accepted += 1;
            out.accepted += 1;
        }
    }

    pub fn get(&self, identity: &str, primitive: &str) -> Option<StateOut> {
        self.find_slot(identity, primitive)
            .map(|s| self.state_of(s))
    }

    pub fn contains(&self, identity: &str, primitive: &str) -> bool {
        self.find_slot(identity, primitive).is_some()
    }

    pub fn keys(&self) -> Vec<(Arc<str>, Arc<str>)> {
        let mut out: Vec<_> = self
            .map
            .iter()
            .map(|(i, p, _)| (self.idents.name(i), self.prims.name(p)))
            .collect();
        out.sort();
        out
    }

    /// Drop a key (e.g. after a failed store transaction, so it is reloaded
    /// from the store). Returns whether it existed.
    pub fn evict(&mut self, identity: &str, primitive: &str) -> bool {
        let Some(slot) = self.find_slot(identity, primitive) else {
            return false;
        };
        self.free_slot(slot);
        true
    }

    fn free_slot(&mut self, slot: u32) {
        let m = self.slots.meta(slot);
        self.set_cache(slot, m.kind, None);
        let len = m.len as usize;
        if m.kind != Kind::Numeric {
            for i in 0..len {
                let id = self.slots.ids(slot)[i];
                self.values.release(id);
            }
        }
        match m.kind {
            Kind::Numeric => self.free_nums.push(m.ext),
            Kind::Hash => {
                let mut dropped = Vec::new();
                self.wins[m.ext as usize].drain_all(&mut dropped);
                for c in dropped {
                    self.values.release_canon(c);
                }
                self.free_wins.push(m.ext);
            }
            Kind::Categorical => {}
        }
        self.map.remove(m.ident, m.prim);
        self.idents.release(m.ident);
        self.prims.release(m.prim);
        self.slots.set_meta(
            slot,
            &Meta {
                count: 0,
                len: 0,
                live: false,
                epoch: 0,
                ..m
            },
        );
        self.free_slots.push(slot);
    }

    pub fn clear(&mut self) {
        let slots: Vec<u32> = self.map.iter().map(|(_, _, s)| s).collect();
        for s in slots {
            self.free_slot(s);
        }
    }

    fn window_of(&self, slot: u32) -> Vec<(f64, Value)> {
        let m = self.slots.meta(slot);
        let ts = self.slots.ts(slot);
        (0..m.len as usize)
            .map(|i| {
                let v = if m.kind == Kind::Numeric {
                    Value::Float(self.nums[m.ext as usize * self.cap + i])
                } else {
                    self.values.value(self.slots.ids(slot)[i]).clone()
                };
                (ts[i], v)
            })
            .collect()
    }

    fn hash_window_of(&self, slot: u32) -> Vec<(Value, f64)> {
        let m = self.slots.meta(slot);
        if m.kind != Kind::Hash {
            return Vec::new();
        }
        self.wins[m.ext as usize]
            .entries()
            .into_iter()
            .filter_map(|(c, t)| self.values.canon_key(c).map(|k| (k.to_value(), t)))
            .collect()
    }

    pub fn explain(&self, identity: &str, primitive: &str) -> Option<Explanation> {
        let slot = self.find_slot(identity, primitive)?;
        let m = self.slots.meta(slot);
        let outcome = self.outcome(slot);
        Some(Explanation {
            identity: self.idents.name(m.ident),
            primitive: self.prims.name(m.prim),
            kind: m.kind,
            count: m.count,
            window: self.window_of(slot),
            hash_window: self.hash_window_of(slot),
            state: self.resolve(slot, &outcome),
            outcome,
        })
    }

    /// The retained window of a key as JSON, for a store to persist.
    pub fn export(&self, identity: &str, primitive: &str) -> Option<String> {
        let slot = self.find_slot(identity, primitive)?;
        let m = self.slots.meta(slot);
        let mut s = String::with_capacity(96 + 32 * m.len as usize);
        s.push_str("{\"v\":1,\"identity_uuid\":");
        write_json_str(&mut s, identity);
        s.push_str(",\"primitive\":");
        write_json_str(&mut s, primitive);
        s.push_str(",\"kind\":\"");
        s.push_str(m.kind.as_str());
        s.push_str("\",\"count\":");
        s.push_str(&m.count.to_string());
        s.push_str(",\"window\":[");
        for (i, (t, v)) in self.window_of(slot).iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push('[');
            super::value::write_float(&mut s, *t);
            s.push(',');
            v.as_ref().write_json(&mut s);
            s.push(']');
        }
        s.push(']');
        if m.kind == Kind::Hash {
            s.push_str(",\"hash_window\":[");
            for (i, (v, t)) in self.hash_window_of(slot).iter().enumerate() {
                if i > 0 {
                    s.push(',');
                }
                s.push('[');
                v.as_ref().write_json(&mut s);
                s.push(',');
                super::value::write_float(&mut s, *t);
                s.push(']');
            }
            s.push(']');
        }
        s.push('}');
        Some(s)
    }

    /// Replace a key with an exported window. Validated fully: a window that
    /// could not have been produced by these thresholds is refused.
    pub fn import(&mut self, w: &WindowIn<'_>) -> Result<(), String> {
        self.check_name("identity_uuid", w.identity)?;
        self.check_name("primitive", w.primitive)?;
        let len = w.window.len();
        let expect = (w.count.min(self.cap as u64)) as usize;
        if len != expect {
            return Err(format!(
                "window holds {len} observations but count {} needs {expect} \
                 (exported with other thresholds?)",
                w.count
            ));
        }
        let mut prev = f64::NEG_INFINITY;
        for (t, v) in &w.window {
            if !t.is_finite() || *t < prev {
                return Err("window ts must be finite and in ascending order".into());
            }
            prev = *t;
            if v.byte_len() > self.limits.max_value_bytes {
                return Err("window value above the size limit".into());
            }
            if w.kind == Kind::Numeric && v.to_float().is_none() {
                return Err("numeric window holds a non-numeric value".into());
            }
        }
        if w.kind != Kind::Hash && !w.hash_window.is_empty() {
            return Err("hash_window given for a non-hash key".into());
        }
        let last = prev;
        for (v, t) in &w.hash_window {
            if v.is_null() || !t.is_finite() || *t > last || *t < last - self.th.hash_window_secs {
                return Err("hash_window entry outside the window or null".into());
            }
        }
        self.evict(w.identity, w.primitive);
        if w.count == 0 {
            return Ok(());
        }
        let slot = self.create(w.identity, w.primitive, w.kind);
        let cap = self.cap;
        let mut m = self.slots.meta(slot);
        let ext = m.ext as usize;
        for (i, (t, v)) in w.window.iter().enumerate() {
            match w.kind {
                Kind::Numeric => self.nums[ext * cap + i] = v.to_float().unwrap_or(0.0),
                _ => {
                    let id = self.values.acquire(*v);
                    self.slots.ring_mut(slot).1[i] = id;
                }
            }
            self.slots.ring_mut(slot).0[i] = *t;
        }
        if w.kind == Kind::Hash {
            for (v, t) in &w.hash_window {
                let id = self.values.acquire(*v);
                let cid = self.values.canon_of(id);
                self.values.retain_canon(cid);
                if self.wins[ext].upsert(cid, *t) == Upsert::Existing {
                    self.values.release_canon(cid);
                }
                self.values.release(id);
            }
        }
        m.len = len as u8;
        m.count = w.count;
        self.slots.set_meta(slot, &m);
        Ok(())
    }

    /// Approximate heap bytes held by the engine.
    pub fn heap_bytes(&self) -> usize {
        self.slots.heap_bytes()
            + self.nums.capacity() * 8
            + self.wins.capacity() * std::mem::size_of::<HashWindow>()
            + self.wins.iter().map(HashWindow::heap_bytes).sum::<usize>()
            + self.map.heap_bytes()
            + (self.free_slots.capacity() + self.free_nums.capacity() + self.free_wins.capacity())
                * 4
            + self.prim_info.capacity() * 2
            + self.values.heap_bytes()
            + self.idents.heap_bytes()
            + self.prims.heap_bytes()
    }
}

/// A window to import (parsed from [`Engine::export`]'s JSON).
#[derive(Debug)]
pub struct WindowIn<'a> {
    pub identity: &'a str,
    pub primitive: &'a str,
    pub kind: Kind,
    pub count: u64,
    pub window: Vec<(f64, ValueRef<'a>)>,
    pub hash_window: Vec<(ValueRef<'a>, f64)>,
}

/// `aggregate_observations` over a whole series given in order (docs/decnet.md#merge-dispatch):
/// positional, like DECNET — `current_value` and `last_observation_ts`
/// come from the last element and the hash window is anchored on it.
pub fn aggregate(
    th: &Thresholds,
    kind: Kind,
    obs: &[(f64, ValueRef<'_>)],
) -> Result<StateOut, String> {
    let n = obs.len();
    let Some(&(last_ts, last_value)) = obs.last() else {
        return Ok(StateOut::empty());
    };
    let take = n.min(th.retained());
    let tail = &obs[n - take..];
    let outcome = match kind {
        Kind::Categorical => {
            let mut classes: Vec<super::value::Canon> = Vec::with_capacity(take);
            let mut ids: Vec<Id> = Vec::with_capacity(take);
            for (_, v) in tail {
                let c = v.canon();
                let id = match classes.iter().position(|x| *x == c) {
                    Some(p) => p,
                    None => {
                        classes.push(c);
                        classes.len() - 1
                    }
                };
                ids.push(id as Id);
            }
            merge::categorical(th, n as u64, &ids)
        }
        Kind::Numeric => {
            // DECNET converts only what the rule reads: the last value below
            // the floor, else the last 2N.
            let used = if (n as u64) < th.min_observations {
                &tail[take - 1..]
            } else {
                tail
            };
            let mut vals = Vec::with_capacity(used.len());
            for (_, v) in used {
                match v.to_float() {
                    Some(f) => vals.push(f),
                    None => {
                        return Err(format!(
                            "numeric merger: value {} is not a finite number",
                            describe(*v)
                        ))
                    }
                }
            }
            merge::numeric(th, n as u64, &vals)
        }
        Kind::Hash => {
            let cutoff = last_ts - th.hash_window_secs;
            let mut seen: Vec<super::value::Canon> = Vec::new();
            let mut set: std::collections::HashSet<super::value::Canon> =
                std::collections::HashSet::new();
            for (t, v) in obs {
                if *t >= cutoff && !v.is_null() {
                    let c = v.canon();
                    if set.insert(c.clone()) {
                        seen.push(c);
                    }
                }
            }
            merge::hash(th, seen.len(), take - 1)
        }
    };
    let current = match outcome.current {
        Current::Index(i) => tail[i].1.to_owned(),
        Current::Float(f) => Value::Float(f),
        Current::Null => Value::Null,
    };
    let _ = last_value;
    Ok(StateOut {
        current,
        state: outcome.state,
        confidence: outcome.confidence,
        count: n as u64,
        last_ts,
    })
}
