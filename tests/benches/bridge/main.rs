//! `cargo xtask bench bridge`: the bridge between a NIC and a vhost-user guest, through xvio
//! and, in the same run, through two anchors on the same kind of veth: OVS-DPDK (an `afxdp`
//! port and a `dpdkvhostuser` port) and DPDK testpmd (`net_af_xdp` ↔ `net_vhost`, io
//! forwarding); beside them bare AF_XDP (one socket alone, the ceiling of each direction) and
//! xvio with `--dma sw` (the copy offload at 1500 B). Runs alternate; frames/s at 64 and
//! 1500 B each way:
//!
//! - **to_guest**: the generator (`xvio_tests::xsk::Generator`, an AF_XDP socket sending in
//!   copy mode) in the peer namespace sends frames to the guest's MAC out of the peer's veth
//!   end as fast as it can for a fixed time; a receive-only guest (`xvio_tests::sink::RxSink`,
//!   a virtio-net driver in this process that re-posts each buffer and looks at its used ring
//!   every 100 µs) counts what arrives. Rate = frames the guest received / the generator's
//!   time. (A busy-polling testpmd rxonly guest took half of CPU 0 from the generator and
//!   bounded every datapath at about 0.1 Mpps.)
//! - **from_guest**: a txonly testpmd guest sends to the peer's MAC as fast as it can; a
//!   counting XDP program on the peer's veth end (`DropCounter::attach_from`) counts what
//!   arrives from the guest's MAC. Rate = frames counted in a fixed window after a warm-up.
//! - **bare AF_XDP** ([`bare`]): the same generator into an AF_XDP socket that a loop on
//!   CPU 1 drains and recycles (to_guest), and a loop on CPU 1 transmitting one frame over and
//!   over through an AF_XDP socket, counted by the same peer program (from_guest): what `bench
//!   xsk` measures as rx+recycle and tx, here in the same run. The table prints xvio's share of
//!   it (the target: at least 0.90).
//! - **`--dma sw`**: xvio with `--dma sw:0 --dma sw:0 --copy-threshold 1024` (two software
//!   DMA engines on CPU 0, the first for the guest's RX queue, the second for its TX queue,
//!   take every copy of 1024 B or more) at 1500 B, against xvio with CPU copies in the same
//!   run: the rate and CPU 1's busy share (/proc/stat) with xvio's busiest threads, to show
//!   what the offload frees on the datapath's core.
//!
//! Placement, the same for every datapath: the generator and the sink (the generator and
//! the receive-only guest to_guest; testpmd's forwarding lcore from_guest) on CPU 0, the datapath on CPU 1 (`xvio --datapath-cpus 1`;
//! OVS `pmd-cpu-mask=0x2`, `dpdk-lcore-mask=0x1`; testpmd `--main-lcore 0 -l 0,1`, its
//! forwarding lcore 1; the bare AF_XDP loops pinned to CPU 1). On veth the receiving end's XDP
//! and the AF_XDP copy into the UMEM run on the sending CPU (CPU 0 to_guest); AF_XDP transmit
//! in copy mode runs the peer's receive on the CPU that calls `sendto` (CPU 1 from_guest).
//!
//! testpmd's `net_af_xdp` on veth works with the PMD's defaults but one: copy mode is the
//! kernel's choice (veth has no zero-copy, no `force_copy=1` needed), and libxdp attaches the
//! PMD's program without its dispatcher (which it cannot load here), natively. Its preferred
//! busy polling (`busy_budget`, 64 by default) is turned off (`busy_budget=0`): with it, each
//! receive burst is a `recvfrom` that runs the veth's NAPI (XDP and the copy into the UMEM)
//! on the forwarding lcore's CPU 1 instead of the sender's CPU 0, a placement no other
//! datapath gets. `--testpmd-busy-budget N` measures it with busy polling.
//!
//! Each datapath runs on a fresh topology (namespaces, veth) with one guest; every run
//! prints the anchor's health (its ports up, frames through, where frames were dropped) and
//! how busy each CPU was. An anchor (OVS-DPDK, testpmd) or bare AF_XDP that does not come up
//! or carries nothing fails the benchmark (non-zero exit, no ratio). The runs of xvio, OVS-DPDK
//! and testpmd each end with a ping run: 1000 pings from the peer to an icmpecho guest ([`cost::ping_guest`]), so
//! that ping runs alternate as the rates do, five of each; xvio also with `--busy-poll 20000`
//! (pings only in the runs: it forwards as xvio does), for what a worker that sleeps between
//! sparse frames costs in latency. After the runs, a cost phase per datapath ([`cost`]):
//! idle CPU and CPU per frame at a paced load. Last, with the pings, what a wake-up costs on
//! the machine ([`wake`]): a thread on CPU 1 woken by an eventfd written on CPU 0 as often as
//! the pings come, asleep and polling: the part of a ping that a sleeping worker adds.
//!
//! Options (after `--`): `--reps N` (5; 0 runs the cost phase only, without pings), `--seconds S` (3, the
//! measuring window), `--only LIST` (comma-separated of xvio, dma, poll, ovs, testpmd, bare; all by
//! default; a ratio is printed where both sides ran), `--no-cost` (no pings, no cost phase), `--testpmd-busy-budget N`
//! (0). Needs root, Debian's dpdk-dev and openvswitch-switch-dpdk, and the release build of
//! `xvio` (`cargo xtask bench bridge` builds it).

mod bare;
mod cost;
mod rate;
mod setup;
mod table;
mod wake;

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use crate::{
    rate::{Direction, Sample},
    setup::{Bridge, Datapath},
};

struct Settings {
    datapaths: Vec<Datapath>,
    reps: usize,
    window: Duration,
    /// Whether the pings (in the runs) and the cost phase (idle CPU, CPU per frame, after
    /// the runs) are measured.
    cost: bool,
    /// testpmd's `net_af_xdp` `busy_budget`.
    testpmd_busy_budget: u32,
    started: Instant,
}

impl Settings {
    /// "[ 123 s]": time since the start, for the log.
    fn clock(&self) -> String {
        format!("[{:>4} s]", self.started.elapsed().as_secs())
    }
}

fn settings() -> Result<Settings, String> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
    };
    let value = |name: &str| arg(name).and_then(|v| v.parse::<u64>().ok());
    let datapaths = match arg("--only") {
        None => Datapath::ALL.to_vec(),
        Some(list) => list
            .split(',')
            .map(|name| {
                Datapath::ALL
                    .into_iter()
                    .find(|dp| dp.option() == name)
                    .ok_or_else(|| {
                        format!("--only {name}: expected a comma-separated list of xvio, dma, poll, ovs, testpmd, bare")
                    })
            })
            .collect::<Result<_, _>>()?,
    };
    Ok(Settings {
        datapaths,
        // 0: the cost phase only.
        reps: value("--reps").map_or(5, |r| r as usize),
        window: Duration::from_secs(value("--seconds").unwrap_or(3).max(1)),
        cost: !args.iter().any(|a| a == "--no-cost"),
        testpmd_busy_budget: value("--testpmd-busy-budget").map_or(0, |b| b as u32),
        started: Instant::now(),
    })
}

/// One measurement's figures kept for the table.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Point {
    /// Frames/s.
    pub(crate) rate: f64,
    /// CPU 1's busy share, percent.
    pub(crate) cpu1: f64,
}

pub(crate) type Results = BTreeMap<(Direction, usize, Datapath), Vec<Point>>;
/// Each datapath's ping runs, in order.
pub(crate) type Pings = BTreeMap<Datapath, Vec<cost::PingRun>>;

/// Whether a datapath's runs end with a ping run (when the cost is measured).
fn pings(dp: Datapath) -> bool {
    matches!(
        dp,
        Datapath::Xvio | Datapath::XvioPoll | Datapath::Ovs | Datapath::Testpmd
    )
}

/// Every run, alternating the datapaths, those of xvio, OVS-DPDK and testpmd ending with a
/// ping run (unless `--no-cost`); fails on the first error, or when a reference (an anchor, bare AF_XDP)
/// carries nothing.
fn run_all(s: &Settings, results: &mut Results, ping_runs: &mut Pings) -> Result<(), String> {
    for rep in 1..=s.reps {
        for dp in s.datapaths.iter().copied() {
            // `--busy-poll 20000` forwards as xvio does: only its pings are measured here.
            if dp == Datapath::XvioPoll && !s.cost {
                continue;
            }
            let mut bridge = match dp {
                Datapath::Bare => {
                    println!("{} run {rep}/{} {}", s.clock(), s.reps, dp.name());
                    None
                }
                _ => {
                    let bridge = Bridge::start(dp, s.testpmd_busy_budget)
                        .map_err(|e| format!("{} did not start: {e}", dp.name()))?;
                    println!(
                        "{} run {rep}/{} {}: {}",
                        s.clock(),
                        s.reps,
                        dp.name(),
                        bridge.health()?
                    );
                    Some(bridge)
                }
            };
            let sizes = if dp == Datapath::XvioPoll {
                &[][..]
            } else {
                dp.sizes()
            };
            for dir in [Direction::ToGuest, Direction::FromGuest] {
                for &len in sizes {
                    let sample = measure(bridge.as_ref(), dir, len, s.window)
                        .map_err(|e| format!("{} {} {len} B: {e}", dp.name(), dir.name()))?;
                    println!(
                        "  {:<10} {len:>4} B {:>7.3} Mpps | {}",
                        dir.name(),
                        sample.rate / 1e6,
                        sample.health
                    );
                    if dp.is_reference() && sample.rate <= 0.0 {
                        return Err(format!(
                            "the reference {} carried nothing {} at {len} B: {}",
                            dp.name(),
                            dir.name(),
                            sample.health
                        ));
                    }
                    results.entry((dir, len, dp)).or_default().push(Point {
                        rate: sample.rate,
                        cpu1: sample.datapath_cpu_busy(),
                    });
                }
            }
            if let Some(bridge) = bridge.as_mut().filter(|_| s.cost && pings(dp)) {
                let run =
                    cost::ping_guest(bridge).map_err(|e| format!("{} ping: {e}", dp.name()))?;
                println!("  ping {}", run.line());
                ping_runs.entry(dp).or_default().push(run);
            }
        }
    }
    Ok(())
}

/// One measurement through `bridge`, or through bare AF_XDP without one.
fn measure(
    bridge: Option<&Bridge>,
    dir: Direction,
    len: usize,
    window: Duration,
) -> Result<Sample, String> {
    match (bridge, dir) {
        (Some(b), Direction::ToGuest) => rate::to_guest(b, len, window),
        (Some(b), Direction::FromGuest) => rate::from_guest(b, len, window),
        (None, Direction::ToGuest) => bare::to_guest(len, window),
        (None, Direction::FromGuest) => bare::from_guest(len, window),
    }
}

/// The cost phase, one run per bridging datapath (not the DMA variant: its paced load is
/// 64 B, below the copy threshold); a line of results for each.
fn run_cost(s: &Settings) -> Result<Vec<(Datapath, String)>, String> {
    let mut lines = Vec::new();
    for dp in s.datapaths.iter().copied() {
        if !matches!(
            dp,
            Datapath::Xvio | Datapath::XvioPoll | Datapath::Ovs | Datapath::Testpmd
        ) {
            continue;
        }
        let mut bridge = Bridge::start(dp, s.testpmd_busy_budget)
            .map_err(|e| format!("{} did not start: {e}", dp.name()))?;
        bridge.detach_counter();
        println!("{} cost {}: {}", s.clock(), dp.name(), bridge.health()?);
        let line = cost::measure(&mut bridge).map_err(|e| format!("{} cost: {e}", dp.name()))?;
        println!("  {line}");
        lines.push((dp, line));
    }
    Ok(lines)
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("bench bridge needs root (namespaces, XDP, DPDK, OVS-DPDK)");
        std::process::exit(1);
    }
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let s = match settings() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("bench bridge: {e}");
            std::process::exit(2);
        }
    };
    let mut results = Results::new();
    let mut ping_runs = Pings::new();
    // Everything a run starts is dropped (stopped, removed) before these return.
    let costs = run_all(&s, &mut results, &mut ping_runs)
        .and_then(|()| if s.cost { run_cost(&s) } else { Ok(Vec::new()) });
    let costs = match costs {
        Ok(costs) => costs,
        Err(e) => {
            eprintln!("bench bridge FAILED: {e}");
            std::process::exit(1);
        }
    };
    table::rates(&s, &results);
    table::dma(&results);
    table::costs(&costs);
    table::pings(&ping_runs);
    if !ping_runs.is_empty() {
        match wake::Wakes::measure() {
            Ok(w) => println!("{}", w.line()),
            Err(e) => {
                eprintln!("bench bridge FAILED: wake-up measurement: {e}");
                std::process::exit(1);
            }
        }
    }
    println!("{} done", s.clock());
}
