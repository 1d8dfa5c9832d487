//! The rates: frames/s from the wire into the guest (`to_guest`) and from the guest onto
//! the wire (`from_guest`), with what the datapath's counters say about each measurement.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use xvio_tests::{
    bench::{cpu_busy_percent, cpu_ticks, pin_current_thread},
    frames::{ETH_P_EXPERIMENTAL, frame},
    ovs::OvsPortCounters,
    xdp::Generator,
};

use crate::setup::{Bridge, GENERATOR_CHUNK, GUEST_MAC, Snapshot};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Direction {
    ToGuest,
    FromGuest,
}

impl Direction {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Direction::ToGuest => "to_guest",
            Direction::FromGuest => "from_guest",
        }
    }
}

/// One measurement: the rate and what the run saw.
pub(crate) struct Sample {
    pub(crate) rate: f64,
    pub(crate) health: String,
}

pub(crate) fn to_guest(bridge: &Bridge, len: usize, window: Duration) -> Result<Sample, String> {
    let rx = bridge.start_guest("rxonly", len, "02:00:00:00:00:02")?;
    std::thread::sleep(Duration::from_millis(500));
    // Nothing flowed since the last publication (xvio's counters) and the guest is
    // connected (its event thread is counting).
    let before = bridge.snapshot()?;
    let data = frame(GUEST_MAC, bridge.peer_mac, None, ETH_P_EXPERIMENTAL, len, 1);
    let topo = &bridge.topo;
    let cpus = cpu_ticks();
    let (offered, elapsed) = topo.peer.run(|| {
        pin_current_thread(0);
        let generator = Generator::load(&topo.peer_if);
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < window {
            generator.send(&data, GENERATOR_CHUNK);
            sent += u64::from(GENERATOR_CHUNK);
        }
        (sent, start.elapsed())
    });
    let busy = cpu_busy_percent(&cpus, &cpu_ticks());
    std::thread::sleep(Duration::from_millis(300));
    let live = bridge.snapshot()?;
    let totals = rx.stop();
    let after = bridge.final_snapshot()?;
    let secs = elapsed.as_secs_f64();
    Ok(Sample {
        rate: totals.rx as f64 / secs,
        health: format!(
            "{}; offered {:.2} Mpps, guest received {} of {offered} ({:.0}%), datapath took {:.2} Mpps from its socket; {}",
            busy_text(&busy),
            offered as f64 / secs / 1e6,
            totals.rx,
            100.0 * totals.rx as f64 / offered as f64,
            socket_rx(&topo.ifname, &before, &after) as f64 / secs / 1e6,
            describe(Direction::ToGuest, &topo.ifname, [&before, &live, &after])
        ),
    })
}

/// Frames the datapath took from its AF_XDP socket (all of them for the guest: placed in
/// its buffers or dropped because it had none).
fn socket_rx(iface: &str, before: &Snapshot, after: &Snapshot) -> u64 {
    match (before, after) {
        (Snapshot::Xvio { port: p0, .. }, Snapshot::Xvio { port: p1, .. }) => {
            p1.rx_packets - p0.rx_packets
        }
        (Snapshot::Ovs(b), Snapshot::Ovs(a)) => {
            let rx =
                |m: &BTreeMap<String, OvsPortCounters>| m.get(iface).map_or(0, |c| c.rx_packets);
            rx(a).saturating_sub(rx(b))
        }
        _ => 0,
    }
}

pub(crate) fn from_guest(bridge: &Bridge, len: usize, window: Duration) -> Result<Sample, String> {
    let before = bridge.snapshot()?;
    let counted_before = bridge.counted();
    let peer = bridge.peer_mac.map(|b| format!("{b:02x}")).join(":");
    let tx = bridge.start_guest("txonly", len, &peer)?;
    std::thread::sleep(Duration::from_secs(1));
    let (c0, t0, cpus) = (bridge.counted(), Instant::now(), cpu_ticks());
    std::thread::sleep(window);
    let (c1, t1) = (bridge.counted(), Instant::now());
    let busy = cpu_busy_percent(&cpus, &cpu_ticks());
    let live = bridge.snapshot()?;
    let totals = tx.stop();
    let after = bridge.final_snapshot()?;
    let counted = bridge.counted() - counted_before;
    Ok(Sample {
        rate: (c1 - c0) as f64 / (t1 - t0).as_secs_f64(),
        health: format!(
            "{}; guest sent {}, peer counted {counted} ({:.0}%); {}",
            busy_text(&busy),
            totals.tx,
            100.0 * counted as f64 / totals.tx.max(1) as f64,
            describe(
                Direction::FromGuest,
                &bridge.topo.ifname,
                [&before, &live, &after]
            )
        ),
    })
}

/// "CPU0 98% CPU1 100%": how busy each CPU was while the rate was measured.
fn busy_text(busy: &[f64]) -> String {
    busy.iter()
        .enumerate()
        .map(|(i, b)| format!("CPU{i} {b:.0}%"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Where the frames of one measurement went, by the datapath's own counters read `before`
/// it, `live` (the guest still connected, at the end) and `after` it.
fn describe(dir: Direction, iface: &str, [before, live, after]: [&Snapshot; 3]) -> String {
    match (before, live, after) {
        (
            Snapshot::Xvio {
                guest: g0,
                port: p0,
                event_wakeups: w0,
            },
            Snapshot::Xvio {
                event_wakeups: w1, ..
            },
            Snapshot::Xvio {
                guest: g1,
                port: p1,
                ..
            },
        ) => {
            let wakeups = w1.saturating_sub(*w0);
            match dir {
                Direction::ToGuest => format!(
                    "xvio: socket rx {}, kernel fill_ring_empty {} rx_ring_full {}, to guest {}, dropped: guest full {}, reset {}, no guest {}; event-thread wake-ups {wakeups}",
                    p1.rx_packets - p0.rx_packets,
                    p1.fill_ring_empty - p0.fill_ring_empty,
                    p1.rx_ring_full - p0.rx_ring_full,
                    g1.to_guest_packets - g0.to_guest_packets,
                    g1.to_guest_dropped_full - g0.to_guest_dropped_full,
                    g1.to_guest_dropped_reset - g0.to_guest_dropped_reset,
                    p1.rx_no_guest - p0.rx_no_guest,
                ),
                Direction::FromGuest => format!(
                    "xvio: from guest {}, dropped: tx full {}, no route {}; socket tx {}, tx ring full {}, no frame {}; event-thread wake-ups {wakeups}",
                    g1.from_guest_packets - g0.from_guest_packets,
                    g1.from_guest_dropped_full - g0.from_guest_dropped_full,
                    g1.from_guest_no_route - g0.from_guest_no_route,
                    p1.tx_packets - p0.tx_packets,
                    p1.tx_ring_full - p0.tx_ring_full,
                    p1.tx_no_frame - p0.tx_no_frame,
                ),
            }
        }
        (Snapshot::Ovs(b), _, Snapshot::Ovs(a)) => {
            // OVS 3.1 with DPDK 22.11 reports no counters for a dpdkvhostuser port
            // ("?" in ovs-ofctl dump-ports): the afxdp port's tell what OVS moved.
            let (x, y) = (
                b.get(iface).copied().unwrap_or_default(),
                a.get(iface).copied().unwrap_or_default(),
            );
            match dir {
                Direction::ToGuest => format!(
                    "OVS: afxdp rx {}",
                    y.rx_packets.saturating_sub(x.rx_packets)
                ),
                Direction::FromGuest => format!(
                    "OVS: afxdp tx {}",
                    y.tx_packets.saturating_sub(x.tx_packets)
                ),
            }
        }
        _ => String::new(),
    }
}
