//! Command-line configuration of the daemon: what `xvio run` accepts and how each value is
//! parsed. Parsing errors name the option and the value, and say what is expected.

use std::{fmt, str::FromStr};

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};
use thiserror::Error;
use xvio_common::SteerKey;

/// xvio: a host datapath for virtual machines (XDP steering, AF_XDP, vhost-user-net).
#[derive(Debug, Parser)]
#[command(name = "xvio", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The daemon's subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach the XDP program to interfaces and run the datapath until SIGINT, SIGTERM or SIGHUP.
    Run(RunConfig),
    /// Print the counters a running daemon pinned for an interface (summed over CPUs).
    Stats(StatsConfig),
}

/// `xvio stats` options: an interface's counters, the guests', or both.
#[derive(Debug, Args, Clone)]
#[command(group(ArgGroup::new("what").required(true).multiple(true).args(["iface", "guests"])))]
pub struct StatsConfig {
    /// Interface whose pins to read.
    #[arg(long = "iface", value_name = "IF")]
    pub iface: Option<String>,
    /// The guests' counters, one line per guest (the pins under `PIN_ROOT/guests`).
    #[arg(long)]
    pub guests: bool,
    /// Root of the pins on bpffs.
    #[arg(long, value_name = "DIR", default_value = xvio_common::PIN_ROOT)]
    pub pin_root: std::path::PathBuf,
}

/// `xvio run` options.
#[derive(Debug, Args, Clone)]
pub struct RunConfig {
    /// Interface to attach to (repeatable).
    #[arg(long = "iface", value_name = "IF", required_unless_present = "guests")]
    pub ifaces: Vec<String>,
    /// A guest's vhost-user-net socket (repeatable):
    /// `socket=PATH,mac=MAC[@VLAN][,queues=N][,mode=server|client]`. Server mode (default)
    /// creates the socket; client mode connects to the VMM's. `@VLAN` (1 to 4094) puts the
    /// guest on an 802.1Q VLAN as an access port: it sends and receives untagged frames, the
    /// wire carries them tagged.
    #[arg(long = "guest", value_name = "socket=PATH,mac=MAC[@VLAN],…")]
    pub guests: Vec<GuestSpec>,
    /// How to attach the XDP program: `auto` tries native, then generic.
    #[arg(long, value_enum, default_value_t = XdpModeArg::Auto)]
    pub xdp_mode: XdpModeArg,
    /// A destination MAC (optionally on an 802.1Q VLAN) whose frames go to AF_XDP (repeatable).
    #[arg(long = "steer", value_name = "MAC[@VLAN]")]
    pub steer: Vec<SteerSpec>,
    /// Replace an XDP program that is already attached to an interface.
    #[arg(long)]
    pub replace: bool,
    /// Root of the pins on bpffs; each interface gets a folder below it.
    #[arg(long, value_name = "DIR", default_value = xvio_common::PIN_ROOT)]
    pub pin_root: std::path::PathBuf,
    /// A DMA channel for the copy engine (repeatable): `sw[:CORE]` (software engine on a core
    /// of its own), `cpu`, or `dsa:/dev/dsa/wqX.Y` (Intel DSA work queue).
    #[arg(long = "dma", value_name = "CHANNEL")]
    pub dma: Vec<DmaSpec>,
    /// AF_XDP sockets per interface: one per rx queue by default; a lower number uses the
    /// first N queues; 0 opens none (steered frames then pass to the kernel as no_socket).
    #[arg(long, value_name = "N")]
    pub queues: Option<u32>,
    /// Frames in each AF_XDP socket's UMEM (half receive, half transmit).
    #[arg(long, value_name = "N", default_value_t = 16384)]
    pub xsk_frames: u32,
    /// Bytes per UMEM frame: 2048 or 4096.
    #[arg(long, value_name = "BYTES", default_value_t = 2048)]
    pub xsk_frame_size: u32,
    /// Copies shorter than this many bytes are done by the CPU; `auto` measures each channel
    /// at start-up and picks where it starts to pay off.
    #[arg(long, value_name = "auto|BYTES", default_value = "auto")]
    pub copy_threshold: ThresholdArg,
    /// The CPUs of the datapath workers, one worker pinned to each: `1`, `1,3`, `2-5`
    /// (one unpinned worker when not given). The workers receive from the AF_XDP sockets
    /// and the guests' TX queues in turn; each busy-polls under load and sleeps when idle.
    #[arg(long = "datapath-cpus", value_name = "LIST", default_value = "")]
    pub datapath_cpus: CpuList,
    /// How long the datapath worker keeps polling after its last frame before it sleeps, in
    /// microseconds (as the kernel's `busy_poll`): longer answers sparse traffic sooner (a
    /// sleeping worker takes tens to hundreds of microseconds to wake) at the price of a busy
    /// core while it comes; 0 sleeps at once.
    #[arg(long = "busy-poll", value_name = "USECS", default_value_t = crate::datapath::worker::IDLE_BEFORE_PARK.as_micros() as u64,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub busy_poll_us: u64,
    /// Map a guest's memory only as the datapath first touches it, a page fault on a worker
    /// each time, instead of mapping the pages it has, off the datapath, in its first minute
    /// (which puts them in xvio's page tables and RSS).
    #[arg(long = "lazy-guest-memory")]
    pub lazy_guest_memory: bool,
}

/// `--datapath-cpus`: CPU numbers, each at most once, as `1,3` and ranges `2-5`; empty for
/// none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuList(pub Vec<usize>);

/// CPUs a datapath may have at most (one worker each).
pub const MAX_WORKERS: usize = 64;

impl FromStr for CpuList {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let expected = "expected CPU numbers and ranges, as 1 or 1,3 or 2-5";
        let mut cpus = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let number = |t: &str| {
                t.trim()
                    .parse::<usize>()
                    .map_err(|_| format!("'{t}' is not a CPU number; {expected}"))
            };
            let (first, last) = match part.split_once('-') {
                Some((a, b)) => (number(a)?, number(b)?),
                None => (number(part)?, number(part)?),
            };
            if first > last {
                return Err(format!("'{part}' is an empty range; {expected}"));
            }
            for cpu in first..=last {
                if cpus.contains(&cpu) {
                    return Err(format!("CPU {cpu} is given twice; one worker per CPU"));
                }
                if cpus.len() == MAX_WORKERS {
                    return Err(format!(
                        "more than {MAX_WORKERS} CPUs; at most {MAX_WORKERS} workers"
                    ));
                }
                cpus.push(cpu);
            }
        }
        Ok(CpuList(cpus))
    }
}

impl fmt::Display for CpuList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cpus: Vec<String> = self.0.iter().map(usize::to_string).collect();
        f.write_str(&cpus.join(","))
    }
}

/// `--dma`: one DMA channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DmaSpec {
    /// Synchronous memcpy.
    Cpu,
    /// The software copy engine, its worker pinned to `core` when given.
    Sw {
        /// The worker's core.
        core: Option<usize>,
    },
    /// An Intel DSA work queue.
    Dsa {
        /// `/dev/dsa/wqX.Y`.
        path: std::path::PathBuf,
    },
}

impl FromStr for DmaSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let expected = "expected sw, sw:CORE, cpu or dsa:/dev/dsa/wqX.Y";
        match s.split_once(':') {
            None if s == "cpu" => Ok(DmaSpec::Cpu),
            None if s == "sw" => Ok(DmaSpec::Sw { core: None }),
            Some(("sw", core)) => core
                .parse()
                .map(|core| DmaSpec::Sw { core: Some(core) })
                .map_err(|_| format!("'{core}' is not a core number; {expected}")),
            Some(("dsa", path)) if path.starts_with('/') => Ok(DmaSpec::Dsa { path: path.into() }),
            _ => Err(format!("'{s}' is not a DMA channel; {expected}")),
        }
    }
}

impl fmt::Display for DmaSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DmaSpec::Cpu => write!(f, "cpu"),
            DmaSpec::Sw { core: None } => write!(f, "sw"),
            DmaSpec::Sw { core: Some(core) } => write!(f, "sw:{core}"),
            DmaSpec::Dsa { path } => write!(f, "dsa:{}", path.display()),
        }
    }
}

/// Who creates a guest's socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketMode {
    /// xvio listens; the VMM connects.
    Server,
    /// The VMM listens; xvio connects, and reconnects when the VMM restarts.
    Client,
}

/// `--guest socket=PATH,mac=MAC[@VLAN][,queues=N][,mode=server|client]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestSpec {
    /// The vhost-user socket.
    pub socket: std::path::PathBuf,
    /// The guest's MAC (frames to it, from the wire or other guests, go to this guest).
    pub mac: MacAddr,
    /// Its 802.1Q VLAN (1 to 4094), 0 when untagged. A guest on a VLAN is an access port:
    /// its frames are untagged in the guest and tagged on the wire, and it exchanges frames
    /// only with the guests and the wire of its VLAN.
    pub vlan: u16,
    /// Queue pairs (1 to 16).
    pub queues: u16,
    /// Who listens.
    pub mode: SocketMode,
}

impl FromStr for GuestSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (mut socket, mut mac, mut queues, mut mode) = (None, None, 1u16, SocketMode::Server);
        let mut seen: Vec<&str> = Vec::with_capacity(4);
        for field in s.split(',') {
            let (key, value) = field
                .split_once('=')
                .ok_or_else(|| format!("'{field}' is not KEY=VALUE; expected socket=PATH,mac=MAC[@VLAN][,queues=N][,mode=server|client]"))?;
            if seen.contains(&key) {
                return Err(format!("{key}= is given twice; give each field once"));
            }
            seen.push(key);
            match key {
                "socket" if value.is_empty() => {
                    return Err("socket= is empty; expected socket=PATH".to_owned());
                }
                "socket" => socket = Some(std::path::PathBuf::from(value)),
                "mac" => mac = Some(parse_guest_mac(value)?),
                "queues" => {
                    queues = value
                        .parse()
                        .ok()
                        .filter(|q| (1..=16).contains(q))
                        .ok_or_else(|| format!("queues={value}: expected 1 to 16 queue pairs"))?;
                }
                "mode" => {
                    mode = match value {
                        "server" => SocketMode::Server,
                        "client" => SocketMode::Client,
                        _ => return Err(format!("mode={value}: expected server or client")),
                    }
                }
                _ => {
                    return Err(format!(
                        "unknown field '{key}'; expected socket, mac, queues or mode"
                    ));
                }
            }
        }
        let socket = socket.ok_or("socket=PATH is missing")?;
        let (mac, vlan) = mac.ok_or("mac=MAC is missing")?;
        if mac.0[0] & 1 != 0 {
            return Err(ParseError::GroupMac(mac.to_string()).to_string());
        }
        Ok(GuestSpec {
            socket,
            mac,
            vlan,
            queues,
            mode,
        })
    }
}

/// The value of a guest's `mac=MAC[@VLAN]` field: the MAC and the VLAN (0 without `@`).
fn parse_guest_mac(value: &str) -> Result<(MacAddr, u16), String> {
    let (mac_text, vlan) = match value.split_once('@') {
        None => (value, 0),
        Some((mac_text, vlan_text)) => {
            let vlan = vlan_text
                .parse::<u16>()
                .ok()
                .filter(|v| (1..4095).contains(v))
                .ok_or_else(|| {
                    format!(
                        "mac={value}: '{vlan_text}' is not a VLAN id; expected MAC@VLAN with a \
                         VLAN from 1 to 4094, or the MAC alone for an untagged guest"
                    )
                })?;
            (mac_text, vlan)
        }
    };
    let mac = mac_text
        .parse::<MacAddr>()
        .map_err(|e| format!("mac={value}: {e}"))?;
    Ok((mac, vlan))
}

/// `--copy-threshold`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThresholdArg {
    /// Measure each channel at start-up.
    Auto,
    /// This many bytes.
    Bytes(u32),
}

impl FromStr for ThresholdArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "auto" {
            return Ok(ThresholdArg::Auto);
        }
        s.parse()
            .map(ThresholdArg::Bytes)
            .map_err(|_| format!("'{s}' is not a size; expected auto or a number of bytes"))
    }
}

/// `--xdp-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum XdpModeArg {
    /// Native (driver) mode if the driver supports it, else generic.
    Auto,
    /// Native (driver) mode only.
    Native,
    /// Generic (skb) mode only.
    Generic,
}

/// A MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

/// Why a MAC or steer value was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ParseError {
    /// Not six hex octets separated by colons.
    #[error("'{0}' is not a MAC address; expected six hex octets like 52:54:00:12:34:56")]
    Mac(String),
    /// A group (multicast or broadcast) address cannot be steered to one guest.
    #[error(
        "'{0}' is a multicast or broadcast address; a guest's MAC must be unicast (first octet even)"
    )]
    GroupMac(String),
    /// The VLAN after `@` is not 0–4094.
    #[error("'{0}' is not a VLAN id; expected a number from 0 to 4094 (0: untagged)")]
    Vlan(String),
}

impl FromStr for MacAddr {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for octet in &mut mac {
            let part = parts.next().ok_or_else(|| ParseError::Mac(s.to_owned()))?;
            if part.is_empty() || part.len() > 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ParseError::Mac(s.to_owned()));
            }
            *octet = u8::from_str_radix(part, 16).map_err(|_| ParseError::Mac(s.to_owned()))?;
        }
        if parts.next().is_some() {
            return Err(ParseError::Mac(s.to_owned()));
        }
        Ok(MacAddr(mac))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `--steer MAC[@VLAN]`: frames to this unicast MAC (on this VLAN) go to AF_XDP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SteerSpec {
    /// The guest's MAC.
    pub mac: MacAddr,
    /// Its VLAN id, 0 for untagged.
    pub vlan: u16,
}

impl SteerSpec {
    /// The `steer` map key for this spec.
    pub fn key(&self) -> SteerKey {
        SteerKey::new(self.mac.0, self.vlan)
    }
}

impl FromStr for SteerSpec {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (mac_text, vlan) = match s.split_once('@') {
            Some((mac, vlan_text)) => {
                let vlan = vlan_text
                    .parse::<u16>()
                    .ok()
                    .filter(|v| *v < 4095)
                    .ok_or_else(|| ParseError::Vlan(vlan_text.to_owned()))?;
                (mac, vlan)
            }
            None => (s, 0),
        };
        let mac: MacAddr = mac_text.parse()?;
        if mac.0[0] & 1 != 0 {
            return Err(ParseError::GroupMac(mac_text.to_owned()));
        }
        Ok(SteerSpec { mac, vlan })
    }
}

impl fmt::Display for SteerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.vlan {
            0 => write!(f, "{}", self.mac),
            vlan => write!(f, "{}@{vlan}", self.mac),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datapath_cpus_are_lists_and_ranges_each_cpu_once() {
        let cpus = |s: &str| s.parse::<CpuList>().map(|c| c.0);
        assert_eq!(cpus(""), Ok(vec![]));
        assert_eq!(cpus("1"), Ok(vec![1]));
        assert_eq!(cpus("1,3"), Ok(vec![1, 3]));
        assert_eq!(cpus("2-4,0"), Ok(vec![2, 3, 4, 0]));
        assert_eq!(cpus(" 1 , 2 "), Ok(vec![1, 2]));
        for bad in ["x", "1,,y", "3-1", "1-", "-2", "1,1", "0-2,2"] {
            assert!(cpus(bad).is_err(), "{bad}");
        }
        assert!(cpus("1,1").unwrap_err().contains("CPU 1 is given twice"));
        assert!(cpus("0-100").unwrap_err().contains("at most 64"));
        assert_eq!("2-3".parse::<CpuList>().unwrap().to_string(), "2,3");
    }

    #[test]
    fn parses_macs_in_any_case() {
        let mac: MacAddr = "52:54:00:AB:cd:0f".parse().unwrap();
        assert_eq!(mac.0, [0x52, 0x54, 0x00, 0xab, 0xcd, 0x0f]);
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:0f");
    }

    #[test]
    fn refuses_bad_macs() {
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:11",
            "52:54:00:ab:cd:xg",
            "525:4:00:ab:cd:0f",
            "52-54-00-ab-cd-0f",
            "52:54:00:ab::0f",
            "+2:54:00:ab:cd:0f",
        ] {
            assert_eq!(
                bad.parse::<MacAddr>(),
                Err(ParseError::Mac(bad.to_owned())),
                "{bad}"
            );
        }
    }

    #[test]
    fn parses_steer_specs() {
        let spec: SteerSpec = "02:00:00:00:00:01@100".parse().unwrap();
        assert_eq!(spec.vlan, 100);
        assert_eq!(spec.key(), SteerKey::new([2, 0, 0, 0, 0, 1], 100));
        assert_eq!(spec.to_string(), "02:00:00:00:00:01@100");
        let untagged: SteerSpec = "02:00:00:00:00:01".parse().unwrap();
        assert_eq!(untagged.vlan, 0);
    }

    #[test]
    fn refuses_bad_steer_specs() {
        assert_eq!(
            "02:00:00:00:00:01@4095".parse::<SteerSpec>(),
            Err(ParseError::Vlan("4095".into()))
        );
        assert_eq!(
            "02:00:00:00:00:01@".parse::<SteerSpec>(),
            Err(ParseError::Vlan("".into()))
        );
        assert_eq!(
            "ff:ff:ff:ff:ff:ff".parse::<SteerSpec>(),
            Err(ParseError::GroupMac("ff:ff:ff:ff:ff:ff".into()))
        );
        assert_eq!(
            "01:00:5e:00:00:01@3".parse::<SteerSpec>(),
            Err(ParseError::GroupMac("01:00:5e:00:00:01".into()))
        );
    }

    #[test]
    fn parses_dma_channels_and_thresholds() {
        assert_eq!("sw".parse::<DmaSpec>(), Ok(DmaSpec::Sw { core: None }));
        assert_eq!("sw:1".parse::<DmaSpec>(), Ok(DmaSpec::Sw { core: Some(1) }));
        assert_eq!("cpu".parse::<DmaSpec>(), Ok(DmaSpec::Cpu));
        assert_eq!(
            "dsa:/dev/dsa/wq0.0".parse::<DmaSpec>(),
            Ok(DmaSpec::Dsa {
                path: "/dev/dsa/wq0.0".into()
            })
        );
        assert!(
            "sw:x"
                .parse::<DmaSpec>()
                .unwrap_err()
                .contains("'x' is not a core number")
        );
        assert!(
            "dsa:wq0"
                .parse::<DmaSpec>()
                .unwrap_err()
                .contains("is not a DMA channel")
        );
        assert!("ioat".parse::<DmaSpec>().is_err());
        for text in ["sw", "sw:1", "cpu", "dsa:/dev/dsa/wq0.0"] {
            assert_eq!(text.parse::<DmaSpec>().unwrap().to_string(), text);
        }
        assert_eq!("auto".parse::<ThresholdArg>(), Ok(ThresholdArg::Auto));
        assert_eq!("512".parse::<ThresholdArg>(), Ok(ThresholdArg::Bytes(512)));
        assert!("-1".parse::<ThresholdArg>().is_err());
    }

    #[test]
    fn parses_guest_specs() {
        let g: GuestSpec = "socket=/run/vm1.sock,mac=52:54:00:00:00:01,queues=2,mode=client"
            .parse()
            .unwrap();
        assert_eq!(g.socket, std::path::PathBuf::from("/run/vm1.sock"));
        assert_eq!((g.queues, g.mode), (2, SocketMode::Client));
        let g: GuestSpec = "socket=/tmp/a,mac=52:54:00:00:00:01".parse().unwrap();
        assert_eq!((g.queues, g.mode, g.vlan), (1, SocketMode::Server, 0));
        let g: GuestSpec = "socket=/tmp/a,mac=52:54:00:00:00:01@100,queues=2"
            .parse()
            .unwrap();
        assert_eq!(
            (g.mac, g.vlan, g.queues),
            (MacAddr([0x52, 0x54, 0, 0, 0, 1]), 100, 2)
        );
        for vlan in [1, 4094] {
            let text = format!("socket=/tmp/a,mac=52:54:00:00:00:01@{vlan}");
            assert_eq!(text.parse::<GuestSpec>().unwrap().vlan, vlan);
        }
        for (bad, why) in [
            ("mac=52:54:00:00:00:01", "socket=PATH is missing"),
            ("socket=/tmp/a", "mac=MAC is missing"),
            ("socket=/tmp/a,mac=zz", "is not a MAC address"),
            (
                "socket=/tmp/a,mac=52:54:00:00:00:01,queues=0",
                "expected 1 to 16",
            ),
            (
                "socket=/tmp/a,mac=52:54:00:00:00:01,mode=x",
                "expected server or client",
            ),
            (
                "socket=/tmp/a,mac=52:54:00:00:00:01,color=red",
                "unknown field 'color'",
            ),
            ("socket=/tmp/a,mac=ff:ff:ff:ff:ff:ff", "must be unicast"),
            ("socket=/tmp/a,mac=ff:ff:ff:ff:ff:ff@5", "must be unicast"),
            ("socket", "is not KEY=VALUE"),
            ("socket=,mac=52:54:00:00:00:01", "socket= is empty"),
            (
                "socket=/tmp/a,mac=52:54:00:00:00:01,socket=/tmp/b",
                "socket= is given twice",
            ),
            (
                "socket=/tmp/a,mac=52:54:00:00:00:01@0",
                "mac=52:54:00:00:00:01@0: '0' is not a VLAN id; expected MAC@VLAN with a VLAN from 1 to 4094, or the MAC alone",
            ),
            (
                "socket=/tmp/a,mac=52:54:00:00:00:01@4095",
                "'4095' is not a VLAN id",
            ),
            (
                "socket=/tmp/a,mac=52:54:00:00:00:01@",
                "'' is not a VLAN id",
            ),
            (
                "socket=/tmp/a,mac=52:54:00:00:00:01@x1",
                "'x1' is not a VLAN id",
            ),
            (
                "socket=/tmp/a,mac=52:54:00:00:00:01@-1",
                "'-1' is not a VLAN id",
            ),
            (
                "socket=/tmp/a,mac=52:54:00:00:00:01@1@2",
                "'1@2' is not a VLAN id",
            ),
            (
                "socket=/tmp/a,mac=52:54:00:00@7",
                "mac=52:54:00:00@7: '52:54:00:00' is not a MAC address",
            ),
        ] {
            let err = bad.parse::<GuestSpec>().unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn cli_errors_do_not_panic() {
        let err =
            Cli::try_parse_from(["xvio", "run", "--iface", "x", "--steer", "nope"]).unwrap_err();
        assert!(err.to_string().contains("is not a MAC address"), "{err}");
        assert!(Cli::try_parse_from(["xvio", "run"]).is_err());
        assert!(Cli::try_parse_from(["xvio", "run", "--iface", "x", "--xdp-mode", "hw"]).is_err());
    }
}
