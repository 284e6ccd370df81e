//! Exit statistics in KVM's binary statistics format (api.rst 4.134,
//! KVM_GET_STATS_FD): a file whose bytes are a header, an id string, one
//! descriptor per counter, then the counters. rkvm writes that image for a
//! vCPU (`encode`); the rkvm tool reads it from /dev/rkvm and /dev/kvm alike
//! (`parse`).
//!
//! ```text
//! header   flags, name_size, num_desc, id_offset, desc_offset, data_offset
//! id       name_size bytes, NUL-padded
//! desc[i]  flags, exponent, size (u64 values), offset (in data), bucket_size,
//!          name (name_size bytes)
//! data     the values, u64 each
//! ```

/// Bytes of every name (KVM_STATS_NAME_SIZE).
pub const NAME_SIZE: usize = 48;
/// `struct kvm_stats_header`.
pub const HEADER_SIZE: usize = 24;
/// `struct kvm_stats_desc` with its name.
pub const DESC_SIZE: usize = 16 + NAME_SIZE;

use crate::exit::reason;

/// The counters rkvm keeps per vCPU, in data order: first those KVM also
/// has (same names, so a VMM reads both alike), then one per exit reason.
pub const VCPU_STATS: [&str; 31] = [
    "exits",
    "io_exits",
    "mmio_exits",
    "halt_exits",
    "irq_exits",
    "irq_window_exits",
    "nmi_window_exits",
    "signal_exits",
    "exit_reason_exception_nmi",
    "exit_reason_external_interrupt",
    "exit_reason_triple_fault",
    "exit_reason_interrupt_window",
    "exit_reason_nmi_window",
    "exit_reason_cpuid",
    "exit_reason_hlt",
    "exit_reason_invd",
    "exit_reason_rdpmc",
    "exit_reason_vmx_instruction",
    "exit_reason_cr_access",
    "exit_reason_dr_access",
    "exit_reason_io_instruction",
    "exit_reason_rdmsr",
    "exit_reason_wrmsr",
    "exit_reason_entry_failure",
    "exit_reason_mwait_monitor",
    "exit_reason_ept_violation",
    "exit_reason_ept_misconfig",
    "exit_reason_preemption_timer",
    "exit_reason_wbinvd",
    "exit_reason_xsetbv",
    "exit_reason_other",
];

/// Index of the "exits" counter and its KVM-named companions.
pub mod index {
    #![allow(missing_docs)]
    pub const EXITS: usize = 0;
    pub const IO_EXITS: usize = 1;
    pub const MMIO_EXITS: usize = 2;
    pub const HALT_EXITS: usize = 3;
    pub const IRQ_EXITS: usize = 4;
    pub const IRQ_WINDOW_EXITS: usize = 5;
    pub const NMI_WINDOW_EXITS: usize = 6;
    pub const SIGNAL_EXITS: usize = 7;
}

/// The per-reason counter for basic exit reason `r` (entry failures have
/// their own, whatever the reason).
pub fn reason_index(r: u16, entry_failed: bool) -> usize {
    if entry_failed {
        return 23;
    }
    match r {
        reason::EXCEPTION_NMI => 8,
        reason::EXTERNAL_INTERRUPT => 9,
        reason::TRIPLE_FAULT => 10,
        reason::INTERRUPT_WINDOW => 11,
        reason::NMI_WINDOW => 12,
        reason::CPUID => 13,
        reason::HLT => 14,
        reason::INVD => 15,
        reason::RDPMC => 16,
        reason::VMCALL..=reason::VMXON | reason::INVEPT | reason::INVVPID => 17,
        reason::CR_ACCESS => 18,
        reason::DR_ACCESS => 19,
        reason::IO_INSTRUCTION => 20,
        reason::RDMSR => 21,
        reason::WRMSR => 22,
        reason::MWAIT | reason::MONITOR => 24,
        reason::EPT_VIOLATION => 25,
        reason::EPT_MISCONFIG => 26,
        reason::PREEMPTION_TIMER => 27,
        reason::WBINVD => 28,
        reason::XSETBV => 29,
        _ => 30,
    }
}

/// The size of the image for `n` counters.
pub const fn encoded_len(n: usize) -> usize {
    HEADER_SIZE + NAME_SIZE + n * (DESC_SIZE + 8)
}

fn put_u32(out: &mut [u8], at: usize, v: u32) {
    out[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_name(out: &mut [u8], at: usize, name: &str) {
    let bytes = name.as_bytes();
    let n = bytes.len().min(NAME_SIZE - 1);
    out[at..at + n].copy_from_slice(&bytes[..n]);
    out[at + n..at + NAME_SIZE].fill(0);
}

/// Writes the image of counters `names` with `values` and id `id` into
/// `out`, which must be [`encoded_len`] bytes. Every counter is cumulative,
/// unitless, one u64 (type/unit/base flags 0, exponent 0, size 1).
///
/// # Panics
/// If `out` has the wrong size or the lengths differ: a caller bug.
pub fn encode(out: &mut [u8], id: &str, names: &[&str], values: &[u64]) {
    assert_eq!(names.len(), values.len());
    assert_eq!(out.len(), encoded_len(names.len()));
    let n = names.len();
    let desc_offset = HEADER_SIZE + NAME_SIZE;
    let data_offset = desc_offset + n * DESC_SIZE;
    put_u32(out, 0, 0);
    put_u32(out, 4, NAME_SIZE as u32);
    put_u32(out, 8, n as u32);
    put_u32(out, 12, HEADER_SIZE as u32);
    put_u32(out, 16, desc_offset as u32);
    put_u32(out, 20, data_offset as u32);
    put_name(out, HEADER_SIZE, id);
    for (i, (name, value)) in names.iter().zip(values).enumerate() {
        let d = desc_offset + i * DESC_SIZE;
        out[d..d + 16].fill(0);
        // flags 0, exponent 0 (bytes 4-5), size 1 (bytes 6-7), offset.
        out[d + 6..d + 8].copy_from_slice(&1u16.to_le_bytes());
        put_u32(out, d + 8, (i * 8) as u32);
        put_name(out, d + 16, name);
        let at = data_offset + i * 8;
        out[at..at + 8].copy_from_slice(&value.to_le_bytes());
    }
}

/// Why an image cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

fn get_u32(buf: &[u8], at: usize) -> Result<u32, Malformed> {
    let b = buf.get(at..at + 4).ok_or(Malformed)?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// The counters of an image (from rkvm or KVM): each descriptor's name and
/// its first value. Histograms and other multi-value statistics give their
/// first bucket; callers that care read the flags themselves.
///
/// # Errors
/// [`Malformed`] for offsets or sizes outside `buf`.
pub fn parse(buf: &[u8]) -> Result<impl Iterator<Item = (&str, u64)> + '_, Malformed> {
    let name_size = get_u32(buf, 4)? as usize;
    let n = get_u32(buf, 8)? as usize;
    let desc_offset = get_u32(buf, 16)? as usize;
    let data_offset = get_u32(buf, 20)? as usize;
    let desc_size = 16usize.checked_add(name_size).ok_or(Malformed)?;
    let descs_end = n.checked_mul(desc_size).and_then(|l| l.checked_add(desc_offset)).ok_or(Malformed)?;
    if descs_end > buf.len() || data_offset > buf.len() || name_size == 0 {
        return Err(Malformed);
    }
    Ok((0..n).filter_map(move |i| {
        let d = desc_offset + i * desc_size;
        let offset = get_u32(buf, d + 8).ok()? as usize;
        let raw = buf.get(d + 16..d + 16 + name_size)?;
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        let name = core::str::from_utf8(&raw[..end]).ok()?;
        let at = data_offset.checked_add(offset)?;
        let v = buf.get(at..at + 8)?;
        Some((name, u64::from_le_bytes([v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]])))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec;
    use std::vec::Vec;

    #[test]
    fn an_encoded_image_parses_back() {
        let mut values = [0u64; VCPU_STATS.len()];
        values[index::EXITS] = 1234;
        values[reason_index(reason::CPUID, false)] = 1000;
        values[reason_index(reason::IO_INSTRUCTION, false)] = 234;
        let mut out = vec![0u8; encoded_len(VCPU_STATS.len())];
        encode(&mut out, "rkvm-vcpu-0", &VCPU_STATS, &values);
        let parsed: Vec<_> = parse(&out).unwrap().collect();
        assert_eq!(parsed.len(), VCPU_STATS.len());
        assert_eq!(parsed[0], ("exits", 1234));
        assert!(parsed.contains(&("exit_reason_cpuid", 1000)));
        assert!(parsed.contains(&("exit_reason_io_instruction", 234)));
        assert_eq!(&out[HEADER_SIZE..HEADER_SIZE + 11], b"rkvm-vcpu-0");
    }

    #[test]
    fn every_reason_has_its_own_counter_name() {
        assert_eq!(VCPU_STATS[reason_index(reason::HLT, false)], "exit_reason_hlt");
        assert_eq!(VCPU_STATS[reason_index(reason::XSETBV, false)], "exit_reason_xsetbv");
        assert_eq!(VCPU_STATS[reason_index(reason::VMREAD, false)], "exit_reason_vmx_instruction");
        assert_eq!(VCPU_STATS[reason_index(reason::INVALID_GUEST_STATE, true)], "exit_reason_entry_failure");
        assert_eq!(VCPU_STATS[reason_index(0xfff, false)], "exit_reason_other");
        assert!(VCPU_STATS.iter().all(|n| n.len() < NAME_SIZE));
    }

    #[test]
    fn malformed_images_are_refused_not_read_out_of_bounds() {
        assert_eq!(parse(&[0u8; 10]).err(), Some(Malformed));
        let mut out = vec![0u8; encoded_len(2)];
        encode(&mut out, "x", &["a", "b"], &[1, 2]);
        out[8] = 200; // num_desc beyond the buffer
        assert_eq!(parse(&out).err(), Some(Malformed));
        let mut out = vec![0u8; encoded_len(2)];
        encode(&mut out, "x", &["a", "b"], &[1, 2]);
        let d = HEADER_SIZE + NAME_SIZE + DESC_SIZE + 8;
        out[d..d + 4].copy_from_slice(&0xffff_fff0u32.to_le_bytes()); // data offset of "b" wild
        let parsed: Vec<_> = parse(&out).unwrap().collect();
        assert_eq!(parsed, vec![("a", 1)]);
    }
}
