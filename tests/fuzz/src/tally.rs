//! What the fuzzer did: ioctls by fd kind and by name, results by errno,
//! file operations, guest runs and their exits. Each thread keeps its own
//! tally (no locking on the hot path); tallies are merged when a phase
//! ends and rendered into the report.
//!
//! Context: pure logic, one thread per tally.

use std::collections::BTreeMap;

use crate::errno;
use crate::exit;
use crate::ioctl_table::FdKind;

/// A count per key.
pub type Counts<K> = BTreeMap<K, u64>;

fn bump<K: Ord>(c: &mut Counts<K>, k: K) {
    *c.entry(k).or_insert(0) += 1;
}

fn add_all<K: Ord + Clone>(into: &mut Counts<K>, from: &Counts<K>) {
    for (k, v) in from {
        *into.entry(k.clone()).or_insert(0) += v;
    }
}

/// A thread's counters (see the module doc).
#[derive(Clone, Debug, Default)]
pub struct Tally {
    /// Ioctls by the kind of fd they were issued on.
    pub by_fd: Counts<FdKind>,
    /// Ioctls by name ("unknown" for numbers rkvm does not implement).
    pub by_name: Counts<&'static str>,
    /// Ioctls that succeeded.
    pub successes: u64,
    /// Failed ioctls by errno.
    pub errnos: Counts<i32>,
    /// Other operations on device fds ("pread stats", "mmap vcpu", ...):
    /// (succeeded, failed).
    pub file_ops: BTreeMap<&'static str, (u64, u64)>,
    /// Guest runs, by the mode the guest started in.
    pub guest_modes: Counts<&'static str>,
    /// KVM_RUN calls that returned 0, by exit reason.
    pub exits: Counts<u32>,
    /// KVM_RUN calls that failed, by errno.
    pub run_errnos: Counts<i32>,
    /// What fork children saw using the parent's fds: (ioctl, errno or 0).
    pub child_results: Counts<(&'static str, i32)>,
    /// Everything else worth a line ("scripted races", "SET_SREGS refused").
    pub notes: Counts<&'static str>,
}

impl Tally {
    /// Counts one ioctl and its result.
    pub fn ioctl(&mut self, fd: FdKind, name: &'static str, result: Result<i64, i32>) {
        bump(&mut self.by_fd, fd);
        bump(&mut self.by_name, name);
        match result {
            Ok(_) => self.successes += 1,
            Err(e) => bump(&mut self.errnos, e),
        }
    }

    /// Counts an operation other than an ioctl.
    pub fn file_op(&mut self, what: &'static str, ok: bool) {
        let e = self.file_ops.entry(what).or_insert((0, 0));
        if ok {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
    }

    /// Counts one KVM_RUN result.
    pub fn run(&mut self, result: Result<u32, i32>) {
        match result {
            Ok(reason) => bump(&mut self.exits, reason),
            Err(e) => bump(&mut self.run_errnos, e),
        }
    }

    /// Counts a note.
    pub fn note(&mut self, what: &'static str) {
        bump(&mut self.notes, what);
    }

    /// Counts a guest run started in `mode`.
    pub fn guest_run(&mut self, mode: &'static str) {
        bump(&mut self.guest_modes, mode);
    }

    /// Counts what a fork child saw for `ioctl`.
    pub fn child_result(&mut self, ioctl: &'static str, errno: i32) {
        bump(&mut self.child_results, (ioctl, errno));
    }

    /// Ioctls counted.
    pub fn ioctls(&self) -> u64 {
        self.by_fd.values().sum()
    }

    /// Guest runs counted.
    pub fn guest_runs(&self) -> u64 {
        self.guest_modes.values().sum()
    }

    /// KVM_RUN calls counted.
    pub fn runs(&self) -> u64 {
        self.exits.values().sum::<u64>() + self.run_errnos.values().sum::<u64>()
    }

    /// Adds `other` into this tally.
    pub fn merge(&mut self, other: &Tally) {
        add_all(&mut self.by_fd, &other.by_fd);
        add_all(&mut self.by_name, &other.by_name);
        self.successes += other.successes;
        add_all(&mut self.errnos, &other.errnos);
        for (k, (ok, failed)) in &other.file_ops {
            let e = self.file_ops.entry(k).or_insert((0, 0));
            e.0 += ok;
            e.1 += failed;
        }
        add_all(&mut self.guest_modes, &other.guest_modes);
        add_all(&mut self.exits, &other.exits);
        add_all(&mut self.run_errnos, &other.run_errnos);
        add_all(&mut self.child_results, &other.child_results);
        add_all(&mut self.notes, &other.notes);
    }

    /// The report's body (everything between the first line and the
    /// findings).
    pub fn render(&self) -> String {
        let mut o = String::new();
        let fds: Vec<String> = FdKind::ALL
            .iter()
            .map(|k| format!("{} {}", k.name(), self.by_fd.get(k).copied().unwrap_or(0)))
            .collect();
        o.push_str(&format!("ioctls: {} ({})\n", self.ioctls(), fds.join(", ")));
        o.push_str("ioctls by name:\n");
        let mut names: Vec<_> = self.by_name.iter().collect();
        names.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (name, n) in names {
            o.push_str(&format!("  {name:<28} {n}\n"));
        }
        o.push_str(&format!(
            "results: {} succeeded, {} failed\n",
            self.successes,
            self.errnos.values().sum::<u64>()
        ));
        o.push_str("errnos:\n");
        for (e, n) in sorted(&self.errnos) {
            o.push_str(&format!(
                "  {:<28} {n}\n",
                format!("{} ({e})", errno::name(*e))
            ));
        }
        if !self.file_ops.is_empty() {
            o.push_str("other operations (succeeded/failed):\n");
            for (what, (ok, failed)) in &self.file_ops {
                o.push_str(&format!("  {what:<28} {ok}/{failed}\n"));
            }
        }
        let modes: Vec<String> = self
            .guest_modes
            .iter()
            .map(|(m, n)| format!("{m} {n}"))
            .collect();
        o.push_str(&format!(
            "guest runs: {} ({})\n",
            self.guest_runs(),
            modes.join(", ")
        ));
        o.push_str(&format!("KVM_RUN: {} calls\n", self.runs()));
        o.push_str("  exits:\n");
        for (r, n) in sorted(&self.exits) {
            o.push_str(&format!("    {:<26} {n}\n", exit::name(*r)));
        }
        o.push_str("  errors:\n");
        for (e, n) in sorted(&self.run_errnos) {
            o.push_str(&format!("    {:<26} {n}\n", errno::name(*e)));
        }
        if !self.child_results.is_empty() {
            o.push_str("fork children, on the parent's fds:\n");
            for ((ioctl, e), n) in &self.child_results {
                let r = if *e == 0 {
                    "succeeded".to_string()
                } else {
                    errno::name(*e)
                };
                o.push_str(&format!("  {ioctl:<28} {r:<10} {n}\n"));
            }
        }
        if !self.notes.is_empty() {
            o.push_str("notes:\n");
            for (what, n) in &self.notes {
                o.push_str(&format!("  {what:<50} {n}\n"));
            }
        }
        o
    }
}

/// Entries by decreasing count.
fn sorted<K: Ord>(c: &Counts<K>) -> Vec<(&K, &u64)> {
    let mut v: Vec<_> = c.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_adds_every_counter() {
        let mut a = Tally::default();
        a.ioctl(FdKind::Vcpu, "KVM_RUN", Ok(0));
        a.run(Ok(kvm_bindings::KVM_EXIT_HLT));
        let mut b = Tally::default();
        b.ioctl(FdKind::Vcpu, "KVM_RUN", Err(libc::EINTR));
        b.run(Err(libc::EINTR));
        b.ioctl(FdKind::System, "unknown", Err(libc::ENOTTY));
        b.file_op("pread stats", true);
        b.guest_run("real");
        a.merge(&b);
        assert_eq!(a.ioctls(), 3);
        assert_eq!(a.by_name["KVM_RUN"], 2);
        assert_eq!(a.successes, 1);
        assert_eq!(a.errnos[&libc::ENOTTY], 1);
        assert_eq!(a.runs(), 2);
        assert_eq!(a.guest_runs(), 1);
        assert_eq!(a.file_ops["pread stats"], (1, 0));
    }

    #[test]
    fn the_report_names_errnos_and_exits() {
        let mut t = Tally::default();
        t.ioctl(FdKind::Vm, "KVM_CREATE_VCPU", Err(libc::EEXIST));
        t.run(Ok(kvm_bindings::KVM_EXIT_IO));
        let text = t.render();
        assert!(text.contains("EEXIST (17)"), "{text}");
        assert!(text.contains("KVM_EXIT_IO"), "{text}");
        assert!(text.contains("vm 1"), "{text}");
    }
}
