//! Which offsets of one partition may be committed.
//!
//! A consumer may commit offset `w` (Kafka's "next offset to read") only if
//! every pushed offset below `w` has completed. Completions arrive out of
//! order, so the window between the lowest outstanding offset and the highest
//! pushed one is tracked as a bitmap: one bit per offset, set while the
//! offset is outstanding.
//!
//! Offsets may have gaps (compacted topics, transaction markers). Gaps are
//! never pushed, so their bits are never set and never hold the watermark
//! back. A gap of more than [`GAP_WORDS`] words starts a new segment instead
//! of filling the gap with zero words, so memory never grows with the size of
//! a gap.
//!
//! Memory: a dense window costs one bit per offset between the lowest and the
//! highest *outstanding* offsets (leading and trailing completed words are
//! trimmed; the bitmap grows and shrinks geometrically, so at most two bits
//! per offset are allocated), plus a fixed ~80 bytes per segment; an
//! isolated outstanding offset (every neighbour more than `64 * GAP_WORDS`
//! away) costs one segment.

use std::collections::VecDeque;

use crate::{Error, Result};

/// A gap of at most this many 64-bit words (4,096 offsets) is stored as
/// zero words; a longer one starts a new segment.
pub const GAP_WORDS: i64 = 64;

#[derive(Debug, Clone)]
struct Segment {
    /// Offset of bit 0 of `words[0]`; always a multiple of 64.
    base: i64,
    /// Invariant: non-empty, and the first and last words are non-zero.
    words: VecDeque<u64>,
    /// Number of set bits.
    outstanding: usize,
}

impl Segment {
    fn new(offset: i64) -> Self {
        let mut words = VecDeque::with_capacity(4);
        words.push_back(1u64 << (offset & 63));
        Segment { base: offset & !63, words, outstanding: 1 }
    }

    /// One past the last offset the words can hold (saturating: the last
    /// word below `i64::MAX` ends past it, and every valid offset is below).
    #[inline]
    fn end(&self) -> i64 {
        self.base.saturating_add(64 * self.words.len() as i64)
    }

    #[inline]
    fn word_index(&self, offset: i64) -> usize {
        ((offset - self.base) >> 6) as usize
    }

    fn trim(&mut self) {
        while self.words.front() == Some(&0) {
            self.words.pop_front();
            self.base += 64;
        }
        while self.words.back() == Some(&0) {
            self.words.pop_back();
        }
        // Give memory back once the window has shrunk to a quarter of what
        // it held; halving keeps the cost amortized O(1) per completion.
        if self.words.capacity() > 64 && self.words.len() * 4 < self.words.capacity() {
            self.words.shrink_to(self.words.len() * 2);
        }
    }
}

/// The outstanding offsets of one partition and its commit watermark.
#[derive(Debug, Clone, Default)]
pub struct OffsetWindow {
    segments: VecDeque<Segment>,
    last_pushed: Option<i64>,
    outstanding: usize,
}

impl OffsetWindow {
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks that `offset` may be pushed next, without changing anything.
    #[inline]
    pub fn check(&self, offset: i64) -> Result<()> {
        check_next(self.last_pushed, offset)
    }

    /// The highest offset pushed so far.
    pub fn last_pushed(&self) -> Option<i64> {
        self.last_pushed
    }

    /// Records `offset` as pushed and outstanding. Offsets must be
    /// non-negative and strictly increasing.
    #[inline]
    pub fn push(&mut self, offset: i64) -> Result<()> {
        self.check(offset)?;
        self.last_pushed = Some(offset);
        self.outstanding += 1;
        if let Some(seg) = self.segments.back_mut() {
            let end = seg.end();
            if offset < end {
                // Same word region as the last push: the common case.
                let i = seg.word_index(offset);
                seg.words[i] |= 1u64 << (offset & 63);
                seg.outstanding += 1;
                return Ok(());
            }
            if offset < end.saturating_add(64 * GAP_WORDS) {
                let i = seg.word_index(offset);
                seg.words.resize(i, 0);
                seg.words.push_back(1u64 << (offset & 63));
                seg.outstanding += 1;
                return Ok(());
            }
        }
        self.segments.push_back(Segment::new(offset));
        Ok(())
    }

    /// Marks `offset` completed. Returns false (and changes nothing) if it
    /// was not outstanding.
    #[inline]
    pub fn complete(&mut self, offset: i64) -> bool {
        // Completions land in the first segment unless offsets are sparse.
        let idx = match self.segments.front() {
            Some(seg) if offset >= seg.base && offset < seg.end() => 0,
            Some(_) => match self.segments.partition_point(|s| s.base <= offset).checked_sub(1) {
                Some(i) => i,
                None => return false,
            },
            None => return false,
        };
        let seg = &mut self.segments[idx];
        if offset >= seg.end() {
            return false;
        }
        let i = seg.word_index(offset);
        let bit = 1u64 << (offset & 63);
        if seg.words[i] & bit == 0 {
            return false;
        }
        seg.words[i] &= !bit;
        seg.outstanding -= 1;
        self.outstanding -= 1;
        if seg.outstanding == 0 {
            self.segments.remove(idx);
        } else if seg.words[i] == 0 {
            seg.trim();
        }
        true
    }

    /// The next offset that is safe to commit: the lowest outstanding
    /// offset, or, with none outstanding, one past the highest pushed.
    /// `None` before the first push.
    pub fn committable(&self) -> Option<i64> {
        match self.segments.front() {
            Some(seg) => Some(seg.base + i64::from(seg.words[0].trailing_zeros())),
            None => self.last_pushed.map(|o| o + 1),
        }
    }

    /// Offsets pushed and not completed.
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// Approximate heap bytes held (for the documented memory bound).
    pub fn heap_bytes(&self) -> usize {
        self.segments.capacity() * std::mem::size_of::<Segment>()
            + self.segments.iter().map(|s| s.words.capacity() * 8).sum::<usize>()
    }
}

/// The largest offset a message may have: the commit after it (offset + 1)
/// must fit an `i64`, as Kafka's offsets do.
pub const MAX_OFFSET: i64 = i64::MAX - 1;

/// The rule every watermark implementation shares: offsets in
/// `0..=MAX_OFFSET`, strictly increasing.
#[inline]
pub fn check_next(last_pushed: Option<i64>, offset: i64) -> Result<()> {
    if !(0..=MAX_OFFSET).contains(&offset) {
        return Err(Error::InvalidArgument(format!(
            "offset must be between 0 and {MAX_OFFSET}, got {offset}"
        )));
    }
    if let Some(last) = last_pushed
        && offset <= last
    {
        return Err(Error::OffsetOrder { offset, last });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn offsets_up_to_the_maximum_advance_the_watermark() {
        let mut w = OffsetWindow::new();
        for o in [MAX_OFFSET - 200, MAX_OFFSET - 70, MAX_OFFSET - 1, MAX_OFFSET] {
            w.push(o).unwrap();
        }
        assert!(matches!(w.push(i64::MAX), Err(Error::InvalidArgument(_))));
        for o in [MAX_OFFSET, MAX_OFFSET - 70, MAX_OFFSET - 1] {
            assert!(w.complete(o));
        }
        assert_eq!(w.committable(), Some(MAX_OFFSET - 200));
        assert!(w.complete(MAX_OFFSET - 200));
        assert_eq!(w.committable(), Some(i64::MAX));
    }

    /// A model that is obviously right: the set of outstanding offsets.
    #[derive(Default)]
    struct Model {
        outstanding: BTreeSet<i64>,
        last: Option<i64>,
    }

    impl Model {
        fn committable(&self) -> Option<i64> {
            self.outstanding.first().copied().or(self.last.map(|l| l + 1))
        }
    }

    #[test]
    fn empty_window_has_no_watermark() {
        assert_eq!(OffsetWindow::new().committable(), None);
    }

    #[test]
    fn in_order_completion_advances() {
        let mut w = OffsetWindow::new();
        for o in 0..10 {
            w.push(o).unwrap();
        }
        assert_eq!(w.committable(), Some(0));
        for o in 0..10 {
            assert!(w.complete(o));
            assert_eq!(w.committable(), Some(o + 1));
        }
        assert_eq!(w.outstanding(), 0);
    }

    #[test]
    fn one_slow_offset_holds_the_watermark() {
        let mut w = OffsetWindow::new();
        for o in 100..1_000_100 {
            w.push(o).unwrap();
        }
        for o in 101..1_000_100 {
            assert!(w.complete(o));
        }
        assert_eq!(w.committable(), Some(100));
        // Trailing completed words were trimmed: one word is left.
        assert!(w.heap_bytes() < 4096, "{} bytes", w.heap_bytes());
        assert!(w.complete(100));
        assert_eq!(w.committable(), Some(1_000_100));
    }

    #[test]
    fn million_out_of_order_completions_stay_small() {
        let mut w = OffsetWindow::new();
        let n = 1_000_000i64;
        for o in 0..n {
            w.push(o).unwrap();
        }
        // Dense window: at most two bits per outstanding offset.
        assert!(w.heap_bytes() <= (n as usize) / 4 + 4096, "{} bytes", w.heap_bytes());
        // Complete the odd offsets, then the even ones in reverse.
        for o in (1..n).step_by(2) {
            assert!(w.complete(o));
        }
        assert_eq!(w.committable(), Some(0));
        for o in (0..n).rev().filter(|o| o % 2 == 0) {
            assert!(w.complete(o));
            let expect = if o == 0 { n } else { 0 };
            assert_eq!(w.committable(), Some(expect));
        }
    }

    #[test]
    fn gaps_never_block_and_never_cost_memory() {
        let mut w = OffsetWindow::new();
        let offsets = [0i64, 5, 1_000_000, 1_000_001, 9_000_000_000];
        for o in offsets {
            w.push(o).unwrap();
        }
        assert!(w.heap_bytes() < 1024, "{} bytes", w.heap_bytes());
        assert!(w.complete(0));
        assert_eq!(w.committable(), Some(5));
        assert!(w.complete(5));
        assert_eq!(w.committable(), Some(1_000_000));
        assert!(w.complete(1_000_001));
        assert!(w.complete(1_000_000));
        assert_eq!(w.committable(), Some(9_000_000_000));
        assert!(w.complete(9_000_000_000));
        assert_eq!(w.committable(), Some(9_000_000_001));
    }

    #[test]
    fn refuses_non_increasing_and_negative_offsets() {
        let mut w = OffsetWindow::new();
        w.push(10).unwrap();
        assert_eq!(w.push(10), Err(Error::OffsetOrder { offset: 10, last: 10 }));
        assert_eq!(w.push(3), Err(Error::OffsetOrder { offset: 3, last: 10 }));
        assert!(matches!(w.push(-1), Err(Error::InvalidArgument(_))));
        assert_eq!(w.committable(), Some(10));
    }

    #[test]
    fn completing_unknown_offsets_changes_nothing() {
        let mut w = OffsetWindow::new();
        assert!(!w.complete(0));
        w.push(64).unwrap();
        assert!(!w.complete(0));
        assert!(!w.complete(65));
        assert!(!w.complete(10_000));
        assert!(w.complete(64));
        assert!(!w.complete(64));
        assert_eq!(w.committable(), Some(65));
    }

    /// A small deterministic generator, so the randomized test needs no
    /// dependency and reproduces exactly.
    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn random_pushes_and_completions_match_the_model() {
        for seed in 1..=200u64 {
            let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut w = OffsetWindow::new();
            let mut m = Model::default();
            let mut next = (xorshift(&mut rng) % 1000) as i64;
            for _ in 0..2000 {
                if xorshift(&mut rng) % 3 != 0 {
                    // Mostly small steps, sometimes a large gap.
                    let step = match xorshift(&mut rng) % 10 {
                        0 => 1 + (xorshift(&mut rng) % 100_000) as i64,
                        1..=2 => 1 + (xorshift(&mut rng) % 70) as i64,
                        _ => 1,
                    };
                    next += step;
                    w.push(next).unwrap();
                    m.outstanding.insert(next);
                    m.last = Some(next);
                } else if !m.outstanding.is_empty() {
                    let k = (xorshift(&mut rng) as usize) % m.outstanding.len();
                    let o = *m.outstanding.iter().nth(k).unwrap();
                    assert!(w.complete(o));
                    m.outstanding.remove(&o);
                }
                assert_eq!(w.committable(), m.committable(), "seed {seed}");
                assert_eq!(w.outstanding(), m.outstanding.len());
            }
        }
    }
}
