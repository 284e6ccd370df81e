# Shared paths and helpers for the testbed scripts (sourced, not run).
#
# Everything built lives outside the git tree, under $RKVM_CACHE
# (default ~/.cache/rkvm). Each artefact's directory name carries a hash of
# its inputs, so a changed input gives a new directory and an unchanged one
# is reused.

RKVM_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RKVM_CACHE=${RKVM_CACHE:-$HOME/.cache/rkvm}
TESTBED=$RKVM_ROOT/qemu-testbed

# The kernel and every module must be built by this rustc (FACTS.md: rustup's
# toolchain has no rust-src; Debian's rustc-web does).
KERNEL_RUSTC=${KERNEL_RUSTC:-/usr/bin/rustc}
BINDGEN_VERSION=0.73.0
BINDGEN=$RKVM_CACHE/tools/bin/bindgen
LINUX_TARBALL=/usr/src/linux-source-6.12.tar.xz

say() { printf '[rkvm] %s\n' "$*" >&2; }
die() { printf '[rkvm] error: %s\n' "$*" >&2; exit 1; }

# Version of the Debian package that provides the kernel source.
linux_source_version() {
    dpkg-query -W -f='${Version}' linux-source-6.12 2>/dev/null
}

# Cache key of the test kernel: the fragment, the source package version and
# the Rust toolchain that builds it.
kernel_key() {
    {
        cat "$TESTBED/kernel.config"
        linux_source_version
        "$KERNEL_RUSTC" --version 2>/dev/null
        echo "bindgen $BINDGEN_VERSION"
    } | sha256sum | cut -c1-16
}

kernel_dir() { echo "$RKVM_CACHE/kernel/$(kernel_key)"; }
