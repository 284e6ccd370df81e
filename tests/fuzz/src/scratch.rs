//! Where ioctl arguments live: a per-thread scratch mapping that the
//! device may read and write freely, flanked by pages that catch it when it
//! goes further, plus the deliberately bad pointers (null, unmapped, read
//! only, straddling the end of a mapping, kernel, non-canonical).
//!
//! No pointer the fuzzer passes to the device ever points at its live
//! data: a device that writes more than it should then damages only the
//! scratch, where the fuzzer sees it (the argument checks in `ctx.rs`).
//!
//! Context: process context; a scratch belongs to one thread.

use kvm_bindings::*;

use crate::sys::{self, Errno, PAGE};

/// Bytes of the read-write part of a scratch mapping.
pub const SCRATCH_LEN: usize = 64 * 1024;
/// Offset of the read-only page, after a guard page.
const READ_ONLY_AT: usize = SCRATCH_LEN + PAGE;
/// The whole mapping: read-write part, guard, read-only page, guard.
const MAPPING_LEN: usize = SCRATCH_LEN + 3 * PAGE;

/// Plain old data: KVM's ABI structs, read from and written to argument
/// bytes.
///
/// # Safety
/// An implementor is `repr(C)`, has no padding bytes, and every bit pattern
/// is a valid value of it (integers and arrays of integers only).
pub unsafe trait Pod: Copy + Default {}

// SAFETY: integers only (include/uapi/asm/kvm.h), no implicit padding
// (sizes asserted in this file's tests); the same holds for each below.
unsafe impl Pod for kvm_regs {}
// SAFETY: integers and segment/dtable structs with named padding.
unsafe impl Pod for kvm_sregs {}
// SAFETY: byte arrays and integers with named padding.
unsafe impl Pod for kvm_fpu {}
// SAFETY: structs of u8 and u32, `reserved` spelled out, then a u64.
unsafe impl Pod for kvm_vcpu_events {}
// SAFETY: two u32 and an array of u64.
unsafe impl Pod for kvm_guest_debug {}
// SAFETY: u32 pairs and u64s, `padding` spelled out.
unsafe impl Pod for kvm_xcrs {}
// SAFETY: two u32 and three u64.
unsafe impl Pod for kvm_userspace_memory_region {}
// SAFETY: two u32 and a u64.
unsafe impl Pod for kvm_msr_entry {}
// SAFETY: ten u32 (three of them padding).
unsafe impl Pod for kvm_cpuid_entry2 {}
// SAFETY: one u32.
unsafe impl Pod for kvm_interrupt {}
// SAFETY: integers, and unions whose members are all integers and arrays
// of integers.
unsafe impl Pod for kvm_run {}
// SAFETY: six u32.
unsafe impl Pod for kvm_stats_header {}

/// The bytes of `v`.
pub fn bytes_of<T: Pod>(v: &T) -> &[u8] {
    // SAFETY: `T: Pod` has no padding, so all `size_of::<T>()` bytes of `v`
    // are initialised; the slice borrows `v`.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

/// A `T` from the first bytes of `bytes`; missing bytes stay as in
/// `T::default()`.
pub fn from_bytes<T: Pod>(bytes: &[u8]) -> T {
    let mut v = T::default();
    let n = bytes.len().min(std::mem::size_of::<T>());
    // SAFETY: writes at most `size_of::<T>()` bytes into `v`; any bytes
    // make a valid `T` (`Pod`).
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), (&mut v as *mut T).cast::<u8>(), n) };
    v
}

/// Writes `v` into `bytes` at `offset`, as far as it fits.
pub fn put<T: Pod>(bytes: &mut [u8], offset: usize, v: &T) {
    let src = bytes_of(v);
    if offset < bytes.len() {
        let n = src.len().min(bytes.len() - offset);
        bytes[offset..offset + n].copy_from_slice(&src[..n]);
    }
}

/// A pointer argument that points at nothing the device may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadPtr {
    /// 0.
    Null,
    /// A guard page of the scratch mapping.
    Unmapped,
    /// The scratch's read-only page (holding a copy of the argument).
    ReadOnly,
    /// The last `n` bytes of the read-write part: the argument runs into
    /// the guard page after `n` bytes.
    Straddle(usize),
    /// An address in the kernel's half.
    Kernel,
    /// A non-canonical address.
    NonCanonical,
}

impl BadPtr {
    /// How the report names it.
    pub fn describe(self) -> String {
        match self {
            BadPtr::Null => "a null pointer".into(),
            BadPtr::Unmapped => "a pointer to an unmapped page".into(),
            BadPtr::ReadOnly => "a pointer to a read-only page".into(),
            BadPtr::Straddle(n) => format!("a pointer {n} bytes before the end of a mapping"),
            BadPtr::Kernel => "a kernel address".into(),
            BadPtr::NonCanonical => "a non-canonical address".into(),
        }
    }

    /// Whether no byte at all can be accessed through it.
    pub fn inaccessible(self) -> bool {
        matches!(
            self,
            BadPtr::Null | BadPtr::Unmapped | BadPtr::Kernel | BadPtr::NonCanonical
        )
    }
}

/// A thread's scratch mapping.
///
/// # Invariants
/// `[base, base + MAPPING_LEN)` is a private anonymous mapping owned by
/// this value: read-write for [`SCRATCH_LEN`] bytes, then a `PROT_NONE`
/// page, a read-only page and a `PROT_NONE` page. No memory slot points
/// into it (slots lie in the arena; the kernel places this elsewhere).
pub struct Scratch {
    base: usize,
}

impl Scratch {
    /// A new scratch mapping.
    ///
    /// # Errors
    /// The errno of mmap or mprotect.
    pub fn new() -> Result<Scratch, Errno> {
        // SAFETY: the kernel picks the address (no MAP_FIXED), so nothing
        // is replaced.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MAPPING_LEN,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(sys::errno());
        }
        let scratch = Scratch { base: p as usize };
        // SAFETY: both ranges are inside the mapping just made, which only
        // `scratch` refers to.
        unsafe {
            sys::protect(
                scratch.base,
                SCRATCH_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
            )?;
            sys::protect(scratch.base + READ_ONLY_AT, PAGE, libc::PROT_READ)?;
        }
        // INVARIANT: laid out as documented.
        Ok(scratch)
    }

    /// The read-write part.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: mapped read-write for SCRATCH_LEN bytes (invariant); the
        // device writes it only during this thread's own calls.
        unsafe { std::slice::from_raw_parts(self.base as *const u8, SCRATCH_LEN) }
    }

    /// The read-write part, mutably.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `&mut self` makes this the only view.
        unsafe { std::slice::from_raw_parts_mut(self.base as *mut u8, SCRATCH_LEN) }
    }

    /// The address of offset `offset` of the read-write part.
    pub fn addr(&self, offset: usize) -> u64 {
        (self.base + offset.min(SCRATCH_LEN)) as u64
    }

    /// Puts `arg` where `bad` points (if anywhere) and returns the pointer
    /// value to pass.
    pub fn place_bad(&mut self, bad: BadPtr, arg: &[u8]) -> u64 {
        match bad {
            BadPtr::Null => 0,
            BadPtr::Unmapped => (self.base + SCRATCH_LEN) as u64,
            BadPtr::Kernel => 0xffff_ffff_8100_0000,
            BadPtr::NonCanonical => 0x0000_8000_0000_1000,
            BadPtr::Straddle(n) => {
                let n = n.clamp(1, SCRATCH_LEN);
                let k = n.min(arg.len());
                self.bytes_mut()[SCRATCH_LEN - n..SCRATCH_LEN - n + k].copy_from_slice(&arg[..k]);
                (self.base + SCRATCH_LEN - n) as u64
            }
            BadPtr::ReadOnly => {
                let page = self.base + READ_ONLY_AT;
                let k = arg.len().min(PAGE);
                // SAFETY: the read-only page is this scratch's (invariant):
                // opened for the copy and closed again; a failure to open
                // it leaves its old contents, which is just another
                // argument.
                unsafe {
                    if sys::protect(page, PAGE, libc::PROT_READ | libc::PROT_WRITE).is_ok() {
                        std::ptr::copy_nonoverlapping(arg.as_ptr(), page as *mut u8, k);
                        let _ = sys::protect(page, PAGE, libc::PROT_READ);
                    }
                }
                page as u64
            }
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `new` (invariant).
        unsafe { libc::munmap(self.base as *mut libc::c_void, MAPPING_LEN) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memcopy;
    use std::mem::size_of;

    /// Sizes with no room for implicit padding: the sum of the fields as
    /// include/uapi/asm/kvm.h declares them.
    #[test]
    fn pod_structs_have_their_uapi_sizes() {
        assert_eq!(size_of::<kvm_regs>(), 18 * 8);
        assert_eq!(size_of::<kvm_sregs>(), 312);
        assert_eq!(size_of::<kvm_fpu>(), 416);
        assert_eq!(size_of::<kvm_vcpu_events>(), 64);
        assert_eq!(size_of::<kvm_guest_debug>(), 8 + 8 * 8);
        assert_eq!(size_of::<kvm_xcrs>(), 8 + 16 * 16 + 16 * 8);
        assert_eq!(size_of::<kvm_userspace_memory_region>(), 32);
        assert_eq!(size_of::<kvm_msr_entry>(), 16);
        assert_eq!(size_of::<kvm_cpuid_entry2>(), 40);
        assert_eq!(size_of::<kvm_stats_header>(), 24);
        assert_eq!(size_of::<kvm_run>(), rkvm_core::abi::layout::KVM_RUN);
    }

    #[test]
    fn bytes_round_trip() {
        let r = kvm_regs {
            rax: 0x1122_3344_5566_7788,
            rip: 0xfff0,
            rflags: 2,
            ..Default::default()
        };
        let back: kvm_regs = from_bytes(bytes_of(&r));
        assert_eq!(back, r);
        let mut buf = vec![0u8; 10];
        put(&mut buf, 4, &r);
        assert_eq!(&buf[4..10], &bytes_of(&r)[..6]);
        let short: kvm_regs = from_bytes(&[1, 0, 0, 0]);
        assert_eq!(short.rax, 1);
        assert_eq!(short.rip, 0);
    }

    #[test]
    fn bad_pointers_point_where_they_say() {
        let mut s = Scratch::new().expect("scratch");
        let arg = [0xabu8; 32];
        assert_eq!(s.place_bad(BadPtr::Null, &arg), 0);
        let straddle = s.place_bad(BadPtr::Straddle(8), &arg);
        assert_eq!(straddle, s.addr(SCRATCH_LEN - 8));
        assert_eq!(&s.bytes()[SCRATCH_LEN - 8..], &arg[..8]);
        let ro = s.place_bad(BadPtr::ReadOnly, &arg);
        let mut back = [0u8; 32];
        memcopy::read(ro as usize, &mut back).expect("read-only page is readable");
        assert_eq!(back, arg);
        // SAFETY: the read-only page belongs to `s`; a write must fail.
        let written = unsafe { memcopy::write(ro as usize, &arg) };
        assert_eq!(written, Err(libc::EFAULT));
        let unmapped = s.place_bad(BadPtr::Unmapped, &arg);
        assert_eq!(
            memcopy::read(unmapped as usize, &mut back),
            Err(libc::EFAULT)
        );
    }
}
