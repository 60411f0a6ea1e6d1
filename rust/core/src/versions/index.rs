//! The in-memory side of the version map: every version still in the
//! journal (exact, never dropped) plus a bounded cache of folded ones.

use std::hash::BuildHasher;

/// One key's version: 16 bytes, so that more of the table stays in cache.
#[derive(Debug, Clone, Copy)]
struct Entry {
    start: u32,
    len: u16,
    /// The version comes from a journal record not yet folded.
    pending: bool,
    version: u64,
}

/// The versions this process knows, exact as of journal record `next`.
///
/// Every change to the version map is a journal record, and every
/// transaction first reads the records it has not seen, so what is known
/// stays exact however many processes write. The one gap is a fold by
/// another process of records this one never read: the index then starts
/// over. Pending entries (from records not yet folded) are the only copy
/// outside the journal that readers use and are never evicted; the others
/// are a cache of `versions`, at most `capacity` of them, forgotten all at
/// once when full.
///
/// While the index holds every key of the table (`complete`: it was loaded
/// whole and nothing was evicted since), a key it lacks is a key the table
/// lacks, and a first sighting needs no read of `versions` either.
///
/// Keys are kept exactly (no hash shortcut could confuse two keys), end to
/// end in one arena, so remembering a key costs no allocation.
#[derive(Debug, Default)]
pub(super) struct Index {
    table: hashbrown::HashTable<Entry>,
    arena: Vec<u8>,
    hasher: foldhash::fast::RandomState,
    /// Journal records below this are folded into `versions`.
    folded: u64,
    /// The next journal record to read: all before it are applied.
    pub(super) next: u64,
    /// Pending entries.
    pending: usize,
    /// Entries in the journal records from `folded` to `next`, which
    /// bounds when to fold.
    entries: usize,
    /// Every key of the table is here.
    complete: bool,
    /// Set when the index starts over: the next transaction may load the
    /// whole table.
    unloaded: bool,
    capacity: usize,
}

/// What [`Index::raise`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Judged {
    Raised {
        new_key: bool,
    },
    Stale,
    /// Not in the index: ask `versions`.
    Unknown,
}

/// What the index says of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Known {
    Version(u64),
    /// Not in the table (the index is complete).
    Absent,
    /// Not in the index: ask `versions`.
    Unknown,
}

impl Index {
    pub(super) fn new(capacity: usize) -> Self {
        Index { capacity, unloaded: true, ..Index::default() }
    }

    /// Is the index starting over, so that loading the whole table is worth
    /// asking about? Cheap: checked before every transaction.
    pub(super) fn may_load(&self) -> bool {
        self.unloaded && self.table.is_empty()
    }

    /// May a table of `keys` keys be loaded whole? Only while nothing else
    /// is known, and if it fits the cache.
    pub(super) fn can_load(&self, keys: u64) -> bool {
        self.may_load() && keys <= self.capacity as u64
    }

    /// The whole of `versions` was just loaded (through [`Index::set`]).
    pub(super) fn loaded(&mut self) {
        self.unloaded = false;
        self.complete = true;
    }

    pub(super) fn lookup(&self, key: &[u8]) -> Known {
        match self.get(key) {
            Some(v) => Known::Version(v),
            None if self.complete => Known::Absent,
            None => Known::Unknown,
        }
    }

    fn key_of<'a>(arena: &'a [u8], e: &Entry) -> &'a [u8] {
        &arena[e.start as usize..e.start as usize + e.len as usize]
    }

    pub(super) fn get(&self, key: &[u8]) -> Option<u64> {
        let arena = &self.arena;
        self.table.find(self.hasher.hash_one(key), |e| Self::key_of(arena, e) == key).map(|e| e.version)
    }

    /// Versions only grow, so whatever is known is a lower bound of the
    /// stored version even without reading the journal: `true` means
    /// `version` is stale for certain.
    pub(super) fn surely_stale(&self, key: &[u8], version: u64) -> bool {
        self.get(key).is_some_and(|known| version <= known)
    }

    /// Records that `key` is at `version`, from a journal record (`pending`)
    /// or from `versions`. Folded entries are cached only while there is
    /// room.
    pub(super) fn set(&mut self, key: &[u8], version: u64, pending: bool) {
        let hash = self.hasher.hash_one(key);
        let arena = &self.arena;
        if let Some(e) = self.table.find_mut(hash, |e| Self::key_of(arena, e) == key) {
            if pending && !e.pending {
                e.pending = true;
                self.pending += 1;
            }
            e.version = e.version.max(version);
            return;
        }
        if pending {
            self.pending += 1;
        } else if self.table.len() - self.pending >= self.capacity {
            if self.capacity == 0 {
                return;
            }
            self.evict();
        }
        self.insert(hash, key, version, pending);
    }

    /// `check_and_set` in memory, with one lookup: raises `key` to `version`
    /// (pending) if that is newer than what is known.
    pub(super) fn raise(&mut self, key: &[u8], version: u64) -> Judged {
        let hash = self.hasher.hash_one(key);
        let arena = &self.arena;
        if let Some(e) = self.table.find_mut(hash, |e| Self::key_of(arena, e) == key) {
            if version <= e.version {
                return Judged::Stale;
            }
            if !e.pending {
                e.pending = true;
                self.pending += 1;
            }
            e.version = version;
            return Judged::Raised { new_key: false };
        }
        if !self.complete {
            return Judged::Unknown;
        }
        self.pending += 1;
        self.insert(hash, key, version, true);
        Judged::Raised { new_key: true }
    }

    fn insert(&mut self, hash: u64, key: &[u8], version: u64, pending: bool) {
        if self.arena.len() + key.len() > u32::MAX as usize {
            self.evict();
        }
        let start = self.arena.len() as u32;
        self.arena.extend_from_slice(key);
        let len = u16::try_from(key.len()).expect("keys are at most 511 bytes");
        let (hasher, arena) = (&self.hasher, &self.arena);
        self.table.insert_unique(hash, Entry { start, len, pending, version }, |e| {
            hasher.hash_one(Self::key_of(arena, e))
        });
    }

    /// Forgets every folded entry, keeping (and compacting) the rest.
    fn evict(&mut self) {
        self.complete = false;
        let old = std::mem::take(&mut self.arena);
        let keep: Vec<Entry> = self.table.drain().filter(|e| e.pending).collect();
        for e in keep {
            let start = self.arena.len() as u32;
            self.arena.extend_from_slice(Self::key_of(&old, &e));
            let (hasher, arena) = (&self.hasher, &self.arena);
            let hash = hasher.hash_one(Self::key_of(arena, &Entry { start, ..e }));
            self.table.insert_unique(hash, Entry { start, ..e }, |x| hasher.hash_one(Self::key_of(arena, x)));
        }
    }

    /// Forgets everything: the next transaction rebuilds from the journal.
    /// Used when a transaction failed after changing the index.
    pub(super) fn reset(&mut self) {
        let capacity = self.capacity;
        *self = Index::new(capacity);
    }

    /// Adopts the journal's fold point `folded` read in a transaction, before
    /// its records from `next` on are applied.
    pub(super) fn sync_folded(&mut self, folded: u64) {
        if folded == self.folded {
            return;
        }
        if folded < self.folded || folded > self.next {
            // Records this process never read were folded (or the table was
            // replaced): nothing known can be trusted.
            self.reset();
        } else {
            // Another process folded records this one had read: what they
            // set is in `versions` now. Entries do not say which record set
            // them, so all become folded and the records from `folded` on
            // are read again (versions only grow: reading twice is harmless).
            self.unpend();
        }
        self.folded = folded;
        self.next = folded;
    }

    /// Record number `seq`, of `entries` entries, was applied.
    pub(super) fn applied(&mut self, seq: u64, entries: usize) {
        self.entries += entries;
        self.next = seq + 1;
    }

    /// Entries in the journal records not folded.
    pub(super) fn journal_entries(&self) -> usize {
        self.entries
    }

    /// The pending versions, in key order, for a fold.
    pub(super) fn pending_sorted(&self) -> Vec<(&[u8], u64)> {
        // In arena order first: reading the keys then walks the arena
        // instead of jumping around it, and keys that arrived in order (ids
        // that grow) are then already sorted, which one pass can tell.
        let mut pending: Vec<Entry> = self.table.iter().filter(|e| e.pending).copied().collect();
        pending.sort_unstable_by_key(|e| e.start);
        let key = |i: usize| Self::key_of(&self.arena, &pending[i]);
        if (1..pending.len()).all(|i| key(i - 1) < key(i)) {
            return pending.iter().map(|e| (Self::key_of(&self.arena, e), e.version)).collect();
        }
        // Comparing keys in the arena misses the cache at every step; most
        // comparisons are settled by 16 bytes after the keys' common prefix,
        // held inline. Zero padding keeps that order consistent with the
        // keys' (a shorter key sorts first, and ties fall back to the keys).
        let common = (1..pending.len()).fold(pending.first().map_or(0, |e| e.len as usize), |n, i| {
            n.min(key(i).iter().zip(key(0)).take_while(|(a, b)| a == b).count())
        });
        let mut order: Vec<(u128, Entry)> = (0..pending.len())
            .map(|i| {
                let tail = &key(i)[common..];
                let mut window = [0u8; 16];
                let n = tail.len().min(16);
                window[..n].copy_from_slice(&tail[..n]);
                (u128::from_be_bytes(window), pending[i])
            })
            .collect();
        drop(pending);
        let arena = &self.arena;
        order.sort_unstable_by(|a, b| {
            a.0.cmp(&b.0).then_with(|| Self::key_of(arena, &a.1).cmp(Self::key_of(arena, &b.1)))
        });
        order.iter().map(|(_, e)| (Self::key_of(arena, e), e.version)).collect()
    }

    /// Every record so far is folded.
    pub(super) fn folded_all(&mut self) {
        self.unpend();
        self.folded = self.next;
    }

    /// Marks every entry folded, and keeps the cache within its capacity
    /// now that they count toward it.
    fn unpend(&mut self) {
        if self.pending > 0 {
            self.table.iter_mut().for_each(|e| e.pending = false);
        }
        self.pending = 0;
        self.entries = 0;
        if self.table.len() > self.capacity {
            self.evict();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Index, Judged, Known};

    fn synced(capacity: usize) -> Index {
        let mut idx = Index::new(capacity);
        idx.sync_folded(1);
        idx
    }

    #[test]
    fn pending_entries_survive_eviction() {
        let mut idx = synced(2);
        idx.set(b"p", 5, true);
        idx.set(b"a", 1, false);
        idx.set(b"b", 1, false);
        idx.set(b"c", 1, false); // over capacity: a and b go, p stays
        assert_eq!(idx.get(b"p"), Some(5));
        assert_eq!(idx.get(b"a"), None);
        assert_eq!(idx.get(b"c"), Some(1));
    }

    #[test]
    fn complete_until_something_is_evicted() {
        let mut idx = synced(2);
        assert!(idx.can_load(2));
        assert!(!idx.can_load(3));
        idx.set(b"a", 1, false);
        idx.loaded();
        assert_eq!(idx.lookup(b"a"), Known::Version(1));
        assert_eq!(idx.lookup(b"b"), Known::Absent);
        idx.set(b"b", 1, false);
        idx.set(b"c", 1, false);
        assert_eq!(idx.lookup(b"a"), Known::Unknown);
        assert!(!idx.can_load(0), "loads only after a reset");
        idx.reset();
        assert!(idx.can_load(0));
    }

    #[test]
    fn raise_judges_with_one_lookup() {
        let mut idx = synced(10);
        assert_eq!(idx.raise(b"a", 1), Judged::Unknown);
        idx.loaded();
        assert_eq!(idx.raise(b"a", 1), Judged::Raised { new_key: true });
        assert_eq!(idx.raise(b"a", 1), Judged::Stale);
        assert_eq!(idx.raise(b"a", 2), Judged::Raised { new_key: false });
        assert_eq!(idx.get(b"a"), Some(2));
        assert_eq!(idx.pending_sorted(), vec![(&b"a"[..], 2)]);
    }

    #[test]
    fn journal_entries_count_until_a_fold() {
        let mut idx = synced(10);
        idx.applied(1, 3);
        idx.applied(2, 4);
        assert_eq!((idx.journal_entries(), idx.next), (7, 3));
        idx.folded_all();
        assert_eq!((idx.journal_entries(), idx.next), (0, 3));
    }

    #[test]
    fn pending_come_out_in_key_order() {
        let mut idx = synced(0);
        let keys: Vec<&[u8]> = vec![
            b"prefix-b",
            b"prefix-a",
            b"prefix-a\0",
            b"prefix-",
            b"prefix-aaaaaaaaaaaaaaaaaaaaaaaaz",
            b"prefix-aaaaaaaaaaaaaaaaaaaaaaaay",
            b"prefix-\xff",
            b"prefix-a\0\x01",
        ];
        for (i, k) in keys.iter().enumerate() {
            idx.set(k, i as u64, true);
        }
        let mut want: Vec<Vec<u8>> = keys.iter().map(|k| k.to_vec()).collect();
        want.sort();
        let got: Vec<Vec<u8>> = idx.pending_sorted().into_iter().map(|(k, _)| k.to_vec()).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn keys_that_arrived_in_order_come_out_in_order() {
        let mut idx = synced(10);
        for key in [&b"k1"[..], b"k2", b"k3"] {
            idx.set(key, 1, true);
        }
        idx.set(b"k2", 2, true); // a later version, same place in the arena
        assert_eq!(idx.pending_sorted(), vec![(&b"k1"[..], 1), (&b"k2"[..], 2), (&b"k3"[..], 1)]);
        idx.set(b"k0", 1, true); // out of order: the general path
        let keys: Vec<&[u8]> = idx.pending_sorted().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, [b"k0", b"k1", b"k2", b"k3"]);
    }

    #[test]
    fn folds_keep_the_cache_within_capacity() {
        let mut idx = synced(2);
        idx.loaded();
        for (i, key) in [b"a", b"b", b"c"].iter().enumerate() {
            assert_eq!(idx.raise(*key, 1), Judged::Raised { new_key: true });
            idx.applied(1 + i as u64, 1);
        }
        idx.folded_all();
        assert_eq!(idx.get(b"a"), None, "three folded keys do not fit a cache of two");
        assert_eq!(idx.lookup(b"a"), Known::Unknown, "and the index is no longer complete");
    }

    #[test]
    fn zero_capacity_keeps_only_pending() {
        let mut idx = synced(0);
        idx.set(b"a", 1, false);
        idx.set(b"p", 2, true);
        assert_eq!(idx.get(b"a"), None);
        assert_eq!(idx.get(b"p"), Some(2));
    }

    #[test]
    fn folds_by_someone_else() {
        let mut idx = synced(10);
        idx.set(b"a", 3, false);
        idx.set(b"p", 4, true);
        idx.applied(3, 1);
        // Within what was read: everything becomes folded, and the records
        // from the fold point on are to be read again.
        idx.sync_folded(2);
        assert_eq!((idx.get(b"a"), idx.get(b"p"), idx.next), (Some(3), Some(4), 2));
        assert!(idx.pending_sorted().is_empty());
        // Past what was read: records 4..9 were never read; start over.
        idx.sync_folded(9);
        assert_eq!((idx.get(b"a"), idx.next), (None, 9));
        assert!(idx.can_load(0));
    }
}
