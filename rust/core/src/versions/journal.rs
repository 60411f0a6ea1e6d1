//! Journal records: the versions one `check_and_set_many` commit raised, as
//! a msgpack array of `[key: bin, version: uint]` pairs.

use super::{MAX_KEY, MAX_VERSION};

/// Encodes `entries` as one record.
pub(super) fn encode<'a>(entries: impl ExactSizeIterator<Item = (&'a [u8], u64)>) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + entries.len() * 24);
    // Writing to a Vec cannot fail.
    let len = u32::try_from(entries.len()).expect("a batch of fewer than 2**32 pairs");
    rmp::encode::write_array_len(&mut out, len).expect("write to Vec");
    for (key, version) in entries {
        rmp::encode::write_array_len(&mut out, 2).expect("write to Vec");
        rmp::encode::write_bin(&mut out, key).expect("write to Vec");
        rmp::encode::write_uint(&mut out, version).expect("write to Vec");
    }
    out
}

/// Calls `f` with each `(key, version)` of `record`, in order. Keys and
/// versions are checked as the API checks them: a record keylane did not
/// write is an error, never half-believed.
pub(super) fn decode(mut record: &[u8], mut f: impl FnMut(&[u8], u64)) -> Result<(), String> {
    let rd = &mut record;
    let bad = |e: &dyn std::fmt::Display| {
        format!(
            "unreadable journal record ({e}): the table was changed by something other than keylane, \
             or damaged on disk; restore it from a copy"
        )
    };
    let n = rmp::decode::read_array_len(rd).map_err(|e| bad(&e))?;
    for _ in 0..n {
        let pair = rmp::decode::read_array_len(rd).map_err(|e| bad(&e))?;
        if pair != 2 {
            return Err(bad(&format!("an entry of {pair} fields")));
        }
        let len = rmp::decode::read_bin_len(rd).map_err(|e| bad(&e))? as usize;
        if len == 0 || len > MAX_KEY {
            return Err(bad(&format!("a key of {len} bytes")));
        }
        if rd.len() < len {
            return Err(bad(&"truncated key"));
        }
        let (key, rest) = rd.split_at(len);
        *rd = rest;
        let version: u64 = rmp::decode::read_int(rd).map_err(|e| bad(&e))?;
        if version > MAX_VERSION {
            return Err(bad(&format!("version {version}")));
        }
        f(key, version);
    }
    if !rd.is_empty() {
        return Err(bad(&"trailing bytes"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{decode, encode};

    #[test]
    fn round_trip() {
        let entries: Vec<(&[u8], u64)> =
            vec![(b"a", 0), (b"key-2", 1 << 40), (&[0xff; 300], i64::MAX as u64)];
        let record = encode(entries.iter().copied());
        let mut back = Vec::new();
        decode(&record, |k, v| back.push((k.to_vec(), v))).unwrap();
        let want: Vec<(Vec<u8>, u64)> = entries.iter().map(|(k, v)| (k.to_vec(), *v)).collect();
        assert_eq!(back, want);
    }

    #[test]
    fn damage_is_an_error() {
        let record = encode([(&b"key"[..], 7)].into_iter());
        for cut in 0..record.len() {
            assert!(decode(&record[..cut], |_, _| {}).is_err(), "cut at {cut}");
        }
        let mut long = record.clone();
        long.push(0);
        assert!(decode(&long, |_, _| {}).is_err());
        let big_key = vec![b'k'; 512];
        assert!(decode(&encode([(&big_key[..], 1)].into_iter()), |_, _| {}).is_err());
        assert!(decode(&encode([(&b""[..], 1)].into_iter()), |_, _| {}).is_err());
        assert!(decode(&encode([(&b"k"[..], u64::MAX)].into_iter()), |_, _| {}).is_err());
    }
}
