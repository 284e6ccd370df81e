//! Emulated devices: each a small state machine on the port bus.

pub mod debug_exit;
pub mod serial;
