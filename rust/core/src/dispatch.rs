//! The per-key dispatch queue: hands out only messages that are safe to
//! process now under the chosen ordering model, and tracks which offsets are
//! safe to commit.
//!
//! [`Dispatcher`] (`dispatch/dispatcher.rs`) takes no lock on any hot path:
//! lanes are atomic state machines (`lane.rs`) in a lock-free table
//! (`lanes.rs`), completions are bitmap blocks per partition (`window.rs`,
//! `partition.rs`). The mutex-based design it replaced is kept only as a
//! measured comparison in `benches/compare/`.
//!
//! docs/design.md ("Dispatcher") argues the invariants and gives the figures;
//! `scripts/loom` model-checks the lane hand-off and the watermark.

mod dispatcher;
#[doc(hidden)]
pub mod lane;
mod lanes;
mod partition;
#[doc(hidden)]
pub mod window;

use std::fmt;
use std::hash::BuildHasher;
use std::str::FromStr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU64, AtomicUsize};

use crossbeam_utils::CachePadded;

pub use dispatcher::{Dispatcher, Receipt};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    pub ordering: Ordering,
    /// Bound on messages held: queued + in flight.
    pub capacity: usize,
    /// Bound on messages in flight.
    pub max_in_flight: usize,
    /// Seed of the key hash, which decides which shard a key's lane lives in
    /// and so the order in which different keys' messages are handed out.
    /// `None` (the default) picks a random seed; tests that replay a
    /// schedule fix it.
    pub seed: Option<u64>,
}

impl Default for Config {
    fn default() -> Self {
        Config { ordering: Ordering::Key, capacity: 100_000, max_in_flight: 1024, seed: None }
    }
}

/// The most `capacity` and `max_in_flight` may be: 2^32 messages is far
/// beyond what any process can hold (53 bytes each before payloads), so a
/// larger bound is a mistake, not a configuration.
pub const MAX_BOUND: usize = 1 << 32;

impl Config {
    pub fn validate(&self) -> Result<()> {
        for (name, value) in [("capacity", self.capacity), ("max_in_flight", self.max_in_flight)] {
            if !(1..=MAX_BOUND).contains(&value) {
                return Err(Error::InvalidArgument(format!(
                    "{name} must be between 1 and {MAX_BOUND}, got {value}"
                )));
            }
        }
        Ok(())
    }
}

/// Where a message goes: a lane, or straight to the unordered queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaneKey {
    Solo,
    Lane(u64),
}

/// Maps (key, partition) to a lane under an ordering model. Keys are hashed
/// with a per-dispatcher seed (random unless fixed), so nobody can choose
/// keys that collide on purpose; two keys that do collide share a lane, which
/// serializes them and never breaks order.
#[derive(Debug, Clone)]
pub struct LaneHasher {
    ordering: Ordering,
    seed: foldhash::fast::FixedState,
}

impl LaneHasher {
    pub fn new(ordering: Ordering, seed: Option<u64>) -> Self {
        // A RandomState is seeded from the OS once per process and perturbed
        // per instance: hashing anything with a fresh one gives a random u64.
        let seed = seed.unwrap_or_else(|| foldhash::fast::RandomState::default().hash_one(0u64));
        LaneHasher { ordering, seed: foldhash::fast::FixedState::with_seed(seed) }
    }

    #[inline]
    pub fn lane_of(&self, key: Option<&[u8]>, partition: i32) -> LaneKey {
        match self.ordering {
            Ordering::Total => LaneKey::Lane(0),
            Ordering::Partition => LaneKey::Lane(u64::from(partition as u32)),
            Ordering::Key => match key {
                Some(k) => LaneKey::Lane(self.seed.hash_one(k)),
                None => LaneKey::Solo,
            },
            Ordering::Unordered => LaneKey::Solo,
        }
    }
}

/// A message ready to be pushed. Its lane is decided (by
/// [`Dispatch::lane_of`]) before the push, while the key bytes are at hand.
#[derive(Debug)]
pub struct Prepared<T> {
    pub lane: LaneKey,
    pub partition: i32,
    pub offset: i64,
    pub item: T,
}

/// What a receipt tells about its message.
pub trait ReceiptInfo {
    fn partition(&self) -> i32;
    fn offset(&self) -> i64;
    /// 0 on first delivery, +1 per retry.
    fn attempt(&self) -> u32;
}

/// A message handed out by [`Dispatch::pop_ready`]. The receipt is proof
/// that it is in flight; it is consumed by `complete` or `retry`, so it
/// cannot be used twice.
#[derive(Debug)]
pub struct Ticket<T, R> {
    pub item: T,
    pub receipt: R,
}

/// Result of `pop_ready`. `discarded` holds items of revoked messages met on
/// the way (only designs that revoke lazily have any), for the caller to drop
/// where it likes (the Python binding drops them with the GIL held).
#[derive(Debug)]
pub struct Popped<T, R> {
    pub tickets: Vec<Ticket<T, R>>,
    pub discarded: Vec<T>,
}

/// Result of `push_many`: how many of the batch (a prefix) were accepted, and
/// the items of the rest, refused for lack of capacity.
#[derive(Debug)]
pub struct Accepted<T> {
    pub count: usize,
    pub rejected: Vec<T>,
}

/// Result of `retry`.
#[derive(Debug)]
pub enum Retried<T> {
    /// Back at the head of its lane with `attempt + 1`.
    Requeued,
    /// Its partition was revoked meanwhile: dropped; here is the item.
    Stale(T),
}

/// Result of `revoke`: queued messages dropped, and their items.
#[derive(Debug)]
pub struct Revoked<T> {
    pub count: usize,
    pub discarded: Vec<T>,
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
    /// Revoked messages not yet removed from their lanes (lazy designs only).
    pub tombstones: usize,
    pub lanes: usize,
    pub max_lane_depth: usize,
}

/// The dispatcher contract. Every method may be called from any thread.
pub trait Dispatch<T: Send>: Send + Sync + Sized {
    type Receipt: ReceiptInfo + Send + fmt::Debug;

    fn new(config: Config) -> Result<Self>;
    fn config(&self) -> Config;

    /// The lane of a message with this key and partition.
    fn lane_of(&self, key: Option<&[u8]>, partition: i32) -> LaneKey;

    /// Pushes a batch. Validation is all-or-nothing: if any entry breaks a
    /// rule (offsets non-negative and strictly increasing per partition), the
    /// error names it and nothing is changed. Capacity is not an error: the
    /// longest prefix that fits is accepted and the rest handed back.
    fn push_many(&self, batch: Vec<Prepared<T>>) -> Result<Accepted<T>>;

    /// Pushes one message; `Error::QueueFull` if there is no room.
    fn push(&self, p: Prepared<T>) -> Result<()> {
        let accepted = self.push_many(vec![p])?;
        if accepted.count == 0 {
            return Err(Error::QueueFull { capacity: self.config().capacity });
        }
        Ok(())
    }

    /// Hands out up to `max_items` messages that may run now (fewer if
    /// `max_in_flight` is reached or nothing more is ready).
    fn pop_ready(&self, max_items: usize) -> Popped<T, Self::Receipt>;

    /// Completes a batch; every receipt is checked before any is applied.
    /// Returns how many were live (not stale after a revoke).
    fn complete_many(&self, receipts: Vec<Self::Receipt>) -> Result<usize>;

    /// `Ok(false)`: the message's partition was revoked while it was in
    /// flight; nothing is committed for it.
    fn complete(&self, receipt: Self::Receipt) -> Result<bool> {
        Ok(self.complete_many(vec![receipt])? == 1)
    }

    /// Gives a message back: it returns to the head of its lane with
    /// `attempt + 1` and its lane stays blocked, so no later message of the
    /// key overtakes it. Unordered messages go to the back of their queue.
    fn retry(&self, receipt: Self::Receipt, item: T) -> Result<Retried<T>>;

    /// Per partition, the next offset that is safe to commit, sorted.
    fn committable(&self) -> Vec<(i32, i64)>;

    /// Forgets `partitions`: drops their queued messages, makes their
    /// in-flight tickets stale, forgets their watermarks; pushes may then
    /// start again at any offset.
    fn revoke(&self, partitions: &[i32]) -> Revoked<T>;

    fn stats(&self) -> Stats;
    fn queued(&self) -> usize;
    fn in_flight(&self) -> usize;
    /// Room left under `capacity`.
    fn free_capacity(&self) -> usize;
}

/// The counters every design keeps, kept the same way: `Relaxed` atomics,
/// since none of them publishes data. `held` (queued + in flight, + any
/// tombstones) bounds memory; `in_flight` bounds concurrency; both are
/// reserved with a CAS loop so the bound is exact.
#[doc(hidden)]
#[derive(Debug, Default)]
pub struct Counters {
    pub held: CachePadded<AtomicUsize>,
    pub in_flight: CachePadded<AtomicUsize>,
    pub queued: AtomicUsize,
    pub pushed: AtomicU64,
    pub completed: AtomicU64,
    pub retried: AtomicU64,
    pub stale: AtomicU64,
    pub revoked: AtomicU64,
}

impl Counters {
    /// Takes up to `want` units of `counter` under `limit`.
    pub fn reserve(counter: &AtomicUsize, limit: usize, want: usize) -> usize {
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

    pub fn queued(&self) -> usize {
        self.queued.load(Relaxed)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Relaxed)
    }

    pub fn free(&self, capacity: usize) -> usize {
        capacity.saturating_sub(self.held.load(Relaxed))
    }

    /// The counters as `Stats`; the caller fills in what it scans.
    pub fn snapshot(&self, lanes: usize, max_lane_depth: usize) -> Stats {
        let queued = self.queued();
        let in_flight = self.in_flight();
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
}

/// The distinct values of `ids`, sorted. Partition numbers are small in
/// practice, so a bitmap over 0..4096 marks them in O(1) each; anything else
/// is sorted.
#[doc(hidden)]
pub fn distinct_sorted(ids: impl Iterator<Item = i32>) -> Vec<i32> {
    const BITS: usize = 4096;
    let mut small = [0u64; BITS / 64];
    let mut other: Vec<i32> = Vec::new();
    for id in ids {
        match usize::try_from(id) {
            Ok(i) if i < BITS => small[i / 64] |= 1 << (i % 64),
            _ => other.push(id),
        }
    }
    let mut out: Vec<i32> = Vec::new();
    for (w, &word) in small.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            out.push((w * 64) as i32 + bits.trailing_zeros() as i32);
            bits &= bits - 1;
        }
    }
    if !other.is_empty() {
        other.sort_unstable();
        other.dedup();
        // Negative ids sort before the bitmap's, large ones after.
        let split = other.partition_point(|&id| id < 0);
        out.splice(0..0, other[..split].iter().copied());
        out.extend_from_slice(&other[split..]);
    }
    out
}
