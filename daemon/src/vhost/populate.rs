//! Guest memory mapped ahead: every page of a guest's memory put into xvio's page tables
//! when the memory table arrives, rather than by a page fault the first time a datapath
//! worker touches it.
//!
//! vhost-user-backend maps each region the frontend shares (`SET_MEM_TABLE`) as it is, and
//! the kernel fills in the mapping a 4 KiB page at a time, on first touch. A worker that
//! copies a frame into a guest buffer on a page it never touched takes that fault, and every
//! queue it serves waits meanwhile: traced on the development VM, 20–30 µs per fault, once per
//! ping while testpmd's guest handed out RX buffers on pages xvio had not yet touched (836
//! faults in 1000 pings). DPDK's vhost maps guest memory with `MAP_POPULATE` for its DMA
//! (async) path; here it is done for every guest, off the datapath: a thread started for
//! each new memory table calls `madvise(MADV_POPULATE_WRITE)` (Linux 5.14) on each region, a
//! chunk at a time, and stops as soon as the table it maps is no longer the guest's.
//!
//! What it costs: the whole of the guest's memory is then backed on the host, as with a
//! preallocated hugepage-backed guest; pages the guest never touched are allocated
//! (about 1 s per GiB here; 0.3 s per GiB already allocated). `--lazy-guest-memory` turns it
//! off, for hosts that overcommit guest memory.

use std::{io, time::Duration};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::dirty::GuestMem;

/// Bytes mapped per `madvise` call; between two, the caller's `current` is asked whether to
/// go on (a superseded table is given up within one chunk).
pub const CHUNK: usize = 64 << 20;

/// What [`populate`] did.
#[derive(Debug)]
pub enum Populated {
    /// Every region is mapped.
    Done {
        /// Bytes mapped.
        bytes: u64,
        /// How long it took.
        took: Duration,
    },
    /// Given up part way: the table is no longer the guest's.
    Superseded {
        /// Bytes mapped before.
        bytes: u64,
    },
    /// The kernel has no `MADV_POPULATE_WRITE` (before Linux 5.14): pages are mapped on
    /// first touch.
    Unsupported,
    /// The kernel refused a chunk (the rest is mapped on first touch).
    Failed {
        /// The guest-physical address of the chunk.
        guest_addr: u64,
        /// Why.
        error: io::Error,
    },
}

/// Maps every page of `mem` into this process, `CHUNK` bytes at a time, as long as
/// `current()` says the memory is still the guest's. Blocks: call it off the datapath.
pub fn populate(mem: &GuestMem, current: impl Fn() -> bool) -> Populated {
    populate_in(mem, CHUNK, current)
}

fn populate_in(mem: &GuestMem, chunk: usize, current: impl Fn() -> bool) -> Populated {
    let started = std::time::Instant::now();
    let mut bytes = 0u64;
    for region in mem.iter() {
        let len = region.len() as usize;
        let Ok(base) = region.get_host_address(MemoryRegionAddress(0)) else {
            continue;
        };
        let mut at = 0usize;
        while at < len {
            if !current() {
                return Populated::Superseded { bytes };
            }
            let n = chunk.min(len - at);
            // SAFETY: `base + at .. base + at + n` lies in the region's mapping, which `mem`
            // (borrowed for the whole call) keeps mapped; MADV_POPULATE_WRITE only faults its
            // pages in, as writes would, without changing their contents.
            let rc = unsafe {
                libc::madvise(base.wrapping_add(at).cast(), n, libc::MADV_POPULATE_WRITE)
            };
            if rc != 0 {
                let error = io::Error::last_os_error();
                match error.raw_os_error() {
                    // A signal came: the same chunk again.
                    Some(libc::EINTR) => continue,
                    Some(libc::EINVAL) if bytes == 0 => return Populated::Unsupported,
                    _ => {
                        return Populated::Failed {
                            guest_addr: region.start_addr().0 + at as u64,
                            error,
                        };
                    }
                }
            }
            at += n;
            bytes += n as u64;
        }
    }
    Populated::Done {
        bytes,
        took: started.elapsed(),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        cell::Cell,
        os::fd::{AsRawFd, FromRawFd, OwnedFd},
    };

    use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

    use super::*;

    const MIB: usize = 1 << 20;

    /// Guest memory of `regions` (start, size) on one memfd, shared, as a frontend shares it.
    fn shared_memory(regions: &[(u64, usize)]) -> GuestMem {
        let total: usize = regions.iter().map(|r| r.1).sum();
        // SAFETY: memfd_create takes a NUL-terminated name and flags; its fd is ours.
        let fd = unsafe { libc::memfd_create(c"xvio-populate-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on our own memfd.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), total as i64) }, 0);
        let file = std::fs::File::from(fd);
        let mut offset = 0u64;
        let ranges: Vec<_> = regions
            .iter()
            .map(|&(start, size)| {
                let r = (
                    GuestAddress(start),
                    size,
                    Some(FileOffset::new(file.try_clone().unwrap(), offset)),
                );
                offset += size as u64;
                r
            })
            .collect();
        GuestMemoryMmap::from_ranges_with_files(ranges).unwrap()
    }

    /// Bytes of the mapping that starts at `addr` that are in this process's page tables
    /// (its `Rss` in /proc/self/smaps).
    fn resident(addr: *const u8) -> usize {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let start = format!("{:x}-", addr as usize);
        let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&start));
        assert!(lines.next().is_some(), "no mapping at {addr:p}");
        let rss = lines
            .find_map(|l| l.strip_prefix("Rss:"))
            .expect("an Rss line");
        rss.trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<usize>()
            .unwrap()
            * 1024
    }

    fn host(mem: &GuestMem, index: usize) -> *const u8 {
        let region = mem.iter().nth(index).unwrap();
        region
            .get_host_address(MemoryRegionAddress(0))
            .unwrap()
            .cast_const()
    }

    #[test]
    fn every_page_of_every_region_is_mapped_and_left_as_it_was() {
        let mem = shared_memory(&[(0, 4 * MIB), (0x1000_0000, 2 * MIB)]);
        // Something the guest wrote before: populating must not change it.
        let region = mem.iter().next().unwrap();
        let first = region.get_host_address(MemoryRegionAddress(4096)).unwrap();
        // SAFETY: inside the region's mapping, which `mem` keeps.
        unsafe { first.write(0x5a) };
        assert!(resident(host(&mem, 1)) < 2 * MIB, "not mapped yet");
        match populate(&mem, || true) {
            Populated::Done { bytes, .. } => assert_eq!(bytes, 6 * MIB as u64),
            other => panic!("{other:?}"),
        }
        assert_eq!(resident(host(&mem, 0)), 4 * MIB);
        assert_eq!(resident(host(&mem, 1)), 2 * MIB);
        // SAFETY: as above.
        assert_eq!(unsafe { first.read() }, 0x5a);
    }

    #[test]
    fn a_table_no_longer_current_is_given_up_within_a_chunk() {
        let mem = shared_memory(&[(0, 8 * MIB)]);
        let calls = Cell::new(0);
        let outcome = populate_in(&mem, MIB, || {
            calls.set(calls.get() + 1);
            calls.get() <= 2
        });
        match outcome {
            Populated::Superseded { bytes } => assert_eq!(bytes, 2 * MIB as u64),
            other => panic!("{other:?}"),
        }
        assert_eq!(resident(host(&mem, 0)), 2 * MIB);
    }
}
