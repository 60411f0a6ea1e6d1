//! The dispatcher keylane shipped before its lock-free one (issue #13):
//! sharded lanes, batch-amortized synchronization behind mutexes. Kept here
//! only as the measured comparison of `cargo bench --bench dispatch`.
//!
//! - Lanes are spread over [`SHARDS`] shards by their id. A shard's lanes,
//!   its ready queue and its lane index are plain data behind one
//!   `parking_lot::Mutex`. A batch call groups its work by shard and takes
//!   each shard's lock once, so a batch of 1,000 messages costs a few dozen
//!   lock acquisitions, not thousands of atomic operations.
//! - Unordered messages (ordering `"none"`, key-less messages under `"key"`)
//!   skip lanes and share one FIFO, so they keep push order.
//! - Each partition has a commit window and an epoch behind its own mutex.
//!   `revoke` bumps the epoch (tickets handed out earlier become stale) and
//!   removes the partition's queued messages at once, under the partition's
//!   lock, so no message of a revoked partition is ever handed out after
//!   `revoke` returns.
//! - Lock order, everywhere: partition windows in increasing partition id,
//!   then shards one at a time. Nothing takes a window while holding a
//!   shard, so no two calls can wait on each other.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize};

use crossbeam_utils::CachePadded;
use parking_lot::{Mutex, MutexGuard};
use scc::{Guard, HashIndex};

use keylane_core::dispatch::{
    Accepted, Config, Counters, Dispatch, LaneHasher, LaneKey, Popped, Prepared, ReceiptInfo, Retried,
    Revoked, Stats, Ticket, distinct_sorted,
};
use keylane_core::watermark::check_next;

use crate::offset_window::OffsetWindow;
use keylane_core::{Error, Result};

/// Number of lane shards (a power of two). Enough that two or three threads
/// rarely meet on one shard, few enough that a batch touches each once.
pub const SHARDS: usize = 16;
/// A shard sweeps idle lanes only once it has more than this many, and more
/// idle lanes than lanes in use. A sweep keeps lanes used since the previous
/// sweep (a second chance), so a working set of keys keeps its lanes while a
/// stream of ever-new keys does not grow memory without bound. Sweeps cost
/// O(lanes) and happen at most once per `SWEEP_MIN_IDLE` lanes going idle.
const SWEEP_MIN_IDLE: usize = 1024;
/// An idle lane keeps at most this much queue capacity for its next burst.
const IDLE_LANE_CAPACITY: usize = 4;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

#[derive(Debug)]
struct Entry<T> {
    item: T,
    partition: i32,
    epoch: u32,
    offset: i64,
    attempt: u32,
}

/// A FIFO that keeps its head inline: most lanes hold zero or one message,
/// and then pushing and popping never touch a separate buffer.
#[derive(Debug)]
struct LaneQueue<T> {
    /// Invariant: `None` only when `tail` is empty too.
    head: Option<Entry<T>>,
    tail: VecDeque<Entry<T>>,
}

impl<T> LaneQueue<T> {
    fn new() -> Self {
        LaneQueue { head: None, tail: VecDeque::new() }
    }

    fn is_empty(&self) -> bool {
        self.head.is_none()
    }

    fn len(&self) -> usize {
        usize::from(self.head.is_some()) + self.tail.len()
    }

    fn push_back(&mut self, e: Entry<T>) {
        if self.head.is_none() {
            self.head = Some(e);
        } else {
            self.tail.push_back(e);
        }
    }

    fn push_front(&mut self, e: Entry<T>) {
        if let Some(old) = self.head.replace(e) {
            self.tail.push_front(old);
        }
    }

    fn pop_front(&mut self) -> Option<Entry<T>> {
        let head = self.head.take();
        self.head = self.tail.pop_front();
        head
    }

    /// Keeps the entries for which `keep` is true, handing the others to
    /// `drop_item`, in order.
    fn retain(&mut self, mut keep: impl FnMut(&Entry<T>) -> bool, mut drop_item: impl FnMut(T)) {
        let all = self.head.take().into_iter().chain(std::mem::take(&mut self.tail));
        let mut kept = LaneQueue::new();
        for e in all {
            if keep(&e) { kept.push_back(e) } else { drop_item(e.item) }
        }
        *self = kept;
    }

    fn iter(&self) -> impl Iterator<Item = &Entry<T>> {
        self.head.iter().chain(self.tail.iter())
    }
}

#[derive(Debug)]
struct Lane<T> {
    queue: LaneQueue<T>,
    /// In the shard's ready queue. Never together with `busy`.
    scheduled: bool,
    /// Its head message is in flight.
    busy: bool,
    /// Pushed to since the last sweep.
    used: bool,
}

#[derive(Debug)]
struct ShardState<T> {
    /// Lanes by id, stored in the table itself (no second lookup).
    lanes: HashMap<u64, Lane<T>, foldhash::fast::RandomState>,
    /// Ids of scheduled lanes, in the order they became ready.
    ready: VecDeque<u64>,
    /// Lanes neither scheduled, busy, nor holding messages.
    idle: usize,
}

#[derive(Debug)]
struct Shard<T> {
    state: Mutex<ShardState<T>>,
    /// `ready.len()` as of the last unlock: lets `pop_ready` skip empty
    /// shards without locking them. Only a hint; the lock decides.
    ready_hint: AtomicUsize,
}

#[derive(Debug)]
struct Solo<T> {
    queue: Mutex<VecDeque<Entry<T>>>,
    hint: AtomicUsize,
}

#[derive(Debug)]
struct PartitionState {
    window: OffsetWindow,
    /// Bumped by every revoke; tickets carry the epoch they were pushed in.
    epoch: u32,
}

#[derive(Debug)]
struct Partition {
    state: Mutex<PartitionState>,
    /// Tickets of this partition handed out and not yet completed or
    /// retried, any epoch. Relaxed atomics outside the lock, added once per
    /// pop call; a completion can overtake the add of its own pop, so it is
    /// signed and read as `max(0, n)`.
    in_flight: AtomicI64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Solo,
    Lane { shard: usize, id: u64 },
}

/// Proof that a message is in flight: give it back to `complete` or `retry`.
#[derive(Debug)]
pub struct Receipt {
    slot: Slot,
    partition: i32,
    epoch: u32,
    offset: i64,
    attempt: u32,
    owner: u64,
}

impl ReceiptInfo for Receipt {
    fn partition(&self) -> i32 {
        self.partition
    }
    fn offset(&self) -> i64 {
        self.offset
    }
    fn attempt(&self) -> u32 {
        self.attempt
    }
}

/// The sharded, mutex-based dispatcher. See the module docs.
pub struct Dispatcher<T> {
    config: Config,
    id: u64,
    lanes_of: LaneHasher,
    shards: Box<[CachePadded<Shard<T>>]>,
    solo: CachePadded<Solo<T>>,
    /// Partition states are created on first push and never removed (a
    /// revoke resets one in place), so an `Arc` to one stays meaningful.
    partitions: HashIndex<i32, Arc<Partition>, foldhash::fast::RandomState>,
    cursor: AtomicUsize,
    counters: Counters,
}

impl<T> fmt::Debug for Dispatcher<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dispatcher")
            .field("config", &self.config)
            .field("queued", &self.counters.queued.load(Relaxed))
            .field("in_flight", &self.counters.in_flight.load(Relaxed))
            .finish_non_exhaustive()
    }
}

/// The distinct partitions of a batch, sorted, with their states locked in
/// that order.
struct Locked<'a> {
    ids: Vec<i32>,
    /// `ids`' positions by partition number, when the numbers are small
    /// (they nearly always are): one load per lookup instead of a search.
    table: Vec<u16>,
    guards: Vec<MutexGuard<'a, PartitionState>>,
}

impl Locked<'_> {
    #[inline]
    fn slot(&self, partition: i32) -> usize {
        match self.table.get(partition as u32 as usize) {
            Some(&j) if j != u16::MAX => j as usize,
            _ => self.ids.binary_search(&partition).expect("partition was collected"),
        }
    }
}

impl<T: Send> Dispatch<T> for Dispatcher<T> {
    type Receipt = Receipt;

    fn new(config: Config) -> Result<Self> {
        config.validate()?;
        let shards = (0..SHARDS)
            .map(|_| {
                CachePadded::new(Shard {
                    state: Mutex::new(ShardState {
                        lanes: HashMap::default(),
                        ready: VecDeque::new(),
                        idle: 0,
                    }),
                    ready_hint: AtomicUsize::new(0),
                })
            })
            .collect();
        Ok(Dispatcher {
            config,
            id: NEXT_ID.fetch_add(1, Relaxed),
            lanes_of: LaneHasher::new(config.ordering, config.seed),
            shards,
            solo: CachePadded::new(Solo { queue: Mutex::new(VecDeque::new()), hint: AtomicUsize::new(0) }),
            partitions: HashIndex::with_hasher(foldhash::fast::RandomState::default()),
            cursor: AtomicUsize::new(0),
            counters: Counters::default(),
        })
    }

    fn config(&self) -> Config {
        self.config
    }

    #[inline]
    fn lane_of(&self, key: Option<&[u8]>, partition: i32) -> LaneKey {
        self.lanes_of.lane_of(key, partition)
    }

    fn push_many(&self, batch: Vec<Prepared<T>>) -> Result<Accepted<T>> {
        if batch.is_empty() {
            return Ok(Accepted { count: 0, rejected: Vec::new() });
        }
        let parts = self.partitions_of(batch.iter().map(|p| p.partition));
        let mut locked = lock_all(&parts);
        let mut last: Vec<Option<i64>> = locked.guards.iter().map(|g| g.window.last_pushed()).collect();
        for (index, p) in batch.iter().enumerate() {
            let j = locked.slot(p.partition);
            check_next(last[j], p.offset).map_err(|e| Error::InBatch {
                index,
                partition: p.partition,
                error: Box::new(e),
            })?;
            last[j] = Some(p.offset);
        }
        let count = Counters::reserve(&self.counters.held, self.config.capacity, batch.len());
        let mut sizes = [0usize; SHARDS + 1];
        for p in &batch[..count] {
            sizes[source_of(p.lane)] += 1;
        }
        let mut buckets: Vec<Vec<(u64, Entry<T>)>> =
            sizes[..SHARDS].iter().map(|&n| Vec::with_capacity(n)).collect();
        let mut solos = Vec::with_capacity(sizes[SHARDS]);
        let mut rest = batch.into_iter();
        for p in rest.by_ref().take(count) {
            let j = locked.slot(p.partition);
            let state = &mut locked.guards[j];
            state.window.push(p.offset).expect("validated above");
            let entry = Entry {
                item: p.item,
                partition: p.partition,
                epoch: state.epoch,
                offset: p.offset,
                attempt: 0,
            };
            match p.lane {
                LaneKey::Solo => solos.push(entry),
                LaneKey::Lane(id) => buckets[shard_of(id)].push((id, entry)),
            }
        }
        // Counted before they become visible: a message may be popped the
        // moment its shard is unlocked.
        self.counters.queued.fetch_add(count, Relaxed);
        for (s, bucket) in buckets.into_iter().enumerate() {
            if bucket.is_empty() {
                continue;
            }
            let shard = &self.shards[s];
            let mut st = shard.state.lock();
            for (id, entry) in bucket {
                st.push(id, entry);
            }
            shard.ready_hint.store(st.ready.len(), Relaxed);
        }
        if !solos.is_empty() {
            let mut q = self.solo.queue.lock();
            q.extend(solos);
            self.solo.hint.store(q.len(), Relaxed);
        }
        // Windows stay locked until the messages are in their lanes, so a
        // revoke of these partitions either sees all of them or none.
        drop(locked);
        self.counters.pushed.fetch_add(count as u64, Relaxed);
        Ok(Accepted { count, rejected: rest.map(|p| p.item).collect() })
    }

    fn pop_ready(&self, max_items: usize) -> Popped<T, Receipt> {
        // Sized by what is queued, not by what is asked: a caller may ask
        // for usize::MAX.
        let asked = max_items.min(self.counters.queued());
        let want = Counters::reserve(&self.counters.in_flight, self.config.max_in_flight, asked);
        let mut tickets = Vec::with_capacity(want);
        if want > 0 {
            // Sources are the shards plus the unordered queue. Each takes an
            // equal share first, then whatever is left, starting from a
            // rotating source: round-robin across shards, FIFO within one.
            let sources = SHARDS + 1;
            let active = (0..sources).filter(|&s| self.hint(s) > 0).count();
            if active > 0 {
                let share = want.div_ceil(active);
                let start = self.cursor.fetch_add(1, Relaxed);
                for pass in 0..2 {
                    for i in 0..sources {
                        let left = want - tickets.len();
                        if left == 0 {
                            break;
                        }
                        let s = (start + i) % sources;
                        if self.hint(s) == 0 {
                            continue;
                        }
                        let budget = if pass == 0 { share.min(left) } else { left };
                        self.take(s, budget, &mut tickets);
                    }
                }
            }
        }
        let got = tickets.len();
        if got < want {
            self.counters.in_flight.fetch_sub(want - got, Relaxed);
        }
        self.counters.queued.fetch_sub(got, Relaxed);
        self.count_in_flight(&tickets);
        Popped { tickets, discarded: Vec::new() }
    }

    fn complete_many(&self, receipts: Vec<Receipt>) -> Result<usize> {
        if receipts.is_empty() {
            return Ok(0);
        }
        for r in &receipts {
            self.check_owner(r)?;
        }
        let parts = self.partitions_of(receipts.iter().map(|r| r.partition));
        let mut locked = lock_all(&parts);
        let mut live = 0;
        let mut finished = vec![0i64; parts.len()];
        for r in &receipts {
            let j = locked.slot(r.partition);
            finished[j] += 1;
            let state = &mut locked.guards[j];
            if state.epoch == r.epoch {
                let done = state.window.complete(r.offset);
                debug_assert!(done, "in-flight offset {} was not outstanding", r.offset);
                live += 1;
            }
        }
        drop(locked);
        for ((_, part), n) in parts.iter().zip(finished) {
            part.in_flight.fetch_sub(n, Relaxed);
        }
        self.release_all(receipts.iter().map(|r| r.slot));
        let n = receipts.len();
        self.counters.completed.fetch_add(live as u64, Relaxed);
        self.counters.stale.fetch_add((n - live) as u64, Relaxed);
        self.counters.in_flight.fetch_sub(n, Relaxed);
        self.counters.held.fetch_sub(n, Relaxed);
        Ok(live)
    }

    fn retry(&self, receipt: Receipt, item: T) -> Result<Retried<T>> {
        self.check_owner(&receipt)?;
        let part = self.partition(receipt.partition);
        let state = part.state.lock();
        part.in_flight.fetch_sub(1, Relaxed);
        self.counters.in_flight.fetch_sub(1, Relaxed);
        if state.epoch != receipt.epoch {
            drop(state);
            self.release_all([receipt.slot]);
            self.counters.held.fetch_sub(1, Relaxed);
            self.counters.stale.fetch_add(1, Relaxed);
            return Ok(Retried::Stale(item));
        }
        let entry = Entry {
            item,
            partition: receipt.partition,
            epoch: receipt.epoch,
            offset: receipt.offset,
            attempt: receipt.attempt.saturating_add(1),
        };
        self.counters.queued.fetch_add(1, Relaxed);
        // The partition stays locked while the message goes back, so a
        // revoke cannot miss it.
        match receipt.slot {
            Slot::Lane { shard, id } => {
                let shard = &self.shards[shard];
                let mut st = shard.state.lock();
                st.lane(id).queue.push_front(entry);
                st.release(id);
                shard.ready_hint.store(st.ready.len(), Relaxed);
            }
            Slot::Solo => {
                let mut q = self.solo.queue.lock();
                q.push_back(entry);
                self.solo.hint.store(q.len(), Relaxed);
            }
        }
        drop(state);
        self.counters.retried.fetch_add(1, Relaxed);
        Ok(Retried::Requeued)
    }

    fn committable(&self) -> Vec<(i32, i64)> {
        let guard = Guard::new();
        let mut out: Vec<(i32, i64)> = self
            .partitions
            .iter(&guard)
            .filter_map(|(&id, p)| p.state.lock().window.committable().map(|w| (id, w)))
            .collect();
        out.sort_unstable();
        out
    }

    fn revoke(&self, partitions: &[i32]) -> Revoked<T> {
        self.remove_queued(partitions, true)
    }

    fn stats(&self) -> Stats {
        let (mut lanes, mut max_lane_depth) = (0, 0);
        for shard in self.shards.iter() {
            let st = shard.state.lock();
            lanes += st.lanes.len();
            max_lane_depth = st.lanes.values().map(|l| l.queue.len()).fold(max_lane_depth, usize::max);
        }
        self.counters.snapshot(lanes, max_lane_depth)
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
}

impl<T: Send> Dispatcher<T> {
    /// Drops the queued messages of `partitions` without forgetting their
    /// watermarks: a dropped message stays outstanding, so `committable`
    /// stops below it, while in-flight messages go on and may complete.
    /// With `in_flight_of`, this lets a rebalance wait for running handlers
    /// only, commit exactly what is done, and then `revoke`.
    pub fn drop_queued(&self, partitions: &[i32]) -> Revoked<T> {
        self.remove_queued(partitions, false)
    }

    /// Messages of `partitions` handed out and not yet completed or retried.
    pub fn in_flight_of(&self, partitions: &[i32]) -> usize {
        let guard = Guard::new();
        partitions
            .iter()
            .filter_map(|id| self.partitions.peek(id, &guard))
            .map(|p| p.in_flight.load(Relaxed).max(0) as usize)
            .sum()
    }

    fn count_in_flight(&self, tickets: &[Ticket<T, Receipt>]) {
        // A pop spans few partitions: tally, then one atomic add each.
        let mut tally: Vec<(i32, i64)> = Vec::new();
        for t in tickets {
            match tally.iter_mut().find(|(p, _)| *p == t.receipt.partition) {
                Some((_, n)) => *n += 1,
                None => tally.push((t.receipt.partition, 1)),
            }
        }
        for (p, n) in tally {
            self.partition(p).in_flight.fetch_add(n, Relaxed);
        }
    }

    /// Removes the queued messages of `partitions`; with `forget`, also
    /// bumps their epochs and resets their windows (a revoke).
    fn remove_queued(&self, partitions: &[i32], forget: bool) -> Revoked<T> {
        let guard = Guard::new();
        let mut ids: Vec<i32> =
            partitions.iter().copied().filter(|id| self.partitions.peek(id, &guard).is_some()).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.is_empty() {
            return Revoked { count: 0, discarded: Vec::new() };
        }
        let parts = self.partitions_of(ids.iter().copied());
        let mut locked = lock_all(&parts);
        if forget {
            for state in &mut locked.guards {
                state.epoch = state.epoch.wrapping_add(1);
                state.window = OffsetWindow::new();
            }
        }
        let gone = |e: &Entry<T>| ids.binary_search(&e.partition).is_ok();
        let mut discarded = Vec::new();
        for shard in self.shards.iter() {
            let mut st = shard.state.lock();
            for lane in st.lanes.values_mut() {
                if lane.queue.iter().any(gone) {
                    lane.queue.retain(|e| !gone(e), |item| discarded.push(item));
                }
            }
            // Lanes left empty stay scheduled or busy; `pop_ready` and
            // `complete` retire them as usual.
        }
        {
            let mut q = self.solo.queue.lock();
            if q.iter().any(gone) {
                let queue = std::mem::take(&mut *q);
                for e in queue {
                    if gone(&e) { discarded.push(e.item) } else { q.push_back(e) }
                }
            }
            self.solo.hint.store(q.len(), Relaxed);
        }
        drop(locked);
        let count = discarded.len();
        self.counters.queued.fetch_sub(count, Relaxed);
        self.counters.held.fetch_sub(count, Relaxed);
        self.counters.revoked.fetch_add(count as u64, Relaxed);
        Revoked { count, discarded }
    }

    /// True if `r` was handed out by this dispatcher.
    pub fn owns(&self, r: &Receipt) -> bool {
        r.owner == self.id
    }

    fn check_owner(&self, r: &Receipt) -> Result<()> {
        if r.owner != self.id {
            return Err(Error::ForeignTicket);
        }
        Ok(())
    }

    fn partition(&self, id: i32) -> Arc<Partition> {
        let guard = Guard::new();
        loop {
            if let Some(p) = self.partitions.peek(&id, &guard) {
                return Arc::clone(p);
            }
            let fresh = Arc::new(Partition {
                state: Mutex::new(PartitionState { window: OffsetWindow::new(), epoch: 0 }),
                in_flight: AtomicI64::new(0),
            });
            if self.partitions.insert_sync(id, Arc::clone(&fresh)).is_ok() {
                return fresh;
            }
        }
    }

    /// The distinct partitions among `ids`, sorted, with their states.
    fn partitions_of(&self, ids: impl Iterator<Item = i32>) -> Vec<(i32, Arc<Partition>)> {
        distinct_sorted(ids).into_iter().map(|id| (id, self.partition(id))).collect()
    }

    fn hint(&self, source: usize) -> usize {
        match self.shards.get(source) {
            Some(shard) => shard.ready_hint.load(Relaxed),
            None => self.solo.hint.load(Relaxed),
        }
    }

    /// Hands out up to `budget` messages from one source.
    fn take(&self, source: usize, budget: usize, out: &mut Vec<Ticket<T, Receipt>>) {
        let Some(shard) = self.shards.get(source) else {
            let mut q = self.solo.queue.lock();
            let n = budget.min(q.len());
            for e in q.drain(..n) {
                out.push(self.ticket(e, Slot::Solo));
            }
            self.solo.hint.store(q.len(), Relaxed);
            return;
        };
        let mut st = shard.state.lock();
        let mut taken = 0;
        while taken < budget {
            let Some(id) = st.ready.pop_front() else { break };
            let lane = st.lane(id);
            lane.scheduled = false;
            match lane.queue.pop_front() {
                Some(e) => {
                    lane.busy = true;
                    out.push(self.ticket(e, Slot::Lane { shard: source, id }));
                    taken += 1;
                }
                // Emptied by a revoke while it waited.
                None => st.went_idle(),
            }
        }
        shard.ready_hint.store(st.ready.len(), Relaxed);
    }

    fn ticket(&self, e: Entry<T>, slot: Slot) -> Ticket<T, Receipt> {
        Ticket {
            item: e.item,
            receipt: Receipt {
                slot,
                partition: e.partition,
                epoch: e.epoch,
                offset: e.offset,
                attempt: e.attempt,
                owner: self.id,
            },
        }
    }

    /// Frees the in-flight slot of each lane, locking each shard once.
    fn release_all(&self, slots: impl IntoIterator<Item = Slot> + Clone) {
        let mut sizes = [0usize; SHARDS];
        for slot in slots.clone() {
            if let Slot::Lane { shard, .. } = slot {
                sizes[shard] += 1;
            }
        }
        let mut by_shard: Vec<Vec<u64>> = sizes.iter().map(|&n| Vec::with_capacity(n)).collect();
        for slot in slots {
            if let Slot::Lane { shard, id } = slot {
                by_shard[shard].push(id);
            }
        }
        for (s, ids) in by_shard.into_iter().enumerate() {
            if ids.is_empty() {
                continue;
            }
            let shard = &self.shards[s];
            let mut st = shard.state.lock();
            for id in ids {
                st.release(id);
            }
            shard.ready_hint.store(st.ready.len(), Relaxed);
        }
    }
}

impl<T> ShardState<T> {
    /// A lane known to exist (busy or scheduled lanes are never swept).
    fn lane(&mut self, id: u64) -> &mut Lane<T> {
        self.lanes.get_mut(&id).expect("busy and scheduled lanes stay in their shard")
    }

    fn push(&mut self, id: u64, entry: Entry<T>) {
        let lane = self.lanes.entry(id).or_insert_with(|| {
            // A new lane counts as idle until this push takes it.
            self.idle += 1;
            Lane { queue: LaneQueue::new(), scheduled: false, busy: false, used: false }
        });
        let was_idle = !lane.scheduled && !lane.busy && lane.queue.is_empty();
        lane.used = true;
        lane.queue.push_back(entry);
        if !lane.scheduled && !lane.busy {
            lane.scheduled = true;
            self.ready.push_back(id);
        }
        if was_idle {
            self.idle -= 1;
        }
    }

    /// The lane's in-flight message is done (or gone): schedule it again if
    /// it has more, else it goes idle.
    fn release(&mut self, id: u64) {
        let lane = self.lane(id);
        debug_assert!(lane.busy && !lane.scheduled);
        lane.busy = false;
        if lane.queue.is_empty() {
            lane.queue.tail.shrink_to(IDLE_LANE_CAPACITY);
            self.went_idle();
        } else {
            lane.scheduled = true;
            self.ready.push_back(id);
        }
    }

    fn went_idle(&mut self) {
        self.idle += 1;
        if self.idle > SWEEP_MIN_IDLE && self.idle * 2 > self.lanes.len() {
            let ShardState { lanes, idle, .. } = self;
            *idle = 0;
            lanes.retain(|_, lane| {
                let in_use = lane.busy || lane.scheduled || !lane.queue.is_empty();
                let keep = in_use || std::mem::take(&mut lane.used);
                if keep && !in_use {
                    *idle += 1;
                }
                keep
            });
        }
    }
}

/// The shard of a lane, or `SHARDS` for the unordered queue.
#[inline]
fn source_of(lane: LaneKey) -> usize {
    match lane {
        LaneKey::Solo => SHARDS,
        LaneKey::Lane(id) => shard_of(id),
    }
}

/// Which shard a lane lives in. Lane ids of keys are already hashes, but
/// partition lanes use the partition number, so mix before taking bits.
#[inline]
fn shard_of(lane_id: u64) -> usize {
    (lane_id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - SHARDS.trailing_zeros())) as usize
}

fn lock_all(parts: &[(i32, Arc<Partition>)]) -> Locked<'_> {
    let ids: Vec<i32> = parts.iter().map(|(id, _)| *id).collect();
    let mut table = Vec::new();
    if let (Some(&first), Some(&last)) = (ids.first(), ids.last())
        && first >= 0
        && last < 4096
    {
        table = vec![u16::MAX; last as usize + 1];
        for (j, &id) in ids.iter().enumerate() {
            table[id as usize] = j as u16;
        }
    }
    // `parts` is sorted by id: every caller locks in the same order.
    Locked { ids, table, guards: parts.iter().map(|(_, p)| p.state.lock()).collect() }
}
