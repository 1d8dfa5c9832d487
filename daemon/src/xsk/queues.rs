//! Which queues of an interface take an AF_XDP socket, one socket each.
//!
//! A NIC often allocates more queues than it enables (a veth made without `numrxqueues`
//! allocates one per CPU and enables one), and binding a socket past the enabled ones fails
//! with `EINVAL`. The enabled queues are the ethtool channels (`ethtool -l`: rx + combined
//! for receive, tx + combined for transmit); a socket has an rx and a tx ring, so its queue
//! must be below both. Only drivers that report no channels fall back to the queue count
//! rtnetlink reports (`IFLA_NUM_RX_QUEUES`, the allocated ones).

use tracing::{info, warn};

use super::XskError;
use crate::netlink::{self, Channels, NetlinkError};

/// Where a queue count came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueSource {
    /// The driver's enabled channels.
    Channels(Channels),
    /// The allocated rx queues (the driver reports no channels, or ethtool's netlink family
    /// could not be asked).
    Allocated,
}

/// The queues of an interface that take an AF_XDP socket: `0..count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XskQueues {
    /// How many (queue ids `0..count`).
    pub count: u32,
    /// The enabled rx queues; more than `count` when the driver enables fewer tx queues,
    /// in which case frames on the rest have no socket and pass to the kernel.
    pub rx_queues: u32,
    /// Where the count came from.
    pub source: QueueSource,
}

impl XskQueues {
    /// The queues of `ifindex` (in this thread's network namespace) per its channels, or per
    /// rtnetlink's allocated count when the driver reports none. Also returns the error of
    /// asking ethtool, when that failed and the fallback was used.
    pub fn of(ifindex: u32) -> Result<(XskQueues, Option<NetlinkError>), NetlinkError> {
        let unknown = match netlink::channels(ifindex) {
            Ok(Some(channels)) => {
                if let Some(queues) = XskQueues::from_channels(channels) {
                    return Ok((queues, None));
                }
                None
            }
            Ok(None) => None,
            Err(e) => Some(e),
        };
        let allocated = netlink::link_info(ifindex)?.rx_queues;
        let queues = XskQueues {
            count: allocated,
            rx_queues: allocated,
            source: QueueSource::Allocated,
        };
        Ok((queues, unknown))
    }

    /// The queues per `channels`; `None` when they show no rx or no tx queue (a driver that
    /// fills in nothing).
    pub fn from_channels(channels: Channels) -> Option<XskQueues> {
        let rx_queues = channels.rx + channels.combined;
        let tx_queues = channels.tx + channels.combined;
        (rx_queues > 0 && tx_queues > 0).then_some(XskQueues {
            count: rx_queues.min(tx_queues),
            rx_queues,
            source: QueueSource::Channels(channels),
        })
    }
}

/// How many queues of `iface` (`ifindex`) take an AF_XDP socket, logging how that was learned
/// (and, when the driver enables fewer tx than rx queues, which rx queues get no socket).
pub fn for_iface(iface: &str, ifindex: u32) -> Result<u32, XskError> {
    let (queues, ethtool_error) = XskQueues::of(ifindex).map_err(|source| XskError::Queues {
        iface: iface.to_owned(),
        source,
    })?;
    match queues.source {
        QueueSource::Channels(ch) => info!(
            iface,
            queues = queues.count,
            combined = ch.combined,
            rx = ch.rx,
            tx = ch.tx,
            "AF_XDP sockets: one per enabled queue (ethtool channels)"
        ),
        QueueSource::Allocated => match ethtool_error {
            Some(e) => warn!(
                iface,
                queues = queues.count,
                error = %e,
                "could not ask ethtool for the enabled queues; one AF_XDP socket per allocated rx queue"
            ),
            None => info!(
                iface,
                queues = queues.count,
                "the driver reports no channels; one AF_XDP socket per allocated rx queue"
            ),
        },
    }
    if queues.rx_queues > queues.count {
        warn!(
            iface,
            rx_queues = queues.rx_queues,
            tx_queues = queues.count,
            "fewer tx than rx queues are enabled: frames steered on rx queues {} and up have no AF_XDP socket and pass to the kernel",
            queues.count
        );
    }
    Ok(queues.count)
}

/// Why `queue` of `iface` (`ifindex`) cannot take a socket, when its channels say it is not
/// enabled; `None` when it is, or when the driver does not say.
pub fn not_enabled(iface: &str, ifindex: u32, queue: u32) -> Option<String> {
    let channels = netlink::channels(ifindex).ok()??;
    let queues = XskQueues::from_channels(channels)?;
    (queue >= queues.count).then(|| describe_not_enabled(iface, queue, channels, queues.count))
}

fn describe_not_enabled(iface: &str, queue: u32, channels: Channels, count: u32) -> String {
    let usable = match count {
        1 => "only queue 0 takes an AF_XDP socket".to_owned(),
        n => format!("queues 0 to {} take AF_XDP sockets", n - 1),
    };
    format!(
        "queue {queue} is not enabled on {iface}: `ethtool -l {iface}` shows {} combined, {} rx \
         and {} tx channels, so {usable}",
        channels.combined, channels.rx, channels.tx
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_needs_both_an_rx_and_a_tx_queue() {
        let veth = Channels {
            rx: 1,
            tx: 1,
            ..Channels::default()
        };
        assert_eq!(XskQueues::from_channels(veth).map(|q| q.count), Some(1));
        let nic = Channels {
            combined: 8,
            rx: 2,
            ..Channels::default()
        };
        let q = XskQueues::from_channels(nic).unwrap();
        assert_eq!(
            (q.count, q.rx_queues),
            (8, 10),
            "rx-only channels have no tx queue"
        );
        assert_eq!(XskQueues::from_channels(Channels::default()), None);
        let rx_only = Channels {
            rx: 4,
            ..Channels::default()
        };
        assert_eq!(XskQueues::from_channels(rx_only), None);
    }

    #[test]
    fn the_hint_names_the_queue_the_interface_and_the_channels() {
        let veth = Channels {
            rx: 1,
            tx: 1,
            ..Channels::default()
        };
        assert_eq!(
            describe_not_enabled("xvh0", 1, veth, 1),
            "queue 1 is not enabled on xvh0: `ethtool -l xvh0` shows 0 combined, 1 rx and 1 tx \
             channels, so only queue 0 takes an AF_XDP socket"
        );
        let nic = Channels {
            combined: 4,
            ..Channels::default()
        };
        assert!(
            describe_not_enabled("eth0", 7, nic, 4).ends_with("queues 0 to 3 take AF_XDP sockets")
        );
    }

    #[test]
    fn loopback_falls_back_to_its_allocated_queues() {
        let lo = nix::net::if_::if_nametoindex("lo").unwrap();
        let (queues, error) = XskQueues::of(lo).unwrap();
        assert_eq!(queues.source, QueueSource::Allocated);
        assert!(queues.count >= 1);
        assert!(error.is_none(), "{error:?}");
        assert_eq!(not_enabled("lo", lo, 5), None, "lo reports no channels");
    }
}
