//! One interface with xvio's XDP program attached: the loaded object, its link, its pinned
//! maps and the steering entries the daemon put in.
//!
//! Invariants: an [`AttachedIface`] exists only while the program is attached and its maps
//! are pinned under `<pin_root>/<ifname>/`; dropping it detaches the program (aya drops
//! the link) and removes the pins, so a failed start or a shutdown leaves nothing behind.

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, RingBuf},
    pin::PinError,
    programs::{ProgramError, Xdp, XdpMode as AyaXdpMode, links::LinkType, loaded_links},
};
use thiserror::Error;
use tracing::{info, warn};
use xvio_common::{
    DaemonStats, SteerKey, SteerSlot, SteerValue, XdpMode, XdpOutcome, XdpStats, maps,
};

use crate::{
    XDP_OBJECT, bpffs,
    config::{SteerSpec, XdpModeArg},
    netlink,
};

/// Errors of attaching to one interface. Each names the interface and says what to do.
#[derive(Debug, Error)]
pub enum AttachError {
    /// No such interface.
    #[error("interface '{iface}' does not exist (see `ip link show`)")]
    UnknownInterface {
        /// The name given.
        iface: String,
    },
    /// The object could not be loaded (maps created, relocations applied).
    #[error("loading the XDP object for '{iface}'")]
    LoadObject {
        /// The interface.
        iface: String,
        /// The cause.
        #[source]
        source: Box<EbpfError>,
    },
    /// The verifier or the kernel refused the program.
    #[error("loading the XDP program for '{iface}' into the kernel")]
    LoadProgram {
        /// The interface.
        iface: String,
        /// The cause.
        #[source]
        source: Box<ProgramError>,
    },
    /// Another XDP program is attached and `--replace` was not given.
    #[error(
        "interface '{iface}' already has an XDP program attached ({mode} mode, program id {prog_id}); \
         detach it (ip link set dev {iface} xdp off) or run xvio with --replace"
    )]
    AlreadyAttached {
        /// The interface.
        iface: String,
        /// Mode of the other program.
        mode: &'static str,
        /// Its id (`bpftool prog show id N`).
        prog_id: u32,
    },
    /// `--replace` cannot remove a program that another process holds through a BPF link.
    #[error(
        "interface '{iface}' has XDP program id {prog_id} attached through a BPF link another process \
         holds{link}; stop that process (or `bpftool link detach id <LINK>`) and start xvio again",
        link = link_id.map(|id| format!(" (link id {id})")).unwrap_or_default()
    )]
    HeldByLink {
        /// The interface.
        iface: String,
        /// The other program.
        prog_id: u32,
        /// Its link, when found.
        link_id: Option<u32>,
    },
    /// Querying or detaching through netlink failed.
    #[error("asking the kernel about the XDP program of '{iface}'")]
    Netlink {
        /// The interface.
        iface: String,
        /// The cause.
        #[source]
        source: netlink::NetlinkError,
    },
    /// Attaching failed in every mode tried.
    #[error("attaching XDP to '{iface}' in {mode} mode{hint}")]
    Attach {
        /// The interface.
        iface: String,
        /// The last mode tried.
        mode: &'static str,
        /// What to try instead.
        hint: &'static str,
        /// The cause.
        #[source]
        source: Box<ProgramError>,
    },
    /// A map the program declares is missing or of another type.
    #[error("map '{name}' of the XDP object")]
    Map {
        /// The map.
        name: &'static str,
        /// The cause.
        #[source]
        source: Box<MapError>,
    },
    /// The object lacks a map or the program (a build mismatch).
    #[error("the XDP object has no '{0}'; rebuild xvio")]
    Missing(&'static str),
    /// Pinning a map failed.
    #[error("pinning map '{name}' at {path}")]
    Pin {
        /// The map.
        name: &'static str,
        /// The pin path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<PinError>,
    },
    /// Making or cleaning the pin folder failed.
    #[error(transparent)]
    Bpffs(#[from] bpffs::BpffsError),
    /// More `--steer` entries than the map holds.
    #[error("{given} --steer entries given; the steer map holds {max}")]
    TooManySteers {
        /// Entries given.
        given: usize,
        /// Capacity.
        max: u32,
    },
    /// The guests and `--steer` entries together are more than the map holds.
    #[error(
        "the steer map of '{iface}' is full ({max} entries): give fewer --guest and --steer \
         MACs (each MAC@VLAN takes one)"
    )]
    SteerFull {
        /// The interface.
        iface: String,
        /// Capacity.
        max: u32,
    },
    /// The interface's pin folder is a running daemon's (an interface of the same name in
    /// another network namespace, say).
    #[error(
        "the pins at {dir} belong to xvio pid {pid}, which is running and wrote them {ago} s ago \
         (an interface '{iface}' in another network namespace?); stop it, or give this daemon \
         its own --pin-root"
    )]
    PinsInUse {
        /// The interface.
        iface: String,
        /// Its pin folder.
        dir: PathBuf,
        /// The other daemon.
        pid: u32,
        /// Seconds since it wrote its counters.
        ago: u64,
    },
    /// A guest's (or `--steer`) MAC is the interface's own.
    #[error(
        "{mac} is the MAC of interface '{iface}' itself: steered to a guest, the host's own \
         traffic on '{iface}' would no longer reach the kernel; give the guest another MAC \
         (--guest …,mac=, --steer)"
    )]
    HostMac {
        /// The interface.
        iface: String,
        /// Its MAC.
        mac: crate::config::MacAddr,
    },
}

/// The MAC of `iface` in this network namespace (getifaddrs: /sys shows the namespace that
/// mounted it), if it has one.
fn mac_of(iface: &str) -> Option<[u8; 6]> {
    nix::ifaddrs::getifaddrs()
        .ok()?
        .filter(|a| a.interface_name == iface)
        .find_map(|a| {
            a.address
                .and_then(|s| s.as_link_addr().and_then(|l| l.addr()))
        })
}

/// What to attach and how.
#[derive(Debug, Clone, Copy)]
pub struct AttachOptions<'a> {
    /// `--xdp-mode`.
    pub mode: XdpModeArg,
    /// `--replace`.
    pub replace: bool,
    /// Root of the pins.
    pub pin_root: &'a Path,
    /// `--steer` entries.
    pub steer: &'a [SteerSpec],
}

/// xvio's XDP program attached to one interface, with its maps pinned.
#[derive(Debug)]
pub struct AttachedIface {
    name: String,
    ifindex: u32,
    mode: XdpMode,
    pin_dir: PathBuf,
    steer_entries: u32,
    /// Whether its pin folder holds this daemon's pins (removed on drop), not another's.
    pinned: bool,
    /// The interface's own MAC (never steered).
    mac: Option<[u8; 6]>,
    // Declared last: dropped after the fields above, detaching the program.
    ebpf: Ebpf,
}

impl AttachedIface {
    /// Loads the program, attaches it to `iface`, fills `steer` and pins the maps.
    pub fn attach(iface: &str, opts: AttachOptions<'_>) -> Result<AttachedIface, AttachError> {
        let ifindex =
            nix::net::if_::if_nametoindex(iface).map_err(|_| AttachError::UnknownInterface {
                iface: iface.to_owned(),
            })?;
        if opts.steer.len() > xvio_common::STEER_MAX as usize {
            return Err(AttachError::TooManySteers {
                given: opts.steer.len(),
                max: xvio_common::STEER_MAX,
            });
        }
        let mut ebpf = EbpfLoader::new()
            .load(XDP_OBJECT)
            .map_err(|e| AttachError::LoadObject {
                iface: iface.to_owned(),
                source: Box::new(e),
            })?;
        let program: &mut Xdp = ebpf
            .program_mut(xvio_common::PROGRAM_NAME)
            .ok_or(AttachError::Missing(xvio_common::PROGRAM_NAME))?
            .try_into()
            .map_err(|e| AttachError::LoadProgram {
                iface: iface.to_owned(),
                source: Box::new(e),
            })?;
        program.load().map_err(|e| AttachError::LoadProgram {
            iface: iface.to_owned(),
            source: Box::new(e),
        })?;
        make_room(iface, ifindex, opts.replace)?;
        let mode = attach_program(program, iface, ifindex, opts.mode)?;

        // Made when the maps are pinned: a start that fails before leaves no folder.
        let pin_dir = opts.pin_root.join(iface);
        let mut attached = AttachedIface {
            name: iface.to_owned(),
            ifindex,
            mode,
            pin_dir,
            steer_entries: 0,
            pinned: false,
            mac: mac_of(iface),
            ebpf,
        };
        attached.fill_steer(opts.steer)?;
        attached.pin_maps()?;
        info!(iface, ifindex, mode = mode.c_name(), pins = %attached.pin_dir.display(), "XDP program attached");
        Ok(attached)
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The interface's index.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// The mode the program is attached in.
    pub fn mode(&self) -> XdpMode {
        self.mode
    }

    /// The folder holding this interface's pins.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Writes the daemon's counters for this interface: `daemon_stats[0]` (the daemon-wide
    /// fields from `daemon`: uptime, clock, interfaces, guest totals; the interface's own
    /// filled in here) and one `port_stats` entry per AF_XDP port (`ports`: rx queue and
    /// counters).
    pub fn publish(
        &mut self,
        daemon: DaemonStats,
        ports: &[(u32, xvio_common::PortStats)],
    ) -> Result<(), AttachError> {
        let stats = DaemonStats {
            pid: std::process::id(),
            xdp_mode: self.mode as u32,
            steer_entries: self.steer_entries,
            xsk_sockets: ports.len() as u32,
            xsk_zero_copy: ports.iter().filter(|(_, p)| p.zero_copy != 0).count() as u32,
            ..daemon
        };
        let map = self
            .ebpf
            .map_mut(maps::DAEMON_STATS)
            .ok_or(AttachError::Missing(maps::DAEMON_STATS))?;
        let mut array: Array<&mut MapData, DaemonStats> =
            Array::try_from(map).map_err(map_error(maps::DAEMON_STATS))?;
        array
            .set(0, stats, 0)
            .map_err(map_error(maps::DAEMON_STATS))?;
        let map = self
            .ebpf
            .map_mut(maps::PORT_STATS)
            .ok_or(AttachError::Missing(maps::PORT_STATS))?;
        let mut array: Array<&mut MapData, xvio_common::PortStats> =
            Array::try_from(map).map_err(map_error(maps::PORT_STATS))?;
        for (queue, port) in ports {
            array
                .set(*queue, *port, 0)
                .map_err(map_error(maps::PORT_STATS))?;
        }
        Ok(())
    }

    /// `xdp_stats` summed over CPUs, indexed like [`XdpOutcome::ALL`].
    pub fn xdp_stats(&self) -> Result<[XdpStats; XdpOutcome::ALL.len()], AttachError> {
        let map = self
            .ebpf
            .map(maps::XDP_STATS)
            .ok_or(AttachError::Missing(maps::XDP_STATS))?;
        let array: PerCpuArray<&MapData, XdpStats> =
            PerCpuArray::try_from(map).map_err(map_error(maps::XDP_STATS))?;
        crate::stats::xdp_totals(&array).map_err(map_error(maps::XDP_STATS))
    }

    /// Takes the `events` ring buffer out of the object, for the daemon's reader.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, AttachError> {
        let map = self
            .ebpf
            .take_map(maps::EVENTS)
            .ok_or(AttachError::Missing(maps::EVENTS))?;
        RingBuf::try_from(map).map_err(map_error(maps::EVENTS))
    }

    fn fill_steer(&mut self, steer: &[SteerSpec]) -> Result<(), AttachError> {
        // `--steer` entries name no guest: ids from the top down, out of the guests' way.
        for (n, spec) in (0u32..).zip(steer) {
            self.steer(spec.key(), u32::MAX - n)?;
        }
        Ok(())
    }

    /// Steers frames to `key` (a guest's MAC and VLAN) into the AF_XDP sockets, naming guest
    /// `guest_id` in the entry.
    pub fn steer(&mut self, key: xvio_common::SteerKey, guest_id: u32) -> Result<(), AttachError> {
        if self.mac == Some(key.mac) {
            return Err(AttachError::HostMac {
                iface: self.name.clone(),
                mac: crate::config::MacAddr(key.mac),
            });
        }
        let map = self
            .ebpf
            .map_mut(maps::STEER)
            .ok_or(AttachError::Missing(maps::STEER))?;
        let mut hash: HashMap<&mut MapData, xvio_common::SteerKey, SteerValue> =
            HashMap::try_from(map).map_err(map_error(maps::STEER))?;
        // Counted as it grows (one lookup), not by walking the map after every insert.
        let new = hash.get(&key, 0).is_err();
        if new && self.steer_entries >= xvio_common::STEER_MAX {
            return Err(AttachError::SteerFull {
                iface: self.name.clone(),
                max: xvio_common::STEER_MAX,
            });
        }
        hash.insert(key, SteerValue { guest_id, flags: 0 }, 0)
            .map_err(map_error(maps::STEER))?;
        if new {
            self.steer_entries += 1;
        }
        let map = self
            .ebpf
            .map_mut(maps::STEER_INDEX)
            .ok_or(AttachError::Missing(maps::STEER_INDEX))?;
        let mut index = Array::try_from(map).map_err(map_error(maps::STEER_INDEX))?;
        index_steered(&mut index, key, guest_id).map_err(map_error(maps::STEER_INDEX))
    }

    fn pin_maps(&mut self) -> Result<(), AttachError> {
        // Pins of a daemon that still runs (it writes its counters about once a second): not
        // this daemon's to take.
        if let Some((pid, ago)) = crate::stats::running_owner(&self.pin_dir) {
            return Err(AttachError::PinsInUse {
                iface: self.name.clone(),
                dir: self.pin_dir.clone(),
                pid,
                ago,
            });
        }
        self.pinned = true;
        // Pins left by a daemon that died: this daemon holds the interface now.
        if maps::PINNED
            .iter()
            .any(|name| self.pin_dir.join(name).exists())
        {
            warn!(iface = %self.name, dir = %self.pin_dir.display(), "removing stale pins of an earlier run");
            bpffs::remove_pins(&self.pin_dir, &maps::PINNED)?;
        }
        self.pin_dir = bpffs::pin_dir(self.pin_dir.parent().unwrap_or(Path::new("/")), &self.name)?;
        for name in maps::PINNED {
            let path = self.pin_dir.join(name);
            let map = self.ebpf.map(name).ok_or(AttachError::Missing(name))?;
            map.pin(&path).map_err(|source| AttachError::Pin {
                name,
                path,
                source: Box::new(source),
            })?;
        }
        Ok(())
    }
}

/// Records `key`, already in `steer`, in its slot of `steer_index`: a free slot gets the key
/// (the program then decides that slot's frames by comparing with it), a slot with another
/// key is marked as having more than one (the program then asks `steer`), the same key gets
/// the new guest id. The daemon only adds keys while it runs, so a slot never goes back.
/// Each write changes one thing the program reads: the key is written while the slot still
/// says no key, then the count, so the program never compares against a key half written,
/// even with a copy byte by byte.
pub fn index_steered(
    index: &mut Array<&mut MapData, SteerSlot>,
    key: SteerKey,
    guest_id: u32,
) -> Result<(), MapError> {
    let slot = key.slot();
    let mut held = index.get(&slot, 0)?;
    match held.keys {
        0 => {
            held = SteerSlot {
                key,
                keys: 0,
                guest_id,
            };
            index.set(slot, held, 0)?;
            held.keys = 1;
            index.set(slot, held, 0)
        }
        // The same key again (a `--steer` MAC that is also a guest's): its guest as in `steer`.
        1 if held.key == key => {
            held.guest_id = guest_id;
            index.set(slot, held, 0)
        }
        1 => {
            held.keys = 2;
            index.set(slot, held, 0)
        }
        _ => Ok(()),
    }
}

impl Drop for AttachedIface {
    fn drop(&mut self) {
        // Not when another daemon took the folder over meanwhile (this one stalled).
        if self.pinned
            && crate::stats::running_owner(&self.pin_dir).is_none()
            && let Err(e) = bpffs::remove_pins(&self.pin_dir, &maps::PINNED)
        {
            warn!(iface = %self.name, error = %e, "could not remove pins");
        }
        info!(iface = %self.name, "XDP program detached");
    }
}

/// Wraps a map error of map `name`.
fn map_error(name: &'static str) -> impl FnOnce(MapError) -> AttachError {
    move |e| AttachError::Map {
        name,
        source: Box::new(e),
    }
}

/// Refuses to go on when another XDP program is attached, unless `replace`, in which case
/// it detaches that program.
fn make_room(iface: &str, ifindex: u32, replace: bool) -> Result<(), AttachError> {
    let netlink_err = |source| AttachError::Netlink {
        iface: iface.to_owned(),
        source,
    };
    let Some(existing) = netlink::xdp_attachment(ifindex).map_err(netlink_err)? else {
        return Ok(());
    };
    if !replace {
        return Err(AttachError::AlreadyAttached {
            iface: iface.to_owned(),
            mode: existing.mode.describe(),
            prog_id: existing.prog_id,
        });
    }
    match netlink::detach_xdp(ifindex, existing.mode) {
        Ok(()) => {
            warn!(
                iface,
                prog_id = existing.prog_id,
                mode = existing.mode.describe(),
                "replaced the XDP program that was attached"
            );
            Ok(())
        }
        Err(netlink::NetlinkError::Kernel(e)) if e.raw_os_error() == Some(libc::EBUSY) => {
            Err(AttachError::HeldByLink {
                iface: iface.to_owned(),
                prog_id: existing.prog_id,
                link_id: xdp_link_of(existing.prog_id),
            })
        }
        Err(source) => Err(netlink_err(source)),
    }
}

/// The id of the XDP link that holds program `prog_id`, if one can be found.
fn xdp_link_of(prog_id: u32) -> Option<u32> {
    loaded_links()
        .filter_map(Result::ok)
        .find(|link| link.program_id() == prog_id && matches!(link.link_type(), Ok(LinkType::Xdp)))
        .map(|link| link.id())
}

/// Attaches in the requested mode; `auto` tries native, then generic.
fn attach_program(
    program: &mut Xdp,
    iface: &str,
    ifindex: u32,
    mode: XdpModeArg,
) -> Result<XdpMode, AttachError> {
    let tries: &[XdpMode] = match mode {
        XdpModeArg::Auto => &[XdpMode::Native, XdpMode::Generic],
        XdpModeArg::Native => &[XdpMode::Native],
        XdpModeArg::Generic => &[XdpMode::Generic],
    };
    let mut last_error = None;
    for &want in tries {
        let aya_mode = match want {
            XdpMode::Generic => AyaXdpMode::Skb,
            _ => AyaXdpMode::Driver,
        };
        match program.attach_to_if_index(ifindex, aya_mode) {
            Ok(_link) => return Ok(want),
            Err(e) => {
                if tries.len() > 1 {
                    warn!(iface, mode = want.c_name(), error = %e, "XDP attach failed; trying the next mode");
                }
                last_error = Some((want, e));
            }
        }
    }
    let (want, source) = last_error.unwrap_or((XdpMode::None, ProgramError::NotAttached));
    let hint = match (want, mode) {
        (XdpMode::Native, XdpModeArg::Native) => {
            " (the driver may not support native XDP: try --xdp-mode generic)"
        }
        _ => "",
    };
    Err(AttachError::Attach {
        iface: iface.to_owned(),
        mode: match want {
            XdpMode::Generic => "generic",
            _ => "native",
        },
        hint,
        source: Box::new(source),
    })
}

/// Whether an error chain bottoms out in `EPERM`/`EACCES` (missing privileges).
pub fn is_permission_error(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<io::Error>()
            && matches!(io.raw_os_error(), Some(libc::EPERM | libc::EACCES))
        {
            return true;
        }
        next = e.source();
    }
    false
}
