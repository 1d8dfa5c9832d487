//! Broadcast and multicast frames from the wire, for the guests. The XDP program passes group
//! frames to the kernel (the host needs ARP, ND, DHCP), and XDP cannot both pass a frame and
//! redirect it; so an AF_PACKET socket on the interface, with a classic BPF filter that keeps
//! only incoming frames whose destination has the group bit set, gets a copy of each, and a
//! thread hands them on. Unicast frames redirected by XDP never reach the socket, so nothing is
//! delivered twice; group rates are low and the kernel builds an skb for them anyway.
//!
//! The kernel takes a received 802.1Q tag out of the frame before a packet socket sees it
//! (into the skb's metadata, as a NIC's VLAN offload does), so the socket asks for
//! `PACKET_AUXDATA` and the tap puts the tag back where it was: each frame is handed on as
//! the wire carried it, and the datapath reads its VLAN as the XDP program does.
//!
//! The socket and the filter need raw `libc` calls: their `unsafe` stays in this file.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
};

/// Longest frame read (a 9000-byte MTU with an Ethernet header and a VLAN tag).
const MAX_FRAME: usize = 9018;
/// Bytes of an 802.1Q tag.
const TAG_LEN: usize = 4;
/// Bytes of the two MACs, before a tag.
const MACS: usize = 12;
/// How long a blocked read waits before looking at the stop flag.
const READ_TIMEOUT_MS: i64 = 200;

/// A running tap.
#[derive(Debug)]
pub struct GroupTap {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Frames the kernel dropped at the socket (its receive queue was full), summed.
    kernel_drops: Arc<AtomicU64>,
}

impl GroupTap {
    /// Opens the socket on `ifname` (in this thread's namespace) and starts a thread that
    /// calls `deliver` with every broadcast or multicast frame the interface receives.
    pub fn start(
        ifname: &str,
        deliver: impl FnMut(&[u8]) + Send + 'static,
    ) -> io::Result<GroupTap> {
        let socket = open(ifname)?;
        let stop = Arc::new(AtomicBool::new(false));
        let kernel_drops = Arc::new(AtomicU64::new(0));
        let (flag, drops) = (Arc::clone(&stop), Arc::clone(&kernel_drops));
        let thread = std::thread::Builder::new()
            .name(format!("xvio-tap-{ifname}"))
            .spawn(move || run(&socket, &flag, &drops, deliver))?;
        Ok(GroupTap {
            stop,
            thread: Some(thread),
            kernel_drops,
        })
    }

    /// Frames the kernel dropped at the tap's socket so far (read about once a second).
    pub fn kernel_drops(&self) -> u64 {
        self.kernel_drops.load(Ordering::Relaxed)
    }
}

impl Drop for GroupTap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(socket: &OwnedFd, stop: &AtomicBool, drops: &AtomicU64, mut deliver: impl FnMut(&[u8])) {
    // The frame is read 4 bytes in: room for its tag, if the kernel took one out.
    let mut buf = vec![0u8; MAX_FRAME];
    let mut last_stats = std::time::Instant::now();
    while !stop.load(Ordering::Acquire) {
        if let Some((n, tag)) = receive(socket, &mut buf[TAG_LEN..]) {
            deliver(with_tag(&mut buf, n, tag));
        }
        if last_stats.elapsed() >= STATS_EVERY {
            last_stats = std::time::Instant::now();
            drops.fetch_add(take_drops(socket), Ordering::Relaxed);
        }
    }
}

/// How often the socket's drop count is read.
const STATS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The frames the kernel dropped at `socket` since the last call (`PACKET_STATISTICS`
/// resets the counts it reports); 0 if it cannot be read.
fn take_drops(socket: &OwnedFd) -> u64 {
    // SAFETY: tpacket_stats is plain old data; all-zero is a valid value.
    let mut stats: libc::tpacket_stats = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tpacket_stats>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `stats`, a live value of that size.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_STATISTICS,
            (&raw mut stats).cast(),
            &raw mut len,
        )
    };
    if rc < 0 {
        return 0;
    }
    u64::from(stats.tp_drops)
}

/// An 802.1Q tag as `PACKET_AUXDATA` reports it: (TPID, TCI).
type Tag = (u16, u16);

/// Receives one frame into `buf`: its length, and the tag the kernel took out of it.
fn receive(socket: &OwnedFd, buf: &mut [u8]) -> Option<(usize, Option<Tag>)> {
    // Room for one `tpacket_auxdata` control message, aligned for `cmsghdr`.
    let mut control = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain old data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: `msg` points at `iov` (which describes `buf`) and at `control`, all live and
    // of the lengths given; recvmsg writes within them.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &raw mut msg, 0) };
    if n <= 0 {
        return None;
    }
    let mut tag = None;
    // SAFETY: the CMSG_* macros walk the control buffer recvmsg filled, within
    // `msg_controllen`; a header is read only where CMSG_FIRSTHDR/NXTHDR say one is, and the
    // auxdata only when its level, type and length say it is there (read unaligned).
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        while !cmsg.is_null() {
            let header = &*cmsg;
            let wanted = libc::CMSG_LEN(std::mem::size_of::<libc::tpacket_auxdata>() as u32);
            if header.cmsg_level == libc::SOL_PACKET
                && header.cmsg_type == libc::PACKET_AUXDATA
                && header.cmsg_len >= wanted as usize
            {
                let aux: libc::tpacket_auxdata =
                    std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                tag = tag_of(&aux);
            }
            cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
        }
    }
    Some((n as usize, tag))
}

/// The tag the kernel took out of a frame, from its auxdata.
fn tag_of(aux: &libc::tpacket_auxdata) -> Option<Tag> {
    if aux.tp_status & libc::TP_STATUS_VLAN_VALID == 0 {
        return None;
    }
    let tpid = if aux.tp_status & libc::TP_STATUS_VLAN_TPID_VALID != 0 {
        aux.tp_vlan_tpid
    } else {
        libc::ETH_P_8021Q as u16
    };
    Some((tpid, aux.tp_vlan_tci))
}

/// The frame of `n` bytes read at `buf[TAG_LEN..]`, with `tag` put back after its MACs (it
/// then starts at `buf[0]`); as read without a tag, or when too short to have held one.
fn with_tag(buf: &mut [u8], n: usize, tag: Option<Tag>) -> &[u8] {
    let end = TAG_LEN.saturating_add(n).min(buf.len());
    match tag {
        Some((tpid, tci)) if end >= TAG_LEN + MACS => {
            buf.copy_within(TAG_LEN..TAG_LEN + MACS, 0);
            buf[MACS..MACS + 2].copy_from_slice(&tpid.to_be_bytes());
            buf[MACS + 2..MACS + TAG_LEN].copy_from_slice(&tci.to_be_bytes());
            &buf[..end]
        }
        _ => &buf[TAG_LEN.min(end)..end],
    }
}

/// The classic BPF program: accept (whole frame) if the packet came in (not outgoing) and the
/// first byte of the destination MAC has the group bit; else drop.
fn filter() -> [libc::sock_filter; 6] {
    const SKF_AD_OFF: i32 = -0x1000;
    const SKF_AD_PKTTYPE: i32 = 4;
    let stmt = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |code: u32, k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    [
        // A = packet type (PACKET_HOST, _BROADCAST, _MULTICAST, _OTHERHOST, _OUTGOING = 4)
        stmt(
            libc::BPF_LD | libc::BPF_B | libc::BPF_ABS,
            (SKF_AD_OFF + SKF_AD_PKTTYPE) as u32,
        ),
        jump(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, 4, 3, 0),
        // A = first byte of the destination MAC
        stmt(libc::BPF_LD | libc::BPF_B | libc::BPF_ABS, 0),
        jump(libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K, 1, 0, 1),
        stmt(libc::BPF_RET | libc::BPF_K, u32::MAX),
        stmt(libc::BPF_RET | libc::BPF_K, 0),
    ]
}

fn open(ifname: &str) -> io::Result<OwnedFd> {
    let ifindex = nix::net::if_::if_nametoindex(ifname).map_err(io::Error::from)?;
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: socket(2) takes no pointers; the result is checked before use.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            0, // no protocol yet: nothing is queued before the filter is attached
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh, valid descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let program = filter();
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr().cast_mut(),
    };
    setsockopt(&fd, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &fprog)?;
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: READ_TIMEOUT_MS * 1000,
    };
    setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &timeout)?;
    // Received VLAN tags come as auxdata (see the module doc).
    setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_AUXDATA, &1i32)?;
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = i32::try_from(ifindex).map_err(|_| io::Error::other("ifindex"))?;
    // SAFETY: `addr` is a valid sockaddr_ll and the length passed is its size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn setsockopt<T>(fd: &OwnedFd, level: i32, name: i32, value: &T) -> io::Result<()> {
    // SAFETY: setsockopt reads `size_of::<T>()` bytes from `value`, a live reference, and any
    // pointer inside it (the filter program) outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame read 4 bytes into a buffer, as `run` reads it.
    fn read(frame: &[u8]) -> Vec<u8> {
        let mut buf = vec![0xee; TAG_LEN];
        buf.extend_from_slice(frame);
        buf
    }

    #[test]
    fn the_tag_the_kernel_took_out_is_put_back() {
        let frame: Vec<u8> = (0..60u8).collect();
        let mut buf = read(&frame);
        let tagged = with_tag(&mut buf, frame.len(), Some((0x8100, 0x2064)));
        assert_eq!(tagged.len(), 64);
        assert_eq!(tagged[..12], frame[..12]);
        assert_eq!(tagged[12..16], [0x81, 0x00, 0x20, 0x64]);
        assert_eq!(tagged[16..], frame[12..]);
        let mut buf = read(&frame);
        assert_eq!(with_tag(&mut buf, frame.len(), None), &frame[..]);
    }

    #[test]
    fn auxdata_names_the_tag_and_its_protocol() {
        // SAFETY: tpacket_auxdata is plain old data; all-zero is a valid value.
        let mut aux: libc::tpacket_auxdata = unsafe { std::mem::zeroed() };
        aux.tp_vlan_tci = 100;
        assert_eq!(tag_of(&aux), None, "not valid: no tag");
        aux.tp_status = libc::TP_STATUS_VLAN_VALID;
        assert_eq!(tag_of(&aux), Some((0x8100, 100)));
        aux.tp_status |= libc::TP_STATUS_VLAN_TPID_VALID;
        aux.tp_vlan_tpid = 0x88a8;
        assert_eq!(tag_of(&aux), Some((0x88a8, 100)));
    }

    #[test]
    fn short_or_odd_reads_do_not_panic() {
        for n in 0..20 {
            for room in [0, 3, 4, 10, 16, 40] {
                let mut buf = vec![0u8; room];
                for tag in [None, Some((0x8100, 5))] {
                    let out = with_tag(&mut buf, n, tag).len();
                    assert!(out <= room);
                }
            }
        }
        let mut buf = vec![0u8; 30];
        assert_eq!(with_tag(&mut buf, usize::MAX, Some((0x8100, 1))).len(), 30);
    }
}
