//! The one error type of the core. The Python binding maps each variant to a
//! `keylane.KeylaneError` subclass in a single `From` impl, so a new variant
//! here is a compile error there until it is given a Python class.

/// Everything the core can refuse or fail at. Each message says what was
/// wrong and, where there is one, what to do instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// An argument is outside its allowed range (a zero partition count, an
    /// empty key set, ...).
    #[error("{0}")]
    InvalidArgument(String),
    /// Offsets of a partition must be pushed in strictly increasing order.
    #[error(
        "offset {offset} is not greater than the last offset pushed for its partition ({last}); \
         offsets must strictly increase per partition (revoke the partition to start over)"
    )]
    OffsetOrder { offset: i64, last: i64 },
    /// An entry of a batch was refused; nothing of the batch was applied.
    #[error("batch entry {index} (partition {partition}): {error}; nothing of the batch was applied")]
    InBatch { index: usize, partition: i32, error: Box<Error> },
    /// The dispatcher holds `capacity` messages already.
    #[error(
        "dispatcher is full ({capacity} messages queued or in flight); complete some, \
         or create it with a larger capacity"
    )]
    QueueFull { capacity: usize },
    /// Another push of the same partition was in progress (from another
    /// thread); nothing of this batch was applied.
    #[error(
        "another push of partition {partition} was in progress on another thread; nothing of \
         this batch was applied. A partition's messages come from one feeder at a time: push \
         each partition from one thread (or serialize the pushes)"
    )]
    ConcurrentPush { partition: i32 },
    /// A ticket was given to a dispatcher that did not hand it out.
    #[error("this ticket was handed out by another dispatcher")]
    ForeignTicket,
    /// The LMDB map is full; the transaction was rolled back.
    #[error(
        "version table is full (map_size = {map_size} bytes); nothing of this call was applied. \
         Reopen it with a larger map_size, e.g. VersionTable(path, map_size={larger})",
        larger = map_size.saturating_mul(2)
    )]
    StoreFull { map_size: usize },
    /// The path is not a keylane table (or one this version cannot read).
    #[error("{0}")]
    StoreFormat(String),
    /// Any other storage failure (I/O, LMDB), with what was being done.
    #[error("{0}")]
    Store(String),
}

impl Error {
    /// The error itself, or for a batch entry, the entry's error.
    pub fn root(&self) -> &Error {
        match self {
            Error::InBatch { error, .. } => error.root(),
            other => other,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
