//! Per-partition state: the commit window, and how many of the partition's
//! messages are queued (so `revoke` can say how many it dropped).

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{AcqRel, Acquire};

use parking_lot::Mutex;

use crate::watermark::OffsetWindow;

/// Set once the partition is revoked; the low bits count queued messages.
const REVOKED: u64 = 1 << 63;
const COUNT: u64 = REVOKED - 1;

#[derive(Debug)]
pub struct Partition {
    pub(crate) id: i32,
    /// `REVOKED | queued`. Every transition is a single read-modify-write,
    /// so the order of those RMWs decides each race with `revoke`: a pop
    /// ordered before the revoke took a live message (its ticket will be
    /// stale), a pop ordered after it found a tombstone (counted as dropped).
    state: AtomicU64,
    pub(crate) window: Mutex<OffsetWindow>,
}

impl Partition {
    pub(crate) fn new(id: i32) -> Self {
        Partition { id, state: AtomicU64::new(0), window: Mutex::new(OffsetWindow::new()) }
    }

    pub(crate) fn is_revoked(&self) -> bool {
        self.state.load(Acquire) & REVOKED != 0
    }

    /// Called with the window locked, so it cannot race with `revoke`.
    pub(crate) fn add_queued(&self, n: u64) {
        self.state.fetch_add(n, AcqRel);
    }

    /// A queued message leaves the queue (popped). False if the partition
    /// was revoked: the message is a tombstone. After a revoke the count is
    /// no longer read, so the decrement on the dead state is harmless, and it
    /// cannot underflow: every tombstone was counted when the revoke read it.
    pub(crate) fn take_queued(&self) -> bool {
        self.state.fetch_sub(1, AcqRel) & REVOKED == 0
    }

    /// A retried message goes back in the queue. False if revoked.
    pub(crate) fn put_back_queued(&self) -> bool {
        self.state.fetch_add(1, AcqRel) & REVOKED == 0
    }

    /// Marks the partition revoked; returns how many queued messages that
    /// dropped (0 if it was revoked already). Call with the window locked.
    pub(crate) fn revoke(&self) -> u64 {
        let prev = self.state.fetch_or(REVOKED, AcqRel);
        if prev & REVOKED != 0 { 0 } else { prev & COUNT }
    }
}
