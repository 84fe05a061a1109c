//! The three v0 mergers (docs/decnet.md#merge-categorical and the two
//! sections after it), written once over the retained
//! window so that the stateless `aggregate_observations` and the incremental
//! engine share every rule.
//!
//! Each merger works on the last `min(n, 2N)` observations of a series of
//! `n` (that is all the rules ever read) and returns the state, the
//! confidence, where `current_value` comes from, and a [`Detail`] saying
//! which rule decided and with what numbers (for `explain`).

use super::intern::Id;

/// Merger thresholds. The defaults are DECNET's constants (docs/decnet.md#thresholds).
#[derive(Clone, Debug, PartialEq)]
pub struct Thresholds {
    /// `CATEGORICAL_WINDOW_N`: recent window size (also numeric and
    /// alternation window). The older window is the N before it.
    pub window_n: usize,
    /// `MIN_OBSERVATIONS_FOR_STATE`: categorical and numeric floor.
    pub min_observations: u64,
    /// `CATEGORICAL_MAJORITY_THRESHOLD`: the "clear majority" count.
    pub majority: usize,
    /// Shortest recent window the alternation detector considers.
    pub alternation_min_len: usize,
    /// `NUMERIC_EWMA_ALPHA`.
    pub ewma_alpha: f64,
    /// `NUMERIC_STABLE_DISPERSION_PCT`: pinned by DECNET but unused by v0.
    pub stable_dispersion_pct: f64,
    /// `NUMERIC_DRIFT_MEAN_SHIFT_PCT` (shift >= this → drifting).
    pub drift_mean_shift_pct: f64,
    /// `NUMERIC_CONFLICT_DISPERSION_PCT` (cv > this → conflicted).
    pub conflict_dispersion_pct: f64,
    /// Confidence of a numeric `conflicted` state.
    pub numeric_conflict_confidence: f64,
    /// `HASH_DRIFT_MAX`: rotations <= this → drifting, above → conflicted.
    pub hash_drift_max: u64,
    /// `HASH_DRIFT_WINDOW_SECS`.
    pub hash_window_secs: f64,
    /// `MULTI_ACTOR_MAX_CONFIDENCE`.
    pub multi_actor_max_confidence: f64,
    /// `MULTI_ACTOR_MIN_PRIMITIVES` (used by the correlator, not the mergers).
    pub multi_actor_min_primitives: usize,
    /// `MULTI_ACTOR_TICK_SECS` (used by the worker's safety-net tick).
    pub multi_actor_tick_secs: f64,
    /// Thresholds of their own for some primitives (checked first) and
    /// value kinds; see [`Thresholds::scoped`].
    pub per_primitive: Vec<Scoped>,
    pub per_kind: Vec<Scoped>,
}

/// The merge-rule fields a primitive or a value kind may set for itself.
/// The window size and the hash look-back shape what every key stores, and
/// the multi-actor fields are per identity (or per worker), so those stay
/// global.
pub const SCOPED_FIELDS: [&str; 10] = [
    "min_observations",
    "majority",
    "alternation_min_len",
    "ewma_alpha",
    "stable_dispersion_pct",
    "drift_mean_shift_pct",
    "conflict_dispersion_pct",
    "numeric_conflict_confidence",
    "hash_drift_max",
    "multi_actor_max_confidence",
];

/// Thresholds for one primitive or value kind: the global ones with the
/// `given` fields replaced (`thresholds` is the result, ready for the
/// mergers).
#[derive(Clone, Debug, PartialEq)]
pub struct Scoped {
    pub name: String,
    pub given: Vec<&'static str>,
    pub thresholds: Thresholds,
}

/// Which thresholds a key's merge used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Global,
    Primitive,
    Kind,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Global => "global",
            Scope::Primitive => "primitive",
            Scope::Kind => "value_kind",
        }
    }
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            window_n: 5,
            min_observations: 3,
            majority: 4,
            alternation_min_len: 4,
            ewma_alpha: 0.3,
            stable_dispersion_pct: 0.20,
            drift_mean_shift_pct: 0.30,
            conflict_dispersion_pct: 1.0,
            numeric_conflict_confidence: 0.5,
            hash_drift_max: 2,
            hash_window_secs: 86400.0,
            multi_actor_max_confidence: 0.6,
            multi_actor_min_primitives: 2,
            multi_actor_tick_secs: 60.0,
            per_primitive: Vec::new(),
            per_kind: Vec::new(),
        }
    }
}

impl Thresholds {
    /// The thresholds the mergers use for a key: the primitive's own if it
    /// has them, else its value kind's, else these; with the override that
    /// applied, if any.
    pub fn scoped(&self, primitive: &str, kind: Kind) -> (&Thresholds, Scope, Option<&Scoped>) {
        if let Some(s) = self.per_primitive.iter().find(|s| s.name == primitive) {
            return (&s.thresholds, Scope::Primitive, Some(s));
        }
        if let Some(s) = self.per_kind.iter().find(|s| s.name == kind.as_str()) {
            return (&s.thresholds, Scope::Kind, Some(s));
        }
        (self, Scope::Global, None)
    }

    pub fn has_scoped(&self) -> bool {
        !(self.per_primitive.is_empty() && self.per_kind.is_empty())
    }

    /// Observations retained per key: the recent window and the older one.
    pub fn retained(&self) -> usize {
        2 * self.window_n
    }

    pub fn validate(&self) -> Result<(), String> {
        let finite_pos = |name: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(format!("{name} must be a finite number >= 0, got {v}"))
            }
        };
        if !(1..=64).contains(&self.window_n) {
            return Err(format!("window_n must be in 1..=64, got {}", self.window_n));
        }
        if self.min_observations < 1 {
            return Err("min_observations must be >= 1".into());
        }
        if self.majority < 1 {
            return Err("majority must be >= 1".into());
        }
        if !(self.ewma_alpha > 0.0 && self.ewma_alpha <= 1.0) {
            return Err(format!(
                "ewma_alpha must be in (0, 1], got {}",
                self.ewma_alpha
            ));
        }
        finite_pos("stable_dispersion_pct", self.stable_dispersion_pct)?;
        finite_pos("drift_mean_shift_pct", self.drift_mean_shift_pct)?;
        finite_pos("conflict_dispersion_pct", self.conflict_dispersion_pct)?;
        finite_pos(
            "numeric_conflict_confidence",
            self.numeric_conflict_confidence,
        )?;
        finite_pos("hash_window_secs", self.hash_window_secs)?;
        finite_pos(
            "multi_actor_max_confidence",
            self.multi_actor_max_confidence,
        )?;
        finite_pos("multi_actor_tick_secs", self.multi_actor_tick_secs)?;
        if self.multi_actor_min_primitives < 1 {
            return Err("multi_actor_min_primitives must be >= 1".into());
        }
        for (what, list) in [
            ("per_primitive", &self.per_primitive),
            ("per_kind", &self.per_kind),
        ] {
            for s in list {
                if let Some(f) = s.given.iter().find(|f| !SCOPED_FIELDS.contains(f)) {
                    return Err(format!(
                        "{what} {:?}: {f} is global only; a primitive or kind may set {}",
                        s.name,
                        SCOPED_FIELDS.join(", ")
                    ));
                }
                if what == "per_kind" && Kind::parse(&s.name).is_none() {
                    return Err(format!(
                        "per_kind {:?}: not a value kind (categorical, numeric, hash)",
                        s.name
                    ));
                }
                if s.thresholds.has_scoped() {
                    return Err(format!("{what} {:?}: overrides do not nest", s.name));
                }
                s.thresholds
                    .validate()
                    .map_err(|e| format!("{what} {:?}: {e}", s.name))?;
            }
        }
        Ok(())
    }
}

/// The five states (frozen vocabulary).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    Unknown,
    Stable,
    Drifting,
    Conflicted,
    MultiActor,
}

impl State {
    /// Every state, in the order the Python package lists them.
    pub const ALL: [State; 5] = [
        State::Unknown,
        State::Stable,
        State::Drifting,
        State::Conflicted,
        State::MultiActor,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Unknown => "unknown",
            State::Stable => "stable",
            State::Drifting => "drifting",
            State::Conflicted => "conflicted",
            State::MultiActor => "multi_actor",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        Some(match s {
            "unknown" => State::Unknown,
            "stable" => State::Stable,
            "drifting" => State::Drifting,
            "conflicted" => State::Conflicted,
            "multi_actor" => State::MultiActor,
            _ => return None,
        })
    }
}

/// Which merger a key uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Categorical,
    Numeric,
    Hash,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Categorical => "categorical",
            Kind::Numeric => "numeric",
            Kind::Hash => "hash",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "categorical" => Kind::Categorical,
            "numeric" => Kind::Numeric,
            "hash" => Kind::Hash,
            _ => return None,
        })
    }
}

/// The rule that produced a state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Rule {
    #[default]
    Empty,
    TooFewObservations,
    Alternation,
    NoClearMajority,
    ClearMajorityNoHistory,
    OlderWindowUnsettled,
    MajorityChanged,
    MajorityHeld,
    DispersionAboveConflict,
    MeanShift,
    NumericSteady,
    HashNoRotation,
    HashFewRotations,
    HashManyRotations,
}

impl Rule {
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::Empty => "empty_series",
            Rule::TooFewObservations => "too_few_observations",
            Rule::Alternation => "two_value_alternation",
            Rule::NoClearMajority => "no_clear_majority",
            Rule::ClearMajorityNoHistory => "clear_majority_no_older_window",
            Rule::OlderWindowUnsettled => "converged_after_mixed_period",
            Rule::MajorityChanged => "majority_changed_from_older_window",
            Rule::MajorityHeld => "majority_matches_older_window",
            Rule::DispersionAboveConflict => "dispersion_above_conflict_threshold",
            Rule::MeanShift => "mean_shift_at_or_above_drift_threshold",
            Rule::NumericSteady => "numeric_steady",
            Rule::HashNoRotation => "no_rotation_in_window",
            Rule::HashFewRotations => "rotations_within_drift_max",
            Rule::HashManyRotations => "rotations_above_drift_max",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Rule::Empty => "no observations",
            Rule::TooFewObservations => "fewer observations than min_observations",
            Rule::Alternation => {
                "recent window has no clear majority and two values alternate \
                 (flips >= 2 * max(repeats, 1)): more than one operator"
            }
            Rule::NoClearMajority => "recent window has no clear majority and no alternation",
            Rule::ClearMajorityNoHistory => "clear majority and no older window yet",
            Rule::OlderWindowUnsettled => "clear majority now, but the older window had none",
            Rule::MajorityChanged => "clear majority differs from the older window's majority",
            Rule::MajorityHeld => "clear majority equals the older window's majority",
            Rule::DispersionAboveConflict => {
                "coefficient of variation around the EWMA is above the conflict threshold"
            }
            Rule::MeanShift => {
                "EWMA moved from the older window's EWMA by at least the drift threshold"
            }
            Rule::NumericSteady => "EWMA close to the older window (or no older window)",
            Rule::HashNoRotation => "a single distinct value in the hash window",
            Rule::HashFewRotations => "rotations in the hash window at most hash_drift_max",
            Rule::HashManyRotations => "rotations in the hash window above hash_drift_max",
        }
    }
}

/// Where `current_value` comes from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Current {
    /// The raw value at this index of the window slice.
    Index(usize),
    /// A computed float (numeric merger).
    Float(f64),
    /// `None`.
    Null,
}

/// The numbers behind a decision, for `explain`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Detail {
    pub rule: Rule,
    pub recent_len: usize,
    pub older_len: usize,
    pub top_count: usize,
    pub majority_needed: usize,
    pub older_top_count: usize,
    pub older_majority_needed: usize,
    pub distinct: usize,
    pub flips: usize,
    pub repeats: usize,
    pub ewma: Option<f64>,
    pub older_ewma: Option<f64>,
    pub cv: Option<f64>,
    pub shift: Option<f64>,
    pub rotations: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub state: State,
    pub confidence: f64,
    pub current: Current,
    pub detail: Detail,
}

/// Most common class and its count; ties go to the first occurrence
/// (Python's `Counter.most_common(1)`). Returns (count, index of first
/// occurrence).
fn top(canon: &[Id]) -> (usize, usize) {
    let mut best = (0usize, 0usize);
    for (i, c) in canon.iter().enumerate() {
        if canon[..i].contains(c) {
            continue;
        }
        let count = canon[i..].iter().filter(|x| *x == c).count();
        if count > best.0 {
            best = (count, i);
        }
    }
    best
}

fn distinct(canon: &[Id]) -> usize {
    canon
        .iter()
        .enumerate()
        .filter(|(i, c)| !canon[..*i].contains(c))
        .count()
}

/// The alternation detector on the recent window. Returns (is_alternation,
/// distinct, flips, repeats).
fn alternation(th: &Thresholds, recent: &[Id]) -> (bool, usize, usize, usize) {
    let d = distinct(recent);
    let flips = recent.windows(2).filter(|w| w[0] != w[1]).count();
    let repeats = recent.len().saturating_sub(1) - flips;
    let alt = recent.len() >= th.alternation_min_len && d == 2 && flips >= 2 * repeats.max(1);
    (alt, d, flips, repeats)
}

/// Categorical merger (docs/decnet.md#merge-categorical). `canon` holds the classes of the last
/// `min(n, 2N)` observations in series order; `n >= 1`.
pub fn categorical(th: &Thresholds, n: u64, canon: &[Id]) -> Outcome {
    let len = canon.len();
    let last = Current::Index(len.saturating_sub(1));
    if n < th.min_observations || len == 0 {
        return Outcome {
            state: State::Unknown,
            confidence: 0.0,
            current: last,
            detail: Detail {
                rule: Rule::TooFewObservations,
                ..Detail::default()
            },
        };
    }
    let rlen = len.min(th.window_n);
    let split = len - rlen;
    let (recent, older) = (&canon[split..], &canon[..split]);
    let (top_count, top_idx) = top(recent);
    let confidence = top_count as f64 / rlen as f64;
    let need = th.majority.min(rlen);
    let mut detail = Detail {
        recent_len: rlen,
        older_len: older.len(),
        top_count,
        majority_needed: need,
        ..Detail::default()
    };
    if top_count < need {
        let (alt, d, flips, repeats) = alternation(th, recent);
        detail.distinct = d;
        detail.flips = flips;
        detail.repeats = repeats;
        return if alt {
            detail.rule = Rule::Alternation;
            Outcome {
                state: State::MultiActor,
                confidence: confidence.min(th.multi_actor_max_confidence),
                current: last,
                detail,
            }
        } else {
            detail.rule = Rule::NoClearMajority;
            Outcome {
                state: State::Conflicted,
                confidence,
                current: last,
                detail,
            }
        };
    }
    let current = Current::Index(split + top_idx);
    let state = if older.is_empty() {
        detail.rule = Rule::ClearMajorityNoHistory;
        State::Stable
    } else {
        let (otc, oidx) = top(older);
        detail.older_top_count = otc;
        detail.older_majority_needed = th.majority.min(older.len());
        if otc < detail.older_majority_needed {
            detail.rule = Rule::OlderWindowUnsettled;
            State::Drifting
        } else if older[oidx] != recent[top_idx] {
            detail.rule = Rule::MajorityChanged;
            State::Drifting
        } else {
            detail.rule = Rule::MajorityHeld;
            State::Stable
        }
    };
    Outcome {
        state,
        confidence,
        current,
        detail,
    }
}

/// EWMA seeded with the first value: s = a*v + (1-a)*s.
pub fn ewma(alpha: f64, vals: &[f64]) -> f64 {
    let mut it = vals.iter();
    let Some(&first) = it.next() else {
        return 0.0;
    };
    let keep = 1.0 - alpha;
    it.fold(first, |s, &v| alpha * v + keep * s)
}

/// Numeric merger (docs/decnet.md#merge-numeric). `vals` are the last `min(n, 2N)` values already
/// converted to float, in series order; `n >= 1`.
pub fn numeric(th: &Thresholds, n: u64, vals: &[f64]) -> Outcome {
    let len = vals.len();
    if n < th.min_observations || len == 0 {
        return Outcome {
            state: State::Unknown,
            confidence: 0.0,
            current: vals.last().map_or(Current::Null, |v| Current::Float(*v)),
            detail: Detail {
                rule: Rule::TooFewObservations,
                ..Detail::default()
            },
        };
    }
    let rlen = len.min(th.window_n);
    let split = len - rlen;
    let (recent, older) = (&vals[split..], &vals[..split]);
    let mean = ewma(th.ewma_alpha, recent);
    let mut sum = 0.0;
    for v in recent {
        // `(v - mean) ** 2` as Python computes it: libm's pow, which differs
        // from `d * d` in the last bit for some values. The exponent is
        // hidden from the optimiser, which would turn pow(d, 2) into d * d.
        sum += (v - mean).powf(std::hint::black_box(2.0));
    }
    let var = sum / rlen as f64;
    let std = var.sqrt();
    let cv = if mean == 0.0 {
        if std == 0.0 {
            0.0
        } else {
            1e9
        }
    } else {
        std / mean.abs()
    };
    let mut detail = Detail {
        recent_len: rlen,
        older_len: older.len(),
        ewma: Some(mean),
        cv: Some(cv),
        ..Detail::default()
    };
    if cv > th.conflict_dispersion_pct {
        detail.rule = Rule::DispersionAboveConflict;
        return Outcome {
            state: State::Conflicted,
            confidence: th.numeric_conflict_confidence,
            current: Current::Float(mean),
            detail,
        };
    }
    let confidence = (1.0 - cv.min(1.0)).max(0.0);
    let mut state = State::Stable;
    detail.rule = Rule::NumericSteady;
    if !older.is_empty() {
        let older_mean = ewma(th.ewma_alpha, older);
        let denom = if older_mean.abs() == 0.0 {
            1.0
        } else {
            older_mean.abs()
        };
        let shift = (mean - older_mean).abs() / denom;
        detail.older_ewma = Some(older_mean);
        detail.shift = Some(shift);
        if shift >= th.drift_mean_shift_pct {
            detail.rule = Rule::MeanShift;
            state = State::Drifting;
        }
    }
    Outcome {
        state,
        confidence,
        current: Current::Float(mean),
        detail,
    }
}

/// Hash merger (docs/decnet.md#merge-hash) from the number of distinct non-null classes seen
/// in the window `[last_ts - hash_window_secs, last_ts]`; `n >= 1`.
/// `current_value` is always the last raw value (`last_index`).
pub fn hash(th: &Thresholds, distinct_in_window: usize, last_index: usize) -> Outcome {
    let rotations = distinct_in_window.saturating_sub(1) as u64;
    let (state, rule) = if rotations == 0 {
        (State::Stable, Rule::HashNoRotation)
    } else if rotations <= th.hash_drift_max {
        (State::Drifting, Rule::HashFewRotations)
    } else {
        (State::Conflicted, Rule::HashManyRotations)
    };
    Outcome {
        state,
        confidence: 1.0 / (1.0 + rotations as f64),
        current: Current::Index(last_index),
        detail: Detail {
            rule,
            distinct: distinct_in_window,
            rotations,
            ..Detail::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn th() -> Thresholds {
        Thresholds::default()
    }

    #[test]
    fn categorical_floor_and_majority() {
        let t = th();
        let o = categorical(&t, 2, &[1, 1]);
        assert_eq!(o.state, State::Unknown);
        assert_eq!(o.current, Current::Index(1));
        assert_eq!(categorical(&t, 3, &[1, 1, 1]).state, State::Stable);
        assert_eq!(categorical(&t, 3, &[1, 1, 2]).state, State::Conflicted);
        let o = categorical(&t, 5, &[1, 1, 2, 1, 1]);
        assert_eq!(o.state, State::Stable);
        assert_eq!(o.confidence, 0.8);
    }

    #[test]
    fn alternation_rules() {
        let t = th();
        // ABAB: 3 flips, 0 repeats
        let o = categorical(&t, 4, &[1, 2, 1, 2]);
        assert_eq!(o.state, State::MultiActor);
        assert_eq!(o.confidence, 0.5);
        // ABBAB: 3 flips, 1 repeat → alternation
        assert_eq!(
            categorical(&t, 5, &[1, 2, 2, 1, 2]).state,
            State::MultiActor
        );
        // AABBA: 2 flips, 2 repeats → not
        assert_eq!(
            categorical(&t, 5, &[1, 1, 2, 2, 1]).state,
            State::Conflicted
        );
        // confidence capped at 0.6
        let o = categorical(&t, 5, &[1, 2, 1, 2, 1]);
        assert_eq!(o.state, State::MultiActor);
        assert_eq!(o.confidence, 0.6);
    }

    #[test]
    fn older_window_rules() {
        let t = th();
        // older has a different clear majority → drifting, current = top
        let o = categorical(&t, 10, &[1, 1, 1, 1, 1, 2, 2, 2, 2, 3]);
        assert_eq!(o.state, State::Drifting);
        assert_eq!(o.current, Current::Index(5));
        assert_eq!(o.detail.rule, Rule::MajorityChanged);
        // older unsettled → drifting
        let o = categorical(&t, 10, &[1, 2, 3, 1, 2, 2, 2, 2, 2, 2]);
        assert_eq!(o.detail.rule, Rule::OlderWindowUnsettled);
        // same majority → stable
        assert_eq!(
            categorical(&t, 7, &[1, 1, 1, 1, 1, 1, 1]).state,
            State::Stable
        );
    }

    #[test]
    fn tie_goes_to_first_occurrence() {
        let t = Thresholds {
            majority: 2,
            ..th()
        };
        let o = categorical(&t, 4, &[2, 1, 1, 2]);
        assert_eq!(o.current, Current::Index(0));
    }

    #[test]
    fn numeric_rules() {
        let t = th();
        let o = numeric(&t, 2, &[1.0, 5.0]);
        assert_eq!((o.state, o.current), (State::Unknown, Current::Float(5.0)));
        let o = numeric(&t, 3, &[10.0, 10.0, 10.0]);
        assert_eq!((o.state, o.confidence), (State::Stable, 1.0));
        let o = numeric(&t, 3, &[0.0, 0.0, 0.0]);
        assert_eq!(o.state, State::Stable);
        // EWMA -0.28, dispersion far above it
        let o = numeric(&t, 3, &[-1.0, 1.0, 0.0]);
        assert_eq!((o.state, o.confidence), (State::Conflicted, 0.5));
        assert!(o.detail.cv.is_some_and(|cv| cv > 1.0 && cv < 1e9));
        // a mean of exactly zero with noise is cv = 1e9 (alpha 1: EWMA = last)
        let last = Thresholds {
            ewma_alpha: 1.0,
            ..th()
        };
        let o = numeric(&last, 3, &[-1.0, 1.0, 0.0]);
        assert_eq!((o.detail.ewma, o.detail.cv), (Some(0.0), Some(1e9)));
        assert_eq!(o.state, State::Conflicted);
        let o = numeric(&t, 10, &[1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0]);
        assert_eq!(o.state, State::Drifting);
        let o = numeric(&t, 5, &[1.0, 100.0, 1.0, 100.0, 1.0]);
        assert_eq!((o.state, o.confidence), (State::Conflicted, 0.5));
    }

    #[test]
    fn ewma_order() {
        let v = ewma(0.3, &[1.0, 2.0, 3.0]);
        let mut s = 1.0;
        s = 0.3 * 2.0 + 0.7 * s;
        s = 0.3 * 3.0 + 0.7 * s;
        assert_eq!(v, s);
    }

    #[test]
    fn hash_rules() {
        let t = th();
        assert_eq!(hash(&t, 1, 0).state, State::Stable);
        assert_eq!(hash(&t, 0, 0).state, State::Stable);
        assert_eq!(hash(&t, 3, 0).state, State::Drifting);
        let o = hash(&t, 4, 0);
        assert_eq!((o.state, o.confidence), (State::Conflicted, 0.25));
    }
}
