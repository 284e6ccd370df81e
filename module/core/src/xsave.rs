//! The guest's extended state (x87, SSE, AVX) in the standard (not
//! compacted) XSAVE format, and the rules for XCR0 (SDM Vol. 1, 13.3 and
//! 13.4): what a guest may enable with XSETBV, what KVM_SET_XSAVE may load,
//! and the CPUID leaf 0DH sizes that depend on XCR0.
//!
//! rkvm virtualizes x87, SSE and AVX only: their state is what XSAVE with
//! those three bits saves. Later components (AVX-512, AMX, PKRU...) are not
//! offered, so a guest can never enable them.

/// XCR0 bit of the x87 state (always set, SDM Vol. 1, 13.3).
pub const X87: u64 = 1 << 0;
/// XCR0 bit of the SSE state (XMM registers and MXCSR).
pub const SSE: u64 = 1 << 1;
/// XCR0 bit of the AVX state (upper halves of the YMM registers).
pub const AVX: u64 = 1 << 2;
/// The components rkvm can give a guest.
pub const SUPPORTED: u64 = X87 | SSE | AVX;

/// The legacy region: the FXSAVE layout (SDM Vol. 1, 10.5.1).
pub const LEGACY_SIZE: usize = 512;
/// XSAVE header: XSTATE_BV at +0, XCOMP_BV at +8, then reserved to +64.
pub const HEADER_OFFSET: usize = 512;
/// The AVX component in the standard format (CPUID.(0DH,2):EBX).
pub const AVX_OFFSET: usize = 576;
/// Bytes of the AVX component (CPUID.(0DH,2):EAX).
pub const AVX_SIZE: usize = 256;
/// Bytes of the whole area for x87, SSE and AVX.
pub const AREA_SIZE: usize = AVX_OFFSET + AVX_SIZE;

/// MXCSR in the legacy region.
pub const MXCSR_OFFSET: usize = 24;
/// FCW in the legacy region.
const FCW_OFFSET: usize = 0;

/// Bytes XSAVE needs for the components in `xcr0` (CPUID.(0DH,0):EBX).
pub fn required_size(xcr0: u64) -> u32 {
    if xcr0 & AVX != 0 {
        AREA_SIZE as u32
    } else {
        AVX_OFFSET as u32
    }
}

/// Whether XSETBV may load `value` into XCR0 when `allowed` are the
/// components the guest's CPUID offers (SDM Vol. 1, 13.3 and the XSETBV
/// reference): x87 set, AVX only with SSE, nothing else.
pub fn valid_xcr0(value: u64, allowed: u64) -> bool {
    value & X87 != 0 && (value & AVX == 0 || value & SSE != 0) && value & !(allowed & SUPPORTED) == 0
}

fn u64_at(buf: &[u8], offset: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[offset..offset + 8]);
    u64::from_le_bytes(b)
}

/// XSTATE_BV of an area.
pub fn xstate_bv(area: &[u8]) -> u64 {
    u64_at(area, HEADER_OFFSET)
}

/// Sets XSTATE_BV of an area.
pub fn set_xstate_bv(area: &mut [u8], value: u64) {
    area[HEADER_OFFSET..HEADER_OFFSET + 8].copy_from_slice(&value.to_le_bytes());
}

/// Why KVM_SET_XSAVE refuses a buffer (EINVAL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidXsave {
    /// XSTATE_BV names a component that is not offered.
    Components,
    /// XCOMP_BV is not 0: only the standard format crosses the ABI.
    Compacted,
    /// The header's reserved bytes are not 0.
    ReservedHeader,
    /// MXCSR sets reserved bits (`mxcsr_mask` is the CPU's, from FXSAVE).
    Mxcsr,
}

/// Checks a KVM_SET_XSAVE buffer against everything XRSTOR would fault on
/// (SDM Vol. 1, 13.8.1), so that loading it can never fault: components
/// beyond `supported`, the compacted format, reserved header bytes, and
/// reserved MXCSR bits.
pub fn validate(buf: &[u8], supported: u64, mxcsr_mask: u32) -> Result<(), InvalidXsave> {
    if xstate_bv(buf) & !supported != 0 {
        return Err(InvalidXsave::Components);
    }
    if u64_at(buf, HEADER_OFFSET + 8) != 0 {
        return Err(InvalidXsave::Compacted);
    }
    if buf[HEADER_OFFSET + 16..HEADER_OFFSET + 64].iter().any(|&b| b != 0) {
        return Err(InvalidXsave::ReservedHeader);
    }
    let mxcsr = u32::from_le_bytes([buf[MXCSR_OFFSET], buf[MXCSR_OFFSET + 1], buf[MXCSR_OFFSET + 2], buf[MXCSR_OFFSET + 3]]);
    if mxcsr & !mxcsr_mask != 0 {
        return Err(InvalidXsave::Mxcsr);
    }
    Ok(())
}

/// Writes the initial values of the components XSTATE_BV says are in their
/// initial configuration (XSAVE leaves those bytes untouched: SDM Vol. 1,
/// 13.6), so the area reads as the state the registers hold. MXCSR is
/// always saved and stays.
pub fn fill_init(area: &mut [u8]) {
    let bv = xstate_bv(area);
    if bv & X87 == 0 {
        // FCW 037FH, everything else of the x87 state 0 (Vol. 1, 13.6).
        area[0..MXCSR_OFFSET].fill(0);
        area[FCW_OFFSET..FCW_OFFSET + 2].copy_from_slice(&0x37fu16.to_le_bytes());
        area[32..160].fill(0);
    }
    if bv & SSE == 0 {
        area[160..416].fill(0);
    }
    if bv & AVX == 0 && area.len() >= AREA_SIZE {
        area[AVX_OFFSET..AREA_SIZE].fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xcr0_rules() {
        assert!(valid_xcr0(1, SUPPORTED));
        assert!(valid_xcr0(3, SUPPORTED));
        assert!(valid_xcr0(7, SUPPORTED));
        assert!(!valid_xcr0(0, SUPPORTED), "x87 must stay on");
        assert!(!valid_xcr0(2, SUPPORTED));
        assert!(!valid_xcr0(5, SUPPORTED), "AVX needs SSE");
        assert!(!valid_xcr0(7, X87 | SSE), "AVX not offered");
        assert!(!valid_xcr0(0xe7, u64::MAX), "AVX-512 never offered");
    }

    #[test]
    fn sizes_follow_xcr0() {
        assert_eq!(required_size(3), 576);
        assert_eq!(required_size(7), 832);
    }

    fn area() -> [u8; 4096] {
        let mut a = [0u8; 4096];
        a[MXCSR_OFFSET..MXCSR_OFFSET + 4].copy_from_slice(&0x1f80u32.to_le_bytes());
        set_xstate_bv(&mut a, 7);
        a
    }

    #[test]
    fn set_xsave_refuses_what_xrstor_would_fault_on() {
        assert_eq!(validate(&area(), 7, 0xffff), Ok(()));
        let mut a = area();
        set_xstate_bv(&mut a, 0xf);
        assert_eq!(validate(&a, 7, 0xffff), Err(InvalidXsave::Components));
        let mut a = area();
        a[HEADER_OFFSET + 15] = 0x80;
        assert_eq!(validate(&a, 7, 0xffff), Err(InvalidXsave::Compacted));
        let mut a = area();
        a[HEADER_OFFSET + 40] = 1;
        assert_eq!(validate(&a, 7, 0xffff), Err(InvalidXsave::ReservedHeader));
        let mut a = area();
        a[MXCSR_OFFSET + 2] = 1;
        assert_eq!(validate(&a, 7, 0xffff), Err(InvalidXsave::Mxcsr));
        let mut a = area();
        a[MXCSR_OFFSET] = 0xc0;
        assert_eq!(validate(&a, 7, 0xffbf), Err(InvalidXsave::Mxcsr), "DAZ unsupported");
    }

    #[test]
    fn init_components_read_as_their_initial_values() {
        let mut a = [0xaau8; 4096];
        set_xstate_bv(&mut a, SSE);
        fill_init(&mut a);
        assert_eq!(&a[0..2], &[0x7f, 0x03], "FCW");
        assert!(a[2..24].iter().all(|&b| b == 0));
        assert!(a[32..160].iter().all(|&b| b == 0), "ST0-7");
        assert!(a[160..416].iter().all(|&b| b == 0xaa), "XMM kept: SSE in use");
        assert!(a[AVX_OFFSET..AREA_SIZE].iter().all(|&b| b == 0), "YMM_H");
        assert_eq!(a[MXCSR_OFFSET], 0xaa, "MXCSR always saved");
    }
}
