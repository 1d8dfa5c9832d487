//! `cargo xtask bench vhost`: guest to guest through xvio against the same topology through
//! OVS-DPDK, in the same run, runs alternating. Two DPDK virtio-user frontends (testpmd):
//! txonly on guest A sends to guest B's MAC as fast as it can, rxonly on guest B counts; the
//! rate is B's `Rx-pps` as testpmd prints it each second, the median of the seconds after the
//! first two once A forwards (not once it connects: behind OVS-DPDK, A's link is up 2.5-4 s
//! before it sends). Needs root and Debian's dpdk-dev and openvswitch-switch-dpdk.
//!
//! - **xvio**: `xvio run --guest socket=A,mac=… --guest socket=B,mac=… --datapath-cpus 1`
//!   (no interface: the guests' switch only; CPU copies).
//! - **OVS-DPDK** (`xvio_tests::ovs`, in a namespace of its own so that its bridge's tap port
//!   goes with it): a netdev bridge with two `dpdkvhostuser` ports and the flows xvio is told
//!   on its command line, each guest's MAC to its port (the default NORMAL flow would flood
//!   every frame for B, which never sends and so is never learned, to the bridge's tap port
//!   too).
//!
//! Placement, the same for both and printed with the results: both guests' forwarding lcores
//! (the generator and the sink) on CPU 0, their idle main lcores on CPU 1; the datapath on
//! CPU 1 (`--datapath-cpus 1`; OVS `pmd-cpu-mask=0x2`, `dpdk-lcore-mask=0x1`).
//!
//! Every run prints the datapath's health: both guests connected (xvio's `guest_stats`
//! `ready`; OVS's vhost-user ports' `link_state` up, its PMD on core 1 polling both), what
//! guest A sent and B received (their totals at stop) and, for xvio, where frames went. An
//! OVS-DPDK that does not start, or that carries nothing in a run, fails the benchmark
//! (non-zero exit, no ratio).
//!
//! Options (after `--`): `--reps N` (5), `--seconds S` (6, at least 3).

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use xvio_common::GuestStats;
use xvio_tests::{
    bench::{Summary, guest_stats},
    daemon::Daemon,
    dpdk::Testpmd,
    netns::Netns,
    ovs::{OvsCpus, OvsDpdk},
    unique_name,
};

const MAC_A: &str = "02:00:00:00:00:0a";
const MAC_B: &str = "02:00:00:00:00:01";
/// The guests' lcores: the main lcore (idle) on CPU 1, the forwarding lcore on CPU 0.
const GUEST_CPUS: &str = "1,0";
const WAIT: Duration = Duration::from_secs(15);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Datapath {
    Xvio,
    Ovs,
}

impl Datapath {
    fn name(self) -> &'static str {
        match self {
            Datapath::Xvio => "xvio",
            Datapath::Ovs => "OVS-DPDK",
        }
    }
}

/// One datapath serving the two guests' sockets.
enum Switch {
    Xvio {
        daemon: Daemon,
        sockets: [PathBuf; 2],
    },
    Ovs {
        ovs: OvsDpdk,
        sockets: [PathBuf; 2],
        // Dropped after `ovs`: its bridge's tap port lives in this namespace.
        _ns: Netns,
    },
}

impl Switch {
    fn start(dp: Datapath) -> Result<Switch, String> {
        match dp {
            Datapath::Xvio => {
                let dir = std::env::temp_dir();
                let sockets = [
                    dir.join(format!("{}.sock", unique_name("xvio-bench-a"))),
                    dir.join(format!("{}.sock", unique_name("xvio-bench-b"))),
                ];
                let guest =
                    |socket: &Path, mac: &str| format!("socket={},mac={mac}", socket.display());
                let (a, b) = (guest(&sockets[0], MAC_A), guest(&sockets[1], MAC_B));
                let args = ["--guest", &a, "--guest", &b, "--datapath-cpus", "1"];
                let daemon = Daemon::start(None, &args, &sockets[1])?;
                Ok(Switch::Xvio { daemon, sockets })
            }
            Datapath::Ovs => {
                let ns = Netns::new("o");
                let cpus = OvsCpus {
                    lcore_mask: "0x1",
                    pmd_mask: "0x2",
                };
                let ovs = OvsDpdk::start(Some(&ns), cpus, 3072)?;
                let sockets = [ovs.add_vhost_user("vhu0")?, ovs.add_vhost_user("vhu1")?];
                ovs.set_flows(&[
                    &format!("priority=10,dl_dst={MAC_A},actions=output:vhu0"),
                    &format!("priority=10,dl_dst={MAC_B},actions=output:vhu1"),
                ])?;
                Ok(Switch::Ovs {
                    ovs,
                    sockets,
                    _ns: ns,
                })
            }
        }
    }

    fn sockets(&self) -> &[PathBuf; 2] {
        match self {
            Switch::Xvio { sockets, .. } | Switch::Ovs { sockets, .. } => sockets,
        }
    }

    /// Waits until both guests are connected and served; what says so.
    fn wait_connected(&self) -> Result<String, String> {
        let deadline = Instant::now() + WAIT;
        loop {
            let state = self.connected()?;
            if let Ok(health) = state {
                return Ok(health);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the guests were not both connected within {WAIT:?}: {}",
                    state.unwrap_err()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Ok(health) when both guests are connected and served, Err(what is missing) when not
    /// yet; the outer error when the datapath cannot say.
    fn connected(&self) -> Result<Result<String, String>, String> {
        match self {
            Switch::Xvio { daemon, .. } => {
                let ready = |id| guest_stats(id).is_some_and(|g| g.connected == 1 && g.ready == 1);
                Ok(if ready(0) && ready(1) {
                    Ok("xvio: both guests connected and ready".to_owned())
                } else {
                    let log = daemon.log();
                    let tail: Vec<&str> = log.lines().rev().take(10).collect();
                    Err(format!(
                        "guest_stats (connected, ready): A {:?}, B {:?}; xvio's log ends:\n{}",
                        guest_stats(0).map(|g| (g.connected, g.ready)),
                        guest_stats(1).map(|g| (g.connected, g.ready)),
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    ))
                })
            }
            Switch::Ovs { ovs, .. } => {
                let links = [
                    ovs.interface("vhu0", "link_state")?,
                    ovs.interface("vhu1", "link_state")?,
                ];
                let rxqs = ovs.appctl(&["dpif-netdev/pmd-rxq-show"])?;
                let polled = |port: &str| {
                    rxqs.lines()
                        .any(|l| l.contains(&format!("port: {port} ")) && l.contains("enabled"))
                };
                Ok(
                    if links.iter().all(|l| l == "up")
                        && rxqs.contains("core_id 1:")
                        && polled("vhu0")
                        && polled("vhu1")
                    {
                        Ok("OVS-DPDK: vhu0 and vhu1 link up, PMD on core 1 polls both".to_owned())
                    } else {
                        Err(format!("link_state {links:?}\n{rxqs}"))
                    },
                )
            }
        }
    }
}

/// One run's result.
struct Run {
    rate: f64,
    health: String,
}

/// Runs rxonly on B, then txonly on A for `seconds`; B's median Rx-pps over the seconds after
/// the first two.
fn measure(switch: &Switch, len: usize, seconds: u64) -> Result<Run, String> {
    let [a, b] = switch.sockets();
    let before = [guest_stats(0), guest_stats(1)];
    let rx = Testpmd::start_with(
        b,
        "rxonly",
        len,
        MAC_A,
        &format!(",mac={MAC_B}"),
        GUEST_CPUS,
        &["--stats-period", "1"],
    );
    std::thread::sleep(Duration::from_secs(2));
    let tx = Testpmd::start_with(
        a,
        "txonly",
        len,
        MAC_B,
        &format!(",mac={MAC_A}"),
        GUEST_CPUS,
        &["--stats-period", "1"],
    );
    let connected = switch.wait_connected();
    // The window opens when A forwards, not when it connects: behind OVS, testpmd's link
    // shows up seconds before it sends, and B's samples of those seconds read as nothing
    // carried.
    let started = tx.wait_started(WAIT);
    let first = rx.rx_pps_samples().len();
    std::thread::sleep(Duration::from_secs(seconds));
    let samples: Vec<f64> = rx.rx_pps_samples().into_iter().map(|v| v as f64).collect();
    let live = [guest_stats(0), guest_stats(1)];
    let sent = tx.stop();
    let received = rx.stop();
    let connected = connected?;
    if !started {
        return Err(format!(
            "guest A's testpmd did not start forwarding within {WAIT:?}"
        ));
    }
    let useful = samples.get(first + 2..).unwrap_or_default();
    let rate = Summary::of(useful).map_or(0.0, |s| s.median);
    Ok(Run {
        rate,
        health: format!(
            "{connected}; A sent {}, B received {} ({:.0}%){}",
            sent.tx,
            received.rx,
            100.0 * received.rx as f64 / sent.tx.max(1) as f64,
            xvio_detail(switch, &before, &live),
        ),
    })
}

/// Where xvio's frames went, from its `guest_stats` (published about once a second: the
/// `live` reading is taken before the guests stop, so it may miss the last second).
fn xvio_detail(
    switch: &Switch,
    before: &[Option<GuestStats>; 2],
    live: &[Option<GuestStats>; 2],
) -> String {
    let Switch::Xvio { .. } = switch else {
        return String::new();
    };
    // A fresh daemon may not have pinned its map before the guests connect: its counters
    // start at zero.
    let [a0, b0] = before.map(Option::unwrap_or_default);
    let (Some(a1), Some(b1)) = (live[0], live[1]) else {
        return "; xvio's guest_stats are not pinned".to_owned();
    };
    format!(
        "; xvio: from A {}, to B {}, dropped: B full {}, A no route {}",
        a1.from_guest_packets - a0.from_guest_packets,
        b1.to_guest_packets - b0.to_guest_packets,
        b1.to_guest_dropped_full - b0.to_guest_dropped_full,
        a1.from_guest_no_route - a0.from_guest_no_route,
    )
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("bench vhost needs root (DPDK and OVS-DPDK)");
        std::process::exit(1);
    }
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let reps = value("--reps").unwrap_or(5).max(1) as usize;
    let seconds = value("--seconds").unwrap_or(6).max(3);
    if let Err(e) = run(reps, seconds) {
        eprintln!("bench vhost FAILED: {e}");
        std::process::exit(1);
    }
}

fn run(reps: usize, seconds: u64) -> Result<(), String> {
    let started = Instant::now();
    let mut table = Vec::new();
    for len in [64usize, 1500] {
        let (mut xv, mut ov) = (Vec::new(), Vec::new());
        for rep in 1..=reps {
            for dp in [Datapath::Xvio, Datapath::Ovs] {
                let switch =
                    Switch::start(dp).map_err(|e| format!("{} did not start: {e}", dp.name()))?;
                let run = measure(&switch, len, seconds)
                    .map_err(|e| format!("{} {len} B: {e}", dp.name()))?;
                println!(
                    "[{:>4} s] {len} B run {rep}/{reps} {:<8} {:>7.3} Mpps | {}",
                    started.elapsed().as_secs(),
                    dp.name(),
                    run.rate / 1e6,
                    run.health
                );
                match dp {
                    Datapath::Xvio => xv.push(run.rate),
                    Datapath::Ovs if run.rate <= 0.0 => {
                        return Err(format!(
                            "the anchor (OVS-DPDK) carried nothing at {len} B: {}",
                            run.health
                        ));
                    }
                    Datapath::Ovs => ov.push(run.rate),
                }
            }
        }
        table.push((len, xv, ov));
    }
    println!();
    println!(
        "guest to guest, testpmd txonly -> rxonly, {reps} runs of {seconds} s each, xvio and OVS-DPDK alternating, medians of per-second Rx-pps [min-max of the runs]"
    );
    println!(
        "placement: both guests' forwarding lcores (generator and sink) on CPU 0; datapath on CPU 1 (xvio --datapath-cpus 1 | OVS pmd-cpu-mask=0x2)"
    );
    for (len, xv, ov) in table {
        let (Some(x), Some(o)) = (Summary::of(&xv), Summary::of(&ov)) else {
            continue;
        };
        let gbps = |pps: f64| pps * len as f64 * 8.0 / 1e9;
        println!(
            "{len:>5} B  xvio {:>6.3} Mpps [{:.3}-{:.3}] ({:>5.2} Gbit/s) | OVS-DPDK {:>6.3} Mpps [{:.3}-{:.3}] ({:>5.2} Gbit/s) | xvio/OVS {:.2}",
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
    Ok(())
}
