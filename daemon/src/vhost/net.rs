//! virtio-net facts the backend needs: feature bits, the header, the config space.

use virtio_bindings::{
    virtio_config::VIRTIO_F_VERSION_1,
    virtio_net::{
        VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
    },
    virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC},
};

/// Bytes of `struct virtio_net_hdr_mrg_rxbuf`, the header of every frame once VERSION_1 is
/// negotiated (with or without MRG_RXBUF).
pub const HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
pub const HDR_NUM_BUFFERS: usize = 10;
/// The largest frame (without the header) the backend moves: a 9000-byte MTU plus Ethernet
/// and one VLAN tag. Longer chains from a guest are dropped and counted.
pub const MAX_FRAME: usize = 9018;
/// Entries of each virtqueue.
pub const QUEUE_SIZE: u16 = 1024;

/// The virtio features offered: VERSION_1, MAC, STATUS, MRG_RXBUF, EVENT_IDX, INDIRECT_DESC,
/// and MQ with CTRL_VQ as the spec requires, when `queue_pairs > 1`.
pub fn features(queue_pairs: u16) -> u64 {
    let mut f = 1u64 << VIRTIO_F_VERSION_1
        | 1 << VIRTIO_NET_F_MAC
        | 1 << VIRTIO_NET_F_STATUS
        | 1 << VIRTIO_NET_F_MRG_RXBUF
        | 1 << VIRTIO_RING_F_EVENT_IDX
        | 1 << VIRTIO_RING_F_INDIRECT_DESC;
    if queue_pairs > 1 {
        f |= 1 << VIRTIO_NET_F_MQ | 1 << VIRTIO_NET_F_CTRL_VQ;
    }
    f
}

/// Whether `features` include MRG_RXBUF.
pub fn mrg_rxbuf(features: u64) -> bool {
    features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0
}

/// The device config space: `mac[6]`, `status`, `max_virtqueue_pairs` (little endian).
pub fn config_space(mac: [u8; 6], queue_pairs: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[..6].copy_from_slice(&mac);
    c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
    c[8..10].copy_from_slice(&queue_pairs.to_le_bytes());
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mq_comes_with_ctrl_vq() {
        assert_eq!(features(1) & (1 << VIRTIO_NET_F_MQ), 0);
        assert_ne!(features(2) & (1 << VIRTIO_NET_F_MQ), 0);
        assert_ne!(features(2) & (1 << VIRTIO_NET_F_CTRL_VQ), 0);
        assert!(mrg_rxbuf(features(1)));
    }

    #[test]
    fn config_space_layout() {
        let c = config_space([2, 0, 0, 0, 0, 1], 4);
        assert_eq!(&c[..6], &[2, 0, 0, 0, 0, 1]);
        assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1);
        assert_eq!(u16::from_le_bytes([c[8], c[9]]), 4);
    }
}
