//! Tests of the DSA channel: the encoding against `linux/idxd.h`, the work queue's sysfs
//! attributes, and, through a mock portal whose "device" queues, drops and completes
//! descriptors as a dedicated work queue does, the three invariants in the module doc.

use std::{
    collections::{HashMap, VecDeque},
    os::fd::{AsFd, OwnedFd},
    path::PathBuf,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

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

/// Writes a fresh sysfs directory for a work queue with these attribute files.
fn sysfs(tag: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("xvio-wq-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
    dir
}

#[test]
fn the_work_queue_attributes_come_from_sysfs() {
    let dir = sysfs(
        "ded",
        &[
            ("mode", "dedicated\n"),
            ("size", "16\n"),
            ("max_transfer_size", "2097152\n"),
        ],
    );
    assert_eq!(
        WqAttrs::read(&dir).unwrap(),
        WqAttrs {
            dedicated: true,
            size: 16,
            max_transfer: 2 << 20
        }
    );
    std::fs::write(dir.join("mode"), "shared\n").unwrap();
    assert!(!WqAttrs::read(&dir).unwrap().dedicated);

    std::fs::write(dir.join("size"), "0\n").unwrap();
    let text = WqAttrs::read(&dir).unwrap_err().to_string();
    assert!(
        text.contains("is not configured") && text.contains("accel-config"),
        "{text}"
    );

    std::fs::write(dir.join("size"), "lots\n").unwrap();
    let text = WqAttrs::read(&dir).unwrap_err().to_string();
    assert!(text.contains("size holds \"lots\", not a number"), "{text}");

    std::fs::remove_file(dir.join("max_transfer_size")).unwrap();
    std::fs::write(dir.join("size"), "16\n").unwrap();
    let text = WqAttrs::read(&dir).unwrap_err().to_string();
    assert!(text.contains("max_transfer_size"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The test's device: it queues what the channel writes to its portal, drops (silently, as
/// a dedicated work queue does) what arrives while its `size` entries are taken, and
/// executes queued descriptors when the test says so.
#[derive(Debug, Default)]
struct Device {
    size: usize,
    queue: VecDeque<HwDesc>,
    dropped: usize,
    most_queued: usize,
}

#[derive(Clone, Debug)]
struct MockPortal(Arc<Mutex<Device>>);

impl Portal for MockPortal {
    fn write(&mut self, desc: &HwDesc) -> bool {
        let mut dev = self.0.lock().unwrap();
        if dev.queue.len() >= dev.size {
            dev.dropped += 1;
        } else {
            dev.queue.push_back(*desc);
            dev.most_queued = dev.most_queued.max(dev.queue.len());
        }
        true
    }
}

impl MockPortal {
    /// Executes the oldest `n` queued descriptors: copies, then writes the completion
    /// record, as the device does. Returns how many it executed.
    fn complete(&self, n: usize) -> usize {
        let mut dev = self.0.lock().unwrap();
        let mut done = 0;
        while done < n {
            let Some(desc) = dev.queue.pop_front() else {
                break;
            };
            // SAFETY: every test keeps the source and destination of its copies alive
            // until the device has executed them, and the completion record lives in the
            // channel's ring until the channel is dropped, after which it is leaked (the
            // only test that completes after a drop checks the leak first).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    desc.src_addr as *const u8,
                    desc.dst_addr as *mut u8,
                    desc.xfer_size as usize,
                );
                std::ptr::write_volatile(desc.completion_addr as *mut u8, COMP_SUCCESS);
            }
            done += 1;
        }
        done
    }

    fn device(&self) -> std::sync::MutexGuard<'_, Device> {
        self.0.lock().unwrap()
    }
}

fn mock(
    dedicated: bool,
    size: u32,
    ring: u16,
    poll: Duration,
    drop_wait: Duration,
) -> (DsaChannel, MockPortal) {
    let portal = MockPortal(Arc::new(Mutex::new(Device {
        // A shared queue pushes back instead of dropping; the mock models dedicated ones.
        size: if dedicated { size as usize } else { usize::MAX },
        ..Device::default()
    })));
    let wq = WqAttrs {
        dedicated,
        size,
        max_transfer: 4096,
    };
    let ch = DsaChannel::with_portal(
        "dsa/mock".into(),
        wq,
        ring,
        Box::new(portal.clone()),
        poll,
        drop_wait,
    )
    .unwrap();
    (ch, portal)
}

/// Enqueues copy `i` of `len` bytes between the two buffers.
fn copy_one(ch: &mut DsaChannel, src: &[u8], dst: &mut [u8], i: usize, len: usize) -> bool {
    // SAFETY: both ranges are inside live test buffers that outlive the channel's use of
    // them (every test completes or leaks its copies before the buffers go).
    match unsafe {
        ch.copy(
            src[i * len..].as_ptr(),
            dst[i * len..].as_mut_ptr(),
            len as u32,
        )
    } {
        Ok(_) => true,
        Err(DmaError::Full) => false,
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn a_dedicated_queue_never_gets_more_than_its_size() {
    const COPIES: usize = 300;
    const LEN: usize = 64;
    let (mut ch, dev) = mock(true, 8, 64, POLL_INTERVAL, DROP_WAIT);
    assert_eq!(ch.burst_capacity(), 8, "min(ring 64, queue size 8)");
    let src: Vec<u8> = (0..COPIES * LEN).map(|i| (i * 7 + 1) as u8).collect();
    let mut dst = vec![0u8; COPIES * LEN];
    let (mut next, mut reported, mut rng) = (0usize, 0usize, 0x2545_f491_u64);
    for _ in 0..10_000 {
        if reported == COPIES {
            break;
        }
        while next < COPIES && copy_one(&mut ch, &src, &mut dst, next, LEN) {
            next += 1;
        }
        ch.submit().unwrap();
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        dev.complete(1 + (rng % 6) as usize);
        reported += usize::from(ch.completed(u16::MAX).count);
    }
    let d = dev.device();
    assert_eq!(
        d.dropped, 0,
        "descriptors written past the queue's size are lost"
    );
    assert!(d.most_queued <= 8, "{}", d.most_queued);
    drop(d);
    assert_eq!(reported, COPIES);
    assert!(src == dst, "every copy landed");
}

#[test]
fn a_full_dedicated_queue_refuses_copies_until_some_are_reported() {
    let (mut ch, dev) = mock(true, 4, 1024, POLL_INTERVAL, DROP_WAIT);
    let src = vec![1u8; 64 * 8];
    let mut dst = vec![0u8; 64 * 8];
    for i in 0..4 {
        assert!(copy_one(&mut ch, &src, &mut dst, i, 64));
    }
    assert!(
        !copy_one(&mut ch, &src, &mut dst, 4, 64),
        "a fifth copy is refused"
    );
    assert_eq!(ch.burst_capacity(), 0);
    ch.submit().unwrap();
    dev.complete(3);
    assert_eq!(
        ch.burst_capacity(),
        0,
        "finished but unreported copies still hold entries"
    );
    assert_eq!(ch.completed(u16::MAX).count, 3);
    assert_eq!(ch.burst_capacity(), 3);
    dev.complete(1);
    assert_eq!(ch.completed(u16::MAX).count, 1);
    assert_eq!(dev.device().dropped, 0);
}

#[test]
fn a_shared_queue_is_bounded_by_the_ring_and_transfers_by_the_queue() {
    let (mut ch, _dev) = mock(false, 8, 64, POLL_INTERVAL, DROP_WAIT);
    assert_eq!(
        ch.burst_capacity(),
        64,
        "ENQCMD pushes back; the ring bounds it"
    );
    let src = vec![0u8; 8192];
    let mut dst = vec![0u8; 8192];
    // SAFETY: the copy is refused, nothing is enqueued.
    let err = unsafe { ch.copy(src.as_ptr(), dst.as_mut_ptr(), 4097) }.unwrap_err();
    assert_eq!(
        err,
        DmaError::TooLong {
            len: 4097,
            max: 4096
        }
    );
}

/// Whether `fd` becomes readable within `ms` milliseconds.
fn readable(fd: &OwnedFd, ms: u16) -> bool {
    let mut fds = [nix::poll::PollFd::new(
        fd.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)).unwrap() == 1
}

#[test]
fn the_completion_timer_fires_only_while_copies_are_outstanding() {
    let (mut ch, dev) = mock(true, 16, 64, Duration::from_micros(100), DROP_WAIT);
    let fd = ch
        .completion_fd()
        .expect("a waiter needs an fd to wait on")
        .try_clone_to_owned()
        .unwrap();
    ch.arm_notification();
    assert!(!readable(&fd, 5), "nothing outstanding: no wake-ups");

    let src = vec![3u8; 64];
    let mut dst = vec![0u8; 64];
    assert!(copy_one(&mut ch, &src, &mut dst, 0, 64));
    ch.submit().unwrap();
    ch.arm_notification();
    assert!(readable(&fd, 10_000), "the timer wakes the waiter");
    ch.clear_notification();
    assert!(!readable(&fd, 0), "cleared");
    dev.complete(1);
    assert_eq!(ch.completed(u16::MAX).count, 1);
    ch.arm_notification();
    assert!(!readable(&fd, 5), "nothing outstanding again");
}

#[test]
fn a_waiter_on_the_completion_fd_sees_a_silent_completion() {
    let (mut ch, dev) = mock(true, 16, 64, POLL_INTERVAL, DROP_WAIT);
    let fd = ch.completion_fd().unwrap().try_clone_to_owned().unwrap();
    let src = vec![5u8; 4 * 64];
    let mut dst = vec![0u8; 4 * 64];
    for i in 0..4 {
        assert!(copy_one(&mut ch, &src, &mut dst, i, 64));
    }
    ch.submit().unwrap();
    // The device finishes later and tells no one, as a user work queue does.
    let device = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(2));
        dev.complete(4)
    });
    // The vhost RX worker's loop: clear, poll the channel, re-arm while copies are in
    // flight, sleep on the fd (with no timeout of its own).
    let mut seen = 0;
    let mut wakeups = 0;
    while seen < 4 {
        ch.clear_notification();
        seen += ch.completed(u16::MAX).count;
        if seen == 4 {
            break;
        }
        ch.arm_notification();
        assert!(
            readable(&fd, 10_000),
            "the waiter slept 10 s with copies done"
        );
        wakeups += 1;
    }
    assert_eq!(device.join().unwrap(), 4);
    assert!(wakeups > 0);
    assert!(src == dst);
}

#[test]
fn drop_waits_for_the_device_to_finish() {
    let src = vec![9u8; 4 * 64];
    let mut dst = vec![0u8; 4 * 64];
    let (mut ch, dev) = mock(true, 16, 64, POLL_INTERVAL, Duration::from_secs(10));
    for i in 0..4 {
        assert!(copy_one(&mut ch, &src, &mut dst, i, 64));
    }
    ch.submit().unwrap();
    let dropped = Arc::new(AtomicBool::new(false));
    let device = std::thread::spawn({
        let dropped = Arc::clone(&dropped);
        move || {
            std::thread::sleep(Duration::from_millis(20));
            if dropped.load(Ordering::SeqCst) {
                // The channel is gone: its completion records were freed under us.
                return false;
            }
            dev.complete(4);
            true
        }
    });
    drop(ch);
    dropped.store(true, Ordering::SeqCst);
    assert!(
        device.join().unwrap(),
        "drop returned while the device still owed completion records"
    );
    assert!(src == dst);
}

#[test]
fn drop_leaks_the_records_a_device_never_completes() {
    let src = vec![4u8; 3 * 64];
    let mut dst = vec![0u8; 3 * 64];
    let before = LEAKED_RECORDS.load(Ordering::SeqCst);
    let (mut ch, dev) = mock(true, 16, 16, POLL_INTERVAL, Duration::from_millis(20));
    for i in 0..3 {
        assert!(copy_one(&mut ch, &src, &mut dst, i, 64));
    }
    ch.submit().unwrap();
    drop(ch);
    // No other test leaks, so the counter moved by this channel's ring alone.
    assert_eq!(LEAKED_RECORDS.load(Ordering::SeqCst) - before, 16);
    // The device finishing late writes into memory that is still allocated.
    assert_eq!(dev.complete(3), 3);
    assert!(src == dst);
}

#[test]
fn dropping_a_channel_with_nothing_owed_does_not_wait() {
    let (mut ch, dev) = mock(true, 16, 16, POLL_INTERVAL, Duration::from_secs(10));
    let src = vec![4u8; 64];
    let mut dst = vec![0u8; 64];
    assert!(copy_one(&mut ch, &src, &mut dst, 0, 64));
    ch.submit().unwrap();
    dev.complete(1);
    let start = Instant::now();
    drop(ch);
    assert!(start.elapsed() < Duration::from_secs(10));
}
