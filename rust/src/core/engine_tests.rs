//! Engine exactness: after any arrival order and batching, a key's state
//! equals `aggregate` over its whole series sorted by ts (ties in arrival
//! order).

use proptest::prelude::*;

use super::engine::{aggregate, Engine, Limits, Obs};
use super::json::{parse_batch, parse_window};
use super::merge::{Kind, State, Thresholds};
use super::value::{Value, ValueRef};

#[derive(Clone, Debug)]
enum V {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(&'static str),
}

impl V {
    fn r(&self) -> ValueRef<'static> {
        match self {
            V::Null => ValueRef::Null,
            V::Bool(b) => ValueRef::Bool(*b),
            V::Int(i) => ValueRef::Int(*i),
            V::Float(f) => ValueRef::Float(*f),
            V::Str(s) => ValueRef::Str(s),
        }
    }
}

fn cat_value() -> impl Strategy<Value = V> {
    prop_oneof![
        4 => prop::sample::select(vec!["a", "b", "c"]).prop_map(V::Str),
        1 => Just(V::Null),
        1 => any::<bool>().prop_map(V::Bool),
        1 => (0i64..3).prop_map(V::Int),
        1 => prop::sample::select(vec![0.0, 1.0, 1.5, -0.0]).prop_map(V::Float),
    ]
}

fn num_value() -> impl Strategy<Value = V> {
    prop_oneof![
        4 => (-5i64..100).prop_map(V::Int),
        3 => (-100.0f64..1000.0).prop_map(V::Float),
        1 => Just(V::Null),
        1 => any::<bool>().prop_map(V::Bool),
        1 => Just(V::Int(0)),
    ]
}

fn ts_value() -> impl Strategy<Value = f64> {
    prop_oneof![
        3 => (0u32..20).prop_map(|t| f64::from(t) * 3600.0),
        1 => Just(86400.0),
        1 => Just(0.0),
        1 => (0u32..4).prop_map(|t| 100_000.0 + f64::from(t) * 86400.0),
    ]
}

fn sorted_series(arrivals: &[(f64, V)]) -> Vec<(f64, ValueRef<'static>)> {
    let mut idx: Vec<usize> = (0..arrivals.len()).collect();
    // stable sort: ties keep arrival order
    idx.sort_by(|&a, &b| arrivals[a].0.total_cmp(&arrivals[b].0));
    idx.iter()
        .map(|&i| (arrivals[i].0, arrivals[i].1.r()))
        .collect()
}

fn check_stream(kind: Kind, arrivals: Vec<(f64, V)>, cuts: Vec<usize>, th: Thresholds) {
    let mut eng = Engine::new(th.clone(), Limits::default()).unwrap();
    let mut pos = 0;
    let mut cuts = cuts;
    cuts.push(arrivals.len());
    for cut in cuts {
        let end = cut.clamp(pos, arrivals.len());
        let batch: Vec<_> = arrivals[pos..end]
            .iter()
            .enumerate()
            .map(|(i, (t, v))| {
                (
                    i,
                    Ok(Obs {
                        identity: "id-1",
                        primitive: "p",
                        value: v.r(),
                        ts: *t,
                        kind: Some(kind),
                    }),
                )
            })
            .collect();
        let res = eng.ingest(batch);
        assert!(res.errors.is_empty(), "{:?}", res.errors);
        pos = end;
        if pos == 0 {
            continue;
        }
        let want = aggregate(&th, kind, &sorted_series(&arrivals[..pos])).unwrap();
        let got = eng.get("id-1", "p").unwrap();
        assert_eq!(got, want, "after {pos} arrivals of {arrivals:?}");
        // export → import round trip keeps the state
        let exported = eng.export("id-1", "p").unwrap();
        let mut other = Engine::new(th.clone(), Limits::default()).unwrap();
        let parsed = parse_window(exported.as_bytes()).unwrap();
        other.import(&parsed.as_window()).unwrap();
        assert_eq!(other.get("id-1", "p").unwrap(), want);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, .. ProptestConfig::default() })]

    #[test]
    fn categorical_stream_matches_sorted_aggregate(
        arrivals in prop::collection::vec((ts_value(), cat_value()), 1..30),
        cuts in prop::collection::vec(0usize..30, 0..5),
    ) {
        let mut cuts = cuts;
        cuts.sort_unstable();
        check_stream(Kind::Categorical, arrivals, cuts, Thresholds::default());
    }

    #[test]
    fn numeric_stream_matches_sorted_aggregate(
        arrivals in prop::collection::vec((ts_value(), num_value()), 1..30),
        cuts in prop::collection::vec(0usize..30, 0..5),
    ) {
        let mut cuts = cuts;
        cuts.sort_unstable();
        check_stream(Kind::Numeric, arrivals, cuts, Thresholds::default());
    }

    #[test]
    fn hash_stream_matches_sorted_aggregate(
        arrivals in prop::collection::vec((ts_value(), cat_value()), 1..40),
        cuts in prop::collection::vec(0usize..40, 0..5),
    ) {
        let mut cuts = cuts;
        cuts.sort_unstable();
        check_stream(Kind::Hash, arrivals, cuts, Thresholds::default());
    }

    #[test]
    fn other_window_sizes(
        arrivals in prop::collection::vec((ts_value(), cat_value()), 1..30),
        n in 1usize..8,
    ) {
        let th = Thresholds { window_n: n, majority: n.min(4), ..Thresholds::default() };
        check_stream(Kind::Categorical, arrivals, vec![], th);
    }
}

#[test]
fn late_arrival_before_full_window_only_counts() {
    let th = Thresholds::default();
    let mut eng = Engine::new(th, Limits::default()).unwrap();
    let batch: Vec<_> = (0..12)
        .map(|i| {
            (
                i,
                Ok(Obs {
                    identity: "x",
                    primitive: "motor.keystroke_cadence",
                    value: ValueRef::Str("steady"),
                    ts: 100.0 + i as f64,
                    kind: None,
                }),
            )
        })
        .collect();
    eng.ingest(batch);
    let late = Obs {
        identity: "x",
        primitive: "motor.keystroke_cadence",
        value: ValueRef::Str("bursty"),
        ts: 1.0,
        kind: None,
    };
    let res = eng.ingest(vec![(0, Ok(late))]);
    let ch = &res.changes[0];
    assert_eq!(ch.new.count, 13);
    assert_eq!(ch.new.state, State::Stable);
    assert_eq!(ch.new.last_ts, 111.0);
    assert!(!ch.state_changed());
    assert_eq!(
        eng.interned_values(),
        1,
        "the late value was never retained"
    );
}

#[test]
fn hash_window_boundary_is_inclusive() {
    let th = Thresholds::default();
    let mut eng = Engine::new(th, Limits::default()).unwrap();
    let mk = |v: &'static str, ts: f64| Obs {
        identity: "x",
        primitive: "motor.digraph_simhash",
        value: ValueRef::Str(v),
        ts,
        kind: None,
    };
    eng.ingest(vec![(0, Ok(mk("aa", 0.0))), (1, Ok(mk("bb", 86400.0)))]);
    let s = eng.get("x", "motor.digraph_simhash").unwrap();
    assert_eq!((s.state, s.confidence), (State::Drifting, 0.5));
    eng.ingest(vec![(0, Ok(mk("bb", 86400.5)))]);
    let s = eng.get("x", "motor.digraph_simhash").unwrap();
    assert_eq!((s.state, s.confidence), (State::Stable, 1.0));
}

#[test]
fn bad_items_are_reported_and_the_rest_applies() {
    let mut eng = Engine::new(Thresholds::default(), Limits::default()).unwrap();
    let data = br#"[{"identity_uuid":"i","primitive":"toolchain.c2.beacon_interval_ms","value":"fast","ts":1},
                   {"identity_uuid":"i","primitive":"toolchain.c2.beacon_interval_ms","value":"12.5","ts":1},
                   {"identity_uuid":"","primitive":"p","value":1,"ts":1},
                   {"identity_uuid":"i","primitive":"p","value":1,"ts":1,"value_kind":"hash"},
                   {"identity_uuid":"i","primitive":"p","value":1,"ts":2,"value_kind":"numeric"}]"#;
    let items = parse_batch(data).unwrap();
    let res = eng.ingest(
        items
            .iter()
            .enumerate()
            .map(|(i, r)| (i, r.as_ref().map(|p| p.as_obs()).map_err(Clone::clone))),
    );
    let idx: Vec<usize> = res.errors.iter().map(|e| e.index).collect();
    assert_eq!(idx, vec![0, 2, 4]);
    assert!(res.errors[0]
        .reason
        .contains("toolchain.c2.beacon_interval_ms"));
    assert!(res.errors[0].reason.contains("\"fast\""));
    assert!(res.errors[2].reason.contains("conflicts"));
    let s = eng.get("i", "toolchain.c2.beacon_interval_ms").unwrap();
    assert_eq!(s.current, Value::Float(12.5));
    assert_eq!(res.accepted, 2);
}

#[test]
fn oversize_values_are_rejected() {
    let mut eng = Engine::new(
        Thresholds::default(),
        Limits {
            max_value_bytes: 8,
            ..Limits::default()
        },
    )
    .unwrap();
    let o = Obs {
        identity: "i",
        primitive: "p",
        value: ValueRef::Str("0123456789"),
        ts: 1.0,
        kind: None,
    };
    let res = eng.ingest(vec![(0, Ok(o))]);
    assert_eq!(res.errors.len(), 1);
    assert!(eng.is_empty());
}

#[test]
fn evict_frees_everything() {
    let mut eng = Engine::new(Thresholds::default(), Limits::default()).unwrap();
    for k in [
        "motor.keystroke_cadence",
        "motor.digraph_simhash",
        "toolchain.c2.beacon_interval_ms",
    ] {
        let batch: Vec<_> = (0..15)
            .map(|i| {
                (
                    i,
                    Ok(Obs {
                        identity: "x",
                        primitive: k,
                        value: ValueRef::Int(i as i64),
                        ts: i as f64,
                        kind: None,
                    }),
                )
            })
            .collect();
        eng.ingest(batch);
    }
    assert_eq!(eng.len(), 3);
    eng.clear();
    assert_eq!(eng.len(), 0);
    assert_eq!(eng.interned_values(), 0);
}

#[test]
fn changes_report_old_and_new() {
    let mut eng = Engine::new(Thresholds::default(), Limits::default()).unwrap();
    let mk = |ts: f64| Obs {
        identity: "x",
        primitive: "motor.input_modality",
        value: ValueRef::Str("typed"),
        ts,
        kind: None,
    };
    let r = eng.ingest(vec![(0, Ok(mk(1.0))), (1, Ok(mk(2.0)))]);
    assert_eq!(r.changes.len(), 1);
    assert!(r.changes[0].old.is_none());
    assert!(r.changes[0].state_changed());
    assert_eq!(r.changes[0].new.state, State::Unknown);
    let r = eng.ingest(vec![(0, Ok(mk(3.0)))]);
    assert_eq!(
        r.changes[0].old.as_ref().map(|o| o.state),
        Some(State::Unknown)
    );
    assert_eq!(r.changes[0].new.state, State::Stable);
    assert!(r.changes[0].state_changed());
}
