//! An Intel MultiProcessor Specification 1.4 table for a one-CPU guest
//! with a local APIC and no I/O APIC.
//!
//! Without ACPI, the MP table is how Linux learns that the machine has a
//! usable local APIC. If it finds none, `__apic_intr_mode_select()`
//! (arch/x86/kernel/apic/apic.c) picks `APIC_VIRTUAL_WIRE_NO_CONFIG`, and
//! `native_smp_prepare_cpus()` (smpboot.c) then returns before
//! `setup_percpu_clockev()`: the APIC timer is never started. With this
//! table Linux sets `smp_found_config`, maps the APIC at the table's
//! address, picks `APIC_SYMMETRIC_IO` and sets up the local APIC and its
//! timer.
//!
//! The 8259A pair stays the interrupt controller for IRQs 0-15: with no
//! I/O APIC enumerated, `enable_IO_APIC()` and `setup_IO_APIC()` return at
//! once (`nr_ioapics == 0`) and `lapic_update_legacy_vectors()` marks the
//! legacy IRQs as PIC vectors. Their interrupts reach the CPU through the
//! local APIC's LINT0 in ExtINT mode ("virtual wire", MP spec 3.6.2.2).
//!
//! Layout (MP spec 1.4 chapter 4), at the start of the 1 KiB region the
//! memory map reserves below 640 KiB, which Linux scans
//! (`smp_scan_config(639 * 0x400, 0x400)` in arch/x86/kernel/mpparse.c):
//!
//! ```text
//! 0x9_fc00  floating pointer (16 bytes), physptr -> 0x9_fc10
//! 0x9_fc10  configuration table header (44 bytes)
//! 0x9_fc3c  processor entry (20 bytes): APIC ID 0, enabled, BSP
//! 0x9_fc50  bus entry (8 bytes): bus 0, "ISA   "
//! 0x9_fc58  I/O interrupt entry (8 bytes): 8259A (ExtINT) on ISA IRQ 0
//!           to INTIN0 of every I/O APIC, of which there are none
//! 0x9_fc60  end
//! ```
//!
//! Entries appear in ascending type order, as the specification requires.

// Remove once the Linux boot path calls `write` (the expectation then goes
// unfulfilled and warns, as a reminder).

use std::mem::size_of;

use anyhow::{ensure, Context, Result};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use crate::layout;

/// Guest-physical address of the MP floating pointer structure: the start
/// of the EBDA-like region the memory map reserves
/// ([`layout::LOW_RAM_END`] up to [`layout::EBDA_END`]), whose 1 KiB Linux
/// scans for the "_MP_" signature (`smp_scan_config(639 * 0x400, 0x400)`).
pub const MP_FLOATING_POINTER_ADDR: u64 = layout::LOW_RAM_END;

/// Guest-physical address of the configuration table: right after the
/// floating pointer.
const CONFIG_TABLE_ADDR: u64 = MP_FLOATING_POINTER_ADDR + size_of::<FloatingPointer>() as u64;

/// Total size of what [`write`] puts in guest memory.
const TOTAL_LEN: usize = size_of::<FloatingPointer>() + CONFIG_TABLE_LEN;

/// Length of the configuration table: header plus entries.
const CONFIG_TABLE_LEN: usize =
    size_of::<ConfigHeader>() + size_of::<ProcessorEntry>() + size_of::<BusEntry>() + size_of::<IoInterruptEntry>();

/// Number of entries after the configuration table header.
const ENTRY_COUNT: u16 = 3;

/// Floating pointer signature (MP spec 4.1).
const FLOATING_POINTER_SIGNATURE: [u8; 4] = *b"_MP_";
/// Configuration table signature (MP spec 4.2).
const CONFIG_TABLE_SIGNATURE: [u8; 4] = *b"PCMP";
/// Specification revision 1.4, in both the floating pointer and the table.
/// Linux accepts 1 and 4 in either (`smp_scan_config`, `smp_check_mpc`).
const SPEC_REV: u8 = 4;
/// OEM ID, 8 bytes, space padded.
const OEM_ID: [u8; 8] = *b"RKVM    ";
/// Product ID, 12 bytes, space padded.
const PRODUCT_ID: [u8; 12] = *b"RKVM        ";
/// Local APIC address in the table header: the default base
/// (IA32_APIC_BASE at reset), where the VMM's APIC model sits. Linux maps
/// the APIC here (`register_lapic_address(mpc->lapic)`) and rejects a 0.
const LOCAL_APIC_ADDR: u32 = 0xfee0_0000;

/// Entry types (MP spec Table 4-3).
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IO_INTERRUPT: u8 = 3;

/// Processor entry: the local APIC's ID and version. Version 0x14 is an
/// integrated xAPIC, what the VMM's APIC version register reports (Linux
/// takes the version from that register, not from here).
const APIC_ID: u8 = 0;
const APIC_VERSION: u8 = 0x14;
/// Processor entry CPU flags: EN (usable) and BP (the bootstrap processor).
const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOTSTRAP: u8 = 1 << 1;
/// CPU signature (CPUID.1:EAX layout): family 6, model 0, stepping 0.
/// Informational; Linux ignores it and reads CPUID itself.
const CPU_SIGNATURE: u32 = 0x600;
/// Feature flags (CPUID.1:EDX layout): FPU (bit 0) and an on-chip APIC
/// (bit 9). Informational as well.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

/// Bus entry: bus 0 is ISA (6 bytes, space padded).
const ISA_BUS_ID: u8 = 0;
const BUS_TYPE_ISA: [u8; 6] = *b"ISA   ";

/// I/O interrupt entry: interrupt type ExtINT (MP spec Table 4-8), flags 0
/// (polarity and trigger conform to the bus: ISA, edge, active high), and
/// the destination 0xff, "all I/O APICs".
const INT_TYPE_EXTINT: u8 = 3;
const ALL_IO_APICS: u8 = 0xff;

/// MP floating pointer structure (MP spec 4.1, Figure 4-2). 16 bytes.
#[derive(Clone, Copy)]
#[repr(C, packed)]
struct FloatingPointer {
    /// "_MP_".
    signature: [u8; 4],
    /// Guest-physical address of the configuration table.
    physptr: u32,
    /// Length of this structure in 16-byte paragraphs: 1.
    length: u8,
    /// Specification revision: 4 for 1.4.
    spec_rev: u8,
    /// Makes the 16 bytes sum to 0 (mod 256).
    checksum: u8,
    /// Feature byte 1: 0, a configuration table is present (non-zero
    /// would name one of the default configurations, all with an I/O
    /// APIC and two CPUs).
    feature1: u8,
    /// Feature byte 2: bit 7 IMCRP (IMCR present, PIC mode). 0: virtual
    /// wire mode, see [`FEATURE2_VIRTUAL_WIRE`].
    feature2: u8,
    /// Feature bytes 3-5: reserved, 0.
    feature3_5: [u8; 3],
}

/// Feature byte 2 of the floating pointer: IMCRP clear, virtual wire mode.
///
/// PIC mode (bit 7 set) would say the 8259A's INTR bypasses the APIC
/// through an IMCR at ports 0x22/0x23, which the OS switches to APIC mode;
/// the VMM has no IMCR. In virtual wire mode the 8259A's INTR is wired to
/// LINT0 of the BSP's local APIC, which delivers it as ExtINT: what the VMM
/// models.
///
/// In Linux 6.12 the bit only matters on 32-bit kernels: the code that sets
/// `pic_mode` from it in `mpparse_get_smp_config()` is under
/// `CONFIG_X86_32`, so a 64-bit kernel leaves `pic_mode` at 0 (and prints
/// neither "IMCR and PIC" nor "Virtual Wire compatibility mode"), which is
/// also what a 32-bit kernel sets from this value. With `pic_mode` 0,
/// `setup_local_APIC()` decides LVT0 from what it finds there: it keeps
/// LINT0 as unmasked ExtINT on CPU 0 if the mask bit is clear (the firmware
/// left the 8259A connected; the VMM's APIC model starts that way) or if
/// the I/O APIC is disabled (`noapic`), and otherwise writes ExtINT
/// *masked*. So the VMM's LVT0 must read back unmasked before Linux sets up
/// the APIC, or the PIC's interrupts (IRQ 0 timer included) stop arriving.
const FEATURE2_VIRTUAL_WIRE: u8 = 0;

/// MP configuration table header (MP spec 4.2, Figure 4-3). 44 bytes.
#[derive(Clone, Copy)]
#[repr(C, packed)]
struct ConfigHeader {
    /// "PCMP".
    signature: [u8; 4],
    /// Length of the base table in bytes: header plus entries.
    length: u16,
    /// Specification revision: 4 for 1.4.
    spec_rev: u8,
    /// Makes the base table's bytes sum to 0 (mod 256).
    checksum: u8,
    /// OEM ID, space padded.
    oem_id: [u8; 8],
    /// Product family ID, space padded.
    product_id: [u8; 12],
    /// Guest-physical address of an OEM table: 0, none.
    oem_table_ptr: u32,
    /// Size of the OEM table: 0.
    oem_table_size: u16,
    /// Number of entries in the base table.
    entry_count: u16,
    /// Memory-mapped address of the local APICs.
    local_apic_addr: u32,
    /// Length of the extended table: 0, none.
    ext_table_length: u16,
    /// Checksum of the extended table: 0.
    ext_table_checksum: u8,
    /// Reserved, 0.
    reserved: u8,
}

/// Processor entry (MP spec 4.3.1, Figure 4-4). 20 bytes.
#[derive(Clone, Copy)]
#[repr(C, packed)]
struct ProcessorEntry {
    /// [`ENTRY_PROCESSOR`].
    entry_type: u8,
    /// The local APIC's ID.
    apic_id: u8,
    /// The local APIC's version register bits 0-7.
    apic_version: u8,
    /// EN (bit 0), BP (bit 1).
    cpu_flags: u8,
    /// CPUID.1:EAX-style family, model, stepping.
    cpu_signature: u32,
    /// CPUID.1:EDX-style feature flags.
    feature_flags: u32,
    /// Reserved, 0.
    reserved: [u32; 2],
}

/// Bus entry (MP spec 4.3.2, Figure 4-5). 8 bytes.
#[derive(Clone, Copy)]
#[repr(C, packed)]
struct BusEntry {
    /// [`ENTRY_BUS`].
    entry_type: u8,
    /// Bus number, referred to by interrupt entries.
    bus_id: u8,
    /// Bus type string, space padded (Table 4-8).
    bus_type: [u8; 6],
}

/// I/O interrupt assignment entry (MP spec 4.3.4, Figure 4-7). 8 bytes.
///
/// The one entry here says the 8259A (ExtINT, ISA IRQ 0) is connected to
/// INTIN0 of every I/O APIC: vacuously true, there are none. It is not for
/// routing. Linux 6.12 needs at least one such entry to take the table as
/// is: when `check_physptr()` (mpparse.c) finds `mp_irq_entries == 0` it
/// logs "BIOS bug, no explicit IRQ entries, using default mptable. (tell
/// your hw vendor)" at KERN_ERR (shown even with `quiet`) and invents 16
/// ISA entries for I/O APIC 0. Either way the entries are inert without an
/// I/O APIC: everything that consults `mp_irqs` walks the registered I/O
/// APICs (`for_each_ioapic`) or runs only when `nr_ioapics > 0`
/// (`enable_IO_APIC`, `setup_IO_APIC`, `check_timer`), and PCI IRQ routing
/// through them (`io_apic_assign_pci_irqs`) also needs `io_apic_irqs`,
/// which only `setup_IO_APIC` sets. The entry just keeps the log clean.
#[derive(Clone, Copy)]
#[repr(C, packed)]
struct IoInterruptEntry {
    /// [`ENTRY_IO_INTERRUPT`].
    entry_type: u8,
    /// INT, NMI, SMI or ExtINT (Table 4-9).
    interrupt_type: u8,
    /// Polarity (bits 0-1) and trigger mode (bits 2-3); 0 conforms to the
    /// bus.
    flags: u16,
    /// Source bus ID.
    source_bus_id: u8,
    /// Source bus IRQ.
    source_bus_irq: u8,
    /// Destination I/O APIC ID; 0xff: all.
    dest_io_apic_id: u8,
    /// Destination I/O APIC input (INTINn).
    dest_io_apic_intin: u8,
}

// The structures have the specification's sizes, and everything fits in
// the reserved region (and the 32-bit physptr) and in a u16 table length.
const _: () = assert!(size_of::<FloatingPointer>() == 16);
const _: () = assert!(size_of::<ConfigHeader>() == 44);
const _: () = assert!(size_of::<ProcessorEntry>() == 20);
const _: () = assert!(size_of::<BusEntry>() == 8);
const _: () = assert!(size_of::<IoInterruptEntry>() == 8);
const _: () = assert!(MP_FLOATING_POINTER_ADDR == 0x9_fc00 && MP_FLOATING_POINTER_ADDR.is_multiple_of(16));
const _: () = assert!(MP_FLOATING_POINTER_ADDR + TOTAL_LEN as u64 <= layout::EBDA_END);
const _: () = assert!(CONFIG_TABLE_ADDR <= u32::MAX as u64 && CONFIG_TABLE_LEN <= u16::MAX as usize);

/// Little-endian serialization, field by field in declaration order.
trait Serialize: Sized {
    /// Appends the structure's bytes to `out`.
    fn put(&self, out: &mut Vec<u8>);

    /// The structure's bytes.
    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(size_of::<Self>());
        self.put(&mut out);
        debug_assert_eq!(out.len(), size_of::<Self>());
        out
    }
}

fn put_u16(out: &mut Vec<u8>, value: u16) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_u32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_le_bytes());
}

impl Serialize for FloatingPointer {
    fn put(&self, out: &mut Vec<u8>) {
        // Copy the fields out: references into a packed struct may be
        // unaligned.
        let Self { signature, physptr, length, spec_rev, checksum, feature1, feature2, feature3_5 } = *self;
        out.extend_from_slice(&signature);
        put_u32(out, physptr);
        out.extend_from_slice(&[length, spec_rev, checksum, feature1, feature2]);
        out.extend_from_slice(&feature3_5);
    }
}

impl Serialize for ConfigHeader {
    fn put(&self, out: &mut Vec<u8>) {
        let Self {
            signature,
            length,
            spec_rev,
            checksum,
            oem_id,
            product_id,
            oem_table_ptr,
            oem_table_size,
            entry_count,
            local_apic_addr,
            ext_table_length,
            ext_table_checksum,
            reserved,
        } = *self;
        out.extend_from_slice(&signature);
        put_u16(out, length);
        out.extend_from_slice(&[spec_rev, checksum]);
        out.extend_from_slice(&oem_id);
        out.extend_from_slice(&product_id);
        put_u32(out, oem_table_ptr);
        put_u16(out, oem_table_size);
        put_u16(out, entry_count);
        put_u32(out, local_apic_addr);
        put_u16(out, ext_table_length);
        out.extend_from_slice(&[ext_table_checksum, reserved]);
    }
}

impl Serialize for ProcessorEntry {
    fn put(&self, out: &mut Vec<u8>) {
        let Self { entry_type, apic_id, apic_version, cpu_flags, cpu_signature, feature_flags, reserved } = *self;
        out.extend_from_slice(&[entry_type, apic_id, apic_version, cpu_flags]);
        put_u32(out, cpu_signature);
        put_u32(out, feature_flags);
        reserved.iter().for_each(|&r| put_u32(out, r));
    }
}

impl Serialize for BusEntry {
    fn put(&self, out: &mut Vec<u8>) {
        let Self { entry_type, bus_id, bus_type } = *self;
        out.extend_from_slice(&[entry_type, bus_id]);
        out.extend_from_slice(&bus_type);
    }
}

impl Serialize for IoInterruptEntry {
    fn put(&self, out: &mut Vec<u8>) {
        let Self {
            entry_type,
            interrupt_type,
            flags,
            source_bus_id,
            source_bus_irq,
            dest_io_apic_id,
            dest_io_apic_intin,
        } = *self;
        out.extend_from_slice(&[entry_type, interrupt_type]);
        put_u16(out, flags);
        out.extend_from_slice(&[source_bus_id, source_bus_irq, dest_io_apic_id, dest_io_apic_intin]);
    }
}

/// The byte that makes `bytes` (whose checksum byte is still 0) sum to 0
/// modulo 256.
fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, &b| sum.wrapping_add(b)).wrapping_neg()
}

/// Offset of the checksum byte in the floating pointer and in the table
/// header.
const FLOATING_POINTER_CHECKSUM_OFFSET: usize = 10;
const CONFIG_HEADER_CHECKSUM_OFFSET: usize = 7;

/// The configuration table: header and entries, checksummed.
fn config_table() -> Vec<u8> {
    let header = ConfigHeader {
        signature: CONFIG_TABLE_SIGNATURE,
        length: CONFIG_TABLE_LEN as u16,
        spec_rev: SPEC_REV,
        checksum: 0,
        oem_id: OEM_ID,
        product_id: PRODUCT_ID,
        oem_table_ptr: 0,
        oem_table_size: 0,
        entry_count: ENTRY_COUNT,
        local_apic_addr: LOCAL_APIC_ADDR,
        ext_table_length: 0,
        ext_table_checksum: 0,
        reserved: 0,
    };
    let processor = ProcessorEntry {
        entry_type: ENTRY_PROCESSOR,
        apic_id: APIC_ID,
        apic_version: APIC_VERSION,
        cpu_flags: CPU_ENABLED | CPU_BOOTSTRAP,
        cpu_signature: CPU_SIGNATURE,
        feature_flags: CPU_FEATURES,
        reserved: [0; 2],
    };
    let bus = BusEntry { entry_type: ENTRY_BUS, bus_id: ISA_BUS_ID, bus_type: BUS_TYPE_ISA };
    let extint = IoInterruptEntry {
        entry_type: ENTRY_IO_INTERRUPT,
        interrupt_type: INT_TYPE_EXTINT,
        flags: 0,
        source_bus_id: ISA_BUS_ID,
        source_bus_irq: 0,
        dest_io_apic_id: ALL_IO_APICS,
        dest_io_apic_intin: 0,
    };

    let mut table = Vec::with_capacity(CONFIG_TABLE_LEN);
    header.put(&mut table);
    processor.put(&mut table);
    bus.put(&mut table);
    extint.put(&mut table);
    debug_assert_eq!(table.len(), CONFIG_TABLE_LEN);
    table[CONFIG_HEADER_CHECKSUM_OFFSET] = checksum(&table);
    table
}

/// The floating pointer, checksummed, pointing at the table right after it.
fn floating_pointer() -> Vec<u8> {
    let mut bytes = FloatingPointer {
        signature: FLOATING_POINTER_SIGNATURE,
        physptr: CONFIG_TABLE_ADDR as u32,
        length: 1,
        spec_rev: SPEC_REV,
        checksum: 0,
        feature1: 0,
        feature2: FEATURE2_VIRTUAL_WIRE,
        feature3_5: [0; 3],
    }
    .to_bytes();
    bytes[FLOATING_POINTER_CHECKSUM_OFFSET] = checksum(&bytes);
    bytes
}

/// Writes the floating pointer at [`MP_FLOATING_POINTER_ADDR`] and, right
/// after it, the configuration table: header, one processor entry (APIC ID
/// 0, version 0x14, enabled, bootstrap processor), one bus entry (bus 0,
/// ISA) and one I/O interrupt entry (see [`IoInterruptEntry`]), all
/// checksummed.
///
/// Fails, writing nothing, if guest memory does not cover
/// `0x9fc00..0x9fc60`.
pub fn write(mem: &GuestMemoryMmap) -> Result<()> {
    let mut bytes = floating_pointer();
    bytes.extend_from_slice(&config_table());
    debug_assert_eq!(bytes.len(), TOTAL_LEN);

    let addr = GuestAddress(MP_FLOATING_POINTER_ADDR);
    ensure!(
        mem.check_range(addr, bytes.len(), Permissions::Write),
        "MP table at {:#x}..{:#x} is not in guest RAM",
        MP_FLOATING_POINTER_ADDR,
        MP_FLOATING_POINTER_ADDR + bytes.len() as u64
    );
    mem.write_slice(&bytes, addr).with_context(|| format!("writing the MP table at {MP_FLOATING_POINTER_ADDR:#x}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram(size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn u16_at(bytes: &[u8], offset: usize) -> u16 {
        u16::from_le_bytes(bytes[offset..offset + 2].try_into().unwrap())
    }

    fn u32_at(bytes: &[u8], offset: usize) -> u32 {
        u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, &b| s.wrapping_add(b))
    }

    /// Guest memory with the table written: 1 MiB.
    fn written() -> GuestMemoryMmap {
        let mem = ram(1 << 20);
        write(&mem).unwrap();
        mem
    }

    /// The floating pointer as Linux's `smp_scan_config` accepts it: found
    /// at the first 16-byte step of [639 KiB, 640 KiB).
    #[test]
    fn mptable_floating_pointer_is_found_by_a_linux_style_scan() {
        let mem = written();
        let region = read(&mem, 639 * 0x400, 0x400);
        let found: Vec<usize> = (0..region.len())
            .step_by(16)
            .filter(|&off| {
                let mpf = &region[off..off + 16];
                // SMP_MAGIC_IDENT as Linux compares it: a native u32.
                let ident = (u32::from(b'_') << 24) | (u32::from(b'P') << 16) | (u32::from(b'M') << 8) | u32::from(b'_');
                u32_at(mpf, 0) == ident && mpf[8] == 1 && sum(mpf) == 0 && (mpf[9] == 1 || mpf[9] == 4)
            })
            .collect();
        assert_eq!(found, [0]);
        assert_eq!(MP_FLOATING_POINTER_ADDR, 639 * 0x400);
    }

    #[test]
    fn mptable_floating_pointer_fields() {
        let mem = written();
        let mpf = read(&mem, MP_FLOATING_POINTER_ADDR, 16);
        assert_eq!(&mpf[0..4], b"_MP_");
        assert_eq!(u32_at(&mpf, 4), 0x9_fc10, "physptr");
        assert_eq!(mpf[8], 1, "length in paragraphs");
        assert_eq!(mpf[9], 4, "spec revision");
        assert_eq!(sum(&mpf), 0, "checksum");
        assert_eq!(mpf[11], 0, "feature1: a configuration table follows");
        assert_eq!(mpf[12], 0, "feature2: virtual wire (no IMCR)");
        assert_eq!(&mpf[13..16], [0; 3]);
    }

    /// The configuration table as `smp_check_mpc` and `smp_read_mpc` read
    /// it: signature, checksum, revision, APIC address, then entries by
    /// type size until exactly `length`.
    #[test]
    fn mptable_config_table_parses_back() {
        let mem = written();
        let physptr = u64::from(u32_at(&read(&mem, MP_FLOATING_POINTER_ADDR, 16), 4));
        let header = read(&mem, physptr, 44);
        assert_eq!(&header[0..4], b"PCMP");
        let length = usize::from(u16_at(&header, 4));
        assert_eq!(length, 44 + 20 + 8 + 8);
        assert_eq!(header[6], 4, "spec revision");
        assert_eq!(&header[8..16], b"RKVM    ");
        assert_eq!(&header[16..28], b"RKVM        ");
        assert_eq!(u32_at(&header, 28), 0, "OEM table pointer");
        assert_eq!(u16_at(&header, 32), 0, "OEM table size");
        let count = usize::from(u16_at(&header, 34));
        assert_eq!(u32_at(&header, 36), 0xfee0_0000, "local APIC address");
        assert_eq!(u16_at(&header, 40), 0, "extended table length");
        assert_eq!(&header[42..44], [0, 0]);

        let table = read(&mem, physptr, length);
        assert_eq!(sum(&table), 0, "checksum over the whole base table");

        let mut entries = Vec::new();
        let mut off = 44;
        while off < length {
            let size = match table[off] {
                0 => 20,
                1..=4 => 8,
                t => panic!("unknown entry type {t} at {off}"),
            };
            entries.push(&table[off..off + size]);
            off += size;
        }
        assert_eq!(off, length, "entries end exactly at the table's length");
        assert_eq!(entries.len(), count);
        let types: Vec<u8> = entries.iter().map(|e| e[0]).collect();
        assert_eq!(types, [0, 1, 3], "processor, bus, I/O interrupt; ascending");

        let cpu = entries[0];
        assert_eq!(cpu[1], 0, "APIC ID");
        assert_eq!(cpu[2], 0x14, "APIC version");
        assert_eq!(cpu[3], 0b11, "CPU_ENABLED | CPU_BOOTPROCESSOR");
        assert_eq!(u32_at(cpu, 4), 0x600, "signature: family 6");
        assert_eq!(u32_at(cpu, 8) & 0x201, 0x201, "FPU and APIC feature bits");
        assert_eq!(&cpu[12..20], [0; 8]);

        let bus = entries[1];
        assert_eq!(bus[1], 0, "bus ID");
        assert_eq!(&bus[2..8], b"ISA   ");

        let int = entries[2];
        assert_eq!(int[1], 3, "ExtINT");
        assert_eq!(u16_at(int, 2), 0, "flags conform to the bus");
        assert_eq!(&int[4..8], [0, 0, 0xff, 0], "ISA IRQ 0 to INTIN0 of all I/O APICs");
    }

    #[test]
    fn mptable_lies_within_the_reserved_region() {
        assert_eq!(MP_FLOATING_POINTER_ADDR, layout::LOW_RAM_END);
        assert_eq!(CONFIG_TABLE_ADDR, MP_FLOATING_POINTER_ADDR + 16);
        assert!(MP_FLOATING_POINTER_ADDR + TOTAL_LEN as u64 <= layout::EBDA_END);

        // Nothing is written outside [LOW_RAM_END, LOW_RAM_END + TOTAL_LEN).
        let mem = written();
        let all = read(&mem, 0, 1 << 20);
        let (start, end) = (layout::LOW_RAM_END as usize, layout::LOW_RAM_END as usize + TOTAL_LEN);
        assert!(all[..start].iter().all(|&b| b == 0));
        assert!(all[end..].iter().all(|&b| b == 0));
        assert!(end <= layout::EBDA_END as usize);
    }

    #[test]
    fn mptable_write_into_too_small_memory_fails_cleanly() {
        // RAM ends before the region.
        let err = write(&ram(0x8_0000)).unwrap_err();
        assert!(format!("{err:#}").contains("MP table"), "{err:#}");

        // RAM ends in the middle of the table: nothing is written.
        let mem = ram(layout::LOW_RAM_END as usize + 32);
        let err = write(&mem).unwrap_err();
        assert!(format!("{err:#}").contains("not in guest RAM"), "{err:#}");
        assert_eq!(read(&mem, layout::LOW_RAM_END, 32), [0; 32]);
    }

    #[test]
    fn mptable_checksum_byte_zeroes_the_sum() {
        assert_eq!(checksum(&[]), 0);
        assert_eq!(checksum(&[1]), 0xff);
        assert_eq!(checksum(&[0x80, 0x80]), 0);
        let bytes = [0x12, 0x34, 0x56, 0, 0x78];
        assert_eq!(sum(&bytes).wrapping_add(checksum(&bytes)), 0);
    }
}
