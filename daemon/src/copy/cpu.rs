//! `cpu`: the DMA channel interface over a plain memcpy on the calling core. Every copy is
//! done inside `copy` and completes at once; it exists so that one code path serves machines
//! with and without a DMA engine, and as the baseline the others are measured against.

use std::os::fd::BorrowedFd;

use super::channel::{ChannelKind, Completed, DmaChannel, DmaError, OpStatus};

/// A synchronous memcpy behind the channel interface.
#[derive(Debug, Default)]
pub struct CpuChannel {
    next_idx: u16,
    /// Copies done and not yet reported.
    unreported: u32,
}

impl CpuChannel {
    /// A new channel.
    pub fn new() -> CpuChannel {
        CpuChannel::default()
    }
}

impl DmaChannel for CpuChannel {
    fn kind(&self) -> ChannelKind {
        ChannelKind::Cpu
    }

    fn name(&self) -> &str {
        "cpu"
    }

    unsafe fn copy(&mut self, src: *const u8, dst: *mut u8, len: u32) -> Result<u16, DmaError> {
        if self.unreported >= u32::from(u16::MAX) {
            return Err(DmaError::Full);
        }
        // SAFETY: the caller guarantees (trait contract) that `src` is readable and `dst`
        // writable for `len` bytes and that they do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, len as usize) };
        let idx = self.next_idx;
        self.next_idx = self.next_idx.wrapping_add(1);
        self.unreported += 1;
        Ok(idx)
    }

    fn submit(&mut self) -> Result<(), DmaError> {
        Ok(())
    }

    fn completed(&mut self, max: u16) -> Completed {
        let count = self.unreported.min(u32::from(max)) as u16;
        self.unreported -= u32::from(count);
        let last_idx = self
            .next_idx
            .wrapping_sub(1)
            .wrapping_sub(self.unreported as u16);
        Completed {
            count,
            last_idx,
            has_error: false,
        }
    }

    fn completed_status(&mut self, status: &mut [OpStatus]) -> u16 {
        let max = u16::try_from(status.len()).unwrap_or(u16::MAX);
        let done = self.completed(max);
        status[..usize::from(done.count)].fill(OpStatus::Success);
        done.count
    }

    fn burst_capacity(&self) -> u16 {
        u16::MAX - self.unreported as u16
    }

    fn completion_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_at_once_and_reports_in_order() {
        let src: Vec<u8> = (0..100).collect();
        let mut dst = vec![0u8; 100];
        let mut ch = CpuChannel::new();
        for i in 0..4 {
            // SAFETY: disjoint 25-byte ranges of two live vectors.
            let idx =
                unsafe { ch.copy(src.as_ptr().add(i * 25), dst.as_mut_ptr().add(i * 25), 25) }
                    .unwrap();
            assert_eq!(idx, i as u16);
        }
        ch.submit().unwrap();
        assert_eq!(src, dst);
        assert_eq!(
            ch.completed(3),
            Completed {
                count: 3,
                last_idx: 2,
                has_error: false
            }
        );
        let mut st = [OpStatus::Failed(super::super::channel::DmaFault::PageFault); 4];
        assert_eq!(ch.completed_status(&mut st), 1);
        assert_eq!(st[0], OpStatus::Success);
        assert_eq!(ch.completed(8).count, 0);
    }

    #[test]
    fn scatter_gather_is_all_or_nothing() {
        let src = [1u8, 2, 3, 4, 5, 6];
        let mut dst = [0u8; 6];
        let mut ch = CpuChannel::new();
        let segs = [
            (src.as_ptr(), dst.as_mut_ptr(), 2u32),
            (src[2..].as_ptr(), dst[2..].as_mut_ptr(), 4),
        ];
        // SAFETY: disjoint ranges of two live arrays.
        assert_eq!(unsafe { ch.copy_sg(&segs) }, Ok(1));
        assert_eq!(dst, src);
        // SAFETY: nothing is copied.
        assert_eq!(unsafe { ch.copy_sg(&[]) }, Err(DmaError::Full));
    }
}
