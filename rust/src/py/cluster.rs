//! `Clusterer` for Python: the incremental identity clusterer
//! (`core::cluster`) fed straight from a `ValidatedBatch`.

use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::DecnetAttrError;
use super::validate::PyValidated;
use crate::core::cluster::{Clusterer, Config, Fingerprint, Match};

#[pyclass(name = "Clusterer", module = "decnet_attr._core")]
pub struct PyClusterer {
    inner: Mutex<Clusterer>,
}

#[pymethods]
impl PyClusterer {
    /// `weights`: fingerprint primitive → weight; `simhash`: the primitives
    /// among them compared by Hamming distance.
    #[new]
    #[args(
        threshold = "1.0",
        full_share = "6",
        max_share = "32",
        hamming_max = "3"
    )]
    fn new(
        weights: Vec<(String, f64)>,
        simhash: Vec<String>,
        threshold: f64,
        full_share: usize,
        max_share: usize,
        hamming_max: u32,
    ) -> PyResult<Self> {
        for s in &simhash {
            if !weights.iter().any(|(p, _)| p == s) {
                return Err(DecnetAttrError::new_err(format!(
                    "simhash primitive {s} has no weight"
                )));
            }
        }
        let cfg = config(
            weights,
            &simhash,
            threshold,
            full_share,
            max_share,
            hamming_max,
        );
        Clusterer::new(cfg)
            .map(|c| PyClusterer {
                inner: Mutex::new(c),
            })
            .map_err(DecnetAttrError::new_err)
    }

    /// Feed the fingerprint observations of a batch (positions `select`,
    /// all when None); returns the attackers whose identity may need to
    /// change: those whose component changed, and the batch's attackers
    /// that are in a component with others.
    #[args(select = "None")]
    fn add_batch(
        &self,
        py: Python<'_>,
        batch: PyRef<'_, PyValidated>,
        select: Option<Vec<usize>>,
    ) -> PyResult<Vec<String>> {
        let items = batch.selected(select)?;
        py.allow_threads(|| {
            let mut c = self.inner.lock();
            let fp: Vec<(&str, &str, &str)> = items
                .iter()
                .filter(|v| c.is_fingerprint(&v.primitive))
                .map(|v| {
                    (
                        v.attacker_uuid.as_str(),
                        v.primitive.as_str(),
                        v.value_json.as_str(),
                    )
                })
                .collect();
            let attackers: Vec<&str> = fp.iter().map(|t| t.0).collect();
            let mut out = c.add_many(fp);
            let mut seen: hashbrown::HashSet<String> = out.iter().cloned().collect();
            for a in attackers {
                if c.component_len(a) > 1 && seen.insert(a.to_string()) {
                    out.push(a.to_string());
                }
            }
            Ok(out)
        })
    }

    /// Feed `(attacker, primitive, value_json)` triples (a restart's
    /// replay of stored observations); returns the attackers whose
    /// component changed.
    fn add(&self, py: Python<'_>, items: Vec<(String, String, String)>) -> Vec<String> {
        py.allow_threads(|| {
            self.inner.lock().add_many(
                items
                    .iter()
                    .map(|(a, p, v)| (a.as_str(), p.as_str(), v.as_str())),
            )
        })
    }

    fn is_fingerprint(&self, primitive: &str) -> bool {
        self.inner.lock().is_fingerprint(primitive)
    }

    /// `attacker`'s component, sorted.
    fn component(&self, attacker: &str) -> Vec<String> {
        self.inner.lock().component(attacker)
    }

    fn same(&self, a: &str, b: &str) -> bool {
        self.inner.lock().same(a, b)
    }

    /// Linked pairs among `attackers` with their evidence:
    /// `[(a, b, [(primitive, value_json, other_value_json, distance, weight)])]`.
    #[allow(clippy::type_complexity)]
    fn links(
        &self,
        attackers: Vec<String>,
    ) -> Vec<(String, String, Vec<(String, String, String, u32, f64)>)> {
        let refs: Vec<&str> = attackers.iter().map(String::as_str).collect();
        self.inner
            .lock()
            .links_among(&refs)
            .into_iter()
            .map(|(a, b, ev)| {
                let ev = ev
                    .into_iter()
                    .map(|e| (e.primitive, e.value, e.other, e.distance, e.weight))
                    .collect();
                (a, b, ev)
            })
            .collect()
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<&'py PyDict> {
        let s = self.inner.lock().stats();
        let d = PyDict::new(py);
        d.set_item("attackers", s.attackers)?;
        d.set_item("buckets", s.buckets)?;
        d.set_item("retired", s.retired)?;
        d.set_item("pairs", s.pairs)?;
        d.set_item("components", s.components)?;
        d.set_item("links", s.links)?;
        d.set_item("splits", s.splits)?;
        Ok(d)
    }

    fn __len__(&self) -> usize {
        self.inner.lock().len()
    }
}

/// All-pairs connected components over `(attacker, primitive, value_json)`
/// with the same rules (quadratic: a reference for tests and the bench).
#[pyfunction(
    weights,
    simhash,
    obs,
    threshold = "1.0",
    full_share = "6",
    max_share = "32",
    hamming_max = "3"
)]
#[pyo3(name = "all_pairs_components")]
#[allow(clippy::too_many_arguments)] // the Python signature
pub fn all_pairs(
    py: Python<'_>,
    weights: Vec<(String, f64)>,
    simhash: Vec<String>,
    obs: Vec<(String, String, String)>,
    threshold: f64,
    full_share: usize,
    max_share: usize,
    hamming_max: u32,
) -> Vec<Vec<String>> {
    let cfg = config(
        weights,
        &simhash,
        threshold,
        full_share,
        max_share,
        hamming_max,
    );
    py.allow_threads(|| crate::core::cluster::all_pairs_components(&cfg, &obs))
}

/// The clusterer's configuration: `weights` per primitive; the primitives
/// in `simhash` match by Hamming distance, the others exactly.
fn config(
    weights: Vec<(String, f64)>,
    simhash: &[String],
    threshold: f64,
    full_share: usize,
    max_share: usize,
    hamming_max: u32,
) -> Config {
    let fingerprints = weights
        .into_iter()
        .map(|(primitive, weight)| Fingerprint {
            matching: if simhash.contains(&primitive) {
                Match::SimHash
            } else {
                Match::Exact
            },
            primitive,
            weight,
        })
        .collect();
    Config {
        fingerprints,
        threshold,
        full_share,
        max_share,
        hamming_max,
    }
}
