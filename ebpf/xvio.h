/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * xvio.h: every type the XDP program shares with the daemon.
 *
 * The Rust mirror of this file is common/src/lib.rs; the test
 * common_matches_btf checks sizes, field offsets and enum values of both
 * against the BTF of the compiled object. Change them together.
 */
#ifndef XVIO_H
#define XVIO_H

#include <linux/types.h>

/* Limits of the maps (entries). */
#define XVIO_STEER_MAX 4096
#define XVIO_STEER_SLOTS 1024 /* entries of steer_index (a power of two) */
#define XVIO_XSKS_MAX 64
#define XVIO_GUESTS_MAX 256
#define XVIO_EVENTS_BYTES (64 * 1024)
/* Kernel events of one kind are emitted at most once per this period, per CPU. */
#define XVIO_EVENT_PERIOD_NS 1000000000ULL

/* Index into xdp_stats: the outcome of one frame. Each frame counts exactly once. */
enum xvio_xdp_outcome {
	XVIO_XDP_PASSED = 0,      /* unicast to a MAC that is not steered: kernel stack */
	XVIO_XDP_REDIRECTED = 1,  /* steered and handed to the AF_XDP socket of its rx queue */
	XVIO_XDP_NO_SOCKET = 2,   /* steered, but no socket for that rx queue: kernel stack */
	XVIO_XDP_MALFORMED = 3,   /* shorter than its Ethernet (+802.1Q) header: kernel stack */
	XVIO_XDP_BROADCAST = 4,   /* ff:ff:ff:ff:ff:ff: kernel stack */
	XVIO_XDP_MULTICAST = 5,   /* group bit set, not broadcast: kernel stack */
	XVIO_XDP_OUTCOMES = 6,
};

/* Value of xdp_stats (per CPU). */
struct xvio_xdp_stats {
	__u64 packets;
	__u64 bytes;
};

/* Key of steer: a guest's MAC on one VLAN (vlan 0: untagged or priority-tagged). */
struct xvio_steer_key {
	__u8 mac[6];
	__u16 vlan;
};

/* Value of steer. */
struct xvio_steer_value {
	__u32 guest_id; /* the daemon's id of the guest port, for its own bookkeeping */
	__u32 flags;    /* reserved, 0 */
};

/*
 * Value of steer_index[xvio_steer_slot(key)]: how many steered keys have this
 * slot, and the key when it is one, so that the program decides most frames
 * with one array lookup instead of hashing: no key, not steered; one key, steered
 * if it is that key; more, steer (which holds every key) decides.
 */
struct xvio_steer_slot {
	struct xvio_steer_key key; /* the slot's key when keys is 1 */
	__u32 keys;     /* 0, 1, or 2 for more than one (written after key) */
	__u32 guest_id; /* as in steer, when keys is 1 (for bpftool; the program does not read it) */
};

/* The program compares a key with a slot's as one 8-byte word. */
_Static_assert(sizeof(struct xvio_steer_key) == 8, "xvio_steer_key is 8 bytes");

/* The slot of key in steer_index: the MAC's last two bytes, its fourth, and the VLAN. */
static inline __u32 xvio_steer_slot(const struct xvio_steer_key *key)
{
	__u32 h = ((__u32)key->mac[4] << 8 | key->mac[5]) ^ ((__u32)key->mac[3] << 2) ^ key->vlan;

	return h & (XVIO_STEER_SLOTS - 1);
}

/* Value of guest_stats[guest id]: one vhost-user guest, written by the daemon. */
struct xvio_guest_stats {
	__u32 active;            /* 1 while the guest's port exists */
	__u32 connected;         /* 1 while a vhost-user frontend is connected */
	__u8 mac[6];             /* the guest's MAC */
	__u16 queue_pairs;
	__u32 ready;             /* 1 while the datapath delivers frames to it (memory and an RX queue up) */
	__u64 to_guest_packets;  /* frames written into the guest */
	__u64 to_guest_bytes;
	__u64 from_guest_packets; /* frames the guest sent that were forwarded (guests, wire) */
	__u64 from_guest_bytes;
	__u64 to_guest_dropped_full;  /* frames for the guest dropped: no RX buffers for them */
	__u64 to_guest_dropped_small; /* … its RX buffer was too small (no MRG_RXBUF) */
	__u64 to_guest_dropped_reset; /* … its RX queue was stopped, reset or not started */
	__u64 from_guest_no_route;    /* frames the guest sent to no one (no guest, no interface) */
	__u64 from_guest_oversize;    /* … longer than the datapath moves */
	__u64 from_guest_dropped_full; /* … the interface's transmit frames or ring were full */
	__u64 malformed_chains;  /* descriptor chains outside memory, looping, too short… */
	__u64 broken_queues;     /* queues stopped for an inconsistent avail index */
	__u64 copy_cpu;          /* RX copies done by the CPU (below the threshold, or fallback) */
	__u64 copy_cpu_bytes;
	__u64 copy_dma;          /* RX copies done by the guest's DMA channel */
	__u64 copy_dma_bytes;
	__u64 copy_fallback_full;    /* meant for the channel, done by the CPU: channel full */
	__u64 copy_fallback_enqueue; /* … the channel refused the copy */
	__u64 copy_fallback_error;   /* … the channel reported the copy failed */
	__u64 copy_fallback_submit;  /* … the doorbell failed */
	__u64 copy_inflight;     /* frames whose RX copies are in flight */
	__u64 from_guest_dropped_reset; /* frames the guest sent, dropped: copies in flight at a TX queue stop or reset that the channel did not finish in time */
	__u64 to_guest_dropped_malformed; /* frames for the guest dropped: its RX chain was malformed (also counted in malformed_chains) */
};

/* How the program is attached (daemon_stats.xdp_mode). */
enum xvio_xdp_mode {
	XVIO_XDP_MODE_NONE = 0,
	XVIO_XDP_MODE_NATIVE = 1,
	XVIO_XDP_MODE_GENERIC = 2,
};

/* Value of daemon_stats[0]: written by the daemon about once a second. */
struct xvio_daemon_stats {
	__u64 uptime_ms;         /* since the daemon started */
	__u64 updated_unix_ms;   /* wall clock of this write: a stale value means a dead daemon */
	__u32 pid;               /* the daemon's process id */
	__u32 ifaces_attached;   /* interfaces this daemon has attached */
	enum xvio_xdp_mode xdp_mode; /* how the program is attached to this interface */
	__u32 steer_entries;     /* entries the daemon put in steer */
	__u32 xsk_sockets;       /* AF_XDP sockets open on this interface (one per rx queue) */
	__u32 xsk_zero_copy;     /* how many of them the driver bound in zero-copy mode */
	/* The daemon's guests, summed over guest_stats (the same in every interface's map). */
	__u32 guests;            /* vhost-user guest ports served */
	__u32 guests_connected;  /* of them, with a frontend connected */
	__u64 to_guests_packets; /* frames written into guests */
	__u64 from_guests_packets; /* frames guests sent that were forwarded */
	__u64 guests_dropped;    /* the guests' to_guest_dropped_* and from_guest_* drops, summed */
	__u64 guests_malformed_chains;
	__u64 copy_cpu;          /* guest RX copies the copy engine gave the CPU (guests with a channel) */
	__u64 copy_dma;          /* guest RX copies done by DMA channels */
	__u64 copy_fallbacks;    /* meant for a channel, done by the CPU (all four reasons) */
	__u64 copy_inflight;     /* frames whose RX copies are in flight */
	__u64 group_frames;      /* broadcast/multicast frames this interface's tap read */
	__u64 group_dropped;     /* lost before the guests: the tap socket's kernel drops (not in group_frames), a full inbox, no free bounce buffer */
};

/* Value of port_stats[rx queue]: one AF_XDP port, written by the daemon about once a second. */
struct xvio_port_stats {
	__u32 active;            /* 1 while a socket is open on this queue */
	__u32 zero_copy;         /* 1: zero-copy; 0: copy mode (slower) */
	__u32 need_wakeup;       /* 1: the rings use XDP_USE_NEED_WAKEUP */
	__u32 reserved;
	__u64 rx_packets;        /* frames received */
	__u64 rx_bytes;
	__u64 tx_packets;        /* frames handed to the tx ring */
	__u64 tx_bytes;
	__u64 rx_empty_polls;    /* receive polls that found nothing */
	__u64 fill_ring_empty;   /* kernel drops: no frame in the fill ring */
	__u64 rx_ring_full;      /* kernel drops: rx ring full (and its other drops, not fill_ring_empty) */
	__u64 tx_ring_full;      /* frames not sent: tx ring full */
	__u64 tx_no_frame;       /* frames not sent: no free frame */
	__u64 tx_in_flight;      /* frames in the tx ring or awaiting completion */
	__u64 rx_no_guest;       /* frames received with no guest to deliver them to (dropped) */
	__u64 tx_oversize;       /* frames not sent: longer than a UMEM frame (a guest's broadcast or multicast) */
};

/* Kind of a kernel event in the events ring buffer. */
enum xvio_event_kind {
	XVIO_EVENT_NO_SOCKET = 1, /* a steered frame found no AF_XDP socket for its rx queue */
	XVIO_EVENT_MALFORMED = 2, /* a frame shorter than its headers */
	XVIO_EVENT_KINDS = 3,      /* entries of event_state (index 0 unused) */
};

/* One record of the events ring buffer. */
struct xvio_event {
	__u64 ktime_ns;   /* bpf_ktime_get_ns() when emitted */
	enum xvio_event_kind kind;
	enum xvio_xdp_outcome outcome; /* how the frame was counted in xdp_stats */
	__u32 ifindex;
	__u32 rx_queue;
	__u32 frame_len;
	__u32 suppressed; /* events of this kind not emitted on this CPU before this one */
	__u16 vlan;
	__u8 mac[6];      /* destination MAC (zero for malformed frames shorter than it) */
};

/*
 * Value of the per-CPU event_state array, indexed by event kind: the rate
 * limit's state and the last event emitted, so that bpftool shows it even
 * when no daemon reads the ring buffer.
 */
struct xvio_event_state {
	__u32 suppressed; /* events not emitted since `last` */
	__u32 reserved;
	struct xvio_event last;
};

#endif /* XVIO_H */
