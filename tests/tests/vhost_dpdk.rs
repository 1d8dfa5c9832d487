//! Two DPDK virtio-user frontends (testpmd: one txonly, one rxonly) exchange frames through
//! xvio's datapath; and the client-mode socket reconnects when its VMM (a testpmd serving the
//! socket) restarts. The backend runs in this process; testpmd needs root here.

use std::{
    sync::{Arc, atomic::Ordering::Relaxed},
    time::Duration,
};

use xvio::{
    config::{GuestSpec, MacAddr, SocketMode},
    datapath::Datapath,
    vhost::guest::Guest,
};
use xvio_tests::{
    dpdk::{Testpmd, packets_by_queue},
    privileged, unique_name,
};

/// testpmd instances busy-poll both cores: one test at a time, or they starve each other.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

const MAC_TX: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
const MAC_RX: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

fn spec(mac: [u8; 6], mode: SocketMode) -> GuestSpec {
    let socket = std::env::temp_dir().join(format!("{}.sock", unique_name("xvio-pmd-")));
    GuestSpec {
        socket,
        mac: MacAddr(mac),
        vlan: 0,
        queues: 1,
        mode,
    }
}

fn counters(guest: &Guest) -> String {
    let c = guest.counters();
    format!(
        "to_guest {} from_guest {} to_guest_dropped_full {} to_guest_dropped_small {} no_route {} malformed {} broken {} reset {}",
        c.to_guest_packets.load(Relaxed),
        c.from_guest_packets.load(Relaxed),
        c.to_guest_dropped_full.load(Relaxed),
        c.to_guest_dropped_small.load(Relaxed),
        c.from_guest_no_route.load(Relaxed),
        c.malformed_chains.load(Relaxed),
        c.broken_queues.load(Relaxed),
        c.to_guest_dropped_reset.load(Relaxed)
    )
}

/// The receiving guest on `switch`, and the testpmd rxonly that drives it.
fn rxonly_guest(switch: &Arc<Datapath>) -> (Guest, Testpmd) {
    let rx_guest = Guest::start(&spec(MAC_RX, SocketMode::Server), switch).unwrap();
    let rx = Testpmd::start(
        rx_guest.socket(),
        "rxonly",
        64,
        "02:00:00:00:00:0a",
        "",
        "1,0",
    );
    (rx_guest, rx)
}

/// What one txonly -> rxonly run through xvio did.
struct Run {
    tx_guest: Guest,
    rx_guest: Guest,
    /// testpmd txonly's totals and everything it printed.
    sent: (xvio_tests::dpdk::TestpmdTotals, String),
    /// testpmd rxonly's totals.
    received: xvio_tests::dpdk::TestpmdTotals,
    report: String,
}

/// testpmd txonly on a guest with `queue_pairs` queue pairs sends for 3 s to a guest whose
/// testpmd rxonly counts; then both stop.
fn txonly_to_rxonly(queue_pairs: u16) -> Run {
    let switch = Datapath::start(&[], xvio::datapath::worker::IDLE_BEFORE_PARK).unwrap();
    let tx_spec = GuestSpec {
        queues: queue_pairs,
        ..spec(MAC_TX, SocketMode::Server)
    };
    let tx_guest = Guest::start(&tx_spec, &switch).unwrap();
    let (rx_guest, rx) = rxonly_guest(&switch);
    wait_until(|| rx_guest.is_connected(), "the rxonly testpmd connects");
    // Forwarding, its RX ring filled. (xvio sees the connection during testpmd's device
    // probe; on a loaded machine testpmd can take seconds more to start forwarding.)
    assert!(rx.wait_forwarding(), "the rxonly testpmd forwards");
    std::thread::sleep(Duration::from_millis(200));
    let (queues, rxq, txq) = (
        format!(",queues={queue_pairs}"),
        format!("--rxq={queue_pairs}"),
        format!("--txq={queue_pairs}"),
    );
    let tx = Testpmd::start_with(
        tx_guest.socket(),
        "txonly",
        64,
        "02:00:00:00:00:01",
        &queues,
        "0,1",
        &[&rxq, &txq],
    );
    wait_until(|| tx_guest.is_connected(), "the txonly testpmd connects");
    // The 3 s window starts once testpmd forwards: a SIGINT before that (testpmd 22.11.11
    // only notes it and goes on starting) let each stream send one burst and stop.
    assert!(tx.wait_forwarding(), "the txonly testpmd forwards");
    std::thread::sleep(Duration::from_secs(3));
    let sent = tx.stop_keep_output();
    std::thread::sleep(Duration::from_millis(500));
    let received = rx.stop();
    let report = format!(
        "testpmd tx {:?} by queue {:?} rx {received:?}\nxvio tx guest: {}\nxvio rx guest: {}",
        sent.0,
        packets_by_queue(&sent.1, "TX"),
        counters(&tx_guest),
        counters(&rx_guest)
    );
    eprintln!("{report}");
    Run {
        tx_guest,
        rx_guest,
        sent,
        received,
        report,
    }
}

impl Run {
    /// xvio took what testpmd sent, but for at most `left` frames still in the TX rings, and
    /// accounted for every frame it took: delivered, dropped and counted, or still waiting;
    /// no malformed chain on either side.
    fn assert_conserved(&self, left: u64) {
        let (t, r) = (self.tx_guest.counters(), self.rx_guest.counters());
        let (sent, report) = (self.sent.0.tx, &self.report);
        let xvio_tx = t.from_guest_packets.load(Relaxed);
        assert!(xvio_tx > 10_000, "frames flowed: {report}");
        assert!(
            xvio_tx <= sent && sent - xvio_tx <= left,
            "xvio took what testpmd sent (a ring per queue may be left): {report}"
        );
        // Every frame xvio took left through one counter: delivered, or dropped for a named
        // reason (none is held: the datapath drops what the guest has no buffers for).
        let accounted = r.to_guest_packets.load(Relaxed)
            + r.to_guest_dropped_full.load(Relaxed)
            + r.to_guest_dropped_small.load(Relaxed)
            + r.to_guest_dropped_reset.load(Relaxed);
        assert_eq!(accounted, xvio_tx, "{report}");
        let delivered = r.to_guest_packets.load(Relaxed);
        assert!(
            self.received.rx <= delivered && delivered - self.received.rx <= 1024,
            "testpmd got what xvio delivered (a ring may be left): {report}"
        );
        assert_eq!(
            t.malformed_chains.load(Relaxed) + r.malformed_chains.load(Relaxed),
            0,
            "{report}"
        );
    }
}

#[test]
fn two_virtio_user_frontends_exchange_frames_with_only_counted_drops() {
    if !privileged("two_virtio_user_frontends_exchange_frames_with_only_counted_drops") {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    txonly_to_rxonly(1).assert_conserved(1024);
}

/// Multi-queue: a frontend with two queue pairs sends on both TX queues; xvio serves each on
/// its own worker and delivers every frame it took to the other guest.
#[test]
fn a_two_queue_pair_frontend_sends_on_both_queues() {
    if !privileged("a_two_queue_pair_frontend_sends_on_both_queues") {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let run = txonly_to_rxonly(2);
    let streams = packets_by_queue(&run.sent.1, "TX");
    for queue in [0, 1] {
        let n = streams
            .iter()
            .filter(|(q, _)| *q == queue)
            .map(|(_, n)| n)
            .sum::<u64>();
        // More than its ring holds: xvio must have drained this queue.
        assert!(
            n > 2048,
            "testpmd sent on TX queue {queue}: {}\ntxonly testpmd's output:\n{}",
            run.report,
            run.sent.1
        );
    }
    run.assert_conserved(2 * 1024);
}

#[test]
fn a_client_mode_socket_reconnects_when_the_vmm_restarts() {
    if !privileged("a_client_mode_socket_reconnects_when_the_vmm_restarts") {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let switch = Datapath::start(&[], xvio::datapath::worker::IDLE_BEFORE_PARK).unwrap();
    let client = spec(MAC_TX, SocketMode::Client);
    // testpmd serves the socket (server=1) as QEMU does with server=on.
    let first = Testpmd::start(
        &client.socket,
        "txonly",
        64,
        "02:00:00:00:00:01",
        ",server=1",
        "0,1",
    );
    let tx_guest = Guest::start(&client, &switch).unwrap();
    let (rx_guest, rx) = rxonly_guest(&switch);
    wait_until(
        || tx_guest.is_connected(),
        "xvio connects to the testpmd that serves the socket",
    );
    let t = Arc::clone(tx_guest.device());
    wait_until(
        || t.counters().from_guest_packets.load(Relaxed) > 1000,
        "frames flow before the restart",
    );
    first.crash();
    wait_until(|| !tx_guest.is_connected(), "xvio notices the VMM is gone");
    // testpmd, unlike QEMU, does not replace a stale socket file.
    let _ = std::fs::remove_file(&client.socket);
    let second = Testpmd::start(
        &client.socket,
        "txonly",
        64,
        "02:00:00:00:00:01",
        ",server=1",
        "0,1",
    );
    wait_until(
        || tx_guest.is_connected(),
        "xvio reconnects to the restarted testpmd",
    );
    // Counted from the new connection on: the old one's event thread was stopped and
    // joined, and the worker let go of its vrings, before it was made, so only frames sent
    // after the restart add to these (nothing is held for a guest: no backlog either).
    let (sent_then, delivered_then) = (
        t.counters().from_guest_packets.load(Relaxed),
        rx_guest.counters().to_guest_packets.load(Relaxed),
    );
    let flowing = wait_for(|| {
        t.counters().from_guest_packets.load(Relaxed) > sent_then + 1000
            && rx_guest.counters().to_guest_packets.load(Relaxed) > delivered_then + 1000
    });
    assert!(
        flowing,
        "frames flow again after the VMM restarted (since the reconnect: from {sent_then} sent, \
         {delivered_then} delivered): connected {}, sender {}, receiver {}\n{}",
        tx_guest.is_connected(),
        counters(&tx_guest),
        counters(&rx_guest),
        second.output()
    );
    second.stop();
    rx.stop();
    let _ = std::fs::remove_file(&client.socket);
}

fn wait_for(cond: impl Fn() -> bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !cond() {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

fn wait_until(cond: impl Fn() -> bool, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
