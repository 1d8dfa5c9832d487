//! A real QEMU guest (the Linux virtio-net driver) through xvio: it pings a DPDK
//! virtio-user endpoint that answers ARP and ICMP, and runs iperf3 against a second QEMU
//! guest, with MRG_RXBUF on and off. The backend runs in this process.

use std::time::Duration;

use xvio::{
    config::{GuestSpec, MacAddr, SocketMode},
    datapath::Datapath,
    vhost::guest::Guest,
};
use xvio_tests::{dpdk::Testpmd, privileged, qemu::QemuGuest, unique_name};

/// Two TCG guests take both cores: one test at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
const BOOT_AND_RUN: Duration = Duration::from_secs(240);

fn guest(switch: &std::sync::Arc<Datapath>, mac: &str) -> Guest {
    let socket = std::env::temp_dir().join(format!("{}.sock", unique_name("xvio-vm-")));
    let spec = GuestSpec {
        socket,
        mac: mac.parse::<MacAddr>().unwrap(),
        vlan: 0,
        queues: 1,
        mode: SocketMode::Server,
    };
    Guest::start(&spec, switch).unwrap()
}

/// A switch with the VM's port and a port served by a testpmd that answers ARP and ICMP.
fn guest_and_echo() -> (std::sync::Arc<Datapath>, Guest, Guest, Testpmd) {
    let switch = Datapath::start(&[], xvio::datapath::worker::IDLE_BEFORE_PARK).unwrap();
    let vm = guest(&switch, "52:54:00:99:00:02");
    let echo = guest(&switch, "02:00:00:00:00:01");
    let pmd = Testpmd::start(
        echo.socket(),
        "icmpecho",
        64,
        "52:54:00:99:00:02",
        ",mac=02:00:00:00:00:01",
        "1,0",
    );
    (switch, vm, echo, pmd)
}

#[test]
fn a_qemu_guest_pings_a_virtio_user_endpoint() {
    if !privileged("a_qemu_guest_pings_a_virtio_user_endpoint") {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (_switch, vm, _echo, pmd) = guest_and_echo();
    let qemu = QemuGuest::start(
        vm.socket(),
        "52:54:00:99:00:02",
        "10.99.0.2/24",
        "ping -c 3 -W 5 10.99.0.1",
        true,
    );
    let (ok, console) = qemu.wait(BOOT_AND_RUN);
    drop(pmd);
    assert!(
        ok && console.contains("3 packets received"),
        "the guest's ping got its replies:\n{console}"
    );
}

#[test]
fn a_guest_that_resets_its_device_is_served_again() {
    if !privileged("a_guest_that_resets_its_device_is_served_again") {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (_switch, vm, _echo, pmd) = guest_and_echo();
    // Unbinding and rebinding the driver resets the device (status 0, vhost stopped and
    // started again by QEMU); the network must come back.
    let cmd = "ping -c 2 -W 5 10.99.0.1 && D=$(basename $(readlink /sys/class/net/eth0/device)) \
               && echo $D > /sys/bus/virtio/drivers/virtio_net/unbind && echo $D > /sys/bus/virtio/drivers/virtio_net/bind \
               && sleep 1 && ip link set eth0 up && ip addr add 10.99.0.2/24 dev eth0 && ping -c 2 -W 5 10.99.0.1";
    let qemu = QemuGuest::start(vm.socket(), "52:54:00:99:00:02", "10.99.0.2/24", cmd, true);
    let (ok, console) = qemu.wait(BOOT_AND_RUN);
    drop(pmd);
    assert!(
        ok && console.matches("2 packets received").count() == 2,
        "ping works before and after the reset:\n{console}"
    );
}

fn iperf_between_two_guests(mrg_rxbuf: bool) {
    let switch = Datapath::start(&[], xvio::datapath::worker::IDLE_BEFORE_PARK).unwrap();
    let (a, b) = (
        guest(&switch, "52:54:00:99:00:02"),
        guest(&switch, "52:54:00:99:00:03"),
    );
    let server = QemuGuest::start(
        b.socket(),
        "52:54:00:99:00:03",
        "10.99.0.3/24",
        "iperf3 -s -1",
        mrg_rxbuf,
    );
    let client_cmd = "for i in $(seq 1 60); do ping -c 1 -W 1 10.99.0.3 >/dev/null && break; done; iperf3 -c 10.99.0.3 -t 5";
    let client = QemuGuest::start(
        a.socket(),
        "52:54:00:99:00:02",
        "10.99.0.2/24",
        client_cmd,
        mrg_rxbuf,
    );
    let (ok, console) = client.wait(BOOT_AND_RUN);
    let (_, server_console) = server.wait(Duration::from_secs(30));
    assert!(
        ok && console.contains("receiver"),
        "iperf3 ran to completion (mrg_rxbuf {mrg_rxbuf}):\n{console}\n--- server ---\n{server_console}"
    );
    let line = console
        .lines()
        .find(|l| l.contains("receiver"))
        .unwrap_or_default();
    eprintln!("iperf3 guest to guest through xvio, mrg_rxbuf {mrg_rxbuf} (TCG): {line}");
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(
        a.counters().malformed_chains.load(Relaxed) + b.counters().malformed_chains.load(Relaxed),
        0
    );
}

#[test]
fn two_qemu_guests_run_iperf3_with_mrg_rxbuf() {
    if !privileged("two_qemu_guests_run_iperf3_with_mrg_rxbuf") {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    iperf_between_two_guests(true);
}

#[test]
fn two_qemu_guests_run_iperf3_without_mrg_rxbuf() {
    if !privileged("two_qemu_guests_run_iperf3_without_mrg_rxbuf") {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    iperf_between_two_guests(false);
}
