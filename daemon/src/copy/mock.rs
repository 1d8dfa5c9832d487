//! A scripted DMA channel for tests: it executes submitted operations in random order and
//! random amounts per poll, fails chosen ones after scribbling over their destination,
//! refuses enqueues, runs out of capacity and fails submits, all from a seed; and it reports
//! completions in order, as the channel contract requires.

use std::{collections::VecDeque, os::fd::BorrowedFd};

use super::channel::{ChannelKind, Completed, DmaChannel, DmaError, DmaFault, OpStatus};

/// What the mock does; probabilities are per mille.
#[derive(Clone, Debug)]
pub struct Script {
    pub seed: u64,
    /// Operations it holds at most (enqueued and not yet reported).
    pub capacity: u16,
    /// Executed operations that fail (after writing garbage).
    pub fail: u16,
    /// Enqueues refused although there is room.
    pub refuse_enqueue: u16,
    /// Submits that fail (their operations are reported `NotSubmitted`).
    pub fail_submit: u16,
    /// Operations executed per poll at most (0: it never progresses).
    pub progress: usize,
}

impl Default for Script {
    fn default() -> Script {
        Script {
            seed: 1,
            capacity: 64,
            fail: 0,
            refuse_enqueue: 0,
            fail_submit: 0,
            progress: 8,
        }
    }
}

#[derive(Debug)]
struct Op {
    src: *const u8,
    dst: *mut u8,
    len: u32,
    submitted: bool,
    result: Option<OpStatus>,
}

/// The scripted channel.
#[derive(Debug)]
pub struct MockChannel {
    script: Script,
    rng: u64,
    ops: VecDeque<Op>,
    next_idx: u16,
    /// Index of the first op in `ops`.
    head_idx: u16,
}

// SAFETY: the raw pointers are only used under DmaChannel::copy's contract, which keeps the
// memory valid until the operation is reported, whichever thread holds the channel.
unsafe impl Send for MockChannel {}

impl MockChannel {
    pub fn new(script: Script) -> MockChannel {
        let rng = script.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        MockChannel {
            script,
            rng,
            ops: VecDeque::new(),
            next_idx: 0,
            head_idx: 0,
        }
    }

    fn roll(&mut self, per_mille: u16) -> bool {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng % 1000) < u64::from(per_mille)
    }

    fn below(&mut self, n: usize) -> usize {
        self.roll(0);
        (self.rng % n as u64) as usize
    }

    /// Executes some submitted operations, in random order.
    fn progress(&mut self) {
        for _ in 0..self.script.progress {
            let pending: usize = self
                .ops
                .iter()
                .filter(|o| o.submitted && o.result.is_none())
                .count();
            if pending == 0 {
                return;
            }
            let pick = self.below(pending);
            let fail = self.roll(self.script.fail);
            let op = self
                .ops
                .iter_mut()
                .filter(|o| o.submitted && o.result.is_none())
                .nth(pick)
                .unwrap();
            if fail {
                // SAFETY: dst is writable for len bytes (copy's contract); scribble on half.
                unsafe { std::ptr::write_bytes(op.dst, 0xee, (op.len / 2) as usize) };
                op.result = Some(OpStatus::Failed(DmaFault::PageFault));
            } else {
                // SAFETY: copy's contract.
                unsafe { std::ptr::copy_nonoverlapping(op.src, op.dst, op.len as usize) };
                op.result = Some(OpStatus::Success);
            }
        }
    }
}

impl DmaChannel for MockChannel {
    fn kind(&self) -> ChannelKind {
        ChannelKind::Mock
    }

    fn name(&self) -> &str {
        "mock"
    }

    unsafe fn copy(&mut self, src: *const u8, dst: *mut u8, len: u32) -> Result<u16, DmaError> {
        if self.ops.len() >= usize::from(self.script.capacity)
            || self.roll(self.script.refuse_enqueue)
        {
            return Err(DmaError::Full);
        }
        self.ops.push_back(Op {
            src,
            dst,
            len,
            submitted: false,
            result: None,
        });
        let idx = self.next_idx;
        self.next_idx = self.next_idx.wrapping_add(1);
        Ok(idx)
    }

    fn submit(&mut self) -> Result<(), DmaError> {
        let fail = self.roll(self.script.fail_submit);
        for op in self.ops.iter_mut().filter(|o| !o.submitted) {
            op.submitted = true;
            if fail {
                op.result = Some(OpStatus::Failed(DmaFault::NotSubmitted));
            }
        }
        if fail {
            Err(DmaError::Submit("scripted".into()))
        } else {
            Ok(())
        }
    }

    fn completed(&mut self, max: u16) -> Completed {
        self.progress();
        let mut done = Completed::default();
        while done.count < max {
            match self.ops.front().and_then(|o| o.result) {
                Some(OpStatus::Success) => {
                    self.ops.pop_front();
                    done.last_idx = self.head_idx;
                    self.head_idx = self.head_idx.wrapping_add(1);
                    done.count += 1;
                }
                Some(OpStatus::Failed(_)) => {
                    done.has_error = true;
                    break;
                }
                None => break,
            }
        }
        done
    }

    fn completed_status(&mut self, status: &mut [OpStatus]) -> u16 {
        self.progress();
        let mut n = 0;
        while n < status.len() {
            let Some(result) = self.ops.front().and_then(|o| o.result) else {
                break;
            };
            self.ops.pop_front();
            self.head_idx = self.head_idx.wrapping_add(1);
            status[n] = result;
            n += 1;
        }
        n as u16
    }

    fn burst_capacity(&self) -> u16 {
        self.script.capacity.saturating_sub(self.ops.len() as u16)
    }

    fn completion_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}
