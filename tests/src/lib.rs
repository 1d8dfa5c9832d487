//! Helpers for xvio's integration tests: privilege gating, network namespaces with veth
//! pairs, the daemon as a child process, raw AF_PACKET sockets, AF_XDP receive and transmit
//! loops and the AF_XDP traffic generator, DPDK testpmd (as a guest and as a datapath),
//! OVS-DPDK, a virtio-net driver in the test process (and the benchmarks' receive-only guest
//! built on it), and frame builders.
//!
//! Privileged tests call [`privileged`] first: as root they run; outside CI without root
//! they print why they skip; in CI (`CI=true`) they never skip, they fail.

pub mod bench;
pub mod daemon;
pub mod dpdk;
pub mod dpdk_fwd;
pub mod frames;
pub mod guest;
pub mod netns;
pub mod ovs;
pub mod packet;
pub mod qemu;
pub mod sink;
pub mod topology;
pub mod xdp;
pub mod xsk;

/// Whether a privileged test may run. Without root: in CI this panics (privileged tests
/// must not skip there); elsewhere it prints the reason and returns false.
pub fn privileged(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test} needs root, and privileged tests must not skip in CI (CI=true)");
    }
    eprintln!("skipping {test}: needs root (netns, XDP, AF_XDP); run `cargo xtask test` as root");
    false
}

/// A name unique to this process and call, for namespaces and interfaces (at most 15
/// characters for interfaces: `prefix` should be at most 6).
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{:x}{n}", std::process::id() % 0xfffff)
}
