//! Every vhost-user connection leaves nothing behind: connect and disconnect cycles of a
//! real frontend (the `vhost` crate's, memfd memory), short hostile sessions of random
//! messages, and a frontend that floods the control-socket shim with early
//! `SET_VRING_ENABLE` messages each return this process's open file descriptors and xvio's
//! threads to where they were. In-process: no root needed.
//!
//! The tests count `/proc/self/fd` and `/proc/self/task`, so they live in their own test
//! binary and take turns ([`ONE_AT_A_TIME`]).

use std::{
    io::{IoSlice, Read},
    os::{fd::AsRawFd, unix::net::UnixStream},
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use xvio::{
    config::{GuestSpec, MacAddr, SocketMode},
    datapath::Datapath,
    vhost::guest::Guest,
};
use xvio_tests::{guest::TestGuest, unique_name};

const MAC_A: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x0a];
/// EVENT_IDX is left out by the test driver (it reads no avail_event/used_event).
const REFUSE: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
const WAIT: Duration = Duration::from_secs(10);
const SET_VRING_ENABLE: u32 = 18;
const VERSION: u32 = 0x1;

/// The counts of one test must not see another test's descriptors come and go.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a connection could leave behind: this process's open descriptors, and the threads
/// xvio and vhost-user-backend start (named `xvio-…`, `vring_worker`, and the library's
/// request thread, named after the socket path). The test harness's own threads are left
/// out: it starts one per test whenever it likes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Footprint {
    fds: usize,
    threads: usize,
}

fn footprint() -> Footprint {
    let fds = std::fs::read_dir("/proc/self/fd").unwrap().count();
    let threads = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| {
            name.starts_with("xvio") || name.starts_with("vring_worker") || name.starts_with('/')
        })
        .count();
    Footprint { fds, threads }
}

/// Waits (a connection's threads end shortly after it closes) until the footprint is back
/// at `baseline`; the last one seen otherwise.
fn settles_at(baseline: Footprint) -> Footprint {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = footprint();
        if now == baseline || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What each open descriptor is, for a failure message.
fn open_fds() -> String {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            Some(format!(
                "{}:{}",
                e.file_name().to_string_lossy(),
                target.display()
            ))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The footprint once it has stopped changing (the same for 300 ms): what the last
/// connection's threads release, they have released.
fn quiet() -> Footprint {
    let deadline = Instant::now() + WAIT;
    let mut last = footprint();
    let mut since = Instant::now();
    while since.elapsed() < Duration::from_millis(300) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        let now = footprint();
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
    last
}

fn wait_until(cond: impl Fn() -> bool, what: &str) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn start(switch: &Arc<Datapath>, queues: u16) -> Guest {
    let socket: PathBuf = std::env::temp_dir().join(format!("{}.sock", unique_name("xvio-cn-")));
    let spec = GuestSpec {
        socket,
        mac: MacAddr(MAC_A),
        vlan: 0,
        queues,
        mode: SocketMode::Server,
    };
    Guest::start(&spec, switch).expect("start the guest's backend")
}

/// One full connection: a driver sets the device up, xvio reports it connected, the driver
/// hangs up, xvio reports it gone.
fn cycle(guest: &Guest) {
    let driver = TestGuest::connect(guest.socket(), REFUSE);
    wait_until(|| guest.is_connected(), "the guest connects");
    drop(driver);
    wait_until(|| !guest.is_connected(), "the guest disconnects");
}

/// Connect/disconnect cycles leave the descriptor and thread counts where they were, for
/// one queue pair and for several (one event thread, and one exit event, per guest).
#[test]
fn connect_disconnect_cycles_leave_no_descriptor_or_thread_behind() {
    let _serial = one_at_a_time();
    for queues in [1, 4] {
        let switch = Datapath::start(&[], xvio::datapath::worker::IDLE_BEFORE_PARK).unwrap();
        let guest = start(&switch, queues);
        let baseline = quiet();
        for _ in 0..20 {
            cycle(&guest);
        }
        assert_eq!(
            settles_at(baseline),
            baseline,
            "20 connections of a guest with {queues} queue pair(s) left these behind (was {baseline:?}); open now: {}",
            open_fds()
        );
    }
}

/// One vhost-user message: header (request, flags, size) and payload, with `fds` attached.
fn send_message(stream: &UnixStream, request: u32, payload: &[u8], fds: &[i32]) -> bool {
    let mut header = [0u8; 12];
    header[0..4].copy_from_slice(&request.to_le_bytes());
    header[4..8].copy_from_slice(&VERSION.to_le_bytes());
    header[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    let iov = [IoSlice::new(&header), IoSlice::new(payload)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    sendmsg::<()>(
        stream.as_raw_fd(),
        &iov,
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .is_ok_and(|n| n == header.len() + payload.len())
}

/// A small deterministic generator for the hostile sessions.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Short hostile sessions: random requests with random payloads, some carrying a
/// descriptor, then a hang-up. Each must leave nothing behind, and an honest driver is
/// served after them.
#[test]
fn hostile_sessions_leave_no_descriptor_or_thread_behind() {
    let _serial = one_at_a_time();
    let switch = Datapath::start(&[], xvio::datapath::worker::IDLE_BEFORE_PARK).unwrap();
    let guest = start(&switch, 1);
    let baseline = quiet();
    let event = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for _ in 0..100 {
        let stream = UnixStream::connect(guest.socket()).unwrap();
        for _ in 0..rng.below(8) + 1 {
            // Requests 1..=45 cover the protocol; payloads up to 64 bytes.
            let request = rng.below(45) as u32 + 1;
            let payload: Vec<u8> = (0..rng.below(65)).map(|_| rng.next() as u8).collect();
            let fds: &[i32] = if rng.below(2) == 0 {
                &[]
            } else {
                &[event.as_raw_fd()]
            };
            if !send_message(&stream, request, &payload, fds) {
                break;
            }
        }
        drop(stream);
    }
    drop(event);
    cycle(&guest);
    assert_eq!(
        settles_at(baseline),
        baseline,
        "100 hostile sessions left these behind (was {baseline:?}); open now: {}",
        open_fds()
    );
}

/// A frontend that sends `SET_VRING_ENABLE` over and over before `SET_FEATURES`: the shim
/// holds early enables until `SET_FEATURES`, but only a bounded number of well-formed ones;
/// past the bound, or at the first one carrying a descriptor, it hangs up, and what it held
/// is released.
#[test]
fn a_flood_of_early_vring_enables_is_cut_off_and_released() {
    let _serial = one_at_a_time();
    let switch = Datapath::start(&[], xvio::datapath::worker::IDLE_BEFORE_PARK).unwrap();
    let guest = start(&switch, 1);
    let baseline = quiet();
    let event = EventFd::new(EFD_NONBLOCK).unwrap();
    // Queue 0 enabled, 2000 times over.
    let mut enable = [0u8; 8];
    enable[4..8].copy_from_slice(&1u32.to_le_bytes());
    for (kind, fds) in [
        ("plain", &[][..]),
        ("with a descriptor", &[event.as_raw_fd()][..]),
    ] {
        let mut stream = UnixStream::connect(guest.socket()).unwrap();
        let mut sent = 0;
        while sent < 2000 && send_message(&stream, SET_VRING_ENABLE, &enable, fds) {
            sent += 1;
        }
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut byte = [0u8; 1];
        // No request asked for a reply: the only thing to read is the end of the stream.
        let hung_up = match stream.read(&mut byte) {
            Ok(n) => n == 0,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        };
        assert!(
            hung_up,
            "the shim still holds the connection after {sent} early SET_VRING_ENABLE messages ({kind})"
        );
    }
    drop(event);
    cycle(&guest);
    assert_eq!(
        settles_at(baseline),
        baseline,
        "the floods left these behind (was {baseline:?}); open now: {}",
        open_fds()
    );
}
