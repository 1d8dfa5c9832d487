//! `cargo xtask bench vhost`: guest-to-guest through xvio against the same topology through
//! OVS-DPDK, in the same run. Two DPDK virtio-user frontends (testpmd): txonly on guest A,
//! rxonly on guest B; the rate is what B receives (testpmd's Rx-pps, sampled each second).
//! Needs root and Debian's dpdk-dev and openvswitch-switch-dpdk.
//!
//! Cores: the txonly testpmd forwards on CPU 1, the rxonly one on CPU 0; xvio's workers and
//! OVS's PMD thread (pinned to CPU 1) share the same two cores: on a 2-core machine every
//! datapath competes with its own traffic generators.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use xvio_tests::{dpdk::Testpmd, unique_name};

const SECONDS: u64 = 6;
const REPS: usize = 3;
const MAC_A: &str = "02:00:00:00:00:0a";
const MAC_B: &str = "02:00:00:00:00:01";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs txonly on `a` and rxonly on `b` for SECONDS; returns B's median Rx-pps over the last
/// seconds (the first two, while testpmd starts, are skipped).
fn measure(a: &Path, b: &Path, len: usize, vdev_a: &str, vdev_b: &str) -> f64 {
    let rx = Testpmd::start_with(
        b,
        "rxonly",
        len,
        MAC_A,
        vdev_b,
        "1,0",
        &["--stats-period", "1"],
    );
    std::thread::sleep(Duration::from_secs(2));
    let tx = Testpmd::start(a, "txonly", len, MAC_B, vdev_a, "0,1");
    std::thread::sleep(Duration::from_secs(SECONDS));
    let samples: Vec<f64> = rx.rx_pps_samples().into_iter().map(|v| v as f64).collect();
    tx.stop();
    rx.stop();
    let useful: Vec<f64> = samples
        .iter()
        .copied()
        .skip(samples.len().saturating_sub(SECONDS as usize - 2))
        .collect();
    if useful.is_empty() {
        0.0
    } else {
        median(useful)
    }
}

fn xvio_bin() -> PathBuf {
    std::env::var_os("XVIO_BIN").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/xvio"),
        PathBuf::from,
    )
}

fn wait_for_file(p: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !p.exists() {
        assert!(Instant::now() < deadline, "{} did not appear", p.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// xvio serving both sockets (release build).
struct Xvio(Child);

impl Xvio {
    fn start(a: &Path, b: &Path) -> Xvio {
        let child = Command::new(xvio_bin())
            .arg("run")
            .arg("--guest")
            .arg(format!("socket={},mac={MAC_A}", a.display()))
            .arg("--guest")
            .arg(format!("socket={},mac={MAC_B}", b.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("xvio (cargo build --release -p xvio)");
        wait_for_file(a);
        wait_for_file(b);
        Xvio(child)
    }
}

impl Drop for Xvio {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

/// A private OVS-DPDK (no hugepages) with a netdev bridge and two dpdkvhostuser ports, whose
/// sockets OVS serves (the testpmds connect as clients).
struct Ovs {
    dir: PathBuf,
}

impl Ovs {
    fn start() -> Ovs {
        let dir = std::env::temp_dir().join(unique_name("xvio-ovs-"));
        std::fs::create_dir_all(&dir).unwrap();
        let ovs = Ovs { dir };
        let schema = "/usr/share/openvswitch/vswitch.ovsschema";
        ovs.run("ovsdb-tool", &["create", &ovs.path("conf.db"), schema]);
        ovs.run(
            "ovsdb-server",
            &[
                &ovs.path("conf.db"),
                &format!("--remote=punix:{}", ovs.path("db.sock")),
                &format!("--pidfile={}", ovs.path("ovsdb-server.pid")),
                "--detach",
                &format!("--log-file={}", ovs.path("ovsdb-server.log")),
            ],
        );
        ovs.vsctl(&["--no-wait", "init"]);
        ovs.vsctl(&[
            "--no-wait",
            "set",
            "Open_vSwitch",
            ".",
            "other_config:dpdk-init=true",
            "other_config:dpdk-extra=--no-huge --legacy-mem -m 3072 --iova-mode=va --no-pci --file-prefix=xvio-ovs",
            "other_config:dpdk-lcore-mask=0x1",
            "other_config:pmd-cpu-mask=0x2",
        ]);
        ovs.run(
            "/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk",
            &[
                &format!("unix:{}", ovs.path("db.sock")),
                &format!("--pidfile={}", ovs.path("ovs-vswitchd.pid")),
                &format!("--unixctl={}", ovs.path("ovs-vswitchd.ctl")),
                "--detach",
                &format!("--log-file={}", ovs.path("ovs-vswitchd.log")),
            ],
        );
        ovs.vsctl(&[
            "add-br",
            "xviobr",
            "--",
            "set",
            "bridge",
            "xviobr",
            "datapath_type=netdev",
        ]);
        ovs.vsctl(&[
            "add-port",
            "xviobr",
            "vhu0",
            "--",
            "set",
            "Interface",
            "vhu0",
            "type=dpdkvhostuser",
        ]);
        ovs.vsctl(&[
            "add-port",
            "xviobr",
            "vhu1",
            "--",
            "set",
            "Interface",
            "vhu1",
            "type=dpdkvhostuser",
        ]);
        wait_for_file(&ovs.dir.join("vhu0"));
        wait_for_file(&ovs.dir.join("vhu1"));
        ovs
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn env(&self, cmd: &mut Command) {
        for var in ["OVS_RUNDIR", "OVS_LOGDIR", "OVS_DBDIR", "OVS_SYSCONFDIR"] {
            cmd.env(var, &self.dir);
        }
    }

    fn run(&self, program: &str, args: &[&str]) {
        let mut cmd = Command::new(program);
        self.env(&mut cmd);
        let out = cmd
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e} (apt-get install openvswitch-switch-dpdk)"));
        assert!(
            out.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn vsctl(&self, args: &[&str]) {
        let db = format!("--db=unix:{}", self.path("db.sock"));
        let mut all = vec![db.as_str()];
        all.extend_from_slice(args);
        self.run("ovs-vsctl", &all);
    }
}

impl Drop for Ovs {
    fn drop(&mut self) {
        for pid in ["ovs-vswitchd.pid", "ovsdb-server.pid"] {
            if let Ok(text) = std::fs::read_to_string(self.dir.join(pid))
                && let Ok(pid) = text.trim().parse::<i32>()
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        let _ = std::fs::remove_dir_all(&self.dir);
        // The netdev bridge's own port is a tap device that outlives ovs-vswitchd.
        let _ = std::process::Command::new("ip")
            .args(["link", "del", "xviobr"])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("bench vhost needs root (DPDK and OVS-DPDK)");
        std::process::exit(1);
    }
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    println!(
        "guest to guest, testpmd txonly -> rxonly, {REPS} runs of {SECONDS} s each, medians of per-second Rx-pps"
    );
    for len in [64usize, 1500] {
        let (mut xv, mut ov) = (Vec::new(), Vec::new());
        for _ in 0..REPS {
            let dir = std::env::temp_dir();
            let (a, b) = (
                dir.join(format!("{}.sock", unique_name("xvio-bench-a"))),
                dir.join(format!("{}.sock", unique_name("xvio-bench-b"))),
            );
            {
                let _xvio = Xvio::start(&a, &b);
                xv.push(measure(&a, &b, len, "", ""));
            }
            {
                let ovs = Ovs::start();
                let (oa, ob) = (ovs.dir.join("vhu0"), ovs.dir.join("vhu1"));
                ov.push(measure(&oa, &ob, len, "", ""));
            }
        }
        let (x, o) = (median(xv.clone()), median(ov.clone()));
        let gbps = |pps: f64| pps * len as f64 * 8.0 / 1e9;
        println!(
            "{len:>5} B  xvio {:>6.3} Mpps ({:>5.2} Gbit/s) | OVS-DPDK {:>6.3} Mpps ({:>5.2} Gbit/s) | xvio/OVS {:.2} | runs: xvio {:?} OVS {:?}",
            x / 1e6,
            gbps(x),
            o / 1e6,
            gbps(o),
            if o > 0.0 { x / o } else { f64::NAN },
            xv.iter()
                .map(|v| (v / 1e3).round() as u64)
                .collect::<Vec<_>>(),
            ov.iter()
                .map(|v| (v / 1e3).round() as u64)
                .collect::<Vec<_>>(),
        );
    }
}
