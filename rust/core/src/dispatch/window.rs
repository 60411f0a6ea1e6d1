//! One partition's completion tracking: which pushed messages are done, and
//! so which offset is safe to commit — without locks.
//!
//! Pushed messages get consecutive sequence numbers. Their offsets sit in a
//! chain of fixed-size blocks; per slot, two bits in a shared word: `DONE`
//! (completed: counts for the watermark) and `RESOLVED` (nothing refers to
//! the slot any more: completed, or dropped, or its ticket went stale). A
//! completion sets both with one `fetch_or`, its last touch of the block.
//!
//! - One feeder appends (the partition's feeding claim makes it one): it
//!   writes the offset, then publishes the slot by storing `filled`
//!   (Release).
//! - The watermark is read by scanning from the head block for the first
//!   slot at or after `floor` not `DONE`: its offset; if every published
//!   slot is done, the last offset + 1. Bits are only ever set and slots only
//!   appended, so a later scan never returns less (until a revoke raises
//!   `floor`, which forgets the partition's watermark on purpose).
//! - A head block that has a successor, whose slots are all `RESOLVED` and
//!   whose slots at or after `floor` are all `DONE` (a dropped message's
//!   slot is resolved, not done: it holds the watermark) is unlinked by a
//!   CAS on `head`; the CAS winner frees it (through
//!   crossbeam-epoch in the dispatcher: scanners may still be reading it).
//!   Until then the block is alive, so holders of unresolved slots (queued
//!   entries, receipts) never need a reference count.
//! - A block belongs to one generation of its partition (see
//!   `partition.rs`): when a drop bumps the generation, `seal` closes the
//!   tail block, so a queued entry finds its generation in its block and
//!   carries only the slot's address. The sealed slots are filled with the
//!   last offset and marked done and resolved, which changes no watermark.
//! - A slot's retry count lives in a per-block array allocated by the first
//!   retry in the block: fresh messages, nearly all of them, pay nothing.
#![allow(unsafe_code)]

use std::ptr;

use crossbeam_utils::CachePadded;

use crate::sync::AtomicPtr;
use crate::sync::Ordering::{AcqRel, Acquire, Relaxed, Release};
use crate::sync::{AtomicI64, AtomicU32, AtomicU64, AtomicUsize, UnsafeCell};

/// Slots per block (small under loom, so models cross block boundaries).
#[cfg(not(loom))]
pub const BLOCK: usize = 256;
#[cfg(loom)]
pub const BLOCK: usize = 2;
const PER_WORD: usize = 32;
const WORDS: usize = BLOCK.div_ceil(PER_WORD);
const DONE: u64 = 1;
const RESOLVED: u64 = 2;
const BOTH: u64 = DONE | RESOLVED;

/// Retry counts of a block's slots.
type Attempts = [AtomicU32; BLOCK];

/// Laid out so the feeder's per-message writes (`filled`, `offsets`), the
/// completers' (`bits`) and what poppers read (`owner`, `generation`,
/// `attempts`) sit on different cache lines. Aligned so a slot packs into
/// one word: the block's address with the slot index in its low bits.
#[derive(Debug)]
#[repr(C, align(256))]
pub struct Block {
    /// What the slots belong to (the dispatcher's partition); opaque here.
    owner: *const (),
    /// Sequence number of slot 0.
    base: u64,
    next: AtomicPtr<Block>,
    /// The owner's generation every slot was filled in.
    generation: u32,
    /// Null until a slot of the block is retried.
    attempts: AtomicPtr<Attempts>,
    filled: CachePadded<AtomicUsize>,
    offsets: [AtomicI64; BLOCK],
    bits: CachePadded<[AtomicU64; WORDS]>,
}

const INDEX_MASK: usize = BLOCK - 1;
const _: () = assert!(BLOCK.is_power_of_two() && BLOCK <= std::mem::align_of::<Block>());

impl Block {
    fn new(owner: *const (), base: u64, generation: u32) -> *mut Block {
        Box::into_raw(Box::new(Block {
            owner,
            base,
            next: AtomicPtr::new(ptr::null_mut()),
            generation,
            attempts: AtomicPtr::new(ptr::null_mut()),
            filled: CachePadded::new(AtomicUsize::new(0)),
            offsets: std::array::from_fn(|_| AtomicI64::new(0)),
            bits: CachePadded::new(std::array::from_fn(|_| AtomicU64::new(0))),
        }))
    }

    /// Nothing can need the block any more: every slot is filled and
    /// resolved, and every slot at or after `floor` is done. (A slot
    /// resolved without being done — a dropped message — holds the
    /// watermark until a revoke raises the floor past it.)
    fn passed(&self, floor: u64) -> bool {
        if self.filled.load(Acquire) != BLOCK {
            return false;
        }
        let kept_from = floor.saturating_sub(self.base).min(BLOCK as u64) as usize;
        self.bits.iter().enumerate().all(|(w, word)| {
            let first = w * PER_WORD;
            let slots = (BLOCK - first).min(PER_WORD);
            // Slots of this word at or after the floor must be done too.
            let kept = slots.saturating_sub(kept_from.saturating_sub(first));
            let done = slot_bits(slots) & !slot_bits(slots - kept) & DONE_BITS;
            let want = (slot_bits(slots) & RESOLVED_BITS) | done;
            word.load(Acquire) & want == want
        })
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        let attempts = self.attempts.load(Relaxed);
        if !attempts.is_null() {
            // SAFETY: installed by `set_attempt`, owned by the block.
            drop(unsafe { Box::from_raw(attempts) });
        }
    }
}

/// The two bits of each of the first `slots` slots of a word.
fn slot_bits(slots: usize) -> u64 {
    if slots == PER_WORD { u64::MAX } else { (1u64 << (2 * slots)) - 1 }
}

const DONE_BITS: u64 = 0x5555_5555_5555_5555;
const RESOLVED_BITS: u64 = 0xAAAA_AAAA_AAAA_AAAA;

/// A slot of a block: what a queued entry or a receipt holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub block: *const Block,
    pub index: u32,
}

// SAFETY: a slot is an address into a block that stays alive until the slot
// is resolved; resolving is an atomic `fetch_or`.
unsafe impl Send for Slot {}
unsafe impl Sync for Slot {}

impl Slot {
    /// Marks the message done (`done`) or only let go of; the holder must
    /// not touch the block afterwards.
    ///
    /// # Safety
    /// The slot is unresolved and held by the caller.
    pub unsafe fn resolve(self, done: bool) {
        let i = self.index as usize;
        let bits = if done { BOTH } else { RESOLVED } << (2 * (i % PER_WORD));
        // SAFETY: an unresolved slot's block is alive (see module docs).
        unsafe { (&(*self.block).bits)[i / PER_WORD].fetch_or(bits, Release) };
    }

    /// The `owner` given to `append`.
    ///
    /// # Safety
    /// The slot is unresolved and held by the caller.
    pub unsafe fn owner(self) -> *const () {
        // SAFETY: an unresolved slot's block is alive.
        unsafe { (*self.block).owner }
    }

    /// The `generation` given to `append`.
    ///
    /// # Safety
    /// The slot is unresolved and held by the caller.
    pub unsafe fn generation(self) -> u32 {
        // SAFETY: an unresolved slot's block is alive.
        unsafe { (*self.block).generation }
    }

    /// Times the message was retried (0 until `set_attempt`).
    ///
    /// # Safety
    /// The slot is unresolved and held by the caller.
    pub unsafe fn attempt(self) -> u32 {
        // SAFETY: an unresolved slot's block is alive.
        let attempts = unsafe { (*self.block).attempts.load(Acquire) };
        if attempts.is_null() {
            return 0;
        }
        // SAFETY: installed once, freed with the block.
        unsafe { (*attempts)[self.index as usize].load(Relaxed) }
    }

    /// Records the retry count; whoever next holds the slot reads it after
    /// taking it through the queue the message went back to, which orders
    /// the two.
    ///
    /// # Safety
    /// The slot is unresolved and held by the caller.
    pub unsafe fn set_attempt(self, attempt: u32) {
        // SAFETY: an unresolved slot's block is alive.
        let block = unsafe { &*self.block };
        let mut attempts = block.attempts.load(Acquire);
        if attempts.is_null() {
            let fresh = Box::into_raw(Box::new(std::array::from_fn::<_, BLOCK, _>(|_| AtomicU32::new(0))));
            attempts = match block.attempts.compare_exchange(ptr::null_mut(), fresh, AcqRel, Acquire) {
                Ok(_) => fresh,
                Err(installed) => {
                    // SAFETY: `fresh` was never published.
                    drop(unsafe { Box::from_raw(fresh) });
                    installed
                }
            };
        }
        // SAFETY: installed once, freed with the block.
        unsafe { (*attempts)[self.index as usize].store(attempt, Relaxed) };
    }

    /// The slot as one word (see `Block`).
    pub fn pack(self) -> *const Block {
        self.block.map_addr(|a| a | self.index as usize)
    }

    /// # Safety
    /// `packed` came from `pack`.
    pub unsafe fn unpack(packed: *const Block) -> Slot {
        Slot { block: packed.map_addr(|a| a & !INDEX_MASK), index: (packed.addr() & INDEX_MASK) as u32 }
    }

    /// # Safety
    /// The slot is unresolved and held by the caller.
    pub unsafe fn offset(self) -> i64 {
        // SAFETY: as above.
        unsafe { (*self.block).offsets[self.index as usize].load(Relaxed) }
    }
}

#[derive(Debug)]
struct Feed {
    tail: *mut Block,
    next_seq: u64,
    last: Option<i64>,
}

#[derive(Debug)]
pub struct Window {
    head: AtomicPtr<Block>,
    /// Slots below this sequence number are forgotten (a revoke).
    floor: AtomicU64,
    /// The feeder's state: touched only under the partition's feeding claim
    /// (on its own cache line: it is written per message).
    feed: CachePadded<UnsafeCell<Feed>>,
}

// SAFETY: `feed` is touched only by the holder of the feeding claim, which
// is handed over with Release/Acquire; everything else is atomic.
unsafe impl Send for Window {}
unsafe impl Sync for Window {}

impl Default for Window {
    fn default() -> Self {
        Self::new()
    }
}

impl Window {
    pub fn new() -> Self {
        Window {
            head: AtomicPtr::new(ptr::null_mut()),
            floor: AtomicU64::new(0),
            feed: CachePadded::new(UnsafeCell::new(Feed { tail: ptr::null_mut(), next_seq: 0, last: None })),
        }
    }

    /// The last offset pushed since the last `forget`.
    ///
    /// # Safety
    /// The caller holds the feeding claim.
    pub unsafe fn last_pushed(&self) -> Option<i64> {
        // SAFETY: the claim holder is the only one touching `feed`.
        unsafe { self.feed.with_mut(|f| f.last) }
    }

    /// Appends `offset` (already checked to be above `last_pushed`); its
    /// block records `owner` (the same on every call) and `generation`
    /// (the same until `seal`).
    ///
    /// # Safety
    /// The caller holds the feeding claim.
    pub unsafe fn append(&self, offset: i64, owner: *const (), generation: u32) -> Slot {
        // SAFETY: the claim holder is the only one touching `feed`; the tail
        // block is alive (it has no successor, so it is never unlinked).
        unsafe {
            self.feed.with_mut(|f| {
                if f.tail.is_null() {
                    f.tail = Block::new(owner, 0, generation);
                    self.head.store(f.tail, Release);
                }
                let mut tail = &*f.tail;
                let mut n = tail.filled.load(Relaxed);
                debug_assert!(n == BLOCK || tail.generation == generation, "a new generation without seal");
                if n == BLOCK {
                    let next = Block::new(owner, tail.base + BLOCK as u64, generation);
                    tail.next.store(next, Release);
                    f.tail = next;
                    tail = &*next;
                    n = 0;
                }
                tail.offsets[n].store(offset, Relaxed);
                tail.filled.store(n + 1, Release);
                f.next_seq += 1;
                f.last = Some(offset);
                Slot { block: tail, index: n as u32 }
            })
        }
    }

    /// Closes the tail block, so the next `append` starts a new one (for a
    /// new generation). Its unused slots get the last offset and are marked
    /// done and resolved: a scan reads them as the slot before them again,
    /// so no watermark changes, and the block can be unlinked as usual.
    ///
    /// # Safety
    /// The caller holds the feeding claim.
    pub unsafe fn seal(&self) {
        // SAFETY: the claim holder is the only one touching `feed`; the tail
        // is alive (see `append`).
        unsafe {
            self.feed.with_mut(|f| {
                if f.tail.is_null() {
                    return;
                }
                let tail = &*f.tail;
                let n = tail.filled.load(Relaxed);
                if n == BLOCK {
                    return;
                }
                // A tail is created by the append that fills its first slot.
                let last = tail.offsets[n - 1].load(Relaxed);
                for slot in &tail.offsets[n..] {
                    slot.store(last, Relaxed);
                }
                for (w, word) in tail.bits.iter().enumerate() {
                    let first = w * PER_WORD;
                    let slots = (BLOCK - first).min(PER_WORD);
                    let used = n.saturating_sub(first).min(slots);
                    let unused = slot_bits(slots) & !slot_bits(used);
                    if unused != 0 {
                        word.fetch_or(unused, Release);
                    }
                }
                tail.filled.store(BLOCK, Release);
                f.next_seq = tail.base + BLOCK as u64;
            });
        }
    }

    /// Forgets the watermark: slots pushed so far no longer count, and any
    /// offset may be pushed next. Slots still held resolve as usual.
    ///
    /// # Safety
    /// The caller holds the feeding claim.
    pub unsafe fn forget(&self) {
        // SAFETY: the claim holder is the only one touching `feed`.
        let next = unsafe {
            self.feed.with_mut(|f| {
                f.last = None;
                f.next_seq
            })
        };
        self.floor.store(next, Release);
    }

    /// The next offset safe to commit, `None` if nothing was pushed since
    /// the last `forget`.
    ///
    /// # Safety
    /// Blocks reachable from `head` stay alive for the call (the dispatcher
    /// holds an epoch guard; loom models never free).
    pub unsafe fn watermark(&self) -> Option<i64> {
        let floor = self.floor.load(Acquire);
        let mut last = None;
        let mut p = self.head.load(Acquire);
        while !p.is_null() {
            // SAFETY: the caller keeps reachable blocks alive.
            let b = unsafe { &*p };
            let filled = b.filled.load(Acquire);
            if b.base + filled as u64 > floor {
                let from = floor.saturating_sub(b.base) as usize;
                for i in from..filled {
                    let bits = b.bits[i / PER_WORD].load(Acquire) >> (2 * (i % PER_WORD));
                    let offset = b.offsets[i].load(Relaxed);
                    if bits & DONE == 0 {
                        return Some(offset);
                    }
                    last = Some(offset);
                }
            }
            p = b.next.load(Acquire);
        }
        last.map(|o| o + 1)
    }

    /// Unlinks passed blocks at the head (each with a successor) and hands
    /// each to `free`, which must not free it while a scan may read it.
    pub fn unlink_resolved(&self, mut free: impl FnMut(*mut Block)) {
        loop {
            let h = self.head.load(Acquire);
            if h.is_null() {
                return;
            }
            // SAFETY: the head is alive until unlinked, and only the CAS
            // winner below unlinks it.
            let b = unsafe { &*h };
            let next = b.next.load(Acquire);
            if next.is_null() || !b.passed(self.floor.load(Acquire)) {
                return;
            }
            if self.head.compare_exchange(h, next, AcqRel, Acquire).is_ok() {
                free(h);
            }
        }
    }

    /// Frees a block handed out by `unlink_resolved`.
    ///
    /// # Safety
    /// No thread can still read it.
    pub unsafe fn free_block(block: *mut Block) {
        // SAFETY: the caller's guarantee.
        drop(unsafe { Box::from_raw(block) });
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        let mut p = self.head.load(Relaxed);
        while !p.is_null() {
            // SAFETY: `&mut self`: the chain is ours alone now.
            let b = unsafe { Box::from_raw(p) };
            p = b.next.load(Relaxed);
        }
    }
}
