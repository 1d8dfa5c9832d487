//! The XDP attachment of an interface as rtnetlink reports it, the legacy (netlink) detach
//! that `--replace` needs for programs not attached through a BPF link, and the channel
//! counts ethtool's generic netlink family reports (`ethtool -l`).
//!
//! Messages are built and parsed by hand as bytes (no unsafe): an `RTM_GETLINK` for one
//! ifindex, answered by `RTM_NEWLINK` whose `IFLA_XDP` nest carries the attach mode and the
//! program id; an `RTM_SETLINK` with `IFLA_XDP_FD = -1` detaches; `CTRL_CMD_GETFAMILY`
//! resolves the `ethtool` family, whose `ETHTOOL_MSG_CHANNELS_GET` returns the channels.

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
const GENL_HDRLEN: usize = 4;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const ETHTOOL_GENL_NAME: &[u8] = b"ethtool\0";
const ETHTOOL_GENL_VERSION: u8 = 1;
const ETHTOOL_MSG_CHANNELS_GET: u8 = 17;
const ETHTOOL_A_CHANNELS_HEADER: u16 = 1;
const ETHTOOL_A_HEADER_DEV_INDEX: u16 = 1;
const ETHTOOL_A_CHANNELS_RX_COUNT: u16 = 6;
const ETHTOOL_A_CHANNELS_TX_COUNT: u16 = 7;
const ETHTOOL_A_CHANNELS_OTHER_COUNT: u16 = 8;
const ETHTOOL_A_CHANNELS_COMBINED_COUNT: u16 = 9;

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
    let sock = open(SockProtocol::NetlinkRoute)?;
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
    let sock = open(SockProtocol::NetlinkRoute)?;
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

/// The channels of an interface as `ethtool -l` shows them: its enabled queues are `rx +
/// combined` for receive and `tx + combined` for transmit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Channels {
    /// Channels with only an rx queue.
    pub rx: u32,
    /// Channels with only a tx queue.
    pub tx: u32,
    /// Other channels (link interrupts and the like).
    pub other: u32,
    /// Channels with an rx and a tx queue.
    pub combined: u32,
}

/// The channel counts of `ifindex` (in this thread's network namespace) through ethtool's
/// netlink family; `None` when the driver does not report channels (`EOPNOTSUPP`).
pub fn channels(ifindex: u32) -> Result<Option<Channels>, NetlinkError> {
    let sock = open(SockProtocol::NetlinkGeneric)?;
    let family = ethtool_family(&sock)?;
    let mut msg = genl_header(family, ETHTOOL_MSG_CHANNELS_GET, ETHTOOL_GENL_VERSION);
    let mut nest = Vec::with_capacity(8);
    push_attr(
        &mut nest,
        ETHTOOL_A_HEADER_DEV_INDEX,
        &ifindex.to_ne_bytes(),
    );
    push_attr(&mut msg, ETHTOOL_A_CHANNELS_HEADER | NLA_F_NESTED, &nest);
    finish(&mut msg);
    let mut buf = vec![0u8; 8192];
    match genl_request(&sock, &msg, family, &mut buf) {
        Ok(attrs) => parse_channels(attrs).map(Some),
        Err(NetlinkError::Kernel(e)) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The id of the `ethtool` generic netlink family.
fn ethtool_family(sock: &OwnedFd) -> Result<u16, NetlinkError> {
    let mut msg = genl_header(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1);
    push_attr(&mut msg, CTRL_ATTR_FAMILY_NAME, ETHTOOL_GENL_NAME);
    finish(&mut msg);
    let mut buf = vec![0u8; 8192];
    let attrs = genl_request(sock, &msg, GENL_ID_CTRL, &mut buf)?;
    let (_, id) = attributes(attrs)?
        .into_iter()
        .find(|(k, _)| *k == CTRL_ATTR_FAMILY_ID)
        .ok_or(NetlinkError::Malformed)?;
    u16_at(id, 0)
}

/// Sends one generic netlink request and returns the attributes of the answer of type
/// `family` (or the kernel's error).
fn genl_request<'a>(
    sock: &OwnedFd,
    msg: &[u8],
    family: u16,
    buf: &'a mut [u8],
) -> Result<&'a [u8], NetlinkError> {
    send(sock.as_raw_fd(), msg, MsgFlags::empty()).map_err(NetlinkError::Io)?;
    let n = recv(sock.as_raw_fd(), buf, MsgFlags::empty()).map_err(NetlinkError::Io)?;
    let buf = &buf[..n];
    for (kind, payload) in messages(buf)? {
        match kind {
            NLMSG_ERROR => kernel_result(payload)?,
            k if k == family => return payload.get(GENL_HDRLEN..).ok_or(NetlinkError::Malformed),
            _ => {}
        }
    }
    Err(NetlinkError::Malformed)
}

fn parse_channels(attrs: &[u8]) -> Result<Channels, NetlinkError> {
    let mut channels = Channels::default();
    for (kind, payload) in attributes(attrs)? {
        let slot = match kind {
            ETHTOOL_A_CHANNELS_RX_COUNT => &mut channels.rx,
            ETHTOOL_A_CHANNELS_TX_COUNT => &mut channels.tx,
            ETHTOOL_A_CHANNELS_OTHER_COUNT => &mut channels.other,
            ETHTOOL_A_CHANNELS_COMBINED_COUNT => &mut channels.combined,
            _ => continue,
        };
        *slot = u32_at(payload, 0)?;
    }
    Ok(channels)
}

fn open(protocol: SockProtocol) -> Result<OwnedFd, NetlinkError> {
    let sock = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        protocol,
    )
    .map_err(NetlinkError::Socket)?;
    bind(sock.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(NetlinkError::Socket)?;
    Ok(sock)
}

/// A netlink header (length patched by `finish`) and a `genlmsghdr`.
fn genl_header(family: u16, cmd: u8, version: u8) -> Vec<u8> {
    let mut msg = Vec::with_capacity(64);
    msg.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len
    msg.extend_from_slice(&family.to_ne_bytes());
    msg.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel fills it
    msg.extend_from_slice(&[cmd, version, 0, 0]);
    msg
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
    fn parses_channels_and_refuses_truncated_ones() {
        let mut attrs = Vec::new();
        push_attr(&mut attrs, ETHTOOL_A_CHANNELS_HEADER | NLA_F_NESTED, &[]);
        push_attr(&mut attrs, 2, &8u32.to_ne_bytes()); // RX_MAX, skipped
        push_attr(&mut attrs, ETHTOOL_A_CHANNELS_RX_COUNT, &1u32.to_ne_bytes());
        push_attr(&mut attrs, ETHTOOL_A_CHANNELS_TX_COUNT, &2u32.to_ne_bytes());
        push_attr(
            &mut attrs,
            ETHTOOL_A_CHANNELS_COMBINED_COUNT,
            &3u32.to_ne_bytes(),
        );
        assert_eq!(
            parse_channels(&attrs).unwrap(),
            Channels {
                rx: 1,
                tx: 2,
                other: 0,
                combined: 3
            }
        );
        let mut short = Vec::new();
        push_attr(&mut short, ETHTOOL_A_CHANNELS_RX_COUNT, &[1, 0]);
        assert!(parse_channels(&short).is_err());
        for cut in 0..attrs.len() {
            let _ = parse_channels(&attrs[..cut]);
        }
    }

    #[test]
    fn loopback_has_no_channels() {
        // Reading channels needs no privilege; lo's driver reports none.
        let lo = nix::net::if_::if_nametoindex("lo").unwrap();
        assert_eq!(channels(lo).unwrap(), None);
    }

    #[test]
    fn queries_loopback() {
        // rtnetlink GETLINK needs no privilege; lo exists in every namespace.
        let lo = nix::net::if_::if_nametoindex("lo").unwrap();
        assert_eq!(xdp_attachment(lo).unwrap(), None);
        assert!(link_info(lo).unwrap().rx_queues >= 1);
    }
}
