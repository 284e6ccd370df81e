//! Opening a KVM-like device and checking that it speaks KVM's API.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{bail, Context, Result};
use kvm_ioctls::{Cap, Kvm};

/// KVM_GET_API_VERSION's answer on every KVM since 2.6.22 (api.rst 4.1).
pub const KVM_API_VERSION: i32 = 12;

/// Opens `dev` and checks KVM_GET_API_VERSION.
///
/// # Errors
/// A message naming the device: it cannot be opened, or it is not a
/// KVM-like device (the ioctl fails or answers another version).
pub fn open(dev: &Path) -> Result<Kvm> {
    let path = CString::new(dev.as_os_str().as_bytes())
        .with_context(|| format!("bad device path {}", dev.display()))?;
    let kvm = Kvm::new_with_path(&path).with_context(|| {
        format!("cannot open {} (is the module loaded, and are you root?)", dev.display())
    })?;
    let version = kvm.get_api_version();
    if version < 0 {
        let err = std::io::Error::last_os_error();
        bail!("{} does not speak the KVM API: KVM_GET_API_VERSION failed: {err}", dev.display());
    }
    if version != KVM_API_VERSION {
        bail!("{} answers KVM API version {version}, expected {KVM_API_VERSION}", dev.display());
    }
    Ok(kvm)
}

/// `rkvm info`: prints the API version and the capabilities the tool uses.
pub fn info(dev: &Path) -> Result<()> {
    let kvm = open(dev)?;
    println!("{}: KVM API version {}", dev.display(), kvm.get_api_version());
    for (name, cap) in [
        ("KVM_CAP_USER_MEMORY", Cap::UserMemory),
        ("KVM_CAP_SET_TSS_ADDR", Cap::SetTssAddr),
        ("KVM_CAP_EXT_CPUID", Cap::ExtCpuid),
        ("KVM_CAP_IMMEDIATE_EXIT", Cap::ImmediateExit),
        ("KVM_CAP_IRQCHIP", Cap::Irqchip),
    ] {
        println!("  {name}: {}", kvm.check_extension_int(cap));
    }
    println!("  KVM_GET_VCPU_MMAP_SIZE: {}", kvm.get_vcpu_mmap_size().context("KVM_GET_VCPU_MMAP_SIZE")?);
    Ok(())
}
