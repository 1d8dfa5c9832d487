//! Guests on the wire: a real QEMU guest (the Linux virtio-net driver) behind `xvio run
//! --iface --guest` reaches a peer namespace on the other end of the attached veth — ping,
//! then iperf3 TCP both ways — while the host's own traffic on that veth keeps flowing.

use std::{
    process::{Child, Stdio},
    time::Duration,
};

use xvio_tests::{
    memfd_mapped, netns::Netns, privileged, qemu::QemuGuest, topology::Topology, unique_name,
};

/// TCG guests take both cores: one test at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
const BOOT_AND_RUN: Duration = Duration::from_secs(300);
const GUEST_MAC: &str = "52:54:00:77:00:02";
const GUEST_IP: &str = "10.252.0.3/24";
const PEER_IP: &str = "10.252.0.2";

/// `cmd ARGS…` in `ns`, started.
fn spawn_in(ns: &Netns, cmd: &str, args: &[&str]) -> Child {
    ns.command(cmd)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("nsenter {cmd}: {e}"))
}

fn guest_talks_to_the_peer(mrg_rxbuf: bool, dma: bool) {
    let topo = Topology::new(1);
    // A veth computes TCP checksums lazily (CHECKSUM_PARTIAL); AF_XDP gets the frame
    // without them: the peer must fill them in itself.
    let out = topo
        .peer
        .command("ethtool")
        .args(["-K", &topo.peer_if, "tx", "off"])
        .output()
        .expect("ethtool (apt-get install ethtool)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let socket = std::env::temp_dir().join(format!("{}.sock", unique_name("xvio-nic-")));
    let guest = format!("socket={},mac={GUEST_MAC}", socket.display());
    let mut args = vec!["--guest", &guest];
    if dma {
        // Two channels: the RX queue's, then the TX queue's (copies both ways).
        args.extend(["--dma", "sw", "--dma", "sw", "--copy-threshold", "0"]);
    }
    let daemon = topo.start(&args);
    let mut server = spawn_in(&topo.peer, "iperf3", &["-s"]);
    // The host's own traffic over the same veth, all along.
    let host_ping = spawn_in(&topo.host, "ping", &["-c", "60", "-i", "0.5", PEER_IP]);
    let cmd = format!(
        "ping -c 3 -W 5 {PEER_IP} && iperf3 -c {PEER_IP} -t 3 && iperf3 -c {PEER_IP} -t 3 -R"
    );
    let qemu = QemuGuest::start(&socket, GUEST_MAC, GUEST_IP, &cmd, mrg_rxbuf);
    let (ok, console) = qemu.wait(BOOT_AND_RUN);
    let _ = server.kill();
    let _ = server.wait();
    let host = host_ping.wait_with_output().expect("ping");
    let log = daemon.log();
    let (status, _) = daemon.terminate();
    let receivers: Vec<&str> = console.lines().filter(|l| l.contains("receiver")).collect();
    assert!(
        ok && console.contains("3 packets received") && receivers.len() == 2,
        "ping, then iperf3 both ways (mrg_rxbuf {mrg_rxbuf}, dma {dma}):\n{console}\n--- xvio ---\n{log}"
    );
    for line in &receivers {
        eprintln!(
            "iperf3 guest <-> peer through xvio (TCG, mrg_rxbuf {mrg_rxbuf}, dma {dma}): {line}"
        );
    }
    let host = String::from_utf8_lossy(&host.stdout);
    assert!(
        host.contains(" 0% packet loss"),
        "the host's own pings over the veth lost nothing:\n{host}"
    );
    assert!(status.success(), "xvio exited cleanly:\n{log}");
}

#[test]
fn a_qemu_guest_reaches_a_peer_over_the_nic_with_mrg_rxbuf_and_dma() {
    if !privileged("a_qemu_guest_reaches_a_peer_over_the_nic_with_mrg_rxbuf_and_dma") {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    guest_talks_to_the_peer(true, true);
}

#[test]
fn a_qemu_guest_reaches_a_peer_over_the_nic_without_mrg_rxbuf_on_the_cpu() {
    if !privileged("a_qemu_guest_reaches_a_peer_over_the_nic_without_mrg_rxbuf_on_the_cpu") {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    guest_talks_to_the_peer(false, false);
}

/// A QEMU guest's memory (the memfd QEMU shares, `memory-backend-memfd`) is in xvio's page
/// tables soon after the guest's driver comes up, as much of it as QEMU has in memory, mapped
/// ahead off the datapath; with `--lazy-guest-memory` it is not (the guest here sends next to
/// nothing, so the datapath touches next to nothing).
#[test]
fn a_qemu_guests_memory_is_mapped_ahead_unless_lazy() {
    if !privileged("a_qemu_guests_memory_is_mapped_ahead_unless_lazy") {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    const MIB: usize = 1 << 20;
    for lazy in [false, true] {
        let topo = Topology::new(1);
        let socket = std::env::temp_dir().join(format!("{}.sock", unique_name("xvio-map-")));
        let guest = format!("socket={},mac={GUEST_MAC}", socket.display());
        let mut args = vec!["--guest", &guest];
        if lazy {
            args.push("--lazy-guest-memory");
        }
        let daemon = topo.start(&args);
        // The guest sleeps longer than the test waits.
        let mut qemu = QemuGuest::start(&socket, GUEST_MAC, GUEST_IP, "sleep 900", true);
        let xvio = daemon.pid().expect("the daemon runs");
        let vm = qemu.pid().expect("QEMU runs");
        // The guest's memory in xvio (once QEMU shared it) and in QEMU, at one moment:
        // (xvio's Size, xvio's Rss, QEMU's Rss), and whether QEMU has shared it.
        let look = || {
            let ((size, rss), (vm_size, in_qemu)) = (
                memfd_mapped(xvio, "memory-backend-memfd"),
                memfd_mapped(vm, "memory-backend-memfd"),
            );
            // QEMU's regions need not cover its memfd to the byte: most of it.
            let shared = size >= 256 * MIB && vm_size >= size && in_qemu >= 32 * MIB;
            ((size, rss, in_qemu), shared)
        };
        let mut deadline = std::time::Instant::now() + BOOT_AND_RUN;
        let ((mut size, mut rss, mut in_qemu), mut shared) = look();
        // Mapped ahead: what QEMU has (but what the guest touched since the last look),
        // within seconds of QEMU sharing it.
        let mut sharing = false;
        while !(shared && (lazy || rss >= in_qemu / 10 * 9))
            && std::time::Instant::now() < deadline
            && qemu.running()
        {
            if shared && !std::mem::replace(&mut sharing, true) {
                deadline = std::time::Instant::now() + Duration::from_secs(20);
            }
            std::thread::sleep(Duration::from_millis(200));
            ((size, rss, in_qemu), shared) = look();
        }
        if lazy && shared {
            // The looks mapping ahead would have made by now, and then some.
            std::thread::sleep(Duration::from_secs(3));
            ((size, rss, in_qemu), shared) = look();
        }
        // The last look was of a running QEMU (one that is gone maps nothing).
        let running = qemu.running();
        let log = daemon.log();
        let console = qemu.console();
        drop(qemu);
        let (status, _) = daemon.terminate();
        let _ = std::fs::remove_file(&socket);
        let what = format!(
            "lazy {lazy}: xvio has {} of {} MiB in memory, QEMU {} MiB\n{console}\n--- xvio ---\n{log}",
            rss / MIB,
            size / MIB,
            in_qemu / MIB
        );
        assert!(running, "QEMU ran all along: {what}");
        assert!(
            shared,
            "xvio maps the guest's memory, and QEMU has 32 MiB of it or more: {what}"
        );
        if lazy {
            assert!(rss < in_qemu / 2, "only what the datapath touched: {what}");
            assert!(!log.contains("guest memory mapped ahead"), "{what}");
        } else {
            assert!(rss >= in_qemu / 10 * 9, "what QEMU has, ahead: {what}");
            assert!(log.contains("guest memory mapped ahead"), "{what}");
        }
        assert!(status.success(), "xvio exited cleanly: {what}");
    }
}
