//! The daemon's AF_XDP port (`xvio::xsk::XskPort`) on a real veth in network namespaces,
//! with xvio's XDP program attached by the daemon (`--queues 0`: the test owns the sockets).

use std::{
    collections::HashSet,
    net::UdpSocket,
    time::{Duration, Instant},
};

use xvio::xsk::{
    XskConfig, XskPort,
    queues::{QueueSource, XskQueues},
};
use xvio_common::maps;
use xvio_tests::{
    frames::{ETH_P_EXPERIMENTAL, UDP_SEQ_AT, frame, ipv4_udp, seq_of},
    netns::mac_of,
    packet::RawSocket,
    privileged,
    topology::Topology,
    xsk::receive_all,
};

const GUEST: [u8; 6] = [0x02, 0x58, 0x56, 0x49, 0x4f, 0x01];
const FRAMES: u32 = 10_000;

/// Sizes 60 to 1514, varied.
fn size_of_frame(seq: u32) -> usize {
    60 + (seq as usize * 397) % 1455
}

fn udp_seq(frame: &[u8]) -> u32 {
    u32::from_be_bytes(frame[UDP_SEQ_AT..UDP_SEQ_AT + 4].try_into().unwrap())
}

/// Flushes and reaps until every accepted frame was sent and completed, or `limit` passed.
fn drain(port: &mut XskPort, limit: Duration) {
    let start = Instant::now();
    while port.frame_counts().staged + port.frame_counts().tx_in_flight > 0
        && start.elapsed() < limit
    {
        port.flush();
    }
}

#[test]
fn ten_thousand_frames_arrive_identical_and_in_order_while_the_kernel_keeps_its_traffic() {
    if !privileged(
        "ten_thousand_frames_arrive_identical_and_in_order_while_the_kernel_keeps_its_traffic",
    ) {
        return;
    }
    let topo = Topology::new(1);
    let _daemon = topo.start(&["--steer", "02:58:56:49:4f:01", "--queues", "0"]);
    let src = mac_of(&topo.peer, &topo.peer_if);
    let sent: Vec<Vec<u8>> = (0..FRAMES)
        .map(|seq| {
            frame(
                GUEST,
                src,
                None,
                ETH_P_EXPERIMENTAL,
                size_of_frame(seq),
                seq,
            )
        })
        .collect();
    let (got, stats, counts, datagrams) = topo.host.run(|| {
        let mut port =
            XskPort::open(&topo.ifname, 0, &XskConfig::default()).expect("open the port");
        port.register(&topo.pin_dir().join(maps::XSKS))
            .expect("register it");
        let udp = UdpSocket::bind("10.252.0.1:4790").unwrap();
        udp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut ports = [port];
        let got = std::thread::scope(|s| {
            s.spawn(|| {
                topo.peer.run(|| {
                    let raw = RawSocket::bind(&topo.peer_if).unwrap();
                    let client = UdpSocket::bind("10.252.0.2:0").unwrap();
                    for (i, f) in sent.iter().enumerate() {
                        raw.send(f).unwrap();
                        if i % 500 == 0 {
                            client.send_to(b"to the kernel", "10.252.0.1:4790").unwrap();
                        }
                    }
                })
            });
            receive_all(&mut ports, FRAMES as usize, Duration::from_secs(3))
        });
        let mut datagrams = 0;
        let mut buf = [0u8; 32];
        while datagrams < FRAMES / 500 && udp.recv(&mut buf).is_ok() {
            datagrams += 1;
        }
        let [port] = ports;
        (got, port.stats(), port.frame_counts(), datagrams)
    });
    let got = &got[0];
    assert_eq!(got.len(), sent.len(), "every frame arrives: {stats:?}");
    for (i, (g, s)) in got.iter().zip(&sent).enumerate() {
        assert_eq!(seq_of(g), Some(i as u32), "in order");
        assert!(g == s, "frame {i} is byte-identical");
    }
    assert_eq!(
        datagrams,
        FRAMES / 500,
        "unsteered UDP reached the kernel's socket meanwhile"
    );
    assert_eq!(stats.rx_packets, u64::from(FRAMES));
    assert_eq!(
        stats.rx_bytes,
        sent.iter().map(|f| f.len() as u64).sum::<u64>()
    );
    assert!(counts.balanced(), "{counts:?}");
    assert!(counts.all_home(), "every frame is home: {counts:?}");
}

#[test]
fn with_two_queues_every_frame_arrives_on_exactly_one_socket() {
    if !privileged("with_two_queues_every_frame_arrives_on_exactly_one_socket") {
        return;
    }
    let topo = Topology::new(2);
    let _daemon = topo.start(&["--steer", "02:58:56:49:4f:01", "--queues", "0"]);
    let src = mac_of(&topo.peer, &topo.peer_if);
    // Many UDP flows, so that the sender's flow hash spreads them over both queues.
    let sent: Vec<Vec<u8>> = (0..FRAMES)
        .map(|seq| {
            ipv4_udp(
                GUEST,
                src,
                10_000 + (seq % 512) as u16,
                4791,
                size_of_frame(seq),
                seq,
            )
        })
        .collect();
    let got = topo.host.run(|| {
        let mut ports: Vec<XskPort> = (0..2)
            .map(|q| {
                let mut p = XskPort::open(&topo.ifname, q, &XskConfig::default())
                    .expect("open a port per queue");
                p.register(&topo.pin_dir().join(maps::XSKS)).unwrap();
                p
            })
            .collect();
        std::thread::scope(|s| {
            s.spawn(|| {
                topo.peer.run(|| {
                    let raw = RawSocket::bind(&topo.peer_if).unwrap();
                    for f in &sent {
                        raw.send(f).unwrap();
                    }
                })
            });
            receive_all(&mut ports, FRAMES as usize, Duration::from_secs(3))
        })
    });
    let mut seen = HashSet::new();
    for frames in &got {
        for f in frames {
            assert!(
                seen.insert(udp_seq(f)),
                "frame {} arrived twice",
                udp_seq(f)
            );
            assert!(
                f == &sent[udp_seq(f) as usize],
                "frame {} is byte-identical",
                udp_seq(f)
            );
        }
    }
    assert_eq!(
        seen.len(),
        FRAMES as usize,
        "every frame arrived (queue 0: {}, queue 1: {})",
        got[0].len(),
        got[1].len()
    );
    assert!(
        !got[0].is_empty() && !got[1].is_empty(),
        "both queues were used: {} / {}",
        got[0].len(),
        got[1].len()
    );
}

#[test]
fn ten_thousand_transmitted_frames_arrive_at_the_peer_identical() {
    if !privileged("ten_thousand_transmitted_frames_arrive_at_the_peer_identical") {
        return;
    }
    let topo = Topology::new(1);
    let _daemon = topo.start(&["--queues", "0"]);
    const ME: [u8; 6] = [0x02, 0x58, 0x56, 0x49, 0x4f, 0xaa];
    let dst = mac_of(&topo.peer, &topo.peer_if);
    let sent: Vec<Vec<u8>> = (0..FRAMES)
        .map(|seq| frame(dst, ME, None, ETH_P_EXPERIMENTAL, size_of_frame(seq), seq))
        .collect();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (received, stats, counts) = std::thread::scope(|s| {
        let receiver = s.spawn(move || {
            topo.peer.run(move || {
                let raw = RawSocket::bind(&topo.peer_if).unwrap();
                raw.set_rcvbuf(64 << 20).unwrap();
                ready_tx.send(()).unwrap();
                let mut got = Vec::new();
                let mut buf = vec![0u8; 2048];
                while got.len() < FRAMES as usize {
                    let Some(n) = raw.recv(&mut buf, Duration::from_secs(3)).unwrap() else {
                        break;
                    };
                    if buf[6..12] == ME && buf[12..14] == ETH_P_EXPERIMENTAL.to_be_bytes() {
                        got.push(buf[..n].to_vec());
                    }
                }
                got
            })
        });
        ready_rx.recv().unwrap();
        let (stats, counts) = topo.host.run(|| {
            let mut port = XskPort::open(&topo.ifname, 0, &XskConfig::default()).unwrap();
            for chunk in sent.chunks(64) {
                assert_eq!(
                    port.send_from_guest(chunk),
                    chunk.len(),
                    "the port takes a chunk"
                );
                port.flush();
                // Pace to the receiver: the veth peer queues at most a backlog's worth.
                drain(&mut port, Duration::from_secs(1));
                std::thread::sleep(Duration::from_micros(300));
            }
            drain(&mut port, Duration::from_secs(5));
            (port.stats(), port.frame_counts())
        });
        (receiver.join().unwrap(), stats, counts)
    });
    assert_eq!(stats.tx_packets, u64::from(FRAMES), "{stats:?}");
    assert_eq!((stats.tx_ring_full, stats.tx_no_frame), (0, 0), "{stats:?}");
    assert_eq!(received.len(), sent.len(), "every frame reached the peer");
    for (i, (g, s)) in received.iter().zip(&sent).enumerate() {
        assert!(g == s, "frame {i} arrived byte-identical and in order");
    }
    assert!(counts.balanced() && counts.all_home(), "{counts:?}");
}

#[test]
fn a_flood_faster_than_the_consumer_drops_counted_frames_and_loses_none_of_the_pool() {
    if !privileged(
        "a_flood_faster_than_the_consumer_drops_counted_frames_and_loses_none_of_the_pool",
    ) {
        return;
    }
    let topo = Topology::new(1);
    let _daemon = topo.start(&["--steer", "02:58:56:49:4f:01", "--queues", "0"]);
    let src = mac_of(&topo.peer, &topo.peer_if);
    let small = XskConfig {
        frame_size: 2048,
        frames: 512,
        ring: 256,
    };
    let (stats, counts, received) = topo.host.run(|| {
        let mut port = XskPort::open(&topo.ifname, 0, &small).unwrap();
        port.register(&topo.pin_dir().join(maps::XSKS)).unwrap();
        // Nobody reads while 5000 frames arrive: the rings overflow.
        topo.peer.run(|| {
            let raw = RawSocket::bind(&topo.peer_if).unwrap();
            for seq in 0..5000 {
                raw.send(&frame(GUEST, src, None, ETH_P_EXPERIMENTAL, 1000, seq))
                    .unwrap();
            }
        });
        let mut received = 0;
        loop {
            let n = port.to_guest_burst(64, |_| {});
            if n == 0 {
                break;
            }
            received += n;
        }
        // Exercise transmit under pressure too: more sends than frames.
        for seq in 0..2000 {
            let _ = port.send_from_guest(&[frame(src, GUEST, None, ETH_P_EXPERIMENTAL, 200, seq)]);
            if seq % 100 == 0 {
                port.flush();
            }
        }
        drain(&mut port, Duration::from_secs(5));
        (port.stats(), port.frame_counts(), received)
    });
    assert!(
        received > 0 && received < 5000,
        "some frames received, not all: {received}"
    );
    assert!(
        stats.rx_ring_full + stats.fill_ring_empty > 0,
        "the kernel's drops are counted: {stats:?}"
    );
    assert!(counts.balanced(), "{counts:?}");
    assert!(counts.all_home(), "the pool is intact: {counts:?}");
}

#[test]
fn the_daemon_opens_a_port_per_queue_and_publishes_their_counters() {
    if !privileged("the_daemon_opens_a_port_per_queue_and_publishes_their_counters") {
        return;
    }
    let topo = Topology::new(2);
    let daemon = topo.start(&["--steer", "02:58:56:49:4f:01"]);
    let src = mac_of(&topo.peer, &topo.peer_if);
    // Wait until both ports are registered (the daemon publishes once a second).
    let deadline = Instant::now() + Duration::from_secs(10);
    while xvio_tests::daemon::run_xvio(None, &["stats", "--iface", &topo.ifname])
        .stdout
        .windows(13)
        .all(|w| w != b"AF_XDP socket")
        || !String::from_utf8_lossy(
            &xvio_tests::daemon::run_xvio(None, &["stats", "--iface", &topo.ifname]).stdout,
        )
        .contains("AF_XDP sockets: 2")
    {
        assert!(
            Instant::now() < deadline,
            "the daemon did not report two sockets:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    topo.peer.run(|| {
        let raw = RawSocket::bind(&topo.peer_if).unwrap();
        for seq in 0..FRAMES {
            raw.send(&ipv4_udp(
                GUEST,
                src,
                10_000 + (seq % 512) as u16,
                4791,
                size_of_frame(seq),
                seq,
            ))
            .unwrap();
        }
    });
    std::thread::sleep(Duration::from_millis(2500));
    let report = String::from_utf8_lossy(
        &xvio_tests::daemon::run_xvio(None, &["stats", "--iface", &topo.ifname]).stdout,
    )
    .into_owned();
    let redirected: u64 = report
        .lines()
        .find(|l| l.starts_with("redirected"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let rx: u64 = report
        .lines()
        .filter(|l| l.trim_start().starts_with("queue"))
        .filter_map(|l| {
            l.split(", rx ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    let no_guest: u64 = report
        .lines()
        .filter_map(|l| {
            l.split("no guest ")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    assert_eq!(redirected, u64::from(FRAMES), "{report}");
    assert_eq!(
        rx,
        u64::from(FRAMES),
        "the daemon's ports received every redirected frame:\n{report}"
    );
    assert_eq!(
        no_guest,
        u64::from(FRAMES),
        "with no guest, every frame is dropped and counted:\n{report}"
    );
    assert!(
        report.contains("copy mode"),
        "veth has no zero-copy: {report}"
    );
    let dump = std::process::Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(topo.pin_dir().join(maps::PORT_STATS))
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&dump.stdout);
    for field in [
        "rx_packets",
        "fill_ring_empty",
        "tx_ring_full",
        "rx_no_guest",
        "zero_copy",
        "need_wakeup",
    ] {
        assert!(dump.contains(field), "bpftool shows {field}");
    }
    let (status, log) = daemon.terminate();
    assert!(status.success(), "{log}");
    assert!(
        log.contains("AF_XDP socket bound in copy mode"),
        "the mode is logged:\n{log}"
    );
}

/// The running kernel's (major, minor).
fn kernel() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

#[test]
fn one_flush_hands_the_kernel_a_burst_of_64_in_copy_mode() {
    if !privileged("one_flush_hands_the_kernel_a_burst_of_64_in_copy_mode") {
        return;
    }
    let topo = Topology::new(1);
    let _daemon = topo.start(&["--queues", "0"]);
    const ME: [u8; 6] = [0x02, 0x58, 0x56, 0x49, 0x4f, 0xac];
    let dst = mac_of(&topo.peer, &topo.peer_if);
    let burst: Vec<Vec<u8>> = (0..64)
        .map(|seq| frame(dst, ME, None, ETH_P_EXPERIMENTAL, 60, seq))
        .collect();
    let (budget, unsent, stats, counts) = topo.host.run(|| {
        let mut port = XskPort::open(&topo.ifname, 0, &XskConfig::default()).unwrap();
        assert_eq!(port.send_from_guest(&burst), burst.len());
        // One flush: one sendto, which sends at most the socket's budget.
        port.flush();
        let (budget, unsent) = (port.tx_budget(), port.tx_unsent());
        drain(&mut port, Duration::from_secs(5));
        (budget, unsent, port.stats(), port.frame_counts())
    });
    if kernel() >= (6, 17) {
        assert_eq!(budget, Some(64), "Linux 6.17 takes XDP_MAX_TX_SKB_BUDGET");
    }
    match budget {
        Some(budget) => assert_eq!(unsent, 64 - budget, "one sendto takes {budget} frames"),
        // The kernel's own budget (32 on recent kernels, 16 on older ones): one sendto
        // leaves part of the burst.
        None => assert!(unsent > 0, "{unsent} frames left after one sendto"),
    }
    assert_eq!(stats.tx_packets, 64, "{stats:?}");
    assert!(counts.balanced() && counts.all_home(), "{counts:?}");
}

#[test]
fn with_the_link_down_the_port_refuses_what_its_rings_cannot_hold_and_sends_all_it_took() {
    if !privileged(
        "with_the_link_down_the_port_refuses_what_its_rings_cannot_hold_and_sends_all_it_took",
    ) {
        return;
    }
    let topo = Topology::new(1);
    let _daemon = topo.start(&["--queues", "0"]);
    const ME: [u8; 6] = [0x02, 0x58, 0x56, 0x49, 0x4f, 0xab];
    const OFFERED: u32 = 400;
    let dst = mac_of(&topo.peer, &topo.peer_if);
    let offered: Vec<Vec<u8>> = (0..OFFERED)
        .map(|seq| frame(dst, ME, None, ETH_P_EXPERIMENTAL, size_of_frame(seq), seq))
        .collect();
    // A pool of 448 frames, rings of 64: more frames than the rings hold.
    let small = XskConfig {
        frame_size: 2048,
        frames: 512,
        ring: 64,
    };
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (received, taken, again, refused, stats, counts) = std::thread::scope(|s| {
        let receiver = s.spawn(move || {
            topo.peer.run(move || {
                let raw = RawSocket::bind(&topo.peer_if).unwrap();
                raw.set_rcvbuf(64 << 20).unwrap();
                ready_tx.send(()).unwrap();
                let mut got = Vec::new();
                let mut buf = vec![0u8; 2048];
                while let Some(n) = raw.recv(&mut buf, Duration::from_secs(3)).unwrap() {
                    if buf[6..12] == ME {
                        got.push(buf[..n].to_vec());
                    }
                }
                got
            })
        });
        ready_rx.recv().unwrap();
        let sent = topo.host.run(|| {
            let mut port = XskPort::open(&topo.ifname, 0, &small).unwrap();
            // A link that is down sends nothing: the tx ring fills and stays full.
            topo.host.ip(&["link", "set", &topo.ifname, "down"]);
            let taken = port.send_from_guest(&offered);
            let again = port.send_from_guest(&offered[taken..=taken]);
            let refused = port.stats();
            topo.host.ip(&["link", "set", &topo.ifname, "up"]);
            drain(&mut port, Duration::from_secs(5));
            (taken, again, refused, port.stats(), port.frame_counts())
        });
        (
            receiver.join().unwrap(),
            sent.0,
            sent.1,
            sent.2,
            sent.3,
            sent.4,
        )
    });
    assert!(
        taken > 0 && taken < OFFERED as usize,
        "the port takes what its tx ring and its stage hold, and says how many: {taken}"
    );
    assert_eq!(again, 0, "a full port refuses a frame offered again");
    assert_eq!(
        refused.tx_ring_full + refused.tx_no_frame,
        u64::from(OFFERED) - taken as u64 + 1,
        "every refusal is counted: {refused:?}"
    );
    assert_eq!(
        refused.tx_no_frame, 0,
        "the ring was full, frames were free: {refused:?}"
    );
    assert_eq!(
        received.len(),
        taken,
        "every frame the port took reaches the peer, none more: {stats:?}"
    );
    for (i, (got, want)) in received.iter().zip(&offered).enumerate() {
        assert!(got == want, "frame {i} arrived byte-identical and in order");
    }
    assert_eq!(stats.tx_packets, taken as u64, "{stats:?}");
    assert!(counts.balanced() && counts.all_home(), "{counts:?}");
}

#[test]
fn binding_a_queue_that_is_not_enabled_reports_the_bind_and_the_channels() {
    if !privileged("binding_a_queue_that_is_not_enabled_reports_the_bind_and_the_channels") {
        return;
    }
    // Made as a user makes it: queue 1 may be allocated, but only queue 0 is enabled.
    let topo = Topology::untuned();
    let (error, opened) = topo.host.run(|| {
        let error = XskPort::open(&topo.ifname, 1, &XskConfig::default())
            .expect_err("queue 1 is not enabled")
            .to_string();
        (
            error,
            XskPort::open(&topo.ifname, 0, &XskConfig::default()).is_ok(),
        )
    });
    let ifname = &topo.ifname;
    assert!(
        error.starts_with(&format!("AF_XDP bind on {ifname} queue 1 failed: EINVAL")),
        "the bind's own error: {error}"
    );
    assert!(
        error.contains(&format!("queue 1 is not enabled on {ifname}"))
            && error.contains(&format!(
                "`ethtool -l {ifname}` shows 0 combined, 1 rx and 1 tx channels"
            )),
        "the hint names the queue and the channels: {error}"
    );
    assert!(
        !error.contains("rings"),
        "not a second setup of the rings: {error}"
    );
    assert!(opened, "queue 0 takes a socket");
}

#[test]
fn the_queues_that_take_a_socket_come_from_ethtool_channels() {
    if !privileged("the_queues_that_take_a_socket_come_from_ethtool_channels") {
        return;
    }
    let queues_of = |topo: &Topology| {
        topo.host.run(|| {
            let ifindex = nix::net::if_::if_nametoindex(topo.ifname.as_str()).unwrap();
            let allocated = xvio::netlink::link_info(ifindex).unwrap().rx_queues;
            let (queues, ethtool_error) = XskQueues::of(ifindex).unwrap();
            assert!(ethtool_error.is_none(), "{ethtool_error:?}");
            (queues, allocated)
        })
    };
    let (queues, _) = queues_of(&Topology::new(4));
    assert_eq!(queues.count, 4, "{queues:?}");
    assert!(
        matches!(queues.source, QueueSource::Channels(c) if (c.rx, c.tx) == (4, 4)),
        "{queues:?}"
    );
    let (queues, allocated) = queues_of(&Topology::untuned());
    assert_eq!(
        queues.count, 1,
        "a veth made without numrxqueues enables one queue ({allocated} allocated): {queues:?}"
    );
    assert!(
        allocated >= 1,
        "rtnetlink reports the allocated queues: {allocated}"
    );
}

#[test]
fn frames_left_in_the_tx_ring_go_out_without_waiting_for_the_workers_next_wake_up() {
    if !privileged("frames_left_in_the_tx_ring_go_out_without_waiting_for_the_workers_next_wake_up")
    {
        return;
    }
    let topo = Topology::new(1);
    let _daemon = topo.start(&["--queues", "0"]);
    const ME: [u8; 6] = [0x02, 0x58, 0x56, 0x49, 0x4f, 0xad];
    const LEFT: usize = 4096;
    let dst = mac_of(&topo.peer, &topo.peer_if);
    let frames: Vec<Vec<u8>> = (0..LEFT as u32)
        .map(|seq| frame(dst, ME, None, ETH_P_EXPERIMENTAL, 60, seq))
        .collect();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let receiver = s.spawn(move || {
            topo.peer.run(move || {
                let raw = RawSocket::bind(&topo.peer_if).unwrap();
                raw.set_rcvbuf(64 << 20).unwrap();
                ready_tx.send(()).unwrap();
                let (mut got, mut last) = (0, None);
                let mut buf = vec![0u8; 2048];
                while got < LEFT {
                    match raw.recv(&mut buf, Duration::from_secs(3)).unwrap() {
                        Some(_) if buf[6..12] == ME => {
                            (got, last) = (got + 1, Some(Instant::now()))
                        }
                        Some(_) => {}
                        None => break,
                    }
                }
                (got, last)
            })
        });
        ready_rx.recv().unwrap();
        // The guests' frames are in the tx ring, the kernel has sent one budget of them (in
        // copy mode it sends only inside a `sendto`), and nothing more comes: the worker
        // that gets the socket must send the rest before it parks, not one budget per wake-up
        // (one every 100 ms: 6 s for these).
        let port = topo.host.run(|| {
            let mut port = XskPort::open(&topo.ifname, 0, &XskConfig::default()).unwrap();
            assert_eq!(port.send_from_guest(&frames), LEFT);
            port.flush();
            assert!(port.tx_unsent() > 0, "one sendto left frames in the ring");
            port
        });
        let datapath =
            xvio::datapath::Datapath::start(&[], xvio::datapath::worker::IDLE_BEFORE_PARK).unwrap();
        let handed = Instant::now();
        datapath.add_uplink(port).unwrap();
        let (got, last) = receiver.join().unwrap();
        drop(datapath);
        assert_eq!(got, LEFT, "every frame of the ring reaches the peer");
        let took = last.unwrap().saturating_duration_since(handed);
        assert!(
            took < Duration::from_secs(1),
            "the ring drained {took:?} after the worker got the socket"
        );
    });
}
