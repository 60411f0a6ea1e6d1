//! The per-key dispatch queue: hands out only messages that are safe to
//! process now under the chosen ordering model, and tracks which offsets are
//! safe to commit.
//!
//! # Shape
//!
//! - A **lane** is the FIFO of one key (`Key`), one partition (`Partition`)
//!   or of everything (`Total`). At most one message per lane is in flight.
//!   Messages with no ordering constraint (`Unordered`, and key-less messages
//!   under `Key`) skip lanes and go straight to the ready queue.
//! - The **ready queue** (a crossbeam `SegQueue`) holds lanes that may hand
//!   out their head message, in the order they became ready. A lane goes to
//!   the back after each message, so lanes are served round-robin and a busy
//!   key cannot starve the others.
//! - Lanes are found through an `scc::HashIndex` (lock-free reads) keyed by a
//!   64-bit hash of the key, seeded per dispatcher. Two keys whose hashes
//!   collide share a lane: that serializes them, which never breaks order,
//!   and with a 64-bit hash it does not happen in practice.
//! - Each partition has an [`OffsetWindow`] (commit watermark) and a queued
//!   count, in [`partition::Partition`].
//!
//! Concurrency, invariants and memory orderings are argued in
//! docs/design.md ("Dispatcher").

mod lane;
mod partition;

use std::fmt;
use std::hash::BuildHasher;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::Ordering::{AcqRel, Relaxed};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};

use crossbeam_queue::SegQueue;
use scc::{Guard, HashIndex};

pub use lane::{AtomicLane, Entry, LaneStore, LockedLane, Release};
use partition::Partition;

use crate::watermark::check_next;
use crate::{Error, Result};

/// Which messages may run concurrently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ordering {
    /// One message in flight in the whole dispatcher, in push order.
    Total,
    /// At most one in flight per partition, in offset order.
    Partition,
    /// At most one in flight per key, FIFO per key; keys run in parallel.
    /// Messages without a key are unordered.
    Key,
    /// No constraint; handed out in push order.
    Unordered,
}

impl Ordering {
    pub fn as_str(self) -> &'static str {
        match self {
            Ordering::Total => "total",
            Ordering::Partition => "partition",
            Ordering::Key => "key",
            Ordering::Unordered => "none",
        }
    }
}

impl fmt::Display for Ordering {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Ordering {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "total" => Ok(Ordering::Total),
            "partition" => Ok(Ordering::Partition),
            "key" => Ok(Ordering::Key),
            "none" => Ok(Ordering::Unordered),
            other => Err(Error::InvalidArgument(format!(
                "ordering must be one of \"total\", \"partition\", \"key\", \"none\"; got {other:?}"
            ))),
        }
    }
}

/// Where a message goes: a lane, or straight to the ready queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaneKey {
    Solo,
    Lane(u64),
}

/// A message ready to be pushed: its lane is decided (by
/// [`Dispatcher::lane_of`]) before the push, so callers can compute it while
/// the key bytes are at hand.
#[derive(Debug)]
pub struct Prepared<T> {
    pub lane: LaneKey,
    pub partition: i32,
    pub offset: i64,
    pub item: T,
}

/// Proof that a message is in flight; give it back to `complete` or `retry`.
/// Consumed by value, so a receipt cannot be completed twice.
#[derive(Debug)]
pub struct Receipt<L> {
    lane: Option<Arc<L>>,
    part: Arc<Partition>,
    owner: u64,
    offset: i64,
    attempt: u32,
}

impl<L> Receipt<L> {
    pub fn partition(&self) -> i32 {
        self.part.id
    }
    pub fn offset(&self) -> i64 {
        self.offset
    }
    /// 0 on first delivery, +1 per retry.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

/// A message handed out by [`Dispatcher::pop_ready`].
#[derive(Debug)]
pub struct Ticket<T, L> {
    pub item: T,
    pub receipt: Receipt<L>,
}

/// Result of [`Dispatcher::pop_ready`]. `discarded` holds the items of
/// revoked messages met on the way, for the caller to drop where it likes
/// (the Python binding drops them with the GIL held).
#[derive(Debug)]
pub struct Popped<T, L> {
    pub tickets: Vec<Ticket<T, L>>,
    pub discarded: Vec<T>,
}

/// Result of [`Dispatcher::push_many`]: how many of the batch (a prefix) were
/// accepted, and the items of the rest, refused for lack of capacity.
#[derive(Debug)]
pub struct Accepted<T> {
    pub count: usize,
    pub rejected: Vec<T>,
}

/// Result of [`Dispatcher::retry`].
#[derive(Debug)]
pub enum Retried<T> {
    /// Back at the head of its lane with `attempt + 1`.
    Requeued,
    /// Its partition was revoked meanwhile: dropped; here is the item.
    Stale(T),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    pub ordering: Ordering,
    /// Bound on queued + in-flight messages (plus revoked ones not yet
    /// swept out of their lanes).
    pub capacity: usize,
    /// Bound on in-flight messages.
    pub max_in_flight: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            ordering: Ordering::Key,
            capacity: 100_000,
            max_in_flight: 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    pub pushed: u64,
    pub completed: u64,
    pub retried: u64,
    /// Completions and retries of tickets whose partition was revoked.
    pub stale: u64,
    /// Queued messages dropped by `revoke`.
    pub revoked: u64,
    pub queued: usize,
    pub in_flight: usize,
    /// Revoked messages still sitting in lanes (dropped when reached).
    pub tombstones: usize,
    pub lanes: usize,
    pub max_lane_depth: usize,
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
pub struct Dispatcher<T, L = LockedLane<T>> {
    config: Config,
    id: u64,
    hasher: foldhash::fast::RandomState,
    lanes: HashIndex<u64, Arc<L>, foldhash::fast::RandomState>,
    partitions: HashIndex<i32, Arc<Partition>, foldhash::fast::RandomState>,
    ready: SegQueue<Ready<T, L>>,
    /// Entries held in memory: queued + in flight + tombstones.
    held: AtomicUsize,
    queued: AtomicUsize,
    in_flight: AtomicUsize,
    lanes_total: AtomicUsize,
    idle_lanes: AtomicUsize,
    sweeping: AtomicBool,
    pushed: AtomicU64,
    completed: AtomicU64,
    retried: AtomicU64,
    stale: AtomicU64,
    revoked: AtomicU64,
}

impl<T, L> fmt::Debug for Dispatcher<T, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dispatcher")
            .field("config", &self.config)
            .field("queued", &self.queued.load(Relaxed))
            .field("in_flight", &self.in_flight.load(Relaxed))
            .finish_non_exhaustive()
    }
}

impl<T: Send, L: LaneStore<T>> Dispatcher<T, L> {
    pub fn new(config: Config) -> Result<Self> {
        if config.capacity == 0 {
            return Err(Error::InvalidArgument("capacity must be >= 1".into()));
        }
        if config.max_in_flight == 0 {
            return Err(Error::InvalidArgument("max_in_flight must be >= 1".into()));
        }
        Ok(Dispatcher {
            config,
            id: NEXT_ID.fetch_add(1, Relaxed),
            hasher: foldhash::fast::RandomState::default(),
            lanes: HashIndex::with_hasher(foldhash::fast::RandomState::default()),
            partitions: HashIndex::with_hasher(foldhash::fast::RandomState::default()),
            ready: SegQueue::new(),
            held: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            lanes_total: AtomicUsize::new(0),
            idle_lanes: AtomicUsize::new(0),
            sweeping: AtomicBool::new(false),
            pushed: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            revoked: AtomicU64::new(0),
        })
    }

    pub fn config(&self) -> Config {
        self.config
    }

    /// The lane a message with this key and partition belongs to.
    #[inline]
    pub fn lane_of(&self, key: Option<&[u8]>, partition: i32) -> LaneKey {
        match self.config.ordering {
            Ordering::Total => LaneKey::Lane(0),
            Ordering::Partition => LaneKey::Lane(u64::from(partition as u32)),
            Ordering::Key => match key {
                Some(k) => LaneKey::Lane(self.hasher.hash_one(k)),
                None => LaneKey::Solo,
            },
            Ordering::Unordered => LaneKey::Solo,
        }
    }

    pub fn queued(&self) -> usize {
        self.queued.load(Relaxed)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Relaxed)
    }

    /// Room left under `capacity`.
    pub fn free_capacity(&self) -> usize {
        self.config.capacity.saturating_sub(self.held.load(Relaxed))
    }

    /// Pushes one message; `Error::QueueFull` if there is no room.
    pub fn push(&self, p: Prepared<T>) -> Result<()> {
        let accepted = self.push_many(vec![p])?;
        if accepted.count == 0 {
            Err(Error::QueueFull {
                capacity: self.config.capacity,
            })
        } else {
            Ok(())
        }
    }

    /// Pushes a batch. Validation is all-or-nothing: if any entry breaks a
    /// rule (offsets strictly increasing per partition, non-negative), the
    /// error names it and nothing is changed. Capacity is not an error: the
    /// longest prefix that fits is accepted and the rest handed back.
    pub fn push_many(&self, batch: Vec<Prepared<T>>) -> Result<Accepted<T>> {
        if batch.is_empty() {
            return Ok(Accepted {
                count: 0,
                rejected: Vec::new(),
            });
        }
        let mut ids: Vec<i32> = batch.iter().map(|p| p.partition).collect();
        ids.sort_unstable();
        ids.dedup();
        let slot = |partition: i32| ids.binary_search(&partition).expect("collected above");
        let guard = Guard::new();
        loop {
            // Windows are locked in partition order, so two batches can never
            // wait on each other.
            let parts: Vec<Arc<Partition>> =
                ids.iter().map(|&id| self.partition(id, &guard)).collect();
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
            let count = self.reserve(&self.held, self.config.capacity, batch.len());
            // Count first: an entry may be popped the instant it is enqueued.
            let mut per_part = vec![0u64; ids.len()];
            for p in &batch[..count] {
                per_part[slot(p.partition)] += 1;
            }
            for (part, n) in parts.iter().zip(&per_part) {
                part.add_queued(*n);
            }
            self.queued.fetch_add(count, Relaxed);
            let mut rest = batch.into_iter();
            for p in rest.by_ref().take(count) {
                let j = slot(p.partition);
                windows[j].push(p.offset).expect("validated above");
                let entry = Entry {
                    item: p.item,
                    part: Arc::clone(&parts[j]),
                    offset: p.offset,
                    attempt: 0,
                };
                self.enqueue(p.lane, entry, &guard);
            }
            drop(windows);
            self.pushed.fetch_add(count as u64, Relaxed);
            return Ok(Accepted {
                count,
                rejected: rest.map(|p| p.item).collect(),
            });
        }
    }

    /// Hands out up to `max_items` messages that may run now (fewer if
    /// `max_in_flight` is reached or nothing more is ready).
    pub fn pop_ready(&self, max_items: usize) -> Popped<T, L> {
        let want = self.reserve(&self.in_flight, self.config.max_in_flight, max_items);
        let mut tickets = Vec::with_capacity(want);
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
            self.in_flight.fetch_sub(want - got, Relaxed);
        }
        self.queued.fetch_sub(got, Relaxed);
        Popped { tickets, discarded }
    }

    /// Marks a message done. `Ok(false)`: its partition was revoked while it
    /// was in flight (the ticket is stale; nothing is committed for it).
    pub fn complete(&self, receipt: Receipt<L>) -> Result<bool> {
        self.check_owner(&receipt)?;
        Ok(self.finish(receipt))
    }

    /// `complete` for a batch: all receipts are checked before any is
    /// completed. Returns how many were live (not stale).
    pub fn complete_many(&self, receipts: Vec<Receipt<L>>) -> Result<usize> {
        for r in &receipts {
            self.check_owner(r)?;
        }
        Ok(receipts
            .into_iter()
            .map(|r| usize::from(self.finish(r)))
            .sum())
    }

    /// Gives a message back: it returns to the head of its lane with
    /// `attempt + 1`, and its lane stays blocked, so no later message of the
    /// key overtakes it. Unordered messages go to the back of the ready
    /// queue (nothing is behind them to overtake).
    pub fn retry(&self, receipt: Receipt<L>, item: T) -> Result<Retried<T>> {
        self.check_owner(&receipt)?;
        self.in_flight.fetch_sub(1, Relaxed);
        let Receipt {
            lane,
            part,
            offset,
            attempt,
            ..
        } = receipt;
        if !part.put_back_queued() {
            self.held.fetch_sub(1, Relaxed);
            self.stale.fetch_add(1, Relaxed);
            if let Some(lane) = lane {
                self.release_lane(lane);
            }
            return Ok(Retried::Stale(item));
        }
        self.queued.fetch_add(1, Relaxed);
        self.retried.fetch_add(1, Relaxed);
        let entry = Entry {
            item,
            part,
            offset,
            attempt: attempt.saturating_add(1),
        };
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
    pub fn committable(&self) -> Vec<(i32, i64)> {
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
    pub fn revoke(&self, partitions: impl IntoIterator<Item = i32>) -> usize {
        let guard = Guard::new();
        let mut dropped = 0u64;
        for id in partitions {
            let Some(part) = self.partitions.peek(&id, &guard).cloned() else {
                continue;
            };
            let _window = part.window.lock();
            dropped += part.revoke();
            self.partitions
                .remove_if_sync(&id, |p| Arc::ptr_eq(p, &part));
        }
        let dropped = usize::try_from(dropped).expect("bounded by capacity");
        self.queued.fetch_sub(dropped, Relaxed);
        self.revoked.fetch_add(dropped as u64, Relaxed);
        dropped
    }

    pub fn stats(&self) -> Stats {
        let guard = Guard::new();
        let (lanes, max_lane_depth) = self
            .lanes
            .iter(&guard)
            .fold((0, 0), |(n, max), (_, l)| (n + 1, max.max(l.depth())));
        let queued = self.queued.load(Relaxed);
        let in_flight = self.in_flight.load(Relaxed);
        Stats {
            pushed: self.pushed.load(Relaxed),
            completed: self.completed.load(Relaxed),
            retried: self.retried.load(Relaxed),
            stale: self.stale.load(Relaxed),
            revoked: self.revoked.load(Relaxed),
            queued,
            in_flight,
            tombstones: self.held.load(Relaxed).saturating_sub(queued + in_flight),
            lanes,
            max_lane_depth,
        }
    }

    // ---- internals ------------------------------------------------------

    /// Takes up to `want` units of `counter` under `limit`.
    fn reserve(&self, counter: &AtomicUsize, limit: usize, want: usize) -> usize {
        let mut cur = counter.load(Relaxed);
        loop {
            let take = want.min(limit.saturating_sub(cur));
            if take == 0 {
                return 0;
            }
            match counter.compare_exchange_weak(cur, cur + take, Relaxed, Relaxed) {
                Ok(_) => return take,
                Err(now) => cur = now,
            }
        }
    }

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

    fn ticket(&self, e: Entry<T>, lane: Option<Arc<L>>) -> Ticket<T, L> {
        Ticket {
            item: e.item,
            receipt: Receipt {
                lane,
                part: e.part,
                owner: self.id,
                offset: e.offset,
                attempt: e.attempt,
            },
        }
    }

    fn tombstone(&self, e: Entry<T>, discarded: &mut Vec<T>) {
        self.held.fetch_sub(1, Relaxed);
        discarded.push(e.item);
    }

    fn check_owner(&self, r: &Receipt<L>) -> Result<()> {
        if r.owner != self.id {
            return Err(Error::ForeignTicket);
        }
        Ok(())
    }

    fn finish(&self, receipt: Receipt<L>) -> bool {
        let live = !receipt.part.is_revoked();
        if live {
            let done = receipt.part.window.lock().complete(receipt.offset);
            debug_assert!(
                done,
                "in-flight offset {} was not outstanding",
                receipt.offset
            );
            self.completed.fetch_add(1, Relaxed);
        } else {
            self.stale.fetch_add(1, Relaxed);
        }
        self.in_flight.fetch_sub(1, Relaxed);
        self.held.fetch_sub(1, Relaxed);
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
        self.sweeping
            .store(false, std::sync::atomic::Ordering::Release);
    }
}
