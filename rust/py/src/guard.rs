//! `keylane._native.GuardCore`: the memory of an App's stale-version and
//! duplicate-id checks (keylane-core's `guard`), driven by
//! `keylane._guard.Guard`. A batch is prepared on the event loop's thread
//! (names and versions taken from the tickets once), read ahead in a worker
//! thread, then each ticket is checked and recorded with one call.

use keylane_core::guard::{Checked, Guard, Reads, Verdict};
use keylane_core::versions::MAX_VERSION;
use pyo3::exceptions::PyBaseException;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyInt, PyList, PyString};

use crate::args::key_bytes;
use crate::errors::{Result, invalid_argument};
use crate::ticket::Ticket;
use crate::version_table::{VersionTable, ttl_arg};

/// `check`'s answers.
const RUN: u8 = 0;
const STALE: u8 = 1;
const DUPLICATE: u8 = 2;
/// `version_of`/`id_of` failed or returned something unusable: `problem`
/// says what.
const POISON: u8 = 3;
/// The ticket was not prepared (`prepare` it, then check again).
const UNPREPARED: u8 = 4;

/// What `prepare` found must be read from the table; give it to `read`.
#[pyclass(module = "keylane._native", frozen, name = "GuardReads")]
pub(crate) struct GuardReads {
    reads: Reads,
}

#[pyclass(module = "keylane._native", frozen, name = "GuardCore")]
pub(crate) struct GuardCore {
    table: Py<VersionTable>,
    guard: Guard,
}

fn describe(obj: &Bound<'_, PyAny>) -> String {
    let text = obj.repr().map(|r| r.to_string()).unwrap_or_else(|_| "<unprintable>".to_owned());
    text.chars().take(80).collect()
}

/// A `version_of` result: None, an int from 0 to 2**63-1 (not a bool), or
/// the exception it raised (already described by the caller).
fn version_of(obj: &Bound<'_, PyAny>) -> Result<Option<u64>, String> {
    if obj.is_none() {
        return Ok(None);
    }
    if obj.is_instance_of::<PyBaseException>() {
        return Err(obj.str().map(|s| s.to_string()).unwrap_or_default());
    }
    if obj.is_instance_of::<PyInt>()
        && !obj.is_instance_of::<PyBool>()
        && let Ok(v) = obj.extract::<u64>()
        && v <= MAX_VERSION
    {
        return Ok(Some(v));
    }
    Err(format!("version_of returned {}; versions are ints from 0 to 2**63-1", describe(obj)))
}

/// An `id_of` result: None, non-empty bytes, or str (as UTF-8).
fn id_of(obj: &Bound<'_, PyAny>) -> Result<Option<Vec<u8>>, String> {
    if obj.is_none() {
        return Ok(None);
    }
    if obj.is_instance_of::<PyBaseException>() {
        return Err(obj.str().map(|s| s.to_string()).unwrap_or_default());
    }
    if let Ok(b) = obj.cast::<PyBytes>()
        && !b.as_bytes().is_empty()
    {
        return Ok(Some(b.as_bytes().to_vec()));
    }
    if let Ok(s) = obj.cast::<PyString>()
        && !s.is_empty().unwrap_or(true)
    {
        return match s.to_str() {
            Ok(text) => Ok(Some(text.as_bytes().to_vec())),
            Err(e) => Err(format!("id_of returned a str that is not valid text: {e}")),
        };
    }
    Err(format!("id_of returned {}; ids are non-empty bytes or str (or None)", describe(obj)))
}

impl GuardCore {
    fn prepared<'a>(&self, ticket: &'a Bound<'_, PyAny>) -> Result<Option<&'a Result<Checked, String>>> {
        Ok(Ticket::cast(ticket)?.get().checked.get())
    }
}

#[pymethods]
impl GuardCore {
    #[new]
    fn new(table: Py<VersionTable>) -> Self {
        GuardCore { table, guard: Guard::new() }
    }

    /// Takes each ticket's key, version (``versions[i]``: what version_of
    /// returned or raised, None for none) and id (``ids[i]``, or None for
    /// all), once; returns what must be read from the table before their
    /// checks, or None. A ticket prepared before keeps what it had.
    #[pyo3(signature = (tickets, versions, ids = None))]
    fn prepare(
        &self,
        tickets: &Bound<'_, PyList>,
        versions: &Bound<'_, PyList>,
        ids: Option<&Bound<'_, PyList>>,
    ) -> Result<Option<GuardReads>> {
        if versions.len() != tickets.len() || ids.is_some_and(|i| i.len() != tickets.len()) {
            return Err(invalid_argument("prepare needs one version (and one id) per ticket"));
        }
        let held: Vec<Bound<'_, PyAny>> = tickets.iter().collect();
        let mut batch = Vec::with_capacity(held.len());
        for (i, obj) in held.iter().enumerate() {
            let ticket = Ticket::cast(obj)?.get();
            let checked = ticket.checked.get_or_init(|| {
                let id = match ids {
                    Some(ids) => id_of(&ids.get_item(i).expect("length checked"))?,
                    None => None,
                };
                let version = version_of(&versions.get_item(i).expect("length checked"))?;
                let key = ticket.key.bind(tickets.py());
                let key = if key.is_none() { None } else { key_bytes(key).ok() };
                Ok(Checked::new(key.as_deref(), version, id.as_deref()))
            });
            if let Ok(c) = checked {
                batch.push(c);
            }
        }
        let reads = self.guard.plan(batch);
        Ok((!reads.is_empty()).then_some(GuardReads { reads }))
    }

    /// Reads what ``prepare`` asked for, with the GIL released; it waits
    /// for the table's lock, so call it from a worker thread.
    fn read(&self, py: Python<'_>, reads: &Bound<'_, GuardReads>) -> Result<()> {
        let table = self.table.bind(py).get();
        let now = table.now_ms(py)?;
        let core = table.open()?;
        let reads = &reads.get().reads;
        Ok(py.detach(|| self.guard.read(&core, reads, now))?)
    }

    /// 0 run, 1 stale, 2 duplicate, 3 poison (see ``problem``), 4 not
    /// prepared. Looks the table up in place for what was not read ahead.
    fn check(&self, py: Python<'_>, ticket: &Bound<'_, PyAny>) -> Result<u8> {
        let Some(prepared) = self.prepared(ticket)? else { return Ok(UNPREPARED) };
        let Ok(checked) = prepared else { return Ok(POISON) };
        let table = self.table.bind(py).get();
        let core = table.open()?;
        let mut now = Ok(0);
        let verdict = self.guard.check(&core, checked, || {
            now = table.now_ms(py);
            *now.as_ref().unwrap_or(&0)
        });
        now?;
        Ok(match verdict? {
            Verdict::Run => RUN,
            Verdict::Stale => STALE,
            Verdict::Duplicate => DUPLICATE,
        })
    }

    /// Why a ticket's check answered 3.
    fn problem(&self, ticket: &Bound<'_, PyAny>) -> Result<Option<String>> {
        Ok(self.prepared(ticket)?.and_then(|p| p.as_ref().err().cloned()))
    }

    /// Records what the ticket's handler applied; returns how many versions
    /// or ids are recorded and not yet being written.
    fn applied(&self, ticket: &Bound<'_, PyAny>) -> Result<usize> {
        match self.prepared(ticket)? {
            Some(Ok(checked)) => Ok(self.guard.applied(checked)),
            _ => Ok(self.guard.recorded()),
        }
    }

    /// How many checks read the table on the calling thread, nothing
    /// having been read ahead for them.
    #[getter]
    fn looked_up_in_place(&self) -> u64 {
        self.guard.looked_up_in_place()
    }

    /// How many versions or ids are recorded and not yet being written.
    #[getter]
    fn recorded(&self) -> usize {
        self.guard.recorded()
    }

    /// Writes what is recorded (ids with ``ttl_s``), the GIL released; on
    /// failure it stays recorded. One call at a time.
    #[pyo3(signature = (*, ttl_s = None))]
    fn write(&self, py: Python<'_>, ttl_s: Option<&Bound<'_, PyAny>>) -> Result<()> {
        let ttl = ttl_arg(ttl_s)?;
        let table = self.table.bind(py).get();
        let now = table.now_ms(py)?;
        let core = table.open()?;
        Ok(py.detach(|| self.guard.write(&core, ttl, now))?)
    }

    /// Writes one ticket's version and id now, the GIL released.
    #[pyo3(signature = (ticket, *, ttl_s = None))]
    fn write_one(
        &self,
        py: Python<'_>,
        ticket: &Bound<'_, PyAny>,
        ttl_s: Option<&Bound<'_, PyAny>>,
    ) -> Result<()> {
        let Some(Ok(checked)) = self.prepared(ticket)? else { return Ok(()) };
        let ttl = ttl_arg(ttl_s)?;
        let table = self.table.bind(py).get();
        let now = table.now_ms(py)?;
        let core = table.open()?;
        Ok(py.detach(|| self.guard.write_one(&core, checked, ttl, now))?)
    }

    /// Forgets what was read ahead and which versions this process wrote:
    /// call it whenever the assignment changes. What is forgotten is freed in a thread of its own: this is called on
    /// the event loop's thread, and freeing 100,000s of names takes
    /// milliseconds.
    fn forget(&self) {
        drop_elsewhere(self.guard.forget());
    }
}

impl Drop for GuardCore {
    /// Frees the checks' memory with the GIL released (its maps hold up to
    /// 262,144 names: 10-20 ms to free), so the event loop's thread, waiting
    /// for the GIL, is not held meanwhile. The runtime drops its last
    /// reference in a worker thread.
    fn drop(&mut self) {
        let memory = self.guard.take_all();
        Python::attach(|py| py.detach(move || drop(memory)));
    }
}

/// Drops `value` in a new thread; if none can be started, the closure (and
/// so `value`) is dropped here instead.
fn drop_elsewhere<T: Send + 'static>(value: T) {
    let spawned = std::thread::Builder::new().name("keylane-free".into()).spawn(move || drop(value));
    drop(spawned);
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<GuardCore>()?;
    m.add_class::<GuardReads>()
}
