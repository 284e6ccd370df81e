//! Statistics fds (KVM_GET_STATS_FD, api.rst 4.133 "The binary statistics
//! format"): reads at odd offsets and sizes into good and bad buffers,
//! seeks, and the check that the file is a well-formed image:
//!
//! ```text
//! header   flags, name_size, num_desc, id_offset, desc_offset, data_offset
//! id       name_size bytes, NUL-terminated
//! desc[i]  flags, exponent, size, offset, bucket_size, name[name_size]
//! data     the values, u64 each, at data_offset + desc.offset
//! ```
//!
//! A read must never return more bytes than asked, nor copy anything into
//! a buffer that is not there.
//!
//! Context: process context, the `Ctx`'s thread.

use std::os::fd::RawFd;

use kvm_bindings::kvm_stats_header;

use crate::ctx::Ctx;
use crate::scratch::{from_bytes, BadPtr, SCRATCH_LEN};
use crate::{errno, sys};

/// Bytes of `struct kvm_stats_desc` before its name.
const DESC_FIXED: u64 = 16;
/// The most of a stats file the fuzzer reads.
const MAX_IMAGE: usize = 1 << 20;

/// What is wrong with the stats image `img` (the whole file), if anything.
pub fn image_violation(img: &[u8]) -> Option<&'static str> {
    let len = img.len() as u64;
    if img.len() < std::mem::size_of::<kvm_stats_header>() {
        return Some("a stats file is shorter than its 24-byte header");
    }
    let h: kvm_stats_header = from_bytes(img);
    let name = u64::from(h.name_size);
    if name == 0 {
        return Some("a stats header has name_size 0");
    }
    if u64::from(h.id_offset).saturating_add(name) > len {
        return Some("a stats file's id runs past its end");
    }
    if !nul_terminated(&img[h.id_offset as usize..(u64::from(h.id_offset) + name) as usize]) {
        return Some("a stats file's id is not NUL-terminated");
    }
    let desc_size = DESC_FIXED + name;
    let descs_end =
        u64::from(h.desc_offset).saturating_add(u64::from(h.num_desc).saturating_mul(desc_size));
    if descs_end > len {
        return Some("a stats file's descriptors run past its end");
    }
    if u64::from(h.data_offset) > len {
        return Some("a stats file's data_offset is past its end");
    }
    for i in 0..u64::from(h.num_desc) {
        let at = (u64::from(h.desc_offset) + i * desc_size) as usize;
        let d = &img[at..at + desc_size as usize];
        let size = u64::from(u16::from_le_bytes([d[6], d[7]]));
        let offset = u64::from(u32::from_le_bytes([d[8], d[9], d[10], d[11]]));
        if u64::from(h.data_offset) + offset + size * 8 > len {
            return Some("a stats descriptor's values run past the end of the file");
        }
        if !nul_terminated(&d[DESC_FIXED as usize..]) {
            return Some("a stats descriptor's name is not NUL-terminated");
        }
    }
    None
}

fn nul_terminated(b: &[u8]) -> bool {
    b.contains(&0)
}

/// Reads the whole file from offset 0 and checks it.
pub fn check_image(ctx: &mut Ctx<'_>, fd: RawFd) {
    let mut img = Vec::new();
    loop {
        let base = ctx.scratch.addr(0) as usize;
        let off = img.len() as i64;
        // SAFETY: the scratch mapping, SCRATCH_LEN bytes, holds no data of
        // the fuzzer.
        let (r, e) = ctx.watched(
            "pread of a stats fd",
            || format!("pread at {off}"),
            || unsafe { sys::pread(fd, base, SCRATCH_LEN, off) },
        );
        ctx.tally.file_op("pread stats (whole file)", r >= 0);
        if r < 0 {
            check_errno(ctx, "pread of a stats fd", r, e);
            return;
        }
        if r as usize > SCRATCH_LEN {
            ctx.finding(
                "a read of a stats fd returned more bytes than asked",
                || format!("{r} of {SCRATCH_LEN}"),
            );
            return;
        }
        if r == 0 || img.len() >= MAX_IMAGE {
            break;
        }
        img.extend_from_slice(&ctx.scratch.bytes()[..r as usize]);
    }
    if img.len() < MAX_IMAGE {
        if let Some(what) = image_violation(&img) {
            ctx.finding(what, || {
                format!(
                    "a stats file of {} bytes, header {:x?}",
                    img.len(),
                    &img[..img.len().min(24)]
                )
            });
        }
    }
}

fn check_errno(ctx: &Ctx<'_>, op: &str, r: i64, e: i32) {
    if let Some(why) = errno::bad_result(r, e) {
        ctx.finding(&format!("{op} {why}"), String::new);
    }
}

/// One odd read: pread or lseek-then-read at an odd offset and size, into
/// the scratch buffer or a bad pointer.
pub fn odd_read(ctx: &mut Ctx<'_>, fd: RawFd) {
    let rng = &mut ctx.rng;
    let len = *rng.pick(&[
        0,
        1,
        7,
        23,
        24,
        25,
        4096,
        SCRATCH_LEN,
        1 << 30,
        usize::MAX >> 1,
    ]);
    let offset = *rng.pick(&[
        0,
        1,
        7,
        24,
        100,
        4095,
        4096,
        1 << 20,
        1 << 40,
        i64::MAX,
        -1,
        -4096,
        i64::MIN,
    ]);
    let bad = match rng.below(10) {
        0..=5 => None,
        6 => Some(BadPtr::Null),
        7 => Some(BadPtr::ReadOnly),
        8 => Some(BadPtr::Unmapped),
        _ => Some(BadPtr::Straddle(rng.range(1, 64) as usize)),
    };
    let use_lseek = rng.chance(1, 3);
    let whence = *rng.pick(&[libc::SEEK_SET, libc::SEEK_CUR, libc::SEEK_END, 3, 4]);
    let buf = match bad {
        None => ctx.scratch.addr(0),
        Some(p) => ctx.scratch.place_bad(p, &[]),
    };
    // Room behind the buffer: the device may write at most this much
    // without faulting; a larger `len` must end at the guard page.
    let room = match bad {
        None => SCRATCH_LEN,
        Some(BadPtr::Straddle(n)) => n,
        Some(_) => 0,
    };
    let (r, e) = if use_lseek {
        let (p, pe) = ctx.watched(
            "lseek of a stats fd",
            || format!("lseek({offset}, {whence})"),
            || sys::lseek(fd, offset, whence),
        );
        ctx.tally.file_op("lseek stats", p >= 0);
        check_errno(ctx, "lseek of a stats fd", p, pe);
        // SAFETY: `buf` is the scratch mapping or a bad pointer into its
        // guard, read-only page or nowhere: nothing of the fuzzer.
        ctx.watched(
            "read of a stats fd",
            || format!("read of {len} bytes"),
            || unsafe { sys::read(fd, buf as usize, len) },
        )
    } else {
        // SAFETY: as above.
        ctx.watched(
            "pread of a stats fd",
            || format!("pread of {len} bytes at {offset}"),
            || unsafe { sys::pread(fd, buf as usize, len, offset) },
        )
    };
    ctx.tally.file_op(
        if use_lseek {
            "read stats"
        } else {
            "pread stats"
        },
        r >= 0,
    );
    check_errno(ctx, "a read of a stats fd", r, e);
    let detail = || {
        let how = if use_lseek {
            format!("read after lseek({offset}, {whence})")
        } else {
            format!("pread at {offset}")
        };
        format!(
            "{how} of {len} bytes into {}",
            bad.map_or("the scratch buffer".into(), BadPtr::describe)
        )
    };
    if r > 0 && r as u64 > len as u64 {
        ctx.finding(
            "a read of a stats fd returned more bytes than asked",
            || format!("{}: returned {r}", detail()),
        );
    }
    if r > 0 && r as u64 > room as u64 {
        ctx.finding(
            "a read of a stats fd reported bytes copied into memory it cannot write",
            || format!("{}: returned {r}", detail()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A well-formed image: the layout KVM and rkvm write.
    fn image(num_desc: u32, name_size: u32) -> Vec<u8> {
        let id_offset = 24;
        let desc_offset = id_offset + name_size;
        let desc_size = 16 + name_size;
        let data_offset = desc_offset + num_desc * desc_size;
        let mut img = Vec::new();
        for v in [0, name_size, num_desc, id_offset, desc_offset, data_offset] {
            img.extend_from_slice(&u32::to_le_bytes(v));
        }
        img.resize(img.len() + name_size as usize, 0);
        img[24] = b'k';
        for i in 0..num_desc {
            let mut d = vec![0u8; desc_size as usize];
            d[6..8].copy_from_slice(&1u16.to_le_bytes());
            d[8..12].copy_from_slice(&(8 * i).to_le_bytes());
            d[16] = b'x';
            img.extend_from_slice(&d);
        }
        img.resize(img.len() + 8 * num_desc as usize, 0);
        img
    }

    #[test]
    fn a_well_formed_image_passes() {
        assert_eq!(image_violation(&image(3, 48)), None);
        assert_eq!(image_violation(&image(0, 8)), None);
    }

    #[test]
    fn malformed_images_are_named() {
        assert!(image_violation(&[0; 10]).is_some_and(|v| v.contains("shorter")));
        let mut img = image(2, 48);
        img[4..8].copy_from_slice(&0u32.to_le_bytes());
        assert!(image_violation(&img).is_some_and(|v| v.contains("name_size 0")));
        let mut img = image(2, 48);
        img[8..12].copy_from_slice(&1000u32.to_le_bytes());
        assert!(image_violation(&img).is_some_and(|v| v.contains("descriptors run past")));
        let mut img = image(2, 48);
        img[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(image_violation(&img).is_some_and(|v| v.contains("data_offset")));
        let mut img = image(2, 48);
        let n = img.len();
        img.truncate(n - 8);
        assert!(image_violation(&img).is_some_and(|v| v.contains("values run past")));
        let mut img = image(1, 4);
        for b in &mut img[24..28] {
            *b = b'a';
        }
        assert!(image_violation(&img).is_some_and(|v| v.contains("id is not NUL")));
    }

    /// Offsets and counts near 2^32 are judged, not overflowed.
    #[test]
    fn huge_header_fields_do_not_overflow() {
        let mut img = image(1, 8);
        img[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(image_violation(&img).is_some());
        let mut img = image(1, 8);
        img[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        img[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(image_violation(&img).is_some());
        let mut img = image(1, 8);
        img[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(image_violation(&img).is_some_and(|v| v.contains("id runs past")));
    }
}
