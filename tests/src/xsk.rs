//! The daemon's own AF_XDP port (`xvio::xsk::XskPort`) in tests and benchmarks: receiving
//! until a count, the traffic generator on a peer's veth end, and the bare AF_XDP loops the
//! benchmarks compare the datapath with (receive and recycle; transmit one frame over and
//! over) on a thread pinned to a CPU.

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use xvio::{
    attach::{AttachOptions, AttachedIface},
    config::{SteerSpec, XdpModeArg},
    xsk::{BindMode, XskConfig, XskPort},
};
use xvio_common::PortStats;

use crate::{bench::pin_current_thread, netns::Netns};

/// Attaches xvio's XDP program natively to `iface` in `ns`, steering frames to `mac` to the
/// AF_XDP sockets registered in its `xsks` map (pinned under xvio's pin root), with no daemon:
/// what a bare AF_XDP receiver sits behind.
pub fn attach_steering(ns: &Netns, iface: &str, mac: &str) -> Result<AttachedIface, String> {
    let pin_root = PathBuf::from(xvio_common::PIN_ROOT);
    let steer = [mac
        .parse::<SteerSpec>()
        .map_err(|e| format!("{mac}: {e}"))?];
    let opts = AttachOptions {
        mode: XdpModeArg::Native,
        replace: false,
        pin_root: &pin_root,
        steer: &steer,
    };
    ns.run(|| AttachedIface::attach(iface, opts))
        .map_err(|e| format!("attaching xvio's program to {iface}: {e}"))
}

/// Receives on `ports` until `want` frames came in all or none came for `idle`; returns
/// copies of the frames, per port, in arrival order.
pub fn receive_all(ports: &mut [XskPort], want: usize, idle: Duration) -> Vec<Vec<Vec<u8>>> {
    let mut got: Vec<Vec<Vec<u8>>> = ports.iter().map(|_| Vec::new()).collect();
    let mut last = Instant::now();
    while got.iter().map(Vec::len).sum::<usize>() < want && last.elapsed() < idle {
        let mut any = 0;
        for (port, out) in ports.iter_mut().zip(got.iter_mut()) {
            any += port.to_guest_burst(64, |bytes| out.push(bytes.to_vec()));
        }
        if any > 0 {
            last = Instant::now();
        } else {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
    got
}

/// Fills every free transmit frame of `port` with `data` once, then sends those frames over
/// and over in bursts of up to 64 while `more(sent)` says so; waits for the last completions.
/// How many it sent.
pub fn transmit_loop(port: &mut XskPort, data: &[u8], more: impl FnMut(u64) -> bool) -> u64 {
    fill_frames(port, data);
    send_frames(port, data.len() as u32, more)
}

/// Writes `data` at the start of every free transmit frame of `port`.
fn fill_frames(port: &mut XskPort, data: &[u8]) {
    let mut bases = Vec::new();
    while let Some(base) = port.from_guest_alloc() {
        port.frame_mut(base)[..data.len()].copy_from_slice(data);
        bases.push(base);
    }
    for base in bases {
        port.from_guest_free(base);
    }
}

/// How long a transmit loop may go without sending or completing a frame before it gives up
/// (a link down, a kernel that stopped completing): a test fails saying so instead of hanging.
const STALL: Duration = Duration::from_secs(10);

/// Sends the frames [`fill_frames`] prepared, `len` bytes each, in bursts of up to 64 while
/// `more(sent)` says so, and waits for the last completions; how many it sent. Panics after
/// [`STALL`] without progress.
fn send_frames(port: &mut XskPort, len: u32, mut more: impl FnMut(u64) -> bool) -> u64 {
    let stalled = |port: &XskPort, since: Instant| {
        assert!(
            since.elapsed() < STALL,
            "AF_XDP transmit on {port:?} made no progress for {STALL:?}: {:?}",
            port.frame_counts()
        );
    };
    let mut sent = 0u64;
    let mut progress = Instant::now();
    while more(sent) {
        let mut n = 0;
        while n < 64 && more(sent) {
            let Some(base) = port.from_guest_alloc() else {
                break;
            };
            if !port.from_guest_push(base, len) {
                port.from_guest_free(base);
                break;
            }
            n += 1;
            sent += 1;
        }
        port.flush();
        if n > 0 {
            progress = Instant::now();
        } else {
            stalled(port, progress);
        }
    }
    let mut left = u64::MAX;
    while port.frame_counts().staged + port.frame_counts().tx_in_flight > 0 {
        port.flush();
        let now = u64::from(port.frame_counts().staged + port.frame_counts().tx_in_flight);
        if now < left {
            (left, progress) = (now, Instant::now());
        }
        stalled(port, progress);
    }
    sent
}

/// A traffic generator: an AF_XDP socket on queue 0 of a veth end (copy mode) that sends
/// copies of a frame, which the veth hands to the other end's XDP program, as a NIC's
/// receive would. Opened in the namespace of the calling thread.
///
/// (It replaced an XDP program run through `BPF_PROG_TEST_RUN` with live frames: this
/// project's machines' kernel, 6.18.44-fc, refuses live frames with EPERM, even to root.)
#[derive(Debug)]
pub struct Generator {
    /// The socket, and the frame its transmit frames hold.
    port: Mutex<(XskPort, Vec<u8>)>,
}

impl Generator {
    /// Opens the socket on `iface` queue 0.
    pub fn load(iface: &str) -> Generator {
        let port = XskPort::open(iface, 0, &XskConfig::default())
            .unwrap_or_else(|e| panic!("the generator's AF_XDP socket on {iface} queue 0: {e}"));
        Generator {
            port: Mutex::new((port, Vec::new())),
        }
    }

    /// Sends `frames` copies of `data` (all of them handed to the kernel, which sends each
    /// one before it completes it); returns how long it took, writing `data` into the
    /// socket's frames included only when it differs from the last call's.
    pub fn send(&self, data: &[u8], frames: u32) -> Duration {
        let mut guard = self.port.lock().unwrap_or_else(|e| e.into_inner());
        let (port, filled) = &mut *guard;
        let start = Instant::now();
        if filled.as_slice() != data {
            fill_frames(port, data);
            *filled = data.to_vec();
        }
        send_frames(port, data.len() as u32, |sent| sent < u64::from(frames));
        start.elapsed()
    }
}

/// A bare AF_XDP loop on queue 0 of an interface, on a thread of its own pinned to a CPU:
/// receive and recycle (behind a program that redirects to the `xsks` map it registers in),
/// or transmit one frame over and over. Runs until [`XskLoop::stop`] (or drop).
#[derive(Debug)]
pub struct XskLoop {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    mode: BindMode,
    thread: Option<JoinHandle<PortStats>>,
}

impl XskLoop {
    /// Opens a socket on `iface` queue 0 in `ns`, registers it in the pinned `xsks` map, and
    /// receives and recycles bursts of 64 on CPU `cpu`.
    pub fn receive(ns: &Netns, iface: &str, xsks: PathBuf, cpu: usize) -> Result<XskLoop, String> {
        let iface = iface.to_owned();
        XskLoop::start(ns, cpu, move |count, stop| {
            let mut port = XskPort::open(&iface, 0, &XskConfig::default())
                .map_err(|e| format!("AF_XDP socket on {iface} queue 0: {e}"))?;
            port.register(&xsks)
                .map_err(|e| format!("registering in {}: {e}", xsks.display()))?;
            Ok((port, move |port: &mut XskPort| {
                while !stop.load(Ordering::Relaxed) {
                    let n = port.to_guest_burst(64, |_| {});
                    if n > 0 {
                        count.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
            }))
        })
    }

    /// Opens a socket on `iface` queue 0 in `ns` and sends `data` over and over on CPU `cpu`.
    pub fn transmit(ns: &Netns, iface: &str, data: Vec<u8>, cpu: usize) -> Result<XskLoop, String> {
        let iface = iface.to_owned();
        XskLoop::start(ns, cpu, move |count, stop| {
            let port = XskPort::open(&iface, 0, &XskConfig::default())
                .map_err(|e| format!("AF_XDP socket on {iface} queue 0: {e}"))?;
            Ok((port, move |port: &mut XskPort| {
                transmit_loop(port, &data, |sent| {
                    count.store(sent, Ordering::Relaxed);
                    !stop.load(Ordering::Relaxed)
                });
            }))
        })
    }

    /// Starts the thread: `open` makes the port (or says why not), then its loop runs.
    fn start<L: FnOnce(&mut XskPort)>(
        ns: &Netns,
        cpu: usize,
        open: impl FnOnce(Arc<AtomicU64>, Arc<AtomicBool>) -> Result<(XskPort, L), String>
        + Send
        + 'static,
    ) -> Result<XskLoop, String> {
        let (stop, count) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let (stop, count) = (Arc::clone(&stop), Arc::clone(&count));
            ns.spawn(move || {
                pin_current_thread(cpu);
                match open(count, stop) {
                    Ok((mut port, run)) => {
                        let _ = ready_tx.send(Ok(port.mode()));
                        run(&mut port);
                        port.stats()
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        PortStats::default()
                    }
                }
            })
        };
        let mode = match ready_rx.recv() {
            Ok(Ok(mode)) => mode,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err("the AF_XDP thread ended before it opened its socket".to_owned());
            }
        };
        Ok(XskLoop {
            stop,
            count,
            mode,
            thread: Some(thread),
        })
    }

    /// Frames received (or sent) so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// How the socket was bound.
    pub fn mode(&self) -> BindMode {
        self.mode
    }

    /// Stops the loop; the port's counters at the end (the kernel's drops at the socket).
    pub fn stop(mut self) -> PortStats {
        self.finish()
    }

    fn finish(&mut self) -> PortStats {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for XskLoop {
    fn drop(&mut self) {
        self.finish();
    }
}
