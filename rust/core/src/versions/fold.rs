//! Folding the journal into the B-tree, in key order.

use super::*;

impl VersionTable {
    /// Writes the journal's versions into `versions` and empties it.
    pub(super) fn fold(&self, txn: &mut RwTxn<'_>, index: &mut Index) -> Txn<()> {
        let Dbs { meta, journal, versions, .. } = self.shared.dbs;
        let sorted = index.pending_sorted();
        // Keys in order, one cursor: each B-tree page is copied and written
        // once however many of its keys changed, and keys past the last one
        // (ids that grow) are appended, filling pages whole. When the
        // journal's keys are a good part of the tree, the cursor walks it
        // and overwrites each key where it lies; otherwise each key is put
        // through the cursor, which skips the descent from the root when
        // the key is on the cursor's page.
        if (sorted.len() as u64).saturating_mul(WALK_BELOW) >= versions.len(txn)? {
            fold_walking(versions, txn, &sorted)?;
        } else {
            let last = versions.last(txn)?.map(|(key, _)| key.to_vec());
            let mut cursor = versions.remap_data_type::<Bytes>().iter_mut(txn)?;
            for &(key, version) in &sorted {
                let flags = match &last {
                    Some(last) if key <= last.as_slice() => PutFlags::empty(),
                    _ => PutFlags::APPEND,
                };
                // SAFETY: `key` and `version` live in the index, not in the
                // database, so the put invalidates nothing they point to.
                #[allow(unsafe_code)]
                unsafe {
                    cursor.put_current_with_options::<Bytes>(flags, key, &version.to_be_bytes())?;
                }
            }
        }
        drop(sorted);
        journal.clear(txn)?;
        meta.put(txn, FOLDED, &index.next.to_be_bytes())?;
        index.folded_all();
        Ok(())
    }
}

/// A fold walks the tree when its keys number at least 1/`WALK_BELOW` of
/// the tree's: stepping over the keys between two of them is then cheaper
/// than positioning the cursor on each.
const WALK_BELOW: u64 = 8;

/// Writes `sorted` (strictly increasing keys) into `versions` by walking it
/// with one cursor from the first key: an existing key is overwritten where
/// the cursor stands; a new one is inserted before the entry the cursor has
/// reached, or appended once the walk is past the end.
fn fold_walking(
    versions: Database<Bytes, U64<BigEndian>>,
    txn: &mut RwTxn<'_>,
    sorted: &[(&[u8], u64)],
) -> Txn<()> {
    use std::ops::Bound::{Included, Unbounded};
    let Some(&(first, _)) = sorted.first() else { return Ok(()) };
    let mut walk = versions.remap_data_type::<Bytes>().range_mut(txn, &(Included(first), Unbounded))?;
    // The key under the cursor, copied: nothing borrowed from the database
    // may be held across a write.
    let mut at: Vec<u8> = Vec::new();
    fn step(walk: &mut heed::RwRange<'_, Bytes, Bytes>, at: &mut Vec<u8>) -> Txn<bool> {
        Ok(match walk.next().transpose()? {
            Some((key, _)) => {
                at.clear();
                at.extend_from_slice(key);
                true
            }
            None => false,
        })
    }
    let mut on = step(&mut walk, &mut at)?;
    for &(key, version) in sorted {
        while on && at.as_slice() < key {
            on = step(&mut walk, &mut at)?;
        }
        let value = version.to_be_bytes();
        // SAFETY: `key` and `value` live outside the database, and `at` is a
        // copy, so the writes invalidate nothing still in use; `put_current`
        // is given the key the cursor is on.
        #[allow(unsafe_code)]
        unsafe {
            if on && at.as_slice() == key {
                walk.put_current(key, &value)?;
            } else if on {
                // Inserted before `at`: the cursor moves onto the new key,
                // and one step brings it back to `at`.
                walk.put_current_with_options::<Bytes>(PutFlags::empty(), key, &value)?;
                on = step(&mut walk, &mut at)?;
            } else {
                walk.put_current_with_options::<Bytes>(PutFlags::APPEND, key, &value)?;
            }
        }
    }
    Ok(())
}
