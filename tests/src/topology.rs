//! The usual test topology: xvio's interface in one namespace, the traffic source in another.

use std::path::{Path, PathBuf};

use xvio_common::maps;

use crate::{
    daemon::Daemon,
    netns::{Netns, default_veth, veth},
    unique_name,
};

/// Two namespaces: `host` (where xvio attaches to `ifname`) and `peer` (the sender).
#[derive(Debug)]
pub struct Topology {
    /// Where xvio runs.
    pub host: Netns,
    /// Where the traffic comes from.
    pub peer: Netns,
    /// The veth end in `host`.
    pub ifname: String,
    /// The veth end in `peer`.
    pub peer_if: String,
}

impl Topology {
    /// Two fresh namespaces joined by a veth pair with `queues` queues (10.252.0.1 ↔ .2).
    pub fn new(queues: u32) -> Topology {
        Topology::make(Some(queues))
    }

    /// Like [`Topology::new`], with the veth pair made as a user makes one, without queue
    /// counts: one queue enabled, as many allocated as the machine has CPUs.
    pub fn untuned() -> Topology {
        Topology::make(None)
    }

    fn make(queues: Option<u32>) -> Topology {
        let host = Netns::new("h");
        let peer = Netns::new("q");
        // No IPv6: its neighbour and router messages would be frames no test sent.
        for ns in [&host, &peer] {
            crate::netns::run(
                "nsenter",
                &[
                    &format!("--net={}", ns.path()),
                    "sysctl",
                    "-qw",
                    "net.ipv6.conf.all.disable_ipv6=1",
                    "net.ipv6.conf.default.disable_ipv6=1",
                ],
            );
        }
        let ifname = unique_name("xvh");
        let peer_if = unique_name("xvq");
        let (a, b) = (
            (&host, ifname.as_str(), "10.252.0.1/24"),
            (&peer, peer_if.as_str(), "10.252.0.2/24"),
        );
        match queues {
            Some(q) => veth(a.0, a.1, a.2, b.0, b.1, b.2, q),
            None => default_veth(a.0, a.1, a.2, b.0, b.1, b.2),
        }
        Topology {
            host,
            peer,
            ifname,
            peer_if,
        }
    }

    /// Where xvio pins the maps of `ifname`.
    pub fn pin_dir(&self) -> PathBuf {
        Path::new(xvio_common::PIN_ROOT).join(&self.ifname)
    }

    /// Starts `xvio run --iface IFNAME EXTRA…` in `host` and waits for its pins.
    pub fn start(&self, extra: &[&str]) -> Daemon {
        let mut args = vec!["--iface", &self.ifname];
        args.extend_from_slice(extra);
        Daemon::start(
            Some(&self.host),
            &args,
            &self.pin_dir().join(maps::EVENT_STATE),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }
}
