//! The lock-free alternative design, kept to measure the shipped design
//! against (see docs/design.md, "Dispatcher") and tested by the same suite.
//!
//! - Lanes are found through an `scc::HashIndex` (lock-free reads).
//! - Each lane is a [`LaneStore`]: either a crossbeam `SegQueue` with its
//!   state in one atomic word ([`AtomicLane`]), or a `VecDeque` behind a
//!   per-lane mutex ([`LockedLane`]).
//! - The ready queue is a crossbeam `SegQueue`.
//! - Revoked messages are left in place as tombstones and skipped when
//!   reached; a per-partition atomic counts queued messages so `revoke` can
//!   report how many it dropped.
//!
//! Every message costs about twenty atomic read-modify-writes here, which is
//! what the sharded design amortizes away.

mod lane;
mod partition;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering::{AcqRel, Relaxed};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};

use crossbeam_queue::SegQueue;
use scc::{Guard, HashIndex};

pub use lane::{AtomicLane, Entry, LaneStore, LockedLane, Release};
use partition::Partition;

use super::{
    Accepted, Config, Counters, Dispatch, LaneHasher, LaneKey, Popped, Prepared, Retried, Revoked, Stats,
    Ticket,
};
use crate::watermark::check_next;
use crate::{Error, Result};

/// Proof that a message is in flight.
pub struct Receipt<L> {
    lane: Option<Arc<L>>,
    part: Arc<Partition>,
    owner: u64,
    offset: i64,
    attempt: u32,
}

impl<L> fmt::Debug for Receipt<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receipt")
            .field("partition", &self.part.id)
            .field("offset", &self.offset)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

impl<L> super::ReceiptInfo for Receipt<L> {
    fn partition(&self) -> i32 {
        self.part.id
    }
    fn offset(&self) -> i64 {
        self.offset
    }
    fn attempt(&self) -> u32 {
        self.attempt
    }
}

enum Ready<T, L> {
    Lane(Arc<L>),
    Solo(Entry<T>),
}

/// Idle lanes are swept once there are more than this many of them and they
/// make up over half of all lanes, so sweeping is amortized O(1) per idle
/// transition while a steady set of keys keeps its lanes (and their buffers).
const SWEEP_MIN_IDLE: usize = 4096;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The per-key dispatch queue. `T` is the caller's payload; `L` the lane
/// storage (see [`lane`]).
pub struct LockFreeDispatcher<T, L = LockedLane<T>> {
    config: Config,
    id: u64,
    hasher: LaneHasher,
    lanes: HashIndex<u64, Arc<L>, foldhash::fast::RandomState>,
    partitions: HashIndex<i32, Arc<Partition>, foldhash::fast::RandomState>,
    ready: SegQueue<Ready<T, L>>,
    counters: Counters,
    lanes_total: AtomicUsize,
    idle_lanes: AtomicUsize,
    sweeping: AtomicBool,
}

impl<T, L> fmt::Debug for LockFreeDispatcher<T, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockFreeDispatcher")
            .field("config", &self.config)
            .field("queued", &self.counters.queued.load(Relaxed))
            .field("in_flight", &self.counters.in_flight.load(Relaxed))
            .finish_non_exhaustive()
    }
}

impl<T: Send, L: LaneStore<T>> Dispatch<T> for LockFreeDispatcher<T, L> {
    type Receipt = Receipt<L>;

    fn new(config: Config) -> Result<Self> {
        config.validate()?;
        Ok(LockFreeDispatcher {
            config,
            id: NEXT_ID.fetch_add(1, Relaxed),
            hasher: LaneHasher::new(config.ordering, config.seed),
            lanes: HashIndex::with_hasher(foldhash::fast::RandomState::default()),
            partitions: HashIndex::with_hasher(foldhash::fast::RandomState::default()),
            ready: SegQueue::new(),
            counters: Counters::default(),
            lanes_total: AtomicUsize::new(0),
            idle_lanes: AtomicUsize::new(0),
            sweeping: AtomicBool::new(false),
        })
    }

    fn config(&self) -> Config {
        self.config
    }

    fn lane_of(&self, key: Option<&[u8]>, partition: i32) -> LaneKey {
        self.hasher.lane_of(key, partition)
    }

    fn queued(&self) -> usize {
        self.counters.queued()
    }

    fn in_flight(&self) -> usize {
        self.counters.in_flight()
    }

    fn free_capacity(&self) -> usize {
        self.counters.free(self.config.capacity)
    }

    /// Pushes a batch. Validation is all-or-nothing: if any entry breaks a
    /// rule (offsets strictly increasing per partition, non-negative), the
    /// error names it and nothing is changed. Capacity is not an error: the
    /// longest prefix that fits is accepted and the rest handed back.
    fn push_many(&self, batch: Vec<Prepared<T>>) -> Result<Accepted<T>> {
        if batch.is_empty() {
            return Ok(Accepted { count: 0, rejected: Vec::new() });
        }
        let mut ids: Vec<i32> = batch.iter().map(|p| p.partition).collect();
        ids.sort_unstable();
        ids.dedup();
        let slot = |partition: i32| ids.binary_search(&partition).expect("collected above");
        let guard = Guard::new();
        loop {
            // Windows are locked in partition order, so two batches can never
            // wait on each other.
            let parts: Vec<Arc<Partition>> = ids.iter().map(|&id| self.partition(id, &guard)).collect();
            let mut windows: Vec<_> = parts.iter().map(|p| p.window.lock()).collect();
            if parts.iter().any(|p| p.is_revoked()) {
                // Revoked between lookup and lock: look up the fresh state.
                continue;
            }
            let mut last: Vec<Option<i64>> = windows.iter().map(|w| w.last_pushed()).collect();
            for (index, p) in batch.iter().enumerate() {
                let j = slot(p.partition);
                check_next(last[j], p.offset).map_err(|e| Error::InBatch {
                    index,
                    partition: p.partition,
                    error: Box::new(e),
                })?;
                last[j] = Some(p.offset);
            }
            let count = Counters::reserve(&self.counters.held, self.config.capacity, batch.len());
            // Count first: an entry may be popped the instant it is enqueued.
            let mut per_part = vec![0u64; ids.len()];
            for p in &batch[..count] {
                per_part[slot(p.partition)] += 1;
            }
            for (part, n) in parts.iter().zip(&per_part) {
                part.add_queued(*n);
            }
            self.counters.queued.fetch_add(count, Relaxed);
            let mut rest = batch.into_iter();
            for p in rest.by_ref().take(count) {
                let j = slot(p.partition);
                windows[j].push(p.offset).expect("validated above");
                let entry = Entry { item: p.item, part: Arc::clone(&parts[j]), offset: p.offset, attempt: 0 };
                self.enqueue(p.lane, entry, &guard);
            }
            drop(windows);
            self.counters.pushed.fetch_add(count as u64, Relaxed);
            return Ok(Accepted { count, rejected: rest.map(|p| p.item).collect() });
        }
    }

    /// Hands out up to `max_items` messages that may run now (fewer if
    /// `max_in_flight` is reached or nothing more is ready).
    fn pop_ready(&self, max_items: usize) -> Popped<T, Receipt<L>> {
        let want = Counters::reserve(&self.counters.in_flight, self.config.max_in_flight, max_items);
        // Allocated by what is queued, not by what is asked (a caller may ask
        // for usize::MAX); pops also clear tombstones, so `want` stays.
        let mut tickets = Vec::with_capacity(want.min(self.counters.queued()));
        let mut discarded = Vec::new();
        while tickets.len() < want {
            let Some(ready) = self.ready.pop() else { break };
            match ready {
                Ready::Solo(e) => {
                    if e.part.take_queued() {
                        tickets.push(self.ticket(e, None));
                    } else {
                        self.tombstone(e, &mut discarded);
                    }
                }
                Ready::Lane(lane) => loop {
                    match lane.pop_front() {
                        Some(e) if e.part.take_queued() => {
                            tickets.push(self.ticket(e, Some(lane)));
                            break;
                        }
                        Some(e) => self.tombstone(e, &mut discarded),
                        None => {
                            // Nothing but tombstones were left.
                            self.release_lane(lane);
                            break;
                        }
                    }
                },
            }
        }
        let got = tickets.len();
        if got < want {
            self.counters.in_flight.fetch_sub(want - got, Relaxed);
        }
        self.counters.queued.fetch_sub(got, Relaxed);
        Popped { tickets, discarded }
    }

    /// Marks a message done. `Ok(false)`: its partition was revoked while it
    /// was in flight (the ticket is stale; nothing is committed for it).
    fn complete_many(&self, receipts: Vec<Receipt<L>>) -> Result<usize> {
        for r in &receipts {
            self.check_owner(r)?;
        }
        let n = receipts.len();
        let live: usize = receipts.into_iter().map(|r| usize::from(self.finish(r))).sum();
        // Counters once per batch, not once per message.
        self.counters.completed.fetch_add(live as u64, Relaxed);
        self.counters.stale.fetch_add((n - live) as u64, Relaxed);
        self.counters.in_flight.fetch_sub(n, Relaxed);
        self.counters.held.fetch_sub(n, Relaxed);
        Ok(live)
    }

    fn retry(&self, receipt: Receipt<L>, item: T) -> Result<Retried<T>> {
        self.check_owner(&receipt)?;
        self.counters.in_flight.fetch_sub(1, Relaxed);
        let Receipt { lane, part, offset, attempt, .. } = receipt;
        if !part.put_back_queued() {
            self.counters.held.fetch_sub(1, Relaxed);
            self.counters.stale.fetch_add(1, Relaxed);
            if let Some(lane) = lane {
                self.release_lane(lane);
            }
            return Ok(Retried::Stale(item));
        }
        self.counters.queued.fetch_add(1, Relaxed);
        self.counters.retried.fetch_add(1, Relaxed);
        let entry = Entry { item, part, offset, attempt: attempt.saturating_add(1) };
        match lane {
            Some(lane) => {
                lane.push_front(entry);
                self.release_lane(lane);
            }
            None => self.ready.push(Ready::Solo(entry)),
        }
        Ok(Retried::Requeued)
    }

    /// Per partition, the next offset that is safe to commit, sorted by
    /// partition.
    fn committable(&self) -> Vec<(i32, i64)> {
        let guard = Guard::new();
        let mut out: Vec<(i32, i64)> = self
            .partitions
            .iter(&guard)
            .filter(|(_, p)| !p.is_revoked())
            .filter_map(|(&id, p)| p.window.lock().committable().map(|w| (id, w)))
            .collect();
        out.sort_unstable();
        out
    }

    /// Forgets `partitions`: their queued messages are dropped (lazily: they
    /// are skipped when reached), their in-flight tickets become stale, their
    /// watermarks are forgotten, and pushes may start again at any offset.
    /// Returns the number of queued messages dropped.
    fn revoke(&self, partitions: &[i32]) -> Revoked<T> {
        let guard = Guard::new();
        let mut dropped = 0u64;
        for &id in partitions {
            let Some(part) = self.partitions.peek(&id, &guard).cloned() else {
                continue;
            };
            let _window = part.window.lock();
            dropped += part.revoke();
            self.partitions.remove_if_sync(&id, |p| Arc::ptr_eq(p, &part));
        }
        let dropped = usize::try_from(dropped).expect("bounded by capacity");
        self.counters.queued.fetch_sub(dropped, Relaxed);
        self.counters.revoked.fetch_add(dropped as u64, Relaxed);
        // Items stay in their lanes as tombstones until reached.
        Revoked { count: dropped, discarded: Vec::new() }
    }

    fn stats(&self) -> Stats {
        let guard = Guard::new();
        let (lanes, max_lane_depth) =
            self.lanes.iter(&guard).fold((0, 0), |(n, max), (_, l)| (n + 1, max.max(l.depth())));
        self.counters.snapshot(lanes, max_lane_depth)
    }
}

impl<T: Send, L: LaneStore<T>> LockFreeDispatcher<T, L> {
    fn partition(&self, id: i32, guard: &Guard) -> Arc<Partition> {
        loop {
            if let Some(p) = self.partitions.peek(&id, guard) {
                return Arc::clone(p);
            }
            let fresh = Arc::new(Partition::new(id));
            if self.partitions.insert_sync(id, Arc::clone(&fresh)).is_ok() {
                return fresh;
            }
        }
    }

    fn lane(&self, id: u64, guard: &Guard) -> Arc<L> {
        loop {
            if let Some(l) = self.lanes.peek(&id, guard) {
                return Arc::clone(l);
            }
            let fresh = Arc::new(L::new());
            if self.lanes.insert_sync(id, Arc::clone(&fresh)).is_ok() {
                // A new lane counts as idle until its first push takes it.
                self.lanes_total.fetch_add(1, Relaxed);
                self.idle_lanes.fetch_add(1, Relaxed);
                return fresh;
            }
        }
    }

    fn enqueue(&self, key: LaneKey, entry: Entry<T>, guard: &Guard) {
        let id = match key {
            LaneKey::Solo => return self.ready.push(Ready::Solo(entry)),
            LaneKey::Lane(id) => id,
        };
        let mut entry = entry;
        loop {
            let lane = self.lane(id, guard);
            match lane.push_back(entry) {
                Ok(true) => {
                    self.idle_lanes.fetch_sub(1, Relaxed);
                    self.ready.push(Ready::Lane(lane));
                    return;
                }
                Ok(false) => return,
                Err(back) => {
                    // Retired by a sweep: drop it from the index (if the
                    // sweeper has not yet) and use a fresh lane.
                    entry = back;
                    if self.lanes.remove_if_sync(&id, |l| Arc::ptr_eq(l, &lane)) {
                        self.lanes_total.fetch_sub(1, Relaxed);
                    }
                }
            }
        }
    }

    fn ticket(&self, e: Entry<T>, lane: Option<Arc<L>>) -> Ticket<T, Receipt<L>> {
        Ticket {
            item: e.item,
            receipt: Receipt { lane, part: e.part, owner: self.id, offset: e.offset, attempt: e.attempt },
        }
    }

    fn tombstone(&self, e: Entry<T>, discarded: &mut Vec<T>) {
        self.counters.held.fetch_sub(1, Relaxed);
        discarded.push(e.item);
    }

    fn check_owner(&self, r: &Receipt<L>) -> Result<()> {
        if r.owner != self.id {
            return Err(Error::ForeignTicket);
        }
        Ok(())
    }

    /// Clears the offset and releases the lane; the caller updates the
    /// counters for its whole batch.
    fn finish(&self, receipt: Receipt<L>) -> bool {
        let live = !receipt.part.is_revoked();
        if live {
            let done = receipt.part.window.lock().complete(receipt.offset);
            debug_assert!(done, "in-flight offset {} was not outstanding", receipt.offset);
        }
        if let Some(lane) = receipt.lane {
            self.release_lane(lane);
        }
        live
    }

    fn release_lane(&self, lane: Arc<L>) {
        match lane.release() {
            Release::Reschedule => self.ready.push(Ready::Lane(lane)),
            Release::Idle => {
                let idle = self.idle_lanes.fetch_add(1, Relaxed) + 1;
                if idle > SWEEP_MIN_IDLE && idle * 2 > self.lanes_total.load(Relaxed) {
                    self.sweep();
                }
            }
        }
    }

    /// Drops idle, empty lanes from the index (one sweeper at a time).
    fn sweep(&self) {
        if self.sweeping.swap(true, AcqRel) {
            return;
        }
        let guard = Guard::new();
        let retired: Vec<(u64, Arc<L>)> = self
            .lanes
            .iter(&guard)
            .filter(|(_, l)| l.try_retire())
            .map(|(&id, l)| (id, Arc::clone(l)))
            .collect();
        self.idle_lanes.fetch_sub(retired.len(), Relaxed);
        for (id, lane) in retired {
            if self.lanes.remove_if_sync(&id, |l| Arc::ptr_eq(l, &lane)) {
                self.lanes_total.fetch_sub(1, Relaxed);
            }
        }
        self.sweeping.store(false, std::sync::atomic::Ordering::Release);
    }
}
