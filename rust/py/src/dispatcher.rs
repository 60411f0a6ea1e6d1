//! `keylane.Dispatcher`: the per-key dispatch queue. Arguments are converted
//! with the GIL held; the core runs with it released.

use keylane_core::dispatch::{
    Config, Dispatch, Dispatcher as Core, MAX_BOUND, Ordering, Prepared, ReceiptInfo, Retried,
};
use keylane_core::watermark::MAX_OFFSET;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};

use crate::args::{int_arg, key_bytes};
use crate::errors::{Result, invalid_argument, invalid_type, ticket_error};
use crate::ticket::{Payload, Ticket};

/// Hands out only messages that are safe to process now under the chosen
/// ordering model, and tracks which offsets are safe to commit.
#[pyclass(module = "keylane._native", frozen, name = "Dispatcher")]
pub(crate) struct Dispatcher {
    core: Core<Payload>,
}

fn bounded(obj: &Bound<'_, PyAny>, what: &str, min: i64, max: i64) -> Result<i64> {
    let v = int_arg(obj, what)?;
    if !(min..=max).contains(&v) {
        return Err(invalid_argument(format!("{what} must be between {min} and {max}, got {v}")));
    }
    Ok(v)
}

impl Dispatcher {
    /// Converts one `(key, partition, offset, item)` into a core message.
    fn prepare(
        &self,
        key: &Bound<'_, PyAny>,
        partition: &Bound<'_, PyAny>,
        offset: &Bound<'_, PyAny>,
        item: &Bound<'_, PyAny>,
    ) -> Result<Prepared<Payload>> {
        let partition = bounded(partition, "partition", 0, i64::from(i32::MAX))? as i32;
        let offset = bounded(offset, "offset", 0, MAX_OFFSET)?;
        let lane = if key.is_none() {
            self.core.lane_of(None, partition)
        } else {
            self.core.lane_of(Some(&key_bytes(key)?), partition)
        };
        Ok(Prepared {
            lane,
            partition,
            offset,
            item: Payload { key: key.clone().unbind(), item: item.clone().unbind() },
        })
    }

    fn tickets<'py>(&self, py: Python<'py>, max_items: usize) -> Result<Bound<'py, PyList>> {
        let popped = py.detach(|| self.core.pop_ready(max_items));
        drop(popped.discarded);
        let tickets = popped
            .tickets
            .into_iter()
            .map(|t| {
                let r = t.receipt;
                Bound::new(py, Ticket::new(t.item, r.partition(), r.offset(), r.attempt(), r))
            })
            .collect::<PyResult<Vec<_>>>()?;
        Ok(PyList::new(py, tickets)?)
    }
}

impl Drop for Dispatcher {
    /// Frees the queue with the GIL released: a dispatcher that has seen
    /// 100,000s of keys holds as many lanes, and freeing them takes
    /// milliseconds that other threads need not wait for. (The runtime drops
    /// its last reference in a worker thread, so the event loop's thread
    /// runs on meanwhile.) Items still queued are released through PyO3's
    /// pending-decref pool.
    fn drop(&mut self) {
        let Ok(empty) = Core::new(Config { capacity: 1, max_in_flight: 1, ..Config::default() }) else {
            return;
        };
        let core = std::mem::replace(&mut self.core, empty);
        Python::attach(|py| py.detach(move || drop(core)));
    }
}

#[pymethods]
impl Dispatcher {
    #[new]
    #[pyo3(signature = (ordering = None, *, capacity = None, max_in_flight = None, seed = None))]
    fn new(
        ordering: Option<&Bound<'_, PyAny>>,
        capacity: Option<&Bound<'_, PyAny>>,
        max_in_flight: Option<&Bound<'_, PyAny>>,
        seed: Option<&Bound<'_, PyAny>>,
    ) -> Result<Self> {
        let ordering = match ordering {
            None => Ordering::Key,
            Some(o) => match o.cast::<PyString>() {
                Ok(s) => s.to_str()?.parse::<Ordering>()?,
                Err(_) => {
                    return Err(invalid_type(
                        "ordering must be a str: \"total\", \"partition\", \"key\" or \"none\"",
                    ));
                }
            },
        };
        let defaults = Config::default();
        let capacity = match capacity {
            Some(c) => bounded(c, "capacity", 1, MAX_BOUND as i64)? as usize,
            None => defaults.capacity,
        };
        let max_in_flight = match max_in_flight {
            Some(m) => bounded(m, "max_in_flight", 1, MAX_BOUND as i64)? as usize,
            None => defaults.max_in_flight,
        };
        let seed = match seed {
            Some(s) => Some(bounded(s, "seed", 0, i64::MAX)? as u64),
            None => None,
        };
        Ok(Dispatcher { core: Core::new(Config { ordering, capacity, max_in_flight, seed })? })
    }

    #[getter]
    fn ordering(&self) -> &'static str {
        self.core.config().ordering.as_str()
    }

    #[getter]
    fn capacity(&self) -> usize {
        self.core.config().capacity
    }

    #[getter]
    fn max_in_flight(&self) -> usize {
        self.core.config().max_in_flight
    }

    /// Messages queued, not yet handed out.
    #[getter]
    fn queued(&self) -> usize {
        self.core.queued()
    }

    /// Messages handed out and not yet completed.
    #[getter]
    fn in_flight(&self) -> usize {
        self.core.in_flight()
    }

    /// How many more messages fit under `capacity`.
    #[getter]
    fn free_capacity(&self) -> usize {
        self.core.free_capacity()
    }

    fn __len__(&self) -> usize {
        self.core.queued() + self.core.in_flight()
    }

    fn __repr__(&self) -> String {
        let c = self.core.config();
        format!(
            "Dispatcher(ordering='{}', capacity={}, max_in_flight={}, queued={}, in_flight={})",
            c.ordering.as_str(),
            c.capacity,
            c.max_in_flight,
            self.core.queued(),
            self.core.in_flight()
        )
    }

    /// Queues one message. Raises `QueueFull` at capacity.
    fn push(
        &self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        partition: &Bound<'_, PyAny>,
        offset: &Bound<'_, PyAny>,
        item: &Bound<'_, PyAny>,
    ) -> Result<()> {
        let p = self.prepare(key, partition, offset, item)?;
        Ok(py.detach(|| self.core.push(p))?)
    }

    /// Queues `(key, partition, offset, item)` tuples until the iterable ends
    /// or the dispatcher is full, and returns how many were queued. Entries
    /// past the free capacity are not consumed from the iterable. The batch
    /// is all-or-nothing: a bad entry raises, naming its index, and nothing
    /// of the batch is queued.
    fn push_many(&self, py: Python<'_>, entries: &Bound<'_, PyAny>) -> Result<usize> {
        let room = self.core.free_capacity();
        if room == 0 {
            return Ok(0);
        }
        let mut batch = Vec::with_capacity(entries.len().unwrap_or(0).min(room));
        let mut iter = entries.try_iter()?;
        while batch.len() < room {
            let Some(entry) = iter.next() else { break };
            let entry = entry?;
            let index = batch.len();
            let tuple = entry.cast::<PyTuple>().map_err(|_| {
                let name = entry.get_type().name().map(|n| n.to_string()).unwrap_or_default();
                invalid_type(format!(
                    "push_many entry {index} must be a (key, partition, offset, item) tuple, not {name}"
                ))
            })?;
            if tuple.len() != 4 {
                return Err(invalid_argument(format!(
                    "push_many entry {index} must have 4 fields (key, partition, offset, item), has {}",
                    tuple.len()
                )));
            }
            let field = |i| tuple.get_borrowed_item(i);
            let p = self
                .prepare(&*field(0)?, &*field(1)?, &*field(2)?, &*field(3)?)
                .map_err(|e| e.in_batch(py, index))?;
            batch.push(p);
        }
        let accepted = py.detach(|| self.core.push_many(batch))?;
        // Refused only if another thread took the room meanwhile.
        drop(accepted.rejected);
        Ok(accepted.count)
    }

    /// Up to `max_items` tickets for messages that may be processed now.
    fn pop_ready<'py>(&self, py: Python<'py>, max_items: &Bound<'py, PyAny>) -> Result<Bound<'py, PyList>> {
        let n = bounded(max_items, "max_items", 0, i64::MAX)? as usize;
        self.tickets(py, n)
    }

    /// Marks a ticket's message done. False if its partition was revoked
    /// while it was in flight (nothing is committed for it).
    fn complete(&self, py: Python<'_>, ticket: &Bound<'_, PyAny>) -> Result<bool> {
        let ticket = Ticket::cast(ticket)?.get();
        let receipt = ticket.take()?;
        if !self.core.owns(&receipt) {
            ticket.restore(receipt);
            return Err(ticket_error("this ticket was handed out by another dispatcher"));
        }
        Ok(py.detach(|| self.core.complete(receipt))?)
    }

    /// `complete` for many tickets; returns how many were live. Every ticket
    /// is checked first: if one is bad or already used, none is completed.
    fn complete_many(&self, py: Python<'_>, tickets: &Bound<'_, PyAny>) -> Result<usize> {
        let mut taken: Vec<(Bound<'_, Ticket>, _)> = Vec::with_capacity(tickets.len().unwrap_or(0));
        let undo = |taken: Vec<(Bound<'_, Ticket>, _)>| {
            for (t, r) in taken {
                t.get().restore(r);
            }
        };
        for (index, obj) in tickets.try_iter()?.enumerate() {
            let claimed = obj.map_err(Into::into).and_then(|obj| {
                let t = Ticket::cast(&obj)?.clone();
                let r = t.get().take()?;
                if !self.core.owns(&r) {
                    t.get().restore(r);
                    return Err(ticket_error("this ticket was handed out by another dispatcher"));
                }
                Ok((t, r))
            });
            match claimed {
                Ok(pair) => taken.push(pair),
                Err(e) => {
                    undo(taken);
                    return Err(e.in_batch(py, index));
                }
            }
        }
        let receipts: Vec<_> = taken.into_iter().map(|(_, r)| r).collect();
        Ok(py.detach(|| self.core.complete_many(receipts))?)
    }

    /// Gives a message back: it returns to the head of its lane with
    /// `attempt + 1`, and later messages of its key wait behind it.
    fn retry(&self, py: Python<'_>, ticket: &Bound<'_, PyAny>) -> Result<()> {
        let ticket = Ticket::cast(ticket)?.get();
        let receipt = ticket.take()?;
        if !self.core.owns(&receipt) {
            ticket.restore(receipt);
            return Err(ticket_error("this ticket was handed out by another dispatcher"));
        }
        let payload = ticket.payload(py);
        match py.detach(|| self.core.retry(receipt, payload))? {
            Retried::Requeued => {}
            Retried::Stale(payload) => drop(payload),
        }
        Ok(())
    }

    /// Partition → next offset that is safe to commit.
    fn committable<'py>(&self, py: Python<'py>) -> Result<Bound<'py, PyDict>> {
        let marks = py.detach(|| self.core.committable());
        let out = PyDict::new(py);
        for (p, o) in marks {
            out.set_item(p, o)?;
        }
        Ok(out)
    }

    /// Forgets `partitions`: drops their queued messages (returns how many),
    /// makes their in-flight tickets stale, forgets their watermarks.
    fn revoke(&self, py: Python<'_>, partitions: &Bound<'_, PyAny>) -> Result<usize> {
        let ids = partition_ids(partitions)?;
        let revoked = py.detach(|| self.core.revoke(&ids));
        drop(revoked.discarded);
        Ok(revoked.count)
    }

    /// Drops the queued messages of `partitions` (returns how many) but
    /// keeps their watermarks: in-flight messages may still complete, and
    /// `committable` stops below the first dropped one. For draining a
    /// partition before giving it up: then `revoke` it.
    fn drop_queued(&self, py: Python<'_>, partitions: &Bound<'_, PyAny>) -> Result<usize> {
        let ids = partition_ids(partitions)?;
        let dropped = py.detach(|| self.core.drop_queued(&ids));
        drop(dropped.discarded);
        Ok(dropped.count)
    }

    /// Tickets of `partitions` handed out and not yet completed or retried.
    fn in_flight_of(&self, partitions: &Bound<'_, PyAny>) -> Result<usize> {
        let ids = partition_ids(partitions)?;
        Ok(self.core.in_flight_of(&ids))
    }

    /// Counters and gauges: pushed, completed, retried, stale, revoked,
    /// queued, in_flight, lanes, max_lane_depth.
    fn stats<'py>(&self, py: Python<'py>) -> Result<Bound<'py, PyDict>> {
        let s = py.detach(|| self.core.stats());
        let out = PyDict::new(py);
        out.set_item("pushed", s.pushed)?;
        out.set_item("completed", s.completed)?;
        out.set_item("retried", s.retried)?;
        out.set_item("stale", s.stale)?;
        out.set_item("revoked", s.revoked)?;
        out.set_item("queued", s.queued)?;
        out.set_item("in_flight", s.in_flight)?;
        out.set_item("lanes", s.lanes)?;
        out.set_item("max_lane_depth", s.max_lane_depth)?;
        Ok(out)
    }
}

fn partition_ids(partitions: &Bound<'_, PyAny>) -> Result<Vec<i32>> {
    partitions.try_iter()?.map(|p| Ok(bounded(&p?, "partition", 0, i64::from(i32::MAX))? as i32)).collect()
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Dispatcher>()?;
    m.add_class::<Ticket>()?;
    Ok(())
}
