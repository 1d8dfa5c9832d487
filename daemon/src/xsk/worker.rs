//! One thread per AF_XDP port: it takes the frames the NIC received (`to_guest`), moves
//! accepted transmit frames into the tx ring and reaps their completions, waits on the socket
//! when there is nothing to do, and publishes its counters for the control plane about every
//! 100 ms (never per packet).
//!
//! Until the vhost-user backend exists, a received frame has no guest to go to: it is dropped
//! and counted as `rx_no_guest`.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::port::{BURST, BindMode, XskPort};

const PUBLISH_EVERY: Duration = Duration::from_millis(100);
const IDLE_WAIT_MS: u16 = 100;

/// A running port.
#[derive(Debug)]
pub struct PortWorker {
    queue: u32,
    mode: BindMode,
    stop: Arc<AtomicBool>,
    published: Arc<Mutex<xvio_common::PortStats>>,
    handle: Option<JoinHandle<()>>,
}

impl PortWorker {
    /// Starts a thread that drives `port`.
    pub fn spawn(port: XskPort) -> std::io::Result<PortWorker> {
        let queue = port.queue();
        let mode = port.mode();
        let stop = Arc::new(AtomicBool::new(false));
        let published = Arc::new(Mutex::new(xvio_common::PortStats::default()));
        let (stop2, published2) = (Arc::clone(&stop), Arc::clone(&published));
        let handle = std::thread::Builder::new()
            .name(format!("xvio-{}-q{queue}", port.iface()))
            .spawn(move || run(port, &stop2, &published2))?;
        Ok(PortWorker {
            queue,
            mode,
            stop,
            published,
            handle: Some(handle),
        })
    }

    /// The rx queue.
    pub fn queue(&self) -> u32 {
        self.queue
    }

    /// The bind mode.
    pub fn mode(&self) -> BindMode {
        self.mode
    }

    /// The counters last published.
    pub fn stats(&self) -> xvio_common::PortStats {
        self.published.lock().map(|s| *s).unwrap_or_default()
    }
}

impl Drop for PortWorker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

fn run(mut port: XskPort, stop: &AtomicBool, published: &Mutex<xvio_common::PortStats>) {
    let mut no_guest = 0u64;
    let mut last = Instant::now();
    while !stop.load(Ordering::Acquire) {
        let n = port.to_guest_burst(BURST, |_frame| {});
        no_guest += n as u64;
        port.flush();
        if n == 0 {
            let mut fds = [PollFd::new(port.fd(), PollFlags::POLLIN)];
            let _ = poll(&mut fds, PollTimeout::from(IDLE_WAIT_MS));
        }
        if last.elapsed() >= PUBLISH_EVERY {
            publish(&port, no_guest, published);
            last = Instant::now();
        }
    }
    publish(&port, no_guest, published);
}

fn publish(port: &XskPort, no_guest: u64, published: &Mutex<xvio_common::PortStats>) {
    let mut value = port.stats();
    value.rx_no_guest = no_guest;
    if let Ok(mut slot) = published.lock() {
        *slot = value;
    }
}
