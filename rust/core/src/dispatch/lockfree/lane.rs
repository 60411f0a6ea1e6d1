//! A lane: the FIFO of one key (or one partition, or the single global lane
//! under total order), plus its ownership state.
//!
//! Ownership is what enforces "one in flight per lane": a lane is *owned*
//! from the moment it is put on the ready queue until its in-flight message
//! is completed and the lane has nothing more to hand out. Only the owner
//! pops from a lane; anyone may append to it.
//!
//! Two storages implement the same contract. [`LockedLane`] keeps the FIFO in
//! a `VecDeque` behind a per-lane mutex; [`AtomicLane`] keeps it in a
//! crossbeam `SegQueue` with the state in one atomic word. The dispatcher is
//! generic over them so both are tested by the same suites and measured by
//! the same benchmark; docs/design.md says which one ships and why.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{AcqRel, Acquire};

use crossbeam_queue::SegQueue;
use crossbeam_utils::Backoff;
use parking_lot::Mutex;

use super::partition::Partition;

/// A queued message.
#[derive(Debug)]
pub struct Entry<T> {
    pub(crate) item: T,
    pub(crate) part: Arc<Partition>,
    pub(crate) offset: i64,
    pub(crate) attempt: u32,
}

/// What the owner must do after giving a message back or finishing one.
#[derive(Debug, PartialEq, Eq)]
pub enum Release {
    /// The lane has more messages: put it back on the ready queue.
    Reschedule,
    /// The lane is empty and no longer owned.
    Idle,
}

/// The contract both storages meet. "Owner only" methods may be called only
/// by the thread that currently owns the lane (it took the lane from the
/// ready queue, or holds the receipt of its in-flight message).
pub trait LaneStore<T>: Send + Sync + Sized {
    fn new() -> Self;

    /// Appends `e`. `Ok(true)`: the lane was idle and the caller now owns it
    /// and must schedule it. `Ok(false)`: someone else owns it. `Err(e)`:
    /// the lane was retired; look up (or create) a fresh one and try again.
    fn push_back(&self, e: Entry<T>) -> Result<bool, Entry<T>>;

    /// Owner only: puts a retried message back at the head.
    fn push_front(&self, e: Entry<T>);

    /// Owner only: takes the head message, `None` if the lane is empty.
    fn pop_front(&self) -> Option<Entry<T>>;

    /// Owner only: gives up the in-flight slot.
    fn release(&self) -> Release;

    /// Retires the lane if it is idle and empty (so it can be dropped from
    /// the index); a retired lane refuses every later push.
    fn try_retire(&self) -> bool;

    /// Messages queued (not in flight).
    fn depth(&self) -> usize;
}

// ---------------------------------------------------------------------------

#[derive(Debug)]
struct LockedInner<T> {
    queue: VecDeque<Entry<T>>,
    owned: bool,
    retired: bool,
}

/// FIFO in a `VecDeque` behind a per-lane `parking_lot::Mutex`. The lock is
/// held for a handful of instructions and contended only when two threads
/// touch the same key at the same instant.
#[derive(Debug)]
pub struct LockedLane<T> {
    inner: Mutex<LockedInner<T>>,
}

impl<T: Send> LaneStore<T> for LockedLane<T> {
    fn new() -> Self {
        LockedLane { inner: Mutex::new(LockedInner { queue: VecDeque::new(), owned: false, retired: false }) }
    }

    fn push_back(&self, e: Entry<T>) -> Result<bool, Entry<T>> {
        let mut g = self.inner.lock();
        if g.retired {
            return Err(e);
        }
        g.queue.push_back(e);
        Ok(!std::mem::replace(&mut g.owned, true))
    }

    fn push_front(&self, e: Entry<T>) {
        let mut g = self.inner.lock();
        debug_assert!(g.owned && !g.retired);
        g.queue.push_front(e);
    }

    fn pop_front(&self) -> Option<Entry<T>> {
        self.inner.lock().queue.pop_front()
    }

    fn release(&self) -> Release {
        let mut g = self.inner.lock();
        debug_assert!(g.owned);
        if g.queue.is_empty() {
            g.owned = false;
            // An idle lane keeps a small buffer for its next burst, but not a
            // large one left over from a past backlog.
            if g.queue.capacity() > 64 {
                g.queue.shrink_to(8);
            }
            Release::Idle
        } else {
            Release::Reschedule
        }
    }

    fn try_retire(&self) -> bool {
        let Some(mut g) = self.inner.try_lock() else {
            return false;
        };
        if g.owned || g.retired || !g.queue.is_empty() {
            return false;
        }
        g.retired = true;
        true
    }

    fn depth(&self) -> usize {
        self.inner.lock().queue.len()
    }
}

// ---------------------------------------------------------------------------

/// The lane is on the ready queue or has a message in flight.
const OWNED: u64 = 1 << 63;
/// Retired: refuses pushes; the index entry is being removed.
const RETIRED: u64 = 1 << 62;
/// A retried message waits in `head`, ahead of the queue.
const HEAD: u64 = 1 << 61;
const COUNT: u64 = (1 << 61) - 1;

/// FIFO in a crossbeam `SegQueue`, state in one atomic word:
/// `OWNED | RETIRED | HEAD | count`, where `count` counts messages reserved
/// by pushers (a push reserves before it writes, so `count` may run ahead of
/// the queue for the few instructions a push is in transit).
#[derive(Debug)]
pub struct AtomicLane<T> {
    state: AtomicU64,
    queue: SegQueue<Entry<T>>,
    /// Only the owner touches this, and only after a retry; the mutex is
    /// never contended and is skipped unless `HEAD` is set.
    head: Mutex<Option<Entry<T>>>,
}

impl<T: Send> LaneStore<T> for AtomicLane<T> {
    fn new() -> Self {
        AtomicLane { state: AtomicU64::new(0), queue: SegQueue::new(), head: Mutex::new(None) }
    }

    fn push_back(&self, e: Entry<T>) -> Result<bool, Entry<T>> {
        // Reserve a place first, so a retired lane is detected before the
        // message is written anywhere.
        let mut cur = self.state.load(Acquire);
        loop {
            if cur & RETIRED != 0 {
                return Err(e);
            }
            match self.state.compare_exchange_weak(cur, (cur + 1) | OWNED, AcqRel, Acquire) {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        self.queue.push(e);
        Ok(cur & OWNED == 0)
    }

    fn push_front(&self, e: Entry<T>) {
        let mut head = self.head.lock();
        debug_assert!(head.is_none());
        *head = Some(e);
        drop(head);
        self.state.fetch_add(1 | HEAD, AcqRel);
    }

    fn pop_front(&self) -> Option<Entry<T>> {
        let cur = self.state.load(Acquire);
        if cur & COUNT == 0 {
            return None;
        }
        if cur & HEAD != 0 {
            let e = self.head.lock().take();
            self.state.fetch_sub(1 | HEAD, AcqRel);
            return e;
        }
        // `count` > 0: the message is in the queue or a pusher is between its
        // reservation and its write. Wait for the write.
        let backoff = Backoff::new();
        loop {
            if let Some(e) = self.queue.pop() {
                self.state.fetch_sub(1, AcqRel);
                return Some(e);
            }
            backoff.snooze();
        }
    }

    fn release(&self) -> Release {
        let mut cur = self.state.load(Acquire);
        loop {
            debug_assert!(cur & OWNED != 0);
            if cur & COUNT != 0 {
                return Release::Reschedule;
            }
            match self.state.compare_exchange_weak(cur, cur & !OWNED, AcqRel, Acquire) {
                Ok(_) => return Release::Idle,
                Err(now) => cur = now,
            }
        }
    }

    fn try_retire(&self) -> bool {
        self.state.compare_exchange(0, RETIRED, AcqRel, Acquire).is_ok()
    }

    fn depth(&self) -> usize {
        (self.state.load(Acquire) & COUNT) as usize
    }
}
