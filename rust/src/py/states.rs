//! A batch's state rows and state events, built in one pass from the
//! engine's change records: `StateTable` (per key, what the row this
//! process last wrote says) and `StateWrite` (one batch's rows, their SQL
//! parameters and their events).
//!
//! Python hands over the change records and gets back whole batches, never
//! an object per key on the way to the store: the writer binds the rows
//! straight from a `StateWrite`, and the events come out as one list (built
//! per key in Python, they were about a third of the event loop's time).
//!
//! The rules a row follows (one place for them):
//! - a key without a stored row starts at version 1, its last change at
//!   its newest observation, no previous state;
//! - otherwise the version goes up by one; if the state differs from the
//!   stored row's, the last change moves to the newest observation and the
//!   previous state becomes the stored one; else both stay.

use std::collections::{HashMap as StdHashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::Arc;

use ahash::RandomState;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};
use rusqlite::types::Value as Sql;

use super::convert::to_py;
use super::engine::PyEngine;
use super::strings::Strings;
use super::types::PyIngestResult;
use crate::core::engine::Change;
use crate::core::merge::State;
use crate::core::pgcopy::CopyBuffer;
use crate::core::value::{write_float, write_json_str};

/// The columns a row's values are bound to, in order: after the key
/// (`identity_uuid`, `primitive`) for an insert, before it for an update.
pub const VALUE_COLUMNS: [&str; 10] = [
    "current_value",
    "state",
    "confidence",
    "observation_count",
    "last_change_ts",
    "last_observation_ts",
    "kind",
    "version",
    "updated_at",
    "previous_state",
];

/// A state's name as a stored row gives it (a name this build does not
/// know is kept as it is).
#[derive(Clone, Debug, PartialEq)]
enum Name {
    Known(State),
    Other(Arc<str>),
}

impl Name {
    fn parse(s: &str) -> Name {
        State::parse(s).map_or_else(|| Name::Other(s.into()), Name::Known)
    }

    fn as_str(&self) -> &str {
        match self {
            Name::Known(s) => s.as_str(),
            Name::Other(s) => s,
        }
    }

    fn is_multi(&self) -> bool {
        *self == Name::Known(State::MultiActor)
    }
}

/// What a stored row says that the next row of its key builds on.
#[derive(Clone, Debug)]
struct Stored {
    state: Name,
    version: i64,
    last_change: f64,
    previous: Option<Name>,
}

impl Stored {
    /// The same facts from a Python `StateRow`.
    fn of(row: &PyAny) -> PyResult<Stored> {
        let state: &str = row.getattr(pyo3::intern!(row.py(), "state"))?.extract()?;
        let previous: Option<&str> = row
            .getattr(pyo3::intern!(row.py(), "previous_state"))?
            .extract()?;
        Ok(Stored {
            state: Name::parse(state),
            version: row.getattr(pyo3::intern!(row.py(), "version"))?.extract()?,
            last_change: row
                .getattr(pyo3::intern!(row.py(), "last_change_ts"))?
                .extract()?,
            previous: previous.map(Name::parse),
        })
    }

    /// The row that follows this one (None: the key has no row yet) for
    /// the key's new state `state`, newest observation at `last_ts`.
    fn next(prior: Option<&Stored>, state: State, last_ts: f64) -> Stored {
        let now = Name::Known(state);
        match prior {
            None => Stored {
                state: now,
                version: 1,
                last_change: last_ts,
                previous: None,
            },
            Some(old) if old.state != now => Stored {
                state: now,
                version: old.version + 1,
                last_change: last_ts,
                previous: Some(old.state.clone()),
            },
            Some(old) => Stored {
                state: now,
                version: old.version + 1,
                last_change: old.last_change,
                previous: old.previous.clone(),
            },
        }
    }
}

/// A merger kind's name, for Python and for SQL.
type Kind = (Py<PyString>, Arc<str>);

/// One row of a `StateWrite`: the change record it comes from and what
/// the store adds to it.
struct Row {
    change: usize,
    current_json: String,
    kind: Kind,
    row: Stored,
    /// The stored row's state before this batch (None: no row).
    before: Option<Name>,
}

impl Row {
    /// The row's state differs from the stored row's (or there was none).
    fn is_change(&self, c: &Change) -> bool {
        self.before.as_ref().map(Name::as_str) != Some(c.new.state.as_str())
    }
}

/// The maps here are looked up once or twice per key of every batch: a
/// fast hasher.
type HashMap<K, V> = StdHashMap<K, V, RandomState>;

/// An `(identity, primitive)` key.
type Key = (Arc<str>, Arc<str>);

/// Keys whose retained window waits to be written, oldest first: a key is
/// noted once (the time it first changed since its window was written) and
/// taken when its window is written. Keys dropped before they are taken
/// leave stale entries in `order`, skipped when they reach the front.
#[derive(Default)]
struct Pending {
    /// key -> (its note's number, since)
    since: HashMap<Key, (u64, f64)>,
    order: VecDeque<(Key, u64)>,
    noted: u64,
}

impl Pending {
    fn note(&mut self, key: &Key, now: f64) {
        if !self.since.contains_key(key) {
            self.noted += 1;
            self.since.insert(key.clone(), (self.noted, now));
            self.order.push_back((key.clone(), self.noted));
        }
    }

    fn drop_key(&mut self, key: &Key) {
        self.since.remove(key);
        if self.since.is_empty() {
            self.order.clear();
        }
    }

    /// The oldest keys noted at or before `horizon` (None: any), at most
    /// `limit`, no longer pending.
    fn take(&mut self, horizon: Option<f64>, limit: Option<usize>) -> Vec<Key> {
        let mut out = Vec::new();
        while let Some((key, n)) = self.order.front() {
            match self.since.get(key) {
                Some(&(m, since)) if m == *n => {
                    if limit.is_some_and(|l| out.len() >= l) || horizon.is_some_and(|h| since > h) {
                        break;
                    }
                    let (key, _) = self.order.pop_front().expect("a front entry");
                    self.since.remove(&key);
                    out.push(key);
                }
                _ => {
                    self.order.pop_front();
                }
            }
        }
        out
    }
}

/// Per key, what the row this process last wrote says (the worker's own
/// writes, some maybe not committed yet: the worker forgets the keys of a
/// transaction that fails). Keys it holds need not be read back. It also
/// keeps the keys whose retained window waits to be written (`pending`).
#[pyclass(name = "StateTable", module = "decnet_attr._core")]
pub struct PyStateTable {
    rows: HashMap<Arc<str>, HashMap<Arc<str>, Stored>>,
    len: usize,
    pending: Pending,
    /// primitive -> merger kind, asked of `kind_of` once per primitive
    kinds: HashMap<Arc<str>, Kind>,
    kind_of: PyObject,
}

impl PyStateTable {
    fn get(&self, identity: &str, primitive: &str) -> Option<&Stored> {
        self.rows.get(identity)?.get(primitive)
    }

    fn kind(&mut self, py: Python<'_>, primitive: &Arc<str>) -> PyResult<Kind> {
        if let Some((k, name)) = self.kinds.get(primitive) {
            return Ok((k.clone_ref(py), name.clone()));
        }
        let k: &PyString = self
            .kind_of
            .call1(py, (primitive.as_ref(),))?
            .into_ref(py)
            .downcast()?;
        let name: Arc<str> = k.to_str()?.into();
        self.kinds
            .insert(primitive.clone(), (k.into(), name.clone()));
        Ok((k.into(), name))
    }

    fn remember(&mut self, identity: &Arc<str>, primitive: &Arc<str>, row: Stored) {
        let of = self.rows.entry(identity.clone()).or_default();
        if of.insert(primitive.clone(), row).is_none() {
            self.len += 1;
        }
    }
}

fn key_of(item: &PyAny) -> PyResult<(&str, &str)> {
    item.extract()
}

fn key_py(py: Python<'_>, key: &Key) -> PyObject {
    PyTuple::new(py, [key.0.as_ref(), key.1.as_ref()]).into_py(py)
}

#[pymethods]
impl PyStateTable {
    /// `kind_of(primitive)`: the merger kind a row of that primitive is
    /// stored with (asked once per primitive).
    #[new]
    fn new(kind_of: PyObject) -> Self {
        PyStateTable {
            rows: HashMap::default(),
            len: 0,
            pending: Pending::default(),
            kinds: HashMap::default(),
            kind_of,
        }
    }

    fn __len__(&self) -> usize {
        self.len
    }

    fn __contains__(&self, key: (&str, &str)) -> bool {
        self.get(key.0, key.1).is_some()
    }

    /// The version the held row of a key has (None: not held).
    fn version(&self, identity: &str, primitive: &str) -> Option<i64> {
        self.get(identity, primitive).map(|s| s.version)
    }

    fn clear(&mut self) {
        self.rows.clear();
        self.len = 0;
    }

    /// Of `keys` (`(identity, primitive)` tuples), those not held, as given.
    fn missing<'py>(&self, py: Python<'py>, keys: &'py PyAny) -> PyResult<&'py PyList> {
        let out = PyList::empty(py);
        for item in keys.iter()? {
            let item = item?;
            let (i, p) = key_of(item)?;
            if self.get(i, p).is_none() {
                out.append(item)?;
            }
        }
        Ok(out)
    }

    /// Forget `keys` (their rows are read from the store again).
    fn forget(&mut self, keys: &PyAny) -> PyResult<()> {
        for item in keys.iter()? {
            let (i, p) = key_of(item?)?;
            if let Some(of) = self.rows.get_mut(i) {
                if of.remove(p).is_some() {
                    self.len -= 1;
                }
                if of.is_empty() {
                    self.rows.remove(i);
                }
            }
        }
        Ok(())
    }

    /// How many keys' windows wait to be written.
    #[getter]
    fn pending(&self) -> usize {
        self.pending.since.len()
    }

    /// The keys whose window has waited since `horizon` or before (None:
    /// all of them), oldest first, at most `limit`: they are no longer
    /// pending (their windows are being written).
    #[args(horizon = "None", limit = "None")]
    fn take_pending<'py>(
        &mut self,
        py: Python<'py>,
        horizon: Option<f64>,
        limit: Option<usize>,
    ) -> &'py PyList {
        let keys = self.pending.take(horizon, limit);
        PyList::new(py, keys.iter().map(|k| key_py(py, k)))
    }

    /// `keys` no longer wait for their windows (written another way).
    fn settle(&mut self, keys: &PyAny) -> PyResult<()> {
        for item in keys.iter()? {
            let (i, p) = key_of(item?)?;
            self.pending.drop_key(&(i.into(), p.into()));
        }
        Ok(())
    }

    /// The rows of a batch's change records. Each key builds on the row
    /// held for it, else on `loaded[(identity, primitive)]` (a `StateRow`
    /// read from the store), else on none. With `remember`, the new rows
    /// are held from now on and their keys' windows are pending (since
    /// `now`, unless pending already); a table holding more than `limit`
    /// rows is emptied first (the write's `cleared` then says so; what is
    /// pending stays). Without `pending` the rows are held but their
    /// windows are not noted as pending (a store that writes every window
    /// with its row).
    #[args(
        result,
        loaded,
        now,
        remember = "true",
        limit = "None",
        pending = "true"
    )]
    #[allow(clippy::too_many_arguments)]
    fn write(
        &mut self,
        py: Python<'_>,
        result: PyRef<'_, PyIngestResult>,
        loaded: Option<&PyDict>,
        now: f64,
        remember: bool,
        limit: Option<usize>,
        pending: bool,
    ) -> PyResult<PyStateWrite> {
        self.build(
            py,
            result.changes.clone(),
            loaded,
            now,
            remember,
            limit,
            pending,
        )
    }

    /// `write` for the current states of `keys` in `engine` (keys it does
    /// not hold are left out), as if each had just changed: for keys
    /// rebuilt from their observations.
    #[args(engine, keys, loaded, now, remember = "false")]
    fn write_current(
        &mut self,
        py: Python<'_>,
        engine: PyRef<'_, PyEngine>,
        keys: &PyAny,
        loaded: Option<&PyDict>,
        now: f64,
        remember: bool,
    ) -> PyResult<PyStateWrite> {
        let mut changes = Vec::new();
        {
            let eng = engine.inner.lock();
            for item in keys.iter()? {
                let (i, p) = key_of(item?)?;
                if let Some(new) = eng.get(i, p) {
                    changes.push(Change {
                        identity: i.into(),
                        primitive: p.into(),
                        old: None,
                        new,
                    });
                }
            }
        }
        self.build(py, Arc::new(changes), loaded, now, remember, None, true)
    }
}

impl PyStateTable {
    /// The rows of `changes` (see `write`).
    #[allow(clippy::too_many_arguments)]
    fn build(
        &mut self,
        py: Python<'_>,
        changes: Arc<Vec<Change>>,
        loaded: Option<&PyDict>,
        now: f64,
        remember: bool,
        limit: Option<usize>,
        pending: bool,
    ) -> PyResult<PyStateWrite> {
        let loaded = loaded.filter(|d| !d.is_empty());
        let mut rows = Vec::with_capacity(changes.len());
        for (i, c) in changes.iter().enumerate() {
            let held = self.get(&c.identity, &c.primitive).cloned();
            let prior = match (held, loaded) {
                (Some(s), _) => Some(s),
                (None, Some(d)) => d
                    .get_item((c.identity.as_ref(), c.primitive.as_ref()))
                    .map(Stored::of)
                    .transpose()?,
                (None, None) => None,
            };
            let n = &c.new;
            rows.push(Row {
                change: i,
                current_json: n.current.to_json(),
                kind: self.kind(py, &c.primitive)?,
                row: Stored::next(prior.as_ref(), n.state, n.last_ts),
                before: prior.map(|p| p.state),
            });
        }
        let mut cleared = false;
        if remember {
            if limit.is_some_and(|l| self.len > l) {
                self.clear();
                cleared = true;
            }
            for r in &rows {
                let c = &changes[r.change];
                self.remember(&c.identity, &c.primitive, r.row.clone());
                if pending {
                    self.pending
                        .note(&(c.identity.clone(), c.primitive.clone()), now);
                }
            }
        }
        Ok(PyStateWrite {
            changes,
            rows,
            now,
            cleared,
        })
    }
}

/// One batch's state rows (see `StateTable.write`), one per key the batch
/// touched, in the order of its change records.
#[pyclass(name = "StateWrite", module = "decnet_attr._core")]
pub struct PyStateWrite {
    changes: Arc<Vec<Change>>,
    rows: Vec<Row>,
    /// `updated_at` of every row.
    now: f64,
    /// The table was emptied before these rows were held.
    #[pyo3(get)]
    cleared: bool,
}

impl PyStateWrite {
    fn change(&self, r: &Row) -> &Change {
        &self.changes[r.change]
    }

    /// A row's values in `VALUE_COLUMNS` order.
    fn values(&self, r: &Row) -> [Sql; 10] {
        let n = &self.change(r).new;
        [
            Sql::Text(r.current_json.clone()),
            Sql::Text(n.state.as_str().to_owned()),
            Sql::Real(n.confidence),
            Sql::Integer(n.count as i64),
            Sql::Real(r.row.last_change),
            Sql::Real(n.last_ts),
            Sql::Text(r.kind.1.as_ref().to_owned()),
            Sql::Integer(r.row.version),
            Sql::Real(self.now),
            r.row
                .previous
                .as_ref()
                .map_or(Sql::Null, |p| Sql::Text(p.as_str().to_owned())),
        ]
    }

    /// The parameter sets of the rows: `(updates, same, inserts)`. A row
    /// written before (version > 1) is an update (values, then the key), a
    /// new one an insert (the key, then values). With `split`, the updates
    /// that keep the row's state go to `same` (bound the same way): their
    /// statement can leave the state columns, and the index on `state`,
    /// alone.
    pub(crate) fn sql_sets(&self, split: bool) -> (Sets, Sets, Sets) {
        let mut updates = Vec::new();
        let mut same = Vec::new();
        let mut inserts = Vec::new();
        for r in &self.rows {
            let c = self.change(r);
            let key = [
                Sql::Text(c.identity.as_ref().to_owned()),
                Sql::Text(c.primitive.as_ref().to_owned()),
            ];
            let values = self.values(r);
            if r.row.version > 1 {
                let kept = !r.is_change(c);
                let to = if split && kept {
                    &mut same
                } else {
                    &mut updates
                };
                to.push(values.into_iter().chain(key).collect());
            } else {
                inserts.push(key.into_iter().chain(values).collect());
            }
        }
        (updates, same, inserts)
    }
}

/// The keys of a state event's payload, in order (DECNET's
/// `state_changed` keys first, then ours).
const PAYLOAD_KEYS: [&str; 13] = [
    "identity_uuid",
    "primitive",
    "old_state",
    "new_state",
    "current_value",
    "confidence",
    "observation_count",
    "ts",
    "attacker_uuids",
    "last_change_ts",
    "last_observation_ts",
    "emitted_at",
    "version",
];

/// Parameter sets of one statement, one per row.
type Sets = Vec<Vec<Sql>>;

fn sql_to_py(py: Python<'_>, v: Sql) -> PyObject {
    match v {
        Sql::Null => py.None(),
        Sql::Integer(i) => i.into_py(py),
        Sql::Real(f) => f.into_py(py),
        Sql::Text(s) => s.into_py(py),
        Sql::Blob(b) => pyo3::types::PyBytes::new(py, &b).into_py(py),
    }
}

fn name_py(py: Python<'_>, n: &Option<Name>) -> PyObject {
    n.as_ref().map(Name::as_str).into_py(py)
}

#[pymethods]
impl PyStateWrite {
    fn __len__(&self) -> usize {
        self.rows.len()
    }

    /// `(identity, primitive)` of every row.
    fn keys<'py>(&self, py: Python<'py>) -> &'py PyList {
        PyList::new(
            py,
            self.rows.iter().map(|r| {
                let c = self.change(r);
                PyTuple::new(py, [c.identity.as_ref(), c.primitive.as_ref()])
            }),
        )
    }

    /// The identities of the rows, each once, in order of first row.
    fn identities(&self) -> Vec<&str> {
        let mut seen = std::collections::HashSet::<_, RandomState>::default();
        self.rows
            .iter()
            .map(|r| self.change(r).identity.as_ref())
            .filter(|i| seen.insert(*i))
            .collect()
    }

    /// The rows of every identity that has a multi-actor row before or
    /// after the batch: `(identity, primitive, state, state before)` each.
    fn multi<'py>(&self, py: Python<'py>) -> &'py PyList {
        let touched: std::collections::HashSet<&str> = self
            .rows
            .iter()
            .filter(|r| r.row.state.is_multi() || r.before.as_ref().is_some_and(Name::is_multi))
            .map(|r| self.change(r).identity.as_ref())
            .collect();
        let rows: Vec<PyObject> = self
            .rows
            .iter()
            .filter(|r| touched.contains(self.change(r).identity.as_ref()))
            .map(|r| {
                let c = self.change(r);
                (
                    c.identity.as_ref(),
                    c.primitive.as_ref(),
                    c.new.state.as_str(),
                    name_py(py, &r.before),
                )
                    .into_py(py)
            })
            .collect();
        PyList::new(py, rows)
    }

    /// The parameter sets (see `sql_sets`) as Python tuples: `(updates,
    /// inserts)`.
    fn params<'py>(&self, py: Python<'py>) -> (&'py PyList, &'py PyList) {
        let (updates, _, inserts) = self.sql_sets(false);
        let tuples = |sets: Vec<Vec<Sql>>| {
            PyList::new(
                py,
                sets.into_iter()
                    .map(|s| PyTuple::new(py, s.into_iter().map(|v| sql_to_py(py, v)))),
            )
        };
        (tuples(updates), tuples(inserts))
    }

    /// The rows as `cls` objects (the `StateRow` fields, positional),
    /// `windows[i]` the retained window of row `i` (None: none).
    #[args(cls, windows = "None")]
    fn rows<'py>(
        &self,
        py: Python<'py>,
        cls: &'py PyAny,
        windows: Option<Vec<Option<String>>>,
    ) -> PyResult<&'py PyList> {
        let out = PyList::empty(py);
        for (i, r) in self.rows.iter().enumerate() {
            let c = self.change(r);
            let n = &c.new;
            let window = windows.as_ref().and_then(|w| w.get(i).cloned().flatten());
            let args: Vec<PyObject> = vec![
                c.identity.as_ref().into_py(py),
                c.primitive.as_ref().into_py(py),
                r.current_json.clone().into_py(py),
                n.state.as_str().into_py(py),
                n.confidence.into_py(py),
                n.count.into_py(py),
                r.row.last_change.into_py(py),
                n.last_ts.into_py(py),
                r.kind.0.clone_ref(py).into_py(py),
                window.into_py(py),
                r.row.version.into_py(py),
                self.now.into_py(py),
                name_py(py, &r.row.previous),
            ];
            out.append(cls.call1(PyTuple::new(py, args))?)?;
        }
        Ok(out)
    }

    /// The rows of keys that had no stored row (`created`), or of those
    /// that had one, as one PostgreSQL binary `COPY` stream of the state
    /// table's columns (`STATE_COLS` order), each with the retained window
    /// `engine` holds for its key.
    fn copy_rows<'py>(
        &self,
        py: Python<'py>,
        engine: PyRef<'_, PyEngine>,
        created: bool,
    ) -> &'py PyBytes {
        let eng = engine.inner.lock();
        let mut c = CopyBuffer::new(self.rows.len(), 512);
        for r in self.rows.iter().filter(|r| r.before.is_none() == created) {
            let ch = self.change(r);
            let n = &ch.new;
            c.row(13);
            c.text(Some(&ch.identity));
            c.text(Some(&ch.primitive));
            c.text(Some(&r.current_json));
            c.text(Some(n.state.as_str()));
            c.float8(Some(n.confidence));
            c.int4(i32::try_from(n.count).unwrap_or(i32::MAX));
            c.float8(Some(r.row.last_change));
            c.float8(Some(n.last_ts));
            c.text(Some(&r.kind.1));
            c.text(eng.export(&ch.identity, &ch.primitive).as_deref());
            c.int8(r.row.version);
            c.float8(Some(self.now));
            c.text(r.row.previous.as_ref().map(Name::as_str));
        }
        drop(eng);
        PyBytes::new(py, &c.finish())
    }

    /// How many rows had no stored row.
    #[getter]
    fn created(&self) -> usize {
        self.rows.iter().filter(|r| r.before.is_none()).count()
    }

    /// The batch's state events, one per row, as `(topic, payload, type)`:
    /// `changed` (a `(topic, type)`) where the state differs from the
    /// stored row's, else `updated`. `attackers[identity]` is the list every
    /// payload of that identity names. Returns the events and how many of
    /// them are `changed`.
    fn events<'py>(
        &self,
        py: Python<'py>,
        attackers: &'py PyDict,
        changed: (&'py PyString, &'py PyString),
        updated: (&'py PyString, &'py PyString),
    ) -> PyResult<(&'py PyList, usize)> {
        let out = PyList::empty(py);
        let mut transitions = 0;
        let none_yet = PyList::empty(py);
        let emitted_at = self.now.into_py(py);
        // every payload has the same keys in the same order: each is a copy
        // of this one with its values replaced (a copy takes the key table
        // as it is, where thirteen inserts into a new dict would grow it)
        let names = PAYLOAD_KEYS.map(|k| PyString::intern(py, k));
        let template = PyDict::new(py);
        for name in names {
            template.set_item(name, py.None())?;
        }
        let mut strings = Strings::new(py);
        for r in &self.rows {
            let c = self.change(r);
            let n = &c.new;
            let identity = strings.get(&c.identity);
            let who: &PyAny = attackers.get_item(identity).unwrap_or(none_yet);
            let old: PyObject = match &r.before {
                Some(b) => strings.get(b.as_str()).into(),
                None => py.None(),
            };
            let is_change = r.is_change(c);
            let last_ts = n.last_ts.into_py(py);
            let values: [PyObject; 13] = [
                identity.into(),
                strings.get(&c.primitive).into(),
                old,
                strings.get(n.state.as_str()).into(),
                to_py(py, &n.current)?,
                n.confidence.into_py(py),
                n.count.into_py(py),
                last_ts.clone_ref(py),
                who.into(),
                r.row.last_change.into_py(py),
                last_ts,
                emitted_at.clone_ref(py),
                r.row.version.into_py(py),
            ];
            let p = template.copy()?;
            for (name, value) in names.iter().zip(values) {
                p.set_item(*name, value)?;
            }
            let (topic, kind) = if is_change {
                transitions += 1;
                changed
            } else {
                updated
            };
            let event: [&PyAny; 3] = [topic, p, kind];
            out.append(PyTuple::new(py, event))?;
        }
        Ok((out, transitions))
    }

    /// The same events as `events`, each already in its wire form: the
    /// whole envelope (`v, id, topic, type, ts, payload`) as compact JSON
    /// bytes, for a bus that sends bytes (`(topic, bytes, type)` each). The
    /// ids are `id_prefix` plus `first_id`, `first_id + 1`, … in hex; the
    /// envelope's `ts` is the rows' time, as the payload's `emitted_at`.
    #[allow(clippy::too_many_arguments)]
    fn wire_events<'py>(
        &self,
        py: Python<'py>,
        attackers: &'py PyDict,
        changed: (&'py PyString, &'py PyString),
        updated: (&'py PyString, &'py PyString),
        id_prefix: &str,
        first_id: u64,
        v: i64,
    ) -> PyResult<(&'py PyList, usize)> {
        let out = PyList::empty(py);
        let mut transitions = 0;
        // each identity's attackers as JSON once (an identity has a row per
        // primitive the batch touched)
        let mut who_of: HashMap<&str, String> = HashMap::default();
        for (identity, list) in attackers.iter() {
            let mut json = String::from("[");
            for (k, a) in list.downcast::<PyList>()?.iter().enumerate() {
                if k > 0 {
                    json.push(',');
                }
                write_json_str(&mut json, a.downcast::<PyString>()?.to_str()?);
            }
            json.push(']');
            who_of.insert(identity.downcast::<PyString>()?.to_str()?, json);
        }
        // what does not change from one event to the next, as JSON text once:
        // the head up to the id's number (`"` and the prefix; hex digits
        // need no escape), the rest of the envelope per kind, the payload's
        // key fragments
        let mut head = String::from("{\"v\":");
        head.push_str(itoa::Buffer::new().format(v));
        head.push_str(",\"id\":");
        write_json_str(&mut head, id_prefix);
        head.pop();
        let mut now = String::new();
        write_float(&mut now, self.now);
        let rest = |(topic, kind): (&PyString, &PyString)| -> PyResult<String> {
            let mut t = String::from("\",\"topic\":");
            write_json_str(&mut t, topic.to_str()?);
            t.push_str(",\"type\":");
            write_json_str(&mut t, kind.to_str()?);
            t.push_str(",\"ts\":");
            t.push_str(&now);
            t.push_str(",\"payload\":");
            Ok(t)
        };
        let (rest_changed, rest_updated) = (rest(changed)?, rest(updated)?);
        let keys: Vec<String> = PAYLOAD_KEYS
            .iter()
            .enumerate()
            .map(|(k, name)| {
                let mut f = String::from(if k == 0 { "{" } else { "," });
                write_json_str(&mut f, name);
                f.push(':');
                f
            })
            .collect();
        let mut buf = String::with_capacity(640);
        let mut int = itoa::Buffer::new();
        let mut last_ts = String::new();
        for (i, r) in self.rows.iter().enumerate() {
            let c = self.change(r);
            let n = &c.new;
            let (topic, kind, rest) = if r.is_change(c) {
                transitions += 1;
                (changed.0, changed.1, &rest_changed)
            } else {
                (updated.0, updated.1, &rest_updated)
            };
            last_ts.clear();
            write_float(&mut last_ts, n.last_ts);
            buf.clear();
            buf.push_str(&head);
            let _ = write!(buf, "{:x}", first_id + i as u64);
            buf.push_str(rest);
            // the values in PAYLOAD_KEYS order
            let mut key = keys.iter();
            let mut next = |buf: &mut String| buf.push_str(key.next().expect("a key per value"));
            next(&mut buf);
            write_json_str(&mut buf, &c.identity);
            next(&mut buf);
            write_json_str(&mut buf, &c.primitive);
            next(&mut buf);
            match &r.before {
                Some(b) => write_json_str(&mut buf, b.as_str()),
                None => buf.push_str("null"),
            }
            next(&mut buf);
            write_json_str(&mut buf, n.state.as_str());
            next(&mut buf);
            n.current.as_ref().write_json(&mut buf);
            next(&mut buf);
            write_float(&mut buf, n.confidence);
            next(&mut buf);
            buf.push_str(int.format(n.count));
            next(&mut buf);
            buf.push_str(&last_ts);
            next(&mut buf);
            buf.push_str(who_of.get(c.identity.as_ref()).map_or("[]", String::as_str));
            next(&mut buf);
            write_float(&mut buf, r.row.last_change);
            next(&mut buf);
            buf.push_str(&last_ts);
            next(&mut buf);
            buf.push_str(&now);
            next(&mut buf);
            buf.push_str(int.format(r.row.version));
            buf.push_str("}}");
            let event: [&PyAny; 3] = [topic, PyBytes::new(py, buf.as_bytes()), kind];
            out.append(PyTuple::new(py, event))?;
        }
        Ok((out, transitions))
    }
}
