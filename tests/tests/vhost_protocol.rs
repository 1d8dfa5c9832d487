//! The vhost-user-net backend against a real vhost-user frontend (the `vhost` crate's) over
//! UNIX sockets with memfd memory: negotiation, config space, frames between guests through
//! the switch, broadcast, hostile descriptor chains, and a guest reconnecting. In-process:
//! no root needed.

use std::{
    path::PathBuf,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::Duration,
};

use vhost::{VhostBackend, vhost_user::VhostUserFrontend};
use virtio_bindings::{
    virtio_config::VIRTIO_F_VERSION_1,
    virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS},
    virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VRING_USED_F_NO_NOTIFY},
};
use xvio::{
    config::{GuestSpec, MacAddr, SocketMode},
    datapath::Datapath,
    vhost::{guest::Guest, net::MAX_FRAME},
};
use xvio_tests::{
    frames::{ETH_P_EXPERIMENTAL, frame},
    guest::{BUFFERS, LOG_PAGE, TestGuest},
    unique_name,
};

const MAC_A: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x0a];
const MAC_B: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x0b];
const MAC_C: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x0c];
const WAIT: Duration = Duration::from_secs(5);
/// EVENT_IDX is left out by this simple driver (it reads no avail_event/used_event).
const REFUSE: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;

fn socket() -> PathBuf {
    std::env::temp_dir().join(format!("{}.sock", unique_name("xvio-vu-")))
}

fn start(switch: &Arc<Datapath>, mac: [u8; 6]) -> Guest {
    let spec = GuestSpec {
        socket: socket(),
        mac: MacAddr(mac),
        vlan: 0,
        queues: 1,
        mode: SocketMode::Server,
    };
    Guest::start(&spec, switch).expect("start the guest's backend")
}

/// Guests with `macs` on `switch`, each with a test driver connected (EVENT_IDX refused).
fn connected<const N: usize>(
    switch: &Arc<Datapath>,
    macs: [[u8; 6]; N],
) -> ([Guest; N], [TestGuest; N]) {
    let guests = macs.map(|mac| start(switch, mac));
    let drivers = guests.each_ref().map(|g| TestGuest::attach(g, REFUSE));
    (guests, drivers)
}

/// A guest whose RX copies all go to a software DMA channel (threshold 0).
fn start_with_sw_dma(switch: &Arc<Datapath>, mac: [u8; 6]) -> Guest {
    let pool = std::sync::Mutex::new(
        xvio::copy::ChannelPool::start(
            &[xvio::config::DmaSpec::Sw { core: None }],
            xvio::config::ThresholdArg::Bytes(0),
        )
        .unwrap(),
    );
    let spec = GuestSpec {
        socket: socket(),
        mac: MacAddr(mac),
        vlan: 0,
        queues: 1,
        mode: SocketMode::Server,
    };
    Guest::start_with_dma(&spec, switch, Some(&pool)).expect("start the guest's backend")
}

#[test]
fn negotiation_offers_the_features_and_the_config_space_has_the_mac() {
    let switch = Datapath::start(&[], xvio::datapath::worker::IDLE_BEFORE_PARK).unwrap();
    let a = start(&switch, MAC_A);
    let mut g = TestGuest::attach(&a, 0);
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
    ] {
        assert_ne!(g.features & (1 << bit), 0, "feature bit {bit} offered");
    }
    let offered = g.frontend.get_features().unwrap();
    assert_ne!(
        offered & xvio_tests::guest::LOG_ALL,
        0,
        "LOG_ALL offered for migration"
    );
    let config = g.config();
    assert_eq!(&config[..6], &MAC_A);
    assert_eq!(u16::from_le_bytes([config[6], config[7]]), 1, "link up");
    assert_eq!(
        u16::from_le_bytes([config[8], config[9]]),
        1,
        "one queue pair"
    );
}

#[test]
fn frames_from_a_arrive_byte_identical_at_b_and_broadcast_reaches_all_others() {
    let switch = Datapath::start(&[], xvio::datapath::worker::IDLE_BEFORE_PARK).unwrap();
    a_to_b_and_broadcast(&switch);
}

/// The CPUs for two workers: 0 and 1, or both on 0 on a machine with one CPU.
fn two_worker_cpus() -> [usize; 2] {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2 {
        [0, 1]
    } else {
        [0, 0]
    }
}

/// Two workers (on CPUs 0 and 1, or both on 0 with one CPU): A's TX queue is the second
/// worker's, B's the first's; each delivers into the other's RX queue.
#[test]
fn on_two_workers_frames_cross_between_guests_polled_by_different_workers() {
    let switch =
        Datapath::start(&two_worker_cpus(), xvio::datapath::worker::IDLE_BEFORE_PARK).unwrap();
    assert_eq!(switch.workers(), 2);
    let ([a, b, _c], [mut ga, mut gb, _gc]) = a_to_b_and_broadcast(&switch);
    let back: Vec<Vec<u8>> = (0..20)
        .map(|i| {
            frame(
                MAC_A,
                MAC_B,
                None,
                ETH_P_EXPERIMENTAL,
                1500 - i * 50,
                100 + i as u32,
            )
        })
        .collect();
    ga.post_rx(32, 2048);
    gb.send_all(&back);
    assert_eq!(
        ga.receive(back.len(), WAIT),
        back,
        "A receives B's frames, in order"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(b.counters().from_guest_packets.load(Relaxed), 20);
    assert_eq!(a.counters().to_guest_packets.load(Relaxed), 20);
}

/// Two workers: A's TX queue is the second worker's; B's RX queue has a DMA channel, whose
/// copies either worker completes. 600 frames in rounds, more than a worker's 512 bounce
/// buffers: buffers completed by the other worker must come home, or A's frames would be
/// dropped for want of one.
#[test]
fn on_two_workers_copies_into_a_dma_queue_complete_and_their_buffers_come_home() {
    let switch =
        Datapath::start(&two_worker_cpus(), xvio::datapath::worker::IDLE_BEFORE_PARK).unwrap();
    let a = start(&switch, MAC_A);
    let b = start_with_sw_dma(&switch, MAC_B);
    let mut ga = TestGuest::attach(&a, REFUSE);
    let mut gb = TestGuest::attach(&b, REFUSE);
    for round in 0..12u32 {
        gb.post_rx(50, 2048);
        let sent: Vec<Vec<u8>> = (0..50u32)
            .map(|i| {
                let len = 64 + (i as usize * 29) % 1400;
                frame(MAC_B, MAC_A, None, ETH_P_EXPERIMENTAL, len, round * 50 + i)
            })
            .collect();
        ga.send_all(&sent);
        assert_eq!(
            gb.receive(sent.len(), WAIT),
            sent,
            "round {round}, in order"
        );
        ga.take_used(1);
    }
    std::thread::sleep(Duration::from_millis(300));
    let ca = a.counters();
    assert_eq!(ca.from_guest_packets.load(Relaxed), 600);
    assert_eq!(
        ca.from_guest_dropped_full.load(Relaxed),
        0,
        "bounce buffers came home"
    );
    assert_eq!(b.counters().to_guest_packets.load(Relaxed), 600);
    let stats = b.copy_stats();
    assert!(stats.dma_copies >= 600, "through the channel: {stats:?}");
}

/// A sends 20 frames to B and a broadcast (B and C get it), and one to a MAC nobody has.
fn a_to_b_and_broadcast(switch: &Arc<Datapath>) -> ([Guest; 3], [TestGuest; 3]) {
    let ([a, b, c], [mut ga, mut gb, mut gc]) = connected(switch, [MAC_A, MAC_B, MAC_C]);
    gb.post_rx(32, 2048);
    gc.post_rx(32, 2048);
    ga.post_rx(32, 2048);
    let sent: Vec<Vec<u8>> = (0..20)
        .map(|i| {
            frame(
                MAC_B,
                MAC_A,
                None,
                ETH_P_EXPERIMENTAL,
                60 + i * 70,
                i as u32,
            )
        })
        .collect();
    ga.send_all(&sent);
    let got = gb.receive(sent.len(), WAIT);
    assert_eq!(got, sent, "B receives A's frames, identical and in order");
    assert!(gb.wait_call(0, WAIT), "B was notified");
    let used_tx = ga.take_used(1);
    assert_eq!(used_tx.len(), sent.len(), "A's TX chains are all completed");

    let bcast = frame([0xff; 6], MAC_A, None, ETH_P_EXPERIMENTAL, 100, 99);
    ga.send(&bcast);
    assert_eq!(gb.receive(1, WAIT), vec![bcast.clone()]);
    assert_eq!(gc.receive(1, WAIT), vec![bcast.clone()]);
    assert!(
        ga.receive(1, Duration::from_millis(200)).is_empty(),
        "not back to the sender"
    );
    assert!(
        gc.receive(1, Duration::from_millis(200)).is_empty(),
        "C saw only the broadcast"
    );

    ga.send(&frame(
        [0x52, 0x54, 0, 0, 0, 0x77],
        MAC_A,
        None,
        ETH_P_EXPERIMENTAL,
        64,
        1,
    ));
    std::thread::sleep(Duration::from_millis(200));
    let ca = a.counters();
    assert_eq!(ca.from_guest_packets.load(Relaxed), 21, "forwarded");
    assert_eq!(
        ca.from_guest_no_route.load(Relaxed),
        1,
        "an unknown MAC with no interface to send on is counted"
    );
    assert_eq!(b.counters().to_guest_packets.load(Relaxed), 21);
    assert_eq!(
        b.counters().to_guest_bytes.load(Relaxed),
        sent.iter().map(|f| f.len() as u64).sum::<u64>() + 100
    );
    ([a, b, c], [ga, gb, gc])
}

#[test]
fn frames_without_rx_buffers_are_dropped_and_frames_spread_over_merged_buffers() {
    let switch = Datapath::start(&[], xvio::datapath::worker::IDLE_BEFORE_PARK).unwrap();
    let ([_a, b], [mut ga, mut gb]) = connected(&switch, [MAC_A, MAC_B]);
    let big = frame(MAC_B, MAC_A, None, ETH_P_EXPERIMENTAL, 1514, 7);
    ga.send(&big);
    let deadline = std::time::Instant::now() + WAIT;
    while b.counters().to_guest_dropped_full.load(Relaxed) == 0
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        b.counters().to_guest_dropped_full.load(Relaxed),
        1,
        "no RX buffers: the frame is dropped and counted (as OVS and DPDK do)"
    );
    // 512-byte buffers: 12 + 1514 bytes take three, num_buffers says so.
    gb.post_rx(3, 512);
    ga.send(&big);
    assert!(gb.wait_call(0, WAIT));
    let used = gb.take_used(0);
    assert_eq!(used.iter().map(|u| u.1).sum::<u32>(), 12 + 1514);
    assert_eq!(used.len(), 3);
    let mut hdr = [0u8; 12];
    vm_memory::Bytes::read_slice(&gb.mem, &mut hdr, vm_memory::GuestAddress(BUFFERS)).unwrap();
    assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 3, "num_buffers");
}

#[test]
fn hostile_chains_are_completed_empty_counted_and_hurt_nobody_else() {
    let switch = Datapath::start(&[], xvio::datapath::worker::IDLE_BEFORE_PARK).unwrap();
    let ([a, b], [mut ga, mut gb]) = connected(&switch, [MAC_A, MAC_B]);
    gb.post_rx(8, 2048);
    // Outside guest memory; a loop; a device-writable TX descriptor; too short; too long; a
    // frame to B one byte longer than the datapath moves (it fits the bounce buffer, which
    // also holds the header).
    ga.add_raw_chain(1, &[(0xdead_0000_0000, 100, false)], None);
    let first = ga.next_desc(1);
    ga.add_raw_chain(
        1,
        &[(BUFFERS, 64, false), (BUFFERS + 64, 64, false)],
        Some(first),
    );
    ga.add_raw_chain(1, &[(BUFFERS, 64, true)], None);
    ga.add_raw_chain(1, &[(BUFFERS, 20, false)], None);
    ga.add_raw_chain(1, &[(BUFFERS, 60_000, false)], None);
    ga.send(&frame(
        MAC_B,
        MAC_A,
        None,
        ETH_P_EXPERIMENTAL,
        MAX_FRAME + 1,
        4,
    ));
    let ok = frame(MAC_B, MAC_A, None, ETH_P_EXPERIMENTAL, 200, 5);
    ga.send(&ok);
    assert_eq!(
        gb.receive(1, WAIT),
        vec![ok],
        "the next good frame still flows"
    );
    let used = ga.take_used(1);
    assert_eq!(used.len(), 7, "every chain completed: {used:?}");
    assert!(used.iter().all(|u| u.1 == 0), "with length 0");
    let c = a.counters();
    assert_eq!(
        c.malformed_chains.load(Relaxed),
        4,
        "outside, loop, writable, short"
    );
    assert_eq!(
        c.from_guest_oversize.load(Relaxed),
        2,
        "too long, and one byte over the largest frame"
    );
    let to_b = b.counters();
    assert_eq!(
        (
            to_b.to_guest_packets.load(Relaxed),
            to_b.to_guest_dropped_small.load(Relaxed)
        ),
        (1, 0),
        "B got the good frame only, and nothing cut short"
    );

    // An RX buffer outside memory at C: completed empty, counted, the frame dropped; C's
    // next buffer works.
    let c = start(&switch, MAC_C);
    let mut gc = TestGuest::attach(&c, REFUSE);
    gc.add_raw_chain(0, &[(0xdead_0000_0000, 2048, true)], None);
    gc.post_rx(1, 2048);
    ga.send(&frame(MAC_C, MAC_A, None, ETH_P_EXPERIMENTAL, 100, 6));
    let second = frame(MAC_C, MAC_A, None, ETH_P_EXPERIMENTAL, 100, 7);
    ga.send(&second);
    assert_eq!(
        gc.receive(2, WAIT),
        vec![Vec::new(), second],
        "the bad buffer comes back empty"
    );
    assert_eq!(c.counters().malformed_chains.load(Relaxed), 1);
    assert_eq!(
        c.counters().to_guest_dropped_malformed.load(Relaxed),
        1,
        "the frame that met the bad buffer is counted as the guest's drop"
    );
}

#[test]
fn an_avail_index_jump_stops_only_that_queue_until_reset() {
    let switch = Datapath::start(&[], xvio::datapath::worker::IDLE_BEFORE_PARK).unwrap();
    let ([a, _b, _c], [mut ga, mut gb, mut gc]) = connected(&switch, [MAC_A, MAC_B, MAC_C]);
    gb.post_rx(4, 2048);
    gc.post_rx(4, 2048);
    // A makes one chain available, then claims 200 (queue size 64).
    ga.add_raw_chain(1, &[(BUFFERS, 100, false)], None);
    ga.set_avail_idx(1, 200);
    ga.kick(1);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(a.counters().broken_queues.load(Relaxed), 1);
    // The others keep talking.
    let mut gc2 = gc;
    let f = frame(MAC_B, MAC_C, None, ETH_P_EXPERIMENTAL, 80, 1);
    gc2.send(&f);
    assert_eq!(gb.receive(1, WAIT), vec![f]);
}

#[test]
fn a_guest_that_disconnects_and_reconnects_is_served_again() {
    let switch = Datapath::start(&[], xvio::datapath::worker::IDLE_BEFORE_PARK).unwrap();
    let (a, b) = (start(&switch, MAC_A), start(&switch, MAC_B));
    let mut gb = TestGuest::attach(&b, REFUSE);
    gb.post_rx(16, 2048);
    let first = TestGuest::attach(&a, REFUSE);
    drop(first);
    std::thread::sleep(Duration::from_millis(200));
    let mut ga = TestGuest::attach(&a, REFUSE);
    let f = frame(MAC_B, MAC_A, None, ETH_P_EXPERIMENTAL, 300, 3);
    ga.send(&f);
    assert_eq!(
        gb.receive(1, WAIT),
        vec![f],
        "frames flow after the reconnect"
    );
    // And the other way: B to the new A.
    ga.post_rx(4, 2048);
    let back = frame(MAC_A, MAC_B, None, ETH_P_EXPERIMENTAL, 90, 4);
    gb.send(&back);
    assert_eq!(ga.receive(1, WAIT), vec![back]);
}

#[test]
fn frames_reach_b_through_the_software_dma_channel_in_order() {
    let switch = Datapath::start(&[], xvio::datapath::worker::IDLE_BEFORE_PARK).unwrap();
    let a = start(&switch, MAC_A);
    let b = start_with_sw_dma(&switch, MAC_B);
    let mut ga = TestGuest::attach(&a, REFUSE);
    let mut gb = TestGuest::attach(&b, REFUSE);
    // Small buffers, so that big frames spread over several (MRG_RXBUF) and pieces multiply.
    gb.post_rx(60, 1024);
    let sent: Vec<Vec<u8>> = (0..40)
        .map(|i| {
            frame(
                MAC_B,
                MAC_A,
                None,
                ETH_P_EXPERIMENTAL,
                60 + i * 37 % 1455,
                i as u32,
            )
        })
        .collect();
    let mut got = Vec::new();
    for chunk in sent.chunks(10) {
        for f in chunk {
            ga.send(f);
        }
        got.extend(gb.receive_merged(chunk.len(), WAIT));
    }
    assert_eq!(
        got.len(),
        sent.len(),
        "every frame arrived: {:?}",
        b.copy_stats()
    );
    for (i, (g, s)) in got.iter().zip(&sent).enumerate() {
        assert!(g == s, "frame {i} is byte-identical and in order");
    }
    let stats = b.copy_stats();
    assert!(
        stats.dma_copies >= sent.len() as u64,
        "the copies went to the channel: {stats:?}"
    );
    assert_eq!(stats.inflight, 0, "{stats:?}");
}

/// Live migration's dirty log: once the frontend shares a log and acks `VHOST_F_LOG_ALL`,
/// every guest page the backend writes is marked, whether the CPU copied the frame (through
/// vm-memory) or a DMA channel did (through raw pointers, marked by the copy engine), and the
/// pages it did not write stay clean.
#[test]
fn pages_written_during_a_migration_are_marked_in_the_dirty_log() {
    let switch = Datapath::start(&[], xvio::datapath::worker::IDLE_BEFORE_PARK).unwrap();
    let a = start(&switch, MAC_A);
    let cpu = start(&switch, MAC_B);
    let dma = start_with_sw_dma(&switch, MAC_C);
    let mut ga = TestGuest::attach(&a, REFUSE);
    let mut receivers = [
        ("cpu", TestGuest::attach(&cpu, REFUSE), MAC_B),
        ("dma", TestGuest::attach(&dma, REFUSE), MAC_C),
    ];
    for (name, g, mac) in &mut receivers {
        // Before the migration: frames land, nothing is logged anywhere.
        g.post_rx(4, 2048);
        for i in 0..4 {
            ga.send(&frame(*mac, MAC_A, None, ETH_P_EXPERIMENTAL, 600, i));
        }
        assert_eq!(g.receive(4, WAIT).len(), 4, "{name}: frames before the log");

        let log = g.start_dirty_log();
        let start = g.next_buffer();
        // One jumbo frame per 8 KiB buffer: the header goes through vm-memory into the
        // buffer's first page; the second page is written by the frame's copy alone.
        let n = 12;
        g.post_rx(n, 8192);
        let end = g.next_buffer();
        let sent: Vec<Vec<u8>> = (0..n)
            .map(|i| frame(*mac, MAC_A, None, ETH_P_EXPERIMENTAL, 6000, 100 + i as u32))
            .collect();
        ga.send_all(&sent);
        let got = g.receive(n, WAIT);
        assert_eq!(got, sent, "{name}: frames during the migration");
        let mut page = start / LOG_PAGE * LOG_PAGE;
        while page < end {
            assert!(
                log.is_dirty(page),
                "{name}: RX buffer page {page:#x} is marked"
            );
            page += LOG_PAGE;
        }
        assert!(
            log.is_dirty(g.used_ring(0)),
            "{name}: the used ring's page is marked"
        );
        // Pages the backend never wrote: the TX queue's descriptor table (the driver writes
        // it), and memory no buffer uses.
        assert!(!log.is_dirty(0x8000), "{name}: TX descriptor page is clean");
        assert!(
            !log.is_dirty(xvio_tests::guest::MEMORY as u64 - 1),
            "{name}: unused memory is clean"
        );
    }
    let stats = dma.copy_stats();
    assert!(
        stats.dma_copies >= 12,
        "the DMA guest's copies went to the channel: {stats:?}"
    );
}

/// A frontend that shares a dirty log shorter than it says (a memfd of 0 bytes announced as
/// a page): the backend must not map past the end of the file (touching it would raise
/// SIGBUS and kill the daemon); it drops that connection and serves the next one.
#[test]
fn a_dirty_log_shorter_than_announced_is_refused() {
    let switch = Datapath::start(&[], xvio::datapath::worker::IDLE_BEFORE_PARK).unwrap();
    let ([_a, b], [mut ga, mut gb]) = connected(&switch, [MAC_A, MAC_B]);
    gb.post_rx(4, 2048);
    let refused = gb.share_log(0, 4096);
    assert!(
        refused.is_err(),
        "a log past the end of its file is refused"
    );
    // Had the log been installed, this write into B would touch it.
    ga.send(&frame(MAC_B, MAC_A, None, ETH_P_EXPERIMENTAL, 100, 1));
    std::thread::sleep(Duration::from_millis(200));
    drop(gb);
    let mut gb = TestGuest::attach(&b, REFUSE);
    gb.post_rx(4, 2048);
    let f = frame(MAC_B, MAC_A, None, ETH_P_EXPERIMENTAL, 100, 2);
    ga.send(&f);
    // The first frame may wait for the next connection (it came while none was there).
    let got = gb.receive(2, Duration::from_secs(1));
    assert_eq!(got.last(), Some(&f), "the next connection is served");
}

/// A frontend whose memory file is shorter than the region it announces: mapping it would
/// let the first descriptor read past the file's end raise SIGBUS and end the daemon (vm-memory
/// 0.18 does not check); the backend refuses the table, drops that connection and serves the
/// next one.
#[test]
fn a_memory_region_past_the_end_of_its_file_is_refused() {
    let switch = Datapath::start(&[], xvio::datapath::worker::IDLE_BEFORE_PARK).unwrap();
    let a = start(&switch, MAC_A);
    let b = start(&switch, MAC_B);
    let mut ga = TestGuest::attach(&a, REFUSE);
    // Half the memory is backed: rings and the first buffers are, the rest is not.
    let short = xvio_tests::guest::MEMORY as u64 / 2;
    // The frontend does not wait for acks, so the set-up may look fine: a request that needs
    // a reply tells whether the backend hung up.
    if let Ok(gb) = TestGuest::try_connect(b.socket(), REFUSE, short) {
        assert!(
            gb.frontend.get_features().is_err(),
            "a memory table past the end of its file was accepted"
        );
    }
    let mut gb = TestGuest::attach(&b, REFUSE);
    gb.post_rx(4, 2048);
    let f = frame(MAC_B, MAC_A, None, ETH_P_EXPERIMENTAL, 100, 2);
    ga.send(&f);
    assert_eq!(
        gb.receive(1, WAIT),
        vec![f],
        "the next connection is served"
    );
}

fn spec_at(socket: PathBuf) -> GuestSpec {
    GuestSpec {
        socket,
        mac: MacAddr(MAC_A),
        vlan: 0,
        queues: 1,
        mode: SocketMode::Server,
    }
}

/// A socket file nobody listens on (a daemon that died) is replaced, and served; when the
/// guest goes, its socket goes with it.
#[test]
fn a_stale_socket_is_replaced_and_served() {
    let path = socket();
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists(), "the stale socket file stays behind");
    let switch = Datapath::start(&[], xvio::datapath::worker::IDLE_BEFORE_PARK).unwrap();
    let a = Guest::start(&spec_at(path.clone()), &switch).expect("a stale socket is replaced");
    let mut g = TestGuest::connect(a.socket(), REFUSE);
    assert_eq!(&g.config()[..6], &MAC_A, "the new socket is served");
    drop(g);
    drop(a);
    assert!(!path.exists(), "the guest removed its socket");
}

/// A socket another process listens on (another daemon, a VMM) is not stolen: the start
/// fails, naming it, and connections still reach the process listening.
#[test]
fn a_socket_someone_listens_on_is_not_taken_over() {
    let path = socket();
    let theirs = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let switch = Datapath::start(&[], xvio::datapath::worker::IDLE_BEFORE_PARK).unwrap();
    let err = Guest::start(&spec_at(path.clone()), &switch)
        .expect_err("a socket in use must not be taken over")
        .to_string();
    assert!(err.contains("listening"), "{err}");
    assert!(err.contains(&path.display().to_string()), "{err}");
    // The probe that told it was in use, then a client: both reach the listener.
    theirs.set_nonblocking(true).unwrap();
    let _client = std::os::unix::net::UnixStream::connect(&path).unwrap();
    let accepted = (0..2).filter(|_| theirs.accept().is_ok()).count();
    assert_eq!(accepted, 2, "connections still reach the process listening");
    let _ = std::fs::remove_file(&path);
}

/// Whatever else is at the socket path is left alone: a regular file, a directory, a
/// symlink (not followed), each refused with an error that names it.
#[test]
fn a_file_that_is_not_a_socket_is_left_alone() {
    let switch = Datapath::start(&[], xvio::datapath::worker::IDLE_BEFORE_PARK).unwrap();
    let file = socket();
    std::fs::write(&file, b"precious").unwrap();
    let dir = socket();
    std::fs::create_dir(&dir).unwrap();
    let target = socket();
    std::fs::write(&target, b"also precious").unwrap();
    let link = socket();
    std::os::unix::fs::symlink(&target, &link).unwrap();
    for (path, kind) in [
        (&file, "regular file"),
        (&dir, "directory"),
        (&link, "symlink"),
    ] {
        let err = Guest::start(&spec_at(path.clone()), &switch)
            .expect_err("only a stale socket may be replaced")
            .to_string();
        assert!(err.contains(kind) && err.contains("not a socket"), "{err}");
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");
    assert!(dir.is_dir());
    assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
    assert_eq!(std::fs::read(&target).unwrap(), b"also precious");
    for path in [&file, &link, &target] {
        let _ = std::fs::remove_file(path);
    }
    let _ = std::fs::remove_dir(&dir);
}

/// A socket in a directory that does not exist: an error that says so.
#[test]
fn a_socket_in_a_missing_directory_is_reported() {
    let path = std::env::temp_dir()
        .join(unique_name("xvio-nodir-"))
        .join("vm.sock");
    let switch = Datapath::start(&[], xvio::datapath::worker::IDLE_BEFORE_PARK).unwrap();
    let err = Guest::start(&spec_at(path.clone()), &switch)
        .expect_err("no directory, no socket")
        .to_string();
    assert!(err.contains("directory does not exist"), "{err}");
    assert!(!path.parent().unwrap().exists());
}

/// A guest going away removes its own socket, not a file that has taken its place.
#[test]
fn a_guest_removes_only_its_own_socket() {
    let path = socket();
    let switch = Datapath::start(&[], xvio::datapath::worker::IDLE_BEFORE_PARK).unwrap();
    let a = Guest::start(&spec_at(path.clone()), &switch).unwrap();
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, b"someone else's").unwrap();
    drop(a);
    assert_eq!(std::fs::read(&path).unwrap(), b"someone else's");
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_tx_queue_disabled_while_the_worker_polls_it_is_asked_to_kick_before_the_worker_sleeps() {
    // A worker that polls for half a second after its last frame.
    let switch = Datapath::start(&[], Duration::from_millis(500)).unwrap();
    let ([_a, _b], [mut ga, mut gb]) = connected(&switch, [MAC_A, MAC_B]);
    gb.post_rx(1, 2048);
    let f = frame(MAC_B, MAC_A, None, ETH_P_EXPERIMENTAL, 100, 1);
    ga.send(&f);
    assert_eq!(gb.receive(1, WAIT), vec![f]);
    let used_flags = |g: &TestGuest| {
        vm_memory::Bytes::read_obj::<u16>(&g.mem, vm_memory::GuestAddress(g.used_ring(1))).unwrap()
    };
    assert_ne!(
        used_flags(&ga) & VRING_USED_F_NO_NOTIFY as u16,
        0,
        "while the worker polls A's TX queue, A is asked not to kick"
    );
    // SET_VRING_ENABLE 0 (the library tells the backend nothing): when the driver enables
    // the queue again, it must kick a worker that sleeps by then.
    ga.frontend.set_vring_enable(1, false).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        used_flags(&ga) & VRING_USED_F_NO_NOTIFY as u16,
        0,
        "the sleeping worker left A's disabled TX queue asked not to kick"
    );
}

/// Tries to connect to the UNIX socket at `path` as user and group 65534 (nobody), in a child
/// process: the error, or `None` when it connected.
fn connect_as_nobody(path: &std::path::Path) -> Option<std::io::Error> {
    use std::os::unix::{ffi::OsStrExt, process::CommandExt};
    // SAFETY: sockaddr_un is plain bytes, valid all zero.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(path.as_os_str().as_bytes()) {
        *dst = src as libc::c_char;
    }
    let mut cmd = std::process::Command::new("/bin/true");
    // SAFETY: between fork and exec the child only makes system calls on its own values; an
    // error ends the spawn and comes back to the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(65534) != 0
                || libc::setuid(65534) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            if libc::connect(fd, (&raw const addr).cast(), len) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    match cmd.spawn() {
        Ok(mut child) => {
            let _ = child.wait();
            None
        }
        Err(e) => Some(e),
    }
}

#[test]
fn only_the_daemons_user_can_reach_the_librarys_side_of_the_shim() {
    if !xvio_tests::privileged("only_the_daemons_user_can_reach_the_librarys_side_of_the_shim") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let inner = xvio::vhost::compat::InnerListener::new().unwrap();
    let path = inner
        .addr()
        .as_pathname()
        .expect("a socket file")
        .to_owned();
    let dir = path.parent().unwrap().to_owned();
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "{}", dir.display());
    let refused = connect_as_nobody(&path);
    assert_eq!(
        refused.as_ref().and_then(|e| e.raw_os_error()),
        Some(libc::EACCES),
        "another user cannot connect ahead of the shim: {refused:?}"
    );
    let _shim = std::os::unix::net::UnixStream::connect(&path).expect("the daemon's user can");
    let listener = inner.into_listener().unwrap();
    assert!(
        !dir.exists(),
        "nothing stays on disk once the shim connected"
    );
    listener
        .accept()
        .expect("the shim's connection waits for the library");
}

#[test]
fn a_client_whose_vmm_hangs_up_at_once_reconnects_backing_off() {
    let switch = Datapath::start(&[], xvio::datapath::worker::IDLE_BEFORE_PARK).unwrap();
    let path = socket();
    // A "VMM" that accepts and hangs up at once, every time.
    let vmm = std::os::unix::net::UnixListener::bind(&path).unwrap();
    vmm.set_nonblocking(true).unwrap();
    let spec = GuestSpec {
        socket: path.clone(),
        mac: MacAddr(MAC_A),
        vlan: 0,
        queues: 1,
        mode: SocketMode::Client,
    };
    let guest = Guest::start(&spec, &switch).expect("start the guest's backend");
    let start = std::time::Instant::now();
    let mut connections = 0;
    while start.elapsed() < Duration::from_secs(2) {
        match vmm.accept() {
            Ok((stream, _)) => {
                connections += 1;
                drop(stream);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    drop(guest);
    let _ = std::fs::remove_file(&path);
    // 100, 200, 400, 800 ms apart: a handful, not a tight loop.
    assert!(
        (2..=8).contains(&connections),
        "{connections} connections in 2 s"
    );
}
