//! Memory slots from a hostile VMM: KVM_SET_USER_MEMORY_REGION arguments
//! that are mostly valid but adversarial (slots 0..40 and beyond, sizes
//! from 0 to 2^44 and KVM's maximum of 2^31 - 1 pages, guest addresses
//! near 2^36, 2^39, 2^48, 2^52 and 2^64, moves, deletes, flags 0..7).
//!
//! Whatever the device accepts, a guest may later write through, so
//! [`vet`] keeps every userspace range that could be accepted inside the
//! arena (`memory.rs`): a userspace address is either a range of the arena
//! or not a user address at all (kernel, non-canonical), never a random
//! one that could land on the fuzzer's heap.
//!
//! Context: pure logic.

use std::collections::BTreeMap;

use kvm_bindings::kvm_userspace_memory_region;

use crate::objects::SlotInfo;
use crate::rng::Rng;

/// The end of user space with 4-level paging (TASK_SIZE): an address at
/// or above it is refused by KVM's `access_ok()` and is nobody's memory.
pub const USER_END: u64 = 1 << 47;
/// KVM's limit on a slot's pages (KVM_MEM_MAX_NR_PAGES).
pub const MAX_PAGES: u64 = (1 << 31) - 1;
/// The largest slot the fuzzer lets a device accept: 32 GiB. A slot of
/// KVM's maximum (8 TiB) is legal, but a shadow-paging KVM (the host's
/// kvm_pvm) allocates 8 bytes of rmap per page for it up front: 16 GiB
/// and more than 10 s per slot (2^36 bytes took 86 ms, 2^38 up to 700
/// ms). Larger slots are still sent, with a misaligned userspace address,
/// so that the device's size checks see them without anything being
/// allocated.
pub const MAX_ACCEPTABLE: u64 = 1 << 35;
const PAGE: u64 = 4096;

/// Where slots may point.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    /// The arena's first byte.
    pub base: u64,
    /// One past its last byte.
    pub end: u64,
}

impl Bounds {
    fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= self.base && addr.checked_add(len).is_some_and(|e| e <= self.end)
    }
}

/// What a region is generated from.
pub struct Env<'a> {
    /// The arena.
    pub bounds: Bounds,
    /// Live guest memory: (address, length).
    pub chunks: &'a [(u64, usize)],
    /// The VM's slots as the fuzzer knows them.
    pub slots: &'a BTreeMap<u32, SlotInfo>,
}

/// A random region (see the module doc), vetted.
pub fn region(rng: &mut Rng, env: &Env<'_>) -> kvm_userspace_memory_region {
    let existing: Vec<(&u32, &SlotInfo)> = env.slots.iter().collect();
    let known = (!existing.is_empty()).then(|| *rng.pick(&existing));
    let slot = match rng.below(10) {
        0..=5 => rng.below(41) as u32,
        6 | 7 => known.map_or(0, |(s, _)| *s),
        // Address space 1 (SMM), KVM's 509/510 private slots, the ends.
        8 => {
            let smm = (1 << 16) | rng.below(4) as u32;
            *rng.pick(&[smm, 509, 510, 511, 512, 32_767, 32_768])
        }
        _ => rng.boundary_u32(),
    };
    let flags = match rng.below(10) {
        0..=6 => 0,
        7 | 8 => rng.below(8) as u32,
        _ => rng.boundary_u32(),
    };
    let chunk = (!env.chunks.is_empty()).then(|| *rng.pick(env.chunks));
    let size = match rng.below(20) {
        0..=2 => 0,
        3..=8 => rng.range(1, 512) * PAGE,
        9 | 10 => 2 << 20,
        11 | 12 => chunk.map_or(PAGE, |(_, len)| len as u64),
        13 => MAX_PAGES * PAGE,
        14 => (MAX_PAGES + 1) * PAGE,
        15 => 1 << 44,
        16 => rng.range(1, 64) * PAGE + rng.range(1, PAGE - 1),
        17 => known.map_or(PAGE, |(_, i)| i.size),
        _ => rng.boundary_u64(),
    };
    let gpa = match rng.below(20) {
        0..=5 => rng.below(1 << 12) * PAGE,
        6 | 7 => *rng.pick(&[
            0,
            0xa0000,
            0xf0000,
            0xfee0_0000,
            0xffff_0000,
            0x1_0000_0000 - size.min(1 << 32),
        ]),
        8..=11 => {
            let top = 1u64 << *rng.pick(&[36, 39, 48, 52]);
            let below = if rng.chance(1, 2) { size.min(top) } else { 0 };
            top.wrapping_sub(rng.below(4) * PAGE).wrapping_sub(below)
        }
        12 => 0u64.wrapping_sub(rng.range(1, 4) * PAGE),
        13 => rng.below(1 << 30) | rng.range(1, PAGE - 1),
        14..=16 => known.map_or(0, |(_, i)| i.gpa),
        17 => known.map_or(0, |(_, i)| i.gpa.wrapping_add(i.size)),
        _ => rng.below(1 << 36) & !(PAGE - 1),
    };
    let hva = match rng.below(20) {
        0..=10 => chunk.map_or(env.bounds.base, |(a, len)| {
            a + rng.below(len as u64 / PAGE) * PAGE
        }),
        11 | 12 => env.bounds.base + rng.below(1 << 28) * PAGE,
        13 => chunk.map_or(env.bounds.base, |(a, _)| a) + rng.range(1, PAGE - 1),
        14 | 15 => known.map_or(env.bounds.base, |(_, i)| i.hva),
        16 => *rng.pick(&[
            USER_END,
            0xffff_8000_0000_0000,
            0xffff_ffff_8100_0000,
            !(PAGE - 1),
        ]),
        17 => USER_END - rng.range(1, 16) * PAGE,
        _ => rng.boundary_u64(),
    };
    vet(
        kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: hva,
        },
        env.bounds,
    )
}

/// `r` with a userspace range the fuzzer may hand to the device: inside
/// `bounds`, or at an address no process owns.
pub fn vet(mut r: kvm_userspace_memory_region, bounds: Bounds) -> kvm_userspace_memory_region {
    if r.memory_size > MAX_ACCEPTABLE && r.memory_size <= MAX_PAGES * PAGE {
        r.userspace_addr |= PAGE / 2;
    }
    if r.userspace_addr >= USER_END || bounds.contains(r.userspace_addr, r.memory_size) {
        return r;
    }
    let offset = r.userspace_addr & (PAGE - 1);
    r.userspace_addr = if bounds.contains(bounds.base + offset, r.memory_size) {
        // Same size, moved to the start of the arena (keeping misalignment).
        bounds.base + offset
    } else {
        // Too large for the arena: only an address above user space is
        // safe, and the device must refuse it.
        USER_END + offset
    };
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: Bounds = Bounds {
        base: 1 << 44,
        end: (1 << 44) + (1 << 45),
    };

    #[test]
    fn every_region_stays_in_the_arena_or_outside_user_space() {
        let chunks = [(BOUNDS.base, 2 << 20), (BOUNDS.base + (4 << 20), 64 << 10)];
        let mut slots = BTreeMap::new();
        slots.insert(
            3,
            SlotInfo {
                gpa: 0x10_0000,
                size: 2 << 20,
                hva: BOUNDS.base,
            },
        );
        let env = Env {
            bounds: BOUNDS,
            chunks: &chunks,
            slots: &slots,
        };
        let mut rng = Rng::new(1);
        let (mut deletes, mut huge, mut in_arena) = (0, 0, 0);
        for _ in 0..20_000 {
            let r = region(&mut rng, &env);
            let safe =
                r.userspace_addr >= USER_END || BOUNDS.contains(r.userspace_addr, r.memory_size);
            assert!(safe, "{r:x?}");
            let acceptable = r.memory_size <= MAX_ACCEPTABLE
                || r.memory_size > MAX_PAGES * PAGE
                || r.userspace_addr & (PAGE - 1) != 0;
            assert!(acceptable, "{r:x?}");
            deletes += usize::from(r.memory_size == 0);
            huge += usize::from(r.memory_size >= MAX_PAGES * PAGE);
            in_arena += usize::from(r.userspace_addr < USER_END);
        }
        assert!(
            deletes > 1000 && huge > 500 && in_arena > 10_000,
            "{deletes} {huge} {in_arena}"
        );
    }

    #[test]
    fn vetting_moves_stray_addresses() {
        let r = kvm_userspace_memory_region {
            memory_size: 1 << 20,
            userspace_addr: 0x5555_0000_1000,
            ..Default::default()
        };
        assert_eq!(vet(r, BOUNDS).userspace_addr, BOUNDS.base);
        let r = kvm_userspace_memory_region {
            memory_size: 1 << 46,
            userspace_addr: 0x1001,
            ..Default::default()
        };
        assert_eq!(vet(r, BOUNDS).userspace_addr, USER_END + 1);
        let r = kvm_userspace_memory_region {
            memory_size: 4096,
            userspace_addr: BOUNDS.base + 8192,
            ..Default::default()
        };
        assert_eq!(vet(r, BOUNDS).userspace_addr, BOUNDS.base + 8192);
    }
}
