//! One datapath bridging a fresh veth and one guest socket: xvio (`xvio run --iface IF
//! --guest …`, with CPU copies or with `--dma sw`), a private OVS-DPDK (an `afxdp` port on IF,
//! a `dpdkvhostuser` port, flows equal to xvio's steering) or testpmd (`net_af_xdp` on IF,
//! `net_vhost` on the guest's socket, io forwarding); the peer's counting XDP program; and the
//! datapath's own counters and health.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use xvio_common::{GuestStats, PortStats, maps};
use xvio_tests::{
    bench::{dpdk_runtime_dirs, guest_stats, port_stats, thread_sleeps},
    daemon::Daemon,
    dpdk::{Testpmd, TestpmdTotals},
    dpdk_fwd::{AF_XDP_PORT, AfXdpVhostFwd, EthStats, FwdConfig, FwdCycles, VHOST_PORT},
    netns::mac_of,
    ovs::{OvsCpus, OvsDpdk, OvsPortCounters},
    topology::Topology,
    unique_name,
    xdp::DropCounter,
};

pub(crate) const GUEST: &str = "02:00:00:00:07:01";
pub(crate) const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x07, 0x01];
pub(crate) const SIZES: [usize; 2] = [64, 1500];
/// OVS's name for the guest's port.
pub(crate) const OVS_GUEST_PORT: &str = "vhu0";
/// Frames per call of the generator (`xvio_tests::xsk::Generator::send`).
pub(crate) const GENERATOR_CHUNK: u32 = 100_000;
/// testpmd's lcores: the main lcore (idle) on CPU 1, the forwarding lcore on CPU 0.
pub(crate) const GUEST_CPUS: &str = "1,0";
pub(crate) const DATAPATH_CPU: &str = "1";
/// The to_guest guest (`xvio_tests::sink::RxSink`): on CPU 0 with the generator, looking at
/// its used ring every 100 µs (at 2 Mpps, 200 frames of its 1024 buffers).
pub(crate) const SINK_CPU: usize = 0;
pub(crate) const SINK_PERIOD: Duration = Duration::from_micros(100);
/// xvio's `--dma` channel and threshold in the offload runs: a software DMA engine on CPU 0
/// (the other core), taking every copy of 1024 bytes or more (1500 B frames, not 64 B ones).
pub(crate) const DMA_ARGS: [&str; 6] =
    ["--dma", "sw:0", "--dma", "sw:0", "--copy-threshold", "1024"];
pub(crate) const WAIT: Duration = Duration::from_secs(15);
/// testpmd writes its log through a block buffer that it flushes with each statistics
/// print: without a period, "Start automatic packet forwarding" may not reach the log
/// until testpmd exits.
pub(crate) const STATS_PERIOD: &[&str] = &["--stats-period", "1"];

/// What carries the frames. `Bare` is no bridge: an AF_XDP socket alone, receiving and
/// recycling or transmitting (see `bare`), the ceiling of each direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Datapath {
    Xvio,
    XvioDma,
    /// xvio polling 20 ms after its last frame before it sleeps (`--busy-poll 20000`): the
    /// cost phase only, for what the sleeping worker costs in latency.
    XvioPoll,
    Ovs,
    Testpmd,
    Bare,
}

impl Datapath {
    pub(crate) const ALL: [Datapath; 6] = [
        Datapath::Xvio,
        Datapath::XvioDma,
        Datapath::XvioPoll,
        Datapath::Ovs,
        Datapath::Testpmd,
        Datapath::Bare,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Datapath::Xvio => "xvio",
            Datapath::XvioDma => "xvio --dma sw",
            Datapath::XvioPoll => "xvio --busy-poll 20000",
            Datapath::Ovs => "OVS-DPDK",
            Datapath::Testpmd => "testpmd",
            Datapath::Bare => "bare AF_XDP",
        }
    }

    /// Its name for `--only`.
    pub(crate) fn option(self) -> &'static str {
        match self {
            Datapath::Xvio => "xvio",
            Datapath::XvioDma => "dma",
            Datapath::XvioPoll => "poll",
            Datapath::Ovs => "ovs",
            Datapath::Testpmd => "testpmd",
            Datapath::Bare => "bare",
        }
    }

    /// Whether a rate of 0 means the comparison is void (an anchor or the ceiling), not a
    /// result.
    pub(crate) fn is_reference(self) -> bool {
        matches!(self, Datapath::Ovs | Datapath::Testpmd | Datapath::Bare)
    }

    /// The frame sizes it is measured at: the DMA runs only where the channel takes the copies.
    pub(crate) fn sizes(self) -> &'static [usize] {
        match self {
            Datapath::XvioDma => &SIZES[1..],
            _ => &SIZES,
        }
    }
}

/// What a datapath says about its frames, read before and after a measurement.
#[derive(Clone, Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "a few per measurement, on the stack of a benchmark"
)]
pub(crate) enum Snapshot {
    Xvio {
        guest: GuestStats,
        port: PortStats,
        /// How often the guest's vhost-user event threads woke (each wake-up handles one or
        /// more kicks); the count of a thread is gone once its connection ended.
        event_wakeups: u64,
    },
    Ovs(BTreeMap<String, OvsPortCounters>),
    Testpmd {
        af_xdp: EthStats,
        vhost: EthStats,
    },
}

enum Engine {
    Xvio(Daemon),
    Ovs(OvsDpdk),
    /// `None` only while it is restarted.
    Testpmd(Option<AfXdpVhostFwd>),
}

/// One datapath bridging a fresh veth and one guest socket. Drops the counter, then the
/// datapath, then the namespaces.
pub(crate) struct Bridge {
    dp: Datapath,
    counter: Option<DropCounter>,
    engine: Engine,
    pub(crate) socket: PathBuf,
    pub(crate) peer_mac: [u8; 6],
    pub(crate) topo: Topology,
}

impl Bridge {
    /// `testpmd_busy_budget`: the `busy_budget` of testpmd's `net_af_xdp` port.
    pub(crate) fn start(dp: Datapath, testpmd_busy_budget: u32) -> Result<Bridge, String> {
        let topo = Topology::new(1);
        let peer_mac = mac_of(&topo.peer, &topo.peer_if);
        let counter = Some(
            topo.peer
                .run(|| DropCounter::attach_from(&topo.peer_if, GUEST_MAC)),
        );
        let (engine, socket) = match dp {
            Datapath::Xvio | Datapath::XvioDma | Datapath::XvioPoll => {
                let socket = temp_socket();
                let guest = format!("socket={},mac={GUEST}", socket.display());
                let mut args = vec![
                    "--iface",
                    &topo.ifname,
                    "--guest",
                    &guest,
                    "--datapath-cpus",
                    DATAPATH_CPU,
                ];
                if dp == Datapath::XvioDma {
                    args.extend(DMA_ARGS);
                }
                if dp == Datapath::XvioPoll {
                    args.extend(["--busy-poll", "20000"]);
                }
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
            Datapath::Testpmd => {
                let config = FwdConfig {
                    iface: topo.ifname.clone(),
                    socket: temp_socket(),
                    main_cpu: 0,
                    forward_cpu: 1,
                    busy_budget: testpmd_busy_budget,
                };
                let fwd = AfXdpVhostFwd::start(&topo.host, config)?;
                let socket = fwd.config().socket.clone();
                (Engine::Testpmd(Some(fwd)), socket)
            }
            Datapath::Bare => {
                return Err("bare AF_XDP is measured without a bridge (bare.rs)".to_owned());
            }
        };
        Ok(Bridge {
            dp,
            counter,
            engine,
            socket,
            peer_mac,
            topo,
        })
    }

    pub(crate) fn datapath(&self) -> Datapath {
        self.dp
    }

    /// testpmd, when that is the datapath.
    fn testpmd(&self) -> Result<Option<&AfXdpVhostFwd>, String> {
        match &self.engine {
            Engine::Testpmd(Some(fwd)) => Ok(Some(fwd)),
            Engine::Testpmd(None) => Err("testpmd did not come back after a restart".to_owned()),
            _ => Ok(None),
        }
    }

    /// Stops testpmd, reads the cycles per frame it printed, and starts it again (on the
    /// same interface and socket): `--record-core-cycles` prints only at stop. `None` for
    /// another datapath.
    pub(crate) fn restart_testpmd(&mut self) -> Result<Option<FwdCycles>, String> {
        let Engine::Testpmd(slot) = &mut self.engine else {
            return Ok(None);
        };
        let fwd = slot
            .take()
            .ok_or("testpmd did not come back after a restart")?;
        let config = fwd.config().clone();
        let (cycles, out) = fwd.stop();
        *slot = Some(AfXdpVhostFwd::start(&self.topo.host, config)?);
        cycles.map(Some).ok_or_else(|| {
            let tail: Vec<&str> = out.lines().rev().take(30).collect();
            format!(
                "testpmd printed no cycles per frame at stop:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })
    }

    /// How the datapath came up: its ports, their modes, the threads that poll them.
    pub(crate) fn health(&self) -> Result<String, String> {
        match &self.engine {
            Engine::Testpmd(_) => self.testpmd_health(),
            Engine::Xvio(daemon) => {
                let deadline = Instant::now() + WAIT;
                loop {
                    if let (Some(g), Some(p)) =
                        (guest_stats(0), port_stats(&self.topo.pin_dir(), 0))
                        && g.active == 1
                        && p.active == 1
                    {
                        let dma = dma_channel(&daemon.log());
                        if self.dp == Datapath::XvioDma && dma.is_none() {
                            return Err(format!(
                                "xvio logged no started DMA channel:\n{}",
                                daemon.log()
                            ));
                        }
                        return Ok(format!(
                            "AF_XDP socket on {} queue 0 ({}{}), guest port active{}",
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
                            dma.map_or(String::new(), |l| format!("; {l}")),
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

    /// testpmd's health: its forwarding lcore on CPU 1 polling both ports, the af_xdp port's
    /// link up, its XDP program attached natively.
    fn testpmd_health(&self) -> Result<String, String> {
        let fwd = self.testpmd()?.ok_or("not testpmd")?;
        let iface = &self.topo.ifname;
        let forwarding = fwd.forwarding().unwrap_or_default();
        let xdp = xdp_attached(&self.topo, iface);
        if !forwarding.contains("Logical Core 1 ")
            || !forwarding.contains("on 2 streams")
            || !fwd.link_up(AF_XDP_PORT)?
            || xdp.is_none()
        {
            return Err(format!(
                "testpmd is not forwarding both ports on lcore 1 with its af_xdp port up: {forwarding:?}, af_xdp link up {}, XDP on {iface}: {}",
                fwd.link_up(AF_XDP_PORT)?,
                xdp.as_deref().unwrap_or("none")
            ));
        }
        Ok(format!(
            "net_af_xdp on {iface} queue 0 (link up, {}, busy_budget {}), net_vhost on the guest's socket; {forwarding}",
            xdp.unwrap_or_default(),
            fwd.config().busy_budget
        ))
    }

    pub(crate) fn snapshot(&self) -> Result<Snapshot, String> {
        if let Some(fwd) = self.testpmd()? {
            return Ok(Snapshot::Testpmd {
                af_xdp: fwd.stats(AF_XDP_PORT)?,
                vhost: fwd.stats(VHOST_PORT)?,
            });
        }
        match &self.engine {
            Engine::Xvio(daemon) => Ok(Snapshot::Xvio {
                guest: guest_stats(0).ok_or("xvio's guest_stats is not pinned")?,
                port: port_stats(&self.topo.pin_dir(), 0)
                    .ok_or("xvio's port_stats is not pinned")?,
                event_wakeups: daemon.pid().map_or(0, |pid| {
                    thread_sleeps(pid)
                        .iter()
                        .filter(|(name, _)| name.starts_with("vring_worker"))
                        .map(|(_, n)| n)
                        .sum()
                }),
            }),
            Engine::Ovs(ovs) => ovs.port_counters().map(Snapshot::Ovs),
            Engine::Testpmd(_) => Err("testpmd's counters went with it".to_owned()),
        }
    }

    /// Waits until the datapath says the guest is connected and it delivers to it (xvio:
    /// `ready` in guest_stats; OVS: the vhost-user port's link is up), or the guest is gone.
    pub(crate) fn wait_guest(&self, up: bool) -> Result<(), String> {
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
                Engine::Testpmd(_) => {
                    let fwd = self.testpmd()?.ok_or("not testpmd")?;
                    fwd.link_up(VHOST_PORT)? == up
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

    /// The counters once the guest disconnected: xvio's after it published the
    /// disconnection (final for the measurement).
    pub(crate) fn final_snapshot(&self) -> Result<Snapshot, String> {
        self.wait_guest(false)?;
        self.snapshot()
    }

    /// The datapath's process: xvio, ovs-vswitchd or testpmd.
    pub(crate) fn pid(&self) -> Option<i32> {
        match &self.engine {
            Engine::Xvio(daemon) => daemon.pid(),
            Engine::Ovs(ovs) => ovs.vswitchd_pid(),
            Engine::Testpmd(fwd) => fwd.as_ref().and_then(AfXdpVhostFwd::pid),
        }
    }

    /// The private OVS-DPDK, when that is the datapath.
    pub(crate) fn ovs(&self) -> Option<&OvsDpdk> {
        match &self.engine {
            Engine::Ovs(ovs) => Some(ovs),
            Engine::Xvio(_) | Engine::Testpmd(_) => None,
        }
    }

    /// Starts a testpmd guest in forward `mode` (frames of `len` bytes to `peer`) on the
    /// socket and waits until it forwards and the datapath serves it.
    pub(crate) fn start_guest(&self, mode: &str, len: usize, peer: &str) -> Result<Guest, String> {
        let existing = dpdk_runtime_dirs();
        let pmd = Testpmd::start_with(
            &self.socket,
            mode,
            len,
            peer,
            &format!(",mac={GUEST}"),
            GUEST_CPUS,
            STATS_PERIOD,
        );
        let started = wait_forwarding(&pmd);
        // Ours: new since we started it, and named by this process (see `unique_name`).
        let ours = format!("xvio-pmd-{:x}", std::process::id() % 0xfffff);
        let guest = Guest {
            pmd: Some(pmd),
            runtime_dirs: dpdk_runtime_dirs()
                .difference(&existing)
                .filter(|d| {
                    d.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&ours))
                })
                .cloned()
                .collect(),
        };
        started?;
        self.wait_guest(true)?;
        Ok(guest)
    }

    /// Detaches the peer's counting program, which drops what it counts (the guest's
    /// frames): pings need the answers to reach the peer's stack.
    pub(crate) fn detach_counter(&mut self) {
        if let Some(counter) = self.counter.take() {
            self.topo.peer.run(move || drop(counter));
        }
    }

    pub(crate) fn counted(&self) -> u64 {
        self.counter.as_ref().map_or(0, DropCounter::count)
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.detach_counter();
        // The engine and the namespaces go with the fields; xvio's socket file may stay.
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn temp_socket() -> PathBuf {
    std::env::temp_dir().join(format!("{}.sock", unique_name("xvio-br-")))
}

/// "native XDP prog id 42" (or generic) when a program is attached to `iface` in the host
/// namespace, from `ip -d link show`.
fn xdp_attached(topo: &Topology, iface: &str) -> Option<String> {
    let out = topo
        .host
        .command("ip")
        .args(["-d", "link", "show", "dev", iface])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let words: Vec<&str> = text.split_whitespace().collect();
    words.windows(3).find_map(|w| match w {
        ["prog/xdp", "id", id] => Some(format!("native XDP prog id {id}")),
        ["prog/xdpgeneric", "id", id] => Some(format!("generic XDP prog id {id}")),
        _ => None,
    })
}

/// xvio's "DMA channel started" log line, shortened: "DMA channel sw0@cpu0, threshold 1024".
fn dma_channel(log: &str) -> Option<String> {
    let line = log.lines().find(|l| l.contains("DMA channel started"))?;
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .map(|v| v.trim_matches('"').to_owned())
    };
    Some(format!(
        "DMA channel {}, threshold {}",
        field("channel=").unwrap_or_else(|| "?".to_owned()),
        field("threshold=").unwrap_or_else(|| "?".to_owned())
    ))
}

/// A testpmd guest, and the DPDK runtime folders it made, removed once it stopped.
pub(crate) struct Guest {
    pmd: Option<Testpmd>,
    runtime_dirs: Vec<PathBuf>,
}

impl Guest {
    /// Stops it (SIGINT) and returns the totals it printed.
    pub(crate) fn stop(mut self) -> TestpmdTotals {
        self.pmd.take().map(Testpmd::stop).unwrap_or_default()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        drop(self.pmd.take());
        for dir in &self.runtime_dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Waits until testpmd started forwarding. Non-interactive, it prints "No commandline core
/// given, start packet forwarding" and the forwarding configuration ("Logical Core N …
/// forwards packets on …"), not the interactive "Start automatic packet forwarding".
pub(crate) fn wait_forwarding(pmd: &Testpmd) -> Result<(), String> {
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
