//! A mutex whose waiters a fatal signal can stop: `mutex_lock_killable`,
//! which 6.12's `kernel::sync::Mutex` does not offer (its waits are
//! uninterruptible). KVM takes `vcpu->mutex` this way, so that a process
//! stuck behind a vCPU that runs forever can still be killed; rkvm does the
//! same for every lock an ioctl waits on.
//!
//! Context: process context; may sleep.

use core::cell::UnsafeCell;
use core::marker::PhantomData;
use core::ops::{Deref, DerefMut};

use kernel::bindings;
use kernel::error::{code::EINTR, Result};
use kernel::init::PinInit;
use kernel::prelude::*;
use kernel::sync::LockClassKey;
use kernel::types::Opaque;

mod ffi {
    extern "C" {
        pub(super) fn rkvm_mutex_lock_killable(m: *mut kernel::bindings::mutex) -> i32;
    }
}

/// A `struct mutex` protecting a `T`.
#[pin_data]
pub(crate) struct KillableMutex<T> {
    #[pin]
    raw: Opaque<bindings::mutex>,
    data: UnsafeCell<T>,
}

// SAFETY: the mutex serializes all access to `data`, so the value may be
// shared between threads if it may be sent between them.
unsafe impl<T: Send> Send for KillableMutex<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for KillableMutex<T> {}

/// Creates a [`KillableMutex`] with a lock class of its own (as
/// `new_mutex!` does for `Mutex`).
macro_rules! new_killable_mutex {
    ($inner:expr, $name:literal) => {
        $crate::glue::sync::KillableMutex::new($inner, ::kernel::c_str!($name), ::kernel::static_lock_class!())
    };
}
pub(crate) use new_killable_mutex;

impl<T> KillableMutex<T> {
    /// An initializer for a mutex named `name` in lock class `key`.
    pub(crate) fn new(t: T, name: &'static CStr, key: &'static LockClassKey) -> impl PinInit<Self> {
        // `LockClassKey` is `repr(transparent)` over the C key; its own
        // `as_ptr` is private to the kernel crate.
        let key = core::ptr::from_ref(key).cast_mut().cast::<bindings::lock_class_key>();
        pin_init!(Self {
            data: UnsafeCell::new(t),
            // SAFETY: `slot` is valid while the closure runs; `name` and
            // `key` are static.
            raw <- Opaque::ffi_init(|slot| unsafe { bindings::__mutex_init(slot, name.as_char_ptr(), key) }),
        })
    }

    /// Waits for the mutex; a fatal signal ends the wait.
    ///
    /// # Errors
    /// `EINTR` if the caller was killed while waiting.
    pub(crate) fn lock_killable(&self) -> Result<KillableGuard<'_, T>> {
        // SAFETY: `raw` was initialized by `new` and lives as long as `self`.
        if unsafe { ffi::rkvm_mutex_lock_killable(self.raw.get()) } != 0 {
            return Err(EINTR);
        }
        Ok(KillableGuard { lock: self, _not_send: PhantomData })
    }
}

/// The mutex is held while this lives; it gives access to the data.
pub(crate) struct KillableGuard<'a, T> {
    lock: &'a KillableMutex<T>,
    /// A mutex is released by the task that took it.
    _not_send: PhantomData<*mut ()>,
}

impl<T> Deref for KillableGuard<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: the mutex is held, so no one else accesses `data`.
        unsafe { &*self.lock.data.get() }
    }
}

impl<T> DerefMut for KillableGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the mutex is held, so no one else accesses `data`.
        unsafe { &mut *self.lock.data.get() }
    }
}

impl<T> Drop for KillableGuard<'_, T> {
    fn drop(&mut self) {
        // SAFETY: this guard's task holds the mutex.
        unsafe { bindings::mutex_unlock(self.lock.raw.get()) };
    }
}
