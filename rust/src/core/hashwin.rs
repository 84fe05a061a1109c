//! The hash merger's look-back window: for each distinct non-null class seen
//! inside `[last_ts - window, last_ts]`, the latest ts it was seen at.
//!
//! A class is in the window iff its latest ts is >= the cut-off, and the
//! cut-off only moves forward, so entries below it are dropped for good.
//! Small windows (the normal case: one value, a few rotations) are a flat
//! vector; a window that grows past `SMALL` switches to a map plus an
//! ordered set so that a flood of distinct values stays O(log n) per
//! observation.

use std::collections::BTreeSet;

use hashbrown::HashMap;

use super::intern::Id;

const SMALL: usize = 16;

#[derive(Clone, Copy, Debug)]
pub struct Ts(f64);
impl PartialEq for Ts {
    fn eq(&self, other: &Self) -> bool {
        self.0.total_cmp(&other.0).is_eq()
    }
}
impl Eq for Ts {}
impl PartialOrd for Ts {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Ts {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

#[derive(Debug, Default)]
pub enum HashWindow {
    #[default]
    Empty,
    Small(Vec<(Id, f64)>),
    Large {
        by_class: HashMap<Id, f64>,
        by_ts: BTreeSet<(Ts, Id)>,
    },
}

/// What an upsert did with the caller's reference on the class.
#[derive(Debug, PartialEq, Eq)]
pub enum Upsert {
    /// A new entry now holds the reference.
    Inserted,
    /// The class was already present; the caller's reference is not kept.
    Existing,
}

impl HashWindow {
    pub fn len(&self) -> usize {
        match self {
            HashWindow::Empty => 0,
            HashWindow::Small(v) => v.len(),
            HashWindow::Large { by_class, .. } => by_class.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Record that `class` was seen at `ts`.
    pub fn upsert(&mut self, class: Id, ts: f64) -> Upsert {
        match self {
            HashWindow::Empty => {
                *self = HashWindow::Small(vec![(class, ts)]);
                Upsert::Inserted
            }
            HashWindow::Small(v) => {
                if let Some(e) = v.iter_mut().find(|e| e.0 == class) {
                    if ts > e.1 {
                        e.1 = ts;
                    }
                    return Upsert::Existing;
                }
                v.push((class, ts));
                if v.len() > SMALL {
                    let by_class: HashMap<Id, f64> = v.iter().copied().collect();
                    let by_ts = v.iter().map(|&(c, t)| (Ts(t), c)).collect();
                    *self = HashWindow::Large { by_class, by_ts };
                }
                Upsert::Inserted
            }
            HashWindow::Large { by_class, by_ts } => match by_class.get_mut(&class) {
                Some(old) => {
                    if ts > *old {
                        by_ts.remove(&(Ts(*old), class));
                        by_ts.insert((Ts(ts), class));
                        *old = ts;
                    }
                    Upsert::Existing
                }
                None => {
                    by_class.insert(class, ts);
                    by_ts.insert((Ts(ts), class));
                    Upsert::Inserted
                }
            },
        }
    }

    /// Drop every class last seen before `cutoff`; returns them so the
    /// caller can release their references.
    pub fn prune(&mut self, cutoff: f64, dropped: &mut Vec<Id>) {
        match self {
            HashWindow::Empty => {}
            HashWindow::Small(v) => {
                v.retain(|&(c, t)| {
                    if t < cutoff {
                        dropped.push(c);
                        false
                    } else {
                        true
                    }
                });
                if v.is_empty() {
                    *self = HashWindow::Empty;
                }
            }
            HashWindow::Large { by_class, by_ts } => {
                while let Some(&(Ts(t), c)) = by_ts.iter().next() {
                    if t >= cutoff {
                        break;
                    }
                    by_ts.remove(&(Ts(t), c));
                    by_class.remove(&c);
                    dropped.push(c);
                }
            }
        }
    }

    /// Entries ordered by (ts, class id).
    pub fn entries(&self) -> Vec<(Id, f64)> {
        match self {
            HashWindow::Empty => Vec::new(),
            HashWindow::Small(v) => {
                let mut out = v.clone();
                out.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
                out
            }
            HashWindow::Large { by_ts, .. } => by_ts.iter().map(|&(Ts(t), c)| (c, t)).collect(),
        }
    }

    pub fn drain_all(&mut self, dropped: &mut Vec<Id>) {
        for (c, _) in self.entries() {
            dropped.push(c);
        }
        *self = HashWindow::Empty;
    }

    pub fn heap_bytes(&self) -> usize {
        match self {
            HashWindow::Empty => 0,
            HashWindow::Small(v) => v.capacity() * 16,
            HashWindow::Large { by_class, .. } => by_class.capacity() * 24 + by_class.len() * 48,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_and_large_agree() {
        let mut w = HashWindow::default();
        let mut dropped = Vec::new();
        for i in 0..40u32 {
            assert_eq!(w.upsert(i, f64::from(i)), Upsert::Inserted);
        }
        assert!(matches!(w, HashWindow::Large { .. }));
        assert_eq!(w.upsert(3, 100.0), Upsert::Existing);
        w.prune(10.0, &mut dropped);
        // 0..10 dropped except 3, which was refreshed to ts 100
        assert_eq!(dropped.len(), 9);
        assert!(!dropped.contains(&3));
        assert_eq!(w.len(), 31);
        let e = w.entries();
        assert_eq!(e.last(), Some(&(3, 100.0)));
    }

    #[test]
    fn boundary_is_inclusive() {
        let mut w = HashWindow::default();
        let mut dropped = Vec::new();
        w.upsert(1, 0.0);
        w.prune(0.0, &mut dropped);
        assert_eq!(w.len(), 1);
        w.prune(0.5, &mut dropped);
        assert_eq!(w.len(), 0);
        assert_eq!(dropped, vec![1]);
    }
}
