//! Guest memory: the only memory of the fuzzer that a memory slot may
//! point at.
//!
//! A guest writes wherever its slots say, and the device keeps a slot's
//! userspace address long after the ioctl that set it, so a slot that
//! covered the fuzzer's heap, stack or code would let a random guest
//! corrupt the fuzzer. Every slot the fuzzer sets therefore lies inside the
//! [`Arena`], one `PROT_NONE` reservation of 32 TiB placed at 16 TiB, far
//! below where the kernel's top-down allocator puts new mappings; guest
//! memory is a [`Chunk`] mapped inside it. When a chunk is unmapped, moved
//! or dropped, its range is reserved again at once, so the range a stale
//! slot still names never becomes anyone else's memory.
//!
//! Context: process context, any thread (the arena hands out ranges
//! atomically; a chunk belongs to one thread at a time).

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::sys::{self, Errno};

/// Where the arena starts: 16 TiB.
const ARENA_BASE: usize = 1 << 44;
/// How long it is: 32 TiB, so that a slot of up to 16 TiB (2^44, beyond
/// KVM's 2^31 - 1 pages) that starts at a chunk still ends inside it.
const ARENA_LEN: usize = 1 << 45;
/// The part of the arena that chunks come from (1 TiB); the rest is only
/// ever reserved, for slots that run past their chunk.
const CHUNK_ZONE: usize = 1 << 40;
/// 2 MiB: chunks of at least this size are aligned to it, so that the host
/// may back them with huge pages, as a VMM's memory usually is.
const HUGE_PAGE: usize = 2 << 20;

/// The reservation all guest memory lives in.
///
/// # Invariants
/// `[base, base + len)` is mapped by this process, either `PROT_NONE` or as
/// a [`Chunk`], for as long as the process lives (the arena is never
/// unmapped).
pub struct Arena {
    base: usize,
    len: usize,
    /// The byte new guest memory is filled with (see [`Arena::reserve`]).
    fill: u8,
    /// The next offset to hand out in the chunk zone.
    next: AtomicUsize,
}

impl Arena {
    /// Reserves the arena. New guest memory is filled with `fill`: 0 as
    /// a VMM's fresh memory is, or HLT (0xf4) with `--interrupts-on`, so
    /// that a guest that strays from its code, or takes an exception
    /// through a real-mode IVT it never set up, halts (HLT exits) instead
    /// of running on through zeros with interrupts off.
    ///
    /// # Errors
    /// The errno of mmap, when the range is not free (another arena, an
    /// unusual address-space layout) or the kernel refuses the size.
    pub fn reserve(fill: u8) -> Result<Arena, Errno> {
        let base = sys::reserve(ARENA_BASE, ARENA_LEN)?;
        // INVARIANT: the whole range was just reserved.
        Ok(Arena {
            base,
            len: ARENA_LEN,
            fill,
            next: AtomicUsize::new(0),
        })
    }

    /// The first address of the arena.
    pub fn base(&self) -> u64 {
        self.base as u64
    }

    /// The length of the arena.
    pub fn size(&self) -> u64 {
        self.len as u64
    }

    /// A fresh range of `len` bytes in the chunk zone, followed by at
    /// least one page that no chunk will ever use (so that a slot or an
    /// access that runs past a chunk meets `PROT_NONE`). After 1 TiB the
    /// zone wraps around: old ranges are reused, which only lets stale
    /// slots alias new guest memory, never the fuzzer's.
    fn take(&self, len: usize) -> usize {
        let align = if len >= HUGE_PAGE {
            HUGE_PAGE
        } else {
            sys::PAGE
        };
        let span = len.next_multiple_of(sys::PAGE) + align + sys::PAGE;
        let at = self.next.fetch_add(span, Ordering::Relaxed) % (CHUNK_ZONE - span);
        self.base + at.next_multiple_of(align)
    }

    /// A new read-write chunk of `len` bytes (rounded up to pages), filled
    /// with the arena's fill byte.
    ///
    /// # Errors
    /// The errno of mmap.
    pub fn chunk(&self, len: usize) -> Result<Chunk, Errno> {
        let len = len.max(sys::PAGE).next_multiple_of(sys::PAGE);
        let addr = self.take(len);
        // SAFETY: `addr..addr + len` is inside the arena's chunk zone
        // (`take`), which this process reserved and which holds nothing
        // but guest memory.
        unsafe { sys::map_fixed(addr, len, libc::PROT_READ | libc::PROT_WRITE)? };
        if self.fill != 0 {
            // SAFETY: just mapped read-write, `len` bytes, this chunk's.
            unsafe { std::ptr::write_bytes(addr as *mut u8, self.fill, len) };
        }
        // INVARIANT: just mapped read-write.
        Ok(Chunk {
            addr,
            len,
            access: Access::ReadWrite,
            fill: self.fill,
        })
    }
}

/// What the fuzzer did last to a chunk's mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Readable and writable.
    ReadWrite,
    /// `mprotect(PROT_READ)`.
    ReadOnly,
    /// `mprotect(PROT_NONE)`.
    None,
    /// `munmap`, then reserved again (`PROT_NONE`).
    Unmapped,
}

/// A dedicated anonymous mapping inside the arena: guest memory.
///
/// # Invariants
/// `[addr, addr + len)` is inside the arena and belongs to this chunk
/// alone; it is mapped read-write exactly when `access` is `ReadWrite`.
pub struct Chunk {
    addr: usize,
    len: usize,
    access: Access,
    /// The arena's fill byte, for a mapping made afresh.
    fill: u8,
}

impl Chunk {
    /// The userspace address, for a memory slot.
    pub fn addr(&self) -> u64 {
        self.addr as u64
    }

    /// The length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The current protection.
    pub fn access(&self) -> Access {
        self.access
    }

    /// The chunk's bytes, if it is readable and writable (see
    /// [`Chunk::bytes_mut`]), to read.
    pub fn bytes(&self) -> Option<&[u8]> {
        if self.access != Access::ReadWrite {
            return None;
        }
        // SAFETY: as in `bytes_mut`; read only.
        Some(unsafe { std::slice::from_raw_parts(self.addr as *const u8, self.len) })
    }

    /// The chunk's bytes, if it is readable and writable.
    pub fn bytes_mut(&mut self) -> Option<&mut [u8]> {
        if self.access != Access::ReadWrite {
            return None;
        }
        // SAFETY: the range is mapped read-write (invariant, `access`) and
        // belongs to this chunk only; a guest may write it concurrently
        // only while one of its vCPUs runs, and the fuzzer writes guest
        // memory only between runs of the vCPUs that use it.
        Some(unsafe { std::slice::from_raw_parts_mut(self.addr as *mut u8, self.len) })
    }

    /// Changes the protection (mprotect): `ReadWrite`, `ReadOnly` or
    /// `None`. A chunk that was unmapped is mapped afresh (zeroed) first.
    ///
    /// # Errors
    /// The errno of mprotect or mmap.
    pub fn protect(&mut self, to: Access) -> Result<(), Errno> {
        let prot = match to {
            Access::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
            Access::ReadOnly => libc::PROT_READ,
            Access::None | Access::Unmapped => libc::PROT_NONE,
        };
        if self.access == Access::Unmapped {
            // SAFETY: the range is this chunk's, reserved PROT_NONE since
            // it was unmapped (invariant); mapping over it touches nothing
            // else.
            unsafe { sys::map_fixed(self.addr, self.len, prot)? };
            if self.fill != 0 && to == Access::ReadWrite {
                // SAFETY: just mapped read-write, this chunk's range.
                unsafe { std::ptr::write_bytes(self.addr as *mut u8, self.fill, self.len) };
            }
        } else {
            // SAFETY: the range is this chunk's (invariant), so changing
            // its protection affects no other memory.
            unsafe { sys::protect(self.addr, self.len, prot)? };
        }
        // INVARIANT: mapped with `prot`.
        self.access = if to == Access::Unmapped {
            Access::None
        } else {
            to
        };
        Ok(())
    }

    /// Unmaps the chunk (the device sees its mapping go, with whatever
    /// slot still points at it) and reserves its range again.
    ///
    /// # Errors
    /// The errno of munmap; or EEXIST if another mapping took the range in
    /// between, which the arena's placement should make impossible.
    pub fn unmap(&mut self) -> Result<(), Errno> {
        // SAFETY: the range is this chunk's (invariant); it is reserved
        // again right after the munmap, before anything else of the fuzzer
        // could be placed there (see the module doc).
        unsafe { sys::unmap_and_rereserve(self.addr, self.len)? };
        // INVARIANT: reserved PROT_NONE, not readable.
        self.access = Access::Unmapped;
        Ok(())
    }

    /// Moves the chunk's pages to a fresh range of `arena` (mremap), as a
    /// VMM that grows or relocates guest memory would, and reserves the
    /// old range again; a slot on the old range now points at nothing.
    ///
    /// # Errors
    /// The errno of mremap; the chunk stays where it was.
    pub fn relocate(&mut self, arena: &Arena) -> Result<(), Errno> {
        if self.access == Access::Unmapped {
            return Err(libc::EFAULT);
        }
        let to = arena.take(self.len);
        // SAFETY: both ranges are the arena's: the source is this chunk's
        // (invariant), the destination was just taken from the chunk zone
        // and holds only the reservation, which mremap replaces.
        unsafe { sys::move_mapping(self.addr, self.len, to)? };
        // INVARIANT: the pages now live at `to`; the old range is reserved.
        self.addr = to;
        Ok(())
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        // SAFETY: the range is this chunk's (invariant); replacing it with
        // the reservation frees its pages and keeps the range the arena's.
        // A failure leaves it mapped, which wastes memory but nothing else.
        let _ = unsafe { sys::map_fixed_reserved(self.addr, self.len) };
    }
}

/// Sets every byte of `mem` to `byte`, 64 bytes per step.
///
/// Not `slice::fill`: for large sizes glibc's memset uses REP STOSB, which
/// Bochs (the testbed's CPU) executes one byte per iteration, about 45 ms
/// for the 2 MiB a guest run resets, the larger part of a guest run.
/// Plain 16-byte stores are several times faster there. The pattern goes
/// through `black_box` so that the compiler cannot see a constant byte and
/// turn the loop back into a call to memset.
pub fn fill(mem: &mut [u8], byte: u8) {
    let pattern = std::hint::black_box([byte; 64]);
    let mut chunks = mem.chunks_exact_mut(64);
    for chunk in &mut chunks {
        chunk.copy_from_slice(&pattern);
    }
    let rest = chunks.into_remainder();
    let n = rest.len();
    rest.copy_from_slice(&pattern[..n]);
}

#[cfg(test)]
mod fill_tests {
    #[test]
    fn fill_sets_every_byte_of_odd_lengths() {
        for len in [0, 1, 63, 64, 65, 4095, 4096 + 17] {
            let mut v = vec![0x11u8; len + 2];
            super::fill(&mut v[1..=len], 0xf4);
            assert_eq!(v[0], 0x11);
            assert_eq!(v[len + 1], 0x11);
            assert!(v[1..=len].iter().all(|&b| b == 0xf4), "len {len}");
        }
    }
}
