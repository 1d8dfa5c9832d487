//! Guests on 802.1Q VLANs (`--guest …,mac=M@VLAN`), access ports as Open vSwitch's `tag=N`:
//! - guests exchange frames within their VLAN only (unicast and broadcast), untagged, and a
//!   tagged frame from an access port goes nowhere;
//! - with an interface: frames from the wire tagged with a guest's VLAN reach it untagged
//!   (unicast through XDP and AF_XDP, broadcast through the tap), frames of other VLANs or
//!   untagged do not, and what the guest sends reaches the wire tagged once; its steer entry
//!   is (MAC, VLAN);
//! - DPDK virtio-user guests: an rxonly guest on VLAN 100 behind `xvio run --iface` receives
//!   the frames the peer tags 100 (counted on both sides) and none tagged 200 or untagged; a
//!   txonly guest's 1514-byte frames reach the peer tagged 100, each counted.
//!
//! The kernel has no 802.1Q module: the peer builds tagged frames by hand and sends them on
//! a packet socket; a counting XDP program on the peer reads the tags of what arrives.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use xvio_common::{GuestStats, PortStats, SteerKey, SteerValue, XdpOutcome, XdpStats, maps};
use xvio_tests::{
    daemon::{Daemon, wait_guests_ready},
    dpdk::Testpmd,
    frames::{ETH_P_EXPERIMENTAL, frame},
    guest::TestGuest,
    netns::mac_of,
    packet::RawSocket,
    privileged,
    topology::Topology,
    unique_name,
    xdp::DropCounter,
};

/// Daemons here share the default pin root and testpmd busy-polls: one test at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
const BROADCAST: [u8; 6] = [0xff; 6];
const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0x0a, 0x01];
const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0x0a, 0x02];
const MAC_C: [u8; 6] = [0x02, 0, 0, 0, 0x0a, 0x03];
const MAC_D: [u8; 6] = [0x02, 0, 0, 0, 0x0a, 0x04];
const QUIET: Duration = Duration::from_millis(300);
const WAIT: Duration = Duration::from_secs(5);

fn text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

fn socket(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{}-{name}.sock", unique_name("xvio-vl")))
}

/// `--guest socket=…,mac=MAC[@VLAN]`.
fn guest_arg(socket: &Path, mac: [u8; 6], vlan: u16) -> String {
    let at = if vlan == 0 {
        String::new()
    } else {
        format!("@{vlan}")
    };
    format!("socket={},mac={}{at}", socket.display(), text(mac))
}

/// `frame` as a guest on its VLAN sees it: without its 802.1Q tag.
fn untagged(frame: &[u8]) -> Vec<u8> {
    let mut f = frame.to_vec();
    f.drain(12..16);
    f
}

fn default_guest_map() -> PathBuf {
    Path::new(xvio_common::PIN_ROOT).join("guests/guest_stats")
}

/// Guest `id`'s counters as the daemon published them last (after waiting for a publication).
fn guest_stats(map: &Path, id: u32) -> GuestStats {
    std::thread::sleep(Duration::from_millis(1500));
    let map = Map::Array(MapData::from_pin(map).unwrap());
    let array: Array<MapData, GuestStats> = Array::try_from(map).unwrap();
    array.get(&id, 0).unwrap()
}

fn port_stats(topo: &Topology) -> PortStats {
    let map = Map::Array(MapData::from_pin(topo.pin_dir().join(maps::PORT_STATS)).unwrap());
    let array: Array<MapData, PortStats> = Array::try_from(map).unwrap();
    array.get(&0, 0).unwrap()
}

fn xdp_stats(topo: &Topology) -> [XdpStats; 6] {
    let map = Map::PerCpuArray(MapData::from_pin(topo.pin_dir().join(maps::XDP_STATS)).unwrap());
    let array: PerCpuArray<MapData, XdpStats> = PerCpuArray::try_from(map).unwrap();
    xvio::stats::xdp_totals(&array).unwrap()
}

fn outcome(stats: &[XdpStats; 6], o: XdpOutcome) -> u64 {
    stats[o.index() as usize].packets
}

/// Connects a test guest to `socket` with RX buffers posted.
fn test_guest(socket: &Path) -> TestGuest {
    let mut g = TestGuest::connect(socket, 1 << VIRTIO_RING_F_EVENT_IDX);
    g.post_rx(16, 4096);
    g
}

/// Asserts that none of `guests` receives anything (for a while).
fn nothing_for(guests: &mut [(&str, &mut TestGuest)]) {
    std::thread::sleep(QUIET);
    for (name, g) in guests.iter_mut() {
        let got = g.receive(1, Duration::from_millis(50));
        assert!(got.is_empty(), "guest {name} received {got:02x?}");
    }
}

#[test]
fn guests_exchange_frames_within_their_vlan_only() {
    if !privileged("guests_exchange_frames_within_their_vlan_only") {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let pin_root = PathBuf::from("/sys/fs/bpf").join(unique_name("xvio-vl"));
    // A and B on VLAN 100, C on 200, D untagged, and E untagged with B's MAC (one MAC on two
    // VLANs is two ports).
    let sockets: Vec<PathBuf> = ["a", "b", "c", "d", "e"].map(socket).to_vec();
    let specs = [
        (MAC_A, 100),
        (MAC_B, 100),
        (MAC_C, 200),
        (MAC_D, 0),
        (MAC_B, 0),
    ];
    let mut args = Vec::new();
    for (s, (mac, vlan)) in sockets.iter().zip(specs) {
        args.push("--guest".to_owned());
        args.push(guest_arg(s, mac, vlan));
    }
    args.extend(["--pin-root".to_owned(), pin_root.display().to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let map = pin_root.join("guests/guest_stats");
    let daemon = Daemon::start(None, &args, &map).unwrap_or_else(|e| panic!("{e}"));
    let [mut a, mut b, mut c, mut d, mut e] = [0, 1, 2, 3, 4].map(|i| test_guest(&sockets[i]));
    wait_guests_ready(&map, 5).unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));

    // Within VLAN 100, untagged, to B and not to E (B's MAC, untagged).
    let to_b = frame(MAC_B, MAC_A, None, ETH_P_EXPERIMENTAL, 300, 1);
    a.send(&to_b);
    assert_eq!(b.receive(1, WAIT), vec![to_b], "{}", daemon.log());
    let flood = frame(BROADCAST, MAC_A, None, ETH_P_EXPERIMENTAL, 100, 2);
    a.send(&flood);
    assert_eq!(b.receive(1, WAIT), vec![flood]);
    // To C's MAC (VLAN 200): not C's; no interface, so nowhere. A tagged frame from an
    // access port: nowhere. Then one more to B, which B must get first.
    a.send(&frame(MAC_C, MAC_A, None, ETH_P_EXPERIMENTAL, 100, 3));
    a.send(&frame(MAC_B, MAC_A, Some(100), ETH_P_EXPERIMENTAL, 100, 4));
    let last = frame(MAC_B, MAC_A, None, ETH_P_EXPERIMENTAL, 100, 5);
    a.send(&last);
    assert_eq!(b.receive(1, WAIT), vec![last]);
    // Untagged: D's broadcast and D's frame to B's MAC reach E only.
    let flood = frame(BROADCAST, MAC_D, None, ETH_P_EXPERIMENTAL, 100, 6);
    d.send(&flood);
    let to_e = frame(MAC_B, MAC_D, None, ETH_P_EXPERIMENTAL, 100, 7);
    d.send(&to_e);
    assert_eq!(e.receive(2, WAIT), vec![flood, to_e]);
    nothing_for(&mut [
        ("A", &mut a),
        ("B", &mut b),
        ("C", &mut c),
        ("D", &mut d),
        ("E", &mut e),
    ]);
    let sa = guest_stats(&map, 0);
    assert_eq!(
        (sa.from_guest_packets, sa.from_guest_no_route),
        (3, 2),
        "A: three forwarded, the frame to another VLAN's MAC and the tagged one nowhere: {sa:?}"
    );
    assert_eq!(guest_stats(&map, 2).to_guest_packets, 0, "C got nothing");
    let (status, log) = daemon.terminate();
    assert!(status.success(), "{log}");
}

#[test]
fn frames_of_a_guests_vlan_cross_the_wire_tagged_and_reach_it_untagged() {
    if !privileged("frames_of_a_guests_vlan_cross_the_wire_tagged_and_reach_it_untagged") {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let topo = Topology::new(1);
    let _ = std::fs::remove_file(default_guest_map());
    let sockets: Vec<PathBuf> = ["a", "c", "d"].map(socket).to_vec();
    let (ga, gc, gd) = (
        guest_arg(&sockets[0], MAC_A, 100),
        guest_arg(&sockets[1], MAC_C, 200),
        guest_arg(&sockets[2], MAC_D, 0),
    );
    let daemon = topo.start(&["--guest", &ga, "--guest", &gc, "--guest", &gd]);
    let [mut a, mut c, mut d] = [0, 1, 2].map(|i| test_guest(&sockets[i]));
    wait_guests_ready(&default_guest_map(), 3).unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));

    // Each guest's entry is (MAC, VLAN), naming the guest.
    let steer = Map::HashMap(MapData::from_pin(topo.pin_dir().join(maps::STEER)).unwrap());
    let steer: HashMap<MapData, SteerKey, SteerValue> = HashMap::try_from(steer).unwrap();
    for (id, (mac, vlan)) in [(MAC_A, 100), (MAC_C, 200), (MAC_D, 0)]
        .into_iter()
        .enumerate()
    {
        let entry = steer.get(&SteerKey::new(mac, vlan), 0);
        assert_eq!(
            entry.map(|v| v.guest_id).ok(),
            Some(id as u32),
            "{mac:02x?}@{vlan}"
        );
    }
    assert!(
        steer.get(&SteerKey::new(MAC_A, 0), 0).is_err(),
        "not untagged"
    );

    let peer = mac_of(&topo.peer, &topo.peer_if);
    let raw = topo.peer.run(|| RawSocket::bind(&topo.peer_if).unwrap());
    let x0 = xdp_stats(&topo);
    // Unicast through XDP and AF_XDP: tagged 100 reaches A untagged; tagged 200 and untagged
    // to A's MAC pass to the kernel.
    let to_a = frame(MAC_A, peer, Some(100), ETH_P_EXPERIMENTAL, 200, 1);
    raw.send(&frame(MAC_A, peer, Some(200), ETH_P_EXPERIMENTAL, 200, 2))
        .unwrap();
    raw.send(&frame(MAC_A, peer, None, ETH_P_EXPERIMENTAL, 200, 3))
        .unwrap();
    raw.send(&to_a).unwrap();
    assert_eq!(
        a.receive(1, WAIT),
        vec![untagged(&to_a)],
        "{}",
        daemon.log()
    );
    // Broadcast through the tap (the kernel takes the tag out; the tap puts it back): to the
    // guests of the frame's VLAN only, untagged.
    for (vlan, seq) in [(Some(100), 4), (Some(200), 5), (None, 6)] {
        raw.send(&frame(BROADCAST, peer, vlan, ETH_P_EXPERIMENTAL, 120, seq))
            .unwrap();
    }
    let flood = |vlan, seq| frame(BROADCAST, peer, vlan, ETH_P_EXPERIMENTAL, 120, seq);
    assert_eq!(a.receive(1, WAIT), vec![untagged(&flood(Some(100), 4))]);
    assert_eq!(c.receive(1, WAIT), vec![untagged(&flood(Some(200), 5))]);
    assert_eq!(d.receive(1, WAIT), vec![flood(None, 6)]);
    nothing_for(&mut [("A", &mut a), ("C", &mut c), ("D", &mut d)]);
    let x1 = xdp_stats(&topo);
    assert_eq!(
        outcome(&x1, XdpOutcome::Redirected) - outcome(&x0, XdpOutcome::Redirected),
        1,
        "only the frame tagged 100 was steered"
    );
    assert!(outcome(&x1, XdpOutcome::Passed) - outcome(&x0, XdpOutcome::Passed) >= 2);

    // What A sends reaches the wire tagged 100, once: unicast (one copy into a UMEM frame),
    // broadcast (through a bounce buffer), and a 1514-byte frame (1518 with its tag).
    let counter = topo
        .peer
        .run(|| DropCounter::attach_from_vlan(&topo.peer_if, MAC_A, 100));
    a.send(&frame(peer, MAC_A, None, ETH_P_EXPERIMENTAL, 100, 10));
    a.send(&frame(BROADCAST, MAC_A, None, ETH_P_EXPERIMENTAL, 100, 11));
    a.send(&frame(peer, MAC_A, None, ETH_P_EXPERIMENTAL, 1514, 12));
    // Longer than a 2048-byte UMEM frame once tagged: oversize; a broadcast that long goes to
    // the guests of the VLAN (none here) and not to the wire, counted on the port.
    a.send(&frame(peer, MAC_A, None, ETH_P_EXPERIMENTAL, 2045, 13));
    a.send(&frame(BROADCAST, MAC_A, None, ETH_P_EXPERIMENTAL, 2045, 14));
    let start = std::time::Instant::now();
    while counter.count() < 3 && start.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(10));
    }
    let sa = guest_stats(&default_guest_map(), 0);
    assert_eq!(
        (counter.count(), counter.count_tagged()),
        (3, 3),
        "the peer got A's frames, each tagged once with VLAN 100: {sa:?}\n{}",
        daemon.log()
    );
    assert_eq!(
        (
            sa.to_guest_packets,
            sa.from_guest_packets,
            sa.from_guest_oversize
        ),
        (2, 4, 1),
        "{sa:?}"
    );
    // The port's counters are written about once a second.
    let start = std::time::Instant::now();
    while port_stats(&topo).tx_oversize == 0 && start.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(50));
    }
    let ps = port_stats(&topo);
    assert_eq!((ps.rx_no_guest, ps.tx_oversize), (0, 1), "{ps:?}");
    topo.peer.run(move || drop(counter));
    let (status, log) = daemon.terminate();
    assert!(status.success(), "{log}");
}

const GUEST: &str = "02:00:00:00:07:01";
const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x07, 0x01];

/// xvio on the host end with one guest on VLAN 100 served at a fresh socket.
fn daemon_with_vlan_guest(topo: &Topology, socket: &Path) -> Daemon {
    let _ = std::fs::remove_file(default_guest_map());
    let guest = format!("socket={},mac={GUEST}@100", socket.display());
    topo.start(&["--guest", &guest])
}

#[test]
fn an_rxonly_guest_on_a_vlan_receives_the_frames_tagged_with_it_and_no_others() {
    if !privileged("an_rxonly_guest_on_a_vlan_receives_the_frames_tagged_with_it_and_no_others") {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let topo = Topology::new(1);
    let socket = socket("rx");
    let daemon = daemon_with_vlan_guest(&topo, &socket);
    let rx = Testpmd::start(
        &socket,
        "rxonly",
        64,
        "02:00:00:00:00:02",
        &format!(",mac={GUEST}"),
        "1,0",
    );
    let map = default_guest_map();
    wait_guests_ready(&map, 1).unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    let src = mac_of(&topo.peer, &topo.peer_if);
    let raw = topo.peer.run(|| RawSocket::bind(&topo.peer_if).unwrap());
    let tagged = frame(GUEST_MAC, src, Some(100), ETH_P_EXPERIMENTAL, 64, 1);
    // testpmd posts its RX buffers a while after it says it forwards: probe until frames
    // get through, then count from there.
    let mut probes = 0;
    while guest_stats(&map, 0).to_guest_packets == 0 {
        probes += 1;
        assert!(probes < 10, "no frame reached the guest:\n{}", daemon.log());
        for _ in 0..16 {
            raw.send(&tagged).unwrap();
        }
    }
    let (g0, p0, x0) = (guest_stats(&map, 0), port_stats(&topo), xdp_stats(&topo));
    const FRAMES: u64 = 2000;
    for _ in 0..FRAMES {
        raw.send(&tagged).unwrap();
    }
    let (g1, p1, x1) = (guest_stats(&map, 0), port_stats(&topo), xdp_stats(&topo));
    // Tagged with another VLAN, or untagged: not the guest's.
    for _ in 0..FRAMES {
        raw.send(&frame(GUEST_MAC, src, Some(200), ETH_P_EXPERIMENTAL, 64, 2))
            .unwrap();
        raw.send(&frame(GUEST_MAC, src, None, ETH_P_EXPERIMENTAL, 64, 3))
            .unwrap();
    }
    let (g2, p2, x2) = (guest_stats(&map, 0), port_stats(&topo), xdp_stats(&topo));
    let (received, out) = rx.stop_keep_output();
    let delivered = g1.to_guest_packets - g0.to_guest_packets;
    let dropped = (g1.to_guest_dropped_full - g0.to_guest_dropped_full)
        + (g1.to_guest_dropped_small - g0.to_guest_dropped_small)
        + (g1.to_guest_dropped_reset - g0.to_guest_dropped_reset);
    let report = format!(
        "testpmd received {received:?} (with {} probes), xvio {g1:?}, port {p1:?}",
        g0.to_guest_packets
    );
    eprintln!("{report}");
    let redirected = outcome(&x1, XdpOutcome::Redirected) - outcome(&x0, XdpOutcome::Redirected);
    assert_eq!(
        redirected, FRAMES,
        "XDP steered every tagged frame: {report}"
    );
    assert_eq!(
        p1.rx_packets - p0.rx_packets,
        delivered + dropped + (p1.rx_no_guest - p0.rx_no_guest),
        "each frame the socket received was delivered or dropped by name: {report}"
    );
    assert!(delivered > FRAMES / 2, "frames flowed: {report}\n{out}");
    assert_eq!(
        g1.to_guest_bytes - g0.to_guest_bytes,
        delivered * 60,
        "each delivered without its 4-byte tag: {report}"
    );
    assert_eq!(
        received.rx, g1.to_guest_packets,
        "testpmd got what xvio delivered: {report}\n{out}"
    );
    assert_eq!(
        (g2.to_guest_packets, p2.rx_packets),
        (g1.to_guest_packets, p1.rx_packets),
        "nothing tagged 200 or untagged reached the guest's socket or the guest: {g2:?} {p2:?}"
    );
    assert_eq!(
        outcome(&x2, XdpOutcome::Redirected),
        outcome(&x1, XdpOutcome::Redirected)
    );
    assert!(
        outcome(&x2, XdpOutcome::Passed) - outcome(&x1, XdpOutcome::Passed) >= 2 * FRAMES,
        "they passed to the kernel"
    );
    let (status, log) = daemon.terminate();
    assert!(status.success(), "{log}");
}

#[test]
fn a_txonly_guest_on_a_vlan_reaches_the_peer_tagged_with_it() {
    if !privileged("a_txonly_guest_on_a_vlan_reaches_the_peer_tagged_with_it") {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let topo = Topology::new(1);
    let counter = topo
        .peer
        .run(|| DropCounter::attach_from_vlan(&topo.peer_if, GUEST_MAC, 100));
    let peer = text(mac_of(&topo.peer, &topo.peer_if));
    let socket = socket("tx");
    let daemon = daemon_with_vlan_guest(&topo, &socket);
    // 1514-byte frames: 1518 on the wire, which a 2048-byte UMEM frame holds.
    let tx = Testpmd::start(
        &socket,
        "txonly",
        1514,
        &peer,
        &format!(",mac={GUEST}"),
        "0,1",
    );
    let map = default_guest_map();
    wait_guests_ready(&map, 1).unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    assert!(
        tx.wait_forwarding(),
        "testpmd txonly forwards:\n{}",
        tx.output()
    );
    std::thread::sleep(Duration::from_secs(3));
    let (sent, out) = tx.stop_keep_output();
    let g = guest_stats(&map, 0);
    let p = port_stats(&topo);
    let (counted, tagged) = (counter.count(), counter.count_tagged());
    let report = format!(
        "testpmd sent {}, xvio {g:?}, port {p:?}, peer counted {counted}, tagged {tagged}",
        sent.tx
    );
    eprintln!("{report}");
    assert!(
        counted > 1000,
        "frames reached the peer: {report}\n{out}\n{}",
        daemon.log()
    );
    assert_eq!(
        tagged, counted,
        "every frame reached the peer tagged once with VLAN 100: {report}"
    );
    assert_eq!(g.from_guest_oversize, 0, "1514 + 4 fits: {report}");
    assert_eq!(
        g.from_guest_packets, p.tx_packets,
        "each frame xvio forwarded went into the tx ring: {report}"
    );
    let veth_dropped = topo
        .host
        .command("cat")
        .arg(format!(
            "/sys/class/net/{}/statistics/tx_dropped",
            topo.ifname
        ))
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse()
                .unwrap_or(0)
        })
        .unwrap_or(0u64);
    assert_eq!(
        p.tx_packets,
        counted + veth_dropped,
        "each frame in the tx ring reached the peer or the veth dropped it: {report}"
    );
    topo.peer.run(move || drop(counter));
    let (status, log) = daemon.terminate();
    assert!(status.success(), "{log}");
}
