//! `SqliteConnection`: a SQLite connection (rusqlite, the system libsqlite3)
//! whose statements run with the GIL released.
//!
//! Python's `sqlite3` module releases the GIL around every `sqlite3_step`
//! and takes it back for the next row's parameters, so a writer thread
//! doing an `executemany` of thousands of rows hands the GIL back and forth
//! with the event loop once per row and mostly waits for it. Here the
//! parameters of a whole call are converted first (with the GIL), then every
//! statement runs without it, and the rows come back in one conversion. The
//! store drives it from one dedicated thread (`store/sqlite.py`).
//!
//! Errors are raised as the `sqlite3` module's own exception classes, with
//! `sqlite_errorcode` and `sqlite_errorname` set as CPython 3.11 sets them,
//! so callers handle both drivers alike.

use std::collections::HashSet;

use parking_lot::Mutex;
use pyo3::exceptions::{PyOverflowError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyFloat, PyList, PyLong, PyString, PyTuple};
use rusqlite::types::Value;
use rusqlite::{ffi, Connection, ErrorCode, OpenFlags};

use super::validate::{identity_map, IdentityMap, PyValidated};
use crate::core::validate::{Column, Valid};

/// Statements kept prepared per connection (the store uses a few dozen).
const STATEMENT_CACHE: usize = 128;

#[pyclass(name = "SqliteConnection", module = "decnet_attr._core")]
pub struct PySqlite {
    conn: Mutex<Option<Open>>,
    path: String,
}

struct Open {
    conn: Connection,
    /// SQL texts already checked for a second statement.
    checked: HashSet<String>,
}

pub(crate) enum Failure {
    Sqlite(rusqlite::Error),
    Closed,
}

impl From<rusqlite::Error> for Failure {
    fn from(e: rusqlite::Error) -> Self {
        Failure::Sqlite(e)
    }
}

pub(crate) fn error_name(code: i32) -> &'static str {
    match code & 0xff {
        ffi::SQLITE_ERROR => "SQLITE_ERROR",
        ffi::SQLITE_INTERNAL => "SQLITE_INTERNAL",
        ffi::SQLITE_PERM => "SQLITE_PERM",
        ffi::SQLITE_ABORT => "SQLITE_ABORT",
        ffi::SQLITE_BUSY => "SQLITE_BUSY",
        ffi::SQLITE_LOCKED => "SQLITE_LOCKED",
        ffi::SQLITE_NOMEM => "SQLITE_NOMEM",
        ffi::SQLITE_READONLY => "SQLITE_READONLY",
        ffi::SQLITE_INTERRUPT => "SQLITE_INTERRUPT",
        ffi::SQLITE_IOERR => "SQLITE_IOERR",
        ffi::SQLITE_CORRUPT => "SQLITE_CORRUPT",
        ffi::SQLITE_FULL => "SQLITE_FULL",
        ffi::SQLITE_CANTOPEN => "SQLITE_CANTOPEN",
        ffi::SQLITE_PROTOCOL => "SQLITE_PROTOCOL",
        ffi::SQLITE_SCHEMA => "SQLITE_SCHEMA",
        ffi::SQLITE_TOOBIG => "SQLITE_TOOBIG",
        ffi::SQLITE_CONSTRAINT => "SQLITE_CONSTRAINT",
        ffi::SQLITE_MISMATCH => "SQLITE_MISMATCH",
        ffi::SQLITE_MISUSE => "SQLITE_MISUSE",
        ffi::SQLITE_RANGE => "SQLITE_RANGE",
        ffi::SQLITE_NOTADB => "SQLITE_NOTADB",
        _ => "SQLITE_ERROR",
    }
}

/// The `sqlite3` exception a failure maps to, as CPython would raise it.
pub(crate) fn to_py(py: Python<'_>, f: Failure) -> PyErr {
    let (class, message, code) = describe(f);
    raise_as(py, "sqlite3", class, message, code)
}

/// The `sqlite3` exception class, message and extended code of a failure.
pub(crate) fn describe(f: Failure) -> (&'static str, String, Option<i32>) {
    match f {
        Failure::Closed => (
            "ProgrammingError",
            "Cannot operate on a closed database.".to_string(),
            None,
        ),
        Failure::Sqlite(e) => match &e {
            rusqlite::Error::SqliteFailure(err, msg) => {
                let text = msg.clone().unwrap_or_else(|| err.to_string());
                let class = match err.code {
                    ErrorCode::ConstraintViolation => "IntegrityError",
                    ErrorCode::TooBig => "DataError",
                    ErrorCode::InternalMalfunction => "InternalError",
                    ErrorCode::ApiMisuse => "ProgrammingError",
                    ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => "DatabaseError",
                    _ => "OperationalError",
                };
                (class, text, Some(err.extended_code))
            }
            rusqlite::Error::InvalidParameterCount(given, wanted) => (
                "ProgrammingError",
                format!("Incorrect number of bindings supplied. The current statement uses {wanted}, and there are {given} supplied."),
                None,
            ),
            rusqlite::Error::MultipleStatement => (
                "ProgrammingError",
                "You can only execute one statement at a time.".to_string(),
                None,
            ),
            other => ("OperationalError", other.to_string(), None),
        },
    }
}

/// An exception of `module.class(message)`, with the SQLite code set as
/// CPython's `sqlite3` sets it.
pub(crate) fn raise_as(
    py: Python<'_>,
    module: &str,
    class: &str,
    message: String,
    code: Option<i32>,
) -> PyErr {
    let build = || -> PyResult<PyErr> {
        let module = py.import(module)?;
        let exc = module.getattr(class)?.call1((message.clone(),))?;
        if let Some(code) = code {
            exc.setattr("sqlite_errorcode", code)?;
            exc.setattr("sqlite_errorname", error_name(code))?;
        }
        Ok(PyErr::from_value(exc))
    };
    build().unwrap_or_else(|e| e)
}

fn value_of(obj: &PyAny, index: usize) -> PyResult<Value> {
    if obj.is_none() {
        Ok(Value::Null)
    } else if let Ok(s) = obj.downcast::<PyString>() {
        Ok(Value::Text(s.to_str()?.to_owned()))
    } else if let Ok(f) = obj.downcast::<PyFloat>() {
        Ok(Value::Real(f.value()))
    } else if let Ok(b) = obj.downcast::<PyBool>() {
        Ok(Value::Integer(i64::from(b.is_true())))
    } else if obj.downcast::<PyLong>().is_ok() {
        obj.extract::<i64>().map(Value::Integer).map_err(|_| {
            PyOverflowError::new_err("Python int too large to convert to SQLite INTEGER")
        })
    } else if let Ok(b) = obj.downcast::<PyBytes>() {
        Ok(Value::Blob(b.as_bytes().to_vec()))
    } else {
        Err(PyTypeError::new_err(format!(
            "Error binding parameter {}: type '{}' is not supported",
            index + 1,
            obj.get_type().name().unwrap_or("?")
        )))
    }
}

pub(crate) fn params_of(params: Option<&PyAny>) -> PyResult<Vec<Value>> {
    let Some(p) = params else {
        return Ok(Vec::new());
    };
    if p.is_none() {
        return Ok(Vec::new());
    }
    if let Ok(t) = p.downcast::<PyTuple>() {
        return t.iter().enumerate().map(|(i, v)| value_of(v, i)).collect();
    }
    if let Ok(l) = p.downcast::<PyList>() {
        return l.iter().enumerate().map(|(i, v)| value_of(v, i)).collect();
    }
    Err(PyTypeError::new_err(
        "parameters must be a tuple or a list (named parameters are not supported)",
    ))
}

pub(crate) fn row_to_py(py: Python<'_>, row: Vec<Value>) -> PyObject {
    let items: Vec<PyObject> = row
        .into_iter()
        .map(|v| match v {
            Value::Null => py.None(),
            Value::Integer(i) => i.into_py(py),
            Value::Real(f) => f.into_py(py),
            Value::Text(s) => s.into_py(py),
            Value::Blob(b) => PyBytes::new(py, &b).into_py(py),
        })
        .collect();
    PyTuple::new(py, items).into_py(py)
}

/// The SQL after the first statement, if anything but whitespace follows
/// it. rusqlite would silently ignore it; `sqlite3` refuses such text, and
/// so does this connection.
fn has_tail(conn: &Connection, sql: &str) -> Result<bool, Failure> {
    let text = std::ffi::CString::new(sql).map_err(|_| {
        Failure::Sqlite(rusqlite::Error::SqliteFailure(
            ffi::Error::new(ffi::SQLITE_MISUSE),
            Some("the statement contains a NUL character".into()),
        ))
    })?;
    let mut stmt = std::ptr::null_mut();
    let mut tail = std::ptr::null();
    // SAFETY: the handle belongs to `conn`, which we hold; the statement is
    // finalised before returning, and `tail` points into `text`.
    let rc =
        unsafe { ffi::sqlite3_prepare_v2(conn.handle(), text.as_ptr(), -1, &mut stmt, &mut tail) };
    let rest = if rc == ffi::SQLITE_OK && !tail.is_null() {
        // SAFETY: sqlite3 sets `tail` to a position inside `text`.
        let offset = unsafe { tail.offset_from(text.as_ptr()) };
        usize::try_from(offset).ok().and_then(|o| sql.get(o..))
    } else {
        None
    };
    // SAFETY: finalising a null statement is a no-op.
    unsafe { ffi::sqlite3_finalize(stmt) };
    if rc != ffi::SQLITE_OK {
        // let the real prepare report the error
        return Ok(false);
    }
    Ok(rest.map(|r| !r.trim().is_empty()).unwrap_or(false))
}

/// The prepared (cached) statement for `sql`, refused if the text holds a
/// second statement; texts already checked are remembered in `checked`.
pub(crate) fn prepare<'c>(
    conn: &'c Connection,
    checked: &mut HashSet<String>,
    sql: &str,
) -> Result<rusqlite::CachedStatement<'c>, Failure> {
    if !checked.contains(sql) {
        if has_tail(conn, sql)? {
            return Err(Failure::Sqlite(rusqlite::Error::MultipleStatement));
        }
        if checked.len() < 4 * STATEMENT_CACHE {
            checked.insert(sql.to_owned());
        }
    }
    Ok(conn.prepare_cached(sql)?)
}

/// Run one statement per parameter set; return the rows of the last one.
pub(crate) fn run(
    conn: &Connection,
    checked: &mut HashSet<String>,
    sql: &str,
    sets: &[Vec<Value>],
    want_rows: bool,
) -> Result<Vec<Vec<Value>>, Failure> {
    let mut stmt = prepare(conn, checked, sql)?;
    let columns = stmt.column_count();
    let mut out = Vec::new();
    let last = sets.len().saturating_sub(1);
    for (n, params) in sets.iter().enumerate() {
        let mut rows = stmt.query(rusqlite::params_from_iter(params.iter()))?;
        while let Some(row) = rows.next()? {
            if want_rows && n == last {
                let mut r = Vec::with_capacity(columns);
                for i in 0..columns {
                    r.push(row.get::<_, Value>(i)?);
                }
                out.push(r);
            }
        }
    }
    Ok(out)
}

/// Insert the `chosen` accepted items of a validated batch with `sql` (see
/// `SqliteConnection.insert_validated`). With `runs_sql`, each stretch of
/// consecutive items of one attacker is announced first: `runs_sql` runs
/// with (the stretch's length, its attacker, the attacker's identity) and
/// records the seq range the stretch's rows are about to take. Rows not
/// `merged` are stretches of one (merging one gives its run its identity).
#[allow(clippy::too_many_arguments)]
pub(crate) fn insert_rows(
    c: &Connection,
    k: &mut HashSet<String>,
    sql: &str,
    runs_sql: Option<&str>,
    valid: &[Valid],
    ids: &IdentityMap,
    chosen: &[usize],
    merged: bool,
) -> Result<usize, Failure> {
    let mut stmt = prepare(c, k, sql)?;
    let mut runs = match runs_sql {
        Some(q) => Some(prepare(c, k, q)?),
        None => None,
    };
    let mut start = 0;
    while start < chosen.len() {
        let attacker = &valid[chosen[start]].attacker_uuid;
        let end = if merged {
            chosen[start..]
                .iter()
                .position(|&i| valid[i].attacker_uuid != *attacker)
                .map_or(chosen.len(), |n| start + n)
        } else {
            start + 1
        };
        let identity = ids.get(attacker);
        if let Some(runs) = runs.as_mut() {
            runs.execute(rusqlite::params![(end - start) as i64, attacker, identity])?;
        }
        for &i in &chosen[start..end] {
            let row = valid[i].columns(identity.map(String::as_str), merged);
            stmt.execute(rusqlite::params_from_iter(row.iter().map(Bound)))?;
        }
        start = end;
    }
    Ok(chosen.len())
}

/// An observation row's column as SQLite binds it (`merged` as 0/1).
struct Bound<'a>(&'a Column<'a>);

impl rusqlite::ToSql for Bound<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(match *self.0 {
            Column::Text(Some(t)) => ToSqlOutput::Borrowed(ValueRef::Text(t.as_bytes())),
            Column::Text(None) | Column::Real(None) => ToSqlOutput::Owned(Value::Null),
            Column::Real(Some(x)) => ToSqlOutput::Owned(Value::Real(x)),
            Column::Int(i) => ToSqlOutput::Owned(Value::Integer(i64::from(i))),
            Column::Flag(b) => ToSqlOutput::Owned(Value::Integer(i64::from(b))),
        })
    }
}

/// Open (creating if needed) the database file at `path`, in autocommit
/// mode, with `busy_timeout` set to `timeout` seconds (without the GIL).
/// Turns SQLite's memory statistics off for the process, if SQLite has not
/// started yet (returns whether it took). With them on, every allocation
/// SQLite makes takes one process-wide mutex to count itself; the writer
/// thread allocates for every row it binds and every page it touches, and
/// the statistics are read by nothing here (measured on the writer's SQL
/// alone, 100k observations, five alternations: 7.9 -> 6.7 us an
/// observation). `SQLITE_CONFIG_MEMSTATUS` is refused once SQLite is
/// initialised (by any connection, or by importing Python's `sqlite3`),
/// so the package calls this when `_core` is imported.
pub(crate) fn quiet_memory_statistics() -> bool {
    // SAFETY: sqlite3_config is safe to call before sqlite3_initialize and
    // returns SQLITE_MISUSE (changing nothing) after it.
    unsafe {
        ffi::sqlite3_config(ffi::SQLITE_CONFIG_MEMSTATUS, 0 as std::os::raw::c_int)
            == ffi::SQLITE_OK
    }
}

pub(crate) fn open(py: Python<'_>, path: &str, timeout: f64) -> PyResult<Connection> {
    py.allow_threads(|| -> Result<Connection, Failure> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let c = Connection::open_with_flags(path, flags)?;
        c.busy_timeout(std::time::Duration::from_secs_f64(
            timeout.clamp(0.0, 3600.0),
        ))?;
        c.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        Ok(c)
    })
    .map_err(|e| to_py(py, e))
}

impl PySqlite {
    fn with_conn<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&Connection, &mut HashSet<String>) -> Result<T, Failure> + Send,
    ) -> PyResult<T> {
        py.allow_threads(|| {
            let mut guard = self.conn.lock();
            match guard.as_mut() {
                Some(o) => f(&o.conn, &mut o.checked),
                None => Err(Failure::Closed),
            }
        })
        .map_err(|e| to_py(py, e))
    }
}

#[pymethods]
impl PySqlite {
    /// Open (creating if needed) the database file at `path`, in autocommit
    /// mode, with `busy_timeout` set to `timeout` seconds.
    #[new]
    #[args(path, timeout = "30.0")]
    fn new(py: Python<'_>, path: String, timeout: f64) -> PyResult<Self> {
        let conn = open(py, &path, timeout)?;
        Ok(PySqlite {
            conn: Mutex::new(Some(Open {
                conn,
                checked: HashSet::new(),
            })),
            path,
        })
    }

    /// Run one statement; return its rows as a list of tuples (empty for a
    /// statement that returns none).
    #[args(sql, params = "None")]
    fn execute(&self, py: Python<'_>, sql: &str, params: Option<&PyAny>) -> PyResult<PyObject> {
        let set = vec![params_of(params)?];
        let rows = self.with_conn(py, |c, k| run(c, k, sql, &set, true))?;
        let list: Vec<PyObject> = rows.into_iter().map(|r| row_to_py(py, r)).collect();
        Ok(PyList::new(py, list).into_py(py))
    }

    /// Run one statement once per parameter set (any iterable of tuples or
    /// lists). All parameters are converted before the first statement runs.
    fn executemany(&self, py: Python<'_>, sql: &str, seq: &PyAny) -> PyResult<()> {
        let mut sets = Vec::new();
        for item in seq.iter()? {
            sets.push(params_of(Some(item?))?);
        }
        if sets.is_empty() {
            return Ok(());
        }
        self.with_conn(py, |c, k| run(c, k, sql, &sets, false).map(|_| ()))
    }

    /// `executemany` for writes that also reports, per parameter set, how
    /// many rows it changed (0 for an `INSERT … ON CONFLICT DO NOTHING` that
    /// conflicted). The statement must not return rows.
    fn executemany_changes(&self, py: Python<'_>, sql: &str, seq: &PyAny) -> PyResult<Vec<usize>> {
        let mut sets = Vec::new();
        for item in seq.iter()? {
            sets.push(params_of(Some(item?))?);
        }
        if sets.is_empty() {
            return Ok(Vec::new());
        }
        self.with_conn(py, |c, k| {
            let mut stmt = prepare(c, k, sql)?;
            let mut out = Vec::with_capacity(sets.len());
            for params in &sets {
                out.push(stmt.execute(rusqlite::params_from_iter(params.iter()))?);
            }
            Ok(out)
        })
    }

    /// Insert the selected accepted items of a `ValidatedBatch` with `sql`
    /// (14 parameters in the observations table's column order, see
    /// `ValidatedBatch.rows`), binding straight from the batch: no Python
    /// object per row. `identity_of` maps attacker → identity.
    #[args(
        sql,
        batch,
        identity_of = "None",
        select = "None",
        merged = "true",
        runs_sql = "None"
    )]
    #[allow(clippy::too_many_arguments)]
    fn insert_validated(
        &self,
        py: Python<'_>,
        sql: &str,
        batch: PyRef<'_, PyValidated>,
        identity_of: Option<&pyo3::types::PyDict>,
        select: Option<Vec<usize>>,
        merged: bool,
        runs_sql: Option<&str>,
    ) -> PyResult<usize> {
        let ids = identity_map(identity_of)?;
        let valid = batch.valid.clone();
        let chosen: Vec<usize> = match select {
            Some(sel) => {
                if let Some(bad) = sel.iter().find(|&&i| i >= valid.len()) {
                    return Err(pyo3::exceptions::PyIndexError::new_err(format!(
                        "no accepted item at position {bad}"
                    )));
                }
                sel
            }
            None => (0..valid.len()).collect(),
        };
        if chosen.is_empty() {
            return Ok(0);
        }
        self.with_conn(py, move |c, k| {
            insert_rows(c, k, sql, runs_sql, &valid, &ids, &chosen, merged)
        })
    }

    /// True while a transaction is open.
    #[getter]
    fn in_transaction(&self) -> bool {
        self.conn
            .lock()
            .as_ref()
            .map(|o| !o.conn.is_autocommit())
            .unwrap_or(false)
    }

    #[getter]
    fn path(&self) -> &str {
        &self.path
    }

    /// Close the connection (statements still cached are finalised first).
    /// Closing twice is harmless.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let taken = self.conn.lock().take();
        if let Some(o) = taken {
            py.allow_threads(move || o.conn.close().map_err(|(_, e)| Failure::Sqlite(e)))
                .map_err(|e| to_py(py, e))?;
        }
        Ok(())
    }
}
