//! The dispatcher keylane ships: no lock on any hot path.
//!
//! - Lanes (one per key, partition, or the one of total order) are atomic
//!   state machines (`lane.rs`), found through a lock-free table
//!   (`lanes.rs`). Scheduled lanes wait in a crossbeam `SegQueue`;
//!   unordered messages in another, so they keep push order.
//! - Each partition (`partition.rs`) tracks completions in a chain of
//!   bitmap blocks (`window.rs`) that yields the commit watermark.
//! - Capacity and concurrency are reserved with CAS loops on counters.
//! - `revoke` and `drop_queued` do not remove messages from lanes: they
//!   bump the partition's generation, which turns its queued messages into
//!   tombstones, skipped (and handed back in `Popped::discarded`) when
//!   reached. They wait for a push of the partition in progress to finish;
//!   they are the only calls that wait.
//!
//! Memory is reclaimed through crossbeam-epoch: a call pins the epoch once
//! and only lanes, bucket snapshots and completion blocks unlinked while it
//! could be reading them wait for it.
#![allow(unsafe_code)]

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed};
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize};

use crossbeam_epoch::{self as epoch, Atomic, Guard, Owned};
use crossbeam_queue::SegQueue;

use super::lane::{Lane, Pushed, Released};
use super::lanes::Lanes;
use super::partition::Partition;
use super::window::{Block, Slot, Window};
use super::{
    Accepted, Config, Counters, Dispatch, LaneHasher, LaneKey, Popped, Prepared, ReceiptInfo, Retried,
    Revoked, Stats, Ticket, distinct_sorted,
};
use crate::watermark::check_next;
use crate::{Error, Result};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A queued message: its item and its slot, packed into one word (the
/// slot's block holds the generation and any retry count), so with the
/// binding's 16-byte item a node in a lane's inbox is 32 bytes, a size
/// class of its own in the allocator.
struct Entry<T> {
    item: T,
    slot: *const Block,
}

impl<T> Entry<T> {
    fn new(item: T, slot: Slot) -> Self {
        Entry { item, slot: slot.pack() }
    }

    fn slot(&self) -> Slot {
        // SAFETY: packed by `new`.
        unsafe { Slot::unpack(self.slot) }
    }

    fn generation(&self) -> u32 {
        // SAFETY: a queued entry's slot is unresolved, so its block is alive.
        unsafe { self.slot().generation() }
    }

    fn attempt(&self) -> u32 {
        // SAFETY: as above.
        unsafe { self.slot().attempt() }
    }

    fn part(&self) -> &Partition {
        // SAFETY: as above, and its owner is a partition, which lives as
        // long as the dispatcher.
        unsafe { &*self.slot().owner().cast::<Partition>() }
    }
}

/// A lane's address, moved through the ready queue and receipts. Only the
/// holder of the lane's token has one outside the table.
#[derive(Clone, Copy)]
struct LanePtr(*const ());

// SAFETY: see `Lane`: the token travels with this pointer.
unsafe impl Send for LanePtr {}

/// Proof that a message is in flight: give it back to `complete` or `retry`.
pub struct Receipt {
    owner: u64,
    lane: Option<LanePtr>,
    slot: Slot,
    partition: i32,
    offset: i64,
    epoch: u32,
    generation: u32,
    attempt: u32,
}

// SAFETY: a receipt holds a lane token and an unresolved slot, both usable
// from any thread.
unsafe impl Send for Receipt {}

impl fmt::Debug for Receipt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receipt")
            .field("partition", &self.partition)
            .field("offset", &self.offset)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
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

/// Partitions by id: an immutable sorted snapshot, replaced by CAS when a
/// partition is first seen (partitions are never removed).
struct PartTable {
    ids: Vec<i32>,
    parts: Vec<Arc<Partition>>,
}

/// The per-key dispatch queue keylane ships. See the module docs.
pub struct Dispatcher<T> {
    config: Config,
    id: u64,
    lanes_of: LaneHasher,
    lanes: Lanes<Entry<T>>,
    /// Scheduled lanes, in chunks: a call that schedules many lanes (a
    /// push, a batch of completions) adds them with one queue operation.
    ready: SegQueue<Vec<LanePtr>>,
    solo: SegQueue<Entry<T>>,
    partitions: Atomic<PartTable>,
    cursor: AtomicUsize,
    counters: Counters,
    /// Dropped messages still in lanes (their room is already free). Signed:
    /// a pop may discard one before the drop that made it has counted it.
    tombstones: AtomicI64,
}

// SAFETY: everything shared is atomic or lock-free; `T: Send` items move
// between threads inside entries.
unsafe impl<T: Send> Send for Dispatcher<T> {}
unsafe impl<T: Send> Sync for Dispatcher<T> {}

impl<T> fmt::Debug for Dispatcher<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dispatcher")
            .field("config", &self.config)
            .field("queued", &self.counters.queued())
            .field("in_flight", &self.counters.in_flight())
            .finish_non_exhaustive()
    }
}

impl<T: Send> Dispatch<T> for Dispatcher<T> {
    type Receipt = Receipt;

    fn new(config: Config) -> Result<Self> {
        config.validate()?;
        Ok(Dispatcher {
            config,
            id: NEXT_ID.fetch_add(1, Relaxed),
            lanes_of: LaneHasher::new(config.ordering, config.seed),
            lanes: Lanes::new(config.capacity),
            ready: SegQueue::new(),
            solo: SegQueue::new(),
            partitions: Atomic::new(PartTable { ids: Vec::new(), parts: Vec::new() }),
            cursor: AtomicUsize::new(0),
            counters: Counters::default(),
            tombstones: AtomicI64::new(0),
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
        let guard = epoch::pin();
        let ids = distinct_sorted(batch.iter().map(|p| p.partition));
        let parts: Vec<Arc<Partition>> = ids.iter().map(|&id| self.partition(id, &guard)).collect();
        let claimed = Claims::take(&parts)?;
        let slot_of = |p: i32| ids.binary_search(&p).expect("collected above");
        // SAFETY (every `window` call below): the claims are held.
        let mut last: Vec<Option<i64>> = parts.iter().map(|p| unsafe { p.window.last_pushed() }).collect();
        for (index, p) in batch.iter().enumerate() {
            let j = slot_of(p.partition);
            check_next(last[j], p.offset).map_err(|e| Error::InBatch {
                index,
                partition: p.partition,
                error: Box::new(e),
            })?;
            last[j] = Some(p.offset);
        }
        let count = Counters::reserve(&self.counters.held, self.config.capacity, batch.len());
        let mut per_part = vec![0u64; parts.len()];
        for p in &batch[..count] {
            per_part[slot_of(p.partition)] += 1;
        }
        // Counted before they become visible: a message may be popped (and
        // counted out) the moment it is in its lane.
        for (part, &n) in parts.iter().zip(&per_part) {
            if n > 0 {
                part.add_queued(n);
            }
        }
        self.counters.queued.fetch_add(count, Relaxed);
        let generations: Vec<u32> = parts.iter().map(|p| p.generation()).collect();
        // Every lane is looked up before the first push: a push is a CAS,
        // after which nothing proceeds until it is done, so lookups between
        // pushes each waited out their own cache misses (the lanes' lines
        // are often just written by a popping thread). Looked up in a row,
        // the misses overlap: 1.1x the two-thread throughput (median of
        // paired runs, examples/profile_dispatch_two.rs). Requesting the
        // lines again just before the pushes (prefetch, prefetchw) lost.
        let lanes: Vec<Option<&Lane<Entry<T>>>> = batch[..count]
            .iter()
            .map(|p| match p.lane {
                LaneKey::Solo => None,
                LaneKey::Lane(id) => Some(self.lanes.get(id, &guard)),
            })
            .collect();
        let mut scheduled = Vec::new();
        let mut rest = batch.into_iter();
        for (p, lane) in rest.by_ref().take(count).zip(lanes) {
            let j = slot_of(p.partition);
            let part = &parts[j];
            let owner: *const Partition = Arc::as_ptr(part);
            // SAFETY: the claim is held.
            let slot = unsafe { part.window.append(p.offset, owner.cast(), generations[j]) };
            let entry = Entry::new(p.item, slot);
            match (p.lane, lane) {
                (LaneKey::Lane(id), Some(lane)) => match lane.push(entry) {
                    Pushed::Schedule => scheduled.push(LanePtr(std::ptr::from_ref(lane).cast())),
                    Pushed::Queued => {}
                    // Retired since the lookup: look it up again.
                    Pushed::Retired(e) => self.push_to_lane(id, e, &mut scheduled, &guard),
                },
                _ => self.solo.push(entry),
            }
        }
        self.schedule(scheduled);
        drop(claimed);
        self.counters.pushed.fetch_add(count as u64, Relaxed);
        Ok(Accepted { count, rejected: rest.map(|p| p.item).collect() })
    }

    fn pop_ready(&self, max_items: usize) -> Popped<T, Receipt> {
        let asked = max_items.min(self.counters.queued());
        let want = Counters::reserve(&self.counters.in_flight, self.config.max_in_flight, asked);
        let mut out = Out {
            want,
            tickets: Vec::with_capacity(want),
            discarded: Vec::new(),
            idle: 0,
            again: Vec::new(),
            in_flight: Tally::default(),
        };
        // Dropped messages wait as tombstones until reached; with nothing to
        // hand out, still clear some, so their room comes back.
        let mut clear_only = if want == 0 && max_items > 0 && self.tombstones() > 0 { 64 } else { 0 };
        if want > 0 || clear_only > 0 {
            let guard = epoch::pin();
            // Lanes and unordered messages take turns, from a rotating start.
            let mut solo_turn = self.cursor.fetch_add(1, Relaxed) % 2 == 1;
            let (mut lanes_empty, mut solo_empty) = (false, want == 0);
            let mut chunk: Vec<LanePtr> = Vec::new();
            while !(lanes_empty && solo_empty && chunk.is_empty()) {
                if want > 0 {
                    if out.tickets.len() >= want {
                        break;
                    }
                } else if clear_only == 0 {
                    break;
                } else {
                    clear_only -= 1;
                }
                // Unordered messages are only taken to be handed out (one
                // taken and put back would lose its place in line).
                if solo_turn && !solo_empty && want > 0 {
                    match self.solo.pop() {
                        Some(e) => {
                            if let Took::Back(e) = self.take(e, None, &mut out) {
                                // Not reached (room was checked); never lose it.
                                self.solo.push(e);
                                solo_empty = true;
                            }
                        }
                        None => solo_empty = true,
                    }
                } else if !lanes_empty {
                    if chunk.is_empty() {
                        match self.ready.pop() {
                            // Taken oldest first.
                            Some(mut c) => {
                                c.reverse();
                                chunk = c;
                            }
                            None => lanes_empty = true,
                        }
                    }
                    if let Some(lane) = chunk.pop() {
                        self.take_from_lane(lane, &mut out);
                    }
                }
                solo_turn = !solo_turn;
            }
            // Lanes of a chunk not reached, and lanes put back, wait again.
            chunk.reverse();
            self.schedule(chunk);
            self.schedule(std::mem::take(&mut out.again));
            self.lanes.went_idle(out.idle, &guard);
        }
        let Out { tickets, discarded, in_flight, .. } = out;
        in_flight.apply();
        let got = tickets.len();
        if got < want {
            self.counters.in_flight.fetch_sub(want - got, Relaxed);
        }
        self.counters.queued.fetch_sub(got, Relaxed);
        if !discarded.is_empty() {
            self.tombstones.fetch_sub(discarded.len() as i64, Relaxed);
        }
        Popped { tickets, discarded }
    }

    fn complete_many(&self, receipts: Vec<Receipt>) -> Result<usize> {
        for r in &receipts {
            self.check_owner(r)?;
        }
        let guard = epoch::pin();
        let n = receipts.len();
        let mut live = 0;
        let mut idle = 0;
        let mut again = Vec::new();
        let mut in_flight = Tally::default();
        // Each release is a CAS on its lane's line; reading every line
        // first lets their misses overlap (see push_many).
        let mut depth = 0;
        for r in &receipts {
            if let Some(lane) = r.lane {
                depth += self.lane(lane).depth();
            }
        }
        std::hint::black_box(depth);
        for r in receipts {
            // SAFETY: a receipt's slot is unresolved until this call resolves it.
            let part = unsafe { &*r.slot.owner().cast::<Partition>() };
            in_flight.add(part, -1);
            let is_live = part.epoch() == r.epoch;
            // SAFETY: as above; the block is not touched after this.
            unsafe { r.slot.resolve(is_live) };
            live += usize::from(is_live);
            if let Some(lane) = r.lane {
                idle += usize::from(self.release(lane, &mut again));
            }
        }
        in_flight.apply();
        self.schedule(again);
        self.lanes.went_idle(idle, &guard);
        self.counters.completed.fetch_add(live as u64, Relaxed);
        self.counters.stale.fetch_add((n - live) as u64, Relaxed);
        self.counters.in_flight.fetch_sub(n, Relaxed);
        self.counters.held.fetch_sub(n, Relaxed);
        Ok(live)
    }

    fn retry(&self, receipt: Receipt, item: T) -> Result<Retried<T>> {
        self.check_owner(&receipt)?;
        let guard = epoch::pin();
        let r = receipt;
        // SAFETY: the receipt's slot is unresolved.
        let part = unsafe { &*r.slot.owner().cast::<Partition>() };
        part.in_flight.fetch_sub(1, Relaxed);
        self.counters.in_flight.fetch_sub(1, Relaxed);
        // Requeued only if its partition was neither revoked (epoch) nor
        // drained (generation) meanwhile; counted back in by the same CAS
        // that checks the generation, so a drop either counts it or sees it
        // gone.
        if part.epoch() != r.epoch || !part.requeue(r.generation) {
            // SAFETY: as above; the block is not touched after this.
            unsafe { r.slot.resolve(false) };
            let mut again = Vec::new();
            if let Some(lane) = r.lane
                && self.release(lane, &mut again)
            {
                self.lanes.went_idle(1, &guard);
            }
            self.schedule(again);
            self.counters.held.fetch_sub(1, Relaxed);
            self.counters.stale.fetch_add(1, Relaxed);
            return Ok(Retried::Stale(item));
        }
        self.counters.queued.fetch_add(1, Relaxed);
        // SAFETY: the receipt's slot is unresolved and held by this call.
        unsafe { r.slot.set_attempt(r.attempt.saturating_add(1)) };
        let entry = Entry::new(item, r.slot);
        match r.lane {
            Some(lane) => {
                // SAFETY: the receipt carried the lane's token; it goes back
                // to the ready queue with the retried message at the head.
                unsafe { self.lane(lane).push_front(entry) };
                self.schedule(vec![lane]);
            }
            None => self.solo.push(entry),
        }
        self.counters.retried.fetch_add(1, Relaxed);
        Ok(Retried::Requeued)
    }

    fn committable(&self) -> Vec<(i32, i64)> {
        let guard = epoch::pin();
        let mut out = Vec::new();
        for part in self.parts(&guard) {
            part.window.unlink_resolved(|block| {
                let block = BlockPtr(block);
                // SAFETY: unlinked; scanners pinned before are waited for.
                unsafe { guard.defer_unchecked(move || Window::free_block(block.0)) };
            });
            // SAFETY: `guard` keeps every block reachable now alive.
            if let Some(w) = unsafe { part.window.watermark() } {
                out.push((part.id, w));
            }
        }
        out
    }

    fn revoke(&self, partitions: &[i32]) -> Revoked<T> {
        self.remove_queued(partitions, true)
    }

    fn stats(&self) -> Stats {
        let guard = epoch::pin();
        let mut max_lane_depth = 0;
        self.lanes.for_each(&guard, |lane| max_lane_depth = max_lane_depth.max(lane.depth()));
        Stats { tombstones: self.tombstones(), ..self.counters.snapshot(self.lanes.len(), max_lane_depth) }
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

/// A completion block's address, moved into an epoch-deferred free.
struct BlockPtr(*mut Block);

/// The feeding claims of a batch's partitions, given back on drop.
struct Claims<'a>(&'a [Arc<Partition>]);

impl<'a> Claims<'a> {
    fn take(parts: &'a [Arc<Partition>]) -> Result<Self> {
        for (i, p) in parts.iter().enumerate() {
            if !p.claim_push() {
                for q in &parts[..i] {
                    q.unclaim();
                }
                return Err(Error::ConcurrentPush { partition: p.id });
            }
        }
        Ok(Claims(parts))
    }
}

impl Drop for Claims<'_> {
    fn drop(&mut self) {
        for p in self.0 {
            p.unclaim();
        }
    }
}

impl<T: Send> Dispatcher<T> {
    /// Drops the queued messages of `partitions` without forgetting their
    /// watermarks: a dropped message stays outstanding, so `committable`
    /// stops below it, while in-flight messages go on and may complete.
    pub fn drop_queued(&self, partitions: &[i32]) -> Revoked<T> {
        self.remove_queued(partitions, false)
    }

    /// Messages of `partitions` handed out and not yet completed or retried.
    pub fn in_flight_of(&self, partitions: &[i32]) -> usize {
        let guard = epoch::pin();
        self.parts(&guard)
            .filter(|p| partitions.contains(&p.id))
            .map(|p| p.in_flight.load(Relaxed).max(0) as usize)
            .sum()
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

    fn remove_queued(&self, partitions: &[i32], forget: bool) -> Revoked<T> {
        let guard = epoch::pin();
        let mut count = 0;
        for part in self.parts(&guard) {
            if partitions.contains(&part.id) {
                count += part.drop_queued(forget) as usize;
            }
        }
        // The dropped messages are tombstones now; their room is free at
        // once, their items come back from `pop_ready` as it meets them.
        self.tombstones.fetch_add(count as i64, Relaxed);
        self.counters.queued.fetch_sub(count, Relaxed);
        self.counters.held.fetch_sub(count, Relaxed);
        self.counters.revoked.fetch_add(count as u64, Relaxed);
        Revoked { count, discarded: Vec::new() }
    }

    fn parts<'g>(&self, guard: &'g Guard) -> impl Iterator<Item = &'g Arc<Partition>> + 'g {
        // SAFETY: tables are freed only through the epoch.
        let table = unsafe { self.partitions.load(Acquire, guard).deref() };
        table.parts.iter()
    }

    fn partition(&self, id: i32, guard: &Guard) -> Arc<Partition> {
        loop {
            let cur = self.partitions.load(Acquire, guard);
            // SAFETY: tables are freed only through the epoch.
            let table = unsafe { cur.deref() };
            let at = match table.ids.binary_search(&id) {
                Ok(i) => return Arc::clone(&table.parts[i]),
                Err(at) => at,
            };
            let mut ids = table.ids.clone();
            let mut parts = table.parts.clone();
            let fresh = Arc::new(Partition::new(id));
            ids.insert(at, id);
            parts.insert(at, Arc::clone(&fresh));
            let new = Owned::new(PartTable { ids, parts });
            if self.partitions.compare_exchange(cur, new, AcqRel, Acquire, guard).is_ok() {
                // SAFETY: unlinked by this CAS.
                unsafe { guard.defer_destroy(cur) };
                return fresh;
            }
        }
    }

    fn lane<'a>(&self, lane: LanePtr) -> &'a Lane<Entry<T>> {
        // SAFETY: a lane with a token outstanding is never retired or freed.
        unsafe { &*lane.0.cast::<Lane<Entry<T>>>() }
    }

    fn push_to_lane(&self, id: u64, mut entry: Entry<T>, scheduled: &mut Vec<LanePtr>, guard: &Guard) {
        loop {
            let lane = self.lanes.get(id, guard);
            match lane.push(entry) {
                Pushed::Schedule => {
                    scheduled.push(LanePtr(std::ptr::from_ref(lane).cast()));
                    return;
                }
                Pushed::Queued => return,
                // Retired between lookup and push: the table drops it; again.
                Pushed::Retired(e) => entry = e,
            }
        }
    }

    /// Puts lanes whose tokens the caller holds on the ready queue.
    fn schedule(&self, lanes: Vec<LanePtr>) {
        if !lanes.is_empty() {
            self.ready.push(lanes);
        }
    }

    /// The lane token holder is done with it for now: the lane goes to
    /// `again` if it has more. True if it went idle.
    fn release(&self, lane: LanePtr, again: &mut Vec<LanePtr>) -> bool {
        // SAFETY: the caller holds the token.
        match unsafe { self.lane(lane).release() } {
            Released::Reschedule => {
                again.push(lane);
                false
            }
            Released::Idle => true,
        }
    }

    /// Hands out the next live message of a scheduled lane (or, when
    /// nothing may be handed out, clears its leading tombstones).
    fn take_from_lane(&self, lane: LanePtr, out: &mut Out<T>) {
        let l = self.lane(lane);
        loop {
            // SAFETY: taken from the ready queue: this thread holds the token.
            match unsafe { l.pop() } {
                Some(e) => match self.take(e, Some(lane), out) {
                    // The token went with the ticket.
                    Took::Ticket => return,
                    Took::Tombstone => {}
                    Took::Back(e) => {
                        // SAFETY: still the token holder; the lane goes back.
                        unsafe { l.push_front(e) };
                        out.again.push(lane);
                        return;
                    }
                },
                None => {
                    // SAFETY: still the token holder.
                    match unsafe { l.release() } {
                        Released::Idle => {
                            out.idle += 1;
                            return;
                        }
                        Released::Reschedule => {}
                    }
                }
            }
        }
    }

    /// Turns a queued entry into a ticket, or discards it if its partition
    /// dropped it. Gives the entry back if it is live but nothing may be
    /// handed out.
    fn take(&self, e: Entry<T>, lane: Option<LanePtr>, out: &mut Out<T>) -> Took<T> {
        let part = e.part();
        let may_hand_out = out.tickets.len() < out.want;
        // The epoch first (see Partition::drop_queued).
        let epoch = part.epoch();
        if may_hand_out && part.take_queued(e.generation()) {
            out.in_flight.add(part, 1);
            let receipt = Receipt {
                owner: self.id,
                lane,
                slot: e.slot(),
                partition: part.id,
                // SAFETY: unresolved.
                offset: unsafe { e.slot().offset() },
                epoch,
                generation: e.generation(),
                attempt: e.attempt(),
            };
            out.tickets.push(Ticket { item: e.item, receipt });
            return Took::Ticket;
        }
        if part.generation() != e.generation() {
            // A tombstone: its partition dropped it.
            // SAFETY: the entry's slot is unresolved; not touched after.
            unsafe { e.slot().resolve(false) };
            out.discarded.push(e.item);
            return Took::Tombstone;
        }
        Took::Back(e)
    }

    fn tombstones(&self) -> usize {
        self.tombstones.load(Relaxed).max(0) as usize
    }
}

/// In-flight counts to add per partition, one atomic add each when
/// applied: a call spans few partitions.
#[derive(Default)]
struct Tally(Vec<(*const Partition, i64)>);

impl Tally {
    fn add(&mut self, part: &Partition, n: i64) {
        let p = std::ptr::from_ref(part);
        match self.0.iter_mut().find(|(q, _)| *q == p) {
            Some((_, m)) => *m += n,
            None => self.0.push((p, n)),
        }
    }

    fn apply(self) {
        for (part, n) in self.0 {
            // SAFETY: partitions live as long as the dispatcher.
            unsafe { &*part }.in_flight.fetch_add(n, Relaxed);
        }
    }
}

/// What a `pop_ready` call collects.
struct Out<T> {
    want: usize,
    tickets: Vec<Ticket<T, Receipt>>,
    discarded: Vec<T>,
    /// Lanes that went idle.
    idle: usize,
    /// Lanes put back (live messages that could not be handed out).
    again: Vec<LanePtr>,
    in_flight: Tally,
}

enum Took<T> {
    Ticket,
    Tombstone,
    /// Live, but nothing may be handed out in this call.
    Back(Entry<T>),
}

impl<T> Drop for Dispatcher<T> {
    fn drop(&mut self) {
        // SAFETY: `&mut self`: no other thread can reach the table.
        let guard = unsafe { epoch::unprotected() };
        let table = self.partitions.swap(epoch::Shared::null(), Relaxed, guard);
        if !table.is_null() {
            // SAFETY: as above.
            drop(unsafe { table.into_owned() });
        }
        // Lanes (and the entries in them) drop with `self.lanes`, the
        // unordered queue with `self.solo`.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::Ordering;

    fn prep(d: &Dispatcher<u32>, key: &[u8], partition: i32, offset: i64) -> Prepared<u32> {
        Prepared { lane: d.lane_of(Some(key), partition), partition, offset, item: offset as u32 }
    }

    #[test]
    fn a_push_meeting_another_push_of_its_partition_changes_nothing() {
        let d = Dispatcher::<u32>::new(Config { ordering: Ordering::Key, ..Config::default() }).unwrap();
        d.push_many(vec![prep(&d, b"a", 0, 0)]).unwrap();
        let guard = epoch::pin();
        let p0 = d.partition(0, &guard);
        // Another thread's push of partition 0, caught in the middle.
        assert!(p0.claim_push());
        let err = d.push_many(vec![prep(&d, b"b", 1, 0), prep(&d, b"a", 0, 1)]).unwrap_err();
        assert_eq!(err, Error::ConcurrentPush { partition: 0 });
        assert_eq!(d.queued(), 1, "nothing of the batch was applied, partition 1 included");
        p0.unclaim();
        assert_eq!(d.push_many(vec![prep(&d, b"b", 1, 0), prep(&d, b"a", 0, 1)]).unwrap().count, 2);
        assert_eq!(d.queued(), 3);
    }
}
