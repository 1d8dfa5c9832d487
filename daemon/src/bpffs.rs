//! bpffs: making sure it is mounted, and the per-interface pin folders below xvio's root.
//!
//! Invariant: a pin folder holds only the pins xvio put there; `remove_pins` deletes those
//! files, the folder, and the root when it is left empty, and nothing else.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};
use thiserror::Error;

/// Where bpffs is mounted on a standard system.
pub const BPFFS: &str = "/sys/fs/bpf";

/// Errors of the bpffs helpers.
#[derive(Debug, Error)]
pub enum BpffsError {
    /// bpffs was not mounted and mounting it failed.
    #[error(
        "bpffs is not mounted at {BPFFS} and mounting it failed (try: mount -t bpf bpf {BPFFS})"
    )]
    Mount(#[source] nix::Error),
    /// A pin folder could not be made.
    #[error("creating the pin folder {path}")]
    CreateDir {
        /// The folder.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A pin could not be removed.
    #[error("removing {path}")]
    Remove {
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Mounts bpffs on [`BPFFS`] if `pin_root` lies below it and it is not mounted yet.
/// Returns whether it mounted it.
pub fn ensure_mounted(pin_root: &Path) -> Result<bool, BpffsError> {
    if !pin_root.starts_with(BPFFS) {
        return Ok(false);
    }
    if statfs(BPFFS).is_ok_and(|fs| fs.filesystem_type() == BPF_FS_MAGIC) {
        return Ok(false);
    }
    mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(BpffsError::Mount)?;
    Ok(true)
}

/// The pin folder of `ifname` below `pin_root`, created if missing.
pub fn pin_dir(pin_root: &Path, ifname: &str) -> Result<PathBuf, BpffsError> {
    let dir = pin_root.join(ifname);
    fs::create_dir_all(&dir).map_err(|source| BpffsError::CreateDir {
        path: dir.clone(),
        source,
    })?;
    Ok(dir)
}

/// Removes the pins `names` from `dir` (missing ones are fine), then `dir`, then its parent
/// if that is left empty.
pub fn remove_pins(dir: &Path, names: &[&str]) -> Result<(), BpffsError> {
    for name in names {
        let path = dir.join(name);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(BpffsError::Remove { path, source: e });
            }
            _ => {}
        }
    }
    for folder in [Some(dir), dir.parent()].into_iter().flatten() {
        match fs::remove_dir(folder) {
            Ok(()) => {}
            // Not empty (another interface's pins, or something not ours) or already gone.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::DirectoryNotEmpty
                ) =>
            {
                break;
            }
            Err(source) => {
                return Err(BpffsError::Remove {
                    path: folder.to_owned(),
                    source,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_only_its_own_pins_and_empty_folders() {
        let root = std::env::temp_dir().join(format!("xvio-bpffs-test-{}", std::process::id()));
        let a = pin_dir(&root, "a").unwrap();
        let b = pin_dir(&root, "b").unwrap();
        fs::write(a.join("steer"), b"").unwrap();
        fs::write(b.join("steer"), b"").unwrap();
        remove_pins(&a, &["steer", "xsks"]).unwrap();
        assert!(!a.exists());
        assert!(root.exists(), "b still has pins");
        fs::write(b.join("foreign"), b"").unwrap();
        remove_pins(&b, &["steer"]).unwrap();
        assert!(b.join("foreign").exists(), "a file xvio did not pin stays");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn outside_bpffs_nothing_is_mounted() {
        assert!(!ensure_mounted(Path::new("/tmp/xvio")).unwrap());
    }
}
