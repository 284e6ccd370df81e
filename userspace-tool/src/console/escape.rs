//! The console's escapes, as in QEMU: Ctrl-A x quits, Ctrl-A Ctrl-A sends
//! a Ctrl-A, Ctrl-A h (or ?) shows the help, and Ctrl-A with any other key
//! drops the key with a message. A pure parser over what the user types;
//! the console (`mod.rs`) acts on what it finds.

use std::mem;

/// The escape key, Ctrl-A, as in QEMU.
pub const ESCAPE: u8 = 0x01;

/// The help for Ctrl-A h. The terminal is raw, so lines end in "\r\n"; the
/// first one starts a fresh line after whatever the guest printed.
pub(super) const HELP: &str = "\r\nrkvm console escapes: Ctrl-A then\r\n  \
                    x        quit rkvm (exit status 0)\r\n  \
                    Ctrl-A   send Ctrl-A to the guest\r\n  \
                    h or ?   this help\r\n";

/// One result of [`EscapeParser::feed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Escaped {
    /// Bytes for the guest, in order.
    Guest(Vec<u8>),
    /// Ctrl-A x.
    Quit,
    /// Ctrl-A h or Ctrl-A ?.
    Help,
    /// Ctrl-A followed by this key, which is no escape. The key is dropped.
    Unknown(u8),
}

/// Finds the Ctrl-A escapes in what the user types. Pure: it prints
/// nothing and keeps only whether the last byte fed was a Ctrl-A, so an
/// escape split across two reads is still one escape.
#[derive(Debug, Default)]
pub struct EscapeParser {
    after_escape: bool,
}

impl EscapeParser {
    /// A parser that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the last byte fed was a Ctrl-A that still waits for its key.
    #[cfg(test)]
    pub fn pending(&self) -> bool {
        self.after_escape
    }

    /// Splits `input` into bytes for the guest and escapes, in order;
    /// consecutive guest bytes come as one [`Escaped::Guest`]. A
    /// [`Escaped::Quit`] is the last item: the bytes after it are dropped.
    pub fn feed(&mut self, input: &[u8]) -> Vec<Escaped> {
        let mut out = Vec::new();
        let mut guest = Vec::new();
        for &byte in input {
            if !self.after_escape {
                if byte == ESCAPE {
                    self.after_escape = true;
                } else {
                    guest.push(byte);
                }
                continue;
            }
            self.after_escape = false;
            let escape = match byte {
                ESCAPE => {
                    guest.push(ESCAPE);
                    continue;
                }
                b'x' => Escaped::Quit,
                b'h' | b'?' => Escaped::Help,
                other => Escaped::Unknown(other),
            };
            if !guest.is_empty() {
                out.push(Escaped::Guest(mem::take(&mut guest)));
            }
            let quit = escape == Escaped::Quit;
            out.push(escape);
            if quit {
                return out;
            }
        }
        if !guest.is_empty() {
            out.push(Escaped::Guest(guest));
        }
        out
    }
}

/// How a key is called in messages: "x", "Ctrl-B", "Esc", "byte 0xc3".
fn key_name(key: u8) -> String {
    match key {
        b'\t' => "Tab".into(),
        b'\r' => "Enter".into(),
        0x1b => "Esc".into(),
        b' ' => "Space".into(),
        0x7f => "Backspace".into(),
        // Ctrl-@ (0x00) to Ctrl-_ (0x1f), named as the terminal sends them.
        0x00..=0x1f => format!("Ctrl-{}", char::from(key + 0x40)),
        0x21..=0x7e => char::from(key).to_string(),
        _ => format!("byte {key:#04x}"),
    }
}

/// The message for Ctrl-A followed by `key`, on a line of its own.
pub(super) fn unknown_escape_message(key: u8) -> String {
    format!("\r\nrkvm: unknown escape Ctrl-A {}; Ctrl-A h for help\r\n", key_name(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest(bytes: &[u8]) -> Escaped {
        Escaped::Guest(bytes.to_vec())
    }

    #[test]
    fn plain_bytes_pass_through_as_one_run() {
        let mut parser = EscapeParser::new();
        assert_eq!(parser.feed(b"ls -l\r"), [guest(b"ls -l\r")]);
        assert_eq!(parser.feed(b""), []);
        assert!(!parser.pending());
    }

    #[test]
    fn ctrl_a_x_quits_and_drops_what_follows() {
        let mut parser = EscapeParser::new();
        assert_eq!(parser.feed(b"\x01x"), [Escaped::Quit]);
        let mut parser = EscapeParser::new();
        assert_eq!(parser.feed(b"ab\x01xcd"), [guest(b"ab"), Escaped::Quit]);
    }

    #[test]
    fn ctrl_a_ctrl_a_sends_one_ctrl_a() {
        let mut parser = EscapeParser::new();
        assert_eq!(parser.feed(b"\x01\x01"), [guest(b"\x01")]);
        assert_eq!(parser.feed(b"a\x01\x01b"), [guest(b"a\x01b")]);
        assert_eq!(parser.feed(b"\x01\x01\x01\x01"), [guest(b"\x01\x01")]);
        assert!(!parser.pending());
    }

    #[test]
    fn ctrl_a_h_asks_for_help() {
        let mut parser = EscapeParser::new();
        assert_eq!(parser.feed(b"a\x01hb"), [guest(b"a"), Escaped::Help, guest(b"b")]);
        assert_eq!(parser.feed(b"\x01?"), [Escaped::Help]);
    }

    #[test]
    fn unknown_escape_drops_the_key_and_goes_on() {
        let mut parser = EscapeParser::new();
        assert_eq!(parser.feed(b"\x01qrs"), [Escaped::Unknown(b'q'), guest(b"rs")]);
        assert_eq!(parser.feed(b"\x01X"), [Escaped::Unknown(b'X')]);
        assert!(!parser.pending());
    }

    #[test]
    fn escape_split_across_reads() {
        let mut parser = EscapeParser::new();
        assert_eq!(parser.feed(b"abc\x01"), [guest(b"abc")]);
        assert!(parser.pending());
        assert_eq!(parser.feed(b"x"), [Escaped::Quit]);

        let mut parser = EscapeParser::new();
        assert_eq!(parser.feed(b"\x01"), []);
        assert_eq!(parser.feed(b"\x01z"), [guest(b"\x01z")]);
    }

    #[test]
    fn keys_are_named_as_typed() {
        assert_eq!(key_name(b'q'), "q");
        assert_eq!(key_name(0x02), "Ctrl-B");
        assert_eq!(key_name(0x00), "Ctrl-@");
        assert_eq!(key_name(0x1c), "Ctrl-\\");
        assert_eq!(key_name(b'\r'), "Enter");
        assert_eq!(key_name(0x1b), "Esc");
        assert_eq!(key_name(b' '), "Space");
        assert_eq!(key_name(0x7f), "Backspace");
        assert_eq!(key_name(0xc3), "byte 0xc3");
        assert_eq!(unknown_escape_message(b'q'), "\r\nrkvm: unknown escape Ctrl-A q; Ctrl-A h for help\r\n");
    }
}
