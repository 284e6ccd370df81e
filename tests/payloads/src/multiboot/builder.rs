//! Assembling 32-bit code that needs absolute addresses of its own labels.
//!
//! iced's `CodeAssembler` accepts a label as a memory operand only in
//! 64-bit code (RIP-relative), never as an immediate. A kernel at a fixed
//! address needs absolute addresses all the time (IDT gates, recovery
//! points, string pointers), so the image is assembled until it stops
//! moving: each pass sees the label addresses and the code and data sizes
//! of the previous pass ([`Known`]). The first pass sees placeholders; the
//! second the real layout; a third confirms nothing moved. This converges
//! as long as the encoding of an instruction does not depend on an address
//! operand's value, which holds for the forms used: `mov r32, imm32`,
//! `mov [disp32], imm32` and `[disp32]` operands, whose sizes are fixed in
//! 32-bit code.
//!
//! Constant data (strings, patterns, descriptor tables) goes into a data
//! area after the code, built in Rust; its addresses are known at once
//! from the previous pass's code size.

use iced_x86::code_asm::{CodeAssembler, CodeLabel, IcedError};
use iced_x86::BlockEncoderOptions;

/// The address the first pass assumes for every label: large, so any
/// instruction whose size depended on an address would be sized for a
/// real one.
const PLACEHOLDER: u32 = 0x0010_0000;
/// Alignment of the data area and of the end of the image.
const SECTION_ALIGN: u32 = 16;

/// What a pass learned about the layout, given to the next pass.
#[derive(Clone, Default, PartialEq, Eq, Debug)]
pub struct Known {
    labels: Vec<u32>,
    code_len: u32,
    data_len: u32,
}

/// A label whose address can be taken: an index into [`Symbols`], stable
/// across passes because every pass emits the same code in the same order.
#[derive(Clone, Copy, Debug)]
pub struct Sym(usize);

/// The per-pass bookkeeping: address-taken labels and the data area.
pub struct Symbols {
    code_base: u32,
    known: Known,
    labels: Vec<CodeLabel>,
    data: Vec<u8>,
}

pub const fn align_up(x: u32, align: u32) -> u32 {
    (x + align - 1) & !(align - 1)
}

impl Symbols {
    fn new(code_base: u32, known: Known) -> Self {
        Symbols { code_base, known, labels: Vec::new(), data: Vec::new() }
    }

    /// A new label whose address may be taken with [`Symbols::addr`].
    pub fn create(&mut self, a: &mut CodeAssembler) -> Sym {
        self.labels.push(a.create_label());
        Sym(self.labels.len() - 1)
    }

    /// Puts `s` on the next instruction.
    pub fn place(&mut self, a: &mut CodeAssembler, s: Sym) -> Result<(), IcedError> {
        a.set_label(&mut self.labels[s.0])
    }

    /// The address of `s` (as of the previous pass).
    pub fn addr(&self, s: Sym) -> u32 {
        self.known.labels.get(s.0).copied().unwrap_or(PLACEHOLDER)
    }

    /// Where the data area starts: right after the code.
    pub fn data_base(&self) -> u32 {
        align_up(self.code_base + self.known.code_len, SECTION_ALIGN)
    }

    /// Where the loaded file ends, and the bss begins.
    pub fn image_end(&self) -> u32 {
        align_up(self.data_base() + self.known.data_len, SECTION_ALIGN)
    }

    /// Appends `bytes` to the data area at a multiple of `align`; returns
    /// their address.
    pub fn data(&mut self, align: u32, bytes: &[u8]) -> u32 {
        let offset = align_up(self.data.len() as u32, align);
        self.data.resize(offset as usize, 0);
        self.data.extend_from_slice(bytes);
        self.data_base() + offset
    }

    /// A NUL-terminated copy of `s` in the data area.
    pub fn string(&mut self, s: &str) -> u32 {
        let mut bytes = s.as_bytes().to_vec();
        bytes.push(0);
        self.data(1, &bytes)
    }

    /// Assembles the pass: returns the image from `code_base` to the
    /// image end (code, data, padding) and what this pass learned.
    fn finish(self, mut a: CodeAssembler) -> Result<(Vec<u8>, Known), IcedError> {
        let result =
            a.assemble_options(u64::from(self.code_base), BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)?;
        let labels =
            self.labels.iter().map(|l| result.label_ip(l).map(|ip| ip as u32)).collect::<Result<Vec<_>, _>>()?;
        let code = &result.inner.code_buffer;
        let known = Known { labels, code_len: code.len() as u32, data_len: self.data.len() as u32 };
        // Laid out with this pass's sizes: only meaningful (and only used)
        // once they equal the previous pass's.
        let data_at = (align_up(self.code_base + known.code_len, SECTION_ALIGN) - self.code_base) as usize;
        let mut image = code.clone();
        image.resize(data_at, 0);
        image.extend_from_slice(&self.data);
        image.resize((align_up(self.code_base + image.len() as u32, SECTION_ALIGN) - self.code_base) as usize, 0);
        Ok((image, known))
    }
}

/// Runs `pass` until the layout is stable; returns the image from
/// `code_base` to the end of the data (see [`Symbols::finish`]). Panics if
/// it never settles: some instruction's size depends on an address.
pub fn assemble(
    code_base: u32,
    pass: impl Fn(&mut CodeAssembler, &mut Symbols) -> Result<(), IcedError>,
) -> Result<Vec<u8>, IcedError> {
    let mut known = Known::default();
    for _ in 0..8 {
        let mut a = CodeAssembler::new(32)?;
        let mut symbols = Symbols::new(code_base, known.clone());
        pass(&mut a, &mut symbols)?;
        let (image, learned) = symbols.finish(a)?;
        if learned == known {
            return Ok(image);
        }
        known = learned;
    }
    panic!("the layout did not converge: an encoding depends on an address")
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::code_asm::*;

    #[test]
    fn addresses_of_labels_and_data_are_filled_in() {
        let image = assemble(0x1000, |a, s| {
            let there = s.create(a);
            let text = s.string("hi");
            a.mov(eax, s.addr(there))?;
            a.mov(esi, text)?;
            a.nop()?;
            s.place(a, there)?;
            a.ret()
        })
        .unwrap();
        // mov eax, 0x100b; mov esi, 0x1010; nop; ret; padding; "hi\0"
        assert_eq!(&image[..12], &[0xb8, 0x0b, 0x10, 0, 0, 0xbe, 0x10, 0x10, 0, 0, 0x90, 0xc3]);
        assert_eq!(&image[16..19], b"hi\0");
        assert_eq!(image.len(), 32);
    }
}
