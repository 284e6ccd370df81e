//! Pure VMX logic for rkvm: everything that needs no kernel and no VMX
//! hardware, so host `cargo test` can check it in seconds.
//!
//! The same source is compiled into `rkvm.ko` by the module's Kbuild, with the
//! kernel's own rustc flags against the kernel's `core`: hence `no_std` and no
//! `alloc`. Section numbers cite the Intel SDM, Volume 3C, order number
//! 326019-084US (March 2024): Appendix A, "VMX Capability Reporting Facility",
//! and Chapter 24, "Introduction to Virtual-Machine Extensions".

#![no_std]

// Host tests use std (and crates that name it).
#[cfg(test)]
extern crate std;

pub mod abi;
pub mod caps;
pub mod controls;
pub mod cpu_state;
pub mod cpuid;
pub mod decode;
pub mod ept;
pub mod events;
pub mod exit;
pub mod fixed;
pub mod guest_msr;
pub mod memslot;
pub mod msr;
pub mod segment;
pub mod stats;
pub mod walk;
pub mod xsave;

#[cfg(test)]
mod testdata;
