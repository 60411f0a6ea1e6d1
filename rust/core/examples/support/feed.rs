//! The messages the profiling examples push: keys spread by a
//! multiplicative hash of a counter over 12 partitions, offsets in order.
use keylane_core::dispatch::{Dispatch, Prepared};

pub struct Feed {
    keys: u64,
    n: u64,
    offsets: [i64; 12],
}

impl Feed {
    pub fn new(keys: u64) -> Self {
        Feed { keys, n: 0, offsets: [0; 12] }
    }

    pub fn batch<D: Dispatch<u64>>(&mut self, d: &D, len: usize) -> Vec<Prepared<u64>> {
        (0..len)
            .map(|_| {
                let key = (self.n.wrapping_mul(0x9E37_79B9_7F4A_7C15) % self.keys).to_le_bytes();
                let partition = (self.n % 12) as i32;
                let offset = self.offsets[partition as usize];
                self.offsets[partition as usize] += 1;
                self.n += 1;
                Prepared { lane: d.lane_of(Some(&key), partition), partition, offset, item: self.n }
            })
            .collect()
    }
}
