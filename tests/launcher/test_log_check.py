"""Tests of qemu-testbed/run: its verdict on a guest log (which kernel reports
fail a run, and that the excused warnings are excused only at their exact
call site with their expected caller), and the pruning of old run
directories, which must spare a run still in progress."""

import fcntl
import importlib.machinery
import importlib.util
import os
import tempfile
import unittest
from pathlib import Path

RUN = Path(__file__).resolve().parents[2] / "qemu-testbed" / "run"
loader = importlib.machinery.SourceFileLoader("testbed_run", str(RUN))
spec = importlib.util.spec_from_loader("testbed_run", loader)
run = importlib.util.module_from_spec(spec)
loader.exec_module(run)


def warning(site, *trace):
    lines = [
        "------------[ cut here ]------------",
        f"WARNING: CPU: 0 PID: 1 at {site}:57 some_function+0x52/0x85",
        "Modules linked in: rkvm(O)",
        "Call Trace:",
        " <TASK>",
    ]
    lines += [f" ? {fn}+0x2a/0x96" for fn in trace]
    lines += [" </TASK>", "---[ end trace 0000000000000000 ]---"]
    return "\n".join(lines)


class KernelProblems(unittest.TestCase):
    def test_clean_log_passes(self):
        self.assertIsNone(run.kernel_problems("Linux version 6.12\nrkvm: VMX root operation on 2 CPUs\n"))

    def test_warning_anywhere_fails(self):
        log = "boot\n" + warning("module/vmx/host.rs", "cpu_online", "cpuhp_invoke_callback")
        self.assertIn("kernel WARNING", run.kernel_problems(log))

    def test_bochs_topology_warning_is_excused_at_its_site(self):
        log = warning("arch/x86/kernel/cpu/topology_common.c", "cpu_init_topology", "early_cpu_init")
        self.assertIsNone(run.kernel_problems(log))

    def test_same_site_from_another_caller_is_not_excused(self):
        log = warning("arch/x86/kernel/cpu/topology_common.c", "rkvm_init")
        self.assertIn("kernel WARNING", run.kernel_problems(log))

    def test_kvm_complaining_about_the_callback_slot_is_excused(self):
        log = warning("arch/x86/kernel/reboot.c", "kvm_enable_virtualization", "kvm_init")
        self.assertIsNone(run.kernel_problems(log))

    def test_callback_slot_warning_caused_by_rkvm_is_not_excused(self):
        log = warning("arch/x86/kernel/reboot.c", "_RNvNtCs_4rkvm3vmx4host6enable", "do_init_module")
        self.assertIn("kernel WARNING", run.kernel_problems(log))

    def test_excuse_does_not_reach_into_the_next_report(self):
        log = (warning("arch/x86/kernel/reboot.c", "do_init_module") + "\n"
               + warning("arch/x86/kernel/cpu/topology_common.c", "cpu_init_topology")
               .replace("topology_common.c", "x.c") + " kvm_enable_virtualization")
        self.assertIn("kernel WARNING", run.kernel_problems(log))

    def test_bug_oops_atomic_sleep_kmemleak_and_panic_fail(self):
        for line, what in [
            ("BUG: kernel NULL pointer dereference, address: 0000000000000000", "kernel BUG"),
            ("Oops: general protection fault, probably for non-canonical address", "kernel Oops"),
            ("[   5.1] BUG: sleeping function called from invalid context at mm/slub.c:4191", "kernel BUG"),
            ("kmemleak: 3 new suspected memory leaks (see /sys/kernel/debug/kmemleak)", "kmemleak"),
            ("unreferenced object 0xffff888003a1c000 (size 64):", "kmemleak"),
            ("Kernel panic - not syncing: Attempted to kill init!", "kernel panic"),
        ]:
            with self.subTest(line=line):
                self.assertIn(what, run.kernel_problems("ok\n" + line + "\n"))


    def test_lockup_detectors_fail_the_run(self):
        for line, what in [
            ("[  61.0] watchdog: BUG: soft lockup - CPU#1 stuck for 22s! [rkvm:97]", "soft lockup"),
            ("[  40.2] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:", "RCU stall"),
            ("[  40.2] rcu: INFO: rcu_preempt self-detected stall on CPU", "RCU stall"),
            ("[  40.2] rcu: INFO: rcu_preempt detected expedited stalls on CPUs/tasks: {", "RCU stall"),
            ("[  33.0] INFO: task rkvm:120 blocked for more than 30 seconds.", "hung task"),
            ("[  50.0] BUG: workqueue lockup - pool cpus=0 node=0 flags=0x0 nice=0 stuck for 31s!",
             "workqueue lockup"),
        ]:
            with self.subTest(line=line):
                self.assertIn(what, run.kernel_problems("ok\n" + line + "\n"))

    def test_a_guest_printing_about_rcu_is_not_a_stall(self):
        self.assertIsNone(run.kernel_problems("rcu: Preemptible hierarchical RCU implementation.\n"))


class RunDirectories(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.runs = Path(self.tmp.name)

    def tearDown(self):
        self.tmp.cleanup()

    def make(self, name):
        d = self.runs / name
        d.mkdir()
        (d / "console.log").write_text("x")
        return d

    def test_only_the_newest_are_kept(self):
        dirs = [self.make(f"20261203-1200{i:02}-x") for i in range(5)]
        run.prune_runs(self.runs, keep=2)
        self.assertEqual(sorted(self.runs.iterdir()), dirs[3:])

    def test_a_run_in_progress_is_never_pruned(self):
        busy = self.make("20261203-110000-busy")
        (busy / ".lock").touch()
        fd = os.open(busy / ".lock", os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        # Another process holds the lock in real life; flock locks are per
        # open file, so a second open in this process conflicts just as well.
        try:
            finished = self.make("20261203-110001-done")
            (finished / ".lock").touch()
            newest = self.make("20261203-120000-new")
            run.prune_runs(self.runs, keep=1)
            self.assertEqual(sorted(self.runs.iterdir()), [busy, newest])
        finally:
            os.close(fd)


class HaltMarkTest(unittest.TestCase):
    def test_the_testbed_kernel_halting_is_seen(self):
        self.assertTrue(run.MARK_HALTED.search("x\nreboot: Power off not available: System halted instead\n"))

    def test_a_nested_guest_halting_in_a_quoted_log_is_not(self):
        quoted = "    # reboot: Power off not available: System halted instead\nG: reboot: Power down\n"
        self.assertIsNone(run.MARK_HALTED.search(quoted))


if __name__ == "__main__":
    unittest.main()
