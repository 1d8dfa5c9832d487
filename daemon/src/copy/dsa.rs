//! `dsa`: Intel Data Streaming Accelerator channels through an idxd user work queue
//! (`/dev/dsa/wqX.Y`), built from the kernel's `linux/idxd.h` ABI.
//!
//! Each copy is one 64-byte MEMMOVE descriptor with its own 32-byte completion record, kept
//! in two rings owned by the channel. `submit` writes the descriptors enqueued since the last
//! submit to the work queue's portal: MOVDIR64B for a dedicated queue, ENQCMD (retried while
//! the queue is full) for a shared one. Completion is polled in ring order from the records'
//! status byte. A descriptor that could not be written to the portal never reaches the
//! device; it is reported as [`DmaFault::NotSubmitted`]. Page faults are not blocked on
//! (no BOF flag): the device reports them, and the engine redoes the copy on the CPU.
//!
//! What has run where: the descriptor and completion-record encodings are tested against
//! `linux/idxd.h` on every machine (see the tests); the portal, the instructions and the
//! device's behaviour have not run on DSA hardware in this project (none was available).
//! The channel checks for the work queue and the CPU instructions and refuses to open when
//! either is missing.

use std::{
    arch::asm,
    fs::OpenOptions,
    os::fd::{AsRawFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    ptr::NonNull,
};

use super::channel::{ChannelKind, Completed, DmaChannel, DmaError, DmaFault, OpStatus};

/// `DSA_OPCODE_MEMMOVE`.
pub const OPCODE_MEMMOVE: u8 = 3;
/// `IDXD_OP_FLAG_BOF`: block on fault.
pub const FLAG_BOF: u32 = 0x0002;
/// `IDXD_OP_FLAG_CRAV`: the completion record address is valid.
pub const FLAG_CRAV: u32 = 0x0004;
/// `IDXD_OP_FLAG_RCR`: request a completion record.
pub const FLAG_RCR: u32 = 0x0008;
/// `IDXD_OP_FLAG_CC`: write the destination into the cache (the consumer reads it soon).
pub const FLAG_CC: u32 = 0x0100;
/// `DSA_COMP_NONE`: not done yet.
pub const COMP_NONE: u8 = 0;
/// `DSA_COMP_SUCCESS`.
pub const COMP_SUCCESS: u8 = 1;
/// `DSA_COMP_PAGE_FAULT_NOBOF`.
pub const COMP_PAGE_FAULT_NOBOF: u8 = 3;
/// `DSA_COMP_PAGE_FAULT_IR`.
pub const COMP_PAGE_FAULT_IR: u8 = 4;
/// `DSA_COMP_BAD_OPCODE`: the first of the descriptor-check errors (0x10–0x1f).
pub const COMP_BAD_OPCODE: u8 = 0x10;
/// `DSA_COMP_STATUS_MASK`.
pub const COMP_STATUS_MASK: u8 = 0x7f;
/// The largest transfer a descriptor takes here (the device's limit is configurable and at
/// least 2 MiB; packets are far smaller).
pub const MAX_XFER: u32 = 1 << 21;
/// Size of the portal mapping.
const PORTAL_SIZE: usize = 0x1000;
/// ENQCMD attempts before a descriptor is given up as not submitted.
const ENQCMD_RETRIES: u32 = 1000;
/// Our private marker in a completion record: never handed to the device.
const NOT_SUBMITTED: u8 = 0xff;

/// `struct dsa_hw_desc` (64 bytes, packed in the header; every field is naturally aligned).
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HwDesc {
    /// `pasid:20, rsvd:11, priv:1`.
    pub pasid_priv: u32,
    /// `flags:24, opcode:8`.
    pub flags_opcode: u32,
    /// `completion_addr`.
    pub completion_addr: u64,
    /// `src_addr`.
    pub src_addr: u64,
    /// `dst_addr`.
    pub dst_addr: u64,
    /// `xfer_size`.
    pub xfer_size: u32,
    /// `int_handle`.
    pub int_handle: u16,
    /// `rsvd1`.
    pub rsvd1: u16,
    /// The operation-specific union (unused by MEMMOVE, must be zero).
    pub op_specific: [u8; 24],
}

impl HwDesc {
    /// A MEMMOVE of `len` bytes from `src` to `dst` that writes its completion to `comp`.
    pub fn memmove(src: u64, dst: u64, len: u32, comp: u64) -> HwDesc {
        HwDesc {
            flags_opcode: (FLAG_CRAV | FLAG_RCR | FLAG_CC) | (u32::from(OPCODE_MEMMOVE) << 24),
            completion_addr: comp,
            src_addr: src,
            dst_addr: dst,
            xfer_size: len,
            ..HwDesc::default()
        }
    }

    /// The opcode field.
    pub fn opcode(&self) -> u8 {
        (self.flags_opcode >> 24) as u8
    }

    /// The flags field.
    pub fn flags(&self) -> u32 {
        self.flags_opcode & 0x00ff_ffff
    }
}

/// `struct dsa_completion_record` (32 bytes).
#[repr(C, align(32))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompletionRecord {
    /// `status` (written by the device last).
    pub status: u8,
    /// `result`.
    pub result: u8,
    /// `rsvd`.
    pub rsvd: u16,
    /// `bytes_completed` (on a page fault: how far it got).
    pub bytes_completed: u32,
    /// `fault_addr`.
    pub fault_addr: u64,
    /// The operation-specific union.
    pub op_specific: [u8; 16],
}

/// The status of a completion record as the channel reports it; `None` while not done.
pub fn decode_status(status: u8) -> Option<OpStatus> {
    if status == NOT_SUBMITTED {
        return Some(OpStatus::Failed(DmaFault::NotSubmitted));
    }
    match status & COMP_STATUS_MASK {
        COMP_NONE => None,
        COMP_SUCCESS => Some(OpStatus::Success),
        COMP_PAGE_FAULT_NOBOF | COMP_PAGE_FAULT_IR => Some(OpStatus::Failed(DmaFault::PageFault)),
        s if (COMP_BAD_OPCODE..0x20).contains(&s) => {
            Some(OpStatus::Failed(DmaFault::InvalidDescriptor))
        }
        s => Some(OpStatus::Failed(DmaFault::Device(s))),
    }
}

/// Whether this CPU has MOVDIR64B and ENQCMD (CPUID leaf 7, ECX bits 28 and 29).
pub fn cpu_support() -> (bool, bool) {
    let leaf = std::arch::x86_64::__cpuid_count(7, 0);
    (leaf.ecx & (1 << 28) != 0, leaf.ecx & (1 << 29) != 0)
}

/// A DSA work queue as a DMA channel.
pub struct DsaChannel {
    name: String,
    _file: OwnedFd,
    portal: NonNull<u8>,
    dedicated: bool,
    descs: Box<[HwDesc]>,
    comps: Box<[CompletionRecord]>,
    enqueued: u64,
    submitted: u64,
    reported: u64,
}

// SAFETY: the portal mapping and the rings are owned by the channel and used only through
// &mut self; nothing in them is tied to the thread that opened it.
unsafe impl Send for DsaChannel {}

impl std::fmt::Debug for DsaChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DsaChannel")
            .field("name", &self.name)
            .field("dedicated", &self.dedicated)
            .finish()
    }
}

impl DsaChannel {
    /// Opens work queue `path` (`/dev/dsa/wq0.0`) with `ring` descriptors (a power of two).
    pub fn open(path: &Path, ring: u16) -> Result<DsaChannel, DmaError> {
        if !path.exists() {
            return Err(DmaError::Unavailable(format!(
                "no Intel DSA work queue at {} (this machine has {}); use the sw channel instead",
                path.display(),
                if Path::new("/dev/dsa").exists() {
                    "other work queues under /dev/dsa"
                } else {
                    "no /dev/dsa"
                }
            )));
        }
        let dedicated = queue_is_dedicated(path)?;
        let (movdir64b, enqcmd) = cpu_support();
        if dedicated && !movdir64b || !dedicated && !enqcmd {
            return Err(DmaError::Unavailable(format!(
                "{} is a {} work queue but this CPU lacks {}",
                path.display(),
                if dedicated { "dedicated" } else { "shared" },
                if dedicated { "MOVDIR64B" } else { "ENQCMD" }
            )));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| DmaError::Unavailable(format!("opening {}: {e}", path.display())))?;
        let file = OwnedFd::from(file);
        // SAFETY: a fresh shared mapping of the work queue's portal page; the kernel checks
        // the request. The result is checked below and unmapped in Drop.
        let portal = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PORTAL_SIZE,
                libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                file.as_raw_fd(),
                0,
            )
        };
        if portal == libc::MAP_FAILED {
            return Err(DmaError::Unavailable(format!(
                "mapping the portal of {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            )));
        }
        let portal = NonNull::new(portal.cast())
            .ok_or_else(|| DmaError::Unavailable("portal at NULL".into()))?;
        let size = usize::from(ring.max(2)).next_power_of_two();
        Ok(DsaChannel {
            name: format!(
                "dsa/{}",
                path.file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default()
            ),
            _file: file,
            portal,
            dedicated,
            descs: vec![HwDesc::default(); size].into_boxed_slice(),
            comps: vec![CompletionRecord::default(); size].into_boxed_slice(),
            enqueued: 0,
            submitted: 0,
            reported: 0,
        })
    }

    fn slot(&self, seq: u64) -> usize {
        (seq % self.descs.len() as u64) as usize
    }

    fn status(&self, seq: u64) -> u8 {
        let rec = &self.comps[self.slot(seq)];
        // SAFETY: `rec.status` is a valid, aligned u8 in our ring; the device writes it
        // asynchronously, hence the volatile read.
        unsafe { std::ptr::read_volatile(&raw const rec.status) }
    }

    /// Writes one descriptor to the portal; false if a shared queue stayed full.
    fn write_portal(&self, desc: &HwDesc) -> bool {
        let portal = self.portal.as_ptr();
        let desc = std::ptr::from_ref(desc).cast::<u8>();
        if self.dedicated {
            // SAFETY: `portal` is the mapped portal page; `desc` is a 64-byte aligned
            // descriptor; the CPU supports MOVDIR64B (checked in `open`).
            unsafe {
                asm!("movdir64b {0}, zmmword ptr [{1}]", in(reg) portal, in(reg) desc, options(nostack))
            };
            return true;
        }
        for _ in 0..ENQCMD_RETRIES {
            let retry: u8;
            // SAFETY: as above, with ENQCMD (checked in `open`); ZF=1 means the shared
            // queue was full and nothing was accepted.
            unsafe {
                asm!(
                    "enqcmd {0}, zmmword ptr [{1}]",
                    "setz {2}",
                    in(reg) portal,
                    in(reg) desc,
                    out(reg_byte) retry,
                    options(nostack)
                )
            };
            if retry == 0 {
                return true;
            }
            std::hint::spin_loop();
        }
        false
    }
}

fn queue_is_dedicated(path: &Path) -> Result<bool, DmaError> {
    let wq = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mode_path = PathBuf::from("/sys/bus/dsa/devices").join(&wq).join("mode");
    let mode = std::fs::read_to_string(&mode_path)
        .map_err(|e| DmaError::Unavailable(format!("reading {}: {e}", mode_path.display())))?;
    Ok(mode.trim() == "dedicated")
}

impl DmaChannel for DsaChannel {
    fn kind(&self) -> ChannelKind {
        ChannelKind::Dsa
    }

    fn name(&self) -> &str {
        &self.name
    }

    unsafe fn copy(&mut self, src: *const u8, dst: *mut u8, len: u32) -> Result<u16, DmaError> {
        if len > MAX_XFER {
            return Err(DmaError::TooLong {
                len: u64::from(len),
                max: u64::from(MAX_XFER),
            });
        }
        if self.enqueued - self.reported >= self.descs.len() as u64 {
            return Err(DmaError::Full);
        }
        let slot = self.slot(self.enqueued);
        self.comps[slot] = CompletionRecord::default();
        let comp = std::ptr::from_ref(&self.comps[slot]) as u64;
        self.descs[slot] = HwDesc::memmove(src as u64, dst as u64, len, comp);
        let idx = self.enqueued as u16;
        self.enqueued += 1;
        Ok(idx)
    }

    fn submit(&mut self) -> Result<(), DmaError> {
        // The zeroed completion records and the descriptors must be in memory before the
        // device can see a descriptor.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let mut lost = 0;
        while self.submitted < self.enqueued {
            let slot = self.slot(self.submitted);
            if !self.write_portal(&self.descs[slot]) {
                self.comps[slot].status = NOT_SUBMITTED;
                lost += 1;
            }
            self.submitted += 1;
        }
        if lost > 0 {
            return Err(DmaError::Submit(format!(
                "{}: shared work queue stayed full for {lost} descriptors",
                self.name
            )));
        }
        Ok(())
    }

    fn completed(&mut self, max: u16) -> Completed {
        let mut done = Completed::default();
        while done.count < max && self.reported < self.submitted {
            match decode_status(self.status(self.reported)) {
                None => break,
                Some(OpStatus::Success) => {
                    done.last_idx = self.reported as u16;
                    done.count += 1;
                    self.reported += 1;
                }
                Some(OpStatus::Failed(_)) => {
                    done.has_error = true;
                    break;
                }
            }
        }
        done
    }

    fn completed_status(&mut self, status: &mut [OpStatus]) -> u16 {
        let mut n = 0;
        while n < status.len() && self.reported < self.submitted {
            let Some(s) = decode_status(self.status(self.reported)) else {
                break;
            };
            status[n] = s;
            n += 1;
            self.reported += 1;
        }
        n as u16
    }

    fn burst_capacity(&self) -> u16 {
        u16::try_from(self.descs.len() as u64 - (self.enqueued - self.reported)).unwrap_or(u16::MAX)
    }

    fn completion_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

impl Drop for DsaChannel {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, unmapped once.
        unsafe { libc::munmap(self.portal.as_ptr().cast(), PORTAL_SIZE) };
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, process::Command};

    use super::*;

    /// Compiles a C program against `linux/idxd.h` that prints sizes, offsets, constants
    /// and the bytes of a MEMMOVE descriptor built with the header's bitfields.
    fn header_facts() -> HashMap<String, String> {
        let dir = std::env::temp_dir().join(format!("xvio-idxd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("idxd.c");
        std::fs::write(
            &src,
            r#"
#include <stdio.h>
#include <stddef.h>
#include <string.h>
#include <linux/idxd.h>
#define P(name, v) printf("%s %llu\n", name, (unsigned long long)(v))
int main(void) {
    struct dsa_hw_desc d; struct dsa_completion_record c;
    P("desc_size", sizeof d); P("comp_size", sizeof c);
    P("completion_addr", offsetof(struct dsa_hw_desc, completion_addr));
    P("src_addr", offsetof(struct dsa_hw_desc, src_addr));
    P("dst_addr", offsetof(struct dsa_hw_desc, dst_addr));
    P("xfer_size", offsetof(struct dsa_hw_desc, xfer_size));
    P("int_handle", offsetof(struct dsa_hw_desc, int_handle));
    P("status", offsetof(struct dsa_completion_record, status));
    P("result", offsetof(struct dsa_completion_record, result));
    P("bytes_completed", offsetof(struct dsa_completion_record, bytes_completed));
    P("fault_addr", offsetof(struct dsa_completion_record, fault_addr));
    P("OPCODE_MEMMOVE", DSA_OPCODE_MEMMOVE); P("FLAG_BOF", IDXD_OP_FLAG_BOF);
    P("FLAG_CRAV", IDXD_OP_FLAG_CRAV); P("FLAG_RCR", IDXD_OP_FLAG_RCR); P("FLAG_CC", IDXD_OP_FLAG_CC);
    P("COMP_SUCCESS", DSA_COMP_SUCCESS); P("COMP_PAGE_FAULT_NOBOF", DSA_COMP_PAGE_FAULT_NOBOF);
    P("COMP_PAGE_FAULT_IR", DSA_COMP_PAGE_FAULT_IR); P("COMP_BAD_OPCODE", DSA_COMP_BAD_OPCODE);
    P("COMP_STATUS_MASK", DSA_COMP_STATUS_MASK);
    memset(&d, 0, sizeof d);
    d.opcode = DSA_OPCODE_MEMMOVE; d.flags = IDXD_OP_FLAG_CRAV | IDXD_OP_FLAG_RCR | IDXD_OP_FLAG_CC;
    d.completion_addr = 0x1122334455667788ULL; d.src_addr = 0x1000; d.dst_addr = 0x2000; d.xfer_size = 1500;
    printf("bytes");
    for (size_t i = 0; i < sizeof d; i++) printf(" %02x", ((unsigned char *)&d)[i]);
    printf("\n");
    return 0;
}
"#,
        )
        .unwrap();
        let exe = dir.join("idxd");
        let cc = Command::new("cc")
            .arg(&src)
            .arg("-o")
            .arg(&exe)
            .output()
            .expect("a C compiler (cc)");
        assert!(
            cc.status.success(),
            "{}",
            String::from_utf8_lossy(&cc.stderr)
        );
        let out = Command::new(&exe).output().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once(' ').map(|(k, v)| (k.to_owned(), v.to_owned())))
            .collect()
    }

    #[test]
    fn encoding_matches_linux_idxd_h() {
        let facts = header_facts();
        let num = |k: &str| facts[k].parse::<u64>().unwrap();
        assert_eq!(num("desc_size"), size_of::<HwDesc>() as u64);
        assert_eq!(num("comp_size"), size_of::<CompletionRecord>() as u64);
        assert_eq!(
            num("completion_addr"),
            std::mem::offset_of!(HwDesc, completion_addr) as u64
        );
        assert_eq!(
            num("src_addr"),
            std::mem::offset_of!(HwDesc, src_addr) as u64
        );
        assert_eq!(
            num("dst_addr"),
            std::mem::offset_of!(HwDesc, dst_addr) as u64
        );
        assert_eq!(
            num("xfer_size"),
            std::mem::offset_of!(HwDesc, xfer_size) as u64
        );
        assert_eq!(
            num("int_handle"),
            std::mem::offset_of!(HwDesc, int_handle) as u64
        );
        assert_eq!(
            num("status"),
            std::mem::offset_of!(CompletionRecord, status) as u64
        );
        assert_eq!(
            num("result"),
            std::mem::offset_of!(CompletionRecord, result) as u64
        );
        assert_eq!(
            num("bytes_completed"),
            std::mem::offset_of!(CompletionRecord, bytes_completed) as u64
        );
        assert_eq!(
            num("fault_addr"),
            std::mem::offset_of!(CompletionRecord, fault_addr) as u64
        );
        assert_eq!(num("OPCODE_MEMMOVE"), u64::from(OPCODE_MEMMOVE));
        assert_eq!(num("FLAG_BOF"), u64::from(FLAG_BOF));
        assert_eq!(num("FLAG_CRAV"), u64::from(FLAG_CRAV));
        assert_eq!(num("FLAG_RCR"), u64::from(FLAG_RCR));
        assert_eq!(num("FLAG_CC"), u64::from(FLAG_CC));
        assert_eq!(num("COMP_SUCCESS"), u64::from(COMP_SUCCESS));
        assert_eq!(
            num("COMP_PAGE_FAULT_NOBOF"),
            u64::from(COMP_PAGE_FAULT_NOBOF)
        );
        assert_eq!(num("COMP_PAGE_FAULT_IR"), u64::from(COMP_PAGE_FAULT_IR));
        assert_eq!(num("COMP_BAD_OPCODE"), u64::from(COMP_BAD_OPCODE));
        assert_eq!(num("COMP_STATUS_MASK"), u64::from(COMP_STATUS_MASK));

        // The same descriptor, built by the header's bitfields and by HwDesc, byte for byte.
        let desc = HwDesc::memmove(0x1000, 0x2000, 1500, 0x1122_3344_5566_7788);
        assert_eq!(desc.opcode(), OPCODE_MEMMOVE);
        assert_eq!(desc.flags(), FLAG_CRAV | FLAG_RCR | FLAG_CC);
        // SAFETY: HwDesc is repr(C), 64 bytes of integers with no padding.
        let ours: [u8; 64] = unsafe { std::mem::transmute(desc) };
        let theirs: Vec<u8> = facts["bytes"]
            .split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect();
        assert_eq!(ours.as_slice(), theirs.as_slice());
    }

    #[test]
    fn completion_statuses_decode() {
        assert_eq!(decode_status(0), None);
        assert_eq!(decode_status(COMP_SUCCESS), Some(OpStatus::Success));
        assert_eq!(
            decode_status(COMP_SUCCESS | 0x80),
            Some(OpStatus::Success),
            "the write bit is masked"
        );
        assert_eq!(
            decode_status(COMP_PAGE_FAULT_NOBOF),
            Some(OpStatus::Failed(DmaFault::PageFault))
        );
        assert_eq!(
            decode_status(0x11),
            Some(OpStatus::Failed(DmaFault::InvalidDescriptor))
        );
        assert_eq!(
            decode_status(0x1c),
            Some(OpStatus::Failed(DmaFault::InvalidDescriptor))
        );
        assert_eq!(
            decode_status(0x05),
            Some(OpStatus::Failed(DmaFault::Device(5)))
        );
        assert_eq!(
            decode_status(NOT_SUBMITTED),
            Some(OpStatus::Failed(DmaFault::NotSubmitted))
        );
    }

    #[test]
    fn a_missing_work_queue_is_reported_clearly() {
        let err = DsaChannel::open(Path::new("/dev/dsa/wq-xvio-none.0"), 64).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("no Intel DSA work queue at /dev/dsa/wq-xvio-none.0"),
            "{text}"
        );
        assert!(text.contains("use the sw channel"), "{text}");
    }
}
