//! `Engine` and `aggregate_observations` for Python.
//!
//! Inputs are converted once, while the GIL is held, into an arena; the
//! merge itself runs with the GIL released and the engine's mutex held, so
//! several Python threads can feed one engine.

use std::sync::Arc;

use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyList, PyString, PyTuple};

use super::convert::{
    extract_item, extract_series_item, for_each_item, str_of, to_py, Arena, Item, Keys,
};
use super::errors::{DecnetAttrError, InvalidJSONError};
use super::types::{scoped_dict, PyIngestResult, PyRejected, PyState, PyThresholds};
use super::validate::{identity_map, PyValidated};
use crate::core::engine::{aggregate, Engine, Explanation, ItemError, Limits, Obs, StateOut};
use crate::core::json::{parse_batch, parse_ndjson_chunks, parse_window};
use crate::core::merge::{Kind, Rule, Thresholds};

/// Bytes of a bytes/bytearray/memoryview/str argument. Only `bytes` is
/// borrowed (immutable); the others are copied so no other thread can
/// change them while the GIL is released.
enum Data<'py> {
    Borrowed(&'py [u8]),
    Owned(Vec<u8>),
}

impl Data<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Data::Borrowed(b) => b,
            Data::Owned(v) => v,
        }
    }
}

fn data_of(obj: &PyAny) -> PyResult<Data<'_>> {
    if let Ok(b) = obj.downcast::<PyBytes>() {
        return Ok(Data::Borrowed(b.as_bytes()));
    }
    if let Ok(b) = obj.downcast::<PyByteArray>() {
        return Ok(Data::Owned(b.to_vec()));
    }
    if let Ok(s) = obj.downcast::<PyString>() {
        return Ok(Data::Owned(
            str_of(s)
                .map_err(DecnetAttrError::new_err)?
                .as_bytes()
                .to_vec(),
        ));
    }
    if let Ok(v) = obj.extract::<Vec<u8>>() {
        return Ok(Data::Owned(v));
    }
    Err(pyo3::exceptions::PyTypeError::new_err(
        "expected bytes, bytearray, memoryview or str",
    ))
}

pub(crate) fn key_pairs(keys: &PyAny) -> PyResult<Vec<(String, String)>> {
    let mut out = Vec::new();
    for k in keys.iter()? {
        let (i, p): (String, String) = k?.extract()?;
        out.push((i, p));
    }
    Ok(out)
}

/// The incremental attribution engine, keyed by (identity_uuid, primitive).
#[pyclass(name = "Engine", module = "decnet_attr._core")]
pub struct PyEngine {
    pub(crate) inner: Mutex<Engine>,
    thresholds: Thresholds,
}

/// Below this, a second thread costs more than it saves.
const PIPELINE_MIN_BYTES: usize = 64 * 1024;

impl PyEngine {
    /// NDJSON parsed on a scoped thread in parts of up to 1024 lines,
    /// merged here as the parts arrive. `None` for a JSON array.
    fn ingest_ndjson_pipelined(&self, bytes: &[u8]) -> Option<crate::core::engine::BatchResult> {
        use std::sync::mpsc::sync_channel;
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
            return None;
        }
        std::thread::scope(|scope| {
            // ~100 bytes a line; parts small enough that merging starts
            // early, large enough that the hand-over stays cheap
            let chunk = (bytes.len() / 100 / 8).clamp(128, 1024);
            let (tx, rx) = sync_channel(16);
            let parser = scope
                .spawn(move || parse_ndjson_chunks(bytes, chunk, |part| tx.send(part).is_ok()));
            let mut eng = self.inner.lock();
            let mut out = eng.begin();
            let mut base = 0usize;
            for part in rx {
                let n = part.len();
                eng.ingest_more(
                    &mut out,
                    part.iter().enumerate().map(|(i, r)| {
                        (
                            base + i,
                            r.as_ref().map(|p| p.as_obs()).map_err(Clone::clone),
                        )
                    }),
                );
                base += n;
            }
            drop(eng);
            // the parser cannot fail on NDJSON (bad lines are per-item errors)
            let _ = parser.join();
            Some(out)
        })
    }

    fn result(
        &self,
        py: Python<'_>,
        res: crate::core::engine::BatchResult,
    ) -> PyResult<Py<PyIngestResult>> {
        Py::new(
            py,
            PyIngestResult {
                changes: Arc::new(res.changes),
                errors: res.errors,
                accepted: res.accepted,
            },
        )
    }
}

#[pymethods]
impl PyEngine {
    #[new]
    #[args(
        thresholds = "None",
        "*",
        max_value_bytes = "8192",
        max_name_bytes = "256",
        kinds = "None"
    )]
    fn new(
        thresholds: Option<PyThresholds>,
        max_value_bytes: usize,
        max_name_bytes: usize,
        kinds: Option<&PyDict>,
    ) -> PyResult<Self> {
        let th = thresholds.map(|t| t.inner).unwrap_or_default();
        let mut eng = Engine::new(
            th.clone(),
            Limits {
                max_value_bytes,
                max_name_bytes,
            },
        )
        .map_err(DecnetAttrError::new_err)?;
        if let Some(k) = kinds {
            for (name, kind) in k.iter() {
                let name: &str = name.extract()?;
                let kind: &str = kind.extract()?;
                let kind = Kind::parse(kind).ok_or_else(|| {
                    DecnetAttrError::new_err(format!(
                        "kind for {name:?} must be categorical, numeric or hash, got {kind:?}"
                    ))
                })?;
                eng.set_kind(name, kind);
            }
        }
        Ok(PyEngine {
            inner: Mutex::new(eng),
            thresholds: th,
        })
    }

    #[getter]
    fn thresholds(&self) -> PyThresholds {
        PyThresholds {
            inner: self.thresholds.clone(),
        }
    }

    /// Merge a list of observation dicts (identity_uuid, primitive, value,
    /// ts, optional confidence and value_kind). Returns one ChangeRecord
    /// per key touched; rejected items are in `.errors`.
    fn ingest(&self, py: Python<'_>, batch: &PyAny) -> PyResult<Py<PyIngestResult>> {
        let keys = Keys::new(py);
        let mut arena = Arena::default();
        let mut items: Vec<(usize, Result<Item, String>)> = Vec::new();
        for_each_item(batch, |i, obj| {
            items.push((i, extract_item(obj, &keys, &mut arena)))
        })?;
        let res = py.allow_threads(|| {
            let mut eng = self.inner.lock();
            eng.ingest(
                items
                    .into_iter()
                    .map(|(i, r)| (i, r.map(|it| it.obs(&arena)))),
            )
        });
        self.result(py, res)
    }

    /// Same as `ingest`, from a JSON array or NDJSON (bytes or str),
    /// parsed in Rust without the GIL. With `threads=2`, large NDJSON input
    /// is parsed on a second thread while this one merges.
    #[args(data, "*", threads = "1")]
    fn ingest_json(
        &self,
        py: Python<'_>,
        data: &PyAny,
        threads: usize,
    ) -> PyResult<Py<PyIngestResult>> {
        let data = data_of(data)?;
        let bytes = data.bytes();
        if threads > 1 && bytes.len() >= PIPELINE_MIN_BYTES {
            if let Some(res) = py.allow_threads(|| self.ingest_ndjson_pipelined(bytes)) {
                return self.result(py, res);
            }
        }
        let res = py.allow_threads(|| {
            let parsed = parse_batch(bytes)?;
            let mut eng = self.inner.lock();
            Ok::<_, String>(
                eng.ingest(
                    parsed
                        .iter()
                        .enumerate()
                        .map(|(i, r)| (i, r.as_ref().map(|p| p.as_obs()).map_err(Clone::clone))),
                ),
            )
        });
        match res {
            Ok(r) => self.result(py, r),
            Err(e) => Err(InvalidJSONError::new_err(e)),
        }
    }

    /// Merge the accepted items of a `ValidatedBatch` (all, or the
    /// positions in `select`) under the identities in `identity_of`
    /// (attacker → identity). An item whose attacker has no identity there
    /// is an error record (index = its position in the selection).
    #[args(batch, identity_of = "None", select = "None")]
    fn ingest_validated(
        &self,
        py: Python<'_>,
        batch: PyRef<'_, PyValidated>,
        identity_of: Option<&PyDict>,
        select: Option<Vec<usize>>,
    ) -> PyResult<Py<PyIngestResult>> {
        let ids = identity_map(identity_of)?;
        let chosen = batch.selected(select)?;
        let res = py.allow_threads(|| {
            let mut eng = self.inner.lock();
            eng.ingest(chosen.iter().enumerate().map(|(k, v)| {
                let item = match ids.get(&v.attacker_uuid) {
                    Some(ident) => Ok(Obs {
                        identity: ident,
                        primitive: &v.primitive,
                        value: v.value.as_ref(),
                        ts: v.ts,
                        kind: None,
                    }),
                    None => Err(format!("no identity for attacker {:?}", v.attacker_uuid)),
                };
                (k, item)
            }))
        });
        self.result(py, res)
    }

    /// The current state of a key, or None.
    fn get(&self, identity_uuid: &str, primitive: &str) -> Option<PyState> {
        self.inner
            .lock()
            .get(identity_uuid, primitive)
            .map(|inner| PyState { inner })
    }

    /// States of many keys at once (None where missing).
    fn get_many(&self, keys: &PyAny) -> PyResult<Vec<Option<PyState>>> {
        let keys = key_pairs(keys)?;
        let eng = self.inner.lock();
        Ok(keys
            .iter()
            .map(|(i, p)| eng.get(i, p).map(|inner| PyState { inner }))
            .collect())
    }

    fn __len__(&self) -> usize {
        self.inner.lock().len()
    }

    fn __contains__(&self, key: (&str, &str)) -> bool {
        self.inner.lock().contains(key.0, key.1)
    }

    /// All keys, sorted.
    fn keys<'py>(&self, py: Python<'py>) -> &'py PyList {
        let keys = self.inner.lock().keys();
        PyList::new(
            py,
            keys.iter()
                .map(|(i, p)| PyTuple::new(py, [i.as_ref(), p.as_ref()])),
        )
    }

    /// Keys (identity, primitive) of `keys` that the engine does not hold.
    fn missing<'py>(&self, py: Python<'py>, keys: &'py PyAny) -> PyResult<&'py PyList> {
        // the keys given, not copies: each is only read
        let mut given: Vec<(&str, &str, &PyAny)> = Vec::new();
        for item in keys.iter()? {
            let item = item?;
            let (i, p): (&str, &str) = item.extract()?;
            given.push((i, p, item));
        }
        let absent: Vec<&PyAny> = {
            let eng = self.inner.lock();
            given
                .into_iter()
                .filter(|(i, p, _)| !eng.contains(i, p))
                .map(|(_, _, item)| item)
                .collect()
        };
        Ok(PyList::new(py, absent))
    }

    /// Drop keys; returns how many existed.
    fn evict(&self, keys: &PyAny) -> PyResult<usize> {
        let keys = key_pairs(keys)?;
        let mut eng = self.inner.lock();
        Ok(keys.iter().filter(|(i, p)| eng.evict(i, p)).count())
    }

    fn clear(&self) {
        self.inner.lock().clear();
    }

    /// The retained window of a key as JSON text (see `import_windows`).
    fn export_window(&self, identity_uuid: &str, primitive: &str) -> Option<String> {
        self.inner.lock().export(identity_uuid, primitive)
    }

    /// `export_window` for many keys.
    fn export_windows(&self, keys: &PyAny) -> PyResult<Vec<Option<String>>> {
        let keys = key_pairs(keys)?;
        let eng = self.inner.lock();
        Ok(keys.iter().map(|(i, p)| eng.export(i, p)).collect())
    }

    /// Load exported windows (str or bytes each), replacing those keys.
    /// Returns the rejected ones (index + reason); the rest are loaded.
    fn import_windows(&self, py: Python<'_>, windows: &PyAny) -> PyResult<Vec<PyRejected>> {
        let mut datas = Vec::new();
        for w in windows.iter()? {
            datas.push(data_of(w?)?);
        }
        let errors = py.allow_threads(|| {
            let mut eng = self.inner.lock();
            let mut errors = Vec::new();
            for (index, d) in datas.iter().enumerate() {
                let r = parse_window(d.bytes()).and_then(|w| eng.import(&w.as_window()));
                if let Err(reason) = r {
                    errors.push(ItemError { index, reason });
                }
            }
            errors
        });
        Ok(errors.into_iter().map(PyRejected::from).collect())
    }

    /// Why a key is in its state: the retained window, the counts, the rule
    /// and the thresholds it compared against. None for an unknown key.
    fn explain(
        &self,
        py: Python<'_>,
        identity_uuid: &str,
        primitive: &str,
    ) -> PyResult<Option<PyObject>> {
        let ex = self.inner.lock().explain(identity_uuid, primitive);
        ex.map(|e| {
            let (th, scope, over) = self.thresholds.scoped(primitive, e.kind);
            let d = explanation(py, th, &e)?;
            // which thresholds decided: global, the primitive's or the kind's
            let d: &PyDict = d.as_ref(py).downcast()?;
            d.set_item("thresholds_scope", scope.as_str())?;
            let given = match over {
                Some(s) => scoped_dict(py, std::slice::from_ref(s))?
                    .get_item(&s.name)
                    .map(|v| v.into_py(py))
                    .unwrap_or_else(|| PyDict::new(py).into_py(py)),
                None => PyDict::new(py).into_py(py),
            };
            d.set_item("thresholds_overrides", given)?;
            Ok(d.into_py(py))
        })
        .transpose()
    }

    /// Counters and sizes.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<&'py PyDict> {
        let eng = self.inner.lock();
        let d = PyDict::new(py);
        let s = eng.stats();
        d.set_item("keys", eng.len())?;
        d.set_item("accepted", s.accepted)?;
        d.set_item("rejected", s.rejected)?;
        d.set_item(
            "unknown_primitive_observations",
            s.unknown_primitive_observations,
        )?;
        d.set_item("unknown_primitives", eng.unknown_primitives())?;
        d.set_item("interned_values", eng.interned_values())?;
        d.set_item("heap_bytes", eng.heap_bytes())?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!("Engine(keys={})", self.inner.lock().len())
    }
}

fn state_dict<'py>(py: Python<'py>, s: &StateOut) -> PyResult<&'py PyDict> {
    let d = PyDict::new(py);
    d.set_item("current_value", to_py(py, &s.current)?)?;
    d.set_item("state", s.state.as_str())?;
    d.set_item("confidence", s.confidence)?;
    d.set_item("observation_count", s.count)?;
    d.set_item("last_observation_ts", s.last_ts)?;
    Ok(d)
}

fn explanation(py: Python<'_>, th: &Thresholds, e: &Explanation) -> PyResult<PyObject> {
    let d = PyDict::new(py);
    let det = &e.outcome.detail;
    d.set_item("identity_uuid", e.identity.as_ref())?;
    d.set_item("primitive", e.primitive.as_ref())?;
    d.set_item("kind", e.kind.as_str())?;
    d.set_item("observation_count", e.count)?;
    d.set_item("state", state_dict(py, &e.state)?)?;
    d.set_item("rule", det.rule.as_str())?;
    d.set_item("rule_description", det.rule.describe())?;
    let window = PyList::empty(py);
    for (ts, v) in &e.window {
        let w = PyDict::new(py);
        w.set_item("ts", ts)?;
        w.set_item("value", to_py(py, v)?)?;
        window.append(w)?;
    }
    d.set_item("window", window)?;
    let detail = PyDict::new(py);
    match e.kind {
        Kind::Categorical => {
            detail.set_item("recent_len", det.recent_len)?;
            detail.set_item("top_count", det.top_count)?;
            detail.set_item("majority_needed", det.majority_needed)?;
            detail.set_item("older_len", det.older_len)?;
            detail.set_item("older_top_count", det.older_top_count)?;
            detail.set_item("older_majority_needed", det.older_majority_needed)?;
            if matches!(det.rule, Rule::Alternation | Rule::NoClearMajority) {
                detail.set_item("distinct", det.distinct)?;
                detail.set_item("flips", det.flips)?;
                detail.set_item("repeats", det.repeats)?;
                detail.set_item("alternation_min_len", th.alternation_min_len)?;
            }
            detail.set_item("window_n", th.window_n)?;
            detail.set_item("min_observations", th.min_observations)?;
            detail.set_item("majority", th.majority)?;
            detail.set_item("multi_actor_max_confidence", th.multi_actor_max_confidence)?;
        }
        Kind::Numeric => {
            detail.set_item("recent_len", det.recent_len)?;
            detail.set_item("older_len", det.older_len)?;
            detail.set_item("ewma", det.ewma)?;
            detail.set_item("older_ewma", det.older_ewma)?;
            detail.set_item("cv", det.cv)?;
            detail.set_item("shift", det.shift)?;
            detail.set_item("window_n", th.window_n)?;
            detail.set_item("min_observations", th.min_observations)?;
            detail.set_item("ewma_alpha", th.ewma_alpha)?;
            detail.set_item("conflict_dispersion_pct", th.conflict_dispersion_pct)?;
            detail.set_item("drift_mean_shift_pct", th.drift_mean_shift_pct)?;
        }
        Kind::Hash => {
            detail.set_item("distinct", det.distinct)?;
            detail.set_item("rotations", det.rotations)?;
            detail.set_item("hash_drift_max", th.hash_drift_max)?;
            detail.set_item("hash_window_secs", th.hash_window_secs)?;
            let hw = PyList::empty(py);
            for (v, ts) in &e.hash_window {
                let w = PyDict::new(py);
                w.set_item("value", to_py(py, v)?)?;
                w.set_item("last_ts", ts)?;
                hw.append(w)?;
            }
            d.set_item("hash_window", hw)?;
        }
    }
    d.set_item("detail", detail)?;
    Ok(d.into_py(py))
}

/// DECNET's v0 dispatcher over a whole series given in order (docs/decnet.md#merge-dispatch).
#[pyfunction(observations, "*", value_kind = "None", thresholds = "None")]
pub fn aggregate_observations(
    py: Python<'_>,
    observations: &PyAny,
    value_kind: Option<&PyAny>,
    thresholds: Option<PyThresholds>,
) -> PyResult<PyState> {
    let keys = Keys::new(py);
    let mut arena = Arena::default();
    let mut items = Vec::new();
    let mut first_err: Option<String> = None;
    for_each_item(observations, |i, obj| {
        match extract_series_item(obj, &keys, &mut arena) {
            Ok(v) => items.push(v),
            Err(e) => {
                if first_err.is_none() {
                    first_err = Some(format!("observation {i}: {e}"));
                }
            }
        }
    })?;
    if let Some(e) = first_err {
        return Err(DecnetAttrError::new_err(e));
    }
    if items.is_empty() {
        // Emptiness is checked before the kind (docs/decnet.md#merge-dispatch).
        return Ok(PyState {
            inner: StateOut::empty(),
        });
    }
    let kind = match super::convert::parse_kind_obj(value_kind) {
        Ok(k) => k.unwrap_or(Kind::Categorical),
        Err(_) => {
            let shown = value_kind
                .map(|v| v.repr().map(|r| r.to_string()))
                .transpose()?;
            return Err(DecnetAttrError::new_err(format!(
                "unknown value_kind {}; expected None, 'categorical', 'numeric' or 'hash'",
                shown.unwrap_or_default()
            )));
        }
    };
    let th = thresholds.map(|t| t.inner).unwrap_or_default();
    let series: Vec<_> = items.iter().map(|(t, v)| (*t, arena.value(*v))).collect();
    let out = aggregate(&th, kind, &series).map_err(DecnetAttrError::new_err)?;
    Ok(PyState { inner: out })
}
