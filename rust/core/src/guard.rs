//! What an App's stale-version and duplicate-id checks remember between its
//! version table and its handlers.
//!
//! The rules (python/keylane/_guard.py tells them to users): a message whose
//! version is not newer than the one applied for its key is stale; one whose
//! id was seen is a duplicate. What handlers applied is recorded here first
//! (`applied`) and written to the table by `write`, one transaction per
//! flush; until then it answers the checks itself.
//!
//! The table is read ahead of the handlers, a batch at a time (`plan`, then
//! `read_and_judge`, in a worker thread): a reader waits for the table's
//! lock, which a writer holds through a whole commit, fold and fsync
//! included. Nothing here that the event loop calls (`check`, `applied`)
//! touches the table unless an answer was not read ahead. The state's own
//! mutex is only ever held for map operations, never across table I/O.
//!
//! `applied` only appends to a log: the maps are updated from it by the
//! next call that consults them (`settled`), which in the runtime is the
//! reading or the writing thread, not the event loop. A key's next message
//! is popped only after its previous one was logged (the runtime logs
//! before it releases the key), and is planned and judged after that, so it
//! is always judged against what its predecessor applied.
//!
//! Every answer here is a lower bound that only rises: a read that raced a
//! write is merged with `max`, so it can never lower what a write raised.

use std::sync::Arc;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU64, AtomicUsize};

use foldhash::fast::RandomState;
use hashbrown::{HashMap, HashSet};
use parking_lot::{Mutex, MutexGuard};
use sha2::{Digest, Sha256};

use crate::Result;
use crate::versions::{MAX_ID, MAX_KEY, VersionTable};

/// Keys and ids the table cannot hold as they are (empty, too long) are
/// stored as this prefix + their SHA-256; so is anything that starts with
/// the prefix, so a crafted key cannot alias another key's digest.
pub const HASHED_PREFIX: &[u8] = b"\x00keylane:sha256:";

/// Answers read ahead and not consumed (their messages were revoked) are
/// dropped past this many; a miss only means a lookup in place.
const READ_BOUND: usize = 1 << 16;
/// Versions this process applied, kept to answer later messages of the same
/// keys without reading the table, up to this many; past it, all but those
/// not yet written are forgotten at once. Reserved up front: growing a map
/// this size rehashes it in one step, milliseconds of a held event loop.
const KNOWN_BOUND: usize = 1 << 18;

/// Versions (and ids) recorded between two writes are kept in maps reserved
/// for this many, and the two sets of maps (recorded, being written) are
/// reused from write to write: a map growing on the event loop's thread
/// rehashed up to 32,768 names in one `applied` call, 2-5 ms with the page
/// faults of its fresh memory. Only reserved: pages are touched as used.
const RESERVED_RECORDS: usize = 1 << 16;

/// The table entry name of a message key (`limit` = `MAX_KEY`) or id
/// (`MAX_ID`).
pub fn table_name(raw: &[u8], limit: usize) -> Name {
    if !raw.is_empty() && raw.len() <= limit && !raw.starts_with(HASHED_PREFIX) {
        return raw.into();
    }
    let mut name = Vec::with_capacity(HASHED_PREFIX.len() + 32);
    name.extend_from_slice(HASHED_PREFIX);
    name.extend_from_slice(&Sha256::digest(raw));
    name.into()
}

/// What one message is checked with: its key's table name and version (a
/// keyless message or one without a version has none), and its id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checked {
    pub version: Option<(Name, u64)>,
    pub id: Option<Name>,
}

impl Checked {
    /// `key` and `id` as they came with the message (names are made here).
    pub fn new(key: Option<&[u8]>, version: Option<u64>, id: Option<&[u8]>) -> Self {
        Checked {
            version: key.zip(version).map(|(k, v)| (table_name(k, MAX_KEY), v)),
            id: id.map(|i| table_name(i, MAX_ID)),
        }
    }
}

/// A check's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Run,
    Stale,
    Duplicate,
}

/// Applied checks logged between two `settled` calls, reserved for this
/// many (so the log does not regrow on the event loop's thread).
const RESERVED_LOG: usize = 1 << 14;

/// A table entry name, shared (not copied) by the maps that hold it: a
/// message's name goes into two or three of them.
pub type Name = Arc<[u8]>;
type Map<V> = HashMap<Name, V, RandomState>;
type Set = HashSet<Name, RandomState>;

fn raise(map: &mut Map<u64>, name: &Name, version: u64) {
    match map.get_mut(name) {
        Some(v) => *v = (*v).max(version),
        None => {
            map.insert(Arc::clone(name), version);
        }
    }
}

/// Versions and ids applied by handlers, not yet in the table.
#[derive(Debug, Default)]
pub struct Recorded {
    versions: Map<u64>,
    ids: Set,
}

impl Recorded {
    fn reserved() -> Self {
        Recorded {
            versions: Map::with_capacity_and_hasher(RESERVED_RECORDS, RandomState::default()),
            ids: Set::with_capacity_and_hasher(RESERVED_RECORDS, RandomState::default()),
        }
    }

    fn clear(&mut self) {
        self.versions.clear();
        self.ids.clear();
    }

    fn is_empty(&self) -> bool {
        self.versions.is_empty() && self.ids.is_empty()
    }

    fn len(&self) -> usize {
        self.versions.len().max(self.ids.len())
    }

    fn raise(&mut self, name: &Name, version: u64) {
        raise(&mut self.versions, name, version);
    }

    fn merge(&mut self, other: &Recorded) {
        for (name, &version) in &other.versions {
            self.raise(name, version);
        }
        for id in &other.ids {
            if !self.ids.contains(id) {
                self.ids.insert(id.clone());
            }
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// Applied since the last write began.
    recorded: Recorded,
    /// Handed to the write in progress (shared with it, never changed).
    writing: Arc<Recorded>,
    /// The maps the last write emptied, ready to take the next recording.
    spare: Option<Recorded>,
    /// What the table said for messages about to run, consumed by `check`.
    read_versions: Map<Option<u64>>,
    read_ids: Map<bool>,
    /// The newest version this process applied per key: recorded, being
    /// written, or written (a superset of `recorded` and `writing`, so one
    /// lookup answers). Only while its partitions stay its own: another
    /// member may write their keys once they move, so the runtime calls
    /// `forget` at every change of assignment.
    known: Map<u64>,
    /// Bumped by `forget`: a read planned before it is not kept.
    generation: u64,
    /// The log's other buffer: swapped with it to take what was logged.
    log_spare: Vec<Checked>,
}

impl State {
    /// Replaces what is known by what is not yet written (recorded or
    /// being written), and drops what was read ahead (it may be older than
    /// a forgotten write); returns the old maps, to be freed once the lock
    /// is let go (freeing 100,000s of names takes milliseconds).
    fn reset_known(&mut self) -> Forgotten {
        let mut fresh = Map::with_capacity_and_hasher(KNOWN_BOUND, RandomState::default());
        for (name, &v) in self.recorded.versions.iter().chain(&self.writing.versions) {
            raise(&mut fresh, name, v);
        }
        Forgotten(State {
            known: std::mem::replace(&mut self.known, fresh),
            read_versions: std::mem::take(&mut self.read_versions),
            read_ids: std::mem::take(&mut self.read_ids),
            ..State::default()
        })
    }

    /// `check`'s rule from memory alone; `None` when the table must be
    /// read, or when the verdict is Run and may not hold until the message
    /// runs (`runs_hold` false, or the message has an id: another message
    /// with that id may be applied first). `got` holds answers just read
    /// and not kept (they count with those kept). Kept answers are used up
    /// only by a verdict given.
    fn judge(&mut self, c: &Checked, runs_hold: bool, got: &Got<'_>) -> Option<Verdict> {
        if let Some(id) = &c.id {
            if self.applied_id(id) {
                return Some(Verdict::Duplicate);
            }
            let seen = match (got.ids.get(&id[..]), self.read_ids.get(id)) {
                (None, None) => return None,
                (a, b) => a == Some(&true) || b == Some(&true),
            };
            if seen {
                self.read_ids.remove(id);
                return Some(Verdict::Duplicate);
            }
        }
        let verdict = match &c.version {
            None => Verdict::Run,
            Some((name, version)) => {
                let known = match self.applied_version(name) {
                    Some(v) => Some(v),
                    None => match (got.versions.get(&name[..]), self.read_versions.get(name)) {
                        (None, None) => return None,
                        (a, b) => a.copied().flatten().max(b.copied().flatten()),
                    },
                };
                if known.is_some_and(|k| *version <= k) { Verdict::Stale } else { Verdict::Run }
            }
        };
        if verdict == Verdict::Run && (!runs_hold || c.id.is_some()) {
            return None;
        }
        if let Some((name, _)) = &c.version {
            self.read_versions.remove(name);
        }
        if let Some(id) = &c.id {
            self.read_ids.remove(id);
        }
        Some(verdict)
    }

    /// Keeps what was read for `c` (in `got`) for its `check`.
    fn keep(&mut self, c: &Checked, got: &Got<'_>) {
        if let Some((name, _)) = &c.version
            && let Some(&version) = got.versions.get(&name[..])
        {
            self.keep_version(name, version);
        }
        if let Some(id) = &c.id
            && let Some(&seen) = got.ids.get(&id[..])
        {
            self.keep_seen(id, seen);
        }
    }

    /// Merged with what is kept: answers only rise.
    fn keep_version(&mut self, name: &Name, version: Option<u64>) {
        let known = self.read_versions.entry(Arc::clone(name)).or_insert(None);
        *known = (*known).max(version);
    }

    fn keep_seen(&mut self, id: &Name, seen: bool) {
        *self.read_ids.entry(Arc::clone(id)).or_insert(false) |= seen;
    }

    /// Answers read ahead and never used (their messages were revoked)
    /// are dropped past READ_BOUND.
    fn bound_reads(&mut self) {
        if self.read_versions.len() > READ_BOUND {
            self.read_versions.clear();
        }
        if self.read_ids.len() > READ_BOUND {
            self.read_ids.clear();
        }
    }

    fn applied(&mut self, c: &Checked) {
        if let Some((name, version)) = &c.version {
            self.recorded.raise(name, *version);
            raise(&mut self.known, name, *version);
        }
        if let Some(id) = &c.id
            && !self.recorded.ids.contains(id)
        {
            self.recorded.ids.insert(id.clone());
        }
    }

    /// What this process knows of `name` without the table: what it applied
    /// (recorded or being written).
    fn applied_version(&self, name: &[u8]) -> Option<u64> {
        self.known.get(name).copied()
    }

    fn applied_id(&self, id: &[u8]) -> bool {
        self.recorded.ids.contains(id) || self.writing.ids.contains(id)
    }

    /// Raises what was read ahead by what a write stored. Walks the smaller
    /// side: what is read ahead is a batch or two, a write up to a flush.
    fn written(&mut self, written: &Recorded) {
        if self.read_versions.len() <= written.versions.len() {
            for (name, known) in self.read_versions.iter_mut() {
                if let Some(&v) = written.versions.get(name) {
                    *known = Some(known.map_or(v, |k| k.max(v)));
                }
            }
        } else {
            for (name, &v) in &written.versions {
                if let Some(known) = self.read_versions.get_mut(name) {
                    *known = Some(known.map_or(v, |k| k.max(v)));
                }
            }
        }
        if self.read_ids.len() <= written.ids.len() {
            for (id, seen) in self.read_ids.iter_mut() {
                *seen |= written.ids.contains(id);
            }
        } else {
            for id in &written.ids {
                if let Some(seen) = self.read_ids.get_mut(id) {
                    *seen = true;
                }
            }
        }
    }
}

/// Answers just read from the table, by name.
#[derive(Default)]
struct Got<'a> {
    versions: HashMap<&'a [u8], Option<u64>, RandomState>,
    ids: HashMap<&'a [u8], bool, RandomState>,
}

/// Names to read from the table for a batch about to run.
#[derive(Debug, Default)]
pub struct Reads {
    versions: Vec<Name>,
    ids: Vec<Name>,
    generation: u64,
}

impl Reads {
    pub fn is_empty(&self) -> bool {
        self.versions.is_empty() && self.ids.is_empty()
    }
}

/// What the checks let go of (`Guard::forget`, `Guard::take_all`), freed
/// when dropped.
#[derive(Debug)]
pub struct Forgotten(#[allow(dead_code)] State);

/// The checks' memory. The table is passed to each call that reads or
/// writes it: whoever holds it may close it meanwhile.
#[derive(Debug)]
pub struct Guard {
    state: Mutex<State>,
    /// Applied and not yet in `state` (see the module docs). Locked after
    /// `state` when both are held.
    log: Mutex<Vec<Checked>>,
    /// `recorded` as of the last time the log was settled or written.
    recorded_then: AtomicUsize,
    /// Checks that had to read the table themselves (nothing read ahead).
    in_place: AtomicU64,
    /// `State::generation`, readable without the lock.
    generation: AtomicU64,
}

impl Default for Guard {
    fn default() -> Self {
        let known = Map::with_capacity_and_hasher(KNOWN_BOUND, RandomState::default());
        let state = State {
            known,
            recorded: Recorded::reserved(),
            log_spare: Vec::with_capacity(RESERVED_LOG),
            ..State::default()
        };
        Guard {
            state: Mutex::new(state),
            log: Mutex::new(Vec::with_capacity(RESERVED_LOG)),
            recorded_then: AtomicUsize::new(0),
            in_place: AtomicU64::new(0),
            generation: AtomicU64::new(0),
        }
    }
}

impl Guard {
    pub fn new() -> Self {
        Guard::default()
    }

    /// Everything the checks remember, taken out (the guard is left empty,
    /// nothing reserved), to be freed where the caller chooses.
    pub fn take_all(&mut self) -> Forgotten {
        drop(self.settled());
        self.recorded_then.store(0, Relaxed);
        Forgotten(std::mem::take(self.state.get_mut()))
    }

    /// The state, with what was logged taken into it.
    fn settled(&self) -> MutexGuard<'_, State> {
        let mut state = self.state.lock();
        let mut logged = std::mem::take(&mut state.log_spare);
        {
            let mut log = self.log.lock();
            std::mem::swap(&mut *log, &mut logged);
            // Still counted while being taken in: `recorded` never says 0
            // while anything is pending.
            self.recorded_then.fetch_add(logged.len(), Relaxed);
        }
        for c in &logged {
            state.applied(c);
        }
        logged.clear();
        state.log_spare = logged;
        self.recorded_then.store(state.recorded.len(), Relaxed);
        state
    }

    /// What of `batch` must be read from the table before its checks: names
    /// neither applied here nor already read ahead.
    pub fn plan<'a>(&self, batch: impl IntoIterator<Item = &'a Checked>) -> Reads {
        let state = self.settled();
        let mut reads = Reads { generation: state.generation, ..Reads::default() };
        let mut versions: HashSet<&[u8], RandomState> = HashSet::default();
        let mut ids: HashSet<&[u8], RandomState> = HashSet::default();
        for c in batch {
            if let Some((name, _)) = &c.version
                && state.applied_version(name).is_none()
                && !state.read_versions.contains_key(name)
                && versions.insert(name)
            {
                reads.versions.push(name.clone());
            }
            if let Some(id) = &c.id
                && !state.applied_id(id)
                && !state.read_ids.contains_key(id)
                && ids.insert(id)
            {
                reads.ids.push(id.clone());
            }
        }
        reads
    }

    /// Reads what `plan` asked for (blocks while a write holds the table)
    /// and keeps every answer for `check`; `now_ms` dates the ids' expiry.
    /// (The runtime uses `read_and_judge`, which keeps only the answers no
    /// verdict used.)
    pub fn read(&self, table: &VersionTable, reads: &Reads, now_ms: u64) -> Result<()> {
        let got = Self::fetch(table, reads, now_ms)?;
        let mut state = self.settled();
        if state.generation != reads.generation {
            // Read before an assignment changed: may predate another
            // member's writes.
            return Ok(());
        }
        state.bound_reads();
        for name in &reads.versions {
            state.keep_version(name, got.versions[&name[..]]);
        }
        for id in &reads.ids {
            state.keep_seen(id, got.ids[&id[..]]);
        }
        Ok(())
    }

    /// `read`, then `judge` of `batch` (the messages `reads` was planned
    /// for) in the same lock, keeping only the answers no verdict used.
    /// Called from a reading thread: the lock the event loop's calls take
    /// is held once and briefly, as a thread the OS deschedules while
    /// holding it holds up the loop.
    pub fn read_and_judge<'a>(
        &self,
        table: &VersionTable,
        reads: &Reads,
        now_ms: u64,
        batch: impl IntoIterator<Item = &'a Checked>,
        runs_hold: bool,
    ) -> Result<(u64, Vec<Option<Verdict>>)> {
        let got = Self::fetch(table, reads, now_ms)?;
        let mut state = self.settled();
        if state.generation != reads.generation {
            return Ok((state.generation, Vec::new()));
        }
        state.bound_reads();
        let verdicts = batch
            .into_iter()
            .map(|c| {
                let verdict = state.judge(c, runs_hold, &got);
                if verdict.is_none() {
                    state.keep(c, &got);
                }
                verdict
            })
            .collect();
        Ok((state.generation, verdicts))
    }

    fn fetch<'r>(table: &VersionTable, reads: &'r Reads, now_ms: u64) -> Result<Got<'r>> {
        let mut got = Got::default();
        if !reads.versions.is_empty() {
            let names: Vec<&[u8]> = reads.versions.iter().map(|n| &n[..]).collect();
            got.versions = names.iter().copied().zip(table.get_many(&names)?).collect();
        }
        if !reads.ids.is_empty() {
            let ids: Vec<&[u8]> = reads.ids.iter().map(|n| &n[..]).collect();
            got.ids = ids.iter().copied().zip(table.is_seen_many(&ids, now_ms)?).collect();
        }
        Ok(got)
    }

    /// What `check` would answer for each of `batch` now, from memory and
    /// what was read ahead only, under one lock (`None`: left to `check`).
    /// Stale and Duplicate hold for good (what is known only rises). Run
    /// holds until the message runs only if no other message of its key
    /// can complete meanwhile: pass `runs_hold` for batches the dispatcher
    /// hands out with ordering "key" or "partition" (one message of a key
    /// out at a time, recorded before its key is released); Run is never
    /// given to a message with an id. Returns the generation the verdicts
    /// hold for (see `generation`).
    pub fn judge<'a>(
        &self,
        batch: impl IntoIterator<Item = &'a Checked>,
        runs_hold: bool,
    ) -> (u64, Vec<Option<Verdict>>) {
        let mut state = self.settled();
        let verdicts = batch.into_iter().map(|c| state.judge(c, runs_hold, &Got::default())).collect();
        (state.generation, verdicts)
    }

    /// Bumped by every `forget`: a verdict of `judge` from an older
    /// generation may predate another member's writes.
    pub fn generation(&self) -> u64 {
        self.generation.load(Relaxed)
    }

    /// Whether the message may run. What was read ahead for it is used up;
    /// what was not is read in place (the only table access here).
    pub fn check(&self, table: &VersionTable, c: &Checked, now_ms: impl FnOnce() -> u64) -> Result<Verdict> {
        let mut state = self.settled();
        if let Some(id) = &c.id {
            if state.applied_id(id) {
                return Ok(Verdict::Duplicate);
            }
            let seen = match state.read_ids.remove(id) {
                Some(seen) => seen,
                None => {
                    drop(state);
                    self.in_place.fetch_add(1, Relaxed);
                    let seen = table.is_seen(id, now_ms())?;
                    state = self.settled();
                    seen
                }
            };
            if seen {
                return Ok(Verdict::Duplicate);
            }
        }
        let Some((name, version)) = &c.version else { return Ok(Verdict::Run) };
        let known = match state.applied_version(name) {
            Some(v) => Some(v),
            None => match state.read_versions.remove(name) {
                Some(read) => read,
                None => {
                    drop(state);
                    self.in_place.fetch_add(1, Relaxed);
                    table.get(name)?
                }
            },
        };
        Ok(if known.is_some_and(|k| *version <= k) { Verdict::Stale } else { Verdict::Run })
    }

    /// Records what a handler applied; returns about how many versions or
    /// ids are recorded and not yet being written (at most that many; the
    /// caller flushes early past a bound).
    pub fn applied(&self, c: &Checked) -> usize {
        self.applied_many([c])
    }

    /// `applied` for several messages: appended to the log, under its own
    /// lock, which no thread holds for longer than a swap.
    pub fn applied_many<'a>(&self, batch: impl IntoIterator<Item = &'a Checked>) -> usize {
        self.log.lock().extend(batch.into_iter().cloned());
        self.recorded()
    }

    /// How many checks read the table themselves, nothing having been read
    /// ahead for them.
    pub fn looked_up_in_place(&self) -> u64 {
        self.in_place.load(Relaxed)
    }

    /// About how many versions or ids are recorded and not yet being
    /// written: at most this many, and 0 only when none is. It does not
    /// take the log in (the event loop asks before every flush).
    pub fn recorded(&self) -> usize {
        let log = self.log.lock();
        self.recorded_then.load(Relaxed) + log.len()
    }

    /// Writes what is recorded, in one transaction per kind (versions, then
    /// ids with `ttl_ms`). One write at a time: the caller serializes them.
    /// Until it returns, what it writes still answers the checks; on
    /// failure it is recorded again, to be written by the next call.
    pub fn write(&self, table: &VersionTable, ttl_ms: Option<u64>, now_ms: u64) -> Result<()> {
        let writing = {
            let mut state = self.settled();
            if state.recorded.is_empty() {
                return Ok(());
            }
            let fresh = state.spare.take().unwrap_or_else(Recorded::reserved);
            let taken = Arc::new(std::mem::replace(&mut state.recorded, fresh));
            state.writing = Arc::clone(&taken);
            self.recorded_then.store(0, Relaxed);
            taken
        };
        let result = Self::store(table, &writing, ttl_ms, now_ms);
        let mut state = self.state.lock();
        match &result {
            Ok(()) => state.written(&writing),
            Err(_) => {
                state.recorded.merge(&writing);
                self.recorded_then.store(state.recorded.len(), Relaxed);
            }
        }
        state.writing = Arc::default();
        let forgotten = (state.known.len() > KNOWN_BOUND).then(|| state.reset_known());
        drop(state);
        drop(forgotten);
        // Emptied here, outside the lock (freeing the names takes a while),
        // then kept for the write after next.
        if let Ok(mut used) = Arc::try_unwrap(writing) {
            used.clear();
            self.state.lock().spare.get_or_insert(used);
        }
        result
    }

    /// Forgets what was read ahead and what this process knows it wrote:
    /// called when its assignment changes (other members may write the
    /// keys of partitions it gets back). What is recorded or being written
    /// is its own and stays.
    ///
    /// Returns what was forgotten: freeing 100,000s of names takes
    /// milliseconds, so the caller chooses where that happens.
    pub fn forget(&self) -> Forgotten {
        let mut state = self.settled();
        state.generation += 1;
        self.generation.store(state.generation, Relaxed);
        state.reset_known()
    }

    /// Writes one message's version and id now (`record_versions="each"`).
    pub fn write_one(
        &self,
        table: &VersionTable,
        c: &Checked,
        ttl_ms: Option<u64>,
        now_ms: u64,
    ) -> Result<()> {
        let mut one = Recorded::default();
        if let Some((name, version)) = &c.version {
            one.raise(name, *version);
        }
        if let Some(id) = &c.id {
            one.ids.insert(id.clone());
        }
        if one.is_empty() {
            return Ok(());
        }
        Self::store(table, &one, ttl_ms, now_ms)?;
        let mut state = self.settled();
        if let Some((name, version)) = &c.version {
            raise(&mut state.known, name, *version);
        }
        state.written(&one);
        Ok(())
    }

    fn store(table: &VersionTable, r: &Recorded, ttl_ms: Option<u64>, now_ms: u64) -> Result<()> {
        if !r.versions.is_empty() {
            let pairs: Vec<(&[u8], u64)> = r.versions.iter().map(|(k, &v)| (&k[..], v)).collect();
            table.check_and_set_many_folded(&pairs)?;
        }
        if !r.ids.is_empty() {
            let ids: Vec<&[u8]> = r.ids.iter().map(|i| &i[..]).collect();
            table.mark_seen_many(&ids, ttl_ms, now_ms)?;
        }
        Ok(())
    }

    #[cfg(test)]
    fn read_counts(&self) -> (usize, usize) {
        let state = self.state.lock();
        (state.read_versions.len(), state.read_ids.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::versions::Options;

    struct Fixture {
        _dir: tempfile::TempDir,
        table: VersionTable,
        guard: Guard,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let table = VersionTable::open(&dir.path().join("v"), Options::default()).unwrap();
        Fixture { _dir: dir, table, guard: Guard::new() }
    }

    fn msg(key: &[u8], version: u64, id: Option<&[u8]>) -> Checked {
        Checked::new(Some(key), Some(version), id)
    }

    #[test]
    fn names_keep_valid_keys_and_hash_the_rest() {
        assert_eq!(&*table_name(b"acct", MAX_KEY), b"acct");
        let long = vec![b'k'; MAX_KEY + 1];
        for raw in [&b""[..], &long[..]] {
            let name = table_name(raw, MAX_KEY);
            assert!(name.starts_with(HASHED_PREFIX));
            assert_eq!(name.len(), HASHED_PREFIX.len() + 32);
        }
        let forged = table_name(&long, MAX_KEY);
        assert_ne!(table_name(&forged, MAX_KEY), forged, "a crafted name is hashed again");
        // SHA-256("") is the published empty-input digest.
        assert_eq!(table_name(b"", MAX_KEY)[HASHED_PREFIX.len()..][..4], [0xe3, 0xb0, 0xc4, 0x42]);
    }

    #[test]
    fn stale_and_duplicate_by_memory_read_ahead_and_table() {
        let f = fixture();
        let (t, g) = (&f.table, &f.guard);
        t.check_and_set(b"a", 5).unwrap();
        t.mark_seen(b"i1", None, 0).unwrap();
        let batch = [msg(b"a", 5, None), msg(b"b", 1, Some(b"i1")), msg(b"c", 1, Some(b"i2"))];
        let reads = g.plan(&batch);
        assert_eq!(reads.versions.len(), 3);
        g.read(t, &reads, 1).unwrap();
        let verdicts: Vec<_> = batch.iter().map(|c| g.check(t, c, || 1).unwrap()).collect();
        assert_eq!(verdicts, [Verdict::Stale, Verdict::Duplicate, Verdict::Run]);
        assert_eq!(g.read_counts(), (1, 0), "answers are used up (b's was not asked)");
        assert_eq!(g.applied(&batch[2]), 1);
        // Applied here: answered from memory, no read needed.
        assert!(g.plan([&msg(b"c", 1, Some(b"i2"))]).is_empty());
        assert_eq!(g.check(t, &msg(b"c", 1, None), || 1).unwrap(), Verdict::Stale);
        assert_eq!(g.check(t, &msg(b"z", 1, Some(b"i2")), || 1).unwrap(), Verdict::Duplicate);
        assert_eq!(g.looked_up_in_place(), 0);
        // Not read ahead: looked up in place.
        assert_eq!(g.check(t, &msg(b"a", 6, None), || 1).unwrap(), Verdict::Run);
        assert_eq!(g.looked_up_in_place(), 1);
    }

    #[test]
    fn judge_gives_only_verdicts_that_hold_and_leaves_the_rest_to_check() {
        let f = fixture();
        let (t, g) = (&f.table, &f.guard);
        t.check_and_set(b"a", 5).unwrap();
        t.mark_seen(b"seen", None, 0).unwrap();
        g.applied(&msg(b"m", 3, None));
        let batch = [
            msg(b"a", 5, None),          // stale by the table
            msg(b"b", 1, None),          // new
            msg(b"c", 1, Some(b"seen")), // duplicate by the table
            msg(b"d", 1, Some(b"new")),  // new, but it has an id
            msg(b"m", 2, None),          // stale by memory
        ];
        g.read(t, &g.plan(&batch), 1).unwrap();
        let unread = msg(b"z", 1, None);
        let (generation, verdicts) = g.judge(batch.iter().chain([&unread]), true);
        use Verdict::*;
        assert_eq!(verdicts, [Some(Stale), Some(Run), Some(Duplicate), None, Some(Stale), None]);
        // What a verdict used is used up (a duplicate's version is not
        // looked at, as in check); d's answers are left for check.
        assert_eq!(g.read_counts(), (2, 1));
        assert_eq!(g.check(t, &batch[3], || 1).unwrap(), Run);
        assert_eq!(g.looked_up_in_place(), 0);
        // Without runs_hold, Run is never given.
        assert_eq!(g.judge([&msg(b"m", 9, None)], false).1, [None]);
        assert_eq!(g.judge([&msg(b"m", 1, None)], false).1, [Some(Stale)]);
        assert_eq!(g.generation(), generation);
        g.forget();
        assert_eq!(g.generation(), generation + 1);
    }

    #[test]
    fn read_and_judge_keeps_only_the_answers_left_to_check() {
        let f = fixture();
        let (t, g) = (&f.table, &f.guard);
        t.check_and_set(b"a", 5).unwrap();
        let batch = [msg(b"a", 5, None), msg(b"b", 1, None), msg(b"c", 1, Some(b"new"))];
        let reads = g.plan(&batch);
        let (generation, verdicts) = g.read_and_judge(t, &reads, 1, &batch, true).unwrap();
        use Verdict::*;
        assert_eq!(verdicts, [Some(Stale), Some(Run), None]);
        assert_eq!(g.read_counts(), (1, 1), "only c's answers are kept");
        assert_eq!(g.check(t, &batch[2], || 1).unwrap(), Run);
        assert_eq!((g.looked_up_in_place(), g.read_counts()), (0, (0, 0)));
        // Planned before a forget: nothing judged, nothing kept.
        let reads = g.plan([&msg(b"d", 1, None)]);
        g.forget();
        let (after, verdicts) = g.read_and_judge(t, &reads, 1, [&msg(b"d", 1, None)], true).unwrap();
        assert_eq!((after, verdicts.len(), g.read_counts()), (generation + 1, 0, (0, 0)));
    }

    #[test]
    fn a_write_raises_what_was_read_before_it() {
        let f = fixture();
        let (t, g) = (&f.table, &f.guard);
        let first = msg(b"a", 4, Some(b"x"));
        g.read(t, &g.plan([&first]), 1).unwrap(); // reads: none, unseen
        g.applied(&msg(b"a", 7, Some(b"x")));
        g.write(t, None, 1).unwrap();
        assert_eq!(t.get(b"a").unwrap(), Some(7));
        // The answer read before the write must not say "4 is new".
        assert_eq!(g.check(t, &first, || 1).unwrap(), Verdict::Duplicate);
        assert_eq!(g.check(t, &msg(b"a", 4, None), || 1).unwrap(), Verdict::Stale);
        assert_eq!(g.recorded(), 0);
        // Known from the write: no read needed, until the assignment changes.
        assert!(g.plan([&msg(b"a", 8, None)]).is_empty());
        assert_eq!(g.check(t, &msg(b"a", 7, None), || 1).unwrap(), Verdict::Stale);
        g.forget();
        assert_eq!(g.plan([&msg(b"a", 8, None)]).versions.len(), 1);
    }

    #[test]
    fn forgetting_keeps_what_is_not_yet_written_and_hands_back_the_rest() {
        let f = fixture();
        let (t, g) = (&f.table, &f.guard);
        g.applied(&msg(b"a", 3, None));
        g.write(t, None, 1).unwrap();
        g.applied(&msg(b"b", 2, None));
        g.read(t, &g.plan([&msg(b"c", 1, None)]), 1).unwrap();
        let Forgotten(old) = g.forget();
        assert_eq!((old.known.len(), old.read_versions.len()), (2, 1));
        // b is recorded and not written: still answered from memory.
        assert!(g.plan([&msg(b"b", 9, None)]).is_empty());
        assert_eq!(g.plan([&msg(b"a", 9, None)]).versions.len(), 1);
        assert_eq!(g.read_counts(), (0, 0));
    }

    #[test]
    fn writes_reuse_the_reserved_maps() {
        let f = fixture();
        let (t, g) = (&f.table, &f.guard);
        for round in 0..3_u64 {
            g.applied(&msg(b"a", round + 1, Some(format!("i{round}").as_bytes())));
            g.write(t, None, 1).unwrap();
            let state = g.state.lock();
            let spare = state.spare.as_ref().expect("the written maps come back");
            assert!(spare.is_empty());
            for r in [spare, &state.recorded] {
                assert!(r.versions.capacity() >= RESERVED_RECORDS);
                assert!(r.ids.capacity() >= RESERVED_RECORDS);
            }
        }
        assert_eq!(t.get(b"a").unwrap(), Some(3));
    }

    #[test]
    fn take_all_leaves_an_empty_guard() {
        let mut f = fixture();
        f.guard.applied(&msg(b"a", 3, Some(b"i")));
        let Forgotten(old) = f.guard.take_all();
        assert_eq!((old.known.len(), old.recorded.versions.len(), old.recorded.ids.len()), (1, 1, 1));
        assert_eq!(f.guard.recorded(), 0);
        assert_eq!(f.guard.plan([&msg(b"a", 9, Some(b"i"))]).versions.len(), 1);
    }

    #[test]
    fn a_read_planned_before_forget_is_not_kept() {
        let f = fixture();
        let (t, g) = (&f.table, &f.guard);
        let reads = g.plan([&msg(b"a", 1, None)]);
        g.forget();
        g.read(t, &reads, 1).unwrap();
        assert_eq!(g.read_counts(), (0, 0));
    }

    #[test]
    fn a_read_that_raced_a_write_never_lowers_it() {
        let f = fixture();
        let (t, g) = (&f.table, &f.guard);
        // Raised to 9 by a write while an older read of "a" (none) was out.
        g.state.lock().read_versions.insert((*b"a").into(), Some(9));
        g.read(t, &g_reads(b"a"), 1).unwrap();
        assert_eq!(g.check(t, &msg(b"a", 9, None), || 1).unwrap(), Verdict::Stale);
    }

    fn g_reads(name: &[u8]) -> Reads {
        Reads { versions: vec![name.into()], ids: Vec::new(), generation: 0 }
    }

    #[test]
    fn what_was_applied_answers_every_later_call_on_any_thread() {
        let f = fixture();
        let (t, g) = (&f.table, &f.guard);
        // Logged only: the maps take it in at the next call that reads them.
        assert_eq!(g.applied_many(&[msg(b"a", 3, None), msg(b"a", 5, None), msg(b"b", 1, None)]), 3);
        assert_eq!(g.state.lock().known.len(), 0);
        assert_eq!(g.recorded(), 3, "counted (at most) without being taken in");
        assert_eq!(g.state.lock().known.len(), 0);
        std::thread::scope(|s| {
            s.spawn(|| {
                assert!(g.plan([&msg(b"a", 9, None)]).is_empty(), "known from the log");
                let (_, verdicts) = g.judge([&msg(b"a", 5, None), &msg(b"b", 2, None)], true);
                assert_eq!(verdicts, [Some(Verdict::Stale), Some(Verdict::Run)]);
            });
        });
        assert_eq!(g.recorded(), 2, "a and b, a at its newest");
        assert_eq!(g.applied(&msg(b"c", 1, None)), 3, "at most: the last settled count plus the log");
        g.write(t, None, 1).unwrap();
        assert_eq!((t.get(b"a").unwrap(), t.get(b"c").unwrap()), (Some(5), Some(1)));
        assert_eq!(g.recorded(), 0);
    }

    #[test]
    fn a_failed_write_keeps_what_it_held() {
        let f = fixture();
        let (t, g) = (&f.table, &f.guard);
        g.applied(&msg(b"a", 3, None));
        g.applied(&Checked { version: Some(((*b"").into(), 1)), id: None });
        assert!(g.write(t, None, 1).is_err(), "an empty name is refused by the table");
        assert_eq!(g.recorded(), 2, "recorded again, for the next write");
        assert_eq!(g.check(t, &msg(b"a", 3, None), || 1).unwrap(), Verdict::Stale);
    }
}
