//! Bare AF_XDP in the bridge's own run: what one AF_XDP socket alone carries each way on the
//! same kind of veth, with the same generator, sink and CPUs as the datapaths. It is the
//! ceiling of each direction (the target: the datapath at 90% of it or more), what
//! `cargo xtask bench xsk` measures as rx+recycle and tx, here with the bridge's timing.
//!
//! - to_guest: xvio's XDP program (attached natively, steering the guest's MAC) redirects to
//!   an AF_XDP socket on queue 0 that a thread on CPU 1 drains and recycles in bursts of 64
//!   (no guest, no copy); the generator on CPU 0 sends for the window as for the
//!   datapaths. Rate = frames received / the generator's time.
//! - from_guest: a thread on CPU 1 sends one prepared frame (from the guest's MAC to the
//!   peer) over and over through an AF_XDP socket on queue 0; the peer's counting program
//!   counts the frames from the guest's MAC in the window after 1 s of warm-up, as for the
//!   datapaths.

use std::time::{Duration, Instant};

use xvio_common::{PortStats, maps};
use xvio_tests::{
    bench::{cpu_busy_percent, cpu_ticks},
    frames::{ETH_P_EXPERIMENTAL, frame},
    netns::mac_of,
    topology::Topology,
    xdp::DropCounter,
    xsk::{XskLoop, attach_steering},
};

use crate::{
    rate::{Sample, busy_text, generate},
    setup::{GUEST, GUEST_MAC},
};

/// The AF_XDP loops' CPU.
const LOOP_CPU: usize = 1;

pub(crate) fn to_guest(len: usize, window: Duration) -> Result<Sample, String> {
    let topo = Topology::new(1);
    let peer_mac = mac_of(&topo.peer, &topo.peer_if);
    let attached = attach_steering(&topo.host, &topo.ifname, GUEST)?;
    let xsks = attached.pin_dir().join(maps::XSKS);
    let result = (|| -> Result<Sample, String> {
        let receiver = XskLoop::receive(&topo.host, &topo.ifname, xsks, LOOP_CPU)?;
        let data = frame(GUEST_MAC, peer_mac, None, ETH_P_EXPERIMENTAL, len, 1);
        let cpus = cpu_ticks();
        let (offered, elapsed) = generate(&topo, &data, window);
        let busy = cpu_busy_percent(&cpus, &cpu_ticks());
        // What is still in the ring.
        std::thread::sleep(Duration::from_millis(300));
        let received = receiver.count();
        let stats = receiver.stop();
        let secs = elapsed.as_secs_f64();
        Ok(Sample {
            rate: received as f64 / secs,
            health: format!(
                "{}; offered {:.2} Mpps, received {received} of {offered} ({:.0}%); {}",
                busy_text(&busy),
                offered as f64 / secs / 1e6,
                100.0 * received as f64 / offered.max(1) as f64,
                socket_text(&stats),
            ),
            busy,
        })
    })();
    topo.host.run(move || drop(attached));
    result
}

pub(crate) fn from_guest(len: usize, window: Duration) -> Result<Sample, String> {
    let topo = Topology::new(1);
    let peer_mac = mac_of(&topo.peer, &topo.peer_if);
    let counter = topo
        .peer
        .run(|| DropCounter::attach_from(&topo.peer_if, GUEST_MAC));
    let result = (|| -> Result<Sample, String> {
        let data = frame(peer_mac, GUEST_MAC, None, ETH_P_EXPERIMENTAL, len, 2);
        let sender = XskLoop::transmit(&topo.host, &topo.ifname, data, LOOP_CPU)?;
        std::thread::sleep(Duration::from_secs(1));
        let (c0, t0, cpus) = (counter.count(), Instant::now(), cpu_ticks());
        std::thread::sleep(window);
        let (c1, t1) = (counter.count(), Instant::now());
        let busy = cpu_busy_percent(&cpus, &cpu_ticks());
        let stats = sender.stop();
        let sent = stats.tx_packets;
        let counted = counter.count();
        Ok(Sample {
            rate: (c1 - c0) as f64 / (t1 - t0).as_secs_f64(),
            health: format!(
                "{}; sent {sent}, peer counted {counted} ({:.0}%); {}",
                busy_text(&busy),
                100.0 * counted as f64 / sent.max(1) as f64,
                socket_text(&stats),
            ),
            busy,
        })
    })();
    topo.peer.run(move || drop(counter));
    result
}

/// "copy mode, need_wakeup; kernel fill_ring_empty 0 rx_ring_full 0".
fn socket_text(stats: &PortStats) -> String {
    format!(
        "AF_XDP socket on queue 0, CPU {LOOP_CPU}: {}{}; kernel fill_ring_empty {} rx_ring_full {}, tx ring full {}",
        if stats.zero_copy == 1 {
            "zero-copy"
        } else {
            "copy mode"
        },
        if stats.need_wakeup == 1 {
            ", need_wakeup"
        } else {
            ""
        },
        stats.fill_ring_empty,
        stats.rx_ring_full,
        stats.tx_ring_full,
    )
}
