//! Small real-mode guests built from byte code, for the checks that need a
//! guest to do something.
//!
//! A guest is a VM with 1 MiB of memory at address 0 and vCPU 0 at
//! 0000:[`CODE`] with SP 0x800 and RFLAGS 2 (IF clear). Guests report by
//! `OUT 0x99, AL`; exception and interrupt handlers are installed in the
//! real-mode IVT (SDM Vol. 3B, 21.1.4 "Interrupt and Exception Handling")
//! and are usually [`report_and_halt`].

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use crate::{region, set_region, Mapping};

/// Where the guest's code starts (CS base 0).
pub const CODE: u64 = 0x1000;
/// Handlers installed by [`Guest::handle`]: 16 bytes per vector from here.
const HANDLERS: u64 = 0x8000;
const MEM_SIZE: usize = 1 << 20;

/// Exception and interrupt vectors (SDM Vol. 3A, Table 6-1).
pub const DB_VECTOR: u8 = 1;
pub const NMI_VECTOR: u8 = 2;
pub const BP_VECTOR: u8 = 3;
pub const GP_VECTOR: u8 = 13;

/// `hlt`: a guest that only exists for its vCPU's state.
pub const HLT: [u8; 1] = [0xf4];

/// A VM, its memory and its vCPU, as described above.
pub struct Guest {
    pub vcpu: VcpuFd,
    /// The supported CPUID table, as given to the vCPU.
    cpuid: CpuId,
    /// Dropped after the vCPU and before the memory it maps.
    pub vm: VmFd,
    mem: Mapping,
}

impl Guest {
    /// A guest running `code`, with the device's supported CPUID set as a
    /// VMM does before the first KVM_RUN (KVM_SET_CPUID2).
    pub fn new(kvm: &Kvm, code: &[u8]) -> Result<Guest, String> {
        let mem = Mapping::new(MEM_SIZE);
        let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
        set_region(&vm, region(0, 0, MEM_SIZE as u64, mem.hva(), 0))
            .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
        let vcpu = vm.create_vcpu(0).map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| format!("KVM_GET_SUPPORTED_CPUID: {e}"))?;
        vcpu.set_cpuid2(&cpuid).map_err(|e| format!("KVM_SET_CPUID2: {e}"))?;
        let mut sregs = vcpu.get_sregs().map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
        sregs.cs.selector = 0;
        sregs.cs.base = 0;
        vcpu.set_sregs(&sregs).map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
        let regs = kvm_bindings::kvm_regs { rip: CODE, rsp: 0x800, rflags: 2, ..Default::default() };
        vcpu.set_regs(&regs).map_err(|e| format!("KVM_SET_REGS: {e}"))?;
        let guest = Guest { vcpu, cpuid, vm, mem };
        guest.write(CODE, code);
        Ok(guest)
    }

    /// Copies `bytes` into guest memory at `gpa`.
    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        assert!(gpa as usize + bytes.len() <= MEM_SIZE, "outside guest memory");
        // SAFETY: the range is inside the mapping (asserted above), which
        // this process does not otherwise reference.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), (self.mem.addr as *mut u8).add(gpa as usize), bytes.len());
        }
    }

    /// The VMM address of guest-physical 0.
    pub fn hva(&self) -> u64 {
        self.mem.hva()
    }

    /// Reads `len` bytes of guest memory at `gpa`.
    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        assert!(gpa as usize + len <= MEM_SIZE, "outside guest memory");
        // SAFETY: the range is inside the mapping (asserted above).
        unsafe { std::slice::from_raw_parts((self.mem.addr as *const u8).add(gpa as usize), len) }.to_vec()
    }

    /// Installs `handler` for `vector`: copies it to the handler area and
    /// points the vector's IVT entry (offset, then segment 0) at it.
    pub fn handle(&self, vector: u8, handler: &[u8]) {
        assert!(handler.len() <= 16, "a handler has 16 bytes");
        let at = HANDLERS + 16 * u64::from(vector);
        self.write(at, handler);
        self.write(4 * u64::from(vector), &[at as u8, (at >> 8) as u8, 0, 0]);
    }

    /// The supported CPUID entry for `function` and `index`.
    pub fn cpuid_entry(&self, function: u32, index: u32) -> Option<kvm_cpuid_entry2> {
        cpuid_entry(&self.cpuid, function, index)
    }

    /// One KVM_RUN, described in a line: "out 0x99 [47]" (see [`reported`]),
    /// "debug exception 1 at 0x1001", "Hlt", ...
    pub fn run(&mut self) -> String {
        match self.vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => format!("out {port:#x} {data:x?}"),
            Ok(VcpuExit::Debug(arch)) => debug_exit(arch.exception, arch.pc),
            Ok(exit) => format!("{exit:x?}"),
            Err(e) => format!("KVM_RUN failed: {e}"),
        }
    }

    /// Runs until the guest halts (at most `limit` exits), describing each
    /// exit as [`Guest::run`] does; the last one is "Hlt" unless the guest
    /// went astray.
    pub fn run_to_hlt(&mut self, limit: usize) -> Vec<String> {
        let mut exits = Vec::new();
        while exits.len() < limit {
            let exit = self.run();
            let done = exit == "Hlt" || exit.starts_with("KVM_RUN failed");
            exits.push(exit);
            if done {
                break;
            }
        }
        exits
    }
}

/// The entry of `cpuid` for `function` and `index`.
pub fn cpuid_entry(cpuid: &CpuId, function: u32, index: u32) -> Option<kvm_cpuid_entry2> {
    cpuid.as_slice().iter().find(|e| e.function == function && e.index == index).copied()
}

/// How [`Guest::run`] describes the guest's `OUT 0x99, AL` of `byte`.
pub fn reported(byte: u8) -> String {
    format!("out 0x99 [{byte:x}]")
}

/// How [`Guest::run`] describes a KVM_EXIT_DEBUG for `exception` at linear
/// address `pc`.
pub fn debug_exit(exception: u32, pc: u64) -> String {
    format!("debug exception {exception} at {pc:#x}")
}

/// A handler that reports `byte` and halts for good:
/// `mov al, byte; out 0x99, al; 1: hlt; jmp 1b`.
pub fn report_and_halt(byte: u8) -> [u8; 7] {
    [0xb0, byte, 0xe6, 0x99, 0xf4, 0xeb, 0xfd]
}
