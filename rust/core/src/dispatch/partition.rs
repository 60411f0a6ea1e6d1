//! Per-partition state of the lock-free dispatcher.
//!
//! - `feeding`: a claim on the partition's feeding state. A push takes the
//!   claims of its batch's partitions with one CAS each and never waits for
//!   another push — one that meets a push of the same partition in progress
//!   fails with `Error::ConcurrentPush`, changing nothing (a partition's
//!   offsets come from one feeder; two at once could not be in offset order
//!   anyway). `revoke` and `drop_queued`, the rebalance path, take the claim
//!   too, waiting for a push in progress; a push that meets one of them
//!   waits for it, which is a handful of atomic operations that themselves
//!   wait for nothing. That is the only waiting in the dispatcher.
//! - `state`: generation (high bits) | queued count (low bits), changed only
//!   by read-modify-writes. A queued entry carries the generation it was
//!   pushed in; taking it is a CAS that checks the generation and counts
//!   it out in one step, and a drop is a CAS that bumps the generation and
//!   zeroes the count, so each entry is either handed out or counted as
//!   dropped, never both.
//! - `epoch`: bumped by `revoke`; a ticket whose epoch is older is stale.
#![allow(unsafe_code)]

use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU32, AtomicU64};

use crossbeam_utils::{Backoff, CachePadded};

use super::window::Window;

const FREE: u8 = 0;
const PUSHING: u8 = 1;
const DROPPING: u8 = 2;
const COUNT_BITS: u32 = 34;
const COUNT: u64 = (1 << COUNT_BITS) - 1;
/// Queued entries carry the low 24 bits of their generation: a drop is
/// told apart from the one 16,777,216 drops later only if an entry waits
/// through all of them.
const GENERATION_MASK: u32 = (1 << 24) - 1;

fn generation_of(state: u64) -> u32 {
    (state >> COUNT_BITS) as u32 & GENERATION_MASK
}

#[derive(Debug)]
pub struct Partition {
    pub id: i32,
    epoch: AtomicU32,
    /// Taken out per message by poppers: apart from what the feeder writes.
    state: CachePadded<AtomicU64>,
    feeding: CachePadded<AtomicU8>,
    /// Tickets handed out and not yet completed or retried, any epoch.
    pub in_flight: CachePadded<AtomicI64>,
    pub window: Window,
}

impl Partition {
    pub fn new(id: i32) -> Self {
        Partition {
            id,
            epoch: AtomicU32::new(0),
            state: CachePadded::new(AtomicU64::new(0)),
            feeding: CachePadded::new(AtomicU8::new(FREE)),
            in_flight: CachePadded::new(AtomicI64::new(0)),
            window: Window::new(),
        }
    }

    /// Takes the feeding claim for a push. False if another push holds it;
    /// waits out a drop in progress.
    pub fn claim_push(&self) -> bool {
        let backoff = Backoff::new();
        loop {
            match self.feeding.compare_exchange(FREE, PUSHING, Acquire, Relaxed) {
                Ok(_) => return true,
                Err(PUSHING) => return false,
                Err(_) => backoff.snooze(),
            }
        }
    }

    /// Takes the feeding claim for a drop, waiting for a push in progress.
    fn claim_drop(&self) {
        let backoff = Backoff::new();
        while self.feeding.compare_exchange(FREE, DROPPING, Acquire, Relaxed).is_err() {
            backoff.snooze();
        }
    }

    pub fn unclaim(&self) {
        self.feeding.store(FREE, Release);
    }

    pub fn epoch(&self) -> u32 {
        self.epoch.load(Acquire)
    }

    /// The current generation. Stable while the caller holds the claim.
    pub fn generation(&self) -> u32 {
        generation_of(self.state.load(Acquire))
    }

    /// Counts `n` entries of the current generation in (a push, under the
    /// claim, before they become visible).
    pub fn add_queued(&self, n: u64) {
        self.state.fetch_add(n, AcqRel);
    }

    /// Counts one entry of generation `generation` out; false if that
    /// generation was dropped (the entry is a tombstone).
    pub fn take_queued(&self, generation: u32) -> bool {
        self.state
            .fetch_update(AcqRel, Acquire, |s| {
                (generation_of(s) == generation && s & COUNT > 0).then(|| s - 1)
            })
            .is_ok()
    }

    /// Counts a retried entry of generation `generation` back in; false if
    /// that generation was dropped meanwhile (the entry is dropped too).
    pub fn requeue(&self, generation: u32) -> bool {
        self.state.fetch_update(AcqRel, Acquire, |s| (generation_of(s) == generation).then(|| s + 1)).is_ok()
    }

    /// Drops every queued entry (they become tombstones); returns how many.
    /// With `forget`, also stales in-flight tickets and forgets the
    /// watermark. Waits for the feeding claim.
    pub fn drop_queued(&self, forget: bool) -> u64 {
        self.claim_drop();
        let old = self
            .state
            .fetch_update(AcqRel, Acquire, |s| {
                let generation = (s >> COUNT_BITS).wrapping_add(1) & ((1 << (64 - COUNT_BITS)) - 1);
                Some(generation << COUNT_BITS)
            })
            .expect("the update always applies");
        // SAFETY: the claim is held. Entries find their generation in their
        // block: the next push starts a block of the new one.
        unsafe { self.window.seal() };
        if forget {
            // After the generation: a pop reads the epoch before it takes an
            // entry, so an entry taken before the drop gets the old epoch and
            // its ticket is stale, as an in-flight one should be.
            self.epoch.fetch_add(1, AcqRel);
            // SAFETY: the claim is held.
            unsafe { self.window.forget() };
        }
        self.unclaim();
        old & COUNT
    }
}
