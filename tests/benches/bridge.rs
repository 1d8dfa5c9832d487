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
//! prints the anchor's health (its ports up, frames through, where frames were dropped).
//! OVS-DPDK that does not come up or forwards nothing fails the benchmark (non-zero exit,
//! no ratio). Needs root, Debian's dpdk-dev and openvswitch-switch-dpdk, and the release
//! build of `xvio` (`cargo xtask bench bridge` builds it).

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use xvio_common::{GuestStats, PortStats, maps};
use xvio_tests::{
    bench::{Summary, guest_stats, pin_current_thread, port_stats},
    daemon::Daemon,
    dpdk::Testpmd,
    frames::{ETH_P_EXPERIMENTAL, frame},
    netns::mac_of,
    ovs::{OvsCpus, OvsDpdk, OvsPortCounters},
    topology::Topology,
    unique_name,
    xdp::{DropCounter, Generator},
};

const GUEST: &str = "02:00:00:00:07:01";
const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x07, 0x01];
const SIZES: [usize; 2] = [64, 1500];
/// OVS's name for the guest's port.
const OVS_GUEST_PORT: &str = "vhu0";
/// Frames per BPF_PROG_TEST_RUN call of the generator.
const GENERATOR_CHUNK: u32 = 100_000;
/// testpmd's lcores: the main lcore (idle) on CPU 1, the forwarding lcore on CPU 0.
const GUEST_CPUS: &str = "1,0";
const DATAPATH_CPU: &str = "1";
const WAIT: Duration = Duration::from_secs(15);
/// testpmd writes its log through a block buffer that it flushes with each statistics
/// print: without a period, "Start automatic packet forwarding" may not reach the log
/// until testpmd exits.
const STATS_PERIOD: &[&str] = &["--stats-period", "1"];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Direction {
    ToGuest,
    FromGuest,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Direction::ToGuest => "to_guest",
            Direction::FromGuest => "from_guest",
        }
    }
}

/// What a datapath says about its frames, read before and after a measurement.
#[derive(Clone, Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "a few per measurement, on the stack of a benchmark"
)]
enum Snapshot {
    Xvio(GuestStats, PortStats),
    Ovs(BTreeMap<String, OvsPortCounters>),
}

enum Engine {
    Xvio(Daemon),
    Ovs(OvsDpdk),
}

/// One datapath bridging a fresh veth and one guest socket. Drops the counter, then the
/// datapath, then the namespaces.
struct Bridge {
    counter: Option<DropCounter>,
    engine: Engine,
    socket: PathBuf,
    peer_mac: [u8; 6],
    topo: Topology,
}

impl Bridge {
    fn start(dp: Datapath) -> Result<Bridge, String> {
        let topo = Topology::new(1);
        let peer_mac = mac_of(&topo.peer, &topo.peer_if);
        let counter = Some(
            topo.peer
                .run(|| DropCounter::attach_from(&topo.peer_if, GUEST_MAC)),
        );
        let (engine, socket) = match dp {
            Datapath::Xvio => {
                let socket = std::env::temp_dir().join(format!("{}.sock", unique_name("xvio-br-")));
                let guest = format!("socket={},mac={GUEST}", socket.display());
                let args = [
                    "--iface",
                    &topo.ifname,
                    "--guest",
                    &guest,
                    "--datapath-cpus",
                    DATAPATH_CPU,
                ];
                let ready = topo.pin_dir().join(maps::EVENT_STATE);
                let daemon = Daemon::start(Some(&topo.host), &args, &ready)?;
                (Engine::Xvio(daemon), socket)
            }
            Datapath::Ovs => {
                let cpus = OvsCpus {
                    lcore_mask: "0x1",
                    pmd_mask: "0x2",
                };
                let ovs = OvsDpdk::start(Some(&topo.host), cpus, 3072)?;
                let socket = ovs.add_vhost_user(OVS_GUEST_PORT)?;
                ovs.add_afxdp(&topo.ifname, "native")?;
                // What xvio is told on its command line: the guest's MAC goes to the guest,
                // the guest's frames go to the wire.
                ovs.set_flows(&[
                    &format!("priority=10,dl_dst={GUEST},actions=output:{OVS_GUEST_PORT}"),
                    &format!(
                        "priority=10,in_port={OVS_GUEST_PORT},actions=output:{}",
                        topo.ifname
                    ),
                ])?;
                (Engine::Ovs(ovs), socket)
            }
        };
        Ok(Bridge {
            counter,
            engine,
            socket,
            peer_mac,
            topo,
        })
    }

    fn datapath(&self) -> Datapath {
        match self.engine {
            Engine::Xvio(_) => Datapath::Xvio,
            Engine::Ovs(_) => Datapath::Ovs,
        }
    }

    /// How the datapath came up: its ports, their modes, the threads that poll them.
    fn health(&self) -> Result<String, String> {
        match &self.engine {
            Engine::Xvio(daemon) => {
                let deadline = Instant::now() + WAIT;
                loop {
                    if let (Some(g), Some(p)) =
                        (guest_stats(0), port_stats(&self.topo.pin_dir(), 0))
                        && g.active == 1
                        && p.active == 1
                    {
                        return Ok(format!(
                            "AF_XDP socket on {} queue 0 ({}{}), guest port active",
                            self.topo.ifname,
                            if p.zero_copy == 1 {
                                "zero-copy"
                            } else {
                                "copy mode"
                            },
                            if p.need_wakeup == 1 {
                                ", need_wakeup"
                            } else {
                                ""
                            },
                        ));
                    }
                    if Instant::now() > deadline {
                        return Err(format!(
                            "xvio published no active port and guest within {WAIT:?}:\n{}",
                            daemon.log()
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            Engine::Ovs(ovs) => {
                let iface = &self.topo.ifname;
                let link = ovs.interface(iface, "link_state")?;
                let ports = ovs.appctl(&["dpif/show"])?;
                let status = ports
                    .lines()
                    .find(|l| l.trim_start().starts_with(&format!("{iface} ")))
                    .and_then(|l| l.split_once('('))
                    .map_or("", |(_, config)| config.trim_end_matches(')'))
                    .to_owned();
                let rxqs = ovs.appctl(&["dpif-netdev/pmd-rxq-show"])?;
                let polled = |port: &str| {
                    rxqs.lines()
                        .any(|l| l.contains(&format!("port: {port} ")) && l.contains("enabled"))
                };
                if link != "up" || !rxqs.contains("core_id 1:") || !polled(iface) {
                    return Err(format!(
                        "OVS-DPDK's afxdp port is not up and polled on core 1: link_state {link}, status {status}\n{rxqs}\n{}",
                        ovs.log_tail(30)
                    ));
                }
                Ok(format!(
                    "{iface} link up ({status}), PMD on core 1 polls {iface}{}",
                    if polled(OVS_GUEST_PORT) {
                        " and vhu0"
                    } else {
                        ""
                    }
                ))
            }
        }
    }

    fn snapshot(&self) -> Result<Snapshot, String> {
        match &self.engine {
            Engine::Xvio(_) => Ok(Snapshot::Xvio(
                guest_stats(0).ok_or("xvio's guest_stats is not pinned")?,
                port_stats(&self.topo.pin_dir(), 0).ok_or("xvio's port_stats is not pinned")?,
            )),
            Engine::Ovs(ovs) => ovs.port_counters().map(Snapshot::Ovs),
        }
    }

    /// Waits until the datapath says the guest is connected and it delivers to it (xvio:
    /// `ready` in guest_stats; OVS: the vhost-user port's link is up), or the guest is gone.
    fn wait_guest(&self, up: bool) -> Result<(), String> {
        let deadline = Instant::now() + WAIT;
        loop {
            let now = match &self.engine {
                Engine::Xvio(_) => guest_stats(0).is_some_and(|g| {
                    if up {
                        g.connected == 1 && g.ready == 1
                    } else {
                        g.connected == 0
                    }
                }),
                Engine::Ovs(ovs) => {
                    let link = ovs.interface(OVS_GUEST_PORT, "link_state")?;
                    (link == "up") == up
                }
            };
            if now {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{}: the guest was not {} within {WAIT:?}",
                    self.datapath().name(),
                    if up { "up" } else { "gone" }
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn counted(&self) -> u64 {
        self.counter.as_ref().map_or(0, DropCounter::count)
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if let Some(counter) = self.counter.take() {
            self.topo.peer.run(move || drop(counter));
        }
        // The engine and the namespaces go with the fields; xvio's socket file may stay.
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// One measurement: the rate and what the run saw.
struct Sample {
    rate: f64,
    health: String,
}

/// Waits until testpmd started forwarding. Non-interactive, it prints "No commandline core
/// given, start packet forwarding" and the forwarding configuration ("Logical Core N …
/// forwards packets on …"), not the interactive "Start automatic packet forwarding".
fn wait_forwarding(pmd: &Testpmd) -> Result<(), String> {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if pmd.output().contains("forwards packets on") {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "testpmd did not start forwarding within {WAIT:?}:\n{}",
        pmd.output()
    ))
}

fn to_guest(bridge: &Bridge, len: usize, window: Duration) -> Result<Sample, String> {
    let guest = format!(",mac={GUEST}");
    let rx = Testpmd::start_with(
        &bridge.socket,
        "rxonly",
        len,
        "02:00:00:00:00:02",
        &guest,
        GUEST_CPUS,
        STATS_PERIOD,
    );
    wait_forwarding(&rx)?;
    bridge.wait_guest(true)?;
    std::thread::sleep(Duration::from_millis(500));
    // Nothing flowed since the last publication (xvio) and the guest is connected (OVS
    // counts a vhost-user port's frames only while it is).
    let before = bridge.snapshot()?;
    let data = frame(GUEST_MAC, bridge.peer_mac, None, ETH_P_EXPERIMENTAL, len, 1);
    let topo = &bridge.topo;
    let (offered, elapsed) = topo.peer.run(|| {
        pin_current_thread(0);
        let generator = Generator::load(&topo.peer_if);
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < window {
            generator.send(&data, GENERATOR_CHUNK);
            sent += u64::from(GENERATOR_CHUNK);
        }
        (sent, start.elapsed())
    });
    std::thread::sleep(Duration::from_millis(300));
    let live = bridge.snapshot()?;
    let totals = rx.stop();
    bridge.wait_guest(false)?;
    // xvio's counters are final once it published the disconnection.
    let after = match live {
        Snapshot::Xvio(..) => bridge.snapshot()?,
        ovs @ Snapshot::Ovs(_) => ovs,
    };
    let secs = elapsed.as_secs_f64();
    Ok(Sample {
        rate: totals.rx as f64 / secs,
        health: format!(
            "offered {:.2} Mpps, guest received {} of {offered} ({:.0}%), datapath took {:.2} Mpps from its socket; {}",
            offered as f64 / secs / 1e6,
            totals.rx,
            100.0 * totals.rx as f64 / offered as f64,
            socket_rx(&topo.ifname, &before, &after) as f64 / secs / 1e6,
            describe(Direction::ToGuest, &topo.ifname, &before, &after)
        ),
    })
}

/// Frames the datapath took from its AF_XDP socket (all of them for the guest: placed in
/// its buffers or dropped because it had none).
fn socket_rx(iface: &str, before: &Snapshot, after: &Snapshot) -> u64 {
    match (before, after) {
        (Snapshot::Xvio(_, p0), Snapshot::Xvio(_, p1)) => p1.rx_packets - p0.rx_packets,
        (Snapshot::Ovs(b), Snapshot::Ovs(a)) => {
            let rx =
                |m: &BTreeMap<String, OvsPortCounters>| m.get(iface).map_or(0, |c| c.rx_packets);
            rx(a).saturating_sub(rx(b))
        }
        _ => 0,
    }
}

fn from_guest(bridge: &Bridge, len: usize, window: Duration) -> Result<Sample, String> {
    let before = bridge.snapshot()?;
    let counted_before = bridge.counted();
    let peer = bridge.peer_mac.map(|b| format!("{b:02x}")).join(":");
    let tx = Testpmd::start_with(
        &bridge.socket,
        "txonly",
        len,
        &peer,
        &format!(",mac={GUEST}"),
        GUEST_CPUS,
        STATS_PERIOD,
    );
    wait_forwarding(&tx)?;
    bridge.wait_guest(true)?;
    std::thread::sleep(Duration::from_secs(1));
    let (c0, t0) = (bridge.counted(), Instant::now());
    std::thread::sleep(window);
    let (c1, t1) = (bridge.counted(), Instant::now());
    let totals = tx.stop();
    bridge.wait_guest(false)?;
    let after = bridge.snapshot()?;
    let counted = bridge.counted() - counted_before;
    Ok(Sample {
        rate: (c1 - c0) as f64 / (t1 - t0).as_secs_f64(),
        health: format!(
            "guest sent {}, peer counted {counted} ({:.0}%); {}",
            totals.tx,
            100.0 * counted as f64 / totals.tx.max(1) as f64,
            describe(Direction::FromGuest, &bridge.topo.ifname, &before, &after)
        ),
    })
}

/// Where the frames of one measurement went, by the datapath's own counters.
fn describe(dir: Direction, iface: &str, before: &Snapshot, after: &Snapshot) -> String {
    match (before, after) {
        (Snapshot::Xvio(g0, p0), Snapshot::Xvio(g1, p1)) => match dir {
            Direction::ToGuest => format!(
                "xvio: socket rx {}, kernel xsk drops {} (fill ring empty) + {} (rx ring full), to guest {}, dropped: guest full {}, reset {}, no guest {}",
                p1.rx_packets - p0.rx_packets,
                p1.fill_ring_empty - p0.fill_ring_empty,
                p1.rx_ring_full - p0.rx_ring_full,
                g1.to_guest_packets - g0.to_guest_packets,
                g1.to_guest_dropped_full - g0.to_guest_dropped_full,
                g1.to_guest_dropped_reset - g0.to_guest_dropped_reset,
                p1.rx_no_guest - p0.rx_no_guest,
            ),
            Direction::FromGuest => format!(
                "xvio: from guest {}, dropped: tx full {}, no route {}; socket tx {}, tx ring full {}, no frame {}",
                g1.from_guest_packets - g0.from_guest_packets,
                g1.from_guest_dropped_full - g0.from_guest_dropped_full,
                g1.from_guest_no_route - g0.from_guest_no_route,
                p1.tx_packets - p0.tx_packets,
                p1.tx_ring_full - p0.tx_ring_full,
                p1.tx_no_frame - p0.tx_no_frame,
            ),
        },
        (Snapshot::Ovs(b), Snapshot::Ovs(a)) => {
            // OVS 3.1 with DPDK 22.11 reports no counters for a dpdkvhostuser port
            // ("?" in ovs-ofctl dump-ports): the afxdp port's tell what OVS moved.
            let (x, y) = (
                b.get(iface).copied().unwrap_or_default(),
                a.get(iface).copied().unwrap_or_default(),
            );
            match dir {
                Direction::ToGuest => format!(
                    "OVS: afxdp rx {}",
                    y.rx_packets.saturating_sub(x.rx_packets)
                ),
                Direction::FromGuest => format!(
                    "OVS: afxdp tx {}",
                    y.tx_packets.saturating_sub(x.tx_packets)
                ),
            }
        }
        _ => String::new(),
    }
}

struct Settings {
    datapaths: Vec<Datapath>,
    reps: usize,
    window: Duration,
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
        reps: value("--reps").map_or(5, |r| r.max(1) as usize),
        window: Duration::from_secs(value("--seconds").unwrap_or(3).max(1)),
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
            println!("run {rep}/{} {}: {}", s.reps, dp.name(), bridge.health()?);
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
    // Everything a run starts is dropped (stopped, removed) before this returns.
    if let Err(e) = run_all(&s, &mut results) {
        eprintln!("bench bridge FAILED: {e}");
        std::process::exit(1);
    }
    print_table(&s, &results);
}
