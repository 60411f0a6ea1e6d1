//! Last-write-wins registers: a value stored with its own version (`values`).

use super::*;

impl VersionTable {
    /// A last-write-wins register: stores `value` with `version` iff the
    /// version is greater than the register's (or it is empty). The version
    /// and value are one record, so they change together. The register's
    /// version is its own, independent of `check_and_set`'s.
    pub fn put_if_newer(&self, key: &[u8], version: u64, value: &[u8]) -> Result<bool> {
        check_key("key", key, MAX_KEY)?;
        check_version(version)?;
        let values = self.shared.dbs.values;
        self.write("put_if_newer", |txn| {
            if let Some(stored) = values.get(txn, key)?
                && version <= be_u64(stored)?
            {
                return Ok(false);
            }
            let mut record = Vec::with_capacity(8 + value.len());
            record.extend_from_slice(&version.to_be_bytes());
            record.extend_from_slice(value);
            values.put(txn, key, &record)?;
            Ok(true)
        })
    }

    /// The register's `(version, value)`, if it was ever written.
    pub fn get_value(&self, key: &[u8]) -> Result<Option<(u64, Vec<u8>)>> {
        check_key("key", key, MAX_KEY)?;
        let values = self.shared.dbs.values;
        self.read("get_value", |txn| match values.get(txn, key)? {
            Some(record) => Ok(Some((be_u64(record)?, record[8..].to_vec()))),
            None => Ok(None),
        })
    }
}
