//! `xvio run`: attach to every interface, publish counters about once a second, log
//! kernel events, and on SIGINT or SIGTERM detach and remove every pin.
//!
//! Datapath work will run on its own threads; this tokio runtime is the control plane only.

use std::{
    collections::HashSet,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use thiserror::Error;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};
use xvio_common::XdpOutcome;

use crate::{
    attach::{AttachError, AttachOptions, AttachedIface},
    bpffs,
    config::RunConfig,
    privileges,
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
    /// Attaching to an interface failed.
    #[error(transparent)]
    Attach(#[from] AttachError),
    /// A DMA channel could not be started.
    #[error(transparent)]
    Dma(#[from] crate::copy::pool::StartError),
    /// The tokio runtime or a signal handler could not be set up.
    #[error("setting up the control plane")]
    Runtime(#[source] std::io::Error),
}

/// Runs the daemon until SIGINT or SIGTERM.
pub fn run(config: &RunConfig) -> Result<(), DaemonError> {
    privileges::check()?;
    let mut seen = HashSet::new();
    if let Some(dup) = config
        .ifaces
        .iter()
        .find(|name| !seen.insert(name.as_str()))
    {
        return Err(DaemonError::DuplicateIface(dup.clone()));
    }
    if bpffs::ensure_mounted(&config.pin_root)? {
        info!(path = bpffs::BPFFS, "mounted bpffs");
    }
    let opts = AttachOptions {
        mode: config.xdp_mode,
        replace: config.replace,
        pin_root: &config.pin_root,
        steer: &config.steer,
    };
    // The copy engine's channels; the datapath binds them to virtqueues as guests come.
    let dma = crate::copy::ChannelPool::start(&config.dma, config.copy_threshold)?;
    // On an error, the interfaces attached so far are dropped: detached and unpinned.
    let mut ifaces = config
        .ifaces
        .iter()
        .map(|name| AttachedIface::attach(name, opts))
        .collect::<Result<Vec<_>, _>>()?;
    for iface in &ifaces {
        info!(
            "inspect with: bpftool map dump pinned {}/{}",
            iface.pin_dir().display(),
            xvio_common::maps::XDP_STATS
        );
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    runtime.block_on(control_loop(&mut ifaces))?;
    for iface in &ifaces {
        log_summary(iface);
    }
    drop(ifaces);
    drop(dma);
    info!("stopped");
    Ok(())
}

async fn control_loop(ifaces: &mut [AttachedIface]) -> Result<(), DaemonError> {
    let mut sigint = signal(SignalKind::interrupt()).map_err(DaemonError::Runtime)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(DaemonError::Runtime)?;
    let mut readers = tokio::task::JoinSet::new();
    for iface in ifaces.iter_mut() {
        let ring = iface.take_events()?;
        readers.spawn(crate::events::log_events(iface.name().to_owned(), ring));
    }
    let started = Instant::now();
    let count = u32::try_from(ifaces.len()).unwrap_or(u32::MAX);
    let mut tick = tokio::time::interval(PUBLISH_PERIOD);
    info!(ifaces = count, "running; stop with Ctrl-C or SIGTERM");
    loop {
        tokio::select! {
            _ = sigint.recv() => { info!("SIGINT: stopping"); break; }
            _ = sigterm.recv() => { info!("SIGTERM: stopping"); break; }
            Some(done) = readers.join_next() => {
                warn!(result = ?done, "an events reader stopped; kernel events are no longer logged");
            }
            _ = tick.tick() => {
                let uptime_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                let now_ms = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                for iface in ifaces.iter_mut() {
                    if let Err(e) = iface.publish(uptime_ms, now_ms, count) {
                        warn!(iface = iface.name(), error = %e, "could not write daemon_stats");
                    }
                }
            }
        }
    }
    readers.shutdown().await;
    Ok(())
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
