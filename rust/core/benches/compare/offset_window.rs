//! The commit window of the sharded dispatcher keylane shipped before its
//! lock-free one: kept only as its benchmarks' comparison. Which offsets
//! of one partition may be committed.
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

use keylane_core::Result;
use keylane_core::watermark::check_next;

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
