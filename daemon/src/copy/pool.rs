//! The DMA channels of the daemon and which virtqueue each is bound to. A channel serves one
//! virtqueue at a time (DPDK's rule: completions are per channel, so two queues sharing one
//! would see each other's completions); binding it to a second is an error that names both.

use std::fmt;

use thiserror::Error;

use super::channel::DmaChannel;

/// A virtqueue, as the binding errors and stats name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueRef {
    /// The guest (its vhost-user socket or name).
    pub device: String,
    /// The virtqueue index.
    pub queue: u16,
}

impl fmt::Display for QueueRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} queue {}", self.device, self.queue)
    }
}

/// Binding failed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BindError {
    /// No channel by that name.
    #[error("no DMA channel named '{0}'")]
    Unknown(String),
    /// The channel serves another virtqueue.
    #[error("DMA channel '{channel}' is already bound to {bound_to}; unbind it there first")]
    AlreadyBound {
        /// The channel.
        channel: String,
        /// The queue it serves.
        bound_to: QueueRef,
    },
}

/// A channel bound to one virtqueue, with the threshold chosen for it.
#[derive(Debug)]
pub struct BoundChannel {
    slot: usize,
    queue: QueueRef,
    threshold: u32,
    channel: Box<dyn DmaChannel>,
}

impl BoundChannel {
    /// The channel's name.
    pub fn name(&self) -> &str {
        self.channel.name()
    }

    /// The queue it is bound to.
    pub fn queue(&self) -> &QueueRef {
        &self.queue
    }

    /// Copies shorter than this go to the CPU.
    pub fn threshold(&self) -> u32 {
        self.threshold
    }

    /// The channel.
    pub fn channel(&self) -> &dyn DmaChannel {
        self.channel.as_ref()
    }

    /// The channel, to copy with.
    pub fn channel_mut(&mut self) -> &mut dyn DmaChannel {
        self.channel.as_mut()
    }
}

#[derive(Debug)]
enum Slot {
    Free(Box<dyn DmaChannel>),
    Bound(QueueRef),
}

#[derive(Debug)]
struct Entry {
    name: String,
    threshold: u32,
    slot: Slot,
}

/// Every DMA channel of the daemon.
#[derive(Debug, Default)]
pub struct ChannelPool {
    entries: Vec<Entry>,
    /// Free channels kept for RX queues (even indexes) still to be bound: a TX queue gets a
    /// channel only beyond them (see [`ChannelPool::reserve_for_rx`]).
    rx_reserved: usize,
}

impl ChannelPool {
    /// An empty pool.
    pub fn new() -> ChannelPool {
        ChannelPool::default()
    }

    /// Adds a channel with its threshold (bytes; copies shorter go to the CPU).
    pub fn add(&mut self, channel: Box<dyn DmaChannel>, threshold: u32) {
        let name = channel.name().to_owned();
        self.entries.push(Entry {
            name,
            threshold,
            slot: Slot::Free(channel),
        });
    }

    /// Names and thresholds of the channels, with the queue each is bound to.
    pub fn list(&self) -> impl Iterator<Item = (&str, u32, Option<&QueueRef>)> {
        self.entries.iter().map(|e| {
            let bound = match &e.slot {
                Slot::Bound(q) => Some(q),
                Slot::Free(_) => None,
            };
            (e.name.as_str(), e.threshold, bound)
        })
    }

    /// Takes channel `name` for `queue`.
    pub fn bind(&mut self, name: &str, queue: QueueRef) -> Result<BoundChannel, BindError> {
        let (slot, entry) = self
            .entries
            .iter_mut()
            .enumerate()
            .find(|(_, e)| e.name == name)
            .ok_or_else(|| BindError::Unknown(name.to_owned()))?;
        match std::mem::replace(&mut entry.slot, Slot::Bound(queue.clone())) {
            Slot::Free(channel) => Ok(BoundChannel {
                slot,
                queue,
                threshold: entry.threshold,
                channel,
            }),
            Slot::Bound(bound_to) => {
                entry.slot = Slot::Bound(bound_to.clone());
                Err(BindError::AlreadyBound {
                    channel: name.to_owned(),
                    bound_to,
                })
            }
        }
    }

    /// Keeps `queues` free channels for RX queues to be bound later: until they are, TX
    /// queues (odd indexes) get only the channels beyond them. The daemon, which knows every
    /// guest at start, reserves one per RX queue of all of them, so that copies into guests
    /// (the larger) get channels before any copies out of them do.
    pub fn reserve_for_rx(&mut self, queues: usize) {
        self.rx_reserved = queues;
    }

    /// Takes the first free channel for `queue`, if any (for a TX queue, only beyond the
    /// channels reserved for RX queues).
    pub fn bind_any(&mut self, queue: QueueRef) -> Option<BoundChannel> {
        let is_rx = queue.queue.is_multiple_of(2);
        let free = self
            .entries
            .iter()
            .filter(|e| matches!(e.slot, Slot::Free(_)))
            .count();
        if !is_rx && free <= self.rx_reserved {
            return None;
        }
        // By position, not name: two `--dma cpu` channels have the same name.
        let slot = self
            .entries
            .iter()
            .position(|e| matches!(e.slot, Slot::Free(_)))?;
        let entry = &mut self.entries[slot];
        let Slot::Free(channel) = std::mem::replace(&mut entry.slot, Slot::Bound(queue.clone()))
        else {
            return None;
        };
        let bound = BoundChannel {
            slot,
            queue,
            threshold: entry.threshold,
            channel,
        };
        if is_rx {
            self.rx_reserved = self.rx_reserved.saturating_sub(1);
        }
        Some(bound)
    }

    /// Gives a channel back (after its engine drained it).
    pub fn release(&mut self, bound: BoundChannel) {
        if let Some(entry) = self.entries.get_mut(bound.slot) {
            entry.slot = Slot::Free(bound.channel);
        }
    }
}

/// Starting the configured channels failed.
#[derive(Debug, Error)]
#[error("starting --dma {spec}")]
pub struct StartError {
    /// The `--dma` value.
    pub spec: String,
    /// The cause.
    #[source]
    pub source: super::channel::DmaError,
}

impl ChannelPool {
    /// Starts one channel per `--dma` spec, each with `threshold` or, for `Auto`, the one
    /// calibration measures for it; logs what it chose and why.
    pub fn start(
        specs: &[crate::config::DmaSpec],
        threshold: crate::config::ThresholdArg,
    ) -> Result<ChannelPool, StartError> {
        use crate::config::{DmaSpec, ThresholdArg};
        let mut pool = ChannelPool::new();
        for (n, spec) in specs.iter().enumerate() {
            let err = |source| StartError {
                spec: spec.to_string(),
                source,
            };
            let mut channel: Box<dyn DmaChannel> = match spec {
                DmaSpec::Cpu => Box::new(super::cpu::CpuChannel::new()),
                DmaSpec::Sw { core } => {
                    let config = super::sw::SwConfig {
                        core: *core,
                        ..super::sw::SwConfig::default()
                    };
                    Box::new(super::sw::SwChannel::start(&format!("sw{n}"), &config).map_err(err)?)
                }
                #[cfg(all(feature = "dsa", target_arch = "x86_64"))]
                DmaSpec::Dsa { path } => {
                    Box::new(super::dsa::DsaChannel::open(path, 1024).map_err(err)?)
                }
                #[cfg(not(all(feature = "dsa", target_arch = "x86_64")))]
                DmaSpec::Dsa { .. } => {
                    return Err(err(super::channel::DmaError::Unavailable(
                        "this xvio was built without the `dsa` feature".into(),
                    )));
                }
            };
            let chosen = match threshold {
                ThresholdArg::Bytes(bytes) => {
                    tracing::info!(
                        channel = channel.name(),
                        threshold = bytes,
                        "DMA channel started (threshold set)"
                    );
                    bytes
                }
                ThresholdArg::Auto => {
                    let cal = super::calibrate::calibrate(channel.as_mut(), 2000).map_err(err)?;
                    let at = cal.points.iter().find(|p| p.size == cal.threshold);
                    tracing::info!(
                        channel = channel.name(),
                        threshold = %cal.describe(),
                        cpu_ns = at.map(|p| p.cpu_ns.round()),
                        offload_ns = at.map(|p| p.offload_ns.round()),
                        "DMA channel started; copy threshold measured (cold buffers)"
                    );
                    cal.threshold
                }
            };
            pool.add(channel, chosen);
        }
        Ok(pool)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy::cpu::CpuChannel;

    #[test]
    fn rx_queues_get_channels_before_tx_queues_and_same_named_channels_all_serve() {
        let mut pool = ChannelPool::new();
        pool.add(Box::new(CpuChannel::new()), 0);
        pool.add(Box::new(CpuChannel::new()), 0);
        pool.add(Box::new(CpuChannel::new()), 0);
        // Two guests of one queue pair each: both RX queues come first.
        pool.reserve_for_rx(2);
        let a_rx = pool.bind_any(q(0)).expect("A's RX queue");
        let a_tx = pool.bind_any(q(1)).expect("one channel beyond the reserve");
        assert!(
            pool.bind_any(q(1)).is_none(),
            "the last one is B's RX queue's"
        );
        let b_rx = pool
            .bind_any(q(0))
            .expect("B's RX queue, a channel named as the others");
        assert_eq!(pool.list().filter(|(_, _, b)| b.is_some()).count(), 3);
        for bound in [a_rx, a_tx, b_rx] {
            pool.release(bound);
        }
        assert!(pool.list().all(|(_, _, b)| b.is_none()));
    }

    fn q(n: u16) -> QueueRef {
        QueueRef {
            device: "vm1".into(),
            queue: n,
        }
    }

    #[test]
    fn a_channel_serves_one_queue_at_a_time() {
        let mut pool = ChannelPool::new();
        pool.add(Box::new(CpuChannel::new()), 256);
        let bound = pool.bind("cpu", q(0)).unwrap();
        assert_eq!(bound.threshold(), 256);
        let err = pool.bind("cpu", q(1)).unwrap_err();
        assert_eq!(
            err,
            BindError::AlreadyBound {
                channel: "cpu".into(),
                bound_to: q(0)
            }
        );
        assert_eq!(
            err.to_string(),
            "DMA channel 'cpu' is already bound to vm1 queue 0; unbind it there first"
        );
        assert_eq!(pool.list().next().unwrap().2, Some(&q(0)));
        pool.release(bound);
        assert!(pool.bind("cpu", q(1)).is_ok());
        assert_eq!(
            pool.bind("dsa0", q(1)).unwrap_err(),
            BindError::Unknown("dsa0".into())
        );
    }
}
