//! `validate_observations` and `ValidatedBatch`: the one validator, and the
//! batch it returns, for Python. Python holds the batch as one object and
//! asks it for what each step needs (the bus payloads, the rows to store,
//! the engine's input); nothing is converted per observation in Python.

use std::collections::HashMap;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, OnceLock};

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};

use super::errors::{DecnetAttrError, InvalidJSONError};
use super::strings::Strings;
use crate::core::dedupe::{keys_of, Keys};
use crate::core::pgcopy::CopyBuffer;
use crate::core::validate::{
    self, Column, Envelope, Options, Rejection, Valid, Validated, ROW_COLUMNS,
};
use crate::core::value::write_json_str;

/// Accepted observations of one batch plus the refused ones.
#[pyclass(name = "ValidatedBatch", module = "decnet_attr._core")]
#[derive(Clone)]
pub struct PyValidated {
    pub valid: Arc<Vec<Valid>>,
    pub rejected: Arc<Vec<Rejection>>,
    pub items: usize,
    pub duplicates: usize,
    /// The accepted items' admission keys, made once on first use.
    pub keys: OnceLock<Arc<Vec<Keys>>>,
}

/// Batches at least this big are freed on the freeing thread.
const FREE_AWAY: usize = 64;

/// Anything to free.
type Garbage = Box<dyn Send>;

/// A thread that frees what it is sent: a batch of a few thousand accepted
/// observations holds tens of thousands of strings, and freeing them takes
/// about a millisecond that would otherwise be the event loop's (a batch
/// object dies with the GIL held, usually on the loop). The process id
/// tells a forked child (which has no such thread) to free in place.
fn free_away(garbage: Garbage) {
    static FREER: OnceLock<(u32, Option<Sender<Garbage>>)> = OnceLock::new();
    let (pid, tx) = FREER.get_or_init(|| {
        let (tx, rx) = channel::<Garbage>();
        let started = std::thread::Builder::new()
            .name("attr-free".into())
            .spawn(move || rx.into_iter().for_each(drop));
        (std::process::id(), started.ok().map(|_| tx))
    });
    if *pid != std::process::id() {
        return; // `garbage` is freed here
    }
    if let Some(tx) = tx {
        let _ = tx.send(garbage); // if the thread is gone, freed here
    }
}

impl Drop for PyValidated {
    fn drop(&mut self) {
        // the last holder of a big batch frees it on the freeing thread
        if self.valid.len() >= FREE_AWAY && Arc::strong_count(&self.valid) == 1 {
            let valid = std::mem::take(&mut self.valid);
            let keys = self.keys.take();
            free_away(Box::new((valid, keys)));
        }
    }
}

impl PyValidated {
    pub fn new(
        valid: Vec<Valid>,
        rejected: Vec<Rejection>,
        items: usize,
        duplicates: usize,
    ) -> PyValidated {
        PyValidated {
            valid: Arc::new(valid),
            rejected: Arc::new(rejected),
            items,
            duplicates,
            keys: OnceLock::new(),
        }
    }

    /// The admission keys of the accepted items ([`keys_of`]), hashed once
    /// per batch (without the GIL).
    pub fn dedupe_keys(&self, py: Python<'_>) -> Arc<Vec<Keys>> {
        if let Some(k) = self.keys.get() {
            return k.clone();
        }
        let valid = self.valid.clone();
        let made = py.allow_threads(move || {
            Arc::new(
                valid
                    .iter()
                    .map(|v| keys_of(&v.id, &v.evidence_ref, &v.primitive))
                    .collect::<Vec<_>>(),
            )
        });
        self.keys.get_or_init(|| made).clone()
    }
}

/// `{attacker_uuid: identity_uuid}` from a Python mapping.
/// attacker -> identity, as Python gives it (looked up once per observation:
/// a fast hasher).
pub type IdentityMap = HashMap<String, String, ahash::RandomState>;

pub fn identity_map(obj: Option<&PyDict>) -> PyResult<IdentityMap> {
    let mut out = IdentityMap::default();
    if let Some(d) = obj {
        for (k, v) in d.iter() {
            out.insert(k.extract::<String>()?, v.extract::<String>()?);
        }
    }
    Ok(out)
}

impl PyValidated {
    /// The positions `select` checked against the accepted list (all of
    /// them when `select` is None).
    pub fn positions(&self, select: Option<Vec<usize>>) -> PyResult<Vec<usize>> {
        match select {
            None => Ok((0..self.valid.len()).collect()),
            Some(sel) => {
                if let Some(bad) = sel.iter().find(|&&i| i >= self.valid.len()) {
                    return Err(pyo3::exceptions::PyIndexError::new_err(format!(
                        "no accepted item at position {bad}"
                    )));
                }
                Ok(sel)
            }
        }
    }

    /// The selected accepted items (positions into the accepted list; all
    /// when `select` is None).
    pub fn selected(&self, select: Option<Vec<usize>>) -> PyResult<Vec<&Valid>> {
        Ok(self
            .positions(select)?
            .into_iter()
            .map(|i| &self.valid[i])
            .collect())
    }
}

#[pymethods]
impl PyValidated {
    fn __len__(&self) -> usize {
        self.valid.len()
    }

    /// Items in the input (accepted + refused).
    #[getter]
    fn items(&self) -> usize {
        self.items
    }

    /// Items refused because their id came earlier in the same batch.
    #[getter]
    fn duplicates(&self) -> usize {
        self.duplicates
    }

    /// Ids of the accepted items, in order.
    #[getter]
    fn ids(&self) -> Vec<String> {
        self.valid.iter().map(|v| v.id.clone()).collect()
    }

    /// Index in the input of each accepted item.
    #[getter]
    fn indexes(&self) -> Vec<usize> {
        self.valid.iter().map(|v| v.index).collect()
    }

    /// Refused items: `(index, code, message)`, by index.
    #[getter]
    fn rejected(&self) -> Vec<(usize, &'static str, String)> {
        self.rejected
            .iter()
            .map(|r| (r.index, r.reason.code(), r.message.clone()))
            .collect()
    }

    /// Newest `ts` of the accepted items (None when there are none).
    fn max_ts(&self) -> Option<f64> {
        self.valid.iter().map(|v| v.ts).reduce(f64::max)
    }

    /// The batch's attackers, first-seen order: `(uuid, ip or None,
    /// newest ts)`; the ip is the first one the batch gives for it.
    #[args(select = "None")]
    fn attackers(
        &self,
        select: Option<Vec<usize>>,
    ) -> PyResult<Vec<(String, Option<String>, f64)>> {
        let mut pos: HashMap<&str, usize, ahash::RandomState> = HashMap::default();
        let mut out: Vec<(String, Option<String>, f64)> = Vec::new();
        for v in self.selected(select)? {
            match pos.get(v.attacker_uuid.as_str()) {
                Some(&i) => {
                    let e = &mut out[i];
                    if e.1.is_none() {
                        e.1.clone_from(&v.attacker_ip);
                    }
                    e.2 = e.2.max(v.ts);
                }
                None => {
                    pos.insert(&v.attacker_uuid, out.len());
                    out.push((v.attacker_uuid.clone(), v.attacker_ip.clone(), v.ts));
                }
            }
        }
        Ok(out)
    }

    /// The accepted items as NDJSON of DECNET's observation payload.
    /// Encoded without the GIL.
    #[args(select = "None")]
    fn ndjson<'py>(&self, py: Python<'py>, select: Option<Vec<usize>>) -> PyResult<&'py PyBytes> {
        let chosen = self.positions(select)?;
        let valid = self.valid.clone();
        let out = py.allow_threads(move || {
            let mut out = String::with_capacity(chosen.len() * 256);
            for i in chosen {
                valid[i].write_payload(&mut out);
                out.push('\n');
            }
            out
        });
        Ok(PyBytes::new(py, out.as_bytes()))
    }

    /// The selected accepted items (all when `select` is None) as NDJSON
    /// cut into parts of at most `max_bytes` (a part holds at least one
    /// item, however large): `[(positions, ndjson)]`, in order. Each item
    /// is encoded once, without the GIL.
    #[args(max_bytes, select = "None")]
    fn ndjson_chunks<'py>(
        &self,
        py: Python<'py>,
        max_bytes: usize,
        select: Option<Vec<usize>>,
    ) -> PyResult<Vec<(Vec<usize>, &'py PyBytes)>> {
        let chosen = self.positions(select)?;
        let valid = self.valid.clone();
        let parts = py.allow_threads(move || {
            let mut parts: Vec<(Vec<usize>, String)> = Vec::new();
            let mut line = String::with_capacity(512);
            for i in chosen {
                line.clear();
                valid[i].write_payload(&mut line);
                line.push('\n');
                let fits = parts
                    .last()
                    .map(|(_, text)| text.len() + line.len() <= max_bytes)
                    .unwrap_or(false);
                if !fits {
                    parts.push((Vec::new(), String::with_capacity(max_bytes.min(1 << 20))));
                }
                let (positions, text) = parts.last_mut().expect("a part was just pushed");
                positions.push(i);
                text.push_str(&line);
            }
            parts
        });
        Ok(parts
            .into_iter()
            .map(|(positions, text)| (positions, PyBytes::new(py, text.as_bytes())))
            .collect())
    }

    /// One accepted item's payload as JSON text.
    fn payload_json(&self, position: usize) -> PyResult<String> {
        let v = self.selected(Some(vec![position]))?[0];
        let mut out = String::new();
        v.write_payload(&mut out);
        Ok(out)
    }

    /// `(primitive, id)` of one accepted item.
    fn describe(&self, position: usize) -> PyResult<(String, String)> {
        let v = self.selected(Some(vec![position]))?[0];
        Ok((v.primitive.clone(), v.id.clone()))
    }

    /// Rows for the observations table, in the store's column order
    /// ([`Valid::columns`]; `merged` as 0/1).
    #[args(identity_of = "None", select = "None", merged = "true")]
    fn rows<'py>(
        &self,
        py: Python<'py>,
        identity_of: Option<&PyDict>,
        select: Option<Vec<usize>>,
        merged: bool,
    ) -> PyResult<&'py PyList> {
        let ids = identity_map(identity_of)?;
        let out = PyList::empty(py);
        for v in self.selected(select)? {
            let identity = ids.get(&v.attacker_uuid).map(String::as_str);
            let row = PyTuple::new(
                py,
                v.columns(identity, merged).map(|c| match c {
                    Column::Text(t) => t.into_py(py),
                    Column::Real(x) => x.into_py(py),
                    Column::Int(i) => i64::from(i).into_py(py),
                    Column::Flag(b) => i64::from(b).into_py(py),
                }),
            );
            out.append(row)?;
        }
        Ok(out)
    }

    /// The rows of [`rows`](Self::rows) as one PostgreSQL binary `COPY`
    /// stream (same columns, same order), encoded without the GIL. With
    /// `first_seq`, each row starts with its `seq`: `first_seq`, then the
    /// next numbers in the order of `select`.
    #[args(
        identity_of = "None",
        select = "None",
        merged = "true",
        first_seq = "None"
    )]
    fn copy_rows<'py>(
        &self,
        py: Python<'py>,
        identity_of: Option<&PyDict>,
        select: Option<Vec<usize>>,
        merged: bool,
        first_seq: Option<i64>,
    ) -> PyResult<&'py PyBytes> {
        let ids = identity_map(identity_of)?;
        let chosen = self.positions(select)?;
        let valid = self.valid.clone();
        let out = py.allow_threads(move || {
            let mut c = CopyBuffer::new(chosen.len(), 320);
            let columns = ROW_COLUMNS + usize::from(first_seq.is_some());
            for (k, i) in chosen.into_iter().enumerate() {
                let v = &valid[i];
                let identity = ids.get(&v.attacker_uuid).map(String::as_str);
                c.row(columns as u16);
                if let Some(first) = first_seq {
                    c.int8(first + k as i64);
                }
                for col in v.columns(identity, merged) {
                    match col {
                        Column::Text(t) => c.text(t),
                        Column::Real(x) => c.float8(x),
                        Column::Int(i) => c.int4(i),
                        Column::Flag(b) => c.boolean(b),
                    }
                }
            }
            c.finish()
        });
        Ok(PyBytes::new(py, &out))
    }

    /// What admission checks against the stored observations, as one JSON
    /// text: `[[id, evidence_ref, primitive], …]` per selected item (one
    /// query parameter the server unpacks, where three text arrays cost
    /// the driver a check and an encoding per element).
    #[args(select = "None")]
    fn admission_json(&self, select: Option<Vec<usize>>) -> PyResult<String> {
        let chosen = self.selected(select)?;
        let mut out = String::with_capacity(2 + chosen.len() * 96);
        out.push('[');
        for (n, v) in chosen.iter().enumerate() {
            if n > 0 {
                out.push(',');
            }
            out.push('[');
            write_json_str(&mut out, &v.id);
            out.push(',');
            write_json_str(&mut out, &v.evidence_ref);
            out.push(',');
            write_json_str(&mut out, &v.primitive);
            out.push(']');
        }
        out.push(']');
        Ok(out)
    }

    /// The positions to store, in order: all but those in `stored` (found
    /// in the store already) and those repeating the `(evidence_ref,
    /// primitive)` of an earlier one (ids are unique in a batch already).
    fn unrepeated(&self, stored: Vec<usize>) -> Vec<usize> {
        let skip: std::collections::HashSet<usize> = stored.into_iter().collect();
        let mut seen: std::collections::HashSet<(&str, &str), ahash::RandomState> =
            std::collections::HashSet::with_capacity_and_hasher(
                self.valid.len(),
                ahash::RandomState::new(),
            );
        (0..self.valid.len())
            .filter(|i| {
                let v = &self.valid[*i];
                !skip.contains(i) && seen.insert((v.evidence_ref.as_str(), v.primitive.as_str()))
            })
            .collect()
    }

    /// `(identity, primitive)` keys of the selected items, first-seen order
    /// (items whose attacker has no identity in `identity_of` are skipped).
    #[args(select = "None")]
    fn keys<'py>(
        &self,
        py: Python<'py>,
        identity_of: Option<&PyDict>,
        select: Option<Vec<usize>>,
    ) -> PyResult<&'py PyList> {
        let ids = identity_map(identity_of)?;
        let items = self.selected(select)?;
        let mut seen = std::collections::HashSet::<(&str, &str), ahash::RandomState>::default();
        let mut strings = Strings::new(py);
        let out = PyList::empty(py);
        for v in items {
            if let Some(ident) = ids.get(&v.attacker_uuid) {
                if seen.insert((ident, &v.primitive)) {
                    let pair = [strings.get(ident), strings.get(&v.primitive)];
                    out.append(PyTuple::new(py, pair))?;
                }
            }
        }
        Ok(out)
    }

    /// `positions` (all accepted items when None) grouped by attacker: the
    /// attackers in order of first appearance, each one's items in their
    /// order.
    #[args(positions = "None")]
    fn by_attacker(&self, positions: Option<Vec<usize>>) -> PyResult<Vec<usize>> {
        let positions = self.positions(positions)?;
        let mut group: HashMap<&str, usize, ahash::RandomState> = HashMap::default();
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for &i in &positions {
            let g = *group
                .entry(self.valid[i].attacker_uuid.as_str())
                .or_insert_with(|| {
                    groups.push(Vec::new());
                    groups.len() - 1
                });
            groups[g].push(i);
        }
        Ok(groups.concat())
    }

    /// `positions` cut where the attacker changes: `(attacker_uuid, count)`
    /// for each stretch of consecutive items of one attacker, in order
    /// (after [`by_attacker`](Self::by_attacker), one per attacker).
    fn attacker_runs(&self, positions: Vec<usize>) -> PyResult<Vec<(String, usize)>> {
        let mut out: Vec<(String, usize)> = Vec::new();
        for v in self.selected(Some(positions))? {
            match out.last_mut() {
                Some((a, n)) if *a == v.attacker_uuid => *n += 1,
                _ => out.push((v.attacker_uuid.clone(), 1)),
            }
        }
        Ok(out)
    }

    /// Positions of the accepted items per ingest partition (`partitions`
    /// lists; see `partition_of`).
    fn partition(&self, partitions: u32) -> Vec<Vec<usize>> {
        let n = partitions.max(1);
        let mut out = vec![Vec::new(); n as usize];
        for (i, v) in self.valid.iter().enumerate() {
            out[validate::partition_of(&v.attacker_uuid, n) as usize].push(i);
        }
        out
    }

    /// A batch of the selected accepted items only (positions).
    fn take(&self, select: Vec<usize>) -> PyResult<PyValidated> {
        let valid: Vec<Valid> = self.selected(Some(select))?.into_iter().cloned().collect();
        let n = valid.len();
        Ok(PyValidated::new(valid, Vec::new(), n, 0))
    }

    fn __repr__(&self) -> String {
        format!(
            "ValidatedBatch(accepted={}, rejected={})",
            self.valid.len(),
            self.rejected.len()
        )
    }
}

fn into_py(v: Validated) -> PyValidated {
    PyValidated::new(v.valid, v.rejected, v.items, v.duplicates)
}

/// Validate a body (JSON array, one object, or NDJSON) of observations.
/// `envelopes`: per item `(topic primitive or None, event id or None)`.
/// Raises `InvalidJSONError` for a body that is unusable as a whole.
/// `ndjson=True`: the body is NDJSON whatever it starts with, every line of
/// `ndjson_lines` one item (never an error for the whole body).
#[pyfunction(
    data,
    "*",
    envelopes = "None",
    max_value_bytes = "8192",
    ts_min = "None",
    ts_max = "None",
    id_prefix = "None",
    evidence_prefix = "\"obs:\"",
    default_source = "None",
    fill_defaults = "false",
    max_items = "None",
    ndjson = "false"
)]
#[allow(clippy::too_many_arguments)]
pub fn validate_observations(
    py: Python<'_>,
    data: &[u8],
    envelopes: Option<Vec<(Option<String>, Option<String>)>>,
    max_value_bytes: usize,
    ts_min: Option<f64>,
    ts_max: Option<f64>,
    id_prefix: Option<String>,
    evidence_prefix: &str,
    default_source: Option<String>,
    fill_defaults: bool,
    max_items: Option<usize>,
    ndjson: bool,
) -> PyResult<PyValidated> {
    let opts = Options {
        max_value_bytes,
        ts_min: ts_min.unwrap_or(f64::NEG_INFINITY),
        ts_max: ts_max.unwrap_or(f64::INFINITY),
        id_prefix,
        evidence_prefix: evidence_prefix.to_owned(),
        default_source,
        fill_defaults,
    };
    let envs: Option<Vec<Envelope>> = envelopes.map(|e| {
        e.into_iter()
            .map(|(primitive, event_id)| Envelope {
                primitive,
                event_id,
            })
            .collect()
    });
    let res = py.allow_threads(|| {
        let items = if ndjson {
            validate::split_ndjson(data)
        } else {
            validate::split_items(data).map_err(|e| (false, e))?
        };
        if let Some(max) = max_items {
            if items.len() > max {
                return Err((
                    true,
                    format!("{} items, above the limit of {max}", items.len()),
                ));
            }
        }
        Ok(validate::validate(items.parse(), envs.as_deref(), &opts))
    });
    match res {
        Ok(v) => Ok(into_py(v)),
        Err((false, e)) => Err(InvalidJSONError::new_err(e)),
        Err((true, e)) => Err(TooManyItemsError::new_err(e)),
    }
}

pyo3::create_exception!(
    _core,
    TooManyItemsError,
    DecnetAttrError,
    "A batch with more items than allowed."
);

/// Every reason code the validator can give, in a stable order.
#[pyfunction]
pub fn rejection_codes() -> Vec<&'static str> {
    validate::Reason::ALL.iter().map(|r| r.code()).collect()
}

/// An IP address as stored (IPv4-mapped IPv6 as IPv4, zone id dropped), or
/// None when `text` is not an address.
#[pyfunction]
pub fn normalise_ip(text: &str) -> Option<String> {
    validate::normalise_ip(text)
}

#[derive(serde::Deserialize)]
struct Head<'a> {
    #[serde(borrow)]
    attacker_uuid: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    primitive: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
}

/// The lines of an NDJSON body that are items, as the validator counts
/// them with `ndjson=True` (blank lines skipped).
#[pyfunction]
pub fn ndjson_lines<'py>(py: Python<'py>, data: &[u8]) -> Vec<&'py PyBytes> {
    validate::ndjson_lines(data)
        .map(|line| PyBytes::new(py, line))
        .collect()
}

/// The lines of a batch's NDJSON whose attacker is in `attackers`:
/// `(attacker_uuid, primitive, id, line)` (for the SSE relay, which shows
/// observations live on attacker pages). Lines that do not parse are
/// skipped: the batch was validated before it was published.
#[pyfunction]
pub fn observation_lines(
    data: &str,
    attackers: &PyAny,
) -> PyResult<Vec<(String, String, String, String)>> {
    let mut out = Vec::new();
    for line in data.split('\n') {
        if line.is_empty() {
            continue;
        }
        let head: Head<'_> = match serde_json::from_str(line) {
            Ok(h) => h,
            Err(_) => continue,
        };
        if attackers.contains(head.attacker_uuid.as_ref())? {
            out.push((
                head.attacker_uuid.into_owned(),
                head.primitive.into_owned(),
                head.id.into_owned(),
                line.to_owned(),
            ));
        }
    }
    Ok(out)
}

/// The one attacker-uuid rule: 1–64 characters of `[A-Za-z0-9-]`.
#[pyfunction]
pub fn is_attacker_uuid(text: &str) -> bool {
    validate::is_attacker_uuid(text)
}

/// The ingest partition of an attacker (FNV-1a of its uuid, modulo
/// `partitions`).
#[pyfunction]
pub fn partition_of(attacker_uuid: &str, partitions: u32) -> u32 {
    validate::partition_of(attacker_uuid, partitions)
}
