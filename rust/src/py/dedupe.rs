//! `Dedupe` for Python: the SQLite store's exactly-once admission.

use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use super::validate::PyValidated;
use crate::core::dedupe::Dedupe;

/// In-memory exactly-once admission by id and by (evidence_ref, primitive)
/// for the last `capacity` observations (see the store's docs).
#[pyclass(name = "Dedupe", module = "decnet_attr._core")]
pub struct PyDedupe {
    inner: Mutex<Dedupe>,
}

fn text(t: &PyTuple, i: usize) -> PyResult<&str> {
    t.get_item(i)?.extract()
}

#[pymethods]
impl PyDedupe {
    #[new]
    fn new(capacity: usize) -> Self {
        PyDedupe {
            inner: Mutex::new(Dedupe::new(capacity)),
        }
    }

    /// Admit observation rows (store column order: id at 0, primitive at
    /// 2, evidence_ref at 8) into the open transaction; returns the
    /// positions of the new ones.
    fn admit_rows(&self, rows: Vec<&PyTuple>) -> PyResult<Vec<usize>> {
        let mut d = self.inner.lock();
        let mut out = Vec::with_capacity(rows.len());
        for (i, r) in rows.iter().enumerate() {
            if d.admit(text(r, 0)?, text(r, 8)?, text(r, 2)?) {
                out.push(i);
            }
        }
        Ok(out)
    }

    /// Admit the accepted items of a `ValidatedBatch` (those at the
    /// positions `select`, or all) into the open transaction; returns the
    /// positions of the new ones. Runs without the GIL.
    #[args(batch, select = "None")]
    fn admit_batch(
        &self,
        py: Python<'_>,
        batch: PyRef<'_, PyValidated>,
        select: Option<Vec<usize>>,
    ) -> PyResult<Vec<usize>> {
        let chosen = batch.positions(select)?;
        let keys = batch.dedupe_keys(py);
        Ok(py.allow_threads(|| {
            let mut d = self.inner.lock();
            chosen
                .into_iter()
                .filter(|&i| d.admit_keys(keys[i]))
                .collect()
        }))
    }

    /// Positions of the batch's accepted items that are duplicates of
    /// observations admitted before (nothing is admitted). Runs without
    /// the GIL.
    fn seen_batch(&self, py: Python<'_>, batch: PyRef<'_, PyValidated>) -> Vec<usize> {
        let keys = batch.dedupe_keys(py);
        py.allow_threads(|| {
            let d = self.inner.lock();
            (0..keys.len()).filter(|&i| d.seen_keys(keys[i])).collect()
        })
    }

    /// Remember `(id, evidence_ref, primitive)` triples as committed
    /// (oldest first), e.g. the newest stored rows at start-up.
    fn load(&self, keys: Vec<(&str, &str, &str)>) {
        let mut d = self.inner.lock();
        for (id, ev, prim) in keys {
            d.admit(id, ev, prim);
        }
        d.commit(None);
    }

    /// Later admissions belong to the transaction `tag` (see `commit`).
    fn begin(&self, tag: u64) {
        self.inner.lock().begin(tag);
    }

    /// Keep the admissions of the transaction `tag` (all open ones: None).
    #[args(tag = "None")]
    fn commit(&self, tag: Option<u64>) {
        self.inner.lock().commit(tag);
    }

    /// Take back the admissions of the transaction `tag` (all open ones: None).
    #[args(tag = "None")]
    fn rollback(&self, tag: Option<u64>) {
        self.inner.lock().rollback(tag);
    }

    fn clear(&self) {
        self.inner.lock().clear();
    }

    #[getter]
    fn capacity(&self) -> usize {
        self.inner.lock().capacity()
    }

    fn __len__(&self) -> usize {
        self.inner.lock().len()
    }
}
