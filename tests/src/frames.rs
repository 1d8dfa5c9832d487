//! Ethernet frames for tests.

/// EtherType of IPv4, used for filler frames.
pub const ETH_P_IP: u16 = 0x0800;
/// EtherType of an experimental protocol (IEEE 802 local experimental 1): the kernel
/// drops such frames quietly, which suits frames that only XDP should see.
pub const ETH_P_EXPERIMENTAL: u16 = 0x88b5;

/// A frame of `len` bytes (at least 14, or 18 when tagged) to `dst` from `src`, with an
/// optional 802.1Q tag; the payload carries `seq` and then a byte pattern derived from it.
pub fn frame(
    dst: [u8; 6],
    src: [u8; 6],
    vlan: Option<u16>,
    ethertype: u16,
    len: usize,
    seq: u32,
) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    if let Some(vid) = vlan {
        f.extend_from_slice(&0x8100u16.to_be_bytes());
        f.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(&seq.to_be_bytes());
    let mut x = seq.wrapping_mul(2_654_435_761);
    while f.len() < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        f.push(x as u8);
    }
    f.truncate(len.max(if vlan.is_some() { 18 } else { 14 }));
    f
}

/// The `seq` that [`frame`] wrote into an untagged frame, if the frame is long enough.
pub fn seq_of(frame: &[u8]) -> Option<u32> {
    let bytes = frame.get(14..18)?;
    Some(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

/// Offset of the sequence number in [`ipv4_udp`] frames (after Ethernet, IPv4 and UDP headers).
pub const UDP_SEQ_AT: usize = 42;

/// An IPv4/UDP frame of `len` bytes (at least 46) from 10.252.0.2:`sport` to
/// 10.252.0.1:`dport`, the payload starting with `seq`. Real headers, so that the kernel's
/// flow hash spreads different ports over queues; checksums are left zero (UDP allows it).
pub fn ipv4_udp(
    dst: [u8; 6],
    src: [u8; 6],
    sport: u16,
    dport: u16,
    len: usize,
    seq: u32,
) -> Vec<u8> {
    let len = len.max(UDP_SEQ_AT + 4);
    let mut f = frame(dst, src, None, ETH_P_IP, len, seq);
    let ip_len = (len - 14) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17; // UDP
    ip[12..16].copy_from_slice(&[10, 252, 0, 2]);
    ip[16..20].copy_from_slice(&[10, 252, 0, 1]);
    let sum = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let folded = !((sum & 0xffff) + (sum >> 16)) as u16;
    ip[10..12].copy_from_slice(&folded.to_be_bytes());
    f[14..34].copy_from_slice(&ip);
    f[34..36].copy_from_slice(&sport.to_be_bytes());
    f[36..38].copy_from_slice(&dport.to_be_bytes());
    f[38..40].copy_from_slice(&(ip_len - 20).to_be_bytes());
    f[40..42].copy_from_slice(&[0, 0]);
    f[UDP_SEQ_AT..UDP_SEQ_AT + 4].copy_from_slice(&seq.to_be_bytes());
    f
}
