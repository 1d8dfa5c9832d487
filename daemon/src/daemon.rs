//! `xvio run`: start the datapath, attach to every interface (its AF_XDP sockets go to the
//! datapath), serve every guest, publish counters about once a second, log kernel events, and
//! on SIGINT, SIGTERM or SIGHUP detach and remove every pin.
//!
//! Frames move on the datapath's worker thread; this tokio runtime is the control plane only.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use thiserror::Error;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};
use xvio_common::XdpOutcome;

use crate::{
    attach::{AttachError, AttachOptions, AttachedIface},
    bpffs,
    config::RunConfig,
    datapath::{Datapath, DatapathError},
    privileges,
    vhost::stats::GuestStatsMap,
    xsk::{XskConfig, XskPort},
};

/// How often `daemon_stats` is written.
pub const PUBLISH_PERIOD: Duration = Duration::from_secs(1);

/// Errors that stop the daemon.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// Not root and lacking capabilities.
    #[error(transparent)]
    Privileges(#[from] privileges::PrivilegeError),
    /// bpffs could not be mounted.
    #[error(transparent)]
    Bpffs(#[from] bpffs::BpffsError),
    /// An interface was named twice.
    #[error("interface '{0}' is given twice with --iface")]
    DuplicateIface(String),
    /// An interface has the name of the guests' pin folder.
    #[error(
        "interface '{0}' has the name of the folder the guests' counters are pinned in \
         (PIN_ROOT/{0}): rename the interface (ip link set {0} name …) to serve guests with it"
    )]
    IfaceNamedGuests(String),
    /// Attaching to an interface failed.
    #[error(transparent)]
    Attach(#[from] AttachError),
    /// A DMA channel could not be started.
    #[error(transparent)]
    Dma(#[from] crate::copy::pool::StartError),
    /// An AF_XDP port could not be opened.
    #[error(transparent)]
    Xsk(#[from] crate::xsk::XskError),
    /// A guest could not be started.
    #[error(transparent)]
    Guest(#[from] crate::vhost::guest::GuestError),
    /// The guests' pins are another running daemon's.
    #[error(transparent)]
    GuestPins(#[from] crate::vhost::stats::GuestStatsError),
    /// A socket was named twice.
    #[error("guest socket {0} is given twice with --guest")]
    DuplicateSocket(String),
    /// The datapath could not be started.
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    /// The tokio runtime or a signal handler could not be set up.
    #[error("setting up the control plane")]
    Runtime(#[source] std::io::Error),
    /// An attached interface was removed (or replaced by another of the same name).
    #[error(
        "interface '{iface}' (ifindex {ifindex}) went away: its XDP program and AF_XDP sockets \
         went with it; start xvio again once the interface is back"
    )]
    InterfaceGone {
        /// The interface.
        iface: String,
        /// The index it had.
        ifindex: u32,
    },
}

/// Runs the daemon until SIGINT, SIGTERM or SIGHUP.
pub fn run(config: &RunConfig) -> Result<(), DaemonError> {
    if !config.ifaces.is_empty() {
        // XDP and pins need privileges; serving guests alone does not.
        privileges::check()?;
    }
    let mut seen = HashSet::new();
    if let Some(dup) = config
        .ifaces
        .iter()
        .find(|name| !seen.insert(name.as_str()))
    {
        return Err(DaemonError::DuplicateIface(dup.clone()));
    }
    // An interface's pins go to PIN_ROOT/IF, the guests' to PIN_ROOT/guests.
    if !config.guests.is_empty()
        && let Some(name) = config
            .ifaces
            .iter()
            .find(|n| n.as_str() == xvio_common::maps::GUESTS_DIR)
    {
        return Err(DaemonError::IfaceNamedGuests(name.clone()));
    }
    let mut sockets = HashSet::new();
    if let Some(dup) = config
        .guests
        .iter()
        .find(|g| !sockets.insert(g.socket.clone()))
    {
        return Err(DaemonError::DuplicateSocket(
            dup.socket.display().to_string(),
        ));
    }
    if !config.ifaces.is_empty() && bpffs::ensure_mounted(&config.pin_root)? {
        info!(path = bpffs::BPFFS, "mounted bpffs");
    }
    // The guests' counters go under the pin root too: not where another running daemon pins
    // its guests' (asked before anything is attached, replaced or bound).
    if !config.guests.is_empty() {
        crate::vhost::stats::check_pins_free(&config.pin_root)?;
    }
    let opts = AttachOptions {
        mode: config.xdp_mode,
        replace: config.replace,
        pin_root: &config.pin_root,
        steer: &config.steer,
    };
    // Signals are caught from here on: a SIGTERM during start-up ends the daemon cleanly as
    // soon as the control loop runs, instead of killing it with pins left behind.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    let signals = {
        let _entered = runtime.enter();
        Signals {
            int: signal(SignalKind::interrupt()).map_err(DaemonError::Runtime)?,
            term: signal(SignalKind::terminate()).map_err(DaemonError::Runtime)?,
            hup: signal(SignalKind::hangup()).map_err(DaemonError::Runtime)?,
        }
    };
    // The threads started from here on (software copy engines without a core, the broadcast
    // taps, the runtime's) keep off the workers' CPUs; each worker pins itself to its own,
    // and a guest's threads take them back (`datapath::rejoin`).
    match crate::datapath::keep_off(&config.datapath_cpus.0) {
        Ok(Some(left)) => info!(
            ?left,
            "xvio's other threads run on the CPUs left by --datapath-cpus"
        ),
        Ok(None) if !config.datapath_cpus.0.is_empty() => info!(
            "--datapath-cpus names every CPU this process may use: xvio's other threads share them with the workers"
        ),
        Ok(None) => {}
        Err(e) => warn!(error = %e, "xvio's other threads could not be kept off the datapath CPUs"),
    }
    // The copy engine's channels; the datapath binds them to virtqueues as guests come.
    let dma = std::sync::Mutex::new(crate::copy::ChannelPool::start(
        &config.dma,
        config.copy_threshold,
    )?);
    let datapath = Datapath::start(
        &config.datapath_cpus.0,
        std::time::Duration::from_micros(config.busy_poll_us),
    )?;
    datapath.set_lazy_guest_memory(config.lazy_guest_memory);
    // On an error, the interfaces attached so far are dropped: ports closed, program
    // detached, pins removed.
    let mut ifaces = Vec::with_capacity(config.ifaces.len());
    for name in &config.ifaces {
        let attached = AttachedIface::attach(name, opts)?;
        let xsk = XskConfig {
            frames: config.xsk_frames,
            frame_size: config.xsk_frame_size,
            ..XskConfig::default()
        };
        let ports = open_ports(&attached, config.queues, &xsk, &datapath)?;
        info!(
            "inspect with: bpftool map dump pinned {}/{}",
            attached.pin_dir().display(),
            xvio_common::maps::XDP_STATS
        );
        // Broadcast and multicast from the wire (ARP, ND, DHCP) reach the guests as well.
        let group_tap = match datapath.add_group_tap(name) {
            Ok(tap) => Some(tap),
            Err(e) => {
                warn!(iface = %name, error = %e, "broadcast and multicast from the wire will not reach the guests (AF_PACKET tap)");
                None
            }
        };
        ifaces.push(Iface {
            ports,
            group_feed: group_tap,
            attached,
        });
    }
    // The guests. Channels go to every guest's RX queues before any TX queue gets one.
    if let Ok(mut pool) = dma.lock() {
        pool.reserve_for_rx(
            config
                .guests
                .iter()
                .map(|g| usize::from(g.queues.max(1)))
                .sum(),
        );
    }
    let guests = config
        .guests
        .iter()
        .map(|spec| {
            let guest = crate::vhost::guest::Guest::start_with_dma(spec, &datapath, Some(&dma))?;
            info!(socket = %spec.socket.display(), mac = %spec.mac, vlan = spec.vlan, queues = spec.queues, mode = ?spec.mode, "guest port ready");
            Ok(guest)
        })
        .collect::<Result<Vec<_>, DaemonError>>()?;
    // Frames to a guest's MAC on its VLAN (0: untagged) go to the AF_XDP sockets of every
    // interface, the rest to the kernel.
    for iface in &mut ifaces {
        for guest in &guests {
            let key = xvio_common::SteerKey::new(guest.device().mac().0, guest.device().vlan());
            iface.attached.steer(key, guest.device().id())?;
        }
    }
    let mut guest_map = open_guest_stats(config, &guests)?;
    // Stopped by a signal, or by an interface that went away: shut down in order either way.
    let result = runtime.block_on(control_loop(
        &mut ifaces,
        &guests,
        guest_map.as_mut(),
        signals,
    ));
    for guest in &guests {
        log_guest(guest);
    }
    drop(guest_map);
    drop(guests);
    // The worker stops first (it owns the sockets): the counters it published last are final.
    drop(datapath);
    for iface in &ifaces {
        log_summary(&iface.attached);
    }
    drop(ifaces);
    drop(dma);
    info!("stopped");
    result
}

/// An attached interface, its AF_XDP ports' counters (the sockets are the datapath's) and
/// its broadcast tap.
struct Iface {
    ports: Vec<(
        u32,
        std::sync::Arc<std::sync::Mutex<xvio_common::PortStats>>,
    )>,
    group_feed: Option<crate::datapath::GroupFeed>,
    attached: AttachedIface,
}

/// Opens one AF_XDP port per enabled rx queue of `iface` (at most `limit`, and at most the
/// `xsks` map's size), registers each, and hands it to the datapath.
#[expect(
    clippy::type_complexity,
    reason = "a queue and the handle its counters are published into"
)]
fn open_ports(
    iface: &AttachedIface,
    limit: Option<u32>,
    xsk: &XskConfig,
    datapath: &Datapath,
) -> Result<
    Vec<(
        u32,
        std::sync::Arc<std::sync::Mutex<xvio_common::PortStats>>,
    )>,
    DaemonError,
> {
    let queues =
        crate::xsk::queues::for_iface(iface.name(), iface.ifindex())?.min(xvio_common::XSKS_MAX);
    let wanted = limit.map_or(queues, |n| n.min(queues));
    let xsks = iface.pin_dir().join(xvio_common::maps::XSKS);
    let mut ports = Vec::with_capacity(wanted as usize);
    for queue in 0..wanted {
        let mut port = XskPort::open(iface.name(), queue, xsk)?;
        port.register(&xsks)?;
        let mode = port.mode();
        if mode.zero_copy {
            info!(
                iface = iface.name(),
                queue,
                need_wakeup = mode.need_wakeup,
                "AF_XDP socket bound in zero-copy mode"
            );
        } else {
            warn!(
                iface = iface.name(),
                queue,
                need_wakeup = mode.need_wakeup,
                frames_per_send = port
                    .tx_budget()
                    .map_or_else(|| "the kernel's".to_owned(), |n| n.to_string()),
                "AF_XDP socket bound in copy mode: the driver has no zero-copy support, frames are copied"
            );
        }
        ports.push((queue, datapath.add_uplink(port)?));
    }
    if wanted < queues {
        info!(
            iface = iface.name(),
            queues,
            sockets = wanted,
            "AF_XDP sockets on the first queues only (--queues)"
        );
    }
    Ok(ports)
}

/// The signals that stop the daemon.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    /// The terminal xvio ran in went away: stop cleanly too (as OVS's fatal signals).
    hup: tokio::signal::unix::Signal,
}

/// The pinned map of the guests' counters, when there are guests and the privileges for it;
/// an error when another running daemon pins its guests' counters there (the two would write
/// each other's), which stops this one.
fn open_guest_stats(
    config: &RunConfig,
    guests: &[crate::vhost::guest::Guest],
) -> Result<Option<GuestStatsMap>, DaemonError> {
    if guests.is_empty() {
        return Ok(None);
    }
    if let Err(e) = privileges::check_pins() {
        warn!("guest counters are not exported to bpffs: {e}");
        return Ok(None);
    }
    if let Err(e) = bpffs::ensure_mounted(&config.pin_root) {
        warn!(error = %e, "guest counters are not exported to bpffs");
        return Ok(None);
    }
    match GuestStatsMap::open(&config.pin_root) {
        Ok(map) => {
            info!(
                "guest counters: bpftool map dump pinned {}/{}/{}",
                config.pin_root.display(),
                xvio_common::maps::GUESTS_DIR,
                xvio_common::maps::GUEST_STATS
            );
            Ok(Some(map))
        }
        Err(e @ crate::vhost::stats::GuestStatsError::InUse { .. }) => Err(e.into()),
        Err(e) => {
            warn!(error = %e, "guest counters are not exported to bpffs");
            Ok(None)
        }
    }
}

async fn control_loop(
    ifaces: &mut [Iface],
    guests: &[crate::vhost::guest::Guest],
    mut guest_map: Option<&mut GuestStatsMap>,
    mut signals: Signals,
) -> Result<(), DaemonError> {
    let mut readers = tokio::task::JoinSet::new();
    for iface in ifaces.iter_mut() {
        let ring = iface.attached.take_events()?;
        readers.spawn(crate::events::log_events(
            iface.attached.name().to_owned(),
            ring,
        ));
    }
    let started = Instant::now();
    let count = u32::try_from(ifaces.len()).unwrap_or(u32::MAX);
    let mut tick = tokio::time::interval(PUBLISH_PERIOD);
    info!(ifaces = count, "running; stop with Ctrl-C or SIGTERM");
    loop {
        tokio::select! {
            _ = signals.int.recv() => { info!("SIGINT: stopping"); break; }
            _ = signals.term.recv() => { info!("SIGTERM: stopping"); break; }
            _ = signals.hup.recv() => { info!("SIGHUP: stopping"); break; }
            Some(done) = readers.join_next() => {
                warn!(result = ?done, "an events reader stopped; kernel events are no longer logged");
            }
            _ = tick.tick() => {
                // An interface removed (a driver reload, a veth deleted) takes the program
                // and the sockets with it: say so and stop rather than look healthy.
                for iface in ifaces.iter() {
                    let (name, ifindex) = (iface.attached.name(), iface.attached.ifindex());
                    if nix::net::if_::if_nametoindex(name).ok() != Some(ifindex) {
                        readers.shutdown().await;
                        return Err(DaemonError::InterfaceGone {
                            iface: name.to_owned(),
                            ifindex,
                        });
                    }
                }
                let uptime_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                // One snapshot per guest per tick, for guest_stats and the totals alike.
                let guest_stats: Vec<_> = guests.iter().map(crate::vhost::stats::snapshot).collect();
                let daemon = xvio_common::DaemonStats {
                    uptime_ms,
                    updated_unix_ms: crate::stats::now_unix_ms(),
                    ifaces_attached: count,
                    ..crate::vhost::stats::totals(&guest_stats)
                };
                if let Some(map) = guest_map.as_deref_mut()
                    && let Err(e) = map.publish(guests, &guest_stats, daemon)
                {
                    warn!(error = %e, "could not write guest_stats");
                }
                for iface in ifaces.iter_mut() {
                    let (group_frames, group_dropped) =
                        iface.group_feed.as_ref().map_or((0, 0), |g| g.counters());
                    let daemon = xvio_common::DaemonStats {
                        group_frames,
                        group_dropped,
                        ..daemon
                    };
                    let ports: Vec<(u32, xvio_common::PortStats)> = iface
                        .ports
                        .iter()
                        .map(|(q, p)| (*q, p.lock().map(|s| *s).unwrap_or_default()))
                        .collect();
                    if let Err(e) = iface.attached.publish(daemon, &ports) {
                        warn!(iface = iface.attached.name(), error = %e, "could not write daemon_stats");
                    }
                }
            }
        }
    }
    readers.shutdown().await;
    Ok(())
}

fn log_guest(guest: &crate::vhost::guest::Guest) {
    use std::sync::atomic::Ordering::Relaxed;
    let c = guest.counters();
    info!(
        socket = %guest.socket().display(),
        to_guest_packets = c.to_guest_packets.load(Relaxed),
        from_guest_packets = c.from_guest_packets.load(Relaxed),
        to_guest_dropped_full = c.to_guest_dropped_full.load(Relaxed),
        from_guest_no_route = c.from_guest_no_route.load(Relaxed),
        malformed_chains = c.malformed_chains.load(Relaxed),
        "guest counters"
    );
}

fn log_summary(iface: &AttachedIface) {
    match iface.xdp_stats() {
        Ok(stats) => {
            let line = XdpOutcome::ALL
                .iter()
                .zip(stats)
                .map(|(o, s)| format!("{}={}", o.name(), s.packets))
                .collect::<Vec<_>>()
                .join(" ");
            info!(iface = iface.name(), "xdp_stats packets: {line}");
        }
        Err(e) => warn!(iface = iface.name(), error = %e, "could not read xdp_stats"),
    }
}
