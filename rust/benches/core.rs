//! Criterion benchmarks of the pure core (no Python): JSON batch parsing,
//! merging pre-parsed batches, and both together, over 10k / 100k / 1M
//! distinct keys. Run: `cargo bench --bench core`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use _core::core::engine::{Engine, Limits};
use _core::core::json::parse_batch;
use _core::core::merge::Thresholds;

/// The 38 primitives DECNET emits, with their allowed values (from the
/// packaged registry), in registry order.
fn emitted() -> Vec<(String, Vec<String>, String)> {
    let doc: serde_json::Value = serde_json::from_str(include_str!(
        "../../python/decnet_attr/data/primitives.json"
    ))
    .unwrap();
    let mut out = Vec::new();
    for (name, spec) in doc["primitives"].as_object().unwrap() {
        if spec["decnet_emits"] != serde_json::Value::Bool(true) {
            continue;
        }
        let allowed = spec["allowed"]
            .as_array()
            .map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect())
            .unwrap_or_default();
        out.push((
            name.clone(),
            allowed,
            spec["kind"].as_str().unwrap().to_string(),
        ));
    }
    out
}

/// Deterministic xorshift so the bench needs no rand crate.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// NDJSON batches shaped like DECNET's traffic: a session end is a burst of
/// one observation per emitted primitive for one identity (reference §3.3).
/// `keys` = identities × 38; values mostly the identity's habit (80%).
fn batches(keys: usize, batch: usize, n_batches: usize) -> Vec<Vec<u8>> {
    let prims = emitted();
    let idents = (keys / prims.len()).max(1);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut ts = 1.7e9;
    let mut lines: Vec<String> = Vec::new();
    while lines.len() < batch * n_batches {
        let ident = (rng.next() % idents as u64) as usize;
        ts += 1.0;
        for (name, allowed, kind) in &prims {
            let value = if kind == "hash" {
                format!(
                    "\"{:016x}\"",
                    if rng.next().is_multiple_of(5) {
                        rng.next()
                    } else {
                        ident as u64
                    }
                )
            } else if allowed.is_empty() {
                "\"en-US\"".to_string()
            } else {
                let pick = if rng.next().is_multiple_of(5) {
                    rng.next() as usize
                } else {
                    ident
                };
                format!("\"{}\"", allowed[pick % allowed.len()])
            };
            lines.push(format!(
                "{{\"identity_uuid\":\"{ident:032x}\",\"primitive\":\"{name}\",\"value\":{value},\"ts\":{ts:.3},\"confidence\":1.0}}"
            ));
        }
    }
    lines
        .chunks(batch)
        .take(n_batches)
        .map(|c| (c.join("\n") + "\n").into_bytes())
        .collect()
}

fn engine_with(keys: usize, data: &[Vec<u8>]) -> Engine {
    let mut eng = Engine::new(Thresholds::default(), Limits::default()).unwrap();
    // warm: every key exists and has a full window
    for b in data {
        let parsed = parse_batch(b).unwrap();
        eng.ingest(
            parsed
                .iter()
                .enumerate()
                .map(|(i, r)| (i, r.as_ref().map(|p| p.as_obs()).map_err(Clone::clone))),
        );
    }
    assert!(eng.len() <= keys);
    eng
}

fn bench(c: &mut Criterion) {
    let batch = 10_000;
    for keys in [10_000usize, 100_000, 1_000_000] {
        let warm_batches = (keys * 2 / batch).max(4);
        let data = batches(keys, batch, warm_batches);
        let mut eng = engine_with(keys, &data);
        let mut g = c.benchmark_group(format!("keys_{keys}"));
        g.throughput(Throughput::Elements(batch as u64));
        g.sample_size(20);
        let sample = &data[data.len() - 1];
        g.bench_with_input(BenchmarkId::new("parse_batch", batch), sample, |b, d| {
            b.iter(|| parse_batch(d).unwrap().len())
        });
        let parsed = parse_batch(sample).unwrap();
        g.bench_function(BenchmarkId::new("merge_parsed", batch), |b| {
            b.iter(|| {
                eng.ingest(
                    parsed
                        .iter()
                        .enumerate()
                        .map(|(i, r)| (i, r.as_ref().map(|p| p.as_obs()).map_err(Clone::clone))),
                )
                .changes
                .len()
            })
        });
        g.bench_with_input(
            BenchmarkId::new("parse_and_merge", batch),
            sample,
            |b, d| {
                b.iter(|| {
                    let p = parse_batch(d).unwrap();
                    eng.ingest(
                        p.iter().enumerate().map(|(i, r)| {
                            (i, r.as_ref().map(|p| p.as_obs()).map_err(Clone::clone))
                        }),
                    )
                    .changes
                    .len()
                })
            },
        );
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
