//! Message ids seen within a window (`seen`), and the expiry index that
//! lets a purge read only what has expired (`expiry`).

use super::*;

impl VersionTable {
    /// True the first time `id` is marked within its window: it had never
    /// been seen, or its previous window (`ttl_ms` after that marking) has
    /// passed at `now_ms`. `ttl_ms = None` remembers it forever.
    pub fn mark_seen(&self, id: &[u8], ttl_ms: Option<u64>, now_ms: u64) -> Result<bool> {
        Ok(self.mark_seen_many(&[id], ttl_ms, now_ms)?[0])
    }

    /// `mark_seen` for a batch, in one transaction; an id repeated in the
    /// batch is seen by its first occurrence.
    pub fn mark_seen_many(&self, ids: &[&[u8]], ttl_ms: Option<u64>, now_ms: u64) -> Result<Vec<bool>> {
        for id in ids {
            check_key("message id", id, MAX_ID)?;
        }
        if ttl_ms == Some(0) {
            return Err(Error::InvalidArgument("ttl must be positive (or None for no expiry)".into()));
        }
        let expires = ttl_ms.map_or(FOREVER, |ttl| now_ms.saturating_add(ttl).min(FOREVER - 1));
        let Dbs { seen, expiry, .. } = self.shared.dbs;
        self.write("mark_seen", |txn| {
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                let first = match seen.get(txn, id)? {
                    Some(until) if until > now_ms => false,
                    Some(until) => {
                        expiry.delete(txn, &expiry_key(until, id))?;
                        true
                    }
                    None => true,
                };
                if first {
                    seen.put(txn, id, &expires)?;
                    if expires != FOREVER {
                        expiry.put(txn, &expiry_key(expires, id), &())?;
                    }
                }
                out.push(first);
            }
            Ok(out)
        })
    }

    /// True if `id` was marked and its window has not passed at `now_ms`.
    /// Reads only: it does not mark.
    pub fn is_seen(&self, id: &[u8], now_ms: u64) -> Result<bool> {
        check_key("message id", id, MAX_ID)?;
        let seen = self.shared.dbs.seen;
        self.read("is_seen", |txn| Ok(seen.get(txn, id)?.is_some_and(|until| until > now_ms)))
    }

    /// `is_seen` for each id, in one read transaction.
    pub fn is_seen_many(&self, ids: &[&[u8]], now_ms: u64) -> Result<Vec<bool>> {
        for id in ids {
            check_key("message id", id, MAX_ID)?;
        }
        let seen = self.shared.dbs.seen;
        self.read("is_seen_many", |txn| {
            ids.iter().map(|id| Ok(seen.get(txn, id)?.is_some_and(|until| until > now_ms))).collect()
        })
    }

    /// Forgets ids whose window has passed at `now_ms`; returns how many.
    pub fn purge_expired(&self, now_ms: u64) -> Result<u64> {
        let Dbs { seen, expiry, .. } = self.shared.dbs;
        self.write("purge_expired", |txn| {
            let mut purged = 0;
            loop {
                // Collect a chunk, then delete: LMDB forbids writing through
                // a database while iterating it without a write cursor.
                let due: Vec<Vec<u8>> = expiry
                    .iter(txn)?
                    .take(4096)
                    .map(|kv| kv.map(|(k, ())| k.to_vec()))
                    .take_while(|k| k.as_ref().map_or(true, |k| be_u64(k).map_or(true, |t| t <= now_ms)))
                    .collect::<Result<_, _>>()?;
                if due.is_empty() {
                    return Ok(purged);
                }
                for k in &due {
                    let (until, id) = (be_u64(k)?, &k[8..]);
                    expiry.delete(txn, k)?;
                    if seen.get(txn, id)? == Some(until) {
                        seen.delete(txn, id)?;
                        purged += 1;
                    }
                }
            }
        })
    }
}

fn expiry_key(expiry: u64, id: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + id.len());
    k.extend_from_slice(&expiry.to_be_bytes());
    k.extend_from_slice(id);
    k
}
