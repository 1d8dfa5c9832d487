//! The XDP attachment of an interface as rtnetlink reports it, and the legacy (netlink)
//! detach that `--replace` needs for programs not attached through a BPF link.
//!
//! Messages are built and parsed by hand as bytes (no unsafe): an `RTM_GETLINK` for one
//! ifindex, answered by `RTM_NEWLINK` whose `IFLA_XDP` nest carries the attach mode and the
//! program id; an `RTM_SETLINK` with `IFLA_XDP_FD = -1` detaches.

use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
    socket,
};
use thiserror::Error;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_SETLINK: u16 = 19;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const IFLA_XDP: u16 = 43;
const IFLA_NUM_RX_QUEUES: u16 = 32;
const NLA_F_NESTED: u16 = 1 << 15;
const IFLA_XDP_FD: u16 = 1;
const IFLA_XDP_ATTACHED: u16 = 2;
const IFLA_XDP_FLAGS: u16 = 3;
const IFLA_XDP_PROG_ID: u16 = 4;
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
const XDP_FLAGS_HW_MODE: u32 = 1 << 3;
const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;

/// Errors of the netlink queries.
#[derive(Debug, Error)]
pub enum NetlinkError {
    /// The netlink socket could not be opened or bound.
    #[error("opening a rtnetlink socket")]
    Socket(#[source] nix::Error),
    /// Sending or receiving failed.
    #[error("talking to rtnetlink")]
    Io(#[source] nix::Error),
    /// The kernel answered with an error.
    #[error("rtnetlink refused the request")]
    Kernel(#[source] std::io::Error),
    /// The answer could not be parsed.
    #[error("rtnetlink answered with a message xvio cannot parse")]
    Malformed,
}

/// How an XDP program is attached to an interface, as `IFLA_XDP_ATTACHED` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachedMode {
    /// In the driver.
    Native,
    /// In the generic (skb) path.
    Generic,
    /// Offloaded to the NIC.
    Offloaded,
    /// Several programs in several modes.
    Multiple,
}

impl AttachedMode {
    /// A word for messages.
    pub fn describe(self) -> &'static str {
        match self {
            AttachedMode::Native => "native",
            AttachedMode::Generic => "generic",
            AttachedMode::Offloaded => "offloaded",
            AttachedMode::Multiple => "several",
        }
    }

    fn detach_flags(self) -> u32 {
        match self {
            AttachedMode::Native => XDP_FLAGS_DRV_MODE,
            AttachedMode::Generic => XDP_FLAGS_SKB_MODE,
            AttachedMode::Offloaded => XDP_FLAGS_HW_MODE,
            AttachedMode::Multiple => 0,
        }
    }
}

/// An XDP program attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XdpAttachment {
    /// Its mode.
    pub mode: AttachedMode,
    /// The kernel's program id (0 when several are attached).
    pub prog_id: u32,
}

/// What rtnetlink says of one interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    /// The XDP program attached, if any.
    pub xdp: Option<XdpAttachment>,
    /// Its rx queues (`IFLA_NUM_RX_QUEUES`; 1 when not reported).
    pub rx_queues: u32,
}

/// Which XDP program, if any, is attached to `ifindex`.
pub fn xdp_attachment(ifindex: u32) -> Result<Option<XdpAttachment>, NetlinkError> {
    link_info(ifindex).map(|info| info.xdp)
}

/// The XDP attachment and rx queue count of `ifindex`.
pub fn link_info(ifindex: u32) -> Result<LinkInfo, NetlinkError> {
    let sock = open()?;
    let mut msg = header(RTM_GETLINK, NLM_F_REQUEST, ifindex);
    finish(&mut msg);
    send(sock.as_raw_fd(), &msg, MsgFlags::empty()).map_err(NetlinkError::Io)?;
    let mut buf = vec![0u8; 64 * 1024];
    let n = recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(NetlinkError::Io)?;
    for (kind, payload) in messages(&buf[..n])? {
        match kind {
            NLMSG_ERROR => kernel_result(payload)?,
            RTM_NEWLINK => {
                let attrs = payload
                    .get(IFINFOMSG_LEN..)
                    .ok_or(NetlinkError::Malformed)?;
                return parse_link(attrs);
            }
            NLMSG_DONE => break,
            _ => {}
        }
    }
    Err(NetlinkError::Malformed)
}

/// Detaches a program that was attached through netlink in `mode` (not one held by a BPF
/// link: the kernel refuses that with `EBUSY`).
pub fn detach_xdp(ifindex: u32, mode: AttachedMode) -> Result<(), NetlinkError> {
    let sock = open()?;
    let mut msg = header(RTM_SETLINK, NLM_F_REQUEST | NLM_F_ACK, ifindex);
    let nest = msg.len();
    push_attr(&mut msg, IFLA_XDP | NLA_F_NESTED, &[]);
    push_attr(&mut msg, IFLA_XDP_FD, &(-1i32).to_ne_bytes());
    push_attr(&mut msg, IFLA_XDP_FLAGS, &mode.detach_flags().to_ne_bytes());
    let nest_len = u16::try_from(msg.len() - nest).map_err(|_| NetlinkError::Malformed)?;
    msg[nest..nest + 2].copy_from_slice(&nest_len.to_ne_bytes());
    finish(&mut msg);
    send(sock.as_raw_fd(), &msg, MsgFlags::empty()).map_err(NetlinkError::Io)?;
    let mut buf = vec![0u8; 8192];
    let n = recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(NetlinkError::Io)?;
    for (kind, payload) in messages(&buf[..n])? {
        if kind == NLMSG_ERROR {
            return kernel_result(payload);
        }
    }
    Err(NetlinkError::Malformed)
}

fn open() -> Result<OwnedFd, NetlinkError> {
    let sock = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )
    .map_err(NetlinkError::Socket)?;
    bind(sock.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(NetlinkError::Socket)?;
    Ok(sock)
}

/// A netlink header (length patched by `finish`) and an `ifinfomsg` for `ifindex`.
fn header(kind: u16, flags: u16, ifindex: u32) -> Vec<u8> {
    let mut msg = Vec::with_capacity(64);
    msg.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel fills it
    msg.extend_from_slice(&[0u8; 4]); // ifi_family AF_UNSPEC, pad, ifi_type
    msg.extend_from_slice(&ifindex.to_ne_bytes());
    msg.extend_from_slice(&[0u8; 8]); // ifi_flags, ifi_change
    msg
}

fn finish(msg: &mut [u8]) {
    let len = u32::try_from(msg.len()).unwrap_or(u32::MAX);
    msg[..4].copy_from_slice(&len.to_ne_bytes());
}

fn push_attr(msg: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = u16::try_from(4 + payload.len()).unwrap_or(u16::MAX);
    msg.extend_from_slice(&len.to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(payload);
    msg.resize(msg.len().next_multiple_of(4), 0);
}

/// The (type, payload) of each netlink message in `buf`.
fn messages(mut buf: &[u8]) -> Result<Vec<(u16, &[u8])>, NetlinkError> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32_at(buf, 0)? as usize;
        let kind = u16_at(buf, 4)?;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(NetlinkError::Malformed);
        }
        out.push((kind, &buf[NLMSG_HDRLEN..len]));
        buf = buf.get(len.next_multiple_of(4)..).unwrap_or(&[]);
    }
    Ok(out)
}

/// The (type, payload) of each attribute in `buf`.
fn attributes(mut buf: &[u8]) -> Result<Vec<(u16, &[u8])>, NetlinkError> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = usize::from(u16_at(buf, 0)?);
        let kind = u16_at(buf, 2)? & !NLA_F_NESTED;
        if len < 4 || len > buf.len() {
            return Err(NetlinkError::Malformed);
        }
        out.push((kind, &buf[4..len]));
        buf = buf.get(len.next_multiple_of(4)..).unwrap_or(&[]);
    }
    Ok(out)
}

fn parse_link(attrs: &[u8]) -> Result<LinkInfo, NetlinkError> {
    let attrs = attributes(attrs)?;
    let rx_queues = match attrs.iter().find(|(k, _)| *k == IFLA_NUM_RX_QUEUES) {
        Some((_, payload)) => u32_at(payload, 0)?.max(1),
        None => 1,
    };
    let xdp = match attrs.iter().find(|(k, _)| *k == IFLA_XDP) {
        Some((_, xdp)) => parse_xdp(xdp)?,
        None => None,
    };
    Ok(LinkInfo { xdp, rx_queues })
}

fn parse_xdp(xdp: &[u8]) -> Result<Option<XdpAttachment>, NetlinkError> {
    let mut mode = None;
    let mut prog_id = 0;
    for (kind, payload) in attributes(xdp)? {
        match kind {
            IFLA_XDP_ATTACHED => {
                mode = match payload.first().copied().ok_or(NetlinkError::Malformed)? {
                    0 => None,
                    1 => Some(AttachedMode::Native),
                    2 => Some(AttachedMode::Generic),
                    3 => Some(AttachedMode::Offloaded),
                    _ => Some(AttachedMode::Multiple),
                }
            }
            IFLA_XDP_PROG_ID => prog_id = u32_at(payload, 0)?,
            _ => {}
        }
    }
    Ok(mode.map(|mode| XdpAttachment { mode, prog_id }))
}

fn kernel_result(payload: &[u8]) -> Result<(), NetlinkError> {
    match i32::from_ne_bytes(
        payload
            .get(..4)
            .ok_or(NetlinkError::Malformed)?
            .try_into()
            .map_err(|_| NetlinkError::Malformed)?,
    ) {
        0 => Ok(()),
        code => Err(NetlinkError::Kernel(std::io::Error::from_raw_os_error(
            -code,
        ))),
    }
}

fn u16_at(buf: &[u8], at: usize) -> Result<u16, NetlinkError> {
    let bytes = buf.get(at..at + 2).ok_or(NetlinkError::Malformed)?;
    Ok(u16::from_ne_bytes([bytes[0], bytes[1]]))
}

fn u32_at(buf: &[u8], at: usize) -> Result<u32, NetlinkError> {
    let bytes = buf.get(at..at + 4).ok_or(NetlinkError::Malformed)?;
    Ok(u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_an_xdp_nest() {
        let mut nest = Vec::new();
        push_attr(&mut nest, IFLA_XDP_ATTACHED, &[2]);
        push_attr(&mut nest, IFLA_XDP_PROG_ID, &77u32.to_ne_bytes());
        let mut attrs = Vec::new();
        push_attr(&mut attrs, 3, b"eth0\0"); // IFLA_IFNAME, skipped
        push_attr(&mut attrs, IFLA_XDP | NLA_F_NESTED, &nest);
        push_attr(&mut attrs, IFLA_NUM_RX_QUEUES, &4u32.to_ne_bytes());
        let info = parse_link(&attrs).unwrap();
        assert_eq!(
            info.xdp,
            Some(XdpAttachment {
                mode: AttachedMode::Generic,
                prog_id: 77
            })
        );
        assert_eq!(info.rx_queues, 4);
    }

    #[test]
    fn no_program_attached() {
        let mut nest = Vec::new();
        push_attr(&mut nest, IFLA_XDP_ATTACHED, &[0]);
        let mut attrs = Vec::new();
        push_attr(&mut attrs, IFLA_XDP, &nest);
        assert_eq!(
            parse_link(&attrs).unwrap(),
            LinkInfo {
                xdp: None,
                rx_queues: 1
            }
        );
        assert_eq!(
            parse_link(&[]).unwrap(),
            LinkInfo {
                xdp: None,
                rx_queues: 1
            }
        );
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let mut attrs = Vec::new();
        push_attr(&mut attrs, IFLA_XDP, &[9, 0, 4, 0, 1]);
        for cut in 0..attrs.len() {
            let _ = parse_link(&attrs[..cut]);
        }
        assert!(messages(&[40, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn queries_loopback() {
        // rtnetlink GETLINK needs no privilege; lo exists in every namespace.
        let lo = nix::net::if_::if_nametoindex("lo").unwrap();
        assert_eq!(xdp_attachment(lo).unwrap(), None);
        assert!(link_info(lo).unwrap().rx_queues >= 1);
    }
}
