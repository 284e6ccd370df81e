//! File descriptors for rkvm's objects: a VM or vCPU is an `Arc` held by the
//! `private_data` of an anonymous-inode file, as in KVM. The file's release
//! drops that reference; the file pins the module (`fops.owner`), so no file
//! operation can outlive the code it calls.
//!
//! Context: every operation runs in the calling process's context and may
//! sleep.

use core::ffi::{c_int, c_uint};

use kernel::bindings;
use kernel::error::{
    code::{EINVAL, ENODEV},
    Result,
};
use kernel::str::CStr;
use kernel::sync::{Arc, ArcBorrow};
use kernel::ThisModule;

use crate::glue;

/// An object that userspace reaches through a file descriptor.
pub(crate) trait FileObject: Send + Sync + Sized + 'static {
    /// Name of the anonymous inode (shown in /proc/PID/fd), e.g. `kvm-vm`.
    const NAME: &'static CStr;

    /// A read-only file read with pread(2) (KVM's statistics files), rather
    /// than a read-write one driven by ioctls.
    const STATS: bool = false;

    /// Handles an ioctl; the result is the ioctl's return value.
    fn ioctl(this: ArcBorrow<'_, Self>, cmd: u32, arg: usize) -> Result<isize>;

    /// Maps the object into the caller's memory; `ENODEV` unless overridden.
    fn mmap(_this: ArcBorrow<'_, Self>, _vma: *mut bindings::vm_area_struct) -> Result {
        Err(ENODEV)
    }

    /// read(2)/pread(2) of `len` bytes into user address `buf` at `*offset`,
    /// which it advances; returns the bytes read. `EINVAL` unless overridden.
    fn read(_this: ArcBorrow<'_, Self>, _buf: usize, _len: usize, _offset: &mut i64) -> Result<usize> {
        Err(EINVAL)
    }
}

/// The `file_operations` of one [`FileObject`] type; lives in a `static`.
pub(crate) struct FileOps(bindings::file_operations);

// SAFETY: the table is immutable after construction; its raw `owner`
// pointer is THIS_MODULE, valid from any thread for the module's lifetime.
unsafe impl Sync for FileOps {}

impl FileOps {
    /// The table for `T`, owned by `module` (pass `&crate::THIS_MODULE`).
    pub(crate) const fn new<T: FileObject>(module: &'static ThisModule) -> Self {
        // SAFETY: all-zero is a valid `file_operations`: null pointers and
        // `None` callbacks.
        let mut fops: bindings::file_operations = unsafe { core::mem::zeroed() };
        fops.owner = module.as_ptr();
        fops.unlocked_ioctl = Some(ioctl::<T>);
        fops.compat_ioctl = Some(ioctl::<T>);
        fops.mmap = Some(mmap::<T>);
        fops.read = Some(read::<T>);
        fops.release = Some(release::<T>);
        fops.llseek = Some(bindings::noop_llseek);
        Self(fops)
    }
}

/// Gives `object` a new file descriptor (O_RDWR | O_CLOEXEC) and returns it.
///
/// # Errors
/// The error of `anon_inode_getfd` (`EMFILE`, `ENOMEM`, ...); `object` is
/// dropped then.
pub(crate) fn install<T: FileObject>(fops: &'static FileOps, object: Arc<T>) -> Result<i32> {
    let raw = object.into_raw();
    // SAFETY: `fops` is a static for `T`, whose release takes over `raw`.
    match unsafe { glue::anon_inode_getfd(T::NAME, &fops.0, raw.cast_mut().cast(), T::STATS) } {
        Ok(fd) => Ok(fd),
        Err(e) => {
            // SAFETY: `raw` came from `into_raw` above and nothing took it.
            drop(unsafe { Arc::<T>::from_raw(raw) });
            Err(e)
        }
    }
}

/// The object of `file`, borrowed for the duration of a file operation.
///
/// # Safety
/// `file` is a file created by [`install`] for `T` that is not yet released.
unsafe fn object<'a, T: FileObject>(file: *mut bindings::file) -> ArcBorrow<'a, T> {
    // SAFETY: `install` stored the result of `Arc::into_raw` in
    // `private_data`; the file holds that reference until `release`, which
    // cannot run during another operation on the same file.
    unsafe { ArcBorrow::from_raw((*file).private_data.cast::<T>()) }
}

unsafe extern "C" fn ioctl<T: FileObject>(file: *mut bindings::file, cmd: c_uint, arg: usize) -> isize {
    // SAFETY: the VFS calls this with a live file using `T`'s table.
    let this = unsafe { object::<T>(file) };
    match T::ioctl(this, cmd, arg) {
        Ok(value) => value,
        Err(e) => e.to_errno() as isize,
    }
}

unsafe extern "C" fn mmap<T: FileObject>(
    file: *mut bindings::file,
    vma: *mut bindings::vm_area_struct,
) -> c_int {
    // SAFETY: the VFS calls this with a live file using `T`'s table.
    let this = unsafe { object::<T>(file) };
    match T::mmap(this, vma) {
        Ok(()) => 0,
        Err(e) => e.to_errno(),
    }
}

/// `read` of the file_operations (the statistics file, pread): `buf` is a
/// user address, handed on as such and only touched with copy_to_user.
///
/// # Safety
/// Called by the VFS only, with a live `file` whose table is `T`'s and a
/// valid `offset` for the duration of the call.
unsafe extern "C" fn read<T: FileObject>(
    file: *mut bindings::file,
    buf: *mut u8, // the kernel's `ffi::c_char`
    len: usize,
    offset: *mut bindings::loff_t,
) -> isize {
    // SAFETY: the VFS calls this with a live file using `T`'s table.
    let this = unsafe { object::<T>(file) };
    // SAFETY: the VFS passes a valid position for the duration of the call.
    let offset = unsafe { &mut *offset };
    match T::read(this, buf as usize, len, offset) {
        Ok(n) => n as isize,
        Err(e) => e.to_errno() as isize,
    }
}

unsafe extern "C" fn release<T: FileObject>(_inode: *mut bindings::inode, file: *mut bindings::file) -> c_int {
    // SAFETY: the last reference to the file is gone: take back the `Arc`
    // that `install` stored, exactly once.
    drop(unsafe { Arc::<T>::from_raw((*file).private_data.cast::<T>()) });
    0
}
