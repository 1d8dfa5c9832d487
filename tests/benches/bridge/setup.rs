//! One datapath bridging a fresh veth and one guest socket: xvio (`xvio run --iface IF
//! --guest …`) or a private OVS-DPDK (an `afxdp` port on IF, a `dpdkvhostuser` port, flows
//! equal to xvio's steering), the peer's counting XDP program, and the datapath's own
//! counters and health.

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
/// Frames per BPF_PROG_TEST_RUN call of the generator.
pub(crate) const GENERATOR_CHUNK: u32 = 100_000;
/// testpmd's lcores: the main lcore (idle) on CPU 1, the forwarding lcore on CPU 0.
pub(crate) const GUEST_CPUS: &str = "1,0";
pub(crate) const DATAPATH_CPU: &str = "1";
pub(crate) const WAIT: Duration = Duration::from_secs(15);
/// testpmd writes its log through a block buffer that it flushes with each statistics
/// print: without a period, "Start automatic packet forwarding" may not reach the log
/// until testpmd exits.
pub(crate) const STATS_PERIOD: &[&str] = &["--stats-period", "1"];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Datapath {
    Xvio,
    Ovs,
}

impl Datapath {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Datapath::Xvio => "xvio",
            Datapath::Ovs => "OVS-DPDK",
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
}

enum Engine {
    Xvio(Daemon),
    Ovs(OvsDpdk),
}

/// One datapath bridging a fresh veth and one guest socket. Drops the counter, then the
/// datapath, then the namespaces.
pub(crate) struct Bridge {
    counter: Option<DropCounter>,
    engine: Engine,
    pub(crate) socket: PathBuf,
    pub(crate) peer_mac: [u8; 6],
    pub(crate) topo: Topology,
}

impl Bridge {
    pub(crate) fn start(dp: Datapath) -> Result<Bridge, String> {
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

    pub(crate) fn datapath(&self) -> Datapath {
        match self.engine {
            Engine::Xvio(_) => Datapath::Xvio,
            Engine::Ovs(_) => Datapath::Ovs,
        }
    }

    /// How the datapath came up: its ports, their modes, the threads that poll them.
    pub(crate) fn health(&self) -> Result<String, String> {
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

    pub(crate) fn snapshot(&self) -> Result<Snapshot, String> {
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

    /// The datapath's process: xvio, or ovs-vswitchd.
    pub(crate) fn pid(&self) -> Option<i32> {
        match &self.engine {
            Engine::Xvio(daemon) => daemon.pid(),
            Engine::Ovs(ovs) => ovs.vswitchd_pid(),
        }
    }

    /// The private OVS-DPDK, when that is the datapath.
    pub(crate) fn ovs(&self) -> Option<&OvsDpdk> {
        match &self.engine {
            Engine::Ovs(ovs) => Some(ovs),
            Engine::Xvio(_) => None,
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
