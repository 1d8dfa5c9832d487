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
 * Invariants: every read of the frame goes through hdr_at(), the one bounds
 * check; every frame is counted exactly once, at the one exit (finish()).
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

/* The frame's bytes [off, off + size), or NULL when the frame is shorter. */
static __always_inline void *hdr_at(void *data, void *end, __u32 off, __u32 size)
{
	void *p = data + off;

	if (p + size > end)
		return NULL;
	return p;
}

/* A steer key and the 8 bytes it is, compared in one go. */
union steer_word {
	struct xvio_steer_key key;
	__u64 word;
};

/*
 * Whether key is steered: its slot of steer_index (an array lookup the verifier
 * inlines) decides when no key or one key has that slot; steer (a hash lookup)
 * when more than one has.
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
	/* The program is not frags-aware (SEC "xdp"), so the frame is this one buffer. */
	__u64 frame_len = end - data;
	union steer_word k = {};
	struct xvio_steer_key *key = &k.key;
	struct ethhdr *eth;
	__u32 rx_queue;

	eth = hdr_at(data, end, 0, sizeof(*eth));
	if (!eth) {
		emit_event(ctx, XVIO_EVENT_MALFORMED, XVIO_XDP_MALFORMED, frame_len, key);
		return finish(XVIO_XDP_MALFORMED, frame_len, XDP_PASS);
	}
	__builtin_memcpy(key->mac, eth->h_dest, sizeof(key->mac));

	if (eth->h_proto == bpf_htons(ETH_P_8021Q)) {
		/* The TCI and the inner EtherType: a tag cut short is malformed. */
		__be16 *tag = hdr_at(data, end, sizeof(*eth), 2 * sizeof(__be16));

		if (!tag) {
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
