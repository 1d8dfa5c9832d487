//! testpmd as a datapath between an interface and a vhost-user guest: a `net_af_xdp` port on
//! the interface's queue 0, a `net_vhost` port serving the guest's socket, and io forwarding
//! (frames as they are, both ways) on one forwarding lcore. Its ports' counters come live from
//! DPDK's telemetry socket; the cycles its forwarding lcore spent on frames
//! (`--record-core-cycles`) come from what it prints when it stops.
//!
//! On veth (Debian's DPDK 22.11, kernel 6.x) the PMD works with its defaults: the kernel binds
//! the socket in copy mode (veth has no zero-copy), libxdp cannot load its dispatcher ("xdp_pass:
//! Operation not permitted") and attaches the PMD's redirect program alone, natively. Neither
//! `force_copy=1` nor `xdp_prog=` is needed. Its preferred busy polling (`busy_budget`, 64 by
//! default) makes every receive burst a `recvfrom`, which runs the veth's NAPI (the XDP program
//! and the copy into the UMEM) on the forwarding lcore's CPU instead of the sender's; the
//! caller chooses it ([`FwdConfig::busy_budget`]).

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr, connect, recv, send, setsockopt, socket,
    sockopt,
};

use crate::{
    dpdk::{APP_ARGS, Testpmd},
    netns::Netns,
};

/// How a forwarder is started.
#[derive(Clone, Debug)]
pub struct FwdConfig {
    /// The interface the `net_af_xdp` port takes (its queue 0).
    pub iface: String,
    /// The vhost-user socket the `net_vhost` port serves (the guest connects to it).
    pub socket: PathBuf,
    /// The main lcore's CPU (prints statistics, handles vhost-user messages).
    pub main_cpu: usize,
    /// The forwarding lcore's CPU (polls both ports all the time).
    pub forward_cpu: usize,
    /// `net_af_xdp`'s `busy_budget` (0: no preferred busy polling).
    pub busy_budget: u32,
}

/// A running forwarder.
#[derive(Debug)]
pub struct AfXdpVhostFwd {
    pmd: Testpmd,
    config: FwdConfig,
}

/// One port's counters (`rte_eth_stats`) as the telemetry socket reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EthStats {
    /// Frames received.
    pub ipackets: u64,
    /// Frames sent.
    pub opackets: u64,
    /// Frames the port dropped on receive (af_xdp: the kernel's drops at the socket).
    pub imissed: u64,
    /// Frames it failed to send (vhost: the guest had no buffers).
    pub oerrors: u64,
    /// Receive failures for want of an mbuf.
    pub rx_nombuf: u64,
}

/// What `--record-core-cycles` printed at stop: the forwarding lcore's cycles in bursts that
/// received frames (empty polls are not counted), over the frames received.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FwdCycles {
    /// Cycles per received frame.
    pub per_frame: f64,
    /// Frames received by all streams.
    pub frames: u64,
    /// The TSC's clock.
    pub mhz: u64,
}

/// The `af_xdp` port's number (the first vdev).
pub const AF_XDP_PORT: u16 = 0;
/// The `vhost` port's number.
pub const VHOST_PORT: u16 = 1;
const WAIT: Duration = Duration::from_secs(20);

impl AfXdpVhostFwd {
    /// Starts testpmd in `ns` (where the interface is) and waits until it forwards and its
    /// socket exists.
    pub fn start(ns: &Netns, config: FwdConfig) -> Result<AfXdpVhostFwd, String> {
        let _ = std::fs::remove_file(&config.socket);
        let cpus = format!("{},{}", config.main_cpu, config.forward_cpu);
        let main = config.main_cpu.to_string();
        let af_xdp = format!(
            "net_af_xdp0,iface={},start_queue=0,queue_count=1,busy_budget={}",
            config.iface, config.busy_budget
        );
        let vhost = format!("net_vhost0,iface={},queues=1", config.socket.display());
        let mut pmd = Testpmd::spawn(
            Some(ns),
            &[
                "--main-lcore",
                &main,
                "-l",
                &cpus,
                "-m",
                "1024",
                "--vdev",
                &af_xdp,
                "--vdev",
                &vhost,
            ],
            &[
                APP_ARGS.as_slice(),
                &[
                    "--forward-mode=io",
                    "--record-core-cycles",
                    // Without a terminal, testpmd flushes its log with each statistics print.
                    "--stats-period",
                    "1",
                ],
            ]
            .concat(),
        )?;
        let deadline = Instant::now() + WAIT;
        while !(pmd.output().contains("forwards packets on") && config.socket.exists()) {
            if !pmd.running() || Instant::now() > deadline {
                return Err(format!(
                    "testpmd (net_af_xdp on {}, net_vhost on {}) did not start forwarding within {WAIT:?}:\n{}",
                    config.iface,
                    config.socket.display(),
                    pmd.output()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(AfXdpVhostFwd { pmd, config })
    }

    /// How it was started.
    pub fn config(&self) -> &FwdConfig {
        &self.config
    }

    /// Its pid.
    pub fn pid(&self) -> Option<i32> {
        self.pmd.pid()
    }

    /// Its forwarding configuration as it printed it: "Logical Core 1 (socket 0) forwards
    /// packets on 2 streams", or `None`.
    pub fn forwarding(&self) -> Option<String> {
        self.pmd
            .output()
            .lines()
            .find(|l| l.contains("forwards packets on"))
            .map(|l| l.trim().trim_end_matches(':').to_owned())
    }

    /// Port `port`'s counters now.
    pub fn stats(&self, port: u16) -> Result<EthStats, String> {
        let out = self.telemetry(&format!("/ethdev/stats,{port}"))?;
        let field = |key| json_u64(&out, key).ok_or(format!("no {key} in {out}"));
        Ok(EthStats {
            ipackets: field("ipackets")?,
            opackets: field("opackets")?,
            imissed: field("imissed")?,
            oerrors: field("oerrors")?,
            rx_nombuf: field("rx_nombuf")?,
        })
    }

    /// Whether port `port`'s link is up (the vhost port's: a guest is connected and ready).
    pub fn link_up(&self, port: u16) -> Result<bool, String> {
        let out = self.telemetry(&format!("/ethdev/link_status,{port}"))?;
        Ok(out.contains("\"status\":\"UP\""))
    }

    /// Stops it (SIGINT) and returns its cycles per frame, when it received any.
    pub fn stop(self) -> (Option<FwdCycles>, String) {
        let (_, out) = self.pmd.stop_keep_output();
        (parse_cycles(&out), out)
    }

    /// One request to its telemetry socket (/var/run/dpdk/PREFIX/dpdk_telemetry.v2); the
    /// JSON answer.
    fn telemetry(&self, query: &str) -> Result<String, String> {
        let path = Path::new("/var/run/dpdk")
            .join(self.pmd.prefix())
            .join("dpdk_telemetry.v2");
        let err = |what: &str, e: nix::Error| format!("{what} {}: {e}", path.display());
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| err("socket for", e))?;
        setsockopt(
            &fd,
            sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(5, 0),
        )
        .map_err(|e| err("timeout on", e))?;
        let addr = UnixAddr::new(&path).map_err(|e| err("address", e))?;
        use std::os::fd::AsRawFd;
        connect(fd.as_raw_fd(), &addr).map_err(|e| err("connect to", e))?;
        let mut buf = vec![0u8; 64 * 1024];
        // The greeting: {"version":…,"max_output_len":…}.
        recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(|e| err("recv from", e))?;
        send(fd.as_raw_fd(), query.as_bytes(), MsgFlags::empty()).map_err(|e| err("send to", e))?;
        let n =
            recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(|e| err("recv from", e))?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }
}

/// The number after `"key":` in a flat JSON answer.
fn json_u64(json: &str, key: &str) -> Option<u64> {
    let at = json.find(&format!("\"{key}\":"))? + key.len() + 3;
    let digits: String = json[at..]
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// "CPU cycles/packet=231.50 (total cycles=… / total RX packets=… ) at 2596 MHz Clock".
pub fn parse_cycles(out: &str) -> Option<FwdCycles> {
    let line = out
        .lines()
        .rev()
        .find(|l| l.contains("CPU cycles/packet="))?;
    let after = |key: &str| -> Option<&str> {
        let at = line.find(key)? + key.len();
        line[at..].split([' ', ')']).find(|w| !w.is_empty())
    };
    Some(FwdCycles {
        per_frame: after("CPU cycles/packet=")?.parse().ok()?,
        frames: after("packets=")?.parse().ok()?,
        mhz: after(") at")?.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cycles_per_packet() {
        let out = "  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++
  RX-packets: 250000         RX-dropped: 0             RX-total: 250000

  CPU cycles/packet=231.50 (total cycles=57875000 / total RX packets=250000) at 2596 MHz Clock
";
        assert_eq!(
            parse_cycles(out),
            Some(FwdCycles {
                per_frame: 231.5,
                frames: 250_000,
                mhz: 2596
            })
        );
        assert_eq!(parse_cycles("no cycles here"), None);
    }

    #[test]
    fn reads_telemetry_counters() {
        let json = r#"{"/ethdev/stats":{"ipackets":64045,"opackets":0,"ibytes":4098944,"imissed":12,"ierrors":0,"oerrors":7,"rx_nombuf":0,"q_ipackets":[64045,0]}}"#;
        assert_eq!(json_u64(json, "ipackets"), Some(64045));
        assert_eq!(json_u64(json, "imissed"), Some(12));
        assert_eq!(json_u64(json, "oerrors"), Some(7));
        assert_eq!(json_u64(json, "obytes"), None);
    }
}
