//! Odd mmaps of a vCPU fd: offsets of 0, 1 and 2 pages, past the end,
//! unaligned and huge; lengths of 0, 1 byte, 3 pages and huge; private and
//! shared, executable; each probed page by page and unmapped again.
//!
//! A mapping at offset 0 must be readable for all of its first
//! KVM_GET_VCPU_MMAP_SIZE bytes: that is where a VMM finds kvm_run and the
//! PIO data. Pages are probed through `memcopy.rs`, so a page that is not
//! there is EFAULT, not a SIGBUS.
//!
//! Context: process context, the `Ctx`'s thread.

use std::os::fd::RawFd;

use crate::ctx::Ctx;
use crate::memcopy;
use crate::sys::{DeviceMapping, PAGE};

/// One odd mmap of vCPU `fd`, probed and unmapped.
pub fn odd_mmap(ctx: &mut Ctx<'_>, fd: RawFd) {
    let size = ctx.shared.dev.mmap_size;
    let rng = &mut ctx.rng;
    let len = *rng.pick(&[
        0,
        1,
        PAGE,
        2 * PAGE,
        3 * PAGE,
        size,
        size + PAGE,
        64 * PAGE,
        1 << 30,
        1 << 40,
    ]);
    let offset: i64 = *rng.pick(&[
        0,
        0,
        PAGE as i64,
        2 * PAGE as i64,
        3 * PAGE as i64,
        size as i64,
        1,
        1 << 40,
        -(PAGE as i64),
    ]);
    let prot = *rng.pick(&[
        libc::PROT_READ,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::PROT_READ | libc::PROT_EXEC,
        libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
        libc::PROT_WRITE,
        libc::PROT_NONE,
    ]);
    let mut flags = *rng.pick(&[
        libc::MAP_SHARED,
        libc::MAP_SHARED,
        libc::MAP_PRIVATE,
        libc::MAP_PRIVATE | libc::MAP_NORESERVE,
    ]);
    if len <= 4 * PAGE && rng.chance(1, 4) {
        flags |= libc::MAP_POPULATE;
    }
    let detail =
        move || format!("mmap(len {len:#x}, prot {prot:#x}, flags {flags:#x}, offset {offset:#x})");
    let map = ctx.watched("mmap of a vCPU fd", detail, || {
        DeviceMapping::new(fd, len, prot, flags, offset)
    });
    ctx.tally.file_op("mmap vcpu (odd)", map.is_ok());
    let Ok(map) = map else { return };
    if prot & libc::PROT_READ != 0 {
        let pages = map.len().div_ceil(PAGE).min(size / PAGE + 2);
        for page in 0..pages {
            let mut byte = [0u8];
            let readable = ctx.watched("read of a vCPU mapping", detail, || {
                memcopy::read(map.addr() + page * PAGE, &mut byte).is_ok()
            });
            ctx.tally.file_op("probe vcpu mapping page", readable);
            if !readable && offset == 0 && (page + 1) * PAGE <= size {
                ctx.finding(
                    "a vCPU mapping at offset 0 cannot be read within KVM_GET_VCPU_MMAP_SIZE",
                    || {
                        format!(
                            "{}: page {page} of {} ({size} bytes)",
                            detail(),
                            size / PAGE
                        )
                    },
                );
            }
        }
    }
    ctx.watched("munmap of a vCPU mapping", detail, || drop(map));
    ctx.tally.file_op("munmap vcpu (odd)", true);
}
