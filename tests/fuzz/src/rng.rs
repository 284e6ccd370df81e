//! The fuzzer's only source of randomness: SplitMix64 (Steele, Lea and
//! Flood, "Fast splittable pseudorandom number generators", OOPSLA 2014),
//! seeded from `--seed` and a stream path, so that a phase, a thread or one
//! step of a phase replays exactly from the seed and its position alone.
//!
//! Context: pure logic, any thread; no `rand` crate, so the sequence can
//! never change under a dependency update.

/// SplitMix64's increment (the odd "golden gamma").
const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// A SplitMix64 generator.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

/// SplitMix64's output function: a bijective mix of a 64-bit value.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Rng {
    /// The generator of `seed` alone.
    pub fn new(seed: u64) -> Rng {
        Rng {
            state: mix(seed ^ GOLDEN_GAMMA),
        }
    }

    /// The generator of the stream `path` under `seed` (a phase, then a
    /// thread index or a step number): independent of every other path, and
    /// of how much any other stream was used.
    pub fn stream(seed: u64, path: &[u64]) -> Rng {
        let mut state = mix(seed ^ GOLDEN_GAMMA);
        for &p in path {
            state = mix(state ^ mix(p.wrapping_add(GOLDEN_GAMMA)));
        }
        Rng { state }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN_GAMMA);
        mix(self.state)
    }

    /// The next 32 random bits.
    pub fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    /// A value in `0..n` (0 if `n` is 0), by Lemire's multiply-shift: the
    /// bias is below 2^-32 for the small ranges used here.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// An index into a collection of `len` elements (`len` > 0).
    pub fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }

    /// A value in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    /// One element of a non-empty slice.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.index(items.len())]
    }

    /// An index chosen with the given weights (not all zero).
    pub fn weighted(&mut self, weights: &[u32]) -> usize {
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let mut x = self.below(total);
        for (i, &w) in weights.iter().enumerate() {
            if x < u64::from(w) {
                return i;
            }
            x -= u64::from(w);
        }
        weights.len() - 1
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }

    /// A 64-bit value that sits on a boundary the device must handle:
    /// 0, 1, -1, the signed extremes, 32-bit edges, page-aligned and
    /// unaligned addresses, non-canonical and kernel addresses, a single
    /// bit, or (a quarter of the time) any value.
    pub fn boundary_u64(&mut self) -> u64 {
        match self.below(16) {
            0..=3 => self.next_u64(),
            4 => *self.pick(&BOUNDARY_U64),
            5 => *self.pick(&BOUNDARY_U64),
            6 => *self.pick(&BOUNDARY_U64),
            7 => self.next_u64() & !0xfff,
            8 => (self.next_u64() & 0xffff_ffff) | 1,
            9 => 1 << self.below(64),
            10 => (1u64 << self.below(64)).wrapping_sub(1),
            11 => self.below(0x100),
            12 => self.below(0x1_0000) << 12,
            13 => (1u64 << self.range(32, 63)) - 4096 * self.range(0, 4),
            14 => (self.next_u32() as u64) << 32,
            _ => u64::MAX - self.below(16),
        }
    }

    /// A 32-bit value on a boundary (see [`Rng::boundary_u64`]).
    pub fn boundary_u32(&mut self) -> u32 {
        match self.below(8) {
            0 | 1 => self.next_u32(),
            2..=4 => *self.pick(&BOUNDARY_U32),
            5 => 1 << self.below(32),
            6 => self.below(0x100) as u32,
            _ => u32::MAX - self.below(16) as u32,
        }
    }

    /// A count for a counted array (nmsrs, nent, nr_xcrs): mostly small
    /// and around the limits devices enforce, sometimes huge.
    pub fn boundary_count(&mut self) -> u32 {
        match self.below(8) {
            0..=2 => self.below(17) as u32,
            3..=5 => *self.pick(&BOUNDARY_COUNTS),
            6 => self.range(1, 300) as u32,
            _ => self.boundary_u32(),
        }
    }
}

/// Fixed 64-bit boundary values (see [`Rng::boundary_u64`]).
pub const BOUNDARY_U64: [u64; 22] = [
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0xfff,
    0x1000,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
    u64::MAX - 1,
    // The first non-canonical address with 4-level paging, and the first
    // kernel one.
    0x0000_8000_0000_0000,
    0xffff_8000_0000_0000,
    0x0000_7fff_ffff_f000,
    0xffff_ffff_8000_0000,
];

/// Fixed 32-bit boundary values.
pub const BOUNDARY_U32: [u32; 12] = [
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_fffe,
    0xffff_ffff,
];

/// Counts around the limits KVM and rkvm enforce (KVM_MAX_CPUID_ENTRIES
/// and KVM_MAX_MSR_ENTRIES are 256; xcrs has 16 slots) and far beyond.
pub const BOUNDARY_COUNTS: [u32; 16] = [
    0,
    1,
    15,
    16,
    17,
    63,
    64,
    255,
    256,
    257,
    1024,
    4096,
    1 << 20,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_sequence() {
        let mut a = Rng::new(42);
        let mut b = Rng::new(42);
        let xs: Vec<u64> = (0..100).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..100).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
    }

    #[test]
    fn different_seeds_and_streams_differ() {
        let a = Rng::new(1).next_u64();
        let b = Rng::new(2).next_u64();
        let c = Rng::stream(1, &[0, 1]).next_u64();
        let d = Rng::stream(1, &[1, 0]).next_u64();
        let e = Rng::stream(1, &[0, 2]).next_u64();
        let all = [a, b, c, d, e];
        for i in 0..all.len() {
            for j in i + 1..all.len() {
                assert_ne!(all[i], all[j], "streams {i} and {j}");
            }
        }
    }

    #[test]
    fn a_stream_does_not_depend_on_other_streams_use() {
        let first = Rng::stream(7, &[3, 9]).next_u64();
        let mut other = Rng::stream(7, &[3, 8]);
        for _ in 0..1000 {
            other.next_u64();
        }
        assert_eq!(Rng::stream(7, &[3, 9]).next_u64(), first);
    }

    /// SplitMix64's published first output for seed 0 (state advanced
    /// once by the golden gamma, as in Vigna's splitmix64.c).
    #[test]
    fn the_generator_is_splitmix64() {
        let mut r = Rng { state: 0 };
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next_u64(), 0x6e78_9e6a_a1b9_65f4);
    }

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut r = Rng::new(3);
        let mut seen = [false; 7];
        for _ in 0..1000 {
            let x = r.below(7);
            assert!(x < 7);
            seen[x as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(r.below(0), 0);
    }

    #[test]
    fn weighted_never_picks_a_zero_weight() {
        let mut r = Rng::new(5);
        for _ in 0..1000 {
            assert_ne!(r.weighted(&[3, 0, 1]), 1);
        }
    }

    #[test]
    fn boundary_values_include_the_edges() {
        let mut r = Rng::new(11);
        let xs: Vec<u64> = (0..20_000).map(|_| r.boundary_u64()).collect();
        for edge in [
            0,
            1,
            u64::MAX,
            0x7fff_ffff_ffff_ffff,
            0x8000_0000_0000_0000,
            0xffff_ffff,
        ] {
            assert!(xs.contains(&edge), "{edge:#x} never produced");
        }
        assert!(
            xs.iter().any(|x| x & 0xfff == 0 && *x > 0x1_0000),
            "no page-aligned address"
        );
        assert!(
            xs.iter().any(|x| x & 1 == 1 && *x > 0x1000),
            "no unaligned address"
        );
        let counts: Vec<u32> = (0..20_000).map(|_| r.boundary_count()).collect();
        for edge in [0, 1, 255, 256, 257, u32::MAX] {
            assert!(counts.contains(&edge), "count {edge} never produced");
        }
    }

    #[test]
    fn fill_covers_odd_lengths() {
        let mut r = Rng::new(9);
        let mut buf = [0u8; 13];
        r.fill(&mut buf);
        assert!(buf[8..].iter().any(|&b| b != 0));
    }
}
