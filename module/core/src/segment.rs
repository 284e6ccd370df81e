//! Segment registers between KVM's `struct kvm_segment` fields and the VMCS
//! guest-state encoding (SDM Vol. 3C, 25.4.1 "Guest Register State", Table
//! 25-2 "Format of Access Rights").

/// Access rights bit 16: the segment is unusable (not loaded).
pub const AR_UNUSABLE: u32 = 1 << 16;

/// The fields of `struct kvm_segment`, as plain numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[allow(missing_docs)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    pub type_: u8,
    pub present: bool,
    pub dpl: u8,
    pub db: bool,
    pub s: bool,
    pub l: bool,
    pub g: bool,
    pub avl: bool,
    pub unusable: bool,
}

impl Segment {
    /// The VMCS access-rights value: type 3:0, S 4, DPL 6:5, P 7, AVL 12,
    /// L 13, D/B 14, G 15, unusable 16. A segment that is not present is
    /// marked unusable, as KVM does (`vmx_segment_access_rights`).
    pub fn access_rights(&self) -> u32 {
        if self.unusable || !self.present {
            return AR_UNUSABLE;
        }
        u32::from(self.type_ & 0xf)
            | u32::from(self.s) << 4
            | u32::from(self.dpl & 3) << 5
            | 1 << 7
            | u32::from(self.avl) << 12
            | u32::from(self.l) << 13
            | u32::from(self.db) << 14
            | u32::from(self.g) << 15
    }

    /// Rebuilds a segment from VMCS fields.
    pub fn from_vmcs(selector: u16, base: u64, limit: u32, ar: u32) -> Self {
        let bit = |n: u32| ar & (1 << n) != 0;
        Self {
            base,
            limit,
            selector,
            type_: (ar & 0xf) as u8,
            s: bit(4),
            dpl: ((ar >> 5) & 3) as u8,
            present: bit(7),
            avl: bit(12),
            l: bit(13),
            db: bit(14),
            g: bit(15),
            unusable: bit(16),
        }
    }
}

/// The base address of the system descriptor (TSS or LDT) at `index` bytes
/// into a 64-bit GDT (SDM Vol. 3A, 8.2.3 "TSS Descriptor in 64-bit mode":
/// 16 bytes, base 15:0 in bytes 2-3, 23:16 in byte 4, 31:24 in byte 7,
/// 63:32 in bytes 8-11).
pub fn system_descriptor_base(descriptor: &[u8; 16]) -> u64 {
    u64::from(descriptor[2])
        | u64::from(descriptor[3]) << 8
        | u64::from(descriptor[4]) << 16
        | u64::from(descriptor[7]) << 24
        | u64::from(u32::from_le_bytes([descriptor[8], descriptor[9], descriptor[10], descriptor[11]])) << 32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_code_segment_encodes_as_0x9b() {
        // KVM's reset CS: type 0xb (execute/read, accessed), S, present.
        let cs = Segment { base: 0xffff_0000, limit: 0xffff, selector: 0xf000, type_: 0xb, present: true, s: true, ..Default::default() };
        assert_eq!(cs.access_rights(), 0x9b);
        assert_eq!(Segment::from_vmcs(0xf000, 0xffff_0000, 0xffff, 0x9b), cs);
    }

    #[test]
    fn long_mode_code_segment_sets_l_and_g() {
        let cs = Segment { limit: 0xffff_ffff, selector: 8, type_: 0xb, present: true, s: true, l: true, g: true, ..Default::default() };
        assert_eq!(cs.access_rights(), 0xa09b);
    }

    #[test]
    fn absent_segments_are_unusable() {
        assert_eq!(Segment::default().access_rights(), AR_UNUSABLE);
        let s = Segment { present: true, unusable: true, ..Default::default() };
        assert_eq!(s.access_rights(), AR_UNUSABLE);
        assert!(Segment::from_vmcs(0, 0, 0, AR_UNUSABLE).unusable);
    }

    #[test]
    fn tss_base_is_gathered_from_its_four_pieces() {
        let d = [0x67, 0, 0x00, 0x30, 0x12, 0x8b, 0x00, 0xfe, 0x34, 0x12, 0xff, 0xff, 0, 0, 0, 0];
        assert_eq!(system_descriptor_base(&d), 0xffff_1234_fe12_3000);
    }
}
