//! `cargo xtask bench xsk`: AF_XDP receive-and-recycle and transmit rates of
//! `xvio::xsk::XskPort` on a veth, next to the in-kernel ceiling (a counting XDP_DROP) on the
//! same veth in the same run. Needs root: it makes its own namespaces.
//!
//! Traffic comes from `xvio_tests::xsk::Generator`, an AF_XDP socket on the peer's veth end
//! sending in copy mode from the peer namespace, so it arrives on xvio's end through native
//! XDP. On veth that receive work runs on the sending CPU (0); the AF_XDP consumer runs on
//! CPU 1.
//!
//! Every measurement is repeated; the medians are printed, with the ratios to the ceiling.

use std::time::{Duration, Instant};

use xvio::xsk::{BindMode, XskConfig, XskPort};
use xvio_tests::{
    bench::{Summary, pin_current_thread},
    frames::{ETH_P_EXPERIMENTAL, frame},
    netns::mac_of,
    topology::Topology,
    xdp::DropCounter,
    xsk::{Generator, XskLoop, attach_steering, transmit_loop},
};

const GUEST: &str = "02:58:56:49:4f:01";
const GUEST_MAC: [u8; 6] = [0x02, 0x58, 0x56, 0x49, 0x4f, 0x01];
const REPS: usize = 5;

fn median(v: &[f64]) -> f64 {
    Summary::of(v).map_or(0.0, |s| s.median)
}

/// Packets/s the kernel drops at XDP on `topo.ifname`.
fn ceiling(topo: &Topology, data: &[u8], frames: u32) -> f64 {
    let counter = topo.host.run(|| DropCounter::attach(&topo.ifname));
    let elapsed = topo.peer.run(|| {
        pin_current_thread(0);
        Generator::load(&topo.peer_if).send(data, frames)
    });
    let counted = counter.count();
    topo.host.run(move || drop(counter));
    counted as f64 / elapsed.as_secs_f64()
}

/// Packets/s received and recycled by an XskPort behind xvio's program.
fn af_xdp_rx(topo: &Topology, data: &[u8], frames: u32) -> (f64, u64, BindMode) {
    let attached = attach_steering(&topo.host, &topo.ifname, GUEST).expect("attach xvio");
    let xsks = attached.pin_dir().join(xvio_common::maps::XSKS);
    let consumer = XskLoop::receive(&topo.host, &topo.ifname, xsks, 1).unwrap();
    let mode = consumer.mode();
    // Opened (its UMEM registered) before the clock starts, closed after it stops.
    let generator = topo.peer.run(|| Generator::load(&topo.peer_if));
    let start = Instant::now();
    topo.peer.run(|| {
        pin_current_thread(0);
        generator.send(data, frames)
    });
    // Let the consumer finish what is in the ring.
    let mut last = consumer.count();
    let mut last_change = Instant::now();
    while last_change.elapsed() < Duration::from_millis(50) {
        std::thread::sleep(Duration::from_millis(5));
        let now = consumer.count();
        if now != last {
            last = now;
            last_change = Instant::now();
        }
    }
    let elapsed = last_change.duration_since(start);
    topo.peer.run(move || drop(generator));
    let s = consumer.stop();
    topo.host.run(move || drop(attached));
    (
        last as f64 / elapsed.as_secs_f64(),
        s.fill_ring_empty + s.rx_ring_full,
        mode,
    )
}

/// Packets/s an XskPort transmits (completed), counted again by XDP_DROP on the peer.
fn af_xdp_tx(topo: &Topology, data: &[u8], frames: u32) -> (f64, u64) {
    let counter = topo.peer.run(|| DropCounter::attach(&topo.peer_if));
    let elapsed = topo.host.run(|| {
        pin_current_thread(1);
        let mut port = XskPort::open(&topo.ifname, 0, &XskConfig::default()).unwrap();
        let start = Instant::now();
        transmit_loop(&mut port, data, |sent| sent < u64::from(frames));
        start.elapsed()
    });
    let counted = counter.count();
    topo.peer.run(move || drop(counter));
    (f64::from(frames) / elapsed.as_secs_f64(), counted)
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("bench xsk needs root (network namespaces, XDP, AF_XDP)");
        std::process::exit(1);
    }
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return; // `cargo bench -- --list` asks for names; this harness has one measurement
    }
    // `--only rx|tx|ceiling SIZE`: one long measurement, for a profiler to watch.
    if let Some(i) = args.iter().position(|a| a == "--only") {
        let what = args.get(i + 1).map_or("rx", String::as_str);
        let size: usize = args.get(i + 2).and_then(|s| s.parse().ok()).unwrap_or(64);
        let topo = Topology::new(1);
        let src = mac_of(&topo.peer, &topo.peer_if);
        let dst = mac_of(&topo.host, &topo.ifname);
        let to_guest = frame(GUEST_MAC, src, None, ETH_P_EXPERIMENTAL, size, 1);
        let rate = match what {
            "ceiling" => ceiling(&topo, &to_guest, 100_000_000),
            "tx" => {
                af_xdp_tx(
                    &topo,
                    &frame(src, dst, None, ETH_P_EXPERIMENTAL, size, 2),
                    5_000_000,
                )
                .0
            }
            _ => af_xdp_rx(&topo, &to_guest, 60_000_000).0,
        };
        println!("{what} {size} B: {:.2} Mpps", rate / 1e6);
        return;
    }
    let topo = Topology::new(1);
    let src = mac_of(&topo.peer, &topo.peer_if);
    let dst = mac_of(&topo.host, &topo.ifname);
    println!(
        "AF_XDP on veth: {REPS} runs each, medians (packets/s); generator on CPU 0, consumer on CPU 1"
    );
    for (size, frames) in [(64usize, 2_000_000u32), (1500, 1_000_000)] {
        let to_guest = frame(GUEST_MAC, src, None, ETH_P_EXPERIMENTAL, size, 1);
        let to_peer = frame(src, dst, None, ETH_P_EXPERIMENTAL, size, 2);
        let (mut ceil, mut rx, mut tx, mut rx_drops, mut tx_counted) =
            (vec![], vec![], vec![], 0, 0);
        let mut mode = None;
        for _ in 0..REPS {
            ceil.push(ceiling(&topo, &to_guest, frames));
            let (rate, drops, m) = af_xdp_rx(&topo, &to_guest, frames);
            rx.push(rate);
            rx_drops += drops;
            mode = Some(m);
            let (rate, counted) = af_xdp_tx(&topo, &to_peer, frames / 4);
            tx.push(rate);
            tx_counted += counted;
        }
        let (c, r, t) = (median(&ceil), median(&rx), median(&tx));
        let mode = mode.unwrap();
        println!(
            "{size:>5} B  XDP_DROP ceiling {:>6.2} Mpps | AF_XDP rx+recycle {:>6.2} Mpps ({:>3.0}% of ceiling; kernel drops {rx_drops}) | AF_XDP tx {:>6.2} Mpps ({:>3.0}% of ceiling; peer counted {tx_counted} of {}) | {} {}",
            c / 1e6,
            r / 1e6,
            100.0 * r / c,
            t / 1e6,
            100.0 * t / c,
            u64::from(frames / 4) * REPS as u64,
            if mode.zero_copy {
                "zero-copy"
            } else {
                "copy mode"
            },
            if mode.need_wakeup { "need_wakeup" } else { "" },
        );
    }
}
