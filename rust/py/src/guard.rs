//! `keylane._native.GuardCore`: the memory of an App's stale-version and
//! duplicate-id checks (keylane-core's `guard`), driven by
//! `keylane._guard.Guard`. A batch is prepared on the event loop's thread
//! (names and versions taken from the tickets once), planned, read and
//! judged in a worker thread, then each ticket is checked and recorded with
//! one call.

use keylane_core::guard::{Checked, Guard, Verdict};
use keylane_core::versions::MAX_VERSION;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyInt, PyList, PyString};

use crate::args::key_bytes;
use crate::errors::Result;
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

/// A prepared batch; give it to `read`.
#[pyclass(module = "keylane._native", frozen, name = "GuardReads")]
pub(crate) struct GuardReads {
    /// The batch's prepared tickets, judged once the reads are in.
    tickets: Vec<Py<Ticket>>,
}

#[pyclass(module = "keylane._native", frozen, name = "GuardCore")]
pub(crate) struct GuardCore {
    table: Py<VersionTable>,
    guard: Guard,
    /// The batches come from a dispatcher that hands out one message of a
    /// key at a time (ordering "key" or "total"): see `Guard::judge`.
    one_per_key: bool,
}

/// Leaves each verdict given in its ticket (`tickets` are all prepared,
/// in the order judged), for `check` to take.
fn set_verdicts(tickets: &[&Ticket], generation: u64, verdicts: Vec<Option<Verdict>>) {
    for (ticket, verdict) in tickets.iter().zip(verdicts) {
        if let Some(verdict) = verdict {
            ticket.set_verdict(generation, verdict);
        }
    }
}

fn code(verdict: Verdict) -> u8 {
    match verdict {
        Verdict::Run => RUN,
        Verdict::Stale => STALE,
        Verdict::Duplicate => DUPLICATE,
    }
}

fn describe(obj: &Bound<'_, PyAny>) -> String {
    let text = obj.repr().map(|r| r.to_string()).unwrap_or_else(|_| "<unprintable>".to_owned());
    text.chars().take(80).collect()
}

/// What one ticket is checked with, or why it cannot be (the message is
/// poison); `Err` only for what must go up (not an `Exception`).
fn prepare_one(
    ticket: &Ticket,
    py: Python<'_>,
    version_of: Option<&Bound<'_, PyAny>>,
    id_of: Option<&Bound<'_, PyAny>>,
) -> PyResult<Result<Checked, String>> {
    let item = ticket.item.bind(py);
    let key = ticket.key.bind(py);
    // Stale checks are per key: a keyless message has no version.
    let key = if key.is_none() { None } else { key_bytes(key).ok() };
    let version = match version_of.filter(|_| key.is_some()) {
        None => None,
        Some(f) => match called(f, item, "version_of")?.and_then(|v| parse_version(&v)) {
            Ok(v) => v,
            Err(problem) => return Ok(Err(problem)),
        },
    };
    let id = match id_of {
        None => None,
        Some(f) => match called(f, item, "id_of")?.and_then(|i| parse_id(&i)) {
            Ok(i) => i,
            Err(problem) => return Ok(Err(problem)),
        },
    };
    Ok(Ok(Checked::new(key.as_deref(), version, id.as_deref())))
}

/// `f(item)`, or the `Exception` it raised described as `"{name} failed:
/// {exc!r}"`. Anything else raised (a cancellation, KeyboardInterrupt)
/// goes up.
fn called<'py>(
    f: &Bound<'py, PyAny>,
    item: &Bound<'py, PyAny>,
    name: &str,
) -> PyResult<Result<Bound<'py, PyAny>, String>> {
    match f.call1((item,)) {
        Ok(v) => Ok(Ok(v)),
        Err(e) if e.is_instance_of::<PyException>(f.py()) => {
            let exc = e.value(f.py());
            let text = exc.repr().map(|r| r.to_string()).unwrap_or_else(|_| "<unprintable>".to_owned());
            Ok(Err(format!("{name} failed: {text}")))
        }
        Err(e) => Err(e),
    }
}

/// A `version_of` result: None, or an int from 0 to 2**63-1 (not a bool).
fn parse_version(obj: &Bound<'_, PyAny>) -> Result<Option<u64>, String> {
    if obj.is_none() {
        return Ok(None);
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
fn parse_id(obj: &Bound<'_, PyAny>) -> Result<Option<Vec<u8>>, String> {
    if obj.is_none() {
        return Ok(None);
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
    #[pyo3(signature = (table, *, one_per_key = false))]
    fn new(table: Py<VersionTable>, one_per_key: bool) -> Self {
        GuardCore { table, guard: Guard::new(), one_per_key }
    }

    /// Takes each ticket's key, version (``version_of(item)``; none for a
    /// keyless message) and id (``id_of(item)``), once, calling them here;
    /// returns the batch to ``read``, or None if no ticket of it can be
    /// checked. A ticket prepared before keeps what it had. What either
    /// raises (an ``Exception``) or returns that cannot be used makes the
    /// ticket poison (``problem`` says why); anything else raised goes up.
    #[pyo3(signature = (tickets, version_of = None, id_of = None))]
    fn prepare(
        &self,
        tickets: &Bound<'_, PyList>,
        version_of: Option<&Bound<'_, PyAny>>,
        id_of: Option<&Bound<'_, PyAny>>,
    ) -> Result<Option<GuardReads>> {
        let mut prepared = Vec::with_capacity(tickets.len());
        for obj in tickets.iter() {
            let bound = Ticket::cast(&obj)?;
            let ticket = bound.get();
            if ticket.checked.get().is_none() {
                let checked = prepare_one(ticket, bound.py(), version_of, id_of)?;
                // Only this thread (holding the GIL) sets it.
                let _ = ticket.checked.set(checked);
            }
            if let Some(Ok(_)) = ticket.checked.get() {
                prepared.push(bound.clone().unbind());
            }
        }
        Ok((!prepared.is_empty()).then_some(GuardReads { tickets: prepared }))
    }

    /// Plans what the prepared batch needs from the table, reads it and
    /// judges the batch, the GIL released, leaving each verdict given in its
    /// ticket for ``check``. It may wait for the table's lock: call it from
    /// a worker thread.
    fn read(&self, py: Python<'_>, reads: &Bound<'_, GuardReads>) -> Result<()> {
        let table = self.table.bind(py).get();
        let now = table.now_ms(py)?;
        let core = table.open()?;
        let reads = reads.get();
        py.detach(|| {
            let tickets: Vec<&Ticket> = reads.tickets.iter().map(|t| t.get()).collect();
            let checked: Vec<&Checked> =
                tickets.iter().filter_map(|t| t.checked.get().and_then(|c| c.as_ref().ok())).collect();
            let plan = self.guard.plan(checked.iter().copied());
            let (generation, verdicts) = if plan.is_empty() {
                self.guard.judge(checked.iter().copied(), self.one_per_key)
            } else {
                self.guard.read_and_judge(&core, &plan, now, checked.iter().copied(), self.one_per_key)?
            };
            set_verdicts(&tickets, generation, verdicts);
            Ok(())
        })
    }

    /// 0 run, 1 stale, 2 duplicate, 3 poison (see ``problem``), 4 not
    /// prepared. Looks the table up in place for what was not read ahead.
    fn check(&self, py: Python<'_>, ticket: &Bound<'_, PyAny>) -> Result<u8> {
        let t = Ticket::cast(ticket)?.get();
        if let Some(verdict) = t.take_verdict(self.guard.generation()) {
            return Ok(code(verdict));
        }
        let Some(prepared) = t.checked.get() else { return Ok(UNPREPARED) };
        let Ok(checked) = prepared else { return Ok(POISON) };
        let table = self.table.bind(py).get();
        let core = table.open()?;
        let mut now = Ok(0);
        let verdict = self.guard.check(&core, checked, || {
            now = table.now_ms(py);
            *now.as_ref().unwrap_or(&0)
        });
        now?;
        Ok(code(verdict?))
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

    /// ``applied`` for a list of tickets, in one call (tickets that were
    /// not prepared, or are poison, are passed over).
    fn applied_many(&self, tickets: &Bound<'_, PyList>) -> Result<usize> {
        let held: Vec<Bound<'_, PyAny>> = tickets.iter().collect();
        let mut batch = Vec::with_capacity(held.len());
        for obj in &held {
            if let Some(Ok(c)) = self.prepared(obj)? {
                batch.push(c);
            }
        }
        Ok(self.guard.applied_many(batch))
    }

    /// How many checks read the table on the calling thread, nothing
    /// having been read ahead for them.
    #[getter]
    fn looked_up_in_place(&self) -> u64 {
        self.guard.looked_up_in_place()
    }

    /// About how many versions or ids are recorded and not yet being
    /// written: at most this many, 0 only when none is.
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
