//! The value types Python sees: `Thresholds`, `AttributionState`,
//! `ChangeRecord`, `IngestResult`, `RejectedItem`.

use std::sync::Arc;

use pyo3::basic::CompareOp;
use pyo3::exceptions::PyIndexError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use super::convert::{extract_value, to_py, Arena};
use super::errors::DecnetAttrError;
use crate::core::engine::{Change, ItemError, StateOut};
use crate::core::merge::{Scoped, State, Thresholds, SCOPED_FIELDS};

/// Merger thresholds; the defaults are DECNET's constants.
#[pyclass(name = "Thresholds", module = "decnet_attr._core")]
#[derive(Clone)]
pub struct PyThresholds {
    pub inner: Thresholds,
}

/// The thresholds Python sees, declared once: each `name: type` becomes a
/// getter of `Thresholds`, an entry of `FIELDS` (`to_dict`, `repr`, error
/// messages) and an arm of `set_field` (the constructor's keywords). The
/// class's other methods are passed through into the same `#[pymethods]`.
macro_rules! py_thresholds {
    (fields { $($name:ident: $ty:ty),+ $(,)? } methods { $($methods:tt)* }) => {
        const FIELDS: &[&str] = &[$(stringify!($name)),+];

        #[pymethods]
        impl PyThresholds {
            $(
                #[getter]
                fn $name(&self) -> $ty {
                    self.inner.$name
                }
            )+

            // written here, not passed in: pyo3 0.17's `**kwargs` handling
            // needs the signature and its attribute to come from one place
            #[new]
            #[args(kwargs = "**")]
            fn new(kwargs: Option<&PyDict>) -> PyResult<Self> {
                Self::from_kwargs(kwargs)
            }

            $($methods)*
        }

        fn set_field(t: &mut Thresholds, key: &str, v: &PyAny) -> PyResult<()> {
            match key {
                $(stringify!($name) => t.$name = v.extract()?,)+
                other => {
                    return Err(DecnetAttrError::new_err(format!(
                        "unknown threshold {other:?}; known: {}, per_primitive, per_kind",
                        FIELDS.join(", ")
                    )))
                }
            }
            Ok(())
        }
    };
}

py_thresholds! {
    fields {
        window_n: usize,
        min_observations: u64,
        majority: usize,
        alternation_min_len: usize,
        ewma_alpha: f64,
        stable_dispersion_pct: f64,
        drift_mean_shift_pct: f64,
        conflict_dispersion_pct: f64,
        numeric_conflict_confidence: f64,
        hash_drift_max: u64,
        hash_window_secs: f64,
        multi_actor_max_confidence: f64,
        multi_actor_min_primitives: usize,
        multi_actor_tick_secs: f64,
    }
    methods {
        /// Overrides per primitive: ``{primitive: {field: value}}``.
        #[getter]
        fn per_primitive<'py>(&self, py: Python<'py>) -> PyResult<&'py PyDict> {
            scoped_dict(py, &self.inner.per_primitive)
        }
        /// Overrides per value kind: ``{"numeric": {field: value}}``.
        #[getter]
        fn per_kind<'py>(&self, py: Python<'py>) -> PyResult<&'py PyDict> {
            scoped_dict(py, &self.inner.per_kind)
        }

        /// All thresholds as a dict.
        fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<&'py PyDict> {
            let d = PyDict::new(py);
            let me = Py::new(py, self.clone())?;
            for &f in FIELDS {
                d.set_item(f, me.getattr(py, f)?)?;
            }
            // only when set, so a plain configuration keeps its flat shape
            if !self.inner.per_primitive.is_empty() {
                d.set_item("per_primitive", self.per_primitive(py)?)?;
            }
            if !self.inner.per_kind.is_empty() {
                d.set_item("per_kind", self.per_kind(py)?)?;
            }
            Ok(d)
        }

        fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
            let d = self.to_dict(py)?;
            let mut parts: Vec<String> = FIELDS
                .iter()
                .map(|f| -> PyResult<String> {
                    let v = d
                        .get_item(f)
                        .map(|v| v.repr().map(|r| r.to_string()))
                        .transpose()?;
                    Ok(format!("{f}={}", v.unwrap_or_default()))
                })
                .collect::<PyResult<Vec<String>>>()?;
            for key in ["per_primitive", "per_kind"] {
                if let Some(v) = d.get_item(key) {
                    parts.push(format!("{key}={}", v.repr()?));
                }
            }
            Ok(format!("Thresholds({})", parts.join(", ")))
        }

        fn __richcmp__(
            &self,
            other: PyRef<'_, PyThresholds>,
            op: CompareOp,
            py: Python<'_>,
        ) -> PyObject {
            match op {
                CompareOp::Eq => (self.inner == other.inner).into_py(py),
                CompareOp::Ne => (self.inner != other.inner).into_py(py),
                _ => py.NotImplemented(),
            }
        }

        fn __reduce__<'py>(&self, py: Python<'py>) -> PyResult<(PyObject, &'py PyTuple)> {
            let cls = py
                .get_type::<PyThresholds>()
                .getattr("_from_dict")?
                .into_py(py);
            Ok((cls, PyTuple::new(py, [self.to_dict(py)?])))
        }

        #[staticmethod]
        fn _from_dict(d: &PyDict) -> PyResult<Self> {
            PyThresholds::from_kwargs(Some(d))
        }
    }
}

impl PyThresholds {
    /// The constructor's work: DECNET's defaults, then the keyword overrides.
    fn from_kwargs(kwargs: Option<&PyDict>) -> PyResult<Self> {
        let mut t = Thresholds::default();
        let mut scoped: Vec<(&str, &PyAny)> = Vec::new();
        if let Some(kw) = kwargs {
            for (k, v) in kw.iter() {
                let key: &str = k.extract()?;
                match key {
                    "per_primitive" | "per_kind" => {
                        if !v.is_none() {
                            scoped.push((
                                if key == "per_kind" {
                                    "per_kind"
                                } else {
                                    "per_primitive"
                                },
                                v,
                            ));
                        }
                    }
                    other => set_field(&mut t, other, v)?,
                }
            }
        }
        // overrides start from the final global values
        for (which, v) in scoped {
            let d: &PyDict = v.downcast().map_err(|_| {
                DecnetAttrError::new_err(format!("{which} must be a dict of dicts"))
            })?;
            let mut list = Vec::new();
            for (name, fields) in d.iter() {
                let name: String = name.extract()?;
                let fields: &PyDict = fields.downcast().map_err(|_| {
                    DecnetAttrError::new_err(format!("{which} {name:?} must be a dict"))
                })?;
                let mut th = Thresholds {
                    per_primitive: Vec::new(),
                    per_kind: Vec::new(),
                    ..t.clone()
                };
                let mut given = Vec::new();
                for (f, val) in fields.iter() {
                    let f: &str = f.extract()?;
                    let Some(known) = SCOPED_FIELDS.iter().find(|k| **k == f) else {
                        return Err(DecnetAttrError::new_err(format!(
                            "{which} {name:?}: {f:?} cannot be set per {}; allowed: {}",
                            if which == "per_kind" {
                                "kind"
                            } else {
                                "primitive"
                            },
                            SCOPED_FIELDS.join(", ")
                        )));
                    };
                    set_field(&mut th, f, val)?;
                    given.push(*known);
                }
                list.push(Scoped {
                    name,
                    given,
                    thresholds: th,
                });
            }
            list.sort_by(|a, b| a.name.cmp(&b.name));
            if which == "per_kind" {
                t.per_kind = list;
            } else {
                t.per_primitive = list;
            }
        }
        t.validate().map_err(DecnetAttrError::new_err)?;
        Ok(PyThresholds { inner: t })
    }
}

/// The given fields of each override, as ``{name: {field: value}}``.
pub fn scoped_dict<'py>(py: Python<'py>, list: &[Scoped]) -> PyResult<&'py PyDict> {
    let d = PyDict::new(py);
    for s in list {
        let fields = PyDict::new(py);
        let me = Py::new(
            py,
            PyThresholds {
                inner: s.thresholds.clone(),
            },
        )?;
        for f in &s.given {
            fields.set_item(*f, me.getattr(py, *f)?)?;
        }
        d.set_item(&s.name, fields)?;
    }
    Ok(d)
}

/// The merged state of one (identity, primitive): frozen, compares by value.
#[pyclass(name = "AttributionState", module = "decnet_attr._core")]
#[derive(Clone)]
pub struct PyState {
    pub inner: StateOut,
}

impl PyState {
    fn tuple<'py>(&self, py: Python<'py>) -> PyResult<&'py PyTuple> {
        Ok(PyTuple::new(
            py,
            [
                to_py(py, &self.inner.current)?,
                self.inner.state.as_str().into_py(py),
                self.inner.confidence.into_py(py),
                self.inner.count.into_py(py),
                self.inner.last_ts.into_py(py),
            ],
        ))
    }
}

#[pymethods]
impl PyState {
    #[new]
    #[args(
        current_value,
        state,
        confidence,
        observation_count,
        last_observation_ts
    )]
    fn new(
        current_value: &PyAny,
        state: &str,
        confidence: f64,
        observation_count: u64,
        last_observation_ts: f64,
    ) -> PyResult<Self> {
        let st = State::parse(state).ok_or_else(|| {
            DecnetAttrError::new_err(format!(
                "state must be one of unknown, stable, drifting, conflicted, multi_actor; got {state:?}"
            ))
        })?;
        let mut arena = Arena::default();
        let slot = extract_value(current_value, &mut arena).map_err(DecnetAttrError::new_err)?;
        Ok(PyState {
            inner: StateOut {
                current: arena.value(slot).to_owned(),
                state: st,
                confidence,
                count: observation_count,
                last_ts: last_observation_ts,
            },
        })
    }

    #[getter]
    fn current_value(&self, py: Python<'_>) -> PyResult<PyObject> {
        to_py(py, &self.inner.current)
    }
    #[getter]
    fn state(&self) -> &'static str {
        self.inner.state.as_str()
    }
    #[getter]
    fn confidence(&self) -> f64 {
        self.inner.confidence
    }
    #[getter]
    fn observation_count(&self) -> u64 {
        self.inner.count
    }
    #[getter]
    fn last_observation_ts(&self) -> f64 {
        self.inner.last_ts
    }

    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<&'py PyDict> {
        let d = PyDict::new(py);
        d.set_item("current_value", to_py(py, &self.inner.current)?)?;
        d.set_item("state", self.inner.state.as_str())?;
        d.set_item("confidence", self.inner.confidence)?;
        d.set_item("observation_count", self.inner.count)?;
        d.set_item("last_observation_ts", self.inner.last_ts)?;
        Ok(d)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let cv = to_py(py, &self.inner.current)?;
        Ok(format!(
            "AttributionState(current_value={}, state='{}', confidence={}, observation_count={}, \
             last_observation_ts={})",
            cv.as_ref(py).repr()?,
            self.inner.state.as_str(),
            PyAny::repr(self.inner.confidence.into_py(py).as_ref(py))?,
            self.inner.count,
            PyAny::repr(self.inner.last_ts.into_py(py).as_ref(py))?,
        ))
    }

    fn __richcmp__(&self, other: &PyAny, op: CompareOp, py: Python<'_>) -> PyResult<PyObject> {
        let Ok(other) = other.extract::<PyRef<'_, PyState>>() else {
            return Ok(py.NotImplemented());
        };
        match op {
            CompareOp::Eq | CompareOp::Ne => {
                let eq = self.tuple(py)?.eq(other.tuple(py)?)?;
                Ok((eq == matches!(op, CompareOp::Eq)).into_py(py))
            }
            _ => Ok(py.NotImplemented()),
        }
    }

    fn __hash__(&self, py: Python<'_>) -> PyResult<isize> {
        self.tuple(py)?.hash()
    }

    fn __reduce__<'py>(&self, py: Python<'py>) -> PyResult<(PyObject, &'py PyTuple)> {
        Ok((py.get_type::<PyState>().into_py(py), self.tuple(py)?))
    }
}

/// One key touched by a batch: the state before (None for a new key) and
/// after.
#[pyclass(name = "ChangeRecord", module = "decnet_attr._core")]
#[derive(Clone)]
pub struct PyChange {
    pub inner: Change,
}

#[pymethods]
impl PyChange {
    #[getter]
    fn identity_uuid(&self) -> &str {
        &self.inner.identity
    }
    #[getter]
    fn primitive(&self) -> &str {
        &self.inner.primitive
    }
    #[getter]
    fn old_state(&self) -> Option<PyState> {
        self.inner.old.clone().map(|inner| PyState { inner })
    }
    #[getter]
    fn state(&self) -> PyState {
        PyState {
            inner: self.inner.new.clone(),
        }
    }
    #[getter]
    fn state_changed(&self) -> bool {
        self.inner.state_changed()
    }

    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<&'py PyDict> {
        let d = PyDict::new(py);
        d.set_item("identity_uuid", self.identity_uuid())?;
        d.set_item("primitive", self.primitive())?;
        d.set_item(
            "old_state",
            match &self.inner.old {
                Some(o) => PyState { inner: o.clone() }.to_dict(py)?.into_py(py),
                None => py.None(),
            },
        )?;
        d.set_item("state", self.state().to_dict(py)?)?;
        d.set_item("state_changed", self.state_changed())?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!(
            "ChangeRecord(identity_uuid={:?}, primitive={:?}, old_state={}, state='{}', state_changed={})",
            self.inner.identity.as_ref(),
            self.inner.primitive.as_ref(),
            self.inner
                .old
                .as_ref()
                .map_or("None".to_string(), |o| format!("'{}'", o.state.as_str())),
            self.inner.new.state.as_str(),
            if self.state_changed() { "True" } else { "False" },
        )
    }
}

/// A rejected batch item.
#[pyclass(name = "RejectedItem", module = "decnet_attr._core")]
#[derive(Clone)]
pub struct PyRejected {
    #[pyo3(get)]
    pub index: usize,
    #[pyo3(get)]
    pub reason: String,
}

impl From<ItemError> for PyRejected {
    fn from(e: ItemError) -> Self {
        PyRejected {
            index: e.index,
            reason: e.reason,
        }
    }
}

#[pymethods]
impl PyRejected {
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<&'py PyDict> {
        let d = PyDict::new(py);
        d.set_item("index", self.index)?;
        d.set_item("reason", &self.reason)?;
        Ok(d)
    }
    fn __repr__(&self) -> String {
        format!(
            "RejectedItem(index={}, reason={:?})",
            self.index, self.reason
        )
    }
    fn __richcmp__(&self, other: PyRef<'_, PyRejected>, op: CompareOp, py: Python<'_>) -> PyObject {
        let eq = self.index == other.index && self.reason == other.reason;
        match op {
            CompareOp::Eq => eq.into_py(py),
            CompareOp::Ne => (!eq).into_py(py),
            _ => py.NotImplemented(),
        }
    }
}

/// The outcome of a batch: a sequence of `ChangeRecord` (one per key the
/// batch touched, in first-touch order) plus the rejected items.
#[pyclass(name = "IngestResult", module = "decnet_attr._core", sequence)]
pub struct PyIngestResult {
    pub changes: Arc<Vec<Change>>,
    pub errors: Vec<ItemError>,
    #[pyo3(get)]
    pub accepted: usize,
}

#[pymethods]
impl PyIngestResult {
    fn __len__(&self) -> usize {
        self.changes.len()
    }

    fn __getitem__(&self, index: isize) -> PyResult<PyChange> {
        let n = self.changes.len() as isize;
        let i = if index < 0 { index + n } else { index };
        if i < 0 || i >= n {
            return Err(PyIndexError::new_err("IngestResult index out of range"));
        }
        Ok(PyChange {
            inner: self.changes[i as usize].clone(),
        })
    }

    fn __iter__(&self) -> ChangeIter {
        ChangeIter {
            changes: self.changes.clone(),
            pos: 0,
        }
    }

    /// Items rejected, with their index in the batch and the reason.
    #[getter]
    fn errors(&self) -> Vec<PyRejected> {
        self.errors.iter().cloned().map(PyRejected::from).collect()
    }

    #[getter]
    fn rejected(&self) -> usize {
        self.errors.len()
    }

    /// Only the records whose state changed.
    fn changed(&self) -> Vec<PyChange> {
        self.changes
            .iter()
            .filter(|c| c.state_changed())
            .map(|c| PyChange { inner: c.clone() })
            .collect()
    }

    fn __repr__(&self) -> String {
        format!(
            "IngestResult(changes={}, accepted={}, rejected={})",
            self.changes.len(),
            self.accepted,
            self.errors.len()
        )
    }
}

#[pyclass(module = "decnet_attr._core")]
pub struct ChangeIter {
    changes: Arc<Vec<Change>>,
    pos: usize,
}

#[pymethods]
impl ChangeIter {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }
    fn __next__(&mut self) -> Option<PyChange> {
        let c = self.changes.get(self.pos)?.clone();
        self.pos += 1;
        Some(PyChange { inner: c })
    }
}
