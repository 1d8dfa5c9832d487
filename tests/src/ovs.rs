//! A private OVS-DPDK instance for benchmarks (Debian's openvswitch-switch-dpdk 3.1): its own
//! ovsdb-server and ovs-vswitchd in a fresh directory, DPDK without hugepages, a netdev
//! bridge `xviobr`, optionally started inside a network namespace so that an `afxdp` port
//! can take an interface of that namespace.
//!
//! Everything it starts is stopped by pid and waited for on drop (a new instance started
//! while the old ovs-vswitchd still holds its EAL files fails with "Cannot init EAL"); its
//! directory and its DPDK runtime directory are removed.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::netns::Netns;

const VSWITCHD: &str = "/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk";
const SCHEMA: &str = "/usr/share/openvswitch/vswitch.ovsschema";
/// The bridge every instance makes.
pub const BRIDGE: &str = "xviobr";

/// Where OVS's threads run: `other_config:dpdk-lcore-mask` and `pmd-cpu-mask`.
#[derive(Clone, Copy, Debug)]
pub struct OvsCpus<'a> {
    /// The DPDK lcore mask (OVS's main thread), e.g. "0x1".
    pub lcore_mask: &'a str,
    /// The PMD threads' mask, e.g. "0x2".
    pub pmd_mask: &'a str,
}

/// A running OVS-DPDK.
#[derive(Debug)]
pub struct OvsDpdk {
    dir: PathBuf,
    prefix: String,
}

/// One port's counters as OVS holds them now (`ovs-ofctl dump-ports`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OvsPortCounters {
    /// Frames OVS received on the port.
    pub rx_packets: u64,
    /// Frames it dropped on receive.
    pub rx_dropped: u64,
    /// Frames OVS sent out of the port.
    pub tx_packets: u64,
    /// Frames it could not send (for a vhost-user port: the guest had no RX buffers).
    pub tx_dropped: u64,
}

impl OvsDpdk {
    /// Starts ovsdb-server and ovs-vswitchd (in `ns` when given) with DPDK on `cpus` and
    /// `mem_mb` MiB of non-hugepage memory, and makes the netdev bridge.
    pub fn start(ns: Option<&Netns>, cpus: OvsCpus<'_>, mem_mb: u32) -> Result<OvsDpdk, String> {
        if !Path::new(VSWITCHD).exists() {
            return Err(format!(
                "{VSWITCHD} is missing: apt-get install openvswitch-switch-dpdk"
            ));
        }
        let dir = std::env::temp_dir().join(crate::unique_name("xvio-ovs-"));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let ovs = OvsDpdk {
            dir,
            prefix: crate::unique_name("xvio-ovs-"),
        };
        ovs.run(
            None,
            "ovsdb-tool",
            &["create", &ovs.path("conf.db"), SCHEMA],
        )?;
        ovs.run(
            None,
            "ovsdb-server",
            &[
                &ovs.path("conf.db"),
                &format!("--remote=punix:{}", ovs.path("db.sock")),
                &format!("--pidfile={}", ovs.path("ovsdb-server.pid")),
                "--detach",
                &format!("--log-file={}", ovs.path("ovsdb-server.log")),
            ],
        )?;
        ovs.vsctl(&["--no-wait", "init"])?;
        // --legacy-mem must be explicit: otherwise OVS adds --in-memory, which EAL rejects
        // together with --no-huge.
        ovs.vsctl(&[
            "--no-wait",
            "set",
            "Open_vSwitch",
            ".",
            "other_config:dpdk-init=true",
            &format!(
                "other_config:dpdk-extra=--no-huge --legacy-mem -m {mem_mb} --iova-mode=va --no-pci --file-prefix={}",
                ovs.prefix
            ),
            &format!("other_config:dpdk-lcore-mask={}", cpus.lcore_mask),
            &format!("other_config:pmd-cpu-mask={}", cpus.pmd_mask),
        ])?;
        ovs.run(
            ns,
            VSWITCHD,
            &[
                &format!("unix:{}", ovs.path("db.sock")),
                &format!("--pidfile={}", ovs.path("ovs-vswitchd.pid")),
                &format!("--unixctl={}", ovs.path("ovs-vswitchd.ctl")),
                "--detach",
                &format!("--log-file={}", ovs.path("ovs-vswitchd.log")),
            ],
        )?;
        ovs.vsctl(&[
            "add-br",
            BRIDGE,
            "--",
            "set",
            "bridge",
            BRIDGE,
            "datapath_type=netdev",
        ])?;
        Ok(ovs)
    }

    /// Adds a `dpdkvhostuser` port `name` (OVS serves the socket) and returns its socket
    /// once it exists.
    pub fn add_vhost_user(&self, name: &str) -> Result<PathBuf, String> {
        self.vsctl(&[
            "add-port",
            BRIDGE,
            name,
            "--",
            "set",
            "Interface",
            name,
            "type=dpdkvhostuser",
        ])?;
        let socket = self.dir.join(name);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            if Instant::now() > deadline {
                return Err(format!(
                    "OVS did not create {} within 20 s:\n{}",
                    socket.display(),
                    self.log_tail(20)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(socket)
    }

    /// Adds an `afxdp` port on `iface` (of the namespace OVS runs in) in XDP mode `mode`
    /// (`native`, `generic`, `best-effort` …); fails with OVS's error when it has one.
    pub fn add_afxdp(&self, iface: &str, mode: &str) -> Result<(), String> {
        self.vsctl(&[
            "add-port",
            BRIDGE,
            iface,
            "--",
            "set",
            "Interface",
            iface,
            "type=afxdp",
            &format!("options:xdp-mode={mode}"),
        ])?;
        let error = self.vsctl(&["get", "Interface", iface, "error"])?;
        if error.trim() != "[]" {
            return Err(format!(
                "OVS's afxdp port on {iface}: {error}\n{}",
                self.log_tail(20)
            ));
        }
        Ok(())
    }

    /// Replaces the bridge's flow table with `flows` (`ovs-ofctl add-flow` syntax).
    pub fn set_flows(&self, flows: &[&str]) -> Result<(), String> {
        self.run(None, "ovs-ofctl", &["del-flows", BRIDGE])?;
        for flow in flows {
            self.run(None, "ovs-ofctl", &["add-flow", BRIDGE, flow])?;
        }
        Ok(())
    }

    /// `ovs-vsctl ARGS…` against this instance; its stdout.
    pub fn vsctl(&self, args: &[&str]) -> Result<String, String> {
        let db = format!("--db=unix:{}", self.path("db.sock"));
        let mut all = vec![db.as_str(), "--timeout=30"];
        all.extend_from_slice(args);
        self.run(None, "ovs-vsctl", &all)
    }

    /// `ovs-appctl ARGS…` against this instance's ovs-vswitchd; its stdout.
    pub fn appctl(&self, args: &[&str]) -> Result<String, String> {
        let target = self.path("ovs-vswitchd.ctl");
        let mut all = vec!["-t", target.as_str()];
        all.extend_from_slice(args);
        self.run(None, "ovs-appctl", &all)
    }

    /// A column of an Interface row (`link_state`, `status`, `error` …), as ovs-vsctl prints
    /// it.
    pub fn interface(&self, name: &str, column: &str) -> Result<String, String> {
        self.vsctl(&["get", "Interface", name, column])
            .map(|s| s.trim().to_owned())
    }

    /// Every port's live counters, by port name (OpenFlow port statistics: the database's
    /// copy is refreshed only every 5 s).
    pub fn port_counters(&self) -> Result<BTreeMap<String, OvsPortCounters>, String> {
        let out = self.run(None, "ovs-ofctl", &["--names", "dump-ports", BRIDGE])?;
        Ok(parse_dump_ports(&out))
    }

    /// ovs-vswitchd's pid.
    pub fn vswitchd_pid(&self) -> Option<i32> {
        read_pid(&self.dir.join("ovs-vswitchd.pid"))
    }

    /// The last `lines` lines of ovs-vswitchd's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.dir.join("ovs-vswitchd.log")).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// Runs `program ARGS…` with this instance's directories (inside `ns` when given).
    fn run(&self, ns: Option<&Netns>, program: &str, args: &[&str]) -> Result<String, String> {
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.path())).arg(program);
                c
            }
            None => Command::new(program),
        };
        for var in ["OVS_RUNDIR", "OVS_LOGDIR", "OVS_DBDIR", "OVS_SYSCONFDIR"] {
            cmd.env(var, &self.dir);
        }
        let out = cmd
            .args(args)
            .output()
            .map_err(|e| format!("{program}: {e} (apt-get install openvswitch-switch-dpdk)"))?;
        if !out.status.success() {
            return Err(format!(
                "{program} {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr),
                if program == VSWITCHD {
                    self.log_tail(20)
                } else {
                    String::new()
                }
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for OvsDpdk {
    fn drop(&mut self) {
        for name in ["ovs-vswitchd.pid", "ovsdb-server.pid"] {
            let Some(pid) = read_pid(&self.dir.join(name)) else {
                continue;
            };
            let pid = Pid::from_raw(pid);
            if kill(pid, Signal::SIGTERM).is_err() {
                continue;
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while kill(pid, None).is_ok() {
                if Instant::now() > deadline {
                    let _ = kill(pid, Signal::SIGKILL);
                    std::thread::sleep(Duration::from_millis(200));
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir_all(Path::new("/var/run/dpdk").join(&self.prefix));
    }
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The ports' counters in `ovs-ofctl --names dump-ports` output:
/// `port  vhu0: rx pkts=N, bytes=N, drop=N, errs=N, …` followed by
/// `tx pkts=N, bytes=N, drop=N, …` (`?` where the port keeps no such counter, read as 0).
pub fn parse_dump_ports(out: &str) -> BTreeMap<String, OvsPortCounters> {
    let mut ports = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in out.lines().map(str::trim) {
        let fields = if let Some(rest) = line.strip_prefix("port ") {
            let Some((name, fields)) = rest.split_once(':') else {
                continue;
            };
            let name = name.trim().trim_matches('"').to_owned();
            ports.insert(name.clone(), OvsPortCounters::default());
            current = Some(name);
            fields.trim()
        } else {
            line
        };
        let Some(port) = current.as_ref().and_then(|n| ports.get_mut(n)) else {
            continue;
        };
        let field = |key: &str| -> u64 {
            fields
                .split([',', ' '])
                .find_map(|w| w.strip_prefix(key))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        if fields.starts_with("rx pkts=") {
            port.rx_packets = field("pkts=");
            port.rx_dropped = field("drop=");
        } else if fields.starts_with("tx pkts=") {
            port.tx_packets = field("pkts=");
            port.tx_dropped = field("drop=");
        }
    }
    ports
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ports_from_dump_ports() {
        let out = "OFPST_PORT reply (xid=0x4): 3 ports
  port  vhu0: rx pkts=7, bytes=448, drop=0, errs=0, frame=?, over=?, crc=?
           tx pkts=120, bytes=7680, drop=3, errs=?, coll=?
           duration=12.345s
  port LOCAL: rx pkts=0, bytes=0, drop=0, errs=0, frame=0, over=0, crc=0
           tx pkts=0, bytes=0, drop=0, errs=0, coll=0
  port  \"xvh1\": rx pkts=2300000, bytes=147200000, drop=?, errs=?, frame=?, over=?, crc=?
           tx pkts=?, bytes=?, drop=?, errs=?, coll=?
";
        let ports = parse_dump_ports(out);
        assert_eq!(
            ports["vhu0"],
            OvsPortCounters {
                rx_packets: 7,
                rx_dropped: 0,
                tx_packets: 120,
                tx_dropped: 3
            }
        );
        assert_eq!(ports["LOCAL"], OvsPortCounters::default());
        assert_eq!(ports["xvh1"].rx_packets, 2_300_000);
        assert_eq!(ports["xvh1"].tx_packets, 0);
    }
}
