//! XDP helpers of the tests and benchmarks (the programs of `ebpf/bench.bpf.c`): counting
//! XDP_DROPs.

use aya::{
    Ebpf,
    maps::{Array, MapData, PerCpuArray},
    programs::{Xdp, XdpMode},
};

/// A counting XDP_DROP attached natively to an interface of the calling thread's namespace.
#[derive(Debug)]
pub struct DropCounter {
    ebpf: Ebpf,
}

impl DropCounter {
    pub fn attach(iface: &str) -> DropCounter {
        DropCounter::attach_program(iface, "xvio_bench_drop", None)
    }

    /// As [`Self::attach`], counting (and dropping) only the frames from `src`; the others
    /// pass to the kernel.
    pub fn attach_from(iface: &str, src: [u8; 6]) -> DropCounter {
        DropCounter::attach_program(iface, "xvio_bench_count_src", Some((src, 0)))
    }

    /// As [`Self::attach_from`], also counting ([`Self::count_tagged`]) those of the frames
    /// that carry exactly one 802.1Q tag, with VLAN id `vlan`.
    pub fn attach_from_vlan(iface: &str, src: [u8; 6], vlan: u16) -> DropCounter {
        DropCounter::attach_program(iface, "xvio_bench_count_vlan", Some((src, vlan)))
    }

    fn attach_program(iface: &str, name: &str, src: Option<([u8; 6], u16)>) -> DropCounter {
        let mut ebpf = Ebpf::load(xvio::BENCH_OBJECT).unwrap();
        if let Some((mac, vlan)) = src {
            let mut cfg: Array<&mut MapData, [u8; 8]> =
                Array::try_from(ebpf.map_mut("bench_src").unwrap()).unwrap();
            let mut value = [0u8; 8];
            value[..6].copy_from_slice(&mac);
            value[6..].copy_from_slice(&vlan.to_ne_bytes());
            cfg.set(0, value, 0).unwrap();
        }
        let prog: &mut Xdp = ebpf.program_mut(name).unwrap().try_into().unwrap();
        prog.load().unwrap();
        prog.attach(iface, XdpMode::Driver)
            .expect("native XDP on veth");
        DropCounter { ebpf }
    }

    pub fn count(&self) -> u64 {
        self.sum("bench_count")
    }

    /// Frames counted with exactly one tag of the VLAN given to [`Self::attach_from_vlan`].
    pub fn count_tagged(&self) -> u64 {
        self.sum("bench_tagged")
    }

    fn sum(&self, map: &str) -> u64 {
        let map: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.ebpf.map(map).unwrap()).unwrap();
        map.get(&0, 0).unwrap().iter().sum()
    }
}
