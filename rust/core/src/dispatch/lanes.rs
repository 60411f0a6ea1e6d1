//! The lane table: lane id → lane, without locks.
//!
//! A fixed array of bucket words. A word is empty (0), a lane's address
//! (the usual case: one lane in the bucket, found in one step), or, tagged
//! with the low bit, the address of an immutable snapshot listing the
//! bucket's lanes with their ids (one allocation: a lookup reads the
//! snapshot and then only the lane it finds, not every lane of the bucket).
//! Reading is a load (and a scan of a snapshot). Adding a
//! lane, or removing retired ones, builds the new word and swaps it in
//! with one CAS; a CAS that loses to another thread's is retried on the
//! newer word. So two pushers of a new key can never create two lanes for
//! it: only one transition adds it, and the other pusher finds it on its
//! retry.
//!
//! Snapshots and lanes are freed through crossbeam-epoch once no pinned
//! thread can still be reading them. A lane leaves the table only after it
//! was retired (idle, empty, no token anywhere), by the one CAS whose new
//! word drops it; that thread frees it.
//!
//! Idle lanes are swept in passes over the table, only once it holds more
//! lanes than `keep` (the dispatcher's capacity, at least 4,096): a working
//! set of keys below that is never swept, and costs nothing. Above it, a
//! pass starts every `keep / 2` lanes gone idle (a pass looks at every
//! bucket, at most `keep` of them: two per idle transition at most). A pass goes `SWEEP_STEP` buckets at a time (or
//! four per lane the call idled, if more): each call that reports lanes
//! gone idle while a pass is under way takes the next step, so no single call pays for the whole table (one pass over
//! 200,000 lanes in one call took up to 32 ms). A thread that finds a step
//! being taken skips it. A pass retires idle lanes not pushed to since the
//! pass before (a second chance), so a stream of ever-new keys cannot grow
//! memory without bound.
#![allow(unsafe_code)]

use std::hash::BuildHasher;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicBool, AtomicUsize};

use crossbeam_epoch::Guard;

use super::lane::Lane;

const MIN_BUCKETS: usize = 1 << 10;
const MAX_BUCKETS: usize = 1 << 18;
/// Buckets a sweep looks at per step.
const SWEEP_STEP: usize = 1024;
/// Lanes kept without sweeping, at least.
const KEEP_MIN: usize = 4096;
/// Tag of a word pointing to a snapshot (lanes and snapshots are aligned
/// to 8, so the low bit is free).
const LIST: usize = 1;

pub struct Lanes<E> {
    buckets: Box<[AtomicUsize]>,
    mask: usize,
    hasher: foldhash::fast::FixedState,
    live: AtomicUsize,
    keep: usize,
    idle_since_sweep: AtomicUsize,
    /// The next bucket of the pass under way; `buckets.len()` when none is.
    sweep_at: AtomicUsize,
    sweeping: AtomicBool,
    _lanes: std::marker::PhantomData<Box<Lane<E>>>,
}

// SAFETY: lanes are `Sync` for `E: Send`; the addresses in bucket words are
// owned by the table and freed only as described in the module docs.
unsafe impl<E: Send> Send for Lanes<E> {}
unsafe impl<E: Send> Sync for Lanes<E> {}

impl<E> std::fmt::Debug for Lanes<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lanes")
            .field("buckets", &self.buckets.len())
            .field("live", &self.live.load(Relaxed))
            .finish()
    }
}

/// A snapshot's entry: a lane's id and address. The snapshot is one boxed
/// slice whose first entry holds the count of those after it.
type Listed<E> = (u64, *mut Lane<E>);

/// What a bucket word holds, borrowed for as long as the caller's guard.
enum Held<'g, E> {
    One(&'g Lane<E>),
    Many(&'g [Listed<E>]),
}

impl<'g, E> Held<'g, E> {
    /// # Safety
    /// `word` was loaded from a bucket under a guard living for `'g`.
    unsafe fn of(word: usize) -> Option<Self> {
        if word == 0 {
            None
        } else if word & LIST == 0 {
            // SAFETY: the caller's guarantee; lanes are freed through the epoch.
            Some(Held::One(unsafe { &*(word as *const Lane<E>) }))
        } else {
            // SAFETY: as above; snapshots are never mutated.
            Some(Held::Many(unsafe { snapshot::<E>(word) }))
        }
    }

    fn for_each(&self, mut f: impl FnMut(&'g Lane<E>)) {
        match self {
            Held::One(l) => f(l),
            // SAFETY: lanes listed in a live snapshot are alive.
            Held::Many(ls) => ls.iter().for_each(|&(_, l)| f(unsafe { &*l })),
        }
    }

    /// The live (not retired) lane of `id`, if the bucket has one.
    fn find(&self, id: u64) -> Option<&'g Lane<E>> {
        match self {
            Held::One(l) => (l.id == id && !l.is_retired()).then_some(*l),
            Held::Many(ls) => ls.iter().find_map(|&(lid, l)| {
                // SAFETY: lanes listed in a live snapshot are alive.
                let l = unsafe { &*l };
                (lid == id && !l.is_retired()).then_some(l)
            }),
        }
    }
}

impl<E> Lanes<E> {
    /// A table for a dispatcher holding up to `capacity` messages.
    pub fn new(capacity: usize) -> Self {
        // Up to about twice `keep` lanes live between sweeps: a bucket per
        // two `capacity` keeps chains about four lanes long at worst (a
        // bucket per eight made them 12 long with 200,000 keys, and a push
        // of 512 messages took 0.5 ms instead of 0.07).
        let n = (capacity / 2).next_power_of_two().clamp(MIN_BUCKETS, MAX_BUCKETS);
        Lanes {
            buckets: (0..n).map(|_| AtomicUsize::new(0)).collect(),
            mask: n - 1,
            hasher: foldhash::fast::FixedState::with_seed(0x6b65_796c_616e_6531),
            live: AtomicUsize::new(0),
            keep: capacity.max(KEEP_MIN),
            idle_since_sweep: AtomicUsize::new(0),
            sweep_at: AtomicUsize::new(n),
            sweeping: AtomicBool::new(false),
            _lanes: std::marker::PhantomData,
        }
    }

    #[inline]
    fn bucket(&self, id: u64) -> &AtomicUsize {
        // Lane ids of keys are hashes already, but partition lanes are small
        // integers: mix before taking bits.
        &self.buckets[self.hasher.hash_one(id) as usize & self.mask]
    }

    /// Lanes in the table (retired ones not yet removed included).
    pub fn len(&self) -> usize {
        self.live.load(Relaxed)
    }

    /// The lane of `id`, created if it has none. Valid while `guard` is.
    pub fn get<'g>(&self, id: u64, guard: &'g Guard) -> &'g Lane<E> {
        let slot = self.bucket(id);
        let mut fresh: Option<Box<Lane<E>>> = None;
        loop {
            let cur = slot.load(Acquire);
            // SAFETY: loaded under `guard`.
            let held = unsafe { Held::<E>::of(cur) };
            if let Some(l) = held.as_ref().and_then(|h| h.find(id)) {
                return l;
            }
            let (mut keep, mut gone) = (Vec::new(), Vec::new());
            if let Some(held) = &held {
                held.for_each(|l| {
                    let p = std::ptr::from_ref(l).cast_mut();
                    if l.is_retired() { gone.push(p) } else { keep.push(p) }
                });
            }
            let lane = Box::into_raw(fresh.take().unwrap_or_else(|| Box::new(Lane::new(id))));
            keep.push(lane);
            let new = word_of(&keep);
            match slot.compare_exchange(cur, new, AcqRel, Acquire) {
                Ok(_) => {
                    self.live.fetch_add(1, Relaxed);
                    // SAFETY: this CAS unlinked `cur` and the lanes in `gone`.
                    unsafe { self.free(cur, &gone, guard) };
                    // SAFETY: just published; freed only after being retired
                    // and unlinked, which a later pinned thread must do.
                    return unsafe { &*lane };
                }
                Err(_) => {
                    // SAFETY: `new` and `lane` were never published.
                    unsafe { drop_word_shell::<E>(new) };
                    fresh = Some(unsafe { Box::from_raw(lane) });
                }
            }
        }
    }

    /// Counts `n` lanes gone idle; takes the next step of a sweep when one
    /// is under way or enough lanes have gone idle to start one.
    pub fn went_idle(&self, n: usize, guard: &Guard) {
        if n == 0 {
            return;
        }
        let total = self.buckets.len();
        if self.sweep_at.load(Relaxed) >= total && !self.sweep_due(n) {
            return;
        }
        if self.sweeping.swap(true, Acquire) {
            return;
        }
        let mut at = self.sweep_at.load(Relaxed);
        if at >= total {
            // Another thread may have finished a pass since the look above.
            if self.idle_since_sweep.load(Relaxed) < self.keep / 2 {
                self.sweeping.store(false, Release);
                return;
            }
            self.idle_since_sweep.store(0, Relaxed);
            at = 0;
        }
        // A call that idled many lanes (a big batch) pays for more of the
        // pass, in proportion: its own cost is already that large.
        let end = (at + SWEEP_STEP.max(n.saturating_mul(4))).min(total);
        self.sweep(&self.buckets[at..end], guard);
        self.sweep_at.store(end, Relaxed);
        self.sweeping.store(false, Release);
    }

    /// Counts `n` lanes gone idle; whether a pass should start.
    fn sweep_due(&self, n: usize) -> bool {
        if self.len() <= self.keep {
            return false;
        }
        self.idle_since_sweep.fetch_add(n, Relaxed) + n >= self.keep / 2
    }

    fn sweep(&self, buckets: &[AtomicUsize], guard: &Guard) {
        for slot in buckets {
            let mut any = false;
            // SAFETY: loaded under `guard`.
            if let Some(held) = unsafe { Held::<E>::of(slot.load(Acquire)) } {
                held.for_each(|l| {
                    if l.is_idle() && !l.take_used() && l.try_retire() {
                        any = true;
                    }
                });
            }
            if any {
                self.remove_retired(slot, guard);
            }
        }
    }

    fn remove_retired(&self, slot: &AtomicUsize, guard: &Guard) {
        loop {
            let cur = slot.load(Acquire);
            let (mut keep, mut gone) = (Vec::new(), Vec::new());
            // SAFETY: loaded under `guard`.
            if let Some(held) = unsafe { Held::<E>::of(cur) } {
                held.for_each(|l| {
                    let p = std::ptr::from_ref(l).cast_mut();
                    if l.is_retired() { gone.push(p) } else { keep.push(p) }
                });
            }
            if gone.is_empty() {
                return;
            }
            let new = word_of(&keep);
            match slot.compare_exchange(cur, new, AcqRel, Acquire) {
                Ok(_) => {
                    // SAFETY: this CAS unlinked `cur` and the lanes in `gone`.
                    unsafe { self.free(cur, &gone, guard) };
                    return;
                }
                // SAFETY: never published.
                Err(_) => unsafe { drop_word_shell::<E>(new) },
            }
        }
    }

    /// # Safety
    /// The caller's CAS just unlinked the word `old` and the lanes in `gone`.
    unsafe fn free(&self, old: usize, gone: &[*mut Lane<E>], guard: &Guard) {
        if old & LIST != 0 {
            let word = old;
            // SAFETY: unlinked; readers pinned before are waited for.
            unsafe { guard.defer_unchecked(move || drop_word_shell::<E>(word)) };
        }
        for &lane in gone {
            self.live.fetch_sub(1, Relaxed);
            let lane = SendPtr(lane);
            // SAFETY: retired lanes hold no messages and no token; unlinked,
            // so only threads pinned before can still read them.
            unsafe { guard.defer_unchecked(move || drop(Box::from_raw(lane.into_inner()))) };
        }
    }

    /// Visits every lane (for stats). Lanes may change meanwhile.
    pub fn for_each(&self, _guard: &Guard, mut f: impl FnMut(&Lane<E>)) {
        for slot in self.buckets.iter() {
            // SAFETY: loaded under `guard`.
            if let Some(held) = unsafe { Held::<E>::of(slot.load(Acquire)) } {
                held.for_each(&mut f);
            }
        }
    }
}

impl<E> Drop for Lanes<E> {
    fn drop(&mut self) {
        for slot in self.buckets.iter() {
            let word = slot.swap(0, Relaxed);
            // SAFETY: `&mut self`: no other thread can reach the table; each
            // lane is in exactly one word.
            if let Some(held) = unsafe { Held::<E>::of(word) } {
                held.for_each(|l| drop(unsafe { Box::from_raw(std::ptr::from_ref(l).cast_mut()) }));
            }
            // SAFETY: as above.
            unsafe { drop_word_shell::<E>(word) };
        }
    }
}

/// The word for a bucket holding `lanes`.
fn word_of<E>(lanes: &[*mut Lane<E>]) -> usize {
    match lanes {
        [] => 0,
        [one] => *one as usize,
        many => {
            let mut list: Vec<Listed<E>> = Vec::with_capacity(many.len() + 1);
            list.push((many.len() as u64, std::ptr::null_mut()));
            // SAFETY: the caller holds the lanes it lists (alive under its guard).
            list.extend(many.iter().map(|&l| (unsafe { (*l).id }, l)));
            let raw: *mut [Listed<E>] = Box::into_raw(list.into_boxed_slice());
            raw.cast::<Listed<E>>() as usize | LIST
        }
    }
}

/// The lanes a snapshot word lists.
///
/// # Safety
/// `word` is a live snapshot word (tagged `LIST`, from `word_of`).
unsafe fn snapshot<'g, E>(word: usize) -> &'g [Listed<E>] {
    let first = (word & !LIST) as *const Listed<E>;
    // SAFETY: the first entry holds the count of those after it.
    unsafe { std::slice::from_raw_parts(first.add(1), (*first).0 as usize) }
}

/// Frees the snapshot of a word (not the lanes in it), if it has one.
///
/// # Safety
/// Nobody else can reach the snapshot.
unsafe fn drop_word_shell<E>(word: usize) {
    if word & LIST != 0 {
        let first = (word & !LIST) as *mut Listed<E>;
        // SAFETY: the caller's guarantee; the slice `word_of` boxed, whose
        // length is the count in its first entry plus that entry.
        unsafe {
            let len = (*first).0 as usize + 1;
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(first, len)));
        }
    }
}

/// A raw pointer moved into an epoch-deferred closure.
struct SendPtr<T>(*mut T);

impl<T> SendPtr<T> {
    fn into_inner(self) -> *mut T {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_of_many_lanes_find_each_and_drop_the_retired() {
        // 5,000 lanes in 1,024 buckets: nearly every bucket is a snapshot.
        let table: Lanes<u32> = Lanes::new(0);
        assert_eq!(table.buckets.len(), MIN_BUCKETS);
        let guard = crossbeam_epoch::pin();
        let ids: Vec<u64> = (0..5_000).collect();
        let first: Vec<*const Lane<u32>> =
            ids.iter().map(|&id| std::ptr::from_ref(table.get(id, &guard))).collect();
        assert_eq!(table.len(), ids.len());
        for (&id, &lane) in ids.iter().zip(&first) {
            let again = table.get(id, &guard);
            assert!(std::ptr::eq(again, lane), "lane {id} found again");
            assert_eq!(again.id, id);
        }
        // Retire the even ids' lanes and take them out of their buckets.
        for &id in ids.iter().filter(|id| *id % 2 == 0) {
            let lane = table.get(id, &guard);
            lane.take_used();
            assert!(lane.try_retire());
        }
        for &id in &ids {
            table.remove_retired(table.bucket(id), &guard);
        }
        assert_eq!(table.len(), ids.len() / 2);
        let mut seen = 0;
        table.for_each(&guard, |l| {
            assert_eq!(l.id % 2, 1);
            seen += 1;
        });
        assert_eq!(seen, ids.len() / 2);
        // A retired id gets a fresh lane; the others keep theirs.
        for (&id, &lane) in ids.iter().zip(&first) {
            let now = table.get(id, &guard);
            assert_eq!(now.id, id);
            assert_eq!(std::ptr::eq(now, lane), id % 2 == 1);
        }
        assert_eq!(table.len(), ids.len());
    }
}
