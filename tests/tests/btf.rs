//! `common_matches_btf`: the Rust types of `xvio-common` have the sizes, field offsets and
//! enum values that the compiled XDP object's BTF records for the C types of `ebpf/xvio.h`.

use std::{collections::HashMap, mem::offset_of, process::Command};

use xvio_common::{
    DaemonStats, Event, EventKind, EventState, GuestStats, PortStats, SteerKey, SteerSlot,
    SteerValue, XdpMode, XdpOutcome, XdpStats,
};

/// A struct or enum from `bpftool btf dump`: its size and its members (name → bit offset
/// for structs, name → value for enums).
#[derive(Debug, Default)]
struct BtfType {
    size: usize,
    members: HashMap<String, u64>,
}

fn btf_of_object() -> HashMap<String, BtfType> {
    let path = std::env::temp_dir().join(format!("xvio-btf-{}.o", std::process::id()));
    std::fs::write(&path, xvio::XDP_OBJECT).unwrap();
    let out = Command::new("bpftool")
        .args(["btf", "dump", "file"])
        .arg(&path)
        .output()
        .expect("bpftool is needed (apt-get install bpftool; `cargo xtask test` installs it)");
    std::fs::remove_file(&path).unwrap();
    assert!(
        out.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse(&String::from_utf8(out.stdout).unwrap())
}

/// Parses lines like `[8] STRUCT 'xvio_steer_key' size=8 vlen=2` followed by
/// `\t'mac' type_id=11 bits_offset=0` or `\t'XVIO_XDP_PASSED' val=0`.
fn parse(text: &str) -> HashMap<String, BtfType> {
    let mut types = HashMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if line.starts_with('[') {
            current = None;
            let words: Vec<&str> = line.split_whitespace().collect();
            if matches!(words.get(1), Some(&"STRUCT" | &"ENUM")) {
                let name = words[2].trim_matches('\'').to_owned();
                let size = words
                    .iter()
                    .find_map(|w| w.strip_prefix("size="))
                    .unwrap()
                    .parse()
                    .unwrap();
                types.insert(
                    name.clone(),
                    BtfType {
                        size,
                        members: HashMap::new(),
                    },
                );
                current = Some(name);
            }
        } else if let Some(name) = &current {
            let words: Vec<&str> = line.split_whitespace().collect();
            let member = words[0].trim_matches('\'').to_owned();
            let value = words
                .iter()
                .find_map(|w| {
                    w.strip_prefix("bits_offset=")
                        .or_else(|| w.strip_prefix("val="))
                })
                .unwrap()
                .parse()
                .unwrap();
            types.get_mut(name).unwrap().members.insert(member, value);
        }
    }
    types
}

fn check_struct(
    btf: &HashMap<String, BtfType>,
    c_name: &str,
    size: usize,
    fields: &[(&str, usize)],
) {
    let ty = btf
        .get(c_name)
        .unwrap_or_else(|| panic!("struct {c_name} is not in the object's BTF"));
    assert_eq!(ty.size, size, "size of struct {c_name}");
    assert_eq!(
        ty.members.len(),
        fields.len(),
        "fields of struct {c_name}: {:?}",
        ty.members
    );
    for (field, offset) in fields {
        let bits = ty
            .members
            .get(*field)
            .unwrap_or_else(|| panic!("{c_name}.{field} is not in BTF"));
        assert_eq!(*bits, (*offset * 8) as u64, "offset of {c_name}.{field}");
    }
}

fn check_enum(btf: &HashMap<String, BtfType>, c_name: &str, values: &[(&str, u32)]) {
    let ty = btf
        .get(c_name)
        .unwrap_or_else(|| panic!("enum {c_name} is not in the object's BTF"));
    assert_eq!(
        ty.size, 4,
        "enum {c_name} is 4 bytes, as the Rust side's u32"
    );
    for (name, value) in values {
        assert_eq!(
            ty.members.get(*name).copied(),
            Some(u64::from(*value)),
            "{c_name}::{name}"
        );
    }
}

#[test]
fn common_matches_btf() {
    let btf = btf_of_object();
    check_struct(
        &btf,
        "xvio_xdp_stats",
        size_of::<XdpStats>(),
        &[
            ("packets", offset_of!(XdpStats, packets)),
            ("bytes", offset_of!(XdpStats, bytes)),
        ],
    );
    check_struct(
        &btf,
        "xvio_steer_key",
        size_of::<SteerKey>(),
        &[
            ("mac", offset_of!(SteerKey, mac)),
            ("vlan", offset_of!(SteerKey, vlan)),
        ],
    );
    check_struct(
        &btf,
        "xvio_steer_value",
        size_of::<SteerValue>(),
        &[
            ("guest_id", offset_of!(SteerValue, guest_id)),
            ("flags", offset_of!(SteerValue, flags)),
        ],
    );
    check_struct(
        &btf,
        "xvio_steer_slot",
        size_of::<SteerSlot>(),
        &[
            ("key", offset_of!(SteerSlot, key)),
            ("keys", offset_of!(SteerSlot, keys)),
            ("guest_id", offset_of!(SteerSlot, guest_id)),
        ],
    );
    check_struct(
        &btf,
        "xvio_daemon_stats",
        size_of::<DaemonStats>(),
        &[
            ("uptime_ms", offset_of!(DaemonStats, uptime_ms)),
            ("updated_unix_ms", offset_of!(DaemonStats, updated_unix_ms)),
            ("pid", offset_of!(DaemonStats, pid)),
            ("ifaces_attached", offset_of!(DaemonStats, ifaces_attached)),
            ("xdp_mode", offset_of!(DaemonStats, xdp_mode)),
            ("steer_entries", offset_of!(DaemonStats, steer_entries)),
            ("xsk_sockets", offset_of!(DaemonStats, xsk_sockets)),
            ("xsk_zero_copy", offset_of!(DaemonStats, xsk_zero_copy)),
            ("guests", offset_of!(DaemonStats, guests)),
            (
                "guests_connected",
                offset_of!(DaemonStats, guests_connected),
            ),
            (
                "to_guests_packets",
                offset_of!(DaemonStats, to_guests_packets),
            ),
            (
                "from_guests_packets",
                offset_of!(DaemonStats, from_guests_packets),
            ),
            ("guests_dropped", offset_of!(DaemonStats, guests_dropped)),
            (
                "guests_malformed_chains",
                offset_of!(DaemonStats, guests_malformed_chains),
            ),
            ("copy_cpu", offset_of!(DaemonStats, copy_cpu)),
            ("copy_dma", offset_of!(DaemonStats, copy_dma)),
            ("copy_fallbacks", offset_of!(DaemonStats, copy_fallbacks)),
            ("copy_inflight", offset_of!(DaemonStats, copy_inflight)),
            ("group_frames", offset_of!(DaemonStats, group_frames)),
            ("group_dropped", offset_of!(DaemonStats, group_dropped)),
        ],
    );
    check_struct(
        &btf,
        "xvio_guest_stats",
        size_of::<GuestStats>(),
        &[
            ("active", offset_of!(GuestStats, active)),
            ("connected", offset_of!(GuestStats, connected)),
            ("mac", offset_of!(GuestStats, mac)),
            ("queue_pairs", offset_of!(GuestStats, queue_pairs)),
            ("ready", offset_of!(GuestStats, ready)),
            ("to_guest_packets", offset_of!(GuestStats, to_guest_packets)),
            ("to_guest_bytes", offset_of!(GuestStats, to_guest_bytes)),
            (
                "from_guest_packets",
                offset_of!(GuestStats, from_guest_packets),
            ),
            ("from_guest_bytes", offset_of!(GuestStats, from_guest_bytes)),
            (
                "to_guest_dropped_full",
                offset_of!(GuestStats, to_guest_dropped_full),
            ),
            (
                "to_guest_dropped_small",
                offset_of!(GuestStats, to_guest_dropped_small),
            ),
            (
                "to_guest_dropped_reset",
                offset_of!(GuestStats, to_guest_dropped_reset),
            ),
            (
                "from_guest_no_route",
                offset_of!(GuestStats, from_guest_no_route),
            ),
            (
                "from_guest_oversize",
                offset_of!(GuestStats, from_guest_oversize),
            ),
            (
                "from_guest_dropped_full",
                offset_of!(GuestStats, from_guest_dropped_full),
            ),
            ("malformed_chains", offset_of!(GuestStats, malformed_chains)),
            ("broken_queues", offset_of!(GuestStats, broken_queues)),
            ("copy_cpu", offset_of!(GuestStats, copy_cpu)),
            ("copy_cpu_bytes", offset_of!(GuestStats, copy_cpu_bytes)),
            ("copy_dma", offset_of!(GuestStats, copy_dma)),
            ("copy_dma_bytes", offset_of!(GuestStats, copy_dma_bytes)),
            (
                "copy_fallback_full",
                offset_of!(GuestStats, copy_fallback_full),
            ),
            (
                "copy_fallback_enqueue",
                offset_of!(GuestStats, copy_fallback_enqueue),
            ),
            (
                "copy_fallback_error",
                offset_of!(GuestStats, copy_fallback_error),
            ),
            (
                "copy_fallback_submit",
                offset_of!(GuestStats, copy_fallback_submit),
            ),
            ("copy_inflight", offset_of!(GuestStats, copy_inflight)),
            (
                "from_guest_dropped_reset",
                offset_of!(GuestStats, from_guest_dropped_reset),
            ),
            (
                "to_guest_dropped_malformed",
                offset_of!(GuestStats, to_guest_dropped_malformed),
            ),
        ],
    );
    check_struct(
        &btf,
        "xvio_port_stats",
        size_of::<PortStats>(),
        &[
            ("active", offset_of!(PortStats, active)),
            ("zero_copy", offset_of!(PortStats, zero_copy)),
            ("need_wakeup", offset_of!(PortStats, need_wakeup)),
            ("reserved", offset_of!(PortStats, reserved)),
            ("rx_packets", offset_of!(PortStats, rx_packets)),
            ("rx_bytes", offset_of!(PortStats, rx_bytes)),
            ("tx_packets", offset_of!(PortStats, tx_packets)),
            ("tx_bytes", offset_of!(PortStats, tx_bytes)),
            ("rx_empty_polls", offset_of!(PortStats, rx_empty_polls)),
            ("fill_ring_empty", offset_of!(PortStats, fill_ring_empty)),
            ("rx_ring_full", offset_of!(PortStats, rx_ring_full)),
            ("tx_ring_full", offset_of!(PortStats, tx_ring_full)),
            ("tx_no_frame", offset_of!(PortStats, tx_no_frame)),
            ("tx_in_flight", offset_of!(PortStats, tx_in_flight)),
            ("rx_no_guest", offset_of!(PortStats, rx_no_guest)),
            ("tx_oversize", offset_of!(PortStats, tx_oversize)),
        ],
    );
    check_struct(
        &btf,
        "xvio_event",
        size_of::<Event>(),
        &[
            ("ktime_ns", offset_of!(Event, ktime_ns)),
            ("kind", offset_of!(Event, kind)),
            ("outcome", offset_of!(Event, outcome)),
            ("ifindex", offset_of!(Event, ifindex)),
            ("rx_queue", offset_of!(Event, rx_queue)),
            ("frame_len", offset_of!(Event, frame_len)),
            ("suppressed", offset_of!(Event, suppressed)),
            ("vlan", offset_of!(Event, vlan)),
            ("mac", offset_of!(Event, mac)),
        ],
    );
    check_struct(
        &btf,
        "xvio_event_state",
        size_of::<EventState>(),
        &[
            ("suppressed", offset_of!(EventState, suppressed)),
            ("reserved", offset_of!(EventState, reserved)),
            ("last", offset_of!(EventState, last)),
        ],
    );
    let outcomes: Vec<(&str, u32)> = XdpOutcome::ALL
        .iter()
        .map(|o| (o.c_name(), o.index()))
        .collect();
    check_enum(&btf, "xvio_xdp_outcome", &outcomes);
    check_enum(
        &btf,
        "xvio_xdp_outcome",
        &[("XVIO_XDP_OUTCOMES", XdpOutcome::ALL.len() as u32)],
    );
    let modes = [XdpMode::None, XdpMode::Native, XdpMode::Generic];
    let modes: Vec<(&str, u32)> = modes.iter().map(|m| (m.c_name(), *m as u32)).collect();
    check_enum(&btf, "xvio_xdp_mode", &modes);
    let mut kinds: Vec<(&str, u32)> = EventKind::ALL
        .iter()
        .map(|k| (k.c_name(), *k as u32))
        .collect();
    kinds.push(("XVIO_EVENT_KINDS", EventKind::ENTRIES));
    check_enum(&btf, "xvio_event_kind", &kinds);
}

#[test]
fn the_parser_reads_bpftool_output() {
    let sample = "[8] STRUCT 'xvio_steer_key' size=8 vlen=2\n\t'mac' type_id=11 bits_offset=0\n\t'vlan' type_id=12 bits_offset=48\n[9] TYPEDEF '__u8' type_id=10\n[62] ENUM 'e' encoding=UNSIGNED size=4 vlen=1\n\t'A' val=3\n";
    let types = parse(sample);
    assert_eq!(types["xvio_steer_key"].size, 8);
    assert_eq!(types["xvio_steer_key"].members["vlan"], 48);
    assert_eq!(types["e"].members["A"], 3);
    assert_eq!(types.len(), 2);
}
