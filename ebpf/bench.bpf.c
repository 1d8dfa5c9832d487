// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Programs for the tests and benchmarks only; never loaded by the daemon.
 *
 * xvio_bench_drop: the in-kernel ceiling. Counts frames in bench_count and drops them.
 * xvio_bench_count_src: a sink for tests and benchmarks. Counts and drops the frames whose
 *   source MAC is bench_src[0] (a guest's), passes every other frame (the kernels' own).
 * xvio_bench_count_vlan: as xvio_bench_count_src, and counts in bench_tagged those of the
 *   frames that carry exactly one 802.1Q tag, with VLAN id bench_src[0].vlan (a guest's on a
 *   VLAN: tagged once on the wire, never twice).
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} bench_count SEC(".maps");

struct bench_src {
	__u8 mac[6];
	__u16 vlan; /* for xvio_bench_count_vlan */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct bench_src);
} bench_src SEC(".maps");

SEC("xdp")
int xvio_bench_count_src(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u32 zero = 0;
	struct bench_src *want = bpf_map_lookup_elem(&bench_src, &zero);
	__u64 *count = bpf_map_lookup_elem(&bench_count, &zero);
	__u8 *src = (__u8 *)data + 6;

	if (!want || !count || (void *)(src + 6) > end)
		return XDP_PASS;
	if (src[0] != want->mac[0] || src[1] != want->mac[1] || src[2] != want->mac[2] ||
	    src[3] != want->mac[3] || src[4] != want->mac[4] || src[5] != want->mac[5])
		return XDP_PASS;
	(*count)++;
	return XDP_DROP;
}

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} bench_tagged SEC(".maps");

SEC("xdp")
int xvio_bench_count_vlan(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u32 zero = 0;
	struct bench_src *want = bpf_map_lookup_elem(&bench_src, &zero);
	__u64 *count = bpf_map_lookup_elem(&bench_count, &zero);
	__u64 *tagged = bpf_map_lookup_elem(&bench_tagged, &zero);
	__u8 *f = data;

	/* MACs, a tag, the EtherType behind it. */
	if (!want || !count || !tagged || (void *)(f + 18) > end)
		return XDP_PASS;
	if (f[6] != want->mac[0] || f[7] != want->mac[1] || f[8] != want->mac[2] ||
	    f[9] != want->mac[3] || f[10] != want->mac[4] || f[11] != want->mac[5])
		return XDP_PASS;
	(*count)++;
	if (f[12] == 0x81 && f[13] == 0x00 && ((f[14] & 0x0f) << 8 | f[15]) == want->vlan &&
	    !(f[16] == 0x81 && f[17] == 0x00))
		(*tagged)++;
	return XDP_DROP;
}

SEC("xdp")
int xvio_bench_drop(struct xdp_md *ctx)
{
	__u32 zero = 0;
	__u64 *count = bpf_map_lookup_elem(&bench_count, &zero);

	if (count)
		(*count)++;
	return XDP_DROP;
}
