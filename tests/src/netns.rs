//! Network namespaces (named `xvio…`, removed on drop) and veth pairs between them.

use std::{fs::File, process::Command};

use nix::sched::{CloneFlags, setns};

/// A named network namespace, deleted (with its interfaces) on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `xvio<tag><unique>`.
    pub fn new(tag: &str) -> Netns {
        let name = crate::unique_name(&format!("xvio{tag}"));
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its path under /run/netns.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `program` to run in this namespace (through `nsenter --net`, which keeps `/sys/fs/bpf`,
    /// unlike `ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path())).arg(program);
        cmd
    }

    /// Runs `ip -n NAME ARGS…`, panicking with its output on failure.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// Runs `f` on a thread that has entered this namespace (the caller's thread stays put).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let ns = File::open(self.path()).expect("open netns");
        std::thread::scope(|s| {
            s.spawn(move || {
                setns(&ns, CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .expect("thread in netns panicked")
        })
    }

    /// Starts `f` on a thread of its own that entered this namespace (a loop that runs while
    /// the caller measures).
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let ns = File::open(self.path()).expect("open netns");
        std::thread::spawn(move || {
            setns(&ns, CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Creates a veth pair: `a_if` in `a` with `a_addr` (CIDR), `b_if` in `b` with `b_addr`,
/// both up, with `queues` rx and tx queues each.
pub fn veth(a: &Netns, a_if: &str, a_addr: &str, b: &Netns, b_if: &str, b_addr: &str, queues: u32) {
    make_veth([(a, a_if, a_addr), (b, b_if, b_addr)], Some(queues));
}

/// Creates a veth pair as a user does, `ip link add … type veth peer …` without queue counts:
/// as many rx queues allocated as the machine has CPUs, one enabled. Otherwise like [`veth`].
pub fn default_veth(a: &Netns, a_if: &str, a_addr: &str, b: &Netns, b_if: &str, b_addr: &str) {
    make_veth([(a, a_if, a_addr), (b, b_if, b_addr)], None);
}

fn make_veth(ends: [(&Netns, &str, &str); 2], queues: Option<u32>) {
    let q = queues.map(|q| q.to_string());
    let counts: Vec<&str> = match &q {
        Some(q) => vec!["numrxqueues", q, "numtxqueues", q],
        None => Vec::new(),
    };
    let [(a, a_if, _), (b, b_if, _)] = ends;
    let mut args = vec!["link", "add", a_if, "netns", a.name()];
    args.extend(&counts);
    args.extend(["type", "veth", "peer", "name", b_if, "netns", b.name()]);
    args.extend(&counts);
    run("ip", &args);
    for (ns, ifname, addr) in ends {
        ns.ip(&["addr", "add", addr, "dev", ifname]);
        ns.ip(&["link", "set", ifname, "up"]);
    }
}

/// The MAC address of `ifname` in `ns` (read through getifaddrs: /sys shows the namespace
/// of whoever mounted it, not the thread's).
pub fn mac_of(ns: &Netns, ifname: &str) -> [u8; 6] {
    ns.run(|| {
        nix::ifaddrs::getifaddrs()
            .expect("getifaddrs")
            .filter(|a| a.interface_name == ifname)
            .find_map(|a| {
                a.address
                    .and_then(|s| s.as_link_addr().and_then(|l| l.addr()))
            })
            .unwrap_or_else(|| panic!("{ifname} has no MAC"))
    })
}

/// Runs a command, panicking with its output when it fails.
pub fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
