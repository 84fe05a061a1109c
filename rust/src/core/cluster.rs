//! The incremental identity clusterer.
//!
//! Attackers are linked into one identity when they share strong evidence:
//! the same value of a fingerprint primitive (HASSH, JA3/JA4, JARM, a C2
//! endpoint, …) or near values of a SimHash primitive (Hamming distance up
//! to `hamming_max`). Each primitive has a weight; a pair of attackers is
//! *linked* when the weights of its shared evidence add up to `threshold`.
//! Identities are the connected components of the links. Edges carry no
//! time: an observation links whenever it arrives.
//!
//! Work per observation is bounded, never a scan of all attackers:
//!
//! - exact values go into buckets keyed by `(primitive, value)`; a new
//!   member is compared with the bucket's members only;
//! - SimHash values are also banded (locality-sensitive hashing):
//!   `hamming_max + 1` bands of the 64 bits, so by the pigeonhole principle
//!   two values within `hamming_max` bits agree on at least one band, and
//!   only the band buckets' members are candidates (a band bucket holding
//!   [`BAND_CAP`] values is full and no longer searched: low-entropy values
//!   must not turn the search into a scan);
//! - a value shared by more than `full_share` attackers counts less: its
//!   weight is scaled by `full_share / sharers`, so a value common to a few
//!   operators needs corroboration. As a value gains sharers, the links it
//!   supported are checked again, and components that no longer hold are
//!   recomputed;
//! - a value shared by more than `max_share` attackers is ubiquitous (a
//!   default OpenSSH HASSH): it stops being evidence. Its bucket forgets its
//!   members, its contribution to every pair is withdrawn, and links that
//!   rested on it are revoked — the components it held together are
//!   recomputed from the evidence left, which may split them.
//!
//! Evidence is kept per pair, so the links behind an identity can be shown
//! and recomputed. Components are kept with a union-find (union by size,
//! path halving) plus a member list per root.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};

use ahash::RandomState;

/// How a primitive's values are compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Match {
    /// Equal values only.
    Exact,
    /// Equal values, or 64-bit SimHashes within `hamming_max` bits.
    SimHash,
}

/// A fingerprint primitive's configuration.
#[derive(Clone, Debug)]
pub struct Fingerprint {
    pub primitive: String,
    pub weight: f64,
    pub matching: Match,
}

/// The clusterer's configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub fingerprints: Vec<Fingerprint>,
    /// Summed evidence weight at which two attackers are linked.
    pub threshold: f64,
    /// A value shared by more attackers than this counts less
    /// (`full_share / sharers` of its weight).
    pub full_share: usize,
    /// A value shared by more attackers than this is not evidence.
    pub max_share: usize,
    /// Largest Hamming distance at which two SimHashes match (0..=15).
    pub hamming_max: u32,
}

/// One piece of evidence linking a pair, for display.
#[derive(Clone, Debug, PartialEq)]
pub struct Evidence {
    pub primitive: String,
    /// The first attacker's value (canonical JSON text).
    pub value: String,
    /// The second attacker's value (equal to `value` for exact matches).
    pub other: String,
    pub distance: u32,
    pub weight: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ev {
    /// Both attackers are in this bucket.
    Same(u32),
    /// Near SimHashes: the two attackers' buckets (lower attacker first).
    Near(u32, u32),
}

struct Bucket {
    prim: u16,
    value: Box<str>,
    hash: Option<u64>,
    /// Members while the value is rare; emptied when it turns ubiquitous.
    members: Vec<u32>,
    count: u32,
    live: bool,
}

/// Statistics (for metrics and the bench).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub attackers: usize,
    pub buckets: usize,
    pub retired: usize,
    pub pairs: usize,
    pub components: usize,
    pub links: u64,
    pub splits: u64,
}

/// Values an LSH band bucket holds at most. Real SimHashes spread evenly
/// over the bands; values that share a band with this many others have low
/// entropy (`0000…0001`), and such a band is no longer searched, so the
/// work per observation stays bounded (those values may then miss near
/// matches that only that band would have found).
pub const BAND_CAP: usize = 512;

fn fixed_state() -> RandomState {
    // fixed keys: bucket keys only need to be stable within a process, but
    // fixed keys make runs (and the bench) reproducible
    RandomState::with_seeds(0x5eed_0001, 0x5eed_0002, 0x5eed_0003, 0x5eed_0004)
}

fn pair_key(a: u32, b: u32) -> u64 {
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    (u64::from(lo) << 32) | u64::from(hi)
}

/// A SimHash value from its canonical JSON text: a JSON integer, or a
/// string of up to 16 hex digits (optionally `0x`-prefixed).
pub fn parse_simhash(value_json: &str) -> Option<u64> {
    let t = value_json.trim();
    if let Some(s) = t.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        let s = s
            .strip_prefix("0x")
            .or_else(|| s.strip_prefix("0X"))
            .unwrap_or(s);
        if s.is_empty() || s.len() > 16 {
            return None;
        }
        return u64::from_str_radix(s, 16).ok();
    }
    if t.starts_with('-') {
        return t.parse::<i64>().ok().map(|v| v as u64);
    }
    t.parse::<u64>().ok()
}

pub struct Clusterer {
    cfg: Config,
    prim_index: HashMap<String, u16, RandomState>,
    names: Vec<Box<str>>,
    ids: HashMap<Box<str>, u32, RandomState>,
    parent: Vec<u32>,
    size: Vec<u32>,
    /// Members of each root's component (empty for non-roots).
    members: Vec<Vec<u32>>,
    /// Buckets each attacker is in.
    of: Vec<Vec<u32>>,
    /// Partners each attacker shares evidence with.
    adj: Vec<Vec<u32>>,
    buckets: Vec<Bucket>,
    bucket_ids: HashMap<u64, u32>,
    /// LSH band buckets: (primitive, band, bits) → exact buckets.
    bands: HashMap<u64, Vec<u32>>,
    pairs: HashMap<u64, Vec<Ev>>,
    hasher: RandomState,
    stats: Stats,
}

impl Clusterer {
    pub fn new(cfg: Config) -> Result<Self, String> {
        if !(cfg.threshold.is_finite() && cfg.threshold > 0.0) {
            return Err(format!("threshold must be > 0, not {}", cfg.threshold));
        }
        if cfg.hamming_max > 15 {
            return Err(format!(
                "hamming_max must be 0..=15, not {}",
                cfg.hamming_max
            ));
        }
        if cfg.full_share < 2 || cfg.max_share < cfg.full_share {
            return Err(format!(
                "need 2 <= full_share <= max_share, not {} and {}",
                cfg.full_share, cfg.max_share
            ));
        }
        let mut prim_index = HashMap::with_hasher(RandomState::new());
        for (i, f) in cfg.fingerprints.iter().enumerate() {
            if !(f.weight.is_finite() && f.weight >= 0.0) {
                return Err(format!("weight of {} must be >= 0", f.primitive));
            }
            if prim_index.insert(f.primitive.clone(), i as u16).is_some() {
                return Err(format!("{} configured twice", f.primitive));
            }
        }
        Ok(Clusterer {
            cfg,
            prim_index,
            names: Vec::new(),
            ids: HashMap::with_hasher(RandomState::new()),
            parent: Vec::new(),
            size: Vec::new(),
            members: Vec::new(),
            of: Vec::new(),
            adj: Vec::new(),
            buckets: Vec::new(),
            bucket_ids: HashMap::new(),
            bands: HashMap::new(),
            pairs: HashMap::new(),
            hasher: fixed_state(),
            stats: Stats::default(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Whether `primitive` is one of the configured fingerprints.
    pub fn is_fingerprint(&self, primitive: &str) -> bool {
        self.prim_index.contains_key(primitive)
    }

    fn key<T: Hash>(&self, parts: T) -> u64 {
        self.hasher.hash_one(parts)
    }

    fn intern(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = self.names.len() as u32;
        let boxed: Box<str> = name.into();
        self.names.push(boxed.clone());
        self.ids.insert(boxed, id);
        self.parent.push(id);
        self.size.push(1);
        self.members.push(vec![id]);
        self.of.push(Vec::new());
        self.adj.push(Vec::new());
        id
    }

    fn find(&mut self, mut x: u32) -> u32 {
        while self.parent[x as usize] != x {
            let p = self.parent[x as usize];
            self.parent[x as usize] = self.parent[p as usize];
            x = self.parent[x as usize];
        }
        x
    }

    fn root(&self, mut x: u32) -> u32 {
        while self.parent[x as usize] != x {
            x = self.parent[x as usize];
        }
        x
    }

    fn union(&mut self, a: u32, b: u32) -> bool {
        let (mut ra, mut rb) = (self.find(a), self.find(b));
        if ra == rb {
            return false;
        }
        if self.size[ra as usize] < self.size[rb as usize] {
            std::mem::swap(&mut ra, &mut rb);
        }
        self.parent[rb as usize] = ra;
        self.size[ra as usize] += self.size[rb as usize];
        let moved = std::mem::take(&mut self.members[rb as usize]);
        self.members[ra as usize].extend(moved);
        true
    }

    fn weight_of(&self, b: u32) -> f64 {
        let bucket = &self.buckets[b as usize];
        self.cfg.fingerprints[bucket.prim as usize].weight
    }

    /// How much of its weight a value keeps, by how many attackers share it.
    fn share_factor(&self, b: u32) -> f64 {
        let bucket = &self.buckets[b as usize];
        share_factor(&self.cfg, bucket.count as usize, bucket.live)
    }

    fn ev_weight(&self, ev: Ev) -> f64 {
        match ev {
            Ev::Same(b) => self.weight_of(b) * self.share_factor(b),
            Ev::Near(x, y) => {
                let (bx, by) = (&self.buckets[x as usize], &self.buckets[y as usize]);
                if !(bx.live && by.live) {
                    return 0.0;
                }
                let f = self.share_factor(x).min(self.share_factor(y));
                let d = match (bx.hash, by.hash) {
                    (Some(p), Some(q)) => (p ^ q).count_ones(),
                    _ => return 0.0,
                };
                // a near match counts less the further apart the values are
                let scale = 1.0 - f64::from(d) / f64::from(self.cfg.hamming_max + 1);
                self.weight_of(x) * scale * f
            }
        }
    }

    fn score(&self, pair: u64) -> f64 {
        self.pairs
            .get(&pair)
            .map_or(0.0, |evs| evs.iter().map(|&e| self.ev_weight(e)).sum())
    }

    fn linked(&self, a: u32, b: u32) -> bool {
        self.score(pair_key(a, b)) >= self.cfg.threshold - 1e-12
    }

    fn add_evidence(&mut self, a: u32, b: u32, ev: Ev, out: &mut Vec<u32>) {
        let k = pair_key(a, b);
        let evs = self.pairs.entry(k).or_default();
        if evs.contains(&ev) {
            return;
        }
        if evs.is_empty() {
            self.adj[a as usize].push(b);
            self.adj[b as usize].push(a);
        }
        evs.push(ev);
        if self.linked(a, b) && self.union(a, b) {
            self.stats.links += 1;
            out.push(a);
        }
    }

    fn bucket_for(&mut self, prim: u16, value_json: &str) -> u32 {
        let k = self.key((prim, value_json));
        if let Some(&b) = self.bucket_ids.get(&k) {
            if *self.buckets[b as usize].value == *value_json {
                return b;
            }
        }
        let hash = match self.cfg.fingerprints[prim as usize].matching {
            Match::SimHash => parse_simhash(value_json),
            Match::Exact => None,
        };
        let b = self.buckets.len() as u32;
        self.buckets.push(Bucket {
            prim,
            value: value_json.into(),
            hash,
            members: Vec::new(),
            count: 0,
            live: true,
        });
        // a (vanishingly rare) key collision leaves the older bucket
        // unreachable by key: the values are still never confused
        self.bucket_ids.insert(k, b);
        if let Some(h) = hash {
            for band in self.band_keys(prim, h) {
                let list = self.bands.entry(band).or_default();
                if list.len() < BAND_CAP {
                    list.push(b);
                }
            }
        }
        b
    }

    fn band_keys(&self, prim: u16, h: u64) -> Vec<u64> {
        let n = self.cfg.hamming_max + 1;
        let width = 64 / n;
        (0..n)
            .map(|i| {
                let lo = i * width;
                let bits = if i + 1 == n { 64 - lo } else { width };
                let mask = if bits >= 64 {
                    u64::MAX
                } else {
                    (1u64 << bits) - 1
                };
                self.key((prim, i, (h >> lo) & mask))
            })
            .collect()
    }

    /// Add one observation; `touched` receives attackers whose component
    /// changed (the new member of a link, every member of a recomputed
    /// component). Primitives that are not fingerprints are ignored.
    pub fn add(
        &mut self,
        attacker: &str,
        primitive: &str,
        value_json: &str,
        touched: &mut Vec<u32>,
    ) {
        let Some(&prim) = self.prim_index.get(primitive) else {
            return;
        };
        let a = self.intern(attacker);
        let b = self.bucket_for(prim, value_json);
        if self.of[a as usize].contains(&b) {
            return;
        }
        self.of[a as usize].push(b);
        let bucket = &mut self.buckets[b as usize];
        bucket.count += 1;
        if !bucket.live {
            return;
        }
        if bucket.count as usize > self.cfg.max_share {
            self.retire(b, touched);
            return;
        }
        let peers = bucket.members.clone();
        bucket.members.push(a);
        for p in peers {
            self.add_evidence(a, p, Ev::Same(b), touched);
        }
        if let Some(h) = self.buckets[b as usize].hash {
            let mut near: Vec<u32> = Vec::new();
            for band in self.band_keys(prim, h) {
                match self.bands.get(&band) {
                    // a full band holds low-entropy values: it finds no one
                    Some(list) if list.len() < BAND_CAP => {
                        near.extend(list.iter().copied().filter(|&o| o != b));
                    }
                    _ => {}
                }
            }
            near.sort_unstable();
            near.dedup();
            for o in near {
                let other = &self.buckets[o as usize];
                let Some(oh) = other.hash else { continue };
                if !other.live || (h ^ oh).count_ones() > self.cfg.hamming_max {
                    continue;
                }
                for p in other.members.clone() {
                    if p == a {
                        continue;
                    }
                    let ev = if a < p {
                        Ev::Near(b, o)
                    } else {
                        Ev::Near(o, b)
                    };
                    self.add_evidence(a, p, ev, touched);
                }
            }
        }
        if self.buckets[b as usize].count as usize > self.cfg.full_share {
            self.reweigh(b, touched);
        }
    }

    /// A value gained a sharer beyond `full_share`: it now weighs less, so
    /// recompute the components where a link through it no longer holds.
    fn reweigh(&mut self, b: u32, touched: &mut Vec<u32>) {
        let mut roots: Vec<u32> = Vec::new();
        for m in self.buckets[b as usize].members.clone() {
            for &p in &self.adj[m as usize] {
                let Some(evs) = self.pairs.get(&pair_key(m, p)) else {
                    continue;
                };
                let through = evs.iter().any(|e| match *e {
                    Ev::Same(x) => x == b,
                    Ev::Near(x, y) => x == b || y == b,
                });
                if !through || self.linked(m, p) {
                    continue;
                }
                let r = self.root(m);
                if r == self.root(p) && !roots.contains(&r) {
                    roots.push(r);
                }
            }
        }
        for r in roots {
            self.recompute(r, touched);
        }
    }

    /// A value turned ubiquitous: withdraw it as evidence and recompute
    /// the components that may have rested on it.
    fn retire(&mut self, b: u32, touched: &mut Vec<u32>) {
        self.stats.retired += 1;
        let bucket = &mut self.buckets[b as usize];
        bucket.live = false;
        let members = std::mem::take(&mut bucket.members);
        let hash = bucket.hash;
        let prim = bucket.prim;
        if let Some(h) = hash {
            for band in self.band_keys(prim, h) {
                if let Some(list) = self.bands.get_mut(&band) {
                    list.retain(|&x| x != b);
                    if list.is_empty() {
                        self.bands.remove(&band);
                    }
                }
            }
        }
        let mut roots: Vec<u32> = Vec::new();
        for &m in &members {
            let partners = self.adj[m as usize].clone();
            for p in partners {
                let k = pair_key(m, p);
                let Some(evs) = self.pairs.get_mut(&k) else {
                    continue;
                };
                let before = evs.len();
                evs.retain(|e| match *e {
                    Ev::Same(x) => x != b,
                    Ev::Near(x, y) => x != b && y != b,
                });
                if evs.len() == before {
                    continue;
                }
                if evs.is_empty() {
                    self.pairs.remove(&k);
                    self.adj[m as usize].retain(|&x| x != p);
                    self.adj[p as usize].retain(|&x| x != m);
                }
                let r = self.find(m);
                if !roots.contains(&r) {
                    roots.push(r);
                }
            }
        }
        for r in roots {
            self.recompute(r, touched);
        }
    }

    /// Rebuild the component rooted at `r` from the links left among its
    /// members.
    fn recompute(&mut self, r: u32, touched: &mut Vec<u32>) {
        if self.parent[r as usize] != r {
            return; // already recomputed from another member
        }
        let members = std::mem::take(&mut self.members[r as usize]);
        for &m in &members {
            self.parent[m as usize] = m;
            self.size[m as usize] = 1;
            self.members[m as usize] = vec![m];
        }
        for &m in &members {
            for p in self.adj[m as usize].clone() {
                if m < p && self.linked(m, p) {
                    self.union(m, p);
                }
            }
        }
        let first = self.find(members[0]);
        if members.iter().any(|&m| self.root(m) != first) {
            self.stats.splits += 1;
            touched.extend(members.iter().copied());
        }
    }

    /// Feed many observations; returns the attackers whose component
    /// changed (deduplicated, in first-touch order).
    pub fn add_many<'a, I>(&mut self, items: I) -> Vec<String>
    where
        I: IntoIterator<Item = (&'a str, &'a str, &'a str)>,
    {
        let mut touched = Vec::new();
        for (a, p, v) in items {
            self.add(a, p, v, &mut touched);
        }
        let mut seen = hashbrown::HashSet::new();
        touched
            .into_iter()
            .filter(|t| seen.insert(*t))
            .map(|t| self.names[t as usize].to_string())
            .collect()
    }

    /// The members of `attacker`'s component, sorted (just the attacker
    /// itself if it is unknown).
    pub fn component(&self, attacker: &str) -> Vec<String> {
        let Some(&a) = self.ids.get(attacker) else {
            return vec![attacker.to_string()];
        };
        let r = self.root(a);
        let mut out: Vec<String> = self.members[r as usize]
            .iter()
            .map(|&m| self.names[m as usize].to_string())
            .collect();
        out.sort_unstable();
        out
    }

    /// How many attackers `attacker`'s component has (1 if unknown).
    pub fn component_len(&self, attacker: &str) -> usize {
        self.ids
            .get(attacker)
            .map_or(1, |&a| self.size[self.root(a) as usize] as usize)
    }

    /// Whether two attackers are in one component.
    pub fn same(&self, a: &str, b: &str) -> bool {
        match (self.ids.get(a), self.ids.get(b)) {
            (Some(&x), Some(&y)) => self.root(x) == self.root(y),
            _ => a == b,
        }
    }

    /// The live evidence between the given attackers, pair by pair
    /// (attacker names sorted within a pair), for pairs that are linked.
    pub fn links_among(&self, attackers: &[&str]) -> Vec<(String, String, Vec<Evidence>)> {
        let ids: Vec<u32> = attackers
            .iter()
            .filter_map(|a| self.ids.get(*a).copied())
            .collect();
        let set: hashbrown::HashSet<u32> = ids.iter().copied().collect();
        let mut out = Vec::new();
        for &a in &ids {
            for &p in &self.adj[a as usize] {
                if !set.contains(&p) || self.names[a as usize] >= self.names[p as usize] {
                    continue;
                }
                if !self.linked(a, p) {
                    continue;
                }
                out.push((
                    self.names[a as usize].to_string(),
                    self.names[p as usize].to_string(),
                    self.evidence(a, p),
                ));
            }
        }
        out.sort_by(|x, y| (&x.0, &x.1).cmp(&(&y.0, &y.1)));
        out
    }

    fn evidence(&self, a: u32, p: u32) -> Vec<Evidence> {
        let Some(evs) = self.pairs.get(&pair_key(a, p)) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for &e in evs {
            let w = self.ev_weight(e);
            if w <= 0.0 {
                continue;
            }
            let (x, y, d) = match e {
                Ev::Same(b) => (b, b, 0),
                Ev::Near(x, y) => {
                    let d = match (self.buckets[x as usize].hash, self.buckets[y as usize].hash) {
                        (Some(p), Some(q)) => (p ^ q).count_ones(),
                        _ => 0,
                    };
                    // Near(x, y) lists the lower attacker's bucket first
                    if a < p {
                        (x, y, d)
                    } else {
                        (y, x, d)
                    }
                }
            };
            let (bx, by) = (&self.buckets[x as usize], &self.buckets[y as usize]);
            let (first, second) = if self.names[a as usize] <= self.names[p as usize] {
                (bx, by)
            } else {
                (by, bx)
            };
            out.push(Evidence {
                primitive: self.cfg.fingerprints[bx.prim as usize].primitive.clone(),
                value: first.value.to_string(),
                other: second.value.to_string(),
                distance: d,
                weight: w,
            });
        }
        out.sort_by(|x, y| (&x.primitive, &x.value).cmp(&(&y.primitive, &y.value)));
        out
    }

    pub fn stats(&self) -> Stats {
        let mut s = self.stats;
        s.attackers = self.names.len();
        s.buckets = self.buckets.len();
        s.pairs = self.pairs.len();
        s.components = (0..self.parent.len())
            .filter(|&i| self.parent[i] == i as u32)
            .count();
        s
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// The share of its weight a value shared by `sharers` attackers keeps.
fn share_factor(cfg: &Config, sharers: usize, live: bool) -> f64 {
    if !live || sharers > cfg.max_share {
        0.0
    } else if sharers <= cfg.full_share {
        1.0
    } else {
        cfg.full_share as f64 / sharers as f64
    }
}

/// All-pairs connected components (the periodic scan the clusterer
/// replaces): every pair of attackers is scored from scratch with the same
/// rules, then components are formed. Quadratic; a reference for tests and
/// the bench. `obs` are `(attacker, primitive, value_json)`.
pub fn all_pairs_components(cfg: &Config, obs: &[(String, String, String)]) -> Vec<Vec<String>> {
    let weights: HashMap<&str, (f64, Match)> = cfg
        .fingerprints
        .iter()
        .map(|f| (f.primitive.as_str(), (f.weight, f.matching)))
        .collect();
    let mut names: Vec<&str> = Vec::new();
    let mut idx: HashMap<&str, usize> = HashMap::new();
    let mut values: Vec<Vec<(&str, &str)>> = Vec::new();
    let mut share: HashMap<(&str, &str), hashbrown::HashSet<usize>> = HashMap::new();
    for (a, p, v) in obs {
        if !weights.contains_key(p.as_str()) {
            continue;
        }
        let i = *idx.entry(a.as_str()).or_insert_with(|| {
            names.push(a.as_str());
            values.push(Vec::new());
            names.len() - 1
        });
        let pv = (p.as_str(), v.as_str());
        if !values[i].contains(&pv) {
            values[i].push(pv);
        }
        share.entry(pv).or_default().insert(i);
    }
    let sharers = |pv: &(&str, &str)| share.get(pv).map_or(0, |s| s.len());
    let live = |pv: &(&str, &str)| sharers(pv) <= cfg.max_share;
    let factor = |pv: &(&str, &str)| share_factor(cfg, sharers(pv), live(pv));
    let n = names.len();
    let mut parent: Vec<usize> = (0..n).collect();
    fn find(parent: &mut [usize], mut x: usize) -> usize {
        while parent[x] != x {
            parent[x] = parent[parent[x]];
            x = parent[x];
        }
        x
    }
    for i in 0..n {
        for j in (i + 1)..n {
            let mut score = 0.0;
            for pv in &values[i] {
                if !live(pv) {
                    continue;
                }
                let (w, m) = weights[pv.0];
                if values[j].contains(pv) {
                    score += w * factor(pv);
                }
                if m != Match::SimHash {
                    continue;
                }
                let Some(h) = parse_simhash(pv.1) else {
                    continue;
                };
                for qv in &values[j] {
                    if qv.0 != pv.0 || !live(qv) {
                        continue;
                    }
                    let Some(q) = parse_simhash(qv.1) else {
                        continue;
                    };
                    let d = (h ^ q).count_ones();
                    if d > 0 && d <= cfg.hamming_max {
                        let f = factor(pv).min(factor(qv));
                        score += w * (1.0 - f64::from(d) / f64::from(cfg.hamming_max + 1)) * f;
                    }
                }
            }
            if score >= cfg.threshold - 1e-12 {
                let (ri, rj) = (find(&mut parent, i), find(&mut parent, j));
                if ri != rj {
                    parent[ri] = rj;
                }
            }
        }
    }
    let mut groups: HashMap<usize, Vec<String>> = HashMap::new();
    for (i, name) in names.iter().enumerate() {
        let r = find(&mut parent, i);
        groups.entry(r).or_default().push(name.to_string());
    }
    let mut out: Vec<Vec<String>> = groups
        .into_values()
        .map(|mut g| {
            g.sort_unstable();
            g
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
#[path = "cluster_tests.rs"]
mod tests;
