//! The rates: frames/s from the wire into the guest (`to_guest`) and from the guest onto
//! the wire (`from_guest`), with what the datapath's counters say about each measurement.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use xvio_tests::{
    bench::{
        cpu_busy_percent, cpu_by_thread, cpu_delta, cpu_ticks, pin_current_thread,
        ticks_per_second, top_threads,
    },
    frames::{ETH_P_EXPERIMENTAL, frame},
    ovs::OvsPortCounters,
    sink::RxSink,
    topology::Topology,
    xsk::Generator,
};

use crate::setup::{Bridge, Datapath, GENERATOR_CHUNK, GUEST_MAC, SINK_CPU, SINK_PERIOD, Snapshot};

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
    /// Each CPU's busy share (percent) while the rate was measured.
    pub(crate) busy: Vec<f64>,
    pub(crate) health: String,
}

impl Sample {
    /// CPU 1's busy share (the datapath's CPU).
    pub(crate) fn datapath_cpu_busy(&self) -> f64 {
        self.busy.get(1).copied().unwrap_or(0.0)
    }
}

/// Sends `data` out of the peer's veth end with the generator on CPU 0 for
/// `window`: how many frames, and for how long.
pub(crate) fn generate(topo: &Topology, data: &[u8], window: Duration) -> (u64, Duration) {
    topo.peer.run(|| {
        pin_current_thread(0);
        let generator = Generator::load(&topo.peer_if);
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < window {
            generator.send(data, GENERATOR_CHUNK);
            sent += u64::from(GENERATOR_CHUNK);
        }
        (sent, start.elapsed())
    })
}

pub(crate) fn to_guest(bridge: &Bridge, len: usize, window: Duration) -> Result<Sample, String> {
    let rx = RxSink::start(&bridge.socket, SINK_CPU, SINK_PERIOD)?;
    bridge.wait_guest(true)?;
    std::thread::sleep(Duration::from_millis(500));
    // Nothing flowed since the last publication (xvio's counters) and the guest is
    // connected (its event thread is counting).
    let before = bridge.snapshot()?;
    let data = frame(GUEST_MAC, bridge.peer_mac, None, ETH_P_EXPERIMENTAL, len, 1);
    let topo = &bridge.topo;
    let (cpus, threads) = (cpu_ticks(), bridge.pid().map(cpu_by_thread));
    let (offered, elapsed) = generate(topo, &data, window);
    let busy = cpu_busy_percent(&cpus, &cpu_ticks());
    let threads = threads_text(bridge, threads, elapsed);
    std::thread::sleep(Duration::from_millis(300));
    let live = bridge.snapshot()?;
    let totals = rx
        .stop()
        .map_err(|e| format!("the receive-only guest: {e}"))?;
    let after = bridge.final_snapshot()?;
    let secs = elapsed.as_secs_f64();
    Ok(Sample {
        rate: totals.frames as f64 / secs,
        health: format!(
            "{}{threads}; offered {:.2} Mpps, guest received {} of {offered} ({:.0}%; {} looks, {} kicks{}), datapath took {:.2} Mpps from its socket; {}",
            busy_text(&busy),
            offered as f64 / secs / 1e6,
            totals.frames,
            100.0 * totals.frames as f64 / offered as f64,
            totals.polls,
            totals.kicks,
            match (totals.mergeable, totals.realtime) {
                (true, true) => ", MRG_RXBUF",
                (false, true) => "",
                (true, false) => ", MRG_RXBUF, NOT real-time",
                (false, false) => ", NOT real-time",
            },
            socket_rx(&topo.ifname, &before, &after) as f64 / secs / 1e6,
            describe(Direction::ToGuest, &topo.ifname, [&before, &live, &after])
        ),
        busy,
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
        (Snapshot::Testpmd { af_xdp: b, .. }, Snapshot::Testpmd { af_xdp: a, .. }) => {
            a.ipackets.saturating_sub(b.ipackets)
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
    let threads = bridge.pid().map(cpu_by_thread);
    std::thread::sleep(window);
    let (c1, t1) = (bridge.counted(), Instant::now());
    let busy = cpu_busy_percent(&cpus, &cpu_ticks());
    let threads = threads_text(bridge, threads, t1 - t0);
    let live = bridge.snapshot()?;
    let totals = tx.stop();
    let after = bridge.final_snapshot()?;
    let counted = bridge.counted() - counted_before;
    Ok(Sample {
        rate: (c1 - c0) as f64 / (t1 - t0).as_secs_f64(),
        health: format!(
            "{}{threads}; guest sent {}, peer counted {counted} ({:.0}%); {}",
            busy_text(&busy),
            totals.tx,
            100.0 * counted as f64 / totals.tx.max(1) as f64,
            describe(
                Direction::FromGuest,
                &bridge.topo.ifname,
                [&before, &live, &after]
            )
        ),
        busy,
    })
}

/// " (xvio-dp0 35%, sw0 20%)": the datapath's busiest threads over `elapsed` since `before`,
/// in percent of a core; for xvio only (OVS's PMD and testpmd's lcore always poll).
fn threads_text(
    bridge: &Bridge,
    before: Option<BTreeMap<String, u64>>,
    elapsed: Duration,
) -> String {
    let (Some(before), Some(pid)) = (before, bridge.pid()) else {
        return String::new();
    };
    if !matches!(
        bridge.datapath(),
        Datapath::Xvio | Datapath::XvioDma | Datapath::XvioPoll
    ) {
        return String::new();
    }
    let used = cpu_delta(&before, &cpu_by_thread(pid));
    let pct = |t: u64| 100.0 * t as f64 / ticks_per_second() as f64 / elapsed.as_secs_f64();
    let top = top_threads(&used, 3)
        .iter()
        .map(|(name, t)| format!("{name} {:.0}%", pct(*t)))
        .collect::<Vec<_>>()
        .join(", ");
    format!(" (xvio threads: {top})")
}

/// "CPU0 98% CPU1 100%": how busy each CPU was while the rate was measured.
pub(crate) fn busy_text(busy: &[f64]) -> String {
    busy.iter()
        .enumerate()
        .map(|(i, b)| format!("CPU{i} {b:.0}%"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Where the frames of one measurement went, by the datapath's own counters read `before`
/// it, `live` (the guest still connected, at the end) and `after` it.
pub(crate) fn describe(
    dir: Direction,
    iface: &str,
    [before, live, after]: [&Snapshot; 3],
) -> String {
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
                    "xvio: socket rx {}, kernel fill_ring_empty {} rx_ring_full {}, to guest {}, dropped: guest full {}, reset {}, no guest {}; copies: CPU {} DMA {} (fallbacks {}); event-thread wake-ups {wakeups}",
                    p1.rx_packets - p0.rx_packets,
                    p1.fill_ring_empty - p0.fill_ring_empty,
                    p1.rx_ring_full - p0.rx_ring_full,
                    g1.to_guest_packets - g0.to_guest_packets,
                    g1.to_guest_dropped_full - g0.to_guest_dropped_full,
                    g1.to_guest_dropped_reset - g0.to_guest_dropped_reset,
                    p1.rx_no_guest - p0.rx_no_guest,
                    g1.copy_cpu - g0.copy_cpu,
                    g1.copy_dma - g0.copy_dma,
                    g1.copy_fallbacks() - g0.copy_fallbacks(),
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
        (
            Snapshot::Testpmd {
                af_xdp: x0,
                vhost: v0,
            },
            _,
            Snapshot::Testpmd {
                af_xdp: x1,
                vhost: v1,
            },
        ) => {
            let d = |a: u64, b: u64| a.saturating_sub(b);
            match dir {
                // testpmd frees what the guest has no room for: counted in its forward
                // statistics at stop, not in the vhost port's.
                Direction::ToGuest => format!(
                    "testpmd: af_xdp rx {} (missed {}, no mbuf {}), vhost tx {}, not sent (guest full) {}",
                    d(x1.ipackets, x0.ipackets),
                    d(x1.imissed, x0.imissed),
                    d(x1.rx_nombuf, x0.rx_nombuf),
                    d(v1.opackets, v0.opackets),
                    d(x1.ipackets, x0.ipackets).saturating_sub(d(v1.opackets, v0.opackets)),
                ),
                Direction::FromGuest => format!(
                    "testpmd: vhost rx {} (no mbuf {}), af_xdp tx {} (errors {})",
                    d(v1.ipackets, v0.ipackets),
                    d(v1.rx_nombuf, v0.rx_nombuf),
                    d(x1.opackets, x0.opackets),
                    d(x1.oerrors, x0.oerrors),
                ),
            }
        }
        _ => String::new(),
    }
}
