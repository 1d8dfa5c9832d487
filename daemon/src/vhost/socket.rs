//! The file of a server-mode vhost-user socket: created with mode 0660, replacing only a
//! stale socket (a socket file nobody listens on), and removed at shutdown only while it is
//! still the socket created.
//!
//! The daemon often runs as root and takes the path from its command line, so whatever else
//! is at the path is left alone and reported: a regular file, a directory, a symlink (never
//! followed), a socket another process listens on (another xvio, a VMM; told apart from a
//! stale one by connecting to it).

use std::{
    io,
    os::unix::{
        fs::{FileTypeExt, MetadataExt},
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
};

use nix::sys::stat::{FchmodatFlags, Mode, fchmodat};
use thiserror::Error;

/// Errors of creating a guest's socket; each names the path and what to do.
#[derive(Debug, Error)]
pub enum SocketError {
    /// The socket's directory does not exist.
    #[error("guest socket {0}: its directory does not exist (create it, or pick another path)")]
    NoDirectory(PathBuf),
    /// A process listens on the socket already.
    #[error(
        "guest socket {0}: a process is listening on it (another xvio, or a VMM?); stop it or pick another path"
    )]
    InUse(PathBuf),
    /// Something other than a socket is at the path.
    #[error(
        "guest socket {path}: a {kind} is there, not a socket (only a stale socket is replaced); move it away or pick another path"
    )]
    NotASocket {
        /// The socket path.
        path: PathBuf,
        /// What is there: "regular file", "directory", "symlink"…
        kind: &'static str,
    },
    /// What is at the path could not be examined.
    #[error("guest socket {path}: cannot tell whether the file there is a stale socket")]
    Inspect {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Removing the stale socket, binding or setting the mode failed.
    #[error("creating the vhost-user socket {path}")]
    Create {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// The socket file a guest created: its path and which file it is (device and inode).
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    id: (u64, u64),
}

impl SocketFile {
    /// Removes the file if it is still the socket created (not one that replaced it since).
    pub fn remove(&self) {
        if identity(&self.path).is_some_and(|id| id == self.id) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The device and inode of the socket at `path`, if a socket is there.
fn identity(path: &Path) -> Option<(u64, u64)> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    meta.file_type()
        .is_socket()
        .then(|| (meta.dev(), meta.ino()))
}

/// What a file type is, for an error message.
fn kind(file_type: std::fs::FileType) -> &'static str {
    if file_type.is_file() {
        "regular file"
    } else if file_type.is_dir() {
        "directory"
    } else if file_type.is_symlink() {
        "symlink"
    } else if file_type.is_fifo() {
        "FIFO"
    } else if file_type.is_char_device() || file_type.is_block_device() {
        "device node"
    } else {
        "file"
    }
}

/// Makes room for the socket at `path`: nothing there, or a stale socket (removed).
fn clear(path: &Path) -> Result<(), SocketError> {
    let inspect = |source| SocketError::Inspect {
        path: path.to_owned(),
        source,
    };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(inspect(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(SocketError::NotASocket {
            path: path.to_owned(),
            kind: kind(meta.file_type()),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(SocketError::InUse(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path)
            .map_err(|source| SocketError::Create {
                path: path.to_owned(),
                source,
            }),
        // A datagram socket, one this user may not connect to…: not provably stale.
        Err(e) => Err(inspect(e)),
    }
}

/// Creates the server socket at `path`, mode 0660, replacing only a stale socket.
pub fn bind(path: &Path) -> Result<(UnixListener, SocketFile), SocketError> {
    if path
        .parent()
        .is_some_and(|dir| !dir.as_os_str().is_empty() && !dir.is_dir())
    {
        return Err(SocketError::NoDirectory(path.to_owned()));
    }
    clear(path)?;
    let create = |source| SocketError::Create {
        path: path.to_owned(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(create)?;
    // Not following a symlink: the path is checked again by no one between bind and chmod.
    fchmodat(
        nix::fcntl::AT_FDCWD,
        path,
        Mode::from_bits_truncate(0o660),
        FchmodatFlags::NoFollowSymlink,
    )
    .map_err(|e| create(e.into()))?;
    let id = identity(path).ok_or_else(|| {
        create(io::Error::other(
            "the socket was replaced right after it was created",
        ))
    })?;
    Ok((
        listener,
        SocketFile {
            path: path.to_owned(),
            id,
        },
    ))
}
