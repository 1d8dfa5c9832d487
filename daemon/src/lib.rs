//! xvio, the daemon: loads the XDP program that steers guest frames to AF_XDP, pins its
//! maps, and (in later stages) runs the vhost-user-net datapath.
//!
//! Modules own one concern each: `config` (the command line), `netlink` (what XDP program
//! an interface has), `bpffs` (mount and pin folders), `attach` (one interface's program
//! and maps), `events` (kernel events to logs), `daemon` (the control loop).

pub mod attach;
pub mod bpffs;
pub mod config;
pub mod copy;
pub mod daemon;
pub mod datapath;
pub mod events;
pub mod netlink;
pub mod privileges;
pub mod stats;
pub mod vhost;
pub mod xsk;

/// The compiled XDP program (`ebpf/xvio.bpf.c`, built by `build.rs`), with BTF.
pub static XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xvio.bpf.o"));

/// The tests' and benchmarks' XDP programs (`ebpf/bench.bpf.c`): counting XDP_DROPs. Never
/// loaded by the daemon.
pub static BENCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench.bpf.o"));
