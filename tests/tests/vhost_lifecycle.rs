//! A guest's device through its life on one connection, against the `vhost` crate's
//! frontend with memfd memory: a driver that stops and restarts its queues (a reload, a
//! reboot) finds them working again, and a memory table sent again while RX copies are in
//! flight on a DMA channel leaves the backend standing and the frames intact. In-process:
//! no root needed.

use std::{
    path::PathBuf,
    sync::{Mutex, atomic::Ordering::Relaxed},
    time::Duration,
};

use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use xvio::{
    config::{DmaSpec, GuestSpec, MacAddr, SocketMode, ThresholdArg},
    copy::ChannelPool,
    datapath::Datapath,
    vhost::guest::Guest,
};
use xvio_tests::{
    frames::{ETH_P_EXPERIMENTAL, frame},
    guest::{BUFFERS, TestGuest},
    unique_name,
};

const MAC_A: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x01, 0x0a];
const MAC_B: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x01, 0x0b];
const WAIT: Duration = Duration::from_secs(5);
/// EVENT_IDX is left out by this simple driver (it reads no avail_event/used_event).
const REFUSE: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;

fn spec(mac: [u8; 6]) -> GuestSpec {
    let socket: PathBuf = std::env::temp_dir().join(format!("{}.sock", unique_name("xvio-life-")));
    GuestSpec {
        socket,
        mac: MacAddr(mac),
        vlan: 0,
        queues: 1,
        mode: SocketMode::Server,
    }
}

#[test]
fn queues_broken_by_a_hostile_driver_work_again_after_it_restarts_them() {
    let switch = Datapath::start(&[], xvio::datapath::worker::IDLE_BEFORE_PARK).unwrap();
    let a = Guest::start(&spec(MAC_A), &switch).unwrap();
    let b = Guest::start(&spec(MAC_B), &switch).unwrap();
    let mut ga = TestGuest::attach(&a, REFUSE);
    let mut gb = TestGuest::attach(&b, REFUSE);
    gb.post_rx(8, 2048);

    // A breaks both its queues: each claims 200 entries (queue size 64).
    ga.add_raw_chain(1, &[(BUFFERS, 100, false)], None);
    ga.set_avail_idx(1, 200);
    ga.kick(1);
    ga.post_rx(1, 2048);
    ga.set_avail_idx(0, 200);
    gb.send(&frame(MAC_A, MAC_B, None, ETH_P_EXPERIMENTAL, 80, 1));
    let deadline = std::time::Instant::now() + WAIT;
    while a.counters().broken_queues.load(Relaxed) < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(a.counters().broken_queues.load(Relaxed), 2);

    // The driver reloads: it stops and restarts both queues, on the same connection.
    ga.restart_vring(0);
    ga.restart_vring(1);
    ga.post_rx(8, 2048);
    let to_b = frame(MAC_B, MAC_A, None, ETH_P_EXPERIMENTAL, 80, 2);
    ga.send(&to_b);
    assert_eq!(gb.receive(1, WAIT), vec![to_b], "A's TX queue serves again");
    let to_a = frame(MAC_A, MAC_B, None, ETH_P_EXPERIMENTAL, 80, 3);
    gb.send(&to_a);
    assert_eq!(ga.receive(1, WAIT), vec![to_a], "A's RX queue serves again");
    assert_eq!(
        a.counters().broken_queues.load(Relaxed),
        2,
        "no new breakage"
    );
}

#[test]
fn a_memory_table_sent_again_while_dma_copies_are_in_flight() {
    let switch = Datapath::start(&[], xvio::datapath::worker::IDLE_BEFORE_PARK).unwrap();
    // A's RX copies all go to a software DMA channel (threshold 0).
    let pool = Mutex::new(
        ChannelPool::start(&[DmaSpec::Sw { core: None }], ThresholdArg::Bytes(0)).unwrap(),
    );
    let a = Guest::start_with_dma(&spec(MAC_A), &switch, Some(&pool)).unwrap();
    let b = Guest::start(&spec(MAC_B), &switch).unwrap();
    let mut ga = TestGuest::attach(&a, REFUSE);
    let mut gb = TestGuest::attach(&b, REFUSE);
    const BURST: usize = 16;
    const ROUNDS: u32 = 40;
    for round in 0..ROUNDS {
        ga.post_rx(BURST, 2048);
        let sent: Vec<Vec<u8>> = (0..BURST as u32)
            .map(|i| {
                frame(
                    MAC_A,
                    MAC_B,
                    None,
                    ETH_P_EXPERIMENTAL,
                    1400,
                    round * 100 + i,
                )
            })
            .collect();
        gb.send_all(&sent);
        // While B's frames are being copied into A: the old table's mapping must outlive
        // every copy that writes into it.
        ga.remap_memory();
        assert_eq!(ga.receive(BURST, WAIT), sent, "round {round}");
        gb.take_used(1);
    }
    let c = a.counters();
    assert_eq!(
        c.to_guest_packets.load(Relaxed),
        u64::from(ROUNDS) * BURST as u64
    );
    assert!(a.copy_stats().dma_copies > 0, "the channel did copies");
    drop(a);
    drop(b);
    drop(pool);
}
