//! The daemon for real, in network namespaces joined by a veth pair: steered frames reach
//! an AF_XDP socket bound to the interface, other traffic reaches the kernel, the counters
//! match, bpftool prints named fields, and SIGTERM leaves nothing behind. Also the errors a
//! user meets first: unknown interface, bad MAC, an XDP program already attached, no root.

use std::{net::UdpSocket, path::Path, process::Command, time::Duration};

use aya::maps::{Array, Map, MapData, PerCpuArray, XskMap};
use xvio::xsk::{XskConfig, XskPort};
use xvio_common::{DaemonStats, XdpMode, XdpOutcome, XdpStats, maps};
use xvio_tests::{
    daemon::{Daemon, run_xvio, run_xvio_under, wait_guests_ready},
    frames::{ETH_P_EXPERIMENTAL, frame, seq_of},
    guest::TestGuest,
    netns::mac_of,
    packet::RawSocket,
    privileged,
    topology::Topology,
    unique_name,
    xsk::receive_all,
};

const GUEST: [u8; 6] = [0x02, 0x58, 0x56, 0x49, 0x4f, 0x01];

fn xdp_stats(pin_dir: &Path) -> [XdpStats; 6] {
    let map = Map::PerCpuArray(MapData::from_pin(pin_dir.join(maps::XDP_STATS)).unwrap());
    let array: PerCpuArray<MapData, XdpStats> = PerCpuArray::try_from(map).unwrap();
    xvio::stats::xdp_totals(&array).unwrap()
}

fn daemon_stats(pin_dir: &Path) -> DaemonStats {
    let map = Map::Array(MapData::from_pin(pin_dir.join(maps::DAEMON_STATS)).unwrap());
    let array: Array<MapData, DaemonStats> = Array::try_from(map).unwrap();
    array.get(&0, 0).unwrap()
}

fn bpftool_dump(path: &Path) -> String {
    let out = Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(path)
        .output()
        .expect("bpftool");
    assert!(
        out.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A daemon that stopped left neither its pins nor its XDP program on the interface.
fn assert_cleaned_up(topo: &Topology) {
    assert!(!topo.pin_dir().exists(), "the pin folder is removed");
    let ifindex = topo
        .host
        .run(|| nix::net::if_::if_nametoindex(topo.ifname.as_str()).unwrap());
    let attached = topo
        .host
        .run(|| xvio::netlink::xdp_attachment(ifindex).unwrap());
    assert_eq!(attached, None, "no XDP program remains on the interface");
}

#[test]
fn steered_frames_reach_af_xdp_and_the_rest_reaches_the_kernel() {
    if !privileged("steered_frames_reach_af_xdp_and_the_rest_reaches_the_kernel") {
        return;
    }
    let topo = Topology::new(1);
    // --queues 0: the daemon opens no AF_XDP socket; the test binds its own.
    let daemon = topo.start(&["--steer", "02:58:56:49:4f:01", "--queues", "0"]);
    let pin_dir = topo.pin_dir();
    const FRAMES: u32 = 1000;
    const DATAGRAMS: usize = 20;
    let src = mac_of(&topo.peer, &topo.peer_if);
    let sent: Vec<Vec<u8>> = (0..FRAMES)
        .map(|seq| {
            frame(
                GUEST,
                src,
                None,
                ETH_P_EXPERIMENTAL,
                60 + (seq as usize * 7) % 1455,
                seq,
            )
        })
        .collect();

    let (received, dropped, udp_received) = topo.host.run(|| {
        let port = XskPort::open(&topo.ifname, 0, &XskConfig::default())
            .expect("bind AF_XDP to the attached interface");
        let map = Map::XskMap(MapData::from_pin(pin_dir.join(maps::XSKS)).expect("pinned xsks"));
        let mut xsks: XskMap<MapData> = XskMap::try_from(map).unwrap();
        // Registered through the pinned map, as any other tool would.
        xsks.set(0, port.fd(), 0).expect("register the socket");
        let udp = UdpSocket::bind("10.252.0.1:4789").unwrap();
        udp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

        topo.peer.run(|| {
            let raw = RawSocket::bind(&topo.peer_if).unwrap();
            let client = UdpSocket::bind("10.252.0.2:0").unwrap();
            for (i, f) in sent.iter().enumerate() {
                raw.send(f).unwrap();
                if i % (FRAMES as usize / DATAGRAMS) == 0 {
                    client
                        .send_to(format!("unsteered {i}").as_bytes(), "10.252.0.1:4789")
                        .unwrap();
                }
            }
        });
        let mut ports = [port];
        let received = receive_all(&mut ports, FRAMES as usize, Duration::from_secs(5)).remove(0);
        let mut udp_received = 0;
        let mut buf = [0u8; 64];
        while udp_received < DATAGRAMS {
            udp.recv(&mut buf)
                .expect("an unsteered datagram reaches the host's socket");
            udp_received += 1;
        }
        let stats = ports[0].stats();
        (
            received,
            stats.fill_ring_empty + stats.rx_ring_full,
            udp_received,
        )
    });

    assert_eq!(dropped, 0, "the AF_XDP socket dropped frames");
    assert_eq!(
        received.len(),
        sent.len(),
        "every steered frame arrives on the socket"
    );
    for (got, want) in received.iter().zip(&sent) {
        assert_eq!(seq_of(got), seq_of(want), "frames arrive in order");
        assert_eq!(got, want, "frame bytes are identical");
    }
    assert_eq!(udp_received, DATAGRAMS);

    let stats = xdp_stats(&pin_dir);
    let redirected = stats[XdpOutcome::Redirected.index() as usize];
    assert_eq!(
        redirected.packets,
        u64::from(FRAMES),
        "redirected counter equals frames sent"
    );
    assert_eq!(
        redirected.bytes,
        sent.iter().map(|f| f.len() as u64).sum::<u64>()
    );
    assert_eq!(stats[XdpOutcome::NoSocket.index() as usize].packets, 0);
    assert!(
        stats[XdpOutcome::Passed.index() as usize].packets >= DATAGRAMS as u64,
        "{stats:?}"
    );
    assert!(
        stats[XdpOutcome::Broadcast.index() as usize].packets >= 1,
        "the ARP request is broadcast: {stats:?}"
    );

    // The daemon's own counters, through the pinned map and through bpftool.
    std::thread::sleep(Duration::from_millis(1100));
    let ds = daemon_stats(&pin_dir);
    assert_eq!(
        ds.xdp_mode,
        XdpMode::Native as u32,
        "veth supports native XDP"
    );
    assert_eq!((ds.ifaces_attached, ds.steer_entries), (1, 1));
    assert!(ds.uptime_ms >= 1000, "{ds:?}");
    let dump = bpftool_dump(&pin_dir.join(maps::DAEMON_STATS));
    for field in [
        "uptime_ms",
        "updated_unix_ms",
        "pid",
        "ifaces_attached",
        "steer_entries",
        "XVIO_XDP_MODE_NATIVE",
    ] {
        assert!(
            dump.contains(field),
            "bpftool output lacks {field}:\n{dump}"
        );
    }
    let dump = bpftool_dump(&pin_dir.join(maps::XDP_STATS));
    assert!(
        dump.contains("\"packets\"") && dump.contains("\"bytes\""),
        "{dump}"
    );
    let dump = bpftool_dump(&pin_dir.join(maps::STEER));
    assert!(
        dump.contains("\"mac\"") && dump.contains("\"vlan\"") && dump.contains("\"guest_id\""),
        "{dump}"
    );

    let out = run_xvio(None, &["stats", "--iface", &topo.ifname]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "xvio stats: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = report
        .lines()
        .find(|l| l.starts_with("redirected"))
        .unwrap_or_default();
    assert_eq!(
        line.split_whitespace().nth(1),
        Some("1000"),
        "xvio stats:\n{report}"
    );
    assert!(report.contains("XVIO_XDP_MODE_NATIVE"), "{report}");

    let (status, log) = daemon.terminate();
    assert!(status.success(), "xvio exits 0 on SIGTERM: {status}\n{log}");
    assert!(
        log.contains("redirected=1000"),
        "the shutdown summary has the counters:\n{log}"
    );
    assert_cleaned_up(&topo);
}

#[test]
fn steered_frames_without_a_socket_pass_to_the_kernel_and_are_logged() {
    if !privileged("steered_frames_without_a_socket_pass_to_the_kernel_and_are_logged") {
        return;
    }
    let topo = Topology::new(2);
    // Two guests as well: their totals appear in daemon_stats. The first guest gets the
    // software DMA channel.
    let sock = |n: &str| std::env::temp_dir().join(format!("{}-{n}.sock", unique_name("xvio-n")));
    let (sa, sb) = (sock("a"), sock("b"));
    let guest_a = format!("socket={},mac=52:54:00:00:02:0a", sa.display());
    // A guest_stats pin a killed daemon left says nothing about this daemon's guests.
    let _ = std::fs::remove_file(Path::new(xvio_common::PIN_ROOT).join("guests/guest_stats"));
    let guest_b = format!("socket={},mac=52:54:00:00:02:0b", sb.display());
    let daemon = topo.start(&[
        "--steer",
        "02:58:56:49:4f:01",
        "--xdp-mode",
        "generic",
        "--dma",
        "sw",
        "--copy-threshold",
        "0",
        "--queues",
        "0",
        "--guest",
        &guest_a,
        "--guest",
        &guest_b,
    ]);
    let refuse = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
    let mut a = TestGuest::connect(&sa, refuse);
    let mut b = TestGuest::connect(&sb, refuse);
    a.post_rx(4, 2048);
    b.post_rx(4, 2048);
    let guests = Path::new(xvio_common::PIN_ROOT).join("guests/guest_stats");
    wait_guests_ready(&guests, 2).unwrap_or_else(|e| panic!("{e}"));
    let (mac_a, mac_b) = ([0x52, 0x54, 0, 0, 2, 0x0a], [0x52, 0x54, 0, 0, 2, 0x0b]);
    for seq in 0..3 {
        b.send(&frame(mac_a, mac_b, None, ETH_P_EXPERIMENTAL, 200, seq));
    }
    a.send(&frame(mac_b, mac_a, None, ETH_P_EXPERIMENTAL, 200, 9));
    // To a MAC no guest has: dropped and counted.
    a.send(&frame(
        [0x52, 0x54, 0, 0, 2, 0xff],
        mac_a,
        None,
        ETH_P_EXPERIMENTAL,
        200,
        10,
    ));
    assert_eq!(a.receive(3, Duration::from_secs(5)).len(), 3);
    assert_eq!(b.receive(1, Duration::from_secs(5)).len(), 1);
    let src = mac_of(&topo.peer, &topo.peer_if);
    topo.peer.run(|| {
        let raw = RawSocket::bind(&topo.peer_if).unwrap();
        for seq in 0..10 {
            raw.send(&frame(GUEST, src, None, ETH_P_EXPERIMENTAL, 64, seq))
                .unwrap();
        }
    });
    std::thread::sleep(Duration::from_millis(1200));
    let stats = xdp_stats(&topo.pin_dir());
    assert_eq!(
        stats[XdpOutcome::NoSocket.index() as usize].packets,
        10,
        "{stats:?}"
    );
    let ds = daemon_stats(&topo.pin_dir());
    assert_eq!(ds.xdp_mode, XdpMode::Generic as u32);
    assert_eq!((ds.guests, ds.guests_connected), (2, 2), "{ds:?}");
    assert_eq!(
        (ds.from_guests_packets, ds.to_guests_packets),
        (4, 4),
        "{ds:?}"
    );
    assert_eq!(
        ds.guests_dropped, 1,
        "the frame to an unknown MAC (no interface to send on): {ds:?}"
    );
    assert_eq!(
        (
            ds.copy_dma,
            ds.copy_cpu,
            ds.copy_fallbacks,
            ds.copy_inflight
        ),
        (3, 0, 0, 0),
        "A's copies by its channel (B has no copy engine: its frames count in rx only): {ds:?}"
    );
    let dump = bpftool_dump(&topo.pin_dir().join(maps::DAEMON_STATS));
    for field in [
        "guests_connected",
        "to_guests_packets",
        "copy_dma",
        "copy_fallbacks",
    ] {
        assert!(dump.contains(field), "bpftool shows {field}: {dump}");
    }
    let out = run_xvio(None, &["stats", "--iface", &topo.ifname]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("guests: 2 (2 connected), to guests 4 pkts, from guests 4 pkts, dropped 1"),
        "xvio stats:\n{report}"
    );
    let (status, log) = daemon.terminate();
    assert!(status.success(), "{log}");
    assert!(
        log.contains("found no AF_XDP socket"),
        "the kernel event is logged:\n{log}"
    );
    assert!(
        log.contains("02:58:56:49:4f:01"),
        "the event names the MAC:\n{log}"
    );
}

#[test]
fn user_errors_exit_non_zero_with_one_line() {
    if !privileged("user_errors_exit_non_zero_with_one_line") {
        return;
    }
    let topo = Topology::new(1);
    let host_mac = mac_of(&topo.host, &topo.ifname)
        .map(|b| format!("{b:02x}"))
        .join(":");
    let guest_socket = std::env::temp_dir().join(format!("{}.sock", unique_name("xvio-hm-")));
    let guest = format!("socket={},mac={host_mac}", guest_socket.display());
    // Its own pin root: another test's daemon serving guests under the default one would be
    // refused first (its guests' pins), not for the MAC.
    let pin_root = format!("/sys/fs/bpf/{}", unique_name("xvio-u"));
    let cases: [(&[&str], &str); 11] = [
        (
            &["run", "--iface", &topo.ifname, "--xsk-frame-size", "3000"],
            "--xsk-frame-size 3000 must be 2048 or 4096",
        ),
        (
            &[
                "run",
                "--iface",
                &topo.ifname,
                "--dma",
                "dsa:/dev/dsa/wq9.9",
            ],
            "no Intel DSA work queue at /dev/dsa/wq9.9",
        ),
        (
            &["run", "--iface", &topo.ifname, "--dma", "sw:4000"],
            "cannot run on CPU 4000",
        ),
        (
            &["run", "--iface", &topo.ifname, "--copy-threshold", "big"],
            "expected auto or a number of bytes",
        ),
        (
            &["run", "--iface", "xvio-nonexistent"],
            "interface 'xvio-nonexistent' does not exist",
        ),
        (
            &["run", "--iface", &topo.ifname, "--steer", "02:00:00:00:00"],
            "is not a MAC address",
        ),
        (
            &[
                "run",
                "--iface",
                &topo.ifname,
                "--steer",
                "ff:ff:ff:ff:ff:ff",
            ],
            "must be unicast",
        ),
        (
            &["run", "--iface", &topo.ifname, "--iface", &topo.ifname],
            "given twice",
        ),
        (
            &["run", "--iface", "guests", "--guest", &guest],
            "has the name of the folder the guests' counters are pinned in",
        ),
        (
            &["run", "--iface", &topo.ifname, "--steer", &host_mac],
            "is the MAC of interface",
        ),
        (
            &[
                "run",
                "--iface",
                &topo.ifname,
                "--guest",
                &guest,
                "--pin-root",
                &pin_root,
            ],
            "is the MAC of interface",
        ),
    ];
    for (args, expected) in cases {
        let out = run_xvio(Some(&topo.host), args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(
            stderr.contains(expected),
            "{args:?}: expected '{expected}' in:\n{stderr}"
        );
        assert!(
            !stderr.contains("panicked") && !stderr.contains("backtrace"),
            "{stderr}"
        );
        let error_lines = stderr.lines().filter(|l| l.contains("error")).count();
        assert_eq!(error_lines, 1, "one error line:\n{stderr}");
    }
    assert!(!topo.pin_dir().exists(), "a failed start leaves no pins");
    assert!(!guest_socket.exists(), "nor the guest's socket");

    // Without privileges: one line that says to use root.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(xvio_tests::daemon::xvio_bin())
        .args(["run", "--iface", "lo"])
        .output()
        .expect("setpriv (util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("needs root"), "{stderr}");
}

/// What operations.md says xvio needs besides root, as root with only those capabilities
/// (`setpriv --bounding-set`): an interface with its AF_XDP socket and a guest come up, and
/// the daemon stops cleanly; with one of them fewer, one line names the one missing.
#[test]
fn the_documented_capabilities_are_enough_and_a_missing_one_is_named() {
    if !privileged("the_documented_capabilities_are_enough_and_a_missing_one_is_named") {
        return;
    }
    let topo = Topology::new(1);
    let socket = std::env::temp_dir().join(format!("{}.sock", unique_name("xvio-cap-")));
    let guest = format!("socket={},mac=52:54:00:00:00:42", socket.display());
    // Its own pin root: another test's daemon with guests holds the default one's guests/.
    let pin_root = format!("/sys/fs/bpf/{}", unique_name("xvio-cap"));
    let args = [
        "--iface",
        topo.ifname.as_str(),
        "--guest",
        guest.as_str(),
        "--pin-root",
        pin_root.as_str(),
    ];
    // CAP_IPC_LOCK for the UMEMs' locked memory (or a memlock limit above them).
    // Not CAP_PERFMON: the verifier takes the XDP program without it.
    let caps = "--bounding-set=-all,+bpf,+net_admin,+net_raw,+ipc_lock";
    let pin_dir = Path::new(&pin_root).join(&topo.ifname);
    let ready = pin_dir.join(maps::EVENT_STATE);
    let daemon = Daemon::start_under(Some(&topo.host), &["setpriv", caps], &args, &ready)
        .unwrap_or_else(|e| panic!("xvio with {caps}: {e}"));
    let (status, log) = daemon.stop_with(nix::sys::signal::Signal::SIGTERM);
    assert!(status.success(), "{log}");
    assert!(log.contains("guest port ready"), "{log}");
    assert!(
        !socket.exists() && !pin_dir.exists(),
        "it cleaned up:\n{log}"
    );
    let _ = std::fs::remove_dir(&pin_root);

    for (without, named) in [("bpf", "CAP_BPF"), ("net_raw", "CAP_NET_RAW")] {
        let fewer = caps.replace(&format!(",+{without}"), "");
        let out = run_xvio_under(
            Some(&topo.host),
            &["setpriv", fewer.as_str()],
            &[&["run"], &args[..]].concat(),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{fewer}: must fail");
        assert!(
            stderr.contains(&format!("missing: {named})")) && stderr.lines().count() == 1,
            "{fewer}: one line naming {named}:\n{stderr}"
        );
    }
}

#[test]
fn an_attached_program_is_refused_unless_replace() {
    if !privileged("an_attached_program_is_refused_unless_replace") {
        return;
    }
    let topo = Topology::new(1);
    let first = topo.start(&[]);
    // A second daemon finds the first one's program (held through a BPF link).
    let out = run_xvio(Some(&topo.host), &["run", "--iface", &topo.ifname]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("already has an XDP program attached") && stderr.contains("--replace"),
        "{stderr}"
    );
    let out = run_xvio(
        Some(&topo.host),
        &["run", "--iface", &topo.ifname, "--replace"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a program held by another process's link is not torn away"
    );
    assert!(
        stderr.contains("BPF link another process holds") && stderr.contains("link id"),
        "{stderr}"
    );
    assert!(
        topo.pin_dir().join(maps::XDP_STATS).exists(),
        "the first daemon's pins are untouched"
    );
    let (status, log) = first.terminate();
    assert!(status.success(), "{log}");

    // A program attached the legacy way (netlink, as `ip link set … xdp obj` does).
    let obj = std::env::temp_dir().join(format!("{}.o", unique_name("xvio-obj")));
    std::fs::write(&obj, xvio::XDP_OBJECT).unwrap();
    topo.host.ip(&[
        "link",
        "set",
        "dev",
        &topo.ifname,
        "xdpgeneric",
        "obj",
        obj.to_str().unwrap(),
        "sec",
        "xdp",
    ]);
    std::fs::remove_file(&obj).unwrap();
    let out = run_xvio(Some(&topo.host), &["run", "--iface", &topo.ifname]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("generic mode"), "{stderr}");
    let replaced = topo.start(&["--replace"]);
    assert!(
        replaced.log().contains("replaced the XDP program"),
        "{}",
        replaced.log()
    );
    let (status, log) = replaced.terminate();
    assert!(status.success(), "{log}");
    let ifindex = topo
        .host
        .run(|| nix::net::if_::if_nametoindex(topo.ifname.as_str()).unwrap());
    assert_eq!(
        topo.host
            .run(|| xvio::netlink::xdp_attachment(ifindex).unwrap()),
        None
    );
}

/// The rx packets of each `queue N:` line of `xvio stats`.
fn queue_rx(report: &str) -> Vec<(u32, u64)> {
    report
        .lines()
        .filter_map(|l| {
            let rest = l.trim_start().strip_prefix("queue ")?;
            let (queue, rest) = rest.split_once(':')?;
            let rx = rest.split(", rx ").nth(1)?.split(' ').next()?;
            Some((queue.parse().ok()?, rx.parse().ok()?))
        })
        .collect()
}

#[test]
fn on_a_veth_made_without_queue_counts_the_daemon_opens_a_socket_per_enabled_queue() {
    if !privileged(
        "on_a_veth_made_without_queue_counts_the_daemon_opens_a_socket_per_enabled_queue",
    ) {
        return;
    }
    // `ip link add … type veth peer …` as a user types it: one queue per CPU allocated, one
    // enabled. The daemon must bind only the enabled one, and come up.
    let topo = Topology::untuned();
    let daemon = topo.start(&["--steer", "02:58:56:49:4f:01"]);
    let stats = || {
        let out = run_xvio(None, &["stats", "--iface", &topo.ifname]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !stats().contains("AF_XDP sockets: 1 ") {
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon did not report its socket:\n{}\n{}",
            stats(),
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    const FRAMES: u32 = 100;
    let src = mac_of(&topo.peer, &topo.peer_if);
    topo.peer.run(|| {
        let raw = RawSocket::bind(&topo.peer_if).unwrap();
        for seq in 0..FRAMES {
            raw.send(&frame(GUEST, src, None, ETH_P_EXPERIMENTAL, 200, seq))
                .unwrap();
        }
    });
    let mut report = stats();
    while queue_rx(&report) != [(0, u64::from(FRAMES))] {
        assert!(
            std::time::Instant::now() < deadline + Duration::from_secs(5),
            "queue 0's socket, and only it, receives every steered frame:\n{report}"
        );
        std::thread::sleep(Duration::from_millis(100));
        report = stats();
    }
    let redirected = xdp_stats(&topo.pin_dir())[XdpOutcome::Redirected.index() as usize];
    assert_eq!(redirected.packets, u64::from(FRAMES), "{report}");
    let (status, log) = daemon.terminate();
    assert!(status.success(), "{log}");
    assert!(
        log.contains("AF_XDP sockets: one per enabled queue (ethtool channels)")
            && log.contains("queues=1"),
        "the log says where the count came from:\n{log}"
    );
    assert_eq!(
        log.matches("AF_XDP socket bound").count(),
        1,
        "one socket:\n{log}"
    );
}

#[test]
fn sighup_stops_the_daemon_as_cleanly_as_sigterm() {
    if !privileged("sighup_stops_the_daemon_as_cleanly_as_sigterm") {
        return;
    }
    let topo = Topology::new(1);
    let daemon = topo.start(&[]);
    let (status, log) = daemon.stop_with(nix::sys::signal::Signal::SIGHUP);
    assert!(status.success(), "xvio exits 0 on SIGHUP: {status}\n{log}");
    assert!(log.contains("SIGHUP: stopping"), "{log}");
    assert_cleaned_up(&topo);
}

#[test]
fn guests_and_steer_entries_beyond_the_map_are_refused_saying_so() {
    if !privileged("guests_and_steer_entries_beyond_the_map_are_refused_saying_so") {
        return;
    }
    let topo = Topology::new(1);
    let steers: Vec<String> = (0..xvio_common::STEER_MAX)
        .map(|n| format!("02:00:00:01:{:02x}:{:02x}", n >> 8, n & 0xff))
        .collect();
    let socket = std::env::temp_dir().join(format!("{}.sock", unique_name("xvio-full-")));
    let guest = format!("socket={},mac=02:00:00:02:00:01", socket.display());
    // Its own pin root, as in `user_errors_exit_non_zero_with_one_line`.
    let pin_root = format!("/sys/fs/bpf/{}", unique_name("xvio-f"));
    let mut args = vec![
        "run",
        "--iface",
        topo.ifname.as_str(),
        "--pin-root",
        &pin_root,
    ];
    for steer in &steers {
        args.extend(["--steer", steer.as_str()]);
    }
    args.extend(["--guest", guest.as_str()]);
    let started = std::time::Instant::now();
    let out = run_xvio(Some(&topo.host), &args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "one entry too many");
    assert!(
        stderr.contains("steer map of") && stderr.contains("is full"),
        "{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "filling the map takes {:?}",
        started.elapsed()
    );
    assert!(
        !Path::new(&pin_root).exists(),
        "a failed start leaves no pins"
    );
    assert!(!socket.exists(), "nor the guest's socket");
}

#[test]
fn stats_left_by_a_killed_daemon_say_they_are_stale() {
    if !privileged("stats_left_by_a_killed_daemon_say_they_are_stale") {
        return;
    }
    let topo = Topology::new(1);
    let daemon = topo.start(&[]);
    // Once the daemon has written its counters (about once a second).
    let mut live = String::new();
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        let out = run_xvio(None, &["stats", "--iface", &topo.ifname]);
        live = String::from_utf8_lossy(&out.stdout).into_owned();
        if !live.contains("daemon pid 0,") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    daemon.kill();
    let out = run_xvio(None, &["stats", "--iface", &topo.ifname]);
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    // A killed daemon leaves its pins; no later test may read them.
    let _ = std::fs::remove_dir_all(topo.pin_dir());
    assert!(
        !live.contains("STALE"),
        "a running daemon's counters:\n{live}"
    );
    assert!(
        report.contains("STALE") && report.contains("is not running"),
        "xvio stats:\n{report}"
    );
}

#[test]
fn a_daemon_does_not_take_the_pins_of_a_running_one_on_a_same_named_interface() {
    if !privileged("a_daemon_does_not_take_the_pins_of_a_running_one_on_a_same_named_interface") {
        return;
    }
    let topo = Topology::new(1);
    let first = topo.start(&[]);
    // Another namespace with an interface of the same name: the same pin folder.
    let other = xvio_tests::netns::Netns::new("o");
    other.ip(&[
        "link",
        "add",
        &topo.ifname,
        "type",
        "veth",
        "peer",
        "name",
        "xvio-o1",
    ]);
    other.ip(&["link", "set", &topo.ifname, "up"]);
    other.ip(&["link", "set", "xvio-o1", "up"]);
    // Counters written at least once, so that the first daemon is seen running.
    std::thread::sleep(Duration::from_millis(1500));
    let out = run_xvio(Some(&other), &["run", "--iface", &topo.ifname]);
    xvio_tests::daemon::assert_refused_for_pins_of(&out, first.pid().unwrap());
    assert!(
        topo.pin_dir().join(maps::DAEMON_STATS).exists(),
        "the first daemon's pins stay"
    );
    let (status, log) = first.terminate();
    assert!(status.success(), "{log}");
    assert!(!topo.pin_dir().exists());
}

#[test]
fn a_daemon_whose_interface_goes_away_says_so_and_stops_cleanly() {
    if !privileged("a_daemon_whose_interface_goes_away_says_so_and_stops_cleanly") {
        return;
    }
    let topo = Topology::new(1);
    let daemon = topo.start(&[]);
    let start = std::time::Instant::now();
    while !daemon.log().contains("running;") && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    topo.host.ip(&["link", "del", &topo.ifname]);
    // The control loop looks once a second.
    std::thread::sleep(Duration::from_millis(2500));
    let (status, log) = daemon.terminate();
    assert!(
        !status.success(),
        "it stopped with an error: {status}\n{log}"
    );
    assert!(
        log.contains(&format!("interface '{}'", topo.ifname)) && log.contains("went away"),
        "{log}"
    );
    assert!(!topo.pin_dir().exists(), "its pins are removed");
}
