//! A shim on the vhost-user control socket for frontends that send `SET_VRING_ENABLE` before
//! `SET_FEATURES`.
//!
//! QEMU 7.2 and later enable the first queue pair of a vhost-user net device as soon as it
//! connects, before the guest has negotiated features. vhost 0.18 and vhost-user-backend 0.24
//! refuse `SET_VRING_ENABLE` until `SET_FEATURES` has acknowledged
//! `VHOST_USER_F_PROTOCOL_FEATURES`, and drop the connection. The shim sits between the
//! frontend and the library: it holds such early `SET_VRING_ENABLE` messages (answering
//! `NEED_REPLY` itself, with success) and hands them to the library right after
//! `SET_FEATURES`: at most [`MAX_HELD`] of them, well-formed and without descriptors, or it
//! hangs up (a frontend must not make the daemon hold memory or descriptors without bound).
//! It also refuses (by hanging up) a message that would map past the end of its file, and
//! keeps `SET_LOG_BASE` for xvio's own dirty log (answering it itself; see
//! `dirty`). Every other message, with the file descriptors it carries, passes through
//! unchanged in both directions. Only the control channel goes through it: guest memory,
//! kicks and calls are shared with the library directly through those descriptors.

use std::{
    io::{self, IoSlice, IoSliceMut, Read},
    os::{
        fd::{AsFd, AsRawFd, OwnedFd, RawFd},
        unix::net::{SocketAddr, UnixListener, UnixStream},
    },
    path::PathBuf,
    sync::{Arc, Mutex},
    thread::JoinHandle,
};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

use super::dirty::{DirtyPages, LogMap};

const SET_FEATURES: u32 = 2;
const SET_MEM_TABLE: u32 = 5;
const SET_LOG_BASE: u32 = 6;
const ADD_MEM_REG: u32 = 37;
const SET_VRING_ENABLE: u32 = 18;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
const VERSION: u32 = 0x1;
const HEADER: usize = 12;
/// The largest payload vhost-user messages carry (a memory table with 8 regions is 328
/// bytes; config space at most 268; be generous).
const MAX_PAYLOAD: usize = 4096;
/// File descriptors one message may carry.
const MAX_FDS: usize = 32;
/// Early `SET_VRING_ENABLE` messages held at most: every queue of the largest device (16
/// queue pairs) enabled and disabled once. A frontend that sends more before `SET_FEATURES`
/// is not a VMM starting a device; it is hung up on rather than let grow the list.
pub const MAX_HELD: usize = 64;

/// The listener the library accepts the shim's connection on, one per frontend connection:
/// a socket file in a directory of its own (`mkdtemp` in the temporary directory: mode 0700,
/// so only the daemon's user can connect), removed as soon as the shim has connected
/// ([`Self::into_listener`]), so that nothing is left on disk even if the daemon is killed.
/// Not an abstract socket: any process of the network namespace could connect to that first
/// and be served as the guest's frontend.
#[derive(Debug)]
pub struct InnerListener {
    listener: Option<UnixListener>,
    addr: SocketAddr,
    dir: PathBuf,
}

impl InnerListener {
    /// Binds a fresh one.
    pub fn new() -> io::Result<InnerListener> {
        let template = std::env::temp_dir().join("xvio-vu-XXXXXX");
        let dir = nix::unistd::mkdtemp(&template).map_err(io::Error::from)?;
        let bound = UnixListener::bind(dir.join("backend.sock"))
            .and_then(|listener| Ok((listener.local_addr()?, listener)));
        match bound {
            Ok((addr, listener)) => Ok(InnerListener {
                listener: Some(listener),
                addr,
                dir,
            }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    /// Where the shim connects.
    pub fn addr(&self) -> &SocketAddr {
        &self.addr
    }

    /// The listener, its file and directory removed: for the library to accept the
    /// connection the shim made (waiting in its backlog), and no other.
    pub fn into_listener(mut self) -> io::Result<UnixListener> {
        let _ = std::fs::remove_dir_all(&self.dir);
        self.listener
            .take()
            .ok_or_else(|| io::Error::other("the backend's listener was already taken"))
    }
}

impl Drop for InnerListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One vhost-user message and the descriptors that came with it.
struct Message {
    header: [u8; HEADER],
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn request(&self) -> u32 {
        u32::from_le_bytes([
            self.header[0],
            self.header[1],
            self.header[2],
            self.header[3],
        ])
    }

    fn flags(&self) -> u32 {
        u32::from_le_bytes([
            self.header[4],
            self.header[5],
            self.header[6],
            self.header[7],
        ])
    }

    fn set_flags(&mut self, flags: u32) {
        self.header[4..8].copy_from_slice(&flags.to_le_bytes());
    }
}

/// Reads one message; `None` at end of stream.
fn read_message(stream: &mut UnixStream) -> io::Result<Option<Message>> {
    let mut header = [0u8; HEADER];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut fds = Vec::new();
    let received = {
        let mut iov = [IoSliceMut::new(&mut header)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel just installed these descriptors in this process for
                // this message; nothing else owns them.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }),
                );
            }
        }
        msg.bytes
    };
    if received == 0 {
        return Ok(None);
    }
    if received < HEADER {
        stream.read_exact(&mut header[received..])?;
    }
    let size = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("vhost-user message of {size} bytes"),
        ));
    }
    let mut payload = vec![0u8; size];
    stream.read_exact(&mut payload)?;
    Ok(Some(Message {
        header,
        payload,
        fds,
    }))
}

fn write_message(stream: &UnixStream, msg: &Message) -> io::Result<()> {
    let iov = [IoSlice::new(&msg.header), IoSlice::new(&msg.payload)];
    let raw: Vec<RawFd> = msg.fds.iter().map(AsRawFd::as_raw_fd).collect();
    let cmsgs = if raw.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&raw)]
    };
    let total = HEADER + msg.payload.len();
    let sent = sendmsg::<()>(
        stream.as_raw_fd(),
        &iov,
        &cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(io::Error::from)?;
    if sent != total {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short vhost-user message write",
        ));
    }
    Ok(())
}

/// Checks that what a message asks to have mapped lies inside its files: the guest
/// memory regions of `SET_MEM_TABLE` and `ADD_MEM_REG`, the dirty log of `SET_LOG_BASE`.
/// vm-memory 0.18 and vhost-user-backend 0.24 (and [`LogMap`], for the log) map `size` bytes
/// at `offset` without looking at the file's length, and touching a mapped page past the end of a file raises SIGBUS, which
/// would end the daemon and every guest with it. Only regular files (memfd, tmpfs, hugetlbfs)
/// have a length to check; malformed messages pass, for the library to refuse.
fn mappings_fit(msg: &Message) -> io::Result<()> {
    let u64_at = |at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(
            msg.payload.get(at..at + 8)?.try_into().ok()?,
        ))
    };
    // (fd index, offset in file, size) of each mapping.
    let mut maps: Vec<(usize, u64, u64)> = Vec::new();
    match msg.request() {
        SET_MEM_TABLE => {
            let count = msg.payload.get(0..4).map_or(0, |n| {
                u32::from_le_bytes(n.try_into().unwrap_or_default()) as usize
            });
            for i in 0..count.min(msg.fds.len()) {
                // Region i: guest_phys_addr, memory_size, userspace_addr, mmap_offset.
                let at = 8 + 32 * i;
                if let (Some(size), Some(offset)) = (u64_at(at + 8), u64_at(at + 24)) {
                    maps.push((i, offset, size));
                }
            }
        }
        ADD_MEM_REG => {
            // A u64 of padding, then one region.
            if let (Some(size), Some(offset)) = (u64_at(16), u64_at(32)) {
                maps.push((0, offset, size));
            }
        }
        SET_LOG_BASE => {
            // VhostUserLog: mmap_size, mmap_offset.
            if let (Some(size), Some(offset)) = (u64_at(0), u64_at(8)) {
                maps.push((0, offset, size));
            }
        }
        _ => {}
    }
    for (index, offset, size) in maps {
        let Some(fd) = msg.fds.get(index) else {
            continue;
        };
        let stat = nix::sys::stat::fstat(fd).map_err(io::Error::from)?;
        if stat.st_mode & libc::S_IFMT != libc::S_IFREG {
            continue;
        }
        let len = u64::try_from(stat.st_size).unwrap_or(0);
        if offset.checked_add(size).is_none_or(|end| end > len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "request {}: {size} bytes at offset {offset} of a file of {len} bytes",
                    msg.request()
                ),
            ));
        }
    }
    Ok(())
}

/// Maps the dirty log a `SET_LOG_BASE` shares (already checked by [`mappings_fit`]) into
/// `dirty`.
fn install_log(msg: &Message, dirty: &DirtyPages) -> io::Result<()> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_owned());
    let fd = msg
        .fds
        .first()
        .ok_or_else(|| invalid("no log descriptor"))?;
    let field = |at: usize| -> io::Result<u64> {
        let bytes = msg
            .payload
            .get(at..at + 8)
            .ok_or_else(|| invalid("short SET_LOG_BASE"))?;
        Ok(u64::from_le_bytes(bytes.try_into().unwrap_or_default()))
    };
    let (size, offset) = (field(0)?, field(8)?);
    let log = LogMap::map(fd.as_fd(), offset, size)?;
    dirty.set_log(Some(log));
    Ok(())
}

/// Whether an early `SET_VRING_ENABLE` may be held, `held` being held already: only a
/// well-formed one (the library refuses the others, after `SET_FEATURES`, by hanging up), and
/// at most [`MAX_HELD`].
fn holdable(msg: &Message, held: usize) -> Result<(), String> {
    if !msg.fds.is_empty() {
        return Err(format!("it carries {} file descriptor(s)", msg.fds.len()));
    }
    if msg.payload.len() != 8 {
        return Err(format!("its payload is {} bytes, not 8", msg.payload.len()));
    }
    if held >= MAX_HELD {
        return Err(format!("{MAX_HELD} are held already"));
    }
    Ok(())
}

/// The header of a reply to `request` with `size` bytes of payload.
fn reply_header(request: u32, size: u32) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[0..4].copy_from_slice(&request.to_le_bytes());
    h[4..8].copy_from_slice(&(VERSION | FLAG_REPLY).to_le_bytes());
    h[8..12].copy_from_slice(&size.to_le_bytes());
    h
}

/// Proxies one frontend connection to the library's listener at `inner` until either side
/// closes. Returns the thread carrying frontend messages (the other direction has its own).
pub fn proxy(
    frontend: UnixStream,
    inner: &SocketAddr,
    dirty: Arc<DirtyPages>,
) -> io::Result<JoinHandle<()>> {
    let backend = UnixStream::connect_addr(inner)?;
    let frontend_writer = Arc::new(Mutex::new(frontend.try_clone()?));
    // Backend to frontend: replies pass through as they are.
    {
        let mut from = backend.try_clone()?;
        let to = Arc::clone(&frontend_writer);
        let (f, b) = (frontend.try_clone()?, backend.try_clone()?);
        std::thread::Builder::new()
            .name("xvio-vu-shim-reply".into())
            .spawn(move || {
                while let Ok(Some(msg)) = read_message(&mut from) {
                    let ok = to
                        .lock()
                        .map(|s| write_message(&s, &msg).is_ok())
                        .unwrap_or(false);
                    if !ok {
                        break;
                    }
                }
                let _ = f.shutdown(std::net::Shutdown::Both);
                let _ = b.shutdown(std::net::Shutdown::Both);
            })?;
    }
    // Frontend to backend, holding early SET_VRING_ENABLE until SET_FEATURES.
    std::thread::Builder::new()
        .name("xvio-vu-shim".into())
        .spawn(move || {
            let mut from = frontend;
            let mut features_seen = false;
            let mut held: Vec<Message> = Vec::new();
            while let Ok(Some(mut msg)) = read_message(&mut from) {
                if msg.request() == SET_VRING_ENABLE && !features_seen {
                    if let Err(why) = holdable(&msg, held.len()) {
                        tracing::warn!(reason = %why, "early SET_VRING_ENABLE (before SET_FEATURES) refused; connection dropped");
                        break;
                    }
                    if msg.flags() & FLAG_NEED_REPLY != 0 {
                        let ack = Message {
                            header: reply_header(SET_VRING_ENABLE, 8),
                            payload: 0u64.to_le_bytes().to_vec(),
                            fds: Vec::new(),
                        };
                        if frontend_writer
                            .lock()
                            .map(|s| write_message(&s, &ack))
                            .is_err()
                        {
                            break;
                        }
                        msg.set_flags(msg.flags() & !FLAG_NEED_REPLY);
                    }
                    held.push(msg);
                    continue;
                }
                if let Err(e) = mappings_fit(&msg) {
                    tracing::warn!(error = %e, "vhost-user message refused: it maps past the end of a file (the access would raise SIGBUS); connection dropped");
                    break;
                }
                if msg.request() == SET_LOG_BASE {
                    // The log is xvio's to map (see `dirty`); the library never sees it.
                    let reply = install_log(&msg, &dirty).map(|()| Message {
                        header: reply_header(SET_LOG_BASE, 16),
                        payload: msg.payload[..16].to_vec(),
                        fds: Vec::new(),
                    });
                    match reply {
                        Ok(reply) => {
                            let sent = frontend_writer
                                .lock()
                                .map(|s| write_message(&s, &reply).is_ok())
                                .unwrap_or(false);
                            if !sent {
                                break;
                            }
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "SET_LOG_BASE refused; connection dropped");
                            break;
                        }
                    }
                }
                if write_message(&backend, &msg).is_err() {
                    break;
                }
                if msg.request() == SET_FEATURES {
                    features_seen = true;
                    if held.drain(..).any(|m| write_message(&backend, &m).is_err()) {
                        break;
                    }
                }
            }
            let _ = backend.shutdown(std::net::Shutdown::Both);
            let _ = from.shutdown(std::net::Shutdown::Both);
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enable(fds: Vec<OwnedFd>, payload: usize) -> Message {
        let mut header = reply_header(SET_VRING_ENABLE, payload as u32);
        header[4..8].copy_from_slice(&VERSION.to_le_bytes());
        Message {
            header,
            payload: vec![0; payload],
            fds,
        }
    }

    #[test]
    fn only_a_bounded_number_of_well_formed_early_enables_is_held() {
        assert!(holdable(&enable(Vec::new(), 8), 0).is_ok());
        assert!(holdable(&enable(Vec::new(), 8), MAX_HELD - 1).is_ok());
        assert!(holdable(&enable(Vec::new(), 8), MAX_HELD).is_err());
        assert!(holdable(&enable(Vec::new(), 4096), 0).is_err());
        let fd = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        assert!(holdable(&enable(vec![fd], 8), 0).is_err());
    }
}
