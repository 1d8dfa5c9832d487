//! The daemon serving guests only (no interface): frames between two vhost-user frontends,
//! the guests' counters in the pinned `guest_stats` map as bpftool shows them, and a clean
//! exit on SIGTERM.

use std::{path::PathBuf, process::Command, time::Duration};

use xvio_tests::{
    daemon::{Daemon, wait_guests_ready},
    frames::{ETH_P_EXPERIMENTAL, frame},
    guest::TestGuest,
    privileged, unique_name,
};

const MAC_A: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x01, 0x0a];
const MAC_B: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x01, 0x0b];

#[test]
fn guest_counters_are_in_a_pinned_map_with_field_names() {
    if !privileged("guest_counters_are_in_a_pinned_map_with_field_names") {
        return;
    }
    let pin_root = PathBuf::from("/sys/fs/bpf").join(unique_name("xvio-g"));
    let sock = |n: &str| std::env::temp_dir().join(format!("{}-{n}.sock", unique_name("xvio-d")));
    let (sa, sb) = (sock("a"), sock("b"));
    let args = [
        "--guest".to_owned(),
        format!("socket={},mac=52:54:00:00:01:0a", sa.display()),
        "--guest".to_owned(),
        format!("socket={},mac=52:54:00:00:01:0b", sb.display()),
        "--pin-root".to_owned(),
        pin_root.display().to_string(),
        // RX copies through software DMA channels (one per guest), every size.
        "--dma".to_owned(),
        "sw".to_owned(),
        "--dma".to_owned(),
        "sw".to_owned(),
        "--copy-threshold".to_owned(),
        "0".to_owned(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let map = pin_root.join("guests/guest_stats");
    let daemon = Daemon::start(None, &args, &map).unwrap_or_else(|e| panic!("{e}"));
    let mut a = TestGuest::connect(
        &sa,
        1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX,
    );
    let mut b = TestGuest::connect(
        &sb,
        1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX,
    );
    b.post_rx(8, 2048);
    wait_guests_ready(&map, 2).unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    let f = frame(MAC_B, MAC_A, None, ETH_P_EXPERIMENTAL, 300, 1);
    a.send(&f);
    assert_eq!(b.receive(1, Duration::from_secs(5)), vec![f]);
    std::thread::sleep(Duration::from_millis(1300));
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&map)
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&out.stdout);
    for field in [
        "from_guest_packets",
        "to_guest_packets",
        "malformed_chains",
        "to_guest_dropped_full",
        "connected",
        "mac",
    ] {
        assert!(dump.contains(field), "bpftool shows {field}: {dump}");
    }
    assert!(
        dump.contains("\"from_guest_packets\":1"),
        "A sent one frame: {dump}"
    );
    assert!(
        dump.contains("\"to_guest_packets\":1"),
        "B received one frame: {dump}"
    );
    assert!(
        dump.contains("\"from_guest_bytes\":300") && dump.contains("\"to_guest_bytes\":300"),
        "{dump}"
    );
    assert!(
        dump.contains("\"copy_dma\":1"),
        "the frame went through B's DMA channel"
    );
    // `xvio stats --guests`: the same, one line per guest, and whose counters they are.
    let out = xvio_tests::daemon::run_xvio(
        None,
        &[
            "stats",
            "--guests",
            "--pin-root",
            &pin_root.display().to_string(),
        ],
    );
    let stats = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stats}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pid = daemon.pid().unwrap();
    assert!(
        stats.contains(&format!("guests: 2 (2 connected), daemon pid {pid}"))
            && stats.contains("guest 0: mac 52:54:00:00:01:0a, connected, ready")
            && stats.contains("from guest 1 pkts 300 B")
            && stats.contains("guest 1: mac 52:54:00:00:01:0b, connected, ready")
            && stats.contains("to guest 1 pkts 300 B")
            && !stats.contains("STALE"),
        "{stats}"
    );
    let (status, log) = daemon.terminate();
    assert!(status.success(), "{log}");
    assert!(!pin_root.exists(), "the daemon removed its pins:\n{log}");
    assert!(!sa.exists() && !sb.exists(), "and its sockets");
}

/// Two daemons with guests under one pin root would write each other's `guest_stats`: the
/// second refuses to start, naming the first and `--pin-root`, and leaves its pins alone.
#[test]
fn a_daemon_does_not_take_the_guest_pins_of_a_running_one() {
    if !privileged("a_daemon_does_not_take_the_guest_pins_of_a_running_one") {
        return;
    }
    let pin_root = PathBuf::from("/sys/fs/bpf").join(unique_name("xvio-g"));
    let sock = |n: &str| std::env::temp_dir().join(format!("{}-{n}.sock", unique_name("xvio-d")));
    let (sa, sb) = (sock("a"), sock("b"));
    let guest = |s: &PathBuf, mac: &str| format!("socket={},mac={mac}", s.display());
    let root = pin_root.display().to_string();
    let first_guest = guest(&sa, "52:54:00:00:01:0a");
    let map = pin_root.join("guests/guest_stats");
    let first = Daemon::start(None, &["--guest", &first_guest, "--pin-root", &root], &map)
        .unwrap_or_else(|e| panic!("{e}"));
    // No wait: a daemon names itself in guests/daemon_stats before it pins guest_stats.
    let second_guest = guest(&sb, "52:54:00:00:01:0b");
    let out = xvio_tests::daemon::run_xvio(
        None,
        &["run", "--guest", &second_guest, "--pin-root", &root],
    );
    xvio_tests::daemon::assert_refused_for_pins_of(&out, first.pid().unwrap());
    assert!(!sb.exists(), "the refused daemon removed its socket");
    assert!(
        map.exists() && pin_root.join("guests/daemon_stats").exists(),
        "the first daemon's pins stay"
    );
    let (status, log) = first.terminate();
    assert!(status.success(), "{log}");
    assert!(
        !pin_root.exists(),
        "the first daemon removed its pins:\n{log}"
    );
}
