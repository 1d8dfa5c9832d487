//! How many rx queues an interface really uses, for one AF_XDP socket each.
//!
//! The ethtool channel counts (`ETHTOOL_GCHANNELS`: rx + combined) are what the driver has
//! enabled; a NIC often allocates more queues than it enables, and binding a socket to a
//! queue past the enabled ones fails. Drivers without channel support fall back to the
//! queue count rtnetlink reports.

use std::os::fd::AsRawFd;

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GCHANNELS: u32 = 0x3c;

/// `struct ethtool_channels`.
#[repr(C)]
#[derive(Default)]
struct EthtoolChannels {
    cmd: u32,
    max_rx: u32,
    max_tx: u32,
    max_other: u32,
    max_combined: u32,
    rx_count: u32,
    tx_count: u32,
    other_count: u32,
    combined_count: u32,
}

/// `struct ifreq` with the `ifr_data` member.
#[repr(C)]
struct IfreqData {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: *mut EthtoolChannels,
    _pad: [u8; 16],
}

/// The enabled rx queues (rx + combined channels) of `iface` per ethtool, in this thread's
/// network namespace; `None` when the driver does not report channels.
pub fn enabled_rx_queues(iface: &str) -> Option<u32> {
    if iface.len() >= libc::IFNAMSIZ {
        return None;
    }
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")
        .or_else(|_| std::net::UdpSocket::bind("[::]:0"))
        .ok()?;
    let mut channels = EthtoolChannels {
        cmd: ETHTOOL_GCHANNELS,
        ..EthtoolChannels::default()
    };
    let mut req = IfreqData {
        name: [0; libc::IFNAMSIZ],
        data: &raw mut channels,
        _pad: [0; 16],
    };
    for (dst, src) in req.name.iter_mut().zip(iface.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: SIOCETHTOOL with ETHTOOL_GCHANNELS reads the name from `req` and writes one
    // `struct ethtool_channels` through `req.data`, which points at `channels`; both live
    // until the call returns.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL, &raw mut req) };
    let count = channels.rx_count + channels.combined_count;
    (rc == 0 && count > 0).then_some(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_unknown_interfaces_report_nothing() {
        // lo has no channels; the name is too long or unknown: no panic, no count.
        assert_eq!(enabled_rx_queues("lo"), None);
        assert_eq!(enabled_rx_queues("xvio-no-such-if"), None);
        assert_eq!(enabled_rx_queues("an-interface-name-far-too-long"), None);
    }
}
