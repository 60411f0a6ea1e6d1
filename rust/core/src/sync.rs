//! Atomics and cells for the lock-free parts, switchable to loom's.
//!
//! Built normally these are the standard types. Built with `--cfg loom`
//! (`scripts/loom`), they are loom's, which run a test body under every
//! interleaving and memory ordering the model allows. The state machines
//! are written once, against loom's closure-shaped `UnsafeCell` API, so the
//! code loom checks is the code that ships.
#![allow(unsafe_code)]

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicI64, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicI64, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// An `UnsafeCell` whose every access goes through a closure, so loom can
/// see it (and fail the model on two overlapping accesses).
#[derive(Debug)]
pub(crate) struct UnsafeCell<T>(Inner<T>);

#[cfg(loom)]
type Inner<T> = loom::cell::UnsafeCell<T>;
#[cfg(not(loom))]
type Inner<T> = std::cell::UnsafeCell<T>;

impl<T> UnsafeCell<T> {
    pub(crate) fn new(value: T) -> Self {
        UnsafeCell(Inner::new(value))
    }

    /// # Safety
    /// No other access to the cell may overlap this one; each caller says
    /// what excludes them.
    #[inline(always)]
    pub(crate) unsafe fn with_mut<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        #[cfg(loom)]
        {
            // SAFETY: the caller guarantees exclusive access.
            self.0.with_mut(|p| f(unsafe { &mut *p }))
        }
        #[cfg(not(loom))]
        {
            // SAFETY: the caller guarantees exclusive access.
            f(unsafe { &mut *self.0.get() })
        }
    }
}
