//! Guest memory mapped ahead: every page the guest's memory already has put into xvio's page
//! tables when the memory table arrives, rather than by a page fault the first time a
//! datapath worker touches it.
//!
//! vhost-user-backend maps each region the frontend shares (`SET_MEM_TABLE`) as it is, and
//! the kernel fills in the mapping a 4 KiB page at a time, on first touch. A worker that
//! copies a frame into a guest buffer on a page it never touched takes that fault, and every
//! queue it serves waits meanwhile: traced on the development VM, 20–30 µs per fault, once per
//! ping while testpmd's guest handed out RX buffers on pages xvio had not yet touched (836
//! faults in 1000 pings). DPDK's vhost maps guest memory with `MAP_POPULATE` for its DMA
//! (async) path; xvio does it for every guest, off the datapath: a thread started for each
//! new memory table finds the parts of each region's file that hold data (`lseek`
//! `SEEK_DATA`/`SEEK_HOLE`: the pages the guest, or anyone, touched) and maps them with
//! `madvise(MADV_POPULATE_READ)` (Linux 5.14), 2 MiB at a time, stopping as soon as the
//! table is no longer the guest's; and again after each of [`PASSES`] (a quarter of a second, doubling up to 64 s in
//! all), for what the guest touched since.
//!
//! It allocates nothing and writes nothing: a hole (a page nobody touched) stays a hole, to be
//! mapped, and allocated, when first touched, as before; a page that exists is mapped as it
//! is, and for shared memory (memfd, /dev/shm, hugetlbfs: what vhost-user guests use) writable,
//! so the worker's first write does not fault either. A file system that reports no holes
//! (hugetlbfs) has every page of the region mapped, and allocated from its pool. What it
//! costs: xvio's page tables for the guest's memory (about 2 KiB per MiB), and on the
//! development VM about 0.1–0.2 s of a CPU per GiB mapped, once (a later pass maps only what
//! is new).
//! `--lazy-guest-memory` turns it off.

use std::{io, os::fd::AsRawFd, time::Duration};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::dirty::GuestMem;

/// Bytes mapped per `madvise` call (about 0.2 ms of a CPU here, holding the process's mmap
/// lock for reading); between two, the caller's `current` is asked whether to go on.
pub const CHUNK: usize = 2 << 20;

/// The pauses before each pass over a memory table: at once, then again after a quarter of a
/// second and after each doubling of that up to 64 s, for the pages the guest touched since
/// (DPDK's testpmd, for one, shares its memory before it fills its mempools: 0.5 MiB of 512
/// had pages when its table came). A pass over pages already mapped costs little. A page first
/// touched later than that is mapped by the fault of its first touch. Each pass maps only
/// what is new ([`MapAhead`]).
pub const PASSES: [Duration; 10] = [
    Duration::ZERO,
    Duration::from_millis(250),
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
    Duration::from_secs(16),
    Duration::from_secs(32),
];

/// Sleeps `pause` in steps of 100 ms while `current()` holds; false as soon as it does not.
pub fn wait_while(pause: Duration, current: impl Fn() -> bool) -> bool {
    let until = std::time::Instant::now() + pause;
    loop {
        if !current() {
            return false;
        }
        let left = until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return true;
        }
        std::thread::sleep(left.min(Duration::from_millis(100)));
    }
}

/// What a [`MapAhead::pass`] did.
#[derive(Debug)]
pub enum Populated {
    /// Every region was gone through.
    Done {
        /// Bytes mapped.
        bytes: u64,
        /// How long it took.
        took: Duration,
        /// Bytes the kernel refused to map (left to first touch), and the first refusal.
        refused: Option<(u64, io::Error)>,
    },
    /// Given up part way: the table is no longer the guest's.
    Superseded {
        /// Bytes mapped before.
        bytes: u64,
    },
    /// The kernel has no `MADV_POPULATE_READ` (before Linux 5.14): pages are mapped on first
    /// touch.
    Unsupported,
}

/// Passes over one memory table: each maps only what holds data now and was not mapped by
/// an earlier pass (a pass over what is mapped already would walk every page again: 45 ms
/// per 512 MiB here).
#[derive(Debug, Default)]
pub struct MapAhead {
    /// Per region (in the table's order), the ranges mapped so far, offsets in the region.
    mapped: Vec<Vec<(u64, u64)>>,
}

impl MapAhead {
    /// One pass over `mem` (the same table at every pass), `chunk` bytes per call, as long
    /// as `current()` says the memory is still the guest's. Blocks: call it off the datapath.
    pub fn pass(&mut self, mem: &GuestMem, chunk: usize, current: impl Fn() -> bool) -> Populated {
        let started = std::time::Instant::now();
        // An advice the kernel does not know is refused whatever the range; a length of 0 is
        // otherwise accepted and does nothing.
        // SAFETY: a zero-length madvise touches no memory.
        if unsafe { libc::madvise(std::ptr::null_mut(), 0, libc::MADV_POPULATE_READ) } != 0 {
            return Populated::Unsupported;
        }
        let mut bytes = 0u64;
        let mut refused: Option<(u64, io::Error)> = None;
        self.mapped.resize(mem.num_regions(), Vec::new());
        for (index, region) in mem.iter().enumerate() {
            let len = region.len() as usize;
            let (Ok(base), Some(file)) = (
                region.get_host_address(MemoryRegionAddress(0)),
                region.file_offset(),
            ) else {
                // No file, no way to tell what exists: left to first touch.
                continue;
            };
            let data = data_ranges(file.file().as_raw_fd(), file.start(), len as u64);
            let mut all_mapped = true;
            for (from, to) in subtract(&data, &self.mapped[index]) {
                let mut at = from as usize;
                while at < to as usize {
                    if !current() {
                        return Populated::Superseded { bytes };
                    }
                    let n = chunk.min(to as usize - at);
                    // SAFETY: `base + at .. base + at + n` lies in the region's mapping (`to` is
                    // at most the region's length), which `mem` (borrowed for the whole call)
                    // keeps mapped. MADV_POPULATE_READ faults in pages the file has, as reads
                    // would: it allocates nothing and changes no byte.
                    let rc = unsafe {
                        libc::madvise(base.wrapping_add(at).cast(), n, libc::MADV_POPULATE_READ)
                    };
                    if rc != 0 {
                        let error = io::Error::last_os_error();
                        // EINTR comes only with a fatal signal pending: `current` is asked
                        // again.
                        if error.raw_os_error() == Some(libc::EINTR) {
                            continue;
                        }
                        // Anything else (a range past the file's end, poisoned memory, a
                        // mapping that cannot be populated): this chunk is left to first touch.
                        all_mapped = false;
                        match &mut refused {
                            Some((skipped, _)) => *skipped += n as u64,
                            None => refused = Some((n as u64, error)),
                        }
                    } else {
                        bytes += n as u64;
                    }
                    at += n;
                }
            }
            if all_mapped {
                self.mapped[index] = data;
            }
        }
        Populated::Done {
            bytes,
            took: started.elapsed(),
            refused,
        }
    }
}

/// The parts of `ranges` outside `taken` (both sorted, each made of disjoint ranges).
fn subtract(ranges: &[(u64, u64)], taken: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut first = 0;
    for &(mut from, to) in ranges {
        while first < taken.len() && taken[first].1 <= from {
            first += 1;
        }
        for &(a, b) in &taken[first..] {
            if a >= to || from >= to {
                break;
            }
            if a > from {
                out.push((from, a));
            }
            from = from.max(b);
        }
        if from < to {
            out.push((from, to));
        }
    }
    out
}

/// The parts of `fd`'s `start .. start + len` that hold data, as offsets from `start`
/// (`lseek` `SEEK_DATA`/`SEEK_HOLE`). A file that cannot say is all data.
fn data_ranges(fd: i32, start: u64, len: u64) -> Vec<(u64, u64)> {
    let end = start + len;
    let mut ranges = Vec::new();
    let mut at = start;
    while at < end {
        // SAFETY: lseek on an fd the region's FileOffset keeps open; it moves that open
        // file's offset, which nothing else uses (mappings and pread/pwrite ignore it).
        let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                break; // no data from `at` to the file's end
            }
            // SEEK_DATA not supported: take the rest as data.
            ranges.push((at - start, len));
            break;
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            end
        } else {
            (hole as u64).min(end)
        };
        ranges.push((data - start, hole - start));
        at = hole;
    }
    ranges
}

#[cfg(test)]
mod tests {
    use std::{
        cell::Cell,
        fs::File,
        os::{
            fd::{FromRawFd, OwnedFd},
            unix::fs::FileExt,
        },
    };

    use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

    use super::*;

    const MIB: usize = 1 << 20;

    /// A memfd of `len` bytes, all holes.
    fn memfd(len: usize) -> File {
        // SAFETY: memfd_create takes a NUL-terminated name and flags; its fd is ours.
        let fd = unsafe { libc::memfd_create(c"xvio-populate-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: a fresh fd nobody else owns.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(len as u64).unwrap();
        file
    }

    /// Guest memory of `regions` (start, size) on `file`, one after the other from file offset
    /// `offset`, shared, as a frontend shares it.
    fn shared_memory(file: &File, offset: u64, regions: &[(u64, usize)]) -> GuestMem {
        let mut at = offset;
        let ranges: Vec<_> = regions
            .iter()
            .map(|&(start, size)| {
                let r = (
                    GuestAddress(start),
                    size,
                    Some(FileOffset::new(file.try_clone().unwrap(), at)),
                );
                at += size as u64;
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

    fn host(mem: &GuestMem, index: usize) -> *mut u8 {
        let region = mem.iter().nth(index).unwrap();
        region.get_host_address(MemoryRegionAddress(0)).unwrap()
    }

    /// What a guest wrote: `len` bytes of `byte` at file offset `at` (not through the mapping
    /// under test, so that nothing of it is mapped yet).
    fn guest_writes(file: &File, at: u64, len: usize, byte: u8) {
        file.write_all_at(&vec![byte; len], at).unwrap();
    }

    #[test]
    fn the_pages_the_guest_has_are_mapped_writable_as_they_were_and_holes_stay_holes() {
        let file = memfd(8 * MIB);
        // Region 0: file 1 MiB .. 5 MiB, of which the guest touched 2 MiB (at 2 .. 4 MiB of
        // the file); region 1: file 5 .. 7 MiB, all touched.
        guest_writes(&file, 2 * MIB as u64, 2 * MIB, 0x5a);
        guest_writes(&file, 5 * MIB as u64, 2 * MIB, 0xa5);
        let mem = shared_memory(&file, MIB as u64, &[(0, 4 * MIB), (0x1000_0000, 2 * MIB)]);
        assert_eq!(resident(host(&mem, 0)), 0, "nothing mapped yet");
        match MapAhead::default().pass(&mem, CHUNK, || true) {
            Populated::Done { bytes, refused, .. } => {
                assert_eq!(bytes, 4 * MIB as u64);
                assert!(refused.is_none(), "{refused:?}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(resident(host(&mem, 0)), 2 * MIB, "the touched part only");
        assert_eq!(resident(host(&mem, 1)), 2 * MIB);
        // The contents are the guest's, and a write through the mapping needs no fault.
        // SAFETY: inside region 0's mapping (file offset 2 MiB is 1 MiB into it), which `mem`
        // keeps.
        let touched = unsafe { host(&mem, 0).add(MIB) };
        // SAFETY: as above.
        assert_eq!(unsafe { touched.read() }, 0x5a);
        let faults = || {
            // SAFETY: getrusage fills the struct it is given.
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            unsafe { libc::getrusage(libc::RUSAGE_THREAD, &raw mut usage) };
            usage.ru_minflt + usage.ru_majflt
        };
        let before = faults();
        for page in 0..(2 * MIB / 4096) {
            // SAFETY: within the touched 2 MiB of region 0.
            unsafe { touched.add(page * 4096).write(1) };
        }
        assert_eq!(faults() - before, 0, "mapped writable");
        // The untouched part of the file is still a hole: nothing was allocated.
        assert_eq!(
            data_ranges(file.as_raw_fd(), 0, 8 * MIB as u64),
            vec![
                (2 * MIB as u64, 4 * MIB as u64),
                (5 * MIB as u64, 7 * MIB as u64)
            ]
        );
    }

    #[test]
    fn a_table_no_longer_current_is_given_up_within_a_chunk() {
        let file = memfd(8 * MIB);
        guest_writes(&file, 0, 8 * MIB, 1);
        let mem = shared_memory(&file, 0, &[(0, 8 * MIB)]);
        let calls = Cell::new(0);
        let outcome = MapAhead::default().pass(&mem, MIB, || {
            calls.set(calls.get() + 1);
            calls.get() <= 2
        });
        match outcome {
            Populated::Superseded { bytes } => assert_eq!(bytes, 2 * MIB as u64),
            other => panic!("{other:?}"),
        }
        // The two chunks asked for, and no third (the kernel may map a few pages past a
        // faulted one: fault-around, large folios).
        let rss = resident(host(&mem, 0));
        assert!((2 * MIB..3 * MIB).contains(&rss), "{rss}");
    }

    #[test]
    fn a_pause_ends_early_when_the_table_is_no_longer_current() {
        let started = std::time::Instant::now();
        assert!(wait_while(Duration::from_millis(120), || true));
        assert!(started.elapsed() >= Duration::from_millis(120));
        let calls = Cell::new(0);
        let started = std::time::Instant::now();
        assert!(!wait_while(Duration::from_secs(60), || {
            calls.set(calls.get() + 1);
            calls.get() < 3
        }));
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_later_pass_maps_only_what_the_guest_touched_since() {
        let file = memfd(8 * MIB);
        guest_writes(&file, 0, MIB, 1);
        let mem = shared_memory(&file, 0, &[(0, 8 * MIB)]);
        let mut map = MapAhead::default();
        match map.pass(&mem, CHUNK, || true) {
            Populated::Done { bytes, .. } => assert_eq!(bytes, MIB as u64),
            other => panic!("{other:?}"),
        }
        guest_writes(&file, 4 * MIB as u64, MIB, 2);
        match map.pass(&mem, CHUNK, || true) {
            Populated::Done { bytes, .. } => assert_eq!(bytes, MIB as u64, "the new MiB only"),
            other => panic!("{other:?}"),
        }
        assert_eq!(resident(host(&mem, 0)), 2 * MIB);
    }

    #[test]
    fn subtract_leaves_what_is_not_taken() {
        let r = [(0, 10), (20, 30), (40, 50)];
        assert_eq!(subtract(&r, &[]), r.to_vec());
        assert_eq!(subtract(&r, &r), vec![]);
        assert_eq!(subtract(&r, &[(5, 25)]), vec![(0, 5), (25, 30), (40, 50)]);
        assert_eq!(
            subtract(&[(0, 100)], &[(10, 20), (30, 40)]),
            vec![(0, 10), (20, 30), (40, 100)]
        );
        assert_eq!(subtract(&[(10, 20)], &[(0, 15), (18, 30)]), vec![(15, 18)]);
    }

    #[test]
    fn data_ranges_are_clipped_to_the_region() {
        let file = memfd(4 * MIB);
        guest_writes(&file, 0, 4 * MIB, 1);
        let fd = file.as_raw_fd();
        assert_eq!(
            data_ranges(fd, MIB as u64, 2 * MIB as u64),
            vec![(0, 2 * MIB as u64)]
        );
        let empty = memfd(MIB);
        assert_eq!(data_ranges(empty.as_raw_fd(), 0, MIB as u64), vec![]);
    }
}
