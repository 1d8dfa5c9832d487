// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * xvio's XDP program: steers frames addressed to a guest into AF_XDP sockets.
 *
 * For each frame: parse Ethernet and at most one 802.1Q tag; broadcast and
 * multicast frames pass to the kernel stack; a unicast frame whose
 * (destination MAC, VLAN) is in `steer` is redirected to the AF_XDP socket
 * registered in `xsks` for the frame's rx queue; everything else, truncated
 * frames included, passes to the kernel untouched.
 *
 * Invariants: every read of the frame is behind has_bytes(), the one bounds
 * check; every frame is counted exactly once, at the one exit (finish()).
 * Packet pointers are only compared with the frame's end, never with NULL nor
 * subtracted, so that the verifier accepts the program without CAP_PERFMON.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "xvio.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XVIO_XDP_OUTCOMES);
	__type(key, __u32);
	__type(value, struct xvio_xdp_stats);
} xdp_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, XVIO_STEER_MAX);
	__type(key, struct xvio_steer_key);
	__type(value, struct xvio_steer_value);
} steer SEC(".maps");

/* Written by the daemon only, with steer (see struct xvio_steer_slot). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, XVIO_STEER_SLOTS);
	__type(key, __u32);
	__type(value, struct xvio_steer_slot);
} steer_index SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, XVIO_XSKS_MAX);
	__type(key, __u32);
	__type(value, __u32);
} xsks SEC(".maps");

/* Written by the daemon only; declared here so that it carries BTF. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct xvio_daemon_stats);
} daemon_stats SEC(".maps");

/* Written by the daemon only, one entry per rx queue. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, XVIO_XSKS_MAX);
	__type(key, __u32);
	__type(value, struct xvio_port_stats);
} port_stats SEC(".maps");

/* Written by the daemon only, one entry per guest (pinned once, under pin_root/guests/). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, XVIO_GUESTS_MAX);
	__type(key, __u32);
	__type(value, struct xvio_guest_stats);
} guest_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, XVIO_EVENTS_BYTES);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XVIO_EVENT_KINDS);
	__type(key, __u32);
	__type(value, struct xvio_event_state);
} event_state SEC(".maps");

/* Whether the frame holds the bytes [off, off + size). */
static __always_inline int has_bytes(void *data, void *end, __u32 off, __u32 size)
{
	return data + off + size <= end;
}

/* A steer key and the 8 bytes it is, compared as one word. */
union steer_word {
	struct xvio_steer_key key;
	__u64 word;
};

/*
 * Whether key is steered: its slot of steer_index (an array lookup the verifier
 * inlines) decides when no key or one key has that slot; steer (a hash lookup)
 * when more than one has. The daemon writes a slot's key before its count and
 * never changes either after; the count is read first, and x86 does not reorder
 * two loads (a weakly ordered CPU could compare a frame against a key still
 * being written while a guest is added, and steer a frame to a MAC made of the
 * old and new bytes: the datapath would drop it as rx_no_guest).
 */
static __always_inline int steered(const union steer_word *k)
{
	__u32 slot = xvio_steer_slot(&k->key);
	struct xvio_steer_slot *s = bpf_map_lookup_elem(&steer_index, &slot);

	if (!s || s->keys == 0)
		return 0;
	if (s->keys == 1)
		return ((union steer_word *)&s->key)->word == k->word;
	return bpf_map_lookup_elem(&steer, &k->key) != NULL;
}

/* Emits one event of `kind`, at most once per XVIO_EVENT_PERIOD_NS per CPU. */
static __always_inline void emit_event(struct xdp_md *ctx, enum xvio_event_kind kind,
				       enum xvio_xdp_outcome outcome, __u32 frame_len,
				       const struct xvio_steer_key *key)
{
	__u32 index = kind;
	struct xvio_event_state *state = bpf_map_lookup_elem(&event_state, &index);
	__u64 now = bpf_ktime_get_ns();
	struct xvio_event *ev;

	if (!state)
		return;
	ev = &state->last;
	if (ev->ktime_ns && now - ev->ktime_ns < XVIO_EVENT_PERIOD_NS) {
		state->suppressed++;
		return;
	}
	ev->ktime_ns = now;
	ev->kind = kind;
	ev->outcome = outcome;
	ev->ifindex = ctx->ingress_ifindex;
	ev->rx_queue = ctx->rx_queue_index;
	ev->frame_len = frame_len;
	ev->suppressed = state->suppressed;
	ev->vlan = key->vlan;
	__builtin_memcpy(ev->mac, key->mac, sizeof(ev->mac));
	state->suppressed = 0;
	/* A full ring buffer loses this copy only; the last event stays in event_state. */
	bpf_ringbuf_output(&events, ev, sizeof(*ev), 0);
}

/* The one exit: counts the frame under `outcome` and returns `action`. */
static __always_inline int finish(__u32 outcome, __u64 frame_len, int action)
{
	struct xvio_xdp_stats *stats = bpf_map_lookup_elem(&xdp_stats, &outcome);

	if (stats) {
		stats->packets++;
		stats->bytes += frame_len;
	}
	return action;
}

SEC("xdp")
int xvio_steer(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u64 frame_len = bpf_xdp_get_buff_len(ctx);
	union steer_word k = {};
	struct xvio_steer_key *key = &k.key;
	struct ethhdr *eth;
	__u32 rx_queue;

	if (!has_bytes(data, end, 0, sizeof(*eth))) {
		emit_event(ctx, XVIO_EVENT_MALFORMED, XVIO_XDP_MALFORMED, frame_len, key);
		return finish(XVIO_XDP_MALFORMED, frame_len, XDP_PASS);
	}
	eth = data;
	__builtin_memcpy(key->mac, eth->h_dest, sizeof(key->mac));

	if (eth->h_proto == bpf_htons(ETH_P_8021Q)) {
		/* The TCI and the inner EtherType: a tag cut short is malformed. */
		__be16 *tag = data + sizeof(*eth);

		if (!has_bytes(data, end, sizeof(*eth), 2 * sizeof(__be16))) {
			emit_event(ctx, XVIO_EVENT_MALFORMED, XVIO_XDP_MALFORMED, frame_len, key);
			return finish(XVIO_XDP_MALFORMED, frame_len, XDP_PASS);
		}
		key->vlan = bpf_ntohs(tag[0]) & 0x0fff;
	}

	if (key->mac[0] & 1) {
		if ((key->mac[0] & key->mac[1] & key->mac[2] & key->mac[3] & key->mac[4] & key->mac[5]) == 0xff)
			return finish(XVIO_XDP_BROADCAST, frame_len, XDP_PASS);
		return finish(XVIO_XDP_MULTICAST, frame_len, XDP_PASS);
	}

	if (!steered(&k))
		return finish(XVIO_XDP_PASSED, frame_len, XDP_PASS);

	rx_queue = ctx->rx_queue_index;
	if (bpf_redirect_map(&xsks, rx_queue, XDP_PASS) == XDP_REDIRECT)
		return finish(XVIO_XDP_REDIRECTED, frame_len, XDP_REDIRECT);

	emit_event(ctx, XVIO_EVENT_NO_SOCKET, XVIO_XDP_NO_SOCKET, frame_len, key);
	return finish(XVIO_XDP_NO_SOCKET, frame_len, XDP_PASS);
}
