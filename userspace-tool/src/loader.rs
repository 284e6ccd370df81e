//! Loading flat binaries into guest memory, and parsing sizes and addresses.

use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Parses a size: bytes, or a number with K, M or G (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, shift) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = digits.parse().map_err(|_| format!("`{s}` is not a size (e.g. 4096, 64K, 2M, 1G)"))?;
    n.checked_mul(1 << shift).ok_or_else(|| format!("`{s}` is too large"))
}

/// Parses an address: decimal, or hexadecimal with 0x.
pub fn parse_addr(s: &str) -> Result<u64, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|_| format!("`{s}` is not an address (e.g. 0x1000)"))
}

/// Checks that `[load, load + len)` fits in `mem_size` bytes of RAM.
///
/// # Errors
/// A message naming the image, its size and the RAM size.
pub fn check_fits(what: &str, load: u64, len: u64, mem_size: u64) -> Result<()> {
    match load.checked_add(len) {
        Some(end) if end <= mem_size => Ok(()),
        _ => bail!(
            "{what} ({len} bytes at {load:#x}) does not fit in guest RAM of {mem_size:#x} bytes; \
             use a larger --mem or a lower --load"
        ),
    }
}

/// Reads `image` and copies it into guest memory at `load`.
///
/// # Errors
/// The file cannot be read, is empty, or does not fit in RAM.
pub fn load_flat(mem: &GuestMemoryMmap, mem_size: u64, image: &Path, load: u64) -> Result<u64> {
    let bytes = fs::read(image).with_context(|| format!("cannot read image {}", image.display()))?;
    if bytes.is_empty() {
        bail!("image {} is empty", image.display());
    }
    check_fits(&format!("image {}", image.display()), load, bytes.len() as u64, mem_size)?;
    mem.write_slice(&bytes, GuestAddress(load))
        .with_context(|| format!("cannot copy {} into guest memory", image.display()))?;
    Ok(bytes.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("2M"), Ok(2 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("2X").is_err());
        assert!(parse_size("99999999999G").is_err());
    }

    #[test]
    fn addresses_are_decimal_or_hex() {
        assert_eq!(parse_addr("0x1000"), Ok(0x1000));
        assert_eq!(parse_addr("4096"), Ok(4096));
        assert!(parse_addr("0xzz").is_err());
    }

    #[test]
    fn images_must_fit_in_ram() {
        assert!(check_fits("x", 0x1000, 0x1000, 0x2000).is_ok());
        assert!(check_fits("x", 0x1000, 0x1001, 0x2000).is_err());
        assert!(check_fits("x", u64::MAX, 2, u64::MAX).is_err());
    }
}
