use proptest::prelude::*;

use super::*;

fn cfg(max_share: usize) -> Config {
    cfg2(max_share, max_share)
}

fn cfg2(full_share: usize, max_share: usize) -> Config {
    Config {
        fingerprints: vec![
            Fingerprint {
                primitive: "toolchain.ssh.hassh_client".into(),
                weight: 1.0,
                matching: Match::Exact,
            },
            Fingerprint {
                primitive: "toolchain.ssh.ssh_client_banner".into(),
                weight: 0.5,
                matching: Match::Exact,
            },
            Fingerprint {
                primitive: "toolchain.ssh.kex_algorithm_order".into(),
                weight: 0.5,
                matching: Match::Exact,
            },
            Fingerprint {
                primitive: "motor.digraph_simhash".into(),
                weight: 1.0,
                matching: Match::SimHash,
            },
        ],
        threshold: 1.0,
        full_share,
        max_share,
        hamming_max: 3,
    }
}

const HASSH: &str = "toolchain.ssh.hassh_client";
const BANNER: &str = "toolchain.ssh.ssh_client_banner";
const KEX: &str = "toolchain.ssh.kex_algorithm_order";
const SIM: &str = "motor.digraph_simhash";

fn add(c: &mut Clusterer, items: &[(&str, &str, &str)]) -> Vec<String> {
    c.add_many(items.iter().copied())
}

#[test]
fn a_strong_value_links_alone_weak_ones_need_each_other() {
    let mut c = Clusterer::new(cfg(16)).unwrap();
    add(&mut c, &[("a", HASSH, "\"h1\""), ("b", HASSH, "\"h1\"")]);
    assert!(c.same("a", "b"));
    add(
        &mut c,
        &[
            ("x", BANNER, "\"SSH-2.0-x\""),
            ("y", BANNER, "\"SSH-2.0-x\""),
        ],
    );
    assert!(!c.same("x", "y"), "half the threshold is not a link");
    let touched = add(
        &mut c,
        &[("x", KEX, "[\"k1\",\"k2\"]"), ("y", KEX, "[\"k1\",\"k2\"]")],
    );
    assert!(c.same("x", "y"));
    assert_eq!(touched, vec!["y".to_string()]);
    assert_eq!(c.component("x"), vec!["x".to_string(), "y".to_string()]);
    let links = c.links_among(&["x", "y"]);
    assert_eq!(links.len(), 1);
    let prims: Vec<&str> = links[0].2.iter().map(|e| e.primitive.as_str()).collect();
    assert_eq!(prims, vec![KEX, BANNER], "sorted by primitive");
}

#[test]
fn a_ubiquitous_value_stops_gluing_and_splits_what_it_held() {
    let mut c = Clusterer::new(cfg(3)).unwrap();
    add(
        &mut c,
        &[
            ("a", HASSH, "\"common\""),
            ("b", HASSH, "\"common\""),
            ("c", HASSH, "\"common\""),
        ],
    );
    assert!(c.same("a", "c"));
    // a and b also share a real fingerprint
    add(
        &mut c,
        &[
            ("a", SIM, "\"00000000000000ff\""),
            ("b", SIM, "\"00000000000000ff\""),
        ],
    );
    let touched = add(&mut c, &[("d", HASSH, "\"common\"")]);
    assert!(c.same("a", "b"), "their own evidence keeps them linked");
    assert!(!c.same("a", "c"));
    assert!(!c.same("c", "d"));
    let mut t = touched.clone();
    t.sort();
    assert_eq!(t, vec!["a", "b", "c"]);
    assert_eq!(c.stats().splits, 1);
    assert_eq!(c.stats().retired, 1);
}

#[test]
fn simhashes_match_within_the_hamming_threshold() {
    let mut c = Clusterer::new(cfg(16)).unwrap();
    add(
        &mut c,
        &[
            ("a", SIM, "\"ffff0000ffff0000\""),
            ("b", SIM, "\"ffff0000ffff0001\""),
        ],
    );
    assert!(!c.same("a", "b"), "one bit apart scores 0.75 of the weight");
    add(&mut c, &[("a", BANNER, "\"x\""), ("b", BANNER, "\"x\"")]);
    assert!(c.same("a", "b"));
    let ev = &c.links_among(&["b", "a"])[0].2;
    let sim = ev.iter().find(|e| e.primitive == SIM).unwrap();
    assert_eq!(sim.distance, 1);
    assert_eq!(sim.value, "\"ffff0000ffff0000\"");
    assert_eq!(sim.other, "\"ffff0000ffff0001\"");
    // four bits apart is no match at hamming_max 3
    add(
        &mut c,
        &[
            ("p", SIM, "\"0\""),
            ("p", BANNER, "\"y\""),
            ("q", SIM, "\"f\""),
            ("q", BANNER, "\"y\""),
        ],
    );
    assert!(!c.same("p", "q"));
}

#[test]
fn a_value_shared_beyond_full_share_needs_corroboration() {
    let mut c = Clusterer::new(cfg2(2, 8)).unwrap();
    add(&mut c, &[("a", HASSH, "\"h\""), ("b", HASSH, "\"h\"")]);
    assert!(c.same("a", "b"));
    // a third sharer: the value keeps 2/3 of its weight, the link breaks
    add(&mut c, &[("c", HASSH, "\"h\"")]);
    assert!(!c.same("a", "b") && !c.same("b", "c"));
    // 2/3 + a shared banner (0.5) links again
    add(&mut c, &[("a", BANNER, "\"x\""), ("b", BANNER, "\"x\"")]);
    assert!(c.same("a", "b") && !c.same("a", "c"));
}

#[test]
fn low_entropy_simhashes_do_not_turn_the_search_into_a_scan() {
    let mut c = Clusterer::new(cfg(64)).unwrap();
    // small integers share their three high bands: one band bucket fills up
    let items: Vec<(String, String, String)> = (0..(BAND_CAP as u64 + 200))
        .map(|i| (format!("a{i}"), SIM.to_string(), format!("\"{i:016x}\"")))
        .collect();
    c.add_many(
        items
            .iter()
            .map(|(a, p, v)| (a.as_str(), p.as_str(), v.as_str())),
    );
    let full = c.bands.values().filter(|l| l.len() >= BAND_CAP).count();
    assert!(full >= 1);
    assert!(c.bands.values().all(|l| l.len() <= BAND_CAP));
}

#[test]
fn bad_configuration_is_refused() {
    let mut bad = cfg(16);
    bad.threshold = 0.0;
    assert!(Clusterer::new(bad).is_err());
    let mut bad = cfg(16);
    bad.hamming_max = 16;
    assert!(Clusterer::new(bad).is_err());
    assert!(Clusterer::new(cfg(1)).is_err());
    assert!(Clusterer::new(cfg2(4, 3)).is_err());
}

#[test]
fn simhash_parsing() {
    assert_eq!(parse_simhash("\"ff\""), Some(255));
    assert_eq!(parse_simhash("\"0xFF\""), Some(255));
    assert_eq!(parse_simhash("17"), Some(17));
    assert_eq!(parse_simhash("\"\""), None);
    assert_eq!(parse_simhash("\"12345678901234567\""), None);
    assert_eq!(parse_simhash("\"zz\""), None);
}

fn obs_strategy() -> impl Strategy<Value = Vec<(String, String, String)>> {
    let prim = prop_oneof![Just(HASSH), Just(BANNER), Just(KEX), Just(SIM)];
    prop::collection::vec((0u8..12, prim, 0u8..6), 0..80).prop_map(|v| {
        v.into_iter()
            .map(|(a, p, x)| {
                let value = if p == SIM {
                    // values 0..6 with few bits: many near pairs
                    format!("\"{:x}\"", (1u64 << x) | u64::from(x % 2))
                } else {
                    format!("\"v{x}\"")
                };
                (format!("att{a}"), p.to_string(), value)
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, .. ProptestConfig::default() })]

    /// Whatever the order, the incremental components equal an all-pairs
    /// pass over the same observations.
    #[test]
    fn incremental_equals_all_pairs(
        obs in obs_strategy(), full_share in 2usize..4, extra in 0usize..4
    ) {
        let cfg = cfg2(full_share, full_share + extra);
        let mut c = Clusterer::new(cfg.clone()).unwrap();
        c.add_many(obs.iter().map(|(a, p, v)| (a.as_str(), p.as_str(), v.as_str())));
        let expected = all_pairs_components(&cfg, &obs);
        let mut got: Vec<Vec<String>> = Vec::new();
        for group in &expected {
            for a in group {
                prop_assert_eq!(&c.component(a), group);
            }
            got.push(c.component(&group[0]));
        }
        prop_assert_eq!(got, expected);
    }
}
