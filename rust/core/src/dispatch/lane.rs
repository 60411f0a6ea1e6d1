//! A lane: the queue of one key (or one partition, or the single lane of
//! total order), handing out one message at a time.
//!
//! The lane's state is one atomic word: the top of an *inbox*, a Treiber
//! stack of pushed messages (newest first), with three flag bits in the
//! pointer's low bits — `OWNED`, `RETIRED` and `USED` (pushed to since the
//! last sweep). Beside it, the *owner* keeps the oldest message inline
//! (`head`) and a private FIFO of messages taken from the inbox. A push to
//! an idle lane takes the token and fills `head` — no allocation, one cache
//! line; only pushes to a lane that is already owned allocate a node.
//!
//! **Ownership** is what keeps one message of a lane in flight at a time.
//! The lane is owned from the push that finds it unowned (that pusher must
//! schedule it) until its owner releases it with nothing left to hand out.
//! Between the two, the right to act as owner travels as a token: in the
//! ready queue, then with the receipt of the message in flight, then back
//! to the ready queue. Only the token holder takes messages (`pop`), puts a
//! retried one back (`push_front`) or releases; anyone may `push`.
//!
//! - `push` is one CAS that both links the message and reads (and sets)
//!   `OWNED`: a message can never be added to a lane whose owner has
//!   already decided it is empty, because the owner's release is a CAS
//!   from exactly `OWNED` (empty inbox) to 0, which fails once anything was
//!   linked.
//! - The owner empties the whole inbox with one swap and reverses it into
//!   its FIFO, so per-key order is push order, and a message is taken once.
//! - A lane that is unowned, empty and unused since the last sweep (state
//!   0) may be retired (CAS 0 → `RETIRED`) so its table entry can be freed;
//!   a push that meets `RETIRED` gets its message back and looks the lane
//!   up again.
//!
//! Nothing here waits: every operation is a bounded number of steps, or a
//! CAS loop that fails only because another thread's CAS succeeded.
#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::ptr;

use crate::sync::Ordering::{AcqRel, Acquire, Relaxed, Release};
use crate::sync::{AtomicUsize, UnsafeCell};

const OWNED: usize = 1;
const RETIRED: usize = 2;
const USED: usize = 4;
const FLAGS: usize = OWNED | RETIRED | USED;

struct Node<E> {
    entry: E,
    next: *mut Node<E>,
}

/// What a push did.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed<E> {
    /// The lane was idle: the caller now holds its token and must schedule it.
    Schedule,
    /// Someone owns the lane; the message waits its turn.
    Queued,
    /// The lane is retired: here is the message back; look the lane up again.
    Retired(E),
}

/// What the owner must do after releasing.
#[derive(Debug, PartialEq, Eq)]
pub enum Released {
    /// The lane has more: the token is still held; schedule it again.
    Reschedule,
    /// The lane is empty and unowned; the token is gone.
    Idle,
}

/// What a push and a pop of a short lane touch (state, id, head) share the
/// first cache line; the FIFO and the backlog count, used only by lanes
/// with more than one message, are on the next.
#[repr(C, align(64))]
pub struct Lane<E> {
    /// Inbox top | `OWNED` | `RETIRED` | `USED`.
    state: AtomicUsize,
    /// The lane id it was created for (the table's key).
    pub id: u64,
    /// Owner only: the oldest message, inline.
    head: UnsafeCell<Option<E>>,
    /// Owner only: messages taken from the inbox (after `head`), oldest first.
    fifo: UnsafeCell<VecDeque<E>>,
    /// Messages waiting behind the head (for stats only; approximate).
    backlog: AtomicUsize,
}

// SAFETY: entries move between threads (`E: Send`); `head` and `fifo` are
// touched by the token holder only, and the token is handed over through
// the state word (Release/Acquire) or through the caller's synchronization.
unsafe impl<E: Send> Send for Lane<E> {}
unsafe impl<E: Send> Sync for Lane<E> {}

impl<E> std::fmt::Debug for Lane<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state.load(Relaxed);
        f.debug_struct("Lane")
            .field("owned", &(state & OWNED != 0))
            .field("retired", &(state & RETIRED != 0))
            .field("depth", &self.depth())
            .finish()
    }
}

impl<E> Lane<E> {
    pub fn new(id: u64) -> Self {
        Lane {
            state: AtomicUsize::new(0),
            id,
            head: UnsafeCell::new(None),
            fifo: UnsafeCell::new(VecDeque::new()),
            backlog: AtomicUsize::new(0),
        }
    }

    /// Appends a message. Any thread.
    pub fn push(&self, entry: E) -> Pushed<E> {
        let mut cur = self.state.load(Relaxed);
        if cur & !USED == 0 {
            // Idle: taking the token is the push. Acquire sees what the last
            // owner left in `head` and `fifo` (both empty).
            match self.state.compare_exchange(cur, OWNED | USED, Acquire, Relaxed) {
                Ok(_) => {
                    // SAFETY: this thread now holds the token; nobody else
                    // can reach `head` until it schedules the lane.
                    unsafe { self.head.with_mut(|h| *h = Some(entry)) };
                    return Pushed::Schedule;
                }
                Err(now) => cur = now,
            }
        }
        let node = Box::into_raw(Box::new(Node { entry, next: ptr::null_mut() }));
        loop {
            if cur & RETIRED != 0 {
                // SAFETY: `node` was never published; it is ours again.
                let node = unsafe { Box::from_raw(node) };
                return Pushed::Retired(node.entry);
            }
            // SAFETY: `node` is not published yet; only this thread sees it.
            unsafe { (*node).next = (cur & !FLAGS) as *mut Node<E> };
            // Release publishes the node; Acquire (on taking an idle lane)
            // sees what its last owner left.
            match self.state.compare_exchange_weak(cur, node as usize | OWNED | USED, AcqRel, Relaxed) {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        if cur & OWNED == 0 {
            Pushed::Schedule
        } else {
            self.backlog.fetch_add(1, Relaxed);
            Pushed::Queued
        }
    }

    /// Takes the oldest message.
    ///
    /// # Safety
    /// The caller holds the lane's token.
    pub unsafe fn pop(&self) -> Option<E> {
        // SAFETY: the token holder is the only one touching `head`/`fifo`.
        if let Some(e) = unsafe { self.head.with_mut(Option::take) } {
            return Some(e);
        }
        // SAFETY: as above.
        let got = unsafe {
            self.fifo.with_mut(|fifo| {
                if !fifo.is_empty() {
                    return fifo.pop_front();
                }
                // Empties the inbox, keeping the flags (the lane stays owned).
                let top = (self.state.fetch_and(FLAGS, Acquire) & !FLAGS) as *mut Node<E>;
                if top.is_null() {
                    return None;
                }
                let mut node = Box::from_raw(top);
                // Newest first: each goes in front of the ones after it; the
                // oldest (the last node) is handed out without a FIFO trip.
                while !node.next.is_null() {
                    let older = Box::from_raw(node.next);
                    fifo.push_front(node.entry);
                    node = older;
                }
                Some(node.entry)
            })
        };
        if got.is_some() && self.backlog.load(Relaxed) > 0 {
            self.backlog.fetch_sub(1, Relaxed);
        }
        got
    }

    /// Puts a message back at the head (a retry).
    ///
    /// # Safety
    /// The caller holds the lane's token.
    pub unsafe fn push_front(&self, entry: E) {
        // SAFETY: the token holder is the only one touching `head`/`fifo`.
        unsafe {
            if let Some(old) = self.head.with_mut(|h| h.replace(entry)) {
                self.fifo.with_mut(|fifo| fifo.push_front(old));
                self.backlog.fetch_add(1, Relaxed);
            }
        }
    }

    /// Gives up the token if the lane has nothing left.
    ///
    /// # Safety
    /// The caller holds the lane's token; after `Idle` it no longer does.
    pub unsafe fn release(&self) -> Released {
        // SAFETY: the token holder is the only one touching `head`/`fifo`.
        if unsafe { self.head.with_mut(|h| h.is_some()) } {
            return Released::Reschedule;
        }
        // SAFETY: as above.
        let more = unsafe {
            self.fifo.with_mut(|fifo| {
                if fifo.is_empty() && fifo.capacity() > 64 {
                    // An idle lane keeps a small buffer, not a past backlog's.
                    fifo.shrink_to(8);
                }
                !fifo.is_empty()
            })
        };
        if more {
            return Released::Reschedule;
        }
        let mut cur = self.state.load(Relaxed);
        loop {
            if cur & !FLAGS != 0 {
                return Released::Reschedule;
            }
            // Release hands `head`/`fifo` to whoever takes the lane next.
            match self.state.compare_exchange_weak(cur, cur & USED, Release, Relaxed) {
                Ok(_) => return Released::Idle,
                Err(now) => cur = now,
            }
        }
    }

    /// Retires the lane if it is idle, empty and unused since the last
    /// `take_used`; a retired lane refuses every push. True if this call
    /// retired it.
    pub fn try_retire(&self) -> bool {
        self.state.compare_exchange(0, RETIRED, Acquire, Relaxed).is_ok()
    }

    pub fn is_retired(&self) -> bool {
        self.state.load(Relaxed) & RETIRED != 0
    }

    /// Idle (unowned, empty) right now.
    pub fn is_idle(&self) -> bool {
        self.state.load(Relaxed) & !USED == 0
    }

    /// Clears the "pushed to since the last sweep" mark; true if it was set.
    pub fn take_used(&self) -> bool {
        self.state.fetch_and(!USED, Relaxed) & USED != 0
    }

    /// Messages queued in the lane behind its head (approximate while
    /// others push or pop), plus one if it is owned.
    pub fn depth(&self) -> usize {
        let owned = self.state.load(Relaxed) & OWNED != 0;
        self.backlog.load(Relaxed) + usize::from(owned)
    }
}

impl<E> Drop for Lane<E> {
    fn drop(&mut self) {
        let mut p = (self.state.load(Relaxed) & !FLAGS) as *mut Node<E>;
        while !p.is_null() {
            // SAFETY: `&mut self`: nobody else can reach the inbox any more.
            let node = unsafe { Box::from_raw(p) };
            p = node.next;
        }
    }
}
