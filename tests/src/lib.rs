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

/// The bytes process `pid` maps of the memfd called `name` (what /proc shows as
/// `/memfd:NAME`), and how many of them are in its page tables: `(Size, Rss)` summed over
/// its mappings in /proc/PID/smaps; (0, 0) when it maps none (or is gone).
pub fn memfd_mapped(pid: i32, name: &str) -> (usize, usize) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let file = format!("/memfd:{name}");
    let (mut size, mut rss, mut inside) = (0usize, 0usize, false);
    let kib = |rest: &str| {
        rest.trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<usize>()
            .unwrap_or(0)
            * 1024
    };
    for line in smaps.lines() {
        // A mapping's first line starts with its range, "start-end" in hex.
        let range = line
            .split_whitespace()
            .next()
            .and_then(|t| t.split_once('-'));
        let hex = |t: &str| usize::from_str_radix(t, 16).is_ok();
        if range.is_some_and(|(a, b)| hex(a) && hex(b)) {
            // After range, perms, offset, dev and inode: the path, to the end of the line
            // (it may hold spaces), with " (deleted)" after a file that is gone.
            let mut rest = line;
            for _ in 0..5 {
                rest = rest
                    .trim_start()
                    .split_once(char::is_whitespace)
                    .map_or("", |(_, r)| r);
            }
            let path = rest.trim();
            inside = path.strip_suffix(" (deleted)").unwrap_or(path) == file;
        } else if inside && let Some(rest) = line.strip_prefix("Size:") {
            size += kib(rest);
        } else if inside && let Some(rest) = line.strip_prefix("Rss:") {
            rss += kib(rest);
        }
    }
    (size, rss)
}
