//! Serving one guest's vhost-user socket: a thread that accepts (server mode) or connects
//! (client mode, with back-off while the VMM is away) and runs a fresh vhost-user daemon per
//! connection, so that every connection re-learns memory and every vring from scratch.
//! Between connections the device is reset and the guest's mailbox emptied; the other guests
//! keep running.

use std::{
    os::{
        fd::AsRawFd,
        unix::net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use thiserror::Error;
use tracing::{info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::{
    backend::{NetBackend, completion_event, exit_event_id, mailbox_event},
    compat,
    socket::{self, SocketError, SocketFile},
    switch::{Port, Switch, SwitchError},
};
use crate::config::{GuestSpec, SocketMode};

/// Errors of starting a guest; each names the socket.
#[derive(Debug, Error)]
pub enum GuestError {
    /// The server socket could not be created.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// The MAC is taken.
    #[error("guest socket {path}")]
    Switch {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: SwitchError,
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
    port: Arc<Port>,
    stop: Arc<AtomicBool>,
    connected: Arc<AtomicBool>,
    shutdown: Arc<Mutex<Option<vhost_user_backend::ShutdownHandle>>>,
    thread: Option<JoinHandle<()>>,
    backend: Arc<RwLock<NetBackend>>,
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
    /// Creates the guest's switch port and starts serving its socket.
    pub fn start(spec: &GuestSpec, switch: &Arc<Switch>) -> Result<Guest, GuestError> {
        Guest::start_with_dma(spec, switch, None)
    }

    /// As [`Guest::start`]; the guest's RX copies go to a channel of `dma` when one is free.
    pub fn start_with_dma(
        spec: &GuestSpec,
        switch: &Arc<Switch>,
        dma: Option<&Mutex<crate::copy::ChannelPool>>,
    ) -> Result<Guest, GuestError> {
        // The socket first: when it cannot be had, nothing else (a switch port, a DMA
        // channel) has been taken.
        let (listener, socket_file) = match spec.mode {
            SocketMode::Server => {
                let (listener, file) = socket::bind(&spec.socket)?;
                (Some(listener), Some(file))
            }
            SocketMode::Client => (None, None),
        };
        match Guest::serve_on(spec, switch, dma, listener) {
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

    /// Creates the guest's port and backend, and the thread serving `listener` (server
    /// mode) or connecting to the socket (client mode).
    fn serve_on(
        spec: &GuestSpec,
        switch: &Arc<Switch>,
        dma: Option<&Mutex<crate::copy::ChannelPool>>,
        listener: Option<UnixListener>,
    ) -> Result<Guest, GuestError> {
        let path = spec.socket.clone();
        let port = switch
            .add_port(spec.mac)
            .map_err(|source| GuestError::Switch {
                path: path.clone(),
                source,
            })?;
        let name = path.display().to_string();
        let queue = crate::copy::QueueRef {
            device: name.clone(),
            queue: 0,
        };
        let channel = dma.and_then(|pool| pool.lock().ok()?.bind_any(queue));
        if let Some(c) = &channel {
            info!(guest = %name, channel = c.name(), threshold = c.threshold(), "RX copies go to a DMA channel");
        }
        let backend = NetBackend::new(
            &name,
            Arc::clone(&port),
            Arc::clone(switch),
            spec.queues,
            channel,
        )
        .map_err(|source| GuestError::Backend {
            path: path.clone(),
            source,
        })?;
        let backend = Arc::new(RwLock::new(backend));
        let stop = Arc::new(AtomicBool::new(false));
        let connected = Arc::new(AtomicBool::new(false));
        let shutdown = Arc::new(Mutex::new(None));
        let thread = {
            let state = ServeState {
                stop: Arc::clone(&stop),
                connected: Arc::clone(&connected),
                shutdown: Arc::clone(&shutdown),
            };
            let (spec, backend) = (spec.clone(), Arc::clone(&backend));
            std::thread::Builder::new()
                .name(format!("xvio-guest-{}", port.id()))
                .spawn(move || serve(&spec, &backend, listener, &state))
                .map_err(|source| GuestError::Backend {
                    path: path.clone(),
                    source,
                })?
        };
        Ok(Guest {
            spec: spec.clone(),
            port,
            stop,
            connected,
            shutdown,
            thread: Some(thread),
            backend,
            socket_file: None,
        })
    }

    /// The guest's switch port (counters, MAC).
    pub fn port(&self) -> &Arc<Port> {
        &self.port
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.spec.socket
    }

    /// Its queue pairs.
    pub fn queue_pairs(&self) -> u16 {
        self.spec.queues
    }

    /// The RX copy engine's counters.
    pub fn copy_stats(&self) -> crate::copy::CopyStats {
        self.backend
            .read()
            .map(|b| b.copy_stats())
            .unwrap_or_default()
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
        if let Some(file) = &self.socket_file {
            file.remove();
        }
    }
}

/// The daemon of one connection.
type Daemon = VhostUserDaemon<Arc<RwLock<NetBackend>>>;

/// Registers each worker's exit event on its epoll (see [`exit_event_id`]).
fn watch_exits(daemon: &Daemon, backend: &RwLock<NetBackend>) -> std::io::Result<()> {
    let b = backend.read().unwrap_or_else(|e| e.into_inner());
    let id = u64::from(exit_event_id(b.num_queues()));
    for (thread, handler) in daemon.get_epoll_handlers().iter().enumerate() {
        let fd = b
            .exit_fd(thread)
            .ok_or_else(|| std::io::Error::other(format!("no exit event for worker {thread}")))?;
        handler.register_listener(fd, EventSet::IN, id)?;
    }
    Ok(())
}

/// Registers the mailbox and the RX copy channel's completions on pair 0's worker.
fn watch_guest_events(daemon: &Daemon, backend: &RwLock<NetBackend>) -> std::io::Result<()> {
    let b = backend.read().unwrap_or_else(|e| e.into_inner());
    let num_queues = b.num_queues();
    let Some(handler) = daemon.get_epoll_handlers().into_iter().next() else {
        return Ok(());
    };
    let fd = b.port().mailbox().event().as_raw_fd();
    handler.register_listener(fd, EventSet::IN, u64::from(mailbox_event(num_queues)))?;
    if let Some(fd) = b.rx_completion_fd() {
        handler.register_listener(fd, EventSet::IN, u64::from(completion_event(num_queues)))?;
    }
    Ok(())
}

/// Tells the current connection's workers to stop when dropped.
struct StopWorkers<'a>(&'a RwLock<NetBackend>);

impl Drop for StopWorkers<'_> {
    fn drop(&mut self) {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .stop_workers();
    }
}

/// What the serving thread shares with its [`Guest`].
struct ServeState {
    stop: Arc<AtomicBool>,
    connected: Arc<AtomicBool>,
    shutdown: Arc<Mutex<Option<vhost_user_backend::ShutdownHandle>>>,
}

fn serve(
    spec: &GuestSpec,
    backend: &Arc<RwLock<NetBackend>>,
    outer: Option<UnixListener>,
    state: &ServeState,
) {
    let (stop, shutdown) = (&state.stop, &state.shutdown);
    let name = spec.socket.display().to_string();
    // The library listens on an abstract socket of its own; the shim connects each frontend
    // connection to it (see `compat`).
    let (inner, inner_addr) = match compat::inner_listener() {
        Ok(pair) => pair,
        Err(e) => {
            warn!(guest = %name, error = %e, "cannot create the backend's listener");
            return;
        }
    };
    let mut backoff = Duration::from_millis(100);
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
                    // The VMM is not there (yet, or any more): try again, backing off to 2 s.
                    std::thread::sleep(backoff);
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
        if let Ok(mut b) = backend.write()
            && let Err(e) = b.new_connection()
        {
            warn!(guest = %name, error = %e, "cannot prepare a connection");
            return;
        }
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = match VhostUserDaemon::new(name.clone(), Arc::clone(backend), mem) {
            Ok(d) => d,
            Err(e) => {
                warn!(guest = %name, error = %e, "cannot start the vhost-user backend");
                return;
            }
        };
        if let Err(e) = watch_exits(&daemon, backend) {
            // Dropping the daemon would wait for workers nothing can stop: leave them.
            std::mem::forget(daemon);
            warn!(guest = %name, error = %e, "cannot register the workers' exit events; the guest is not served any more");
            return;
        }
        // From here on, whichever way this connection ends, its workers are told to stop
        // before the daemon (dropped after this guard) waits for them.
        let stop_workers = StopWorkers(backend);
        if let Err(e) = watch_guest_events(&daemon, backend) {
            warn!(guest = %name, error = %e, "cannot watch the mailbox or the DMA channel's completions");
            return;
        }
        // Kept to hang up on the frontend if the backend cannot start: the shim then stops.
        let hangup = frontend.try_clone().ok();
        let dirty = backend.read().unwrap_or_else(|e| e.into_inner()).dirty();
        let started = compat::proxy(frontend, &inner_addr, dirty)
            .and_then(|_| inner.try_clone())
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
        backoff = Duration::from_millis(100);
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
        // The workers stop, and are waited for, before the device is reset: none may pick
        // up this connection's vrings or memory again afterwards.
        drop(stop_workers);
        drop(daemon);
        if let Ok(mut b) = backend.write() {
            b.reset_device();
            // The backend's view of the guest's memory goes with the connection: the
            // mapping (a whole VM's RAM) and its descriptors are released now, not when the
            // next frontend sets its table.
            let _ = b.update_memory(GuestMemoryAtomic::new(GuestMemoryMmap::new()));
        }
        match result {
            Ok(()) => {
                info!(guest = %name, "vhost-user frontend disconnected; the socket serves the next one")
            }
            Err(e) => {
                warn!(guest = %name, error = %e, "vhost-user connection ended with an error; the socket serves the next one")
            }
        }
    }
}
