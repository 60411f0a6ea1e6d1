//! Kafka's key → partition mapping, bit-exact with the Java client
//! (`Utils.murmur2` + `BuiltInPartitioner.partitionForKey`) and with
//! librdkafka's `murmur2_random` partitioner for non-null keys.
//!
//! Java computes the hash on `int`s with wrapping multiplication and logical
//! (`>>>`) shifts; `u32` arithmetic here is the same bit pattern, and the
//! final cast to `i32` gives the value Java prints.

use std::num::NonZeroU32;

use crate::{Error, Result};

const SEED: u32 = 0x9747_b28c;
const M: u32 = 0x5bd1_e995;
const R: u32 = 24;

/// Kafka's murmur2 of `data`, as the signed 32-bit value the Java client
/// returns.
#[inline]
pub fn murmur2(data: &[u8]) -> i32 {
    // Java takes the length as an `int`; keys beyond 2 GiB cannot exist in
    // Kafka, and truncating keeps the same bits Java would see for any
    // length it accepts.
    let mut h: u32 = SEED ^ (data.len() as u32);
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        let mut k = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = words.remainder();
    // Java's `switch (length % 4)` falls through 3 → 2 → 1; only the last
    // case multiplies.
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition Kafka's Java producer picks for a non-null key:
/// `(murmur2(key) & 0x7fffffff) % num_partitions`.
#[inline]
pub fn partition_for_key(key: &[u8], num_partitions: NonZeroU32) -> u32 {
    (murmur2(key) as u32 & 0x7fff_ffff) % num_partitions.get()
}

/// How many of `keys` land on a different partition when a topic goes from
/// `old` to `new` partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Moves {
    pub moved: u64,
    pub total: u64,
}

impl Moves {
    /// Adds one key's verdict.
    #[inline]
    pub fn add(&mut self, key: &[u8], old: NonZeroU32, new: NonZeroU32) {
        let h = murmur2(key) as u32 & 0x7fff_ffff;
        self.total += 1;
        self.moved += u64::from(h % old.get() != h % new.get());
    }

    /// Merges the counts of another chunk of keys.
    pub fn merge(&mut self, other: Moves) {
        self.moved += other.moved;
        self.total += other.total;
    }

    /// The fraction of keys that moved; an error when no key was seen,
    /// since a fraction of nothing is not zero, it is undefined.
    pub fn fraction(&self) -> Result<f64> {
        if self.total == 0 {
            return Err(Error::InvalidArgument(
                "repartition_moves needs at least one key: the fraction of an empty key set is undefined"
                    .into(),
            ));
        }
        Ok(self.moved as f64 / self.total as f64)
    }
}

/// The fraction of `keys` whose partition changes between `old` and `new`
/// partition counts.
pub fn repartition_moves<'a, I>(keys: I, old: NonZeroU32, new: NonZeroU32) -> Result<f64>
where
    I: IntoIterator<Item = &'a [u8]>,
{
    let mut moves = Moves::default();
    for key in keys {
        moves.add(key, old, new);
    }
    moves.fraction()
}

/// Checks a partition count coming from outside, named `what` in the error
/// (Kafka partition counts are Java `int`s, so at most `i32::MAX`).
pub fn partition_count(n: i64, what: &str) -> Result<NonZeroU32> {
    if !(1..=i64::from(i32::MAX)).contains(&n) {
        return Err(Error::InvalidArgument(format!(
            "{what} must be between 1 and {} (a Kafka partition count), got {n}",
            i32::MAX
        )));
    }
    // The range check above makes both conversions infallible.
    Ok(NonZeroU32::new(n as u32).expect("checked non-zero"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: u32) -> NonZeroU32 {
        NonZeroU32::new(p).unwrap()
    }

    /// apache/kafka, clients/src/test/java/org/apache/kafka/common/utils/UtilsTest.java,
    /// `testMurmur2`.
    #[test]
    fn kafka_utils_test_vectors() {
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58_897_971),
            (b"abc", 479_470_107),
        ];
        for (key, want) in cases {
            assert_eq!(murmur2(key), want, "key {:?}", String::from_utf8_lossy(key));
        }
    }

    /// confluentinc/librdkafka, src/rdmurmur2.c, `unittest_murmur2`: the same
    /// strings at every alignment (we have no alignment-dependent path, but
    /// the vectors pin the tail handling for lengths 1..=4 and the empty key).
    #[test]
    fn librdkafka_unittest_vectors() {
        let short = b"1234";
        let long = b"PreAmbleWillBeRemoved,ThePrePartThatIs";
        let cases: [(&[u8], u32); 11] = [
            (b"kafka", 0xd067_cf64),
            (b"giberish123456789", 0x8f55_2b0c),
            (&short[0..], 0x9fc9_7b14),
            (&short[1..], 0xe7c0_09ca),
            (&short[2..], 0x8739_30da),
            (&short[3..], 0x5a4b_5ca1),
            (&long[0..], 0x7842_4f1c),
            (&long[1..], 0x4a62_b377),
            (&long[2..], 0xe0e4_e09e),
            (&long[3..], 0x62b8_b43f),
            (b"", 0x106e_08d9),
        ];
        for (key, want) in cases {
            assert_eq!(murmur2(key), want as i32, "key {:?}", String::from_utf8_lossy(key));
        }
    }

    /// kafka-python, test/test_partitioner.py: partitions of a 1000-partition
    /// topic, computed by the Java client.
    #[test]
    fn kafka_python_partition_vectors() {
        let cases: [(&[u8], u32); 6] =
            [(b"", 681), (b"a", 524), (b"ab", 434), (b"abc", 107), (b"123456789", 566), (b"\x00 ", 742)];
        for (key, want) in cases {
            assert_eq!(partition_for_key(key, n(1000)), want, "key {key:?}");
        }
    }

    #[test]
    fn one_partition_is_always_zero() {
        for key in [&b""[..], b"x", b"some longer key"] {
            assert_eq!(partition_for_key(key, n(1)), 0);
        }
    }

    #[test]
    fn partition_is_in_range_even_for_negative_hashes() {
        // "21" hashes negative: the sign bit must be masked, not abs()'d.
        assert!(murmur2(b"21") < 0);
        let p = partition_for_key(b"21", n(7));
        assert_eq!(p, ((-973_932_308_i32) as u32 & 0x7fff_ffff) % 7);
    }

    #[test]
    fn doubling_partitions_moves_about_half_the_keys() {
        let keys: Vec<Vec<u8>> = (0..20_000).map(|i| format!("acct-{i}").into_bytes()).collect();
        let f = repartition_moves(keys.iter().map(Vec::as_slice), n(6), n(12)).unwrap();
        // h % 12 keeps h % 6 exactly when the bit above is zero: half the keys.
        assert!((f - 0.5).abs() < 0.02, "fraction {f}");
        let same = repartition_moves(keys.iter().map(Vec::as_slice), n(6), n(6)).unwrap();
        assert_eq!(same, 0.0);
    }

    #[test]
    fn empty_key_set_has_no_fraction() {
        assert!(repartition_moves(std::iter::empty(), n(6), n(12)).is_err());
    }

    #[test]
    fn partition_count_bounds() {
        assert!(partition_count(0, "n").is_err());
        assert!(partition_count(-3, "n").is_err());
        assert!(partition_count(i64::from(i32::MAX) + 1, "n").is_err());
        assert_eq!(partition_count(12, "n").unwrap().get(), 12);
        assert_eq!(partition_count(i64::from(i32::MAX), "n").unwrap().get(), i32::MAX as u32);
    }
}
