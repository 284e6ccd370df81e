//! Emulated devices: each a small state machine on the port or MMIO bus.

pub mod apic;
pub mod debug_exit;
pub mod fw_cfg;
pub mod pci;
pub mod pic;
pub mod post;
pub mod serial;
