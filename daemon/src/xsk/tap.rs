//! Broadcast and multicast frames from the wire, for the guests. The XDP program passes group
//! frames to the kernel (the host needs ARP, ND, DHCP), and XDP cannot both pass a frame and
//! redirect it; so an AF_PACKET socket on the interface, with a classic BPF filter that keeps
//! only incoming frames whose destination has the group bit set, gets a copy of each, and a
//! thread hands them on. Unicast frames redirected by XDP never reach the socket, so nothing is
//! delivered twice; group rates are low and the kernel builds an skb for them anyway.
//!
//! The socket and the filter need raw `libc` calls: their `unsafe` stays in this file.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

/// Longest frame read (a 9000-byte MTU with an Ethernet header and a VLAN tag).
const MAX_FRAME: usize = 9018;
/// How long a blocked read waits before looking at the stop flag.
const READ_TIMEOUT_MS: i64 = 200;

/// A running tap.
#[derive(Debug)]
pub struct GroupTap {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
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
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name(format!("xvio-tap-{ifname}"))
            .spawn(move || run(&socket, &flag, deliver))?;
        Ok(GroupTap {
            stop,
            thread: Some(thread),
        })
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

fn run(socket: &OwnedFd, stop: &AtomicBool, mut deliver: impl FnMut(&[u8])) {
    let mut buf = vec![0u8; MAX_FRAME];
    while !stop.load(Ordering::Acquire) {
        // SAFETY: recv writes at most `buf.len()` bytes into `buf`, a live buffer we own.
        let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n > 0 {
            deliver(&buf[..n as usize]);
        }
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
