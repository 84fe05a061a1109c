//! `SqliteWriter`: a SQLite connection driven by a thread of its own that
//! never takes the GIL.
//!
//! `SqliteConnection` releases the GIL while its statements run, but a
//! Python thread calling it still needs the GIL before and after every call
//! (to take the next job, to convert the parameters, to hand the result
//! back). While the event loop runs Python, such a thread waits for the GIL
//! up to a whole switch interval each time: with a dozen calls per batch,
//! the writer spends about as long waiting as writing. Here the caller
//! converts the parameters (it holds the GIL anyway) and queues a job; the
//! writer thread runs the jobs in order, keeps the results, and writes one
//! byte to a pipe the event loop watches; the loop collects the results
//! (`take`). Only jobs someone waits for have a result.
//!
//! Transactions are numbered (`number`) and every job carries the number
//! of the transaction it belongs to. A job nobody waits for (a deferred
//! write) that fails, or a failed COMMIT, rolls its transaction back at
//! once and *dooms* it and every later transaction: their jobs are refused
//! (the failed transaction with its own error, later ones with
//! `StoreConflict`, since they were built on its outcome) until the caller
//! has dealt with the failure (`settle`). So a transaction never commits
//! without one of its writes, nor on top of one that did not commit.

use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::mem::ManuallyDrop;
use std::os::unix::io::FromRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use rusqlite::types::Value;
use rusqlite::Connection;

use super::engine::{key_pairs, PyEngine};
use super::sqlite::{
    describe, insert_rows, open, params_of, prepare, raise_as, row_to_py, run, Failure,
};
use super::states::PyStateWrite;
use super::validate::{identity_map, IdentityMap, PyValidated};
use crate::core::validate::Valid;

/// An error as it will be raised in Python: `module.class(message)`, with
/// the SQLite extended code when there is one. Plain data: it crosses
/// threads and is raised as often as it is asked for.
#[derive(Clone, Debug)]
struct Raised {
    module: &'static str,
    class: &'static str,
    message: String,
    code: Option<i32>,
}

impl From<Failure> for Raised {
    fn from(f: Failure) -> Self {
        let (class, message, code) = describe(f);
        Raised {
            module: "sqlite3",
            class,
            message,
            code,
        }
    }
}

impl From<rusqlite::Error> for Raised {
    fn from(e: rusqlite::Error) -> Self {
        Raised::from(Failure::Sqlite(e))
    }
}

fn conflict(message: String) -> Raised {
    Raised {
        module: "decnet_attr.store.errors",
        class: "StoreConflict",
        message,
        code: None,
    }
}

/// The first doomed transaction, the first one not doomed (None while
/// open-ended) and the error that doomed them.
type Doom = Option<(u64, Option<u64>, Raised)>;

fn refusal(doom: &Doom, seq: u64) -> Option<Raised> {
    let (first, end, err) = doom.as_ref()?;
    if seq < *first || end.is_some_and(|e| seq >= e) {
        return None;
    }
    if seq == *first {
        return Some(err.clone());
    }
    Some(conflict(format!(
        "an earlier transaction on this writer failed: {}",
        err.message
    )))
}

enum Kind {
    /// One statement per parameter set; the rows of the last one.
    Exec {
        sql: String,
        sets: Vec<Vec<Value>>,
        /// Each set must change exactly one row (a compare-and-set): else
        /// the transaction fails with `StoreConflict` naming this.
        expect_one: Option<String>,
    },
    Insert {
        sql: String,
        runs_sql: Option<String>,
        valid: Arc<Vec<Valid>>,
        ids: IdentityMap,
        chosen: Vec<usize>,
    },
    Begin,
    Commit,
    /// Roll back transaction `seq` if it is the open one (any open one:
    /// `all`).
    Rollback {
        all: bool,
    },
    Close,
}

struct Job {
    /// Who waits for the result (None: a deferred write).
    ticket: Option<u64>,
    seq: u64,
    kind: Kind,
}

type Outcome = Result<Vec<Vec<Value>>, Raised>;

struct Shared {
    doom: Mutex<Doom>,
    results: Mutex<Vec<(u64, Outcome)>>,
    /// The write end of the caller's pipe: one byte per result.
    notify: ManuallyDrop<File>,
}

struct Thread {
    conn: Connection,
    checked: HashSet<String>,
    /// The transaction whose BEGIN ran (0: none).
    open: u64,
    shared: Arc<Shared>,
}

impl Thread {
    fn fail(&mut self, seq: u64, err: Raised) {
        {
            let mut doom = self.shared.doom.lock();
            if refusal(&doom, seq).is_none() {
                *doom = Some((seq, None, err));
            }
        }
        if self.open != 0 {
            self.open = 0;
            // SQLite may have rolled back already: nothing to report
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }

    fn exec(&mut self, sql: &str, sets: &[Vec<Value>], expect_one: &Option<String>) -> Outcome {
        match expect_one {
            None => run(&self.conn, &mut self.checked, sql, sets, true).map_err(Raised::from),
            Some(what) => {
                let mut stmt = prepare(&self.conn, &mut self.checked, sql)?;
                for params in sets {
                    if stmt.execute(rusqlite::params_from_iter(params.iter()))? != 1 {
                        return Err(conflict(format!("{what} changed meanwhile")));
                    }
                }
                Ok(Vec::new())
            }
        }
    }

    /// Run one job; its outcome (for whoever waits), and whether to stop.
    fn job(&mut self, job: Job) -> (Outcome, bool) {
        let seq = job.seq;
        let deferred = job.ticket.is_none();
        let refused = refusal(&self.shared.doom.lock(), seq);
        if let Kind::Rollback { all } = job.kind {
            // a rollback is never refused: it undoes, it does not write
            if all || self.open == seq {
                self.open = 0;
                let out = self.conn.execute_batch("ROLLBACK").map(|_| Vec::new());
                return (out.map_err(Raised::from), false);
            }
            return (Ok(Vec::new()), false);
        }
        if let Kind::Close = job.kind {
            return (Ok(Vec::new()), true);
        }
        if let Some(err) = refused {
            return (Err(err), false);
        }
        let out = match &job.kind {
            Kind::Exec {
                sql,
                sets,
                expect_one,
            } => self.exec(sql, sets, expect_one),
            Kind::Insert {
                sql,
                runs_sql,
                valid,
                ids,
                chosen,
            } => insert_rows(
                &self.conn,
                &mut self.checked,
                sql,
                runs_sql.as_deref(),
                valid,
                ids,
                chosen,
                true,
            )
            .map(|_| Vec::new())
            .map_err(Raised::from),
            Kind::Begin => {
                let out = self.conn.execute_batch("BEGIN IMMEDIATE");
                if out.is_ok() {
                    self.open = seq;
                }
                out.map(|_| Vec::new()).map_err(Raised::from)
            }
            Kind::Commit => {
                let out = self.conn.execute_batch("COMMIT");
                match out {
                    Ok(()) => {
                        self.open = 0;
                        Ok(Vec::new())
                    }
                    Err(e) => {
                        let err = Raised::from(e);
                        self.fail(seq, err.clone());
                        Err(err)
                    }
                }
            }
            Kind::Rollback { .. } | Kind::Close => unreachable!(),
        };
        if deferred {
            if let Err(err) = &out {
                self.fail(seq, err.clone());
            }
        }
        (out, false)
    }

    fn serve(mut self, jobs: Receiver<Job>) {
        while let Ok(job) = jobs.recv() {
            let ticket = job.ticket;
            let (out, stop) = self.job(job);
            if let Some(t) = ticket {
                self.shared.results.lock().push((t, out));
                // the loop may be slow to read: a full pipe only delays the
                // byte, the result is already queued
                let _ = (&*self.shared.notify).write(&[1u8]);
            }
            if stop {
                break;
            }
        }
        // the connection closes with `self`
    }
}

#[pyclass(name = "SqliteWriter", module = "decnet_attr._core")]
pub struct PyWriter {
    jobs: Mutex<Option<Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    shared: Arc<Shared>,
    seq: AtomicU64,
    tickets: AtomicU64,
    path: String,
}

impl PyWriter {
    fn send(&self, ticket: Option<u64>, seq: u64, kind: Kind) -> PyResult<()> {
        let guard = self.jobs.lock();
        let Some(tx) = guard.as_ref() else {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "no active connection",
            ));
        };
        tx.send(Job { ticket, seq, kind })
            .map_err(|_| pyo3::exceptions::PyValueError::new_err("no active connection"))
    }

    /// Queue `sql` once per parameter set as a deferred write of `seq`
    /// (nothing when there is no set).
    fn defer_sets(&self, seq: u64, sql: String, sets: Vec<Vec<Value>>) -> PyResult<()> {
        if sets.is_empty() {
            return Ok(());
        }
        let expect_one = None;
        self.send(
            None,
            seq,
            Kind::Exec {
                sql,
                sets,
                expect_one,
            },
        )
    }

    fn ticket(&self) -> u64 {
        self.tickets.fetch_add(1, Ordering::Relaxed) + 1
    }
}

#[pymethods]
impl PyWriter {
    /// Open (creating if needed) the database file at `path` (autocommit,
    /// `busy_timeout` of `timeout` seconds) and start the writer thread. It
    /// writes one byte to the file descriptor `notify` (the write end of a
    /// pipe, which stays the caller's to close) per result to `take`.
    #[new]
    #[args(path, notify, timeout = "30.0")]
    fn new(py: Python<'_>, path: String, notify: i32, timeout: f64) -> PyResult<Self> {
        let conn = open(py, &path, timeout)?;
        // SAFETY: the caller keeps `notify` open while this writer lives
        // (ManuallyDrop: never closed here).
        let file = ManuallyDrop::new(unsafe { File::from_raw_fd(notify) });
        let shared = Arc::new(Shared {
            doom: Mutex::new(None),
            results: Mutex::new(Vec::new()),
            notify: file,
        });
        let (tx, rx) = channel();
        let state = Thread {
            conn,
            checked: HashSet::new(),
            open: 0,
            shared: shared.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || state.serve(rx))
            .map_err(|e| pyo3::exceptions::PyOSError::new_err(e.to_string()))?;
        Ok(PyWriter {
            jobs: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(handle)),
            shared,
            seq: AtomicU64::new(0),
            tickets: AtomicU64::new(0),
            path,
        })
    }

    /// The number of a new transaction: later jobs belong to it.
    fn number(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The number later jobs carry.
    #[getter]
    fn current(&self) -> u64 {
        self.seq.load(Ordering::SeqCst)
    }

    /// The failure that doomed transaction `seq` is dealt with: jobs from
    /// now on (in a transaction or not) run again. False if there was
    /// nothing to settle.
    fn settle(&self, seq: u64) -> bool {
        let mut doom = self.shared.doom.lock();
        if let Some((first, None, err)) = doom.as_ref() {
            if *first <= seq {
                let end = self.number();
                *doom = Some((*first, Some(end), err.clone()));
                return true;
            }
        }
        false
    }

    /// Queue `sql` once per parameter set (any iterable of tuples or lists;
    /// None: once, without parameters), in transaction `seq`. Returns the
    /// ticket of its result (the rows of the last run), or None when
    /// `wait` is false: a deferred write, which dooms its transaction if it
    /// fails. `expect_one`: each set must change exactly one row.
    #[args(seq, sql, sets, wait, expect_one = "None")]
    fn execute(
        &self,
        seq: u64,
        sql: String,
        sets: Option<&PyAny>,
        wait: bool,
        expect_one: Option<String>,
    ) -> PyResult<Option<u64>> {
        let mut converted = Vec::new();
        match sets {
            None => converted.push(Vec::new()),
            Some(items) => {
                for item in items.iter()? {
                    converted.push(params_of(Some(item?))?);
                }
            }
        }
        if converted.is_empty() && !wait {
            return Ok(None);
        }
        let ticket = wait.then(|| self.ticket());
        self.send(
            ticket,
            seq,
            Kind::Exec {
                sql,
                sets: converted,
                expect_one,
            },
        )?;
        Ok(ticket)
    }

    /// Queue the insert of the selected accepted items of a batch (see
    /// `SqliteConnection.insert_validated`) as a deferred write of `seq`.
    #[args(seq, sql, batch, identity_of, select, runs_sql = "None")]
    fn insert_validated(
        &self,
        seq: u64,
        sql: String,
        batch: PyRef<'_, PyValidated>,
        identity_of: Option<&PyDict>,
        select: Option<Vec<usize>>,
        runs_sql: Option<String>,
    ) -> PyResult<()> {
        let ids = identity_map(identity_of)?;
        let chosen = batch.positions(select)?;
        if chosen.is_empty() {
            return Ok(());
        }
        let valid = batch.valid.clone();
        self.send(
            None,
            seq,
            Kind::Insert {
                sql,
                runs_sql,
                valid,
                ids,
                chosen,
            },
        )
    }

    /// Queue the state rows of a batch (see `StateWrite`) as deferred
    /// writes of `seq`: `update_sql` for the rows written before, then
    /// `insert_sql` for the new ones, each bound as `StateWrite.params`
    /// gives them. With `same_sql`, the rows written before whose state
    /// stays go to it instead (bound as `update_sql`'s).
    #[args(seq, update_sql, insert_sql, states, same_sql = "None")]
    fn execute_states(
        &self,
        seq: u64,
        update_sql: String,
        insert_sql: String,
        states: PyRef<'_, PyStateWrite>,
        same_sql: Option<String>,
    ) -> PyResult<()> {
        let (updates, same, inserts) = states.sql_sets(same_sql.is_some());
        let same_sql = same_sql.unwrap_or_default();
        for (sql, sets) in [
            (update_sql, updates),
            (same_sql, same),
            (insert_sql, inserts),
        ] {
            self.defer_sets(seq, sql, sets)?;
        }
        Ok(())
    }

    /// Queue the retained windows of `keys` (taken from `engine` now) as
    /// a deferred write of `seq`: `sql` once per key the engine holds,
    /// bound with (its window's JSON, `window_seq`, identity, primitive).
    /// The windows go from the engine to the writer without a Python
    /// string each. Returns how many keys had a window.
    fn execute_windows(
        &self,
        seq: u64,
        sql: String,
        engine: PyRef<'_, PyEngine>,
        keys: &PyAny,
        window_seq: Option<i64>,
    ) -> PyResult<usize> {
        let keys = key_pairs(keys)?;
        let covered = window_seq.map_or(Value::Null, Value::Integer);
        let sets: Vec<Vec<Value>> = {
            let eng = engine.inner.lock();
            keys.into_iter()
                .filter_map(|(i, p)| {
                    let w = eng.export(&i, &p)?;
                    Some(vec![
                        Value::Text(w),
                        covered.clone(),
                        Value::Text(i),
                        Value::Text(p),
                    ])
                })
                .collect()
        };
        let n = sets.len();
        self.defer_sets(seq, sql, sets)?;
        Ok(n)
    }

    /// Queue `BEGIN IMMEDIATE` of transaction `seq`; its ticket, or None
    /// (not `wait`: if it fails, the transaction is doomed).
    fn begin(&self, seq: u64, wait: bool) -> PyResult<Option<u64>> {
        let ticket = wait.then(|| self.ticket());
        self.send(ticket, seq, Kind::Begin)?;
        Ok(ticket)
    }

    /// Queue the COMMIT of transaction `seq`; its ticket.
    fn commit(&self, seq: u64) -> PyResult<u64> {
        let ticket = self.ticket();
        self.send(Some(ticket), seq, Kind::Commit)?;
        Ok(ticket)
    }

    /// Queue a ROLLBACK of transaction `seq` if it is still open (None:
    /// whatever is open); its ticket.
    fn rollback(&self, seq: Option<u64>) -> PyResult<u64> {
        let ticket = self.ticket();
        self.send(
            Some(ticket),
            seq.unwrap_or(0),
            Kind::Rollback { all: seq.is_none() },
        )?;
        Ok(ticket)
    }

    /// The results ready: `(ticket, rows, None)` or `(ticket, None, error)`.
    fn take(&self, py: Python<'_>) -> PyObject {
        let ready: Vec<(u64, Outcome)> = std::mem::take(&mut *self.shared.results.lock());
        let items: Vec<PyObject> = ready
            .into_iter()
            .map(|(ticket, out)| match out {
                Ok(rows) => {
                    let list: Vec<PyObject> = rows.into_iter().map(|r| row_to_py(py, r)).collect();
                    (ticket, PyList::new(py, list), py.None()).into_py(py)
                }
                Err(r) => {
                    let err = raise_as(py, r.module, r.class, r.message, r.code);
                    (ticket, py.None(), err.into_value(py)).into_py(py)
                }
            })
            .collect();
        PyList::new(py, items).into_py(py)
    }

    /// Stop the thread once the jobs queued before have run, and close the
    /// connection; returns the ticket of the close. Closing twice is
    /// harmless (None the second time).
    fn close(&self) -> PyResult<Option<u64>> {
        let Some(tx) = self.jobs.lock().take() else {
            return Ok(None);
        };
        let ticket = self.ticket();
        let sent = tx.send(Job {
            ticket: Some(ticket),
            seq: 0,
            kind: Kind::Close,
        });
        Ok(sent.ok().map(|_| ticket))
    }

    /// Wait for the thread to end (after `close`).
    fn join(&self, py: Python<'_>) {
        let handle = self.thread.lock().take();
        if let Some(h) = handle {
            py.allow_threads(move || {
                let _ = h.join();
            });
        }
    }

    #[getter]
    fn path(&self) -> &str {
        &self.path
    }
}

impl Drop for PyWriter {
    fn drop(&mut self) {
        // the thread ends once the jobs queued have run (it never takes the
        // GIL, so waiting here cannot deadlock); after that nobody writes to
        // the caller's pipe
        self.jobs.lock().take();
        if let Some(h) = self.thread.lock().take() {
            let _ = h.join();
        }
    }
}
