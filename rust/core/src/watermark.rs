//! The offset rules every commit watermark shares. The lock-free
//! dispatcher's own completion tracking is `dispatch/window.rs`.

use crate::{Error, Result};

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
    use super::*;

    #[test]
    fn offsets_must_be_in_range_and_increase() {
        assert!(check_next(None, 0).is_ok());
        assert!(check_next(Some(5), 6).is_ok());
        assert!(check_next(Some(5), MAX_OFFSET).is_ok());
        assert_eq!(check_next(Some(5), 5), Err(Error::OffsetOrder { offset: 5, last: 5 }));
        assert!(matches!(check_next(None, -1), Err(Error::InvalidArgument(_))));
        assert!(matches!(check_next(None, i64::MAX), Err(Error::InvalidArgument(_))));
    }
}
