//! `keylane.Ticket`: one in-flight message handed out by a `Dispatcher`.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use keylane_core::dispatch::Receipt;
use keylane_core::guard::{Checked, Verdict};
use parking_lot::Mutex;
use pyo3::prelude::*;

use crate::errors::{Result, ticket_error};

/// The payload the core carries for each message: the key and item objects
/// exactly as they were pushed.
#[derive(Debug)]
pub(crate) struct Payload {
    pub(crate) key: Py<PyAny>,
    pub(crate) item: Py<PyAny>,
}

/// A message that may be processed now. Complete it (or retry it) exactly
/// once through the dispatcher that handed it out.
// Tickets are created and dropped by the thousand per second: a free list
// saves an allocation each. They are deliberately not tracked by Python's
// cyclic GC (no __traverse__): a ticket only points at the key and item it
// was pushed with, so it cannot sit in a cycle unless an item holds its own
// ticket; tracking them made every batch of tickets trigger collections that
// walk the whole heap.
#[pyclass(module = "keylane._native", frozen, name = "Ticket", freelist = 4096)]
#[derive(Debug)]
pub(crate) struct Ticket {
    #[pyo3(get)]
    pub(crate) key: Py<PyAny>,
    #[pyo3(get)]
    pub(crate) item: Py<PyAny>,
    #[pyo3(get)]
    partition: i32,
    #[pyo3(get)]
    offset: i64,
    #[pyo3(get)]
    attempt: u32,
    /// Taken by the first `complete`/`retry`; `None` afterwards.
    receipt: Mutex<Option<Receipt>>,
    /// What an App's guard checks this message with, or why it cannot
    /// (set once, by `GuardCore.prepare`).
    pub(crate) checked: OnceLock<Result<Checked, String>>,
    /// A verdict the guard gave this message's batch ahead of its check,
    /// with the guard generation it holds for (see `set_verdict`); 0: none.
    verdict: AtomicU64,
}

impl Ticket {
    pub(crate) fn new(payload: Payload, partition: i32, offset: i64, attempt: u32, receipt: Receipt) -> Self {
        Ticket {
            key: payload.key,
            item: payload.item,
            partition,
            offset,
            attempt,
            receipt: Mutex::new(Some(receipt)),
            checked: OnceLock::new(),
            verdict: AtomicU64::new(0),
        }
    }

    pub(crate) fn set_verdict(&self, generation: u64, verdict: Verdict) {
        let code = match verdict {
            Verdict::Run => 1,
            Verdict::Stale => 2,
            Verdict::Duplicate => 3,
        };
        self.verdict.store(generation << 2 | code, Ordering::Relaxed);
    }

    /// The verdict given ahead, if it holds for `generation`; used up (a
    /// retry of the message is judged again).
    pub(crate) fn take_verdict(&self, generation: u64) -> Option<Verdict> {
        let word = self.verdict.swap(0, Ordering::Relaxed);
        if word == 0 || word >> 2 != generation {
            return None;
        }
        Some(match word & 3 {
            1 => Verdict::Run,
            2 => Verdict::Stale,
            _ => Verdict::Duplicate,
        })
    }

    /// Takes the receipt, refusing a ticket that was already used.
    pub(crate) fn take(&self) -> Result<Receipt> {
        self.receipt.lock().take().ok_or_else(|| {
            ticket_error(format!(
                "ticket (partition {}, offset {}) was already completed or retried; \
                 each ticket is used exactly once",
                self.partition, self.offset
            ))
        })
    }

    /// Puts a receipt back (undoing a `take` of a batch that failed).
    pub(crate) fn restore(&self, receipt: Receipt) {
        *self.receipt.lock() = Some(receipt);
    }

    pub(crate) fn payload(&self, py: Python<'_>) -> Payload {
        Payload { key: self.key.clone_ref(py), item: self.item.clone_ref(py) }
    }

    /// `obj` as a ticket, or a typed error naming what it was.
    pub(crate) fn cast<'a, 'py>(obj: &'a Bound<'py, PyAny>) -> Result<&'a Bound<'py, Ticket>> {
        obj.cast::<Ticket>().map_err(|_| {
            let name = obj.get_type().name().map(|n| n.to_string()).unwrap_or_default();
            crate::errors::invalid_type(format!("expected a keylane.Ticket, got {name}"))
        })
    }
}

#[pymethods]
impl Ticket {
    /// True until the ticket is completed or retried.
    #[getter]
    fn pending(&self) -> bool {
        self.receipt.lock().is_some()
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "Ticket(key={}, partition={}, offset={}, attempt={})",
            self.key.bind(py).repr()?,
            self.partition,
            self.offset,
            self.attempt
        ))
    }
}
