//! Serving one guest's vhost-user socket: a thread that accepts (server mode) or connects
//! (client mode, with back-off while the VMM is away) and runs a fresh vhost-user daemon per
//! connection, so that every connection re-learns memory and every vring from scratch.
//! Between connections the device is reset (the datapath lets go of its vrings and memory);
//! the other guests keep running.

use std::{
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use thiserror::Error;
use tracing::{info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::{
    compat,
    socket::{self, SocketError, SocketFile},
};
use crate::{
    config::{GuestSpec, SocketMode},
    datapath::{Datapath, DatapathError, GuestCounters, GuestDevice},
};

/// Errors of starting a guest; each names the socket.
#[derive(Debug, Error)]
pub enum GuestError {
    /// The server socket could not be created.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// The datapath refused the guest (its MAC is taken).
    #[error("guest socket {path}")]
    Datapath {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: DatapathError,
    },
    /// The backend could not be made.
    #[error("guest socket {path}: setting up the backend")]
    Backend {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A guest being served.
pub struct Guest {
    spec: GuestSpec,
    stop: Arc<AtomicBool>,
    connected: Arc<AtomicBool>,
    shutdown: Arc<Mutex<Option<vhost_user_backend::ShutdownHandle>>>,
    thread: Option<JoinHandle<()>>,
    device: Arc<GuestDevice>,
    datapath: Arc<Datapath>,
    /// The server socket's file (server mode), removed when the guest goes.
    socket_file: Option<SocketFile>,
}

impl std::fmt::Debug for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guest")
            .field("socket", &self.spec.socket)
            .finish()
    }
}

impl Guest {
    /// Adds the guest to the datapath and starts serving its socket.
    pub fn start(spec: &GuestSpec, datapath: &Arc<Datapath>) -> Result<Guest, GuestError> {
        Guest::start_with_dma(spec, datapath, None)
    }

    /// As [`Guest::start`]; the guest's queues' copies go to channels of `dma` while free
    /// ones last (one per queue: the RX queues first, then the TX queues).
    pub fn start_with_dma(
        spec: &GuestSpec,
        datapath: &Arc<Datapath>,
        dma: Option<&Mutex<crate::copy::ChannelPool>>,
    ) -> Result<Guest, GuestError> {
        // The socket first: when it cannot be had, nothing else (a place in the datapath, a
        // DMA channel) has been taken.
        let (listener, socket_file) = match spec.mode {
            SocketMode::Server => {
                let (listener, file) = socket::bind(&spec.socket)?;
                (Some(listener), Some(file))
            }
            SocketMode::Client => (None, None),
        };
        match Guest::serve_on(spec, datapath, dma, listener) {
            Ok(mut guest) => {
                guest.socket_file = socket_file;
                Ok(guest)
            }
            Err(e) => {
                if let Some(file) = &socket_file {
                    file.remove();
                }
                Err(e)
            }
        }
    }

    /// Adds the guest to the datapath, and starts the thread serving `listener` (server
    /// mode) or connecting to the socket (client mode).
    fn serve_on(
        spec: &GuestSpec,
        datapath: &Arc<Datapath>,
        dma: Option<&Mutex<crate::copy::ChannelPool>>,
        listener: Option<UnixListener>,
    ) -> Result<Guest, GuestError> {
        let path = spec.socket.clone();
        let name = path.display().to_string();
        // The RX queues first (a frame into a guest is the larger copy of the two), then the
        // TX queues, while free channels last.
        let pairs = spec.queues.max(1);
        let channels: Vec<_> = (0..pairs)
            .map(|pair| 2 * pair)
            .chain((0..pairs).map(|pair| 2 * pair + 1))
            .map_while(|queue| {
                let queue = crate::copy::QueueRef {
                    device: name.clone(),
                    queue,
                };
                dma.and_then(|pool| pool.lock().ok()?.bind_any(queue))
            })
            .collect();
        for c in &channels {
            let what = if c.queue().queue % 2 == 0 {
                "copies into the guest (RX queue) go to a DMA channel"
            } else {
                "copies out of the guest (TX queue) go to a DMA channel"
            };
            info!(guest = %name, queue = c.queue().queue, channel = c.name(), threshold = c.threshold(), "{what}");
        }
        let device = datapath
            .add_guest(&name, (spec.mac, spec.vlan), spec.queues, channels)
            .map_err(|source| GuestError::Datapath {
                path: path.clone(),
                source,
            })?;
        let stop = Arc::new(AtomicBool::new(false));
        let connected = Arc::new(AtomicBool::new(false));
        let shutdown = Arc::new(Mutex::new(None));
        let thread = {
            let state = ServeState {
                stop: Arc::clone(&stop),
                connected: Arc::clone(&connected),
                shutdown: Arc::clone(&shutdown),
            };
            let (spec, device) = (spec.clone(), Arc::clone(&device));
            std::thread::Builder::new()
                .name(format!("xvio-guest-{}", device.id()))
                .spawn(move || serve(&spec, &device, listener, &state))
        };
        let thread = match thread {
            Ok(t) => t,
            Err(source) => {
                datapath.remove_guest(&device);
                return Err(GuestError::Backend { path, source });
            }
        };
        Ok(Guest {
            spec: spec.clone(),
            stop,
            connected,
            shutdown,
            thread: Some(thread),
            device,
            datapath: Arc::clone(datapath),
            socket_file: None,
        })
    }

    /// The guest's device (id, MAC, counters).
    pub fn device(&self) -> &Arc<GuestDevice> {
        &self.device
    }

    /// The guest's counters.
    pub fn counters(&self) -> &GuestCounters {
        self.device.counters()
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.spec.socket
    }

    /// Its queue pairs.
    pub fn queue_pairs(&self) -> u16 {
        self.spec.queues
    }

    /// The RX copy engines' counters.
    pub fn copy_stats(&self) -> crate::copy::CopyStats {
        self.device.copy_stats()
    }

    /// Waits (at most `timeout`) until the datapath delivers frames to the guest (see
    /// [`GuestDevice::is_ready`]); whether it does.
    pub fn wait_ready(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while !self.device.is_ready() {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Whether a frontend is connected now.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Ok(handle) = self.shutdown.lock()
            && let Some(handle) = handle.as_ref()
        {
            handle.shutdown();
        }
        // A server blocked in accept() wakes up for a connection that closes at once.
        if self.spec.mode == SocketMode::Server {
            let _ = std::os::unix::net::UnixStream::connect(&self.spec.socket);
        }
        if let Some(thread) = self.thread.take() {
            // Give the serving thread a moment to notice; a thread still blocked in the
            // vhost-user library after that is left behind rather than hanging shutdown.
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            while !thread.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if thread.is_finished() {
                let _ = thread.join();
            } else {
                warn!(socket = %self.spec.socket.display(), "the guest's serving thread did not stop in 2 s; leaving it");
            }
        }
        self.datapath.remove_guest(&self.device);
        if let Some(file) = &self.socket_file {
            file.remove();
        }
    }
}

/// The daemon of one connection.
type Daemon = VhostUserDaemon<Arc<GuestDevice>>;

/// Registers the device's exit event on the connection's event thread (see
/// [`GuestDevice::exit_event_id`]) and its announcement, which hands the vrings to the
/// datapath worker.
fn watch_device(daemon: &Daemon, device: &GuestDevice) -> std::io::Result<()> {
    let handlers = daemon.get_epoll_handlers();
    let handler = handlers
        .first()
        .ok_or_else(|| std::io::Error::other("the backend has no event thread"))?;
    handler.register_listener(
        device.exit_fd(),
        EventSet::IN,
        u64::from(device.exit_event_id()),
    )?;
    handler.register_listener(
        device.announce_fd(),
        EventSet::IN,
        u64::from(device.announce_event()),
    )?;
    device.announce()
}

/// Tells the current connection's event thread to stop when dropped.
struct StopWorkers<'a>(&'a GuestDevice);

impl Drop for StopWorkers<'_> {
    fn drop(&mut self) {
        self.0.stop_workers();
    }
}

/// What the serving thread shares with its [`Guest`].
struct ServeState {
    stop: Arc<AtomicBool>,
    connected: Arc<AtomicBool>,
    shutdown: Arc<Mutex<Option<vhost_user_backend::ShutdownHandle>>>,
}

/// Sleeps `d`, or less when `stop` is set meanwhile (a guest being dropped waits for its
/// serving thread at most 2 s).
fn nap(stop: &AtomicBool, d: Duration) {
    let until = std::time::Instant::now() + d;
    while !stop.load(Ordering::Acquire) {
        let left = until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(20)));
    }
}

fn serve(
    spec: &GuestSpec,
    device: &Arc<GuestDevice>,
    outer: Option<UnixListener>,
    state: &ServeState,
) {
    let (stop, shutdown) = (&state.stop, &state.shutdown);
    let name = spec.socket.display().to_string();
    if let Err(e) = crate::datapath::rejoin() {
        tracing::warn!(guest = %name, error = %e, "the guest's threads stay off the datapath CPUs");
    }
    let mut backoff = Duration::from_millis(100);
    // Client mode: the last connect error logged (logged again only when it changes).
    let mut last_error: Option<std::io::ErrorKind> = None;
    while !stop.load(Ordering::Acquire) {
        // The frontend's connection: accepted (server mode) or made (client mode).
        let frontend = match &outer {
            Some(listener) => listener.accept().map(|(stream, _)| stream),
            None => UnixStream::connect(&spec.socket),
        };
        let frontend = match frontend {
            Ok(stream) => stream,
            Err(e) => {
                if spec.mode == SocketMode::Client {
                    // The VMM is not there (yet, or any more): try again, backing off to 2 s,
                    // saying why once (a wrong path or a permission stays until fixed).
                    if last_error != Some(e.kind()) {
                        warn!(guest = %name, error = %e, "cannot connect to the VMM's vhost-user socket; retrying every 2 s at most");
                        last_error = Some(e.kind());
                    }
                    nap(stop, backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                } else if !stop.load(Ordering::Acquire) {
                    warn!(guest = %name, error = %e, "accepting a vhost-user connection failed");
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
        };
        if stop.load(Ordering::Acquire) {
            break;
        }
        if let Err(e) = device.new_connection() {
            warn!(guest = %name, error = %e, "cannot prepare a connection");
            return;
        }
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = match VhostUserDaemon::new(name.clone(), Arc::clone(device), mem) {
            Ok(d) => d,
            Err(e) => {
                warn!(guest = %name, error = %e, "cannot start the vhost-user backend");
                return;
            }
        };
        if let Err(e) = watch_device(&daemon, device) {
            // Dropping the daemon would wait for an event thread nothing can stop: leave it.
            std::mem::forget(daemon);
            warn!(guest = %name, error = %e, "cannot register the device's events; the guest is not served any more");
            return;
        }
        // From here on, whichever way this connection ends, its event thread is told to stop
        // before the daemon (dropped after this guard) waits for it.
        let stop_workers = StopWorkers(device);
        // Kept to hang up on the frontend if the backend cannot start: the shim then stops.
        let hangup = frontend.try_clone().ok();
        // The library accepts on a private socket of its own, to which the shim connects this
        // frontend connection (see `compat`).
        let started = compat::InnerListener::new()
            .and_then(|inner| {
                compat::proxy(frontend, inner.addr(), device.dirty())?;
                inner.into_listener()
            })
            .map_err(|e| e.to_string())
            .and_then(|listener| {
                daemon
                    .start(&mut Listener::from(listener))
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = started {
            if let Some(stream) = hangup {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
            warn!(guest = %name, error = %e, "starting a vhost-user connection failed");
            continue;
        }
        last_error = None;
        let began = std::time::Instant::now();
        if let Ok(mut slot) = shutdown.lock() {
            *slot = daemon.shutdown_handle();
        }
        if stop.load(Ordering::Acquire) {
            daemon.request_shutdown();
        }
        info!(guest = %name, "vhost-user frontend connected");
        state.connected.store(true, Ordering::Release);
        let result = daemon.wait();
        state.connected.store(false, Ordering::Release);
        if let Ok(mut slot) = shutdown.lock() {
            *slot = None;
        }
        // The event thread stops, and is waited for, before the device is reset: nothing
        // may hand this connection's vrings to the worker again afterwards. The reset makes
        // the worker let go of the vrings and the guest's memory (a whole VM's RAM, released
        // now rather than when the next frontend sets its table).
        drop(stop_workers);
        drop(daemon);
        device.end_connection();
        match result {
            Ok(()) => {
                info!(guest = %name, "vhost-user frontend disconnected; the socket serves the next one")
            }
            Err(e) => {
                warn!(guest = %name, error = %e, "vhost-user connection ended with an error; the socket serves the next one")
            }
        }
        // A client whose VMM keeps hanging up at once (it wants what this guest does not
        // offer, say) reconnects backing off, not in a tight loop.
        if spec.mode == SocketMode::Client && !stop.load(Ordering::Acquire) {
            if began.elapsed() < Duration::from_secs(1) {
                nap(stop, backoff);
                backoff = (backoff * 2).min(Duration::from_secs(2));
            } else {
                backoff = Duration::from_millis(100);
            }
        }
    }
}
