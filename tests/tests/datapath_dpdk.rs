//! Guests on the wire, with DPDK virtio-user frontends (testpmd) behind `xvio run --iface
//! --guest`, and the other end of the attached veth in a peer namespace:
//! - txonly guest → a counting XDP program on the peer: every frame testpmd sent is counted
//!   there or in a named drop counter;
//! - a generator on the peer (an AF_XDP socket sending) → an rxonly guest: the same, the other way;
//! - the peer pings an icmpecho guest by IP, resolving it by ARP (broadcast from the wire);
//! - SIGKILL of the daemon under load: the host's own pings through the interface go on.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use aya::maps::{Array, Map, MapData};
use xvio_common::{GuestStats, PortStats, maps};
use xvio_tests::{
    daemon::wait_guests_ready,
    dpdk::{Testpmd, packets_by_queue},
    frames::{ETH_P_EXPERIMENTAL, frame},
    memfd_mapped,
    netns::mac_of,
    privileged,
    sink::RxSink,
    topology::Topology,
    unique_name,
    xdp::DropCounter,
    xsk::Generator,
};

/// testpmd busy-polls: one test at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
const GUEST: &str = "02:00:00:00:07:01";
const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x07, 0x01];

fn socket() -> PathBuf {
    std::env::temp_dir().join(format!("{}.sock", unique_name("xvio-dd-")))
}

fn guest_map() -> PathBuf {
    Path::new(xvio_common::PIN_ROOT).join("guests/guest_stats")
}

/// The guest's counters as the daemon published them last (after waiting for a publication).
fn guest_stats() -> GuestStats {
    std::thread::sleep(Duration::from_millis(1500));
    let map = Map::Array(MapData::from_pin(guest_map()).unwrap());
    let array: Array<MapData, GuestStats> = Array::try_from(map).unwrap();
    array.get(&0, 0).unwrap()
}

fn port_stats(topo: &Topology) -> PortStats {
    let map = Map::Array(MapData::from_pin(topo.pin_dir().join(maps::PORT_STATS)).unwrap());
    let array: Array<MapData, PortStats> = Array::try_from(map).unwrap();
    array.get(&0, 0).unwrap()
}

/// A counter of `ifname` in `ns` (`ip -s link`), e.g. "tx_dropped".
fn link_stat(ns: &xvio_tests::netns::Netns, ifname: &str, name: &str) -> u64 {
    let out = ns
        .command("cat")
        .args([&format!("/sys/class/net/{ifname}/statistics/{name}")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// xvio on the host end with one guest served at a fresh socket. A `guest_stats` pin left
/// by an earlier daemon that was killed is removed first: its `ready` is not this guest's.
fn daemon_with_guest(topo: &Topology, socket: &Path, extra: &[&str]) -> xvio_tests::daemon::Daemon {
    daemon_with_guest_spec(
        topo,
        &format!("socket={},mac={GUEST}", socket.display()),
        extra,
    )
}

/// As [`daemon_with_guest`], the guest given as `--guest` takes it.
fn daemon_with_guest_spec(
    topo: &Topology,
    guest: &str,
    extra: &[&str],
) -> xvio_tests::daemon::Daemon {
    let _ = std::fs::remove_file(guest_map());
    let mut args = vec!["--guest", guest];
    args.extend_from_slice(extra);
    topo.start(&args)
}

/// xvio (with `extra` options) with a guest of `queues` queue pairs whose testpmd txonly
/// sends `len`-byte frames to the peer on every TX queue, up and sending.
fn txonly_guest_to_peer(
    topo: &Topology,
    socket: &Path,
    extra: &[&str],
    len: usize,
    queues: u16,
) -> (xvio_tests::daemon::Daemon, Testpmd) {
    let peer = mac_of(&topo.peer, &topo.peer_if);
    let peer = peer.map(|b| format!("{b:02x}")).join(":");
    let guest = format!("socket={},mac={GUEST},queues={queues}", socket.display());
    let daemon = daemon_with_guest_spec(topo, &guest, extra);
    let ring_args = [format!("--rxq={queues}"), format!("--txq={queues}")];
    let tx = Testpmd::start_with(
        socket,
        "txonly",
        len,
        &peer,
        &format!(",mac={GUEST},queues={queues}"),
        "0,1",
        &[ring_args[0].as_str(), ring_args[1].as_str()],
    );
    wait_guests_ready(&guest_map(), 1).unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    // Measuring windows start once testpmd forwards (it may still be starting up when xvio
    // sees the guest ready, on a loaded machine for seconds).
    assert!(
        tx.wait_forwarding(),
        "testpmd txonly forwards:\n{}",
        tx.output()
    );
    (daemon, tx)
}

#[test]
fn frames_a_guest_sends_to_the_wire_are_each_counted_at_the_peer_or_dropped_by_name() {
    if !privileged(
        "frames_a_guest_sends_to_the_wire_are_each_counted_at_the_peer_or_dropped_by_name",
    ) {
        return;
    }
    let run = txonly_identity(&[], 64, 1);
    assert_eq!(run.g.copy_dma, 0, "no channel: the CPU copies");
}

#[test]
fn frames_a_guest_sends_through_a_dma_channel_are_each_counted_at_the_peer_or_dropped_by_name() {
    if !privileged(
        "frames_a_guest_sends_through_a_dma_channel_are_each_counted_at_the_peer_or_dropped_by_name",
    ) {
        return;
    }
    // Two software channels: the first goes to the RX queue, the second to the TX queue.
    let g = txonly_identity(
        &["--dma", "sw", "--dma", "sw", "--copy-threshold", "256"],
        512,
        1,
    )
    .g;
    assert!(
        g.copy_dma >= g.from_guest_packets,
        "every frame to the wire was copied by the TX queue's channel: {g:?}"
    );
}

#[test]
fn a_two_queue_guest_on_two_workers_sends_on_both_queues_each_frame_counted() {
    if !privileged("a_two_queue_guest_on_two_workers_sends_on_both_queues_each_frame_counted") {
        return;
    }
    // Each TX queue has its worker; both send on the interface's one AF_XDP socket.
    let run = txonly_identity(&["--datapath-cpus", "0,1"], 64, 2);
    for q in 0..2 {
        let n: u64 = run
            .by_queue
            .iter()
            .filter(|(queue, _)| *queue == q)
            .map(|(_, n)| n)
            .sum();
        assert!(n > 10_000, "testpmd sent on queue {q}: {}", run.report);
    }
    for w in ["xvio-dp0", "xvio-dp1"] {
        let busy = run.worker_ticks.get(w).copied().unwrap_or(0);
        assert!(busy > 10, "worker {w} polled its TX queue: {}", run.report);
    }
}

/// CPU ticks (user + system) of each of the daemon's datapath worker threads, by name.
fn worker_cpu_ticks(
    daemon: &xvio_tests::daemon::Daemon,
) -> std::collections::BTreeMap<String, u64> {
    let mut ticks = std::collections::BTreeMap::new();
    let Some(pid) = daemon.pid() else {
        return ticks;
    };
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return ticks;
    };
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let comm = comm.trim();
        if !comm.starts_with("xvio-dp") {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the ")" of the command: utime and stime are the 12th and 13th.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let n = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        ticks.insert(comm.to_owned(), n(11) + n(12));
    }
    ticks
}

/// What [`txonly_identity`] saw.
struct TxRun {
    g: GuestStats,
    /// Frames testpmd sent, by TX queue.
    by_queue: Vec<(u32, u64)>,
    /// CPU ticks each datapath worker used while the guest sent.
    worker_ticks: std::collections::BTreeMap<String, u64>,
    report: String,
}

/// A txonly guest of `queues` queue pairs sending `len`-byte frames through xvio (with
/// `extra` options) to a counting peer for 3 s: every frame testpmd sent was taken by xvio
/// (but a ring per queue), every frame xvio forwarded went into the tx ring, and every frame
/// in the tx ring reached the peer or the veth dropped it.
fn txonly_identity(extra: &[&str], len: usize, queues: u16) -> TxRun {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let topo = Topology::new(1);
    let counter = topo
        .peer
        .run(|| DropCounter::attach_from(&topo.peer_if, GUEST_MAC));
    let (daemon, tx) = txonly_guest_to_peer(&topo, &socket(), extra, len, queues);
    let ticks0 = worker_cpu_ticks(&daemon);
    std::thread::sleep(Duration::from_secs(3));
    let mut worker_ticks = worker_cpu_ticks(&daemon);
    for (w, t) in &mut worker_ticks {
        *t -= ticks0.get(w).copied().unwrap_or(0).min(*t);
    }
    let (sent, out) = tx.stop_keep_output();
    let by_queue = packets_by_queue(&out, "TX");
    let g = guest_stats();
    let p = port_stats(&topo);
    let counted = counter.count();
    let veth_dropped = link_stat(&topo.host, &topo.ifname, "tx_dropped");
    let report = format!(
        "testpmd sent {} by queue {by_queue:?}, workers' CPU ticks {worker_ticks:?}, xvio {g:?}, port {p:?}, peer counted {counted}, veth tx_dropped {veth_dropped}\n{out}",
        sent.tx
    );
    eprintln!("{}", report.lines().next().unwrap_or_default());
    let took = g.from_guest_packets
        + g.from_guest_no_route
        + g.from_guest_oversize
        + g.from_guest_dropped_full
        + g.from_guest_dropped_reset
        + g.malformed_chains;
    assert!(g.from_guest_packets > 10_000, "frames flowed: {report}");
    assert!(
        took <= sent.tx && sent.tx - took <= 1024 * u64::from(queues),
        "xvio took what testpmd sent (but a ring per queue): {report}"
    );
    assert_eq!(
        g.from_guest_packets, p.tx_packets,
        "each frame xvio forwarded (accepted by the port) went into the tx ring: {report}"
    );
    assert!(
        g.from_guest_dropped_full <= p.tx_ring_full + p.tx_no_frame,
        "each frame the port refused is counted there too: {report}"
    );
    assert_eq!(
        p.tx_packets,
        counted + veth_dropped,
        "each frame in the tx ring reached the peer or the veth dropped it: {report}"
    );
    topo.peer.run(move || drop(counter));
    let (status, log) = daemon.terminate();
    assert!(status.success(), "{log}");
    TxRun {
        g,
        by_queue,
        worker_ticks,
        report,
    }
}

#[test]
fn frames_from_the_wire_to_a_guest_are_each_delivered_or_dropped_by_name() {
    if !privileged("frames_from_the_wire_to_a_guest_are_each_delivered_or_dropped_by_name") {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let topo = Topology::new(1);
    let socket = socket();
    let daemon = daemon_with_guest(&topo, &socket, &["--datapath-cpus", "1"]);
    let rx = Testpmd::start(
        &socket,
        "rxonly",
        64,
        "02:00:00:00:00:02",
        &format!(",mac={GUEST}"),
        "1,0",
    );
    wait_guests_ready(&guest_map(), 1).unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    let src = mac_of(&topo.peer, &topo.peer_if);
    let data = frame(GUEST_MAC, src, None, ETH_P_EXPERIMENTAL, 64, 1);
    // testpmd posts its RX buffers a while after it says it forwards: probe until frames
    // get through, then count from there.
    let generator = topo.peer.run(|| Generator::load(&topo.peer_if));
    let mut probes = 0;
    while guest_stats().to_guest_packets == 0 {
        probes += 1;
        assert!(probes < 10, "no frame reached the guest:\n{}", daemon.log());
        topo.peer.run(|| generator.send(&data, 16));
    }
    let (g0, p0) = (guest_stats(), port_stats(&topo));
    const FRAMES: u32 = 200_000;
    topo.peer.run(|| generator.send(&data, FRAMES));
    std::thread::sleep(Duration::from_millis(500));
    let (received, out) = rx.stop_keep_output();
    let (g1, p1) = (guest_stats(), port_stats(&topo));
    // The counters of the measured burst; testpmd's total includes the probes.
    let g = GuestStats {
        to_guest_packets: g1.to_guest_packets - g0.to_guest_packets,
        to_guest_dropped_full: g1.to_guest_dropped_full - g0.to_guest_dropped_full,
        to_guest_dropped_small: g1.to_guest_dropped_small - g0.to_guest_dropped_small,
        to_guest_dropped_reset: g1.to_guest_dropped_reset - g0.to_guest_dropped_reset,
        ..g1
    };
    let p = PortStats {
        rx_packets: p1.rx_packets - p0.rx_packets,
        rx_no_guest: p1.rx_no_guest - p0.rx_no_guest,
        ..p1
    };
    let received = xvio_tests::dpdk::TestpmdTotals {
        rx: received.rx - g0.to_guest_packets,
        ..received
    };
    let report = format!("testpmd received {received:?}, xvio {g:?}, port {p:?}");
    eprintln!("{report}");
    assert!(
        g.to_guest_packets > 1000,
        "frames flowed: {report}\n{}\n--- testpmd ---\n{out}",
        daemon.log()
    );
    assert_eq!(
        p.rx_packets,
        g.to_guest_packets
            + g.to_guest_dropped_full
            + g.to_guest_dropped_small
            + g.to_guest_dropped_reset
            + p.rx_no_guest,
        "each frame the socket received was delivered or dropped by name: {report}"
    );
    assert!(
        received.rx <= g.to_guest_packets && g.to_guest_packets - received.rx <= 1024,
        "testpmd got what xvio delivered (but a ring): {report}"
    );
    // The worker runs on its CPU, with the guest's threads (which pass kicks on to it); the
    // daemon's other threads (the control loop, the broadcast tap) keep off it.
    let pid = daemon.pid().expect("the daemon's pid");
    let on_cpu1 = threads_allowed_on(pid, 1);
    // The daemon started with this process's CPUs: something is left beside CPU 1.
    let mine = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).unwrap();
    let others = (0..nix::sched::CpuSet::count())
        .filter(|&c| c != 1 && mine.is_set(c).unwrap_or(false))
        .count();
    if others > 0 {
        assert!(on_cpu1.iter().any(|t| t == "xvio-dp0"), "{on_cpu1:?}");
        assert!(
            !on_cpu1
                .iter()
                .any(|t| t == "xvio" || t.starts_with("xvio-tap")),
            "threads allowed on CPU 1: {on_cpu1:?}"
        );
    }
    let (status, log) = daemon.terminate();
    assert!(status.success(), "{log}");
}

/// The bench's to_guest guest (`xvio_tests::sink::RxSink`, a virtio-net driver in the bench
/// process) counts exactly the frames xvio delivers to it, 1500-byte ones each in one buffer
/// (MRG_RXBUF negotiated), with no kick: xvio asks for none on RX.
#[test]
fn the_benchmarks_sink_counts_every_frame_xvio_delivers() {
    if !privileged("the_benchmarks_sink_counts_every_frame_xvio_delivers") {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let topo = Topology::new(1);
    let socket = socket();
    let daemon = daemon_with_guest(&topo, &socket, &["--datapath-cpus", "1"]);
    let sink = RxSink::start(&socket, 0, Duration::from_micros(100))
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    wait_guests_ready(&guest_map(), 1).unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    let src = mac_of(&topo.peer, &topo.peer_if);
    let data = frame(GUEST_MAC, src, None, ETH_P_EXPERIMENTAL, 1500, 1);
    const FRAMES: u32 = 50_000;
    topo.peer.run(|| {
        let generator = Generator::load(&topo.peer_if);
        generator.send(&data, FRAMES);
    });
    let (g, p) = (guest_stats(), port_stats(&topo));
    let totals = sink
        .stop()
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    let report = format!("sink {totals:?}, xvio {g:?}, port {p:?}");
    eprintln!("{report}");
    assert!(totals.mergeable, "MRG_RXBUF negotiated: {report}");
    assert!(totals.realtime, "the sink runs real-time: {report}");
    assert!(totals.frames > 1000, "frames flowed: {report}");
    assert_eq!(totals.frames, g.to_guest_packets, "{report}");
    assert_eq!(
        p.rx_packets,
        g.to_guest_packets + g.to_guest_dropped_full,
        "each frame the socket received was delivered or dropped for want of buffers: {report}"
    );
    assert_eq!(totals.bytes, totals.frames * 1500, "{report}");
    assert_eq!(totals.kicks, 0, "{report}");
}

/// The names of the threads of `pid` whose affinity allows `cpu` (/proc/PID/task/*/status).
fn threads_allowed_on(pid: i32, cpu: usize) -> Vec<String> {
    let mut names = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let path = task.path();
        let (Ok(comm), Ok(status)) = (
            std::fs::read_to_string(path.join("comm")),
            std::fs::read_to_string(path.join("status")),
        ) else {
            continue; // the thread ended
        };
        let list = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap_or_default()
            .trim();
        let allows = list.split(',').any(|part| match part.split_once('-') {
            Some((a, b)) => {
                (a.parse().unwrap_or(usize::MAX)..=b.parse().unwrap_or(0)).contains(&cpu)
            }
            None => part.parse() == Ok(cpu),
        });
        if allows {
            names.push(comm.trim().to_owned());
        }
    }
    names.sort();
    names
}

#[test]
fn a_two_queue_guest_receives_on_both_queues() {
    if !privileged("a_two_queue_guest_receives_on_both_queues") {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let topo = Topology::new(1);
    let socket = socket();
    let guest = format!("socket={},mac={GUEST},queues=2", socket.display());
    let daemon = topo.start(&["--guest", &guest]);
    let rx = Testpmd::start_with(
        &socket,
        "rxonly",
        64,
        "02:00:00:00:00:02",
        &format!(",mac={GUEST},queues=2"),
        "1,0",
        &["--rxq=2", "--txq=2"],
    );
    wait_guests_ready(&guest_map(), 1).unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    assert!(rx.wait_forwarding(), "testpmd forwards:\n{}", rx.output());
    std::thread::sleep(Duration::from_secs(1));
    // Two flows (two source MACs) that the datapath's flow hash puts on different queues.
    let first = frame(
        GUEST_MAC,
        [0x02, 0, 0, 0, 0x08, 0],
        None,
        ETH_P_EXPERIMENTAL,
        64,
        1,
    );
    let parity = |f: &[u8]| xvio::datapath::worker::flow_hash(f) % 2;
    let second = (1..=255u8)
        .map(|b| {
            frame(
                GUEST_MAC,
                [0x02, 0, 0, 0, 0x08, b],
                None,
                ETH_P_EXPERIMENTAL,
                64,
                1,
            )
        })
        .find(|f| parity(f) != parity(&first))
        .expect("a source MAC that hashes to the other queue");
    topo.peer.run(|| {
        let generator = Generator::load(&topo.peer_if);
        for _ in 0..20 {
            generator.send(&first, 1000);
            generator.send(&second, 1000);
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let (totals, out) = rx.stop_keep_output();
    let by_queue = packets_by_queue(&out, "RX");
    let g = guest_stats();
    let report = format!("testpmd {totals:?} by queue {by_queue:?}, xvio {g:?}");
    eprintln!("{report}");
    for q in 0..2 {
        let n = by_queue
            .iter()
            .filter(|(queue, _)| *queue == q)
            .map(|(_, n)| n)
            .sum::<u64>();
        assert!(n > 1000, "queue {q} received: {report}\n{out}");
    }
    let (status, log) = daemon.terminate();
    assert!(status.success(), "{log}");
}

#[test]
fn a_peer_pings_a_guest_it_resolves_by_arp() {
    if !privileged("a_peer_pings_a_guest_it_resolves_by_arp") {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let topo = Topology::new(1);
    let socket = socket();
    let daemon = daemon_with_guest(&topo, &socket, &[]);
    // icmpecho answers every ARP request and every echo request it gets.
    let echo = Testpmd::start(
        &socket,
        "icmpecho",
        64,
        "02:00:00:00:00:02",
        &format!(",mac={GUEST}"),
        "1,0",
    );
    wait_guests_ready(&guest_map(), 1).unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    let out = topo
        .peer
        .command("ping")
        .args(["-c", "5", "-i", "0.2", "-W", "2", "10.252.0.9"])
        .output()
        .expect("ping");
    let ping = String::from_utf8_lossy(&out.stdout);
    let neigh = topo
        .peer
        .command("ip")
        .args(["neigh", "show", "10.252.0.9"])
        .output()
        .expect("ip neigh");
    let neigh = String::from_utf8_lossy(&neigh.stdout);
    drop(echo);
    assert!(
        ping.contains(" 0% packet loss"),
        "the peer resolved the guest by ARP and pinged it:\n{ping}\n{}",
        daemon.log()
    );
    assert!(neigh.contains(GUEST), "learned by ARP, not static: {neigh}");
    // The ARP requests came through the interface's tap, counted, none lost.
    let g = guest_stats();
    let map = Map::Array(MapData::from_pin(topo.pin_dir().join(maps::DAEMON_STATS)).unwrap());
    let ds: xvio_common::DaemonStats = Array::try_from(map).unwrap().get(&0, 0).unwrap();
    assert!(
        ds.group_frames >= 1 && ds.group_dropped == 0,
        "group frames from the wire counted: {ds:?}"
    );
    assert!(
        g.to_guest_packets >= ds.group_frames,
        "each reached the guest: {g:?} {ds:?}"
    );
    let (status, log) = daemon.terminate();
    assert!(status.success(), "{log}");
}

#[test]
fn the_host_keeps_its_network_when_the_daemon_is_killed_under_load() {
    if !privileged("the_host_keeps_its_network_when_the_daemon_is_killed_under_load") {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let topo = Topology::new(1);
    let socket = socket();
    let (daemon, tx) = txonly_guest_to_peer(&topo, &socket, &[], 64, 1);
    std::thread::sleep(Duration::from_secs(1));
    daemon.kill();
    std::thread::sleep(Duration::from_secs(1));
    let out = topo
        .host
        .command("ping")
        .args(["-c", "10", "-i", "0.1", "-W", "1", "10.252.0.2"])
        .output()
        .expect("ping");
    let ping = String::from_utf8_lossy(&out.stdout);
    tx.crash();
    // A killed daemon leaves its pins and its socket; no later test may read them.
    let _ = std::fs::remove_dir_all(topo.pin_dir());
    let _ = std::fs::remove_file(guest_map());
    let _ = std::fs::remove_file(&socket);
    assert!(
        ping.contains(" 0% packet loss"),
        "one second after SIGKILL the host's pings over the interface lose nothing:\n{ping}"
    );
}

/// A guest's memory (here every page written, as the sink's is) is in xvio's page tables as
/// soon as the guest connects, mapped ahead by a thread off the datapath, so that no worker
/// takes a page fault on a guest buffer it touches first (measured: one per ping from
/// testpmd's guest before); with `--lazy-guest-memory` only what the datapath touched is.
#[test]
fn a_guests_memory_is_mapped_ahead_unless_lazy() {
    if !privileged("a_guests_memory_is_mapped_ahead_unless_lazy") {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    for lazy in [false, true] {
        let topo = Topology::new(1);
        let socket = socket();
        let extra: &[&str] = if lazy { &["--lazy-guest-memory"] } else { &[] };
        let daemon = daemon_with_guest(&topo, &socket, extra);
        let sink = RxSink::start(&socket, 0, Duration::from_micros(100))
            .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
        wait_guests_ready(&guest_map(), 1).unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
        let pid = daemon.pid().expect("the daemon runs");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        if lazy {
            // Time enough for a mapping thread that should not have started.
            std::thread::sleep(Duration::from_secs(1));
        }
        let (size, rss) = loop {
            let (size, rss) = memfd_mapped(pid, "xvio-test-guest");
            if lazy || (size > 0 && rss == size) || std::time::Instant::now() > deadline {
                break (size, rss);
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let log = daemon.log();
        assert!(
            size >= 4 << 20,
            "xvio maps the guest's memory (lazy: {lazy}): {size}\n{log}"
        );
        if lazy {
            assert!(
                rss < size / 2,
                "only what was touched: {rss} of {size}\n{log}"
            );
            assert!(!log.contains("guest memory mapped ahead"), "{log}");
        } else {
            assert_eq!(rss, size, "all of it, ahead\n{log}");
            assert!(log.contains("guest memory mapped ahead"), "{log}");
        }
        sink.stop()
            .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    }
}
