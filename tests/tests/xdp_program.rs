//! The XDP program's logic through `BPF_PROG_TEST_RUN` on crafted frames: the action it
//! returns, the frame it leaves, and the exact counters and events for each case.

use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapData, PerCpuArray, RingBuf, XskMap},
    programs::{TestRun, TestRunOptions, Xdp},
};
use xvio::xsk::{XskConfig, XskPort};
use xvio_common::{
    Event, EventKind, EventState, SteerKey, SteerSlot, SteerValue, XdpOutcome, XdpStats, maps,
};
use xvio_tests::{
    frames::{ETH_P_IP, frame},
    netns::{Netns, veth},
    privileged,
};

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
const GUEST: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const GUEST_VLAN: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const OTHER: [u8; 6] = [0x02, 0, 0, 0, 0, 0x03];
const SRC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x09];

struct Harness {
    ebpf: Ebpf,
}

impl Harness {
    fn load() -> Harness {
        let mut ebpf = Ebpf::load(xvio::XDP_OBJECT).expect("load the XDP object");
        let prog: &mut Xdp = ebpf
            .program_mut(xvio_common::PROGRAM_NAME)
            .unwrap()
            .try_into()
            .unwrap();
        prog.load().expect("the verifier accepts the program");
        // As the daemon steers: into `steer`, then into the key's slot of `steer_index`.
        for (key, guest_id) in [
            (SteerKey::new(GUEST, 0), 1),
            (SteerKey::new(GUEST_VLAN, 100), 2),
        ] {
            steer_key(&mut ebpf, key, guest_id);
        }
        Harness { ebpf }
    }

    /// Runs the program on `frame`; returns the action. Checks the frame comes out as it went in.
    fn run(&self, frame: &[u8]) -> u32 {
        self.try_run(frame)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on {} bytes: {e:?}", frame.len()))
    }

    fn try_run(&self, frame: &[u8]) -> Result<u32, aya::programs::ProgramError> {
        let prog: &Xdp = self
            .ebpf
            .program(xvio_common::PROGRAM_NAME)
            .unwrap()
            .try_into()
            .unwrap();
        // BPF_PROG_TEST_RUN refuses inputs under 14 bytes, so every frame is preceded by 16
        // bytes of XDP metadata (xdp_md.data = 16): the program sees exactly `frame`.
        const META: usize = 16;
        let mut input = vec![0u8; META];
        input.extend_from_slice(frame);
        let mut ctx = [0u8; 24]; // struct xdp_md: data, data_end, data_meta, ifindex, rx_queue, egress
        ctx[0..4].copy_from_slice(&(META as u32).to_ne_bytes());
        ctx[4..8].copy_from_slice(&(input.len() as u32).to_ne_bytes());
        let mut output = vec![0u8; input.len() + 256];
        let result = prog.test_run(TestRunOptions {
            data_in: Some(&input),
            data_out: Some(&mut output),
            ctx_in: Some(&ctx),
            ..TestRunOptions::default()
        })?;
        assert_eq!(
            &output[META..result.data_size_out as usize],
            frame,
            "the program must not change the frame"
        );
        Ok(result.return_value)
    }

    fn stats(&self) -> [XdpStats; 6] {
        let array: PerCpuArray<&MapData, XdpStats> =
            PerCpuArray::try_from(self.ebpf.map(maps::XDP_STATS).unwrap()).unwrap();
        xvio::stats::xdp_totals(&array).unwrap()
    }

    /// Runs `frame` and checks the action and that exactly `outcome` counted it.
    fn expect(&self, what: &str, frame: &[u8], action: u32, outcome: XdpOutcome) {
        let before = self.stats();
        assert_eq!(self.run(frame), action, "{what}: action");
        let after = self.stats();
        for o in XdpOutcome::ALL {
            let i = o.index() as usize;
            let (dp, db) = (
                after[i].packets - before[i].packets,
                after[i].bytes - before[i].bytes,
            );
            if o == outcome {
                assert_eq!(
                    (dp, db),
                    (1, frame.len() as u64),
                    "{what}: counted under {}",
                    o.name()
                );
            } else {
                assert_eq!((dp, db), (0, 0), "{what}: not counted under {}", o.name());
            }
        }
    }
}

/// Steers `key` as the daemon does: into `steer`, then into its slot of `steer_index`.
fn steer_key(ebpf: &mut Ebpf, key: SteerKey, guest_id: u32) {
    let mut steer: HashMap<&mut MapData, SteerKey, SteerValue> =
        HashMap::try_from(ebpf.map_mut(maps::STEER).unwrap()).unwrap();
    steer
        .insert(key, SteerValue { guest_id, flags: 0 }, 0)
        .unwrap();
    let mut index: Array<&mut MapData, SteerSlot> =
        Array::try_from(ebpf.map_mut(maps::STEER_INDEX).unwrap()).unwrap();
    xvio::attach::index_steered(&mut index, key, guest_id).unwrap();
}

fn tagged(dst: [u8; 6], vlan: u16) -> Vec<u8> {
    frame(dst, SRC, Some(vlan), ETH_P_IP, 64, 7)
}

#[test]
fn object_declares_the_maps_common_names() {
    let ebpf = Ebpf::load(xvio::XDP_OBJECT).expect_or_skip();
    let Some(ebpf) = ebpf else { return };
    for name in maps::PINNED.iter().chain([&maps::EVENTS]) {
        assert!(
            ebpf.map(name).is_some(),
            "map {name} is missing from the object"
        );
    }
    let Some(Map::HashMap(steer)) = ebpf.map(maps::STEER) else {
        panic!("steer is not a hash map")
    };
    assert_eq!(steer.info().unwrap().max_entries(), xvio_common::STEER_MAX);
    let xsks: XskMap<&MapData> = XskMap::try_from(ebpf.map(maps::XSKS).unwrap()).unwrap();
    assert_eq!(xsks.len(), xvio_common::XSKS_MAX);
    let daemon: Array<&MapData, xvio_common::DaemonStats> =
        Array::try_from(ebpf.map(maps::DAEMON_STATS).unwrap()).unwrap();
    assert_eq!(daemon.len(), 1);
}

trait ExpectOrSkip<T> {
    fn expect_or_skip(self) -> Option<T>;
}

impl<T, E: std::fmt::Debug> ExpectOrSkip<T> for Result<T, E> {
    /// Loading maps needs privileges: skip (outside CI) or fail when they are missing.
    fn expect_or_skip(self) -> Option<T> {
        if !privileged("object_declares_the_maps_common_names") {
            return None;
        }
        Some(self.expect("load the XDP object"))
    }
}

#[test]
fn frames_get_the_right_action_and_counter() {
    if !privileged("frames_get_the_right_action_and_counter") {
        return;
    }
    let h = Harness::load();
    let unicast = |dst| frame(dst, SRC, None, ETH_P_IP, 98, 1);

    // Steered MAC, no socket registered for queue 0: passes, counted as no_socket.
    h.expect(
        "steered, no socket",
        &unicast(GUEST),
        XDP_PASS,
        XdpOutcome::NoSocket,
    );
    h.expect("unknown MAC", &unicast(OTHER), XDP_PASS, XdpOutcome::Passed);
    h.expect(
        "broadcast",
        &unicast([0xff; 6]),
        XDP_PASS,
        XdpOutcome::Broadcast,
    );
    h.expect(
        "IPv4 multicast",
        &unicast([0x01, 0x00, 0x5e, 0, 0, 1]),
        XDP_PASS,
        XdpOutcome::Multicast,
    );
    h.expect(
        "IPv6 multicast",
        &unicast([0x33, 0x33, 0, 0, 0, 1]),
        XDP_PASS,
        XdpOutcome::Multicast,
    );
    h.expect(
        "tagged broadcast",
        &tagged([0xff; 6], 100),
        XDP_PASS,
        XdpOutcome::Broadcast,
    );
    // The VLAN is part of the key: the right MAC on the wrong VLAN (or untagged) is not steered.
    h.expect(
        "steered MAC, other VLAN",
        &tagged(GUEST_VLAN, 101),
        XDP_PASS,
        XdpOutcome::Passed,
    );
    h.expect(
        "VLAN guest, untagged",
        &unicast(GUEST_VLAN),
        XDP_PASS,
        XdpOutcome::Passed,
    );
    h.expect(
        "untagged guest, tagged 100",
        &tagged(GUEST, 100),
        XDP_PASS,
        XdpOutcome::Passed,
    );
    h.expect(
        "VLAN guest, no socket",
        &tagged(GUEST_VLAN, 100),
        XDP_PASS,
        XdpOutcome::NoSocket,
    );
    // Priority-tagged (VID 0) frames belong to the untagged key; PCP bits are ignored.
    h.expect(
        "priority tag",
        &tagged(GUEST, 0),
        XDP_PASS,
        XdpOutcome::NoSocket,
    );
    let mut pcp = tagged(GUEST_VLAN, 100);
    pcp[14] |= 0xe0;
    h.expect("VLAN 100 with PCP 7", &pcp, XDP_PASS, XdpOutcome::NoSocket);

    // Runt frames of 0 to 13 bytes never reach an XDP program: the kernel refuses them in
    // BPF_PROG_TEST_RUN (EINVAL), and bpf_xdp_adjust_head/tail refuse to shrink a frame below
    // 14 bytes. The program still bounds-checks them (the verifier insists), and frames cut
    // inside the 802.1Q tag below exercise that malformed path for real.
    let full = unicast(GUEST);
    for len in 0..14 {
        let before = h.stats();
        let refused = h.try_run(&full[..len]);
        assert!(
            matches!(&refused, Err(aya::programs::ProgramError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EINVAL)),
            "a {len}-byte frame: {refused:?}"
        );
        assert_eq!(
            h.stats(),
            before,
            "a refused runt of {len} B is not counted"
        );
    }
    // A frame cut inside its 802.1Q tag (14 to 17 bytes): malformed.
    let vlan_frame = tagged(GUEST_VLAN, 100);
    for len in 14..18 {
        h.expect(
            &format!("cut in the VLAN tag at {len} B"),
            &vlan_frame[..len],
            XDP_PASS,
            XdpOutcome::Malformed,
        );
    }
    // Exactly the headers, nothing else: well formed.
    h.expect(
        "bare 18-byte tagged frame",
        &vlan_frame[..18],
        XDP_PASS,
        XdpOutcome::NoSocket,
    );
    h.expect(
        "bare 14-byte frame",
        &full[..14],
        XDP_PASS,
        XdpOutcome::NoSocket,
    );
}

/// The daemon records each steered key in its slot of `steer_index`: the program decides a
/// slot with one key by comparing with it (so the slot the daemon computes is the program's:
/// a key out of `steer` is still steered), a slot with none as not steered (a key put into
/// `steer` alone, as with bpftool, is not), and asks `steer` for a slot with more keys.
#[test]
fn the_steer_index_decides_slots_of_one_key_and_steer_the_rest() {
    if !privileged("the_steer_index_decides_slots_of_one_key_and_steer_the_rest") {
        return;
    }
    let mut h = Harness::load();
    let guest = SteerKey::new(GUEST, 0);
    // Other MACs and VLANs in GUEST's slot: one to steer later, one never steered.
    let mut same_slot = (0u16..4096)
        .map(|v| SteerKey::new([0x02, 0, 0, 0, 0x10, 0x01], v))
        .filter(|k| k.slot() == guest.slot());
    let (collider, stranger) = (same_slot.next().unwrap(), same_slot.next().unwrap());
    let as_frame = |key: SteerKey| {
        if key.vlan == 0 {
            frame(key.mac, SRC, None, ETH_P_IP, 60, 1)
        } else {
            tagged(key.mac, key.vlan)
        }
    };
    let index = |h: &Harness| {
        let index: Array<&MapData, SteerSlot> =
            Array::try_from(h.ebpf.map(maps::STEER_INDEX).unwrap()).unwrap();
        index.get(&guest.slot(), 0).unwrap()
    };
    let held = index(&h);
    assert_eq!((held.key, held.keys, held.guest_id), (guest, 1, 1));
    // The same key again (a `--steer` MAC that is also a guest's): the slot names the new id.
    steer_key(&mut h.ebpf, guest, 4);
    let held = index(&h);
    assert_eq!((held.key, held.keys, held.guest_id), (guest, 1, 4));

    // One key in the slot: decided by it alone.
    let mut steer: HashMap<&mut MapData, SteerKey, SteerValue> =
        HashMap::try_from(h.ebpf.map_mut(maps::STEER).unwrap()).unwrap();
    steer.remove(&guest).unwrap();
    let lone = SteerKey::new(OTHER, 0);
    assert_ne!(lone.slot(), guest.slot());
    steer
        .insert(
            lone,
            SteerValue {
                guest_id: 9,
                flags: 0,
            },
            0,
        )
        .unwrap();
    h.expect(
        "the slot's key, out of steer",
        &as_frame(guest),
        XDP_PASS,
        XdpOutcome::NoSocket,
    );
    h.expect(
        "another key in the slot",
        &as_frame(stranger),
        XDP_PASS,
        XdpOutcome::Passed,
    );
    h.expect(
        "the slot's MAC on another VLAN",
        &tagged(GUEST, 7),
        XDP_PASS,
        XdpOutcome::Passed,
    );
    h.expect(
        "in steer only, its slot empty",
        &as_frame(lone),
        XDP_PASS,
        XdpOutcome::Passed,
    );
    // Every byte the slot is made of, and a VLAN: a key with all of them set, out of `steer`.
    let full = SteerKey::new([0x02, 0, 0, 0x5a, 0x3c, 0x7e], 300);
    steer_key(&mut h.ebpf, full, 5);
    let mut steer: HashMap<&mut MapData, SteerKey, SteerValue> =
        HashMap::try_from(h.ebpf.map_mut(maps::STEER).unwrap()).unwrap();
    steer.remove(&full).unwrap();
    h.expect(
        "a key of every slot byte and a VLAN, out of steer",
        &as_frame(full),
        XDP_PASS,
        XdpOutcome::NoSocket,
    );

    // Two keys in the slot: steer decides.
    let mut steer: HashMap<&mut MapData, SteerKey, SteerValue> =
        HashMap::try_from(h.ebpf.map_mut(maps::STEER).unwrap()).unwrap();
    steer
        .insert(
            guest,
            SteerValue {
                guest_id: 1,
                flags: 0,
            },
            0,
        )
        .unwrap();
    steer_key(&mut h.ebpf, collider, 3);
    let held = index(&h);
    assert_eq!(
        (held.key, held.keys),
        (guest, 2),
        "the slot has more than one key"
    );
    h.expect(
        "the first key",
        &as_frame(guest),
        XDP_PASS,
        XdpOutcome::NoSocket,
    );
    h.expect(
        "the second key",
        &as_frame(collider),
        XDP_PASS,
        XdpOutcome::NoSocket,
    );
    h.expect(
        "a third, not steered",
        &as_frame(stranger),
        XDP_PASS,
        XdpOutcome::Passed,
    );
}

#[test]
fn steered_frames_redirect_once_a_socket_is_registered() {
    if !privileged("steered_frames_redirect_once_a_socket_is_registered") {
        return;
    }
    let mut h = Harness::load();
    let a = Netns::new("p");
    let b = Netns::new("p");
    veth(&a, "xvp0", "10.251.0.1/24", &b, "xvp1", "10.251.0.2/24", 1);
    // AF_XDP sockets stay on the thread that made them: do it all inside the namespace.
    a.run(|| {
        let xsk = XskPort::open("xvp0", 0, &XskConfig::default())
            .expect("bind an AF_XDP socket to xvp0 queue 0");
        let mut xsks: XskMap<&mut MapData> =
            XskMap::try_from(h.ebpf.map_mut(maps::XSKS).unwrap()).unwrap();
        xsks.set(0, xsk.fd(), 0)
            .expect("register the socket for queue 0");

        // BPF_PROG_TEST_RUN without an ingress device runs on queue 0.
        h.expect(
            "steered",
            &frame(GUEST, SRC, None, ETH_P_IP, 60, 1),
            XDP_REDIRECT,
            XdpOutcome::Redirected,
        );
        h.expect(
            "steered 1514 B",
            &frame(GUEST, SRC, None, ETH_P_IP, 1514, 2),
            XDP_REDIRECT,
            XdpOutcome::Redirected,
        );
        h.expect(
            "steered on VLAN 100",
            &tagged(GUEST_VLAN, 100),
            XDP_REDIRECT,
            XdpOutcome::Redirected,
        );
        h.expect(
            "unknown MAC",
            &frame(OTHER, SRC, None, ETH_P_IP, 60, 3),
            XDP_PASS,
            XdpOutcome::Passed,
        );
        h.expect(
            "broadcast",
            &frame([0xff; 6], SRC, None, ETH_P_IP, 60, 4),
            XDP_PASS,
            XdpOutcome::Broadcast,
        );
        drop(xsk);
        // A closed socket leaves the map: steered frames pass to the kernel again.
        h.expect(
            "socket closed",
            &frame(GUEST, SRC, None, ETH_P_IP, 60, 5),
            XDP_PASS,
            XdpOutcome::NoSocket,
        );
    });
}

#[test]
fn kernel_events_are_rate_limited_and_accounted() {
    if !privileged("kernel_events_are_rate_limited_and_accounted") {
        return;
    }
    let mut h = Harness::load();
    let mut ring = RingBuf::try_from(h.ebpf.take_map(maps::EVENTS).unwrap()).unwrap();
    const RUNTS: u64 = 50; // frames cut inside their VLAN tag
    let cut = tagged(GUEST_VLAN, 100);
    for i in 0..RUNTS {
        assert_eq!(h.run(&cut[..14 + (i % 4) as usize]), XDP_PASS);
    }
    assert_eq!(h.run(&frame(GUEST, SRC, None, ETH_P_IP, 60, 1)), XDP_PASS);

    let mut records = Vec::new();
    while let Some(item) = ring.next() {
        records.push(Event::from_bytes(&item).expect("a whole record"));
    }
    let malformed: Vec<&Event> = records
        .iter()
        .filter(|e| e.kind == EventKind::Malformed as u32)
        .collect();
    let no_socket: Vec<&Event> = records
        .iter()
        .filter(|e| e.kind == EventKind::NoSocket as u32)
        .collect();
    // The test runs well within one period, on at most two CPUs: one event per kind and CPU.
    assert!(
        !malformed.is_empty() && malformed.len() <= 2,
        "malformed events: {malformed:?}"
    );
    assert_eq!(no_socket.len(), 1, "one no_socket event: {no_socket:?}");
    assert_eq!(no_socket[0].mac, GUEST);
    assert_eq!(no_socket[0].outcome, XdpOutcome::NoSocket as u32);
    assert_eq!(no_socket[0].frame_len, 60);
    assert!(
        malformed
            .iter()
            .all(|e| e.outcome == XdpOutcome::Malformed as u32
                && (14..18).contains(&e.frame_len)
                && e.mac == GUEST_VLAN),
        "malformed events: {malformed:?}"
    );

    // Every malformed frame is either an event or counted as suppressed in event_state.
    let state: PerCpuArray<&MapData, EventState> =
        PerCpuArray::try_from(h.ebpf.map(maps::EVENT_STATE).unwrap()).unwrap();
    let per_cpu = state.get(&(EventKind::Malformed as u32), 0).unwrap();
    let suppressed: u64 = per_cpu.iter().map(|s| u64::from(s.suppressed)).sum();
    let carried: u64 = malformed.iter().map(|e| u64::from(e.suppressed)).sum();
    assert_eq!(malformed.len() as u64 + suppressed + carried, RUNTS);
    // The last event stays visible in event_state for bpftool.
    assert!(
        per_cpu
            .iter()
            .any(|s| s.last.kind == EventKind::Malformed as u32)
    );
}
