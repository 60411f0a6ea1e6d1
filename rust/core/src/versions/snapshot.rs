//! Reading the version map page by page from one consistent snapshot.

use super::*;

impl VersionTable {
    /// A snapshot of the version map for iteration; it holds an LMDB read
    /// transaction (and so a view of the data as of now) until dropped.
    pub fn snapshot(&self) -> Result<Snapshot> {
        let txn = self.shared.env.clone().static_read_txn().map_err(|e| self.err("snapshot", e))?;
        let Dbs { meta, journal: records, versions, .. } = self.shared.dbs;
        let mut journal = BTreeMap::new();
        let mut read = || -> Txn<()> {
            for record in records.range(&txn, &(meta_u64(meta, &txn, FOLDED, FIRST_RECORD)?..))? {
                journal::decode(record?.1, |key, version| {
                    let known = journal.entry(key.to_vec()).or_insert(version);
                    *known = (*known).max(version);
                })
                .map_err(Fault::Damaged)?;
            }
            Ok(())
        };
        read().map_err(|e| self.err("snapshot", e))?;
        Ok(Snapshot { txn, versions, journal })
    }
}

/// A consistent view of the version map, read page by page.
pub struct Snapshot {
    txn: RoTxn<'static, WithoutTls>,
    versions: Database<Bytes, U64<BigEndian>>,
    /// The journal's versions as of the snapshot, merged into every page.
    journal: BTreeMap<Vec<u8>, u64>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot").finish_non_exhaustive()
    }
}

impl Snapshot {
    /// Up to `limit` entries with keys after `after` (from the start if
    /// `None`), in key order.
    pub fn page(&self, after: Option<&[u8]>, limit: usize) -> Result<Vec<(Vec<u8>, u64)>> {
        use std::cmp::Ordering::{Equal, Greater, Less};
        use std::ops::Bound;
        let store = |e: heed::Error| Error::Store(e.to_string());
        let range = (after.map_or(Bound::Unbounded, Bound::Excluded), Bound::Unbounded);
        let mut tree = self.versions.range(&self.txn, &range).map_err(store)?;
        let mut journal = self.journal.range::<[u8], _>(range).map(|(k, &v)| (k.as_slice(), v));
        let (mut t, mut j) = (tree.next().transpose().map_err(store)?, journal.next());
        let mut out = Vec::with_capacity(limit.min(4096));
        while out.len() < limit {
            let (key, version, advance_tree, advance_journal) = match (t, j) {
                (None, None) => break,
                (Some((k, v)), None) => (k, v, true, false),
                (None, Some((k, v))) => (k, v, false, true),
                (Some((tk, tv)), Some((jk, jv))) => match tk.cmp(jk) {
                    Less => (tk, tv, true, false),
                    Greater => (jk, jv, false, true),
                    Equal => (tk, tv.max(jv), true, true),
                },
            };
            out.push((key.to_vec(), version));
            if advance_tree {
                t = tree.next().transpose().map_err(store)?;
            }
            if advance_journal {
                j = journal.next();
            }
        }
        Ok(out)
    }
}
