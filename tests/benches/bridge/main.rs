//! `cargo xtask bench bridge`: the bridge between a NIC and a vhost-user guest, through xvio
//! and, in the same run, through OVS-DPDK (an `afxdp` port on the same kind of veth and a
//! `dpdkvhostuser` port), runs alternating, frames/s at 64 and 1500 B each way:
//!
//! - **to_guest**: the live-frames generator (`xvio_tests::xdp::Generator`) in the peer
//!   namespace sends frames to the guest's MAC out of the peer's veth end as fast as it can
//!   for a fixed time; an rxonly testpmd (virtio-user) guest counts what arrives (its totals
//!   at stop). Rate = frames the guest received / the generator's time.
//! - **from_guest**: a txonly testpmd guest sends to the peer's MAC as fast as it can; a
//!   counting XDP program on the peer's veth end (`DropCounter::attach_from`) counts what
//!   arrives from the guest's MAC. Rate = frames counted in a fixed window after a warm-up.
//!
//! Placement, the same for every datapath: the generator and the sink (the generator and
//! testpmd's forwarding lcore) on CPU 0, the datapath on CPU 1 (`xvio --datapath-cpus 1`;
//! OVS `pmd-cpu-mask=0x2`, `dpdk-lcore-mask=0x1`). On veth the receiving end's XDP and the
//! AF_XDP copy into the UMEM run on the sending CPU (CPU 0 to_guest); AF_XDP transmit in copy
//! mode runs the peer's receive on the CPU that calls `sendto` (CPU 1 from_guest).
//!
//! Each datapath runs on a fresh topology (namespaces, veth) with one guest; every run
//! prints the anchor's health (its ports up, frames through, where frames were dropped) and
//! how busy each CPU was. OVS-DPDK that does not come up or forwards nothing fails the
//! benchmark (non-zero exit, no ratio). After the rates, a cost phase per datapath
//! ([`cost`]): idle CPU, CPU per frame at a paced load, ping round trips.
//!
//! Options (after `--`): `--reps N` (5; 0 runs the cost phase only), `--seconds S` (3, the
//! measuring window), `--only xvio|ovs` (no table then), `--no-cost`. Needs root, Debian's
//! dpdk-dev and openvswitch-switch-dpdk, and the release build of `xvio` (`cargo xtask bench
//! bridge` builds it).

mod cost;
mod rate;
mod setup;

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use xvio_tests::bench::Summary;

use crate::{
    rate::{Direction, from_guest, to_guest},
    setup::{Bridge, Datapath, SIZES},
};

struct Settings {
    datapaths: Vec<Datapath>,
    reps: usize,
    window: Duration,
    /// Whether the cost phase (idle CPU, CPU per frame, ping) runs after the rates.
    cost: bool,
    started: Instant,
}

impl Settings {
    /// "[ 123 s]": time since the start, for the log.
    fn clock(&self) -> String {
        format!("[{:>4} s]", self.started.elapsed().as_secs())
    }
}

fn settings() -> Settings {
    let args: Vec<String> = std::env::args().collect();
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let datapaths = match args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
    {
        Some("xvio") => vec![Datapath::Xvio],
        Some("ovs") => vec![Datapath::Ovs],
        _ => vec![Datapath::Xvio, Datapath::Ovs],
    };
    Settings {
        datapaths,
        // 0: the cost phase only.
        reps: value("--reps").map_or(5, |r| r as usize),
        window: Duration::from_secs(value("--seconds").unwrap_or(3).max(1)),
        cost: !args.iter().any(|a| a == "--no-cost"),
        started: Instant::now(),
    }
}

type Results = BTreeMap<(Direction, usize, Datapath), Vec<f64>>;

/// Every run, alternating the datapaths; fails on the first error, or when the anchor
/// forwards nothing.
fn run_all(s: &Settings, results: &mut Results) -> Result<(), String> {
    for rep in 1..=s.reps {
        for dp in s.datapaths.iter().copied() {
            let bridge =
                Bridge::start(dp).map_err(|e| format!("{} did not start: {e}", dp.name()))?;
            println!(
                "{} run {rep}/{} {}: {}",
                s.clock(),
                s.reps,
                dp.name(),
                bridge.health()?
            );
            for dir in [Direction::ToGuest, Direction::FromGuest] {
                for len in SIZES {
                    let sample = match dir {
                        Direction::ToGuest => to_guest(&bridge, len, s.window),
                        Direction::FromGuest => from_guest(&bridge, len, s.window),
                    }
                    .map_err(|e| format!("{} {} {len} B: {e}", dp.name(), dir.name()))?;
                    println!(
                        "  {:<10} {len:>4} B {:>7.3} Mpps | {}",
                        dir.name(),
                        sample.rate / 1e6,
                        sample.health
                    );
                    if dp == Datapath::Ovs && sample.rate <= 0.0 {
                        return Err(format!(
                            "the anchor (OVS-DPDK) forwarded nothing {} at {len} B: {}",
                            dir.name(),
                            sample.health
                        ));
                    }
                    results.entry((dir, len, dp)).or_default().push(sample.rate);
                }
            }
        }
    }
    Ok(())
}

/// The cost phase, one run per datapath; a line of results for each.
fn run_cost(s: &Settings) -> Result<Vec<(Datapath, String)>, String> {
    let mut lines = Vec::new();
    for dp in s.datapaths.iter().copied() {
        let mut bridge =
            Bridge::start(dp).map_err(|e| format!("{} did not start: {e}", dp.name()))?;
        bridge.detach_counter();
        println!("{} cost {}: {}", s.clock(), dp.name(), bridge.health()?);
        let line = cost::measure(&bridge).map_err(|e| format!("{} cost: {e}", dp.name()))?;
        println!("  {line}");
        lines.push((dp, line));
    }
    Ok(lines)
}

fn print_table(s: &Settings, results: &Results) {
    println!();
    println!(
        "bridge NIC <-> guest: frames/s (Mpps) and Gbit/s of frame bytes (no FCS), median [min-max] of {} runs of {} s, xvio and OVS-DPDK alternating",
        s.reps,
        s.window.as_secs()
    );
    println!(
        "placement: generator and sink on CPU 0 (live-frames XDP generator / testpmd txonly; testpmd rxonly / peer XDP counter); datapath on CPU 1 (xvio --datapath-cpus 1 | OVS pmd-cpu-mask=0x2)"
    );
    for dir in [Direction::ToGuest, Direction::FromGuest] {
        for len in SIZES {
            let sum = |dp| results.get(&(dir, len, dp)).and_then(|v| Summary::of(v));
            let (Some(x), Some(o)) = (sum(Datapath::Xvio), sum(Datapath::Ovs)) else {
                continue;
            };
            let gbps = |pps: f64| pps * len as f64 * 8.0 / 1e9;
            println!(
                "{:<10} {len:>4} B | xvio {:>6.3} Mpps [{:.3}-{:.3}] {:>5.2} Gbit/s | OVS-DPDK {:>6.3} Mpps [{:.3}-{:.3}] {:>5.2} Gbit/s | xvio/OVS {:.2}",
                dir.name(),
                x.median / 1e6,
                x.min / 1e6,
                x.max / 1e6,
                gbps(x.median),
                o.median / 1e6,
                o.min / 1e6,
                o.max / 1e6,
                gbps(o.median),
                x.median / o.median,
            );
        }
    }
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("bench bridge needs root (namespaces, XDP, DPDK, OVS-DPDK)");
        std::process::exit(1);
    }
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let s = settings();
    let mut results = Results::new();
    // Everything a run starts is dropped (stopped, removed) before these return.
    let costs =
        run_all(&s, &mut results).and_then(|()| if s.cost { run_cost(&s) } else { Ok(Vec::new()) });
    let costs = match costs {
        Ok(costs) => costs,
        Err(e) => {
            eprintln!("bench bridge FAILED: {e}");
            std::process::exit(1);
        }
    };
    print_table(&s, &results);
    if !costs.is_empty() {
        println!(
            "cost: idle = datapath process CPU over {} s, guest connected, no traffic; paced = 64 B to_guest at {} frames/s for {} s in bursts of {:?} frames, datapath process CPU per delivered frame (top threads); ping = {} pings every 10 ms from the peer (CPU 0) to an icmpecho guest",
            cost::IDLE.as_secs(),
            cost::PACED_PPS,
            cost::PACED.as_secs(),
            cost::PACED_BURSTS,
            cost::PINGS
        );
        for (dp, line) in costs {
            println!("{:<9} {line}", dp.name());
        }
    }
    println!("{} done", s.clock());
}
