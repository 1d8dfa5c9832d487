//! DPDK's testpmd with a `net_virtio_user` vdev: a real vhost-user frontend and traffic
//! generator (Debian's dpdk-dev), as a guest without a VM.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::netns::Netns;

/// The `RX-packets` (`what` = "RX") or `TX-packets` (`what` = "TX") of each forwarding
/// stream testpmd printed when it stopped, by that side's queue.
pub fn packets_by_queue(out: &str, what: &str) -> Vec<(u32, u64)> {
    let (port, counter) = (format!("{what} Port="), format!("{what}-packets:"));
    let mut streams = Vec::new();
    let mut queue = None;
    for line in out.lines() {
        if line.contains("Forward Stats for") {
            queue = line
                .find(&port)
                .and_then(|at| line[at..].split("Queue=").nth(1))
                .and_then(|q| q.split_whitespace().next())
                .and_then(|q| q.parse().ok());
        } else if let (Some(q), Some(at)) = (queue, line.find(&counter)) {
            let n = line[at + counter.len()..]
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            streams.push((q, n));
            queue = None;
        }
    }
    streams
}

/// The testpmd arguments every start here shares: forwarding at once on one lcore, rings of
/// 1024, bursts of 32, 32768 mbufs.
pub const APP_ARGS: [&str; 6] = [
    "--auto-start",
    "--nb-cores=1",
    "--txd=1024",
    "--rxd=1024",
    "--burst=32",
    "--total-num-mbufs=32768",
];

/// Totals testpmd printed when it stopped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TestpmdTotals {
    /// Packets received.
    pub rx: u64,
    /// Packets sent.
    pub tx: u64,
}

/// A running testpmd.
#[derive(Debug)]
pub struct Testpmd {
    child: Option<Child>,
    log: PathBuf,
    /// Its `--file-prefix` (its runtime folder's name).
    prefix: String,
}

impl Testpmd {
    /// Starts testpmd on vhost-user socket `socket` in forward `mode` (txonly, rxonly,
    /// icmpecho, macswap…) with frames of `len` bytes to `peer`; `vdev_opts` are appended to
    /// the vdev (",server=1" makes testpmd the socket's server; ",queues=2" two queue pairs,
    /// with `--rxq=2 --txq=2` in `extra`). Runs on CPUs `cpus`.
    pub fn start(
        socket: &Path,
        mode: &str,
        len: usize,
        peer: &str,
        vdev_opts: &str,
        cpus: &str,
    ) -> Testpmd {
        Testpmd::start_with(socket, mode, len, peer, vdev_opts, cpus, &[])
    }

    /// As [`Testpmd::start`], with more testpmd arguments (`--stats-period 1` …).
    pub fn start_with(
        socket: &Path,
        mode: &str,
        len: usize,
        peer: &str,
        vdev_opts: &str,
        cpus: &str,
        extra: &[&str],
    ) -> Testpmd {
        let main_lcore = cpus.split(',').next().unwrap_or("0");
        let vdev = format!(
            "net_virtio_user0,path={},queue_size=1024{}{vdev_opts}",
            socket.display(),
            // One queue pair unless the options name a count.
            if vdev_opts.contains("queues=") {
                ""
            } else {
                ",queues=1"
            }
        );
        let (mode, len, peer) = (
            format!("--forward-mode={mode}"),
            format!("--txpkts={len}"),
            format!("--eth-peer=0,{peer}"),
        );
        let mut app = APP_ARGS.to_vec();
        app.extend([mode.as_str(), &len, &peer]);
        app.extend_from_slice(extra);
        Testpmd::spawn(
            None,
            &[
                "--main-lcore",
                main_lcore,
                "-l",
                cpus,
                "-m",
                "512",
                "--vdev",
                &vdev,
            ],
            &app,
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts `dpdk-testpmd EAL… -- APP…` (in `ns` when given) with its output in a log file;
    /// `--no-huge --no-pci` and a fresh `--file-prefix` are added to the EAL arguments. Its
    /// standard input stays open (a pipe), so a testpmd without `--stats-period` waits at
    /// "Press enter to exit" instead of reading end of file and exiting at once.
    pub fn spawn(ns: Option<&Netns>, eal: &[&str], app: &[&str]) -> Result<Testpmd, String> {
        let log = std::env::temp_dir().join(format!("{}.log", crate::unique_name("xvio-testpmd-")));
        let prefix = crate::unique_name("xvio-pmd-");
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = ns.command("stdbuf");
                c.arg("-oL");
                c
            }
            None => {
                let mut c = Command::new("stdbuf");
                c.arg("-oL");
                c
            }
        };
        // Line-buffered: its output goes to a file, and callers read it as it comes (nsenter
        // and stdbuf exec testpmd: the child's pid is testpmd's).
        let child = cmd
            .arg("dpdk-testpmd")
            .args(["--no-huge", "--no-pci", "--file-prefix", &prefix])
            .args(eal)
            .arg("--")
            .args(app)
            .stdin(Stdio::piped())
            .stdout(File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?)
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                format!(
                    "dpdk-testpmd: {e} (apt-get install dpdk-dev; `cargo xtask test` installs it)"
                )
            })?;
        Ok(Testpmd {
            child: Some(child),
            log,
            prefix,
        })
    }

    /// Its pid (nsenter and stdbuf exec testpmd); `None` once it was stopped.
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().and_then(|c| i32::try_from(c.id()).ok())
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Its `--file-prefix`: its runtime folder under /var/run/dpdk.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Waits (at most 20 s) until testpmd forwards (its RX buffers are posted); whether it
    /// does.
    pub fn wait_forwarding(&self) -> bool {
        self.wait_for("Press enter to exit", Duration::from_secs(20))
    }

    /// Waits (at most `timeout`) until testpmd has launched its forwarding lcores (it printed
    /// its forwarding configuration, with or without `--stats-period`); whether it has.
    pub fn wait_started(&self, timeout: Duration) -> bool {
        self.wait_for("forwards packets on", timeout)
    }

    /// Waits (at most `timeout`) until its output contains `marker`; whether it does.
    fn wait_for(&self, marker: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.output().contains(marker) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// What it printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The `Rx-pps` values it printed once a second (started with `--stats-period 1`).
    pub fn rx_pps_samples(&self) -> Vec<u64> {
        self.output()
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Rx-pps:"))
            .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
            .collect()
    }

    /// Stops it with SIGINT and reads the accumulated totals it prints.
    pub fn stop(mut self) -> TestpmdTotals {
        self.kill_and_wait(Signal::SIGINT);
        parse_totals(&self.output())
    }

    /// As [`Testpmd::stop`], also returning everything it printed.
    pub fn stop_keep_output(mut self) -> (TestpmdTotals, String) {
        self.kill_and_wait(Signal::SIGINT);
        let out = self.output();
        (parse_totals(&out), out)
    }

    /// Kills it at once (a VMM that crashes).
    pub fn crash(mut self) {
        self.kill_and_wait(Signal::SIGKILL);
    }

    fn kill_and_wait(&mut self, signal: Signal) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = kill(Pid::from_raw(child.id() as i32), signal);
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.wait();
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        self.kill_and_wait(Signal::SIGKILL);
        let _ = std::fs::remove_file(&self.log);
        // DPDK leaves its runtime folder (its memory's files, on tmpfs: megabytes) behind.
        let _ = std::fs::remove_dir_all(Path::new("/var/run/dpdk").join(&self.prefix));
    }
}

/// The numbers after "Accumulated forward statistics for all ports".
pub fn parse_totals(out: &str) -> TestpmdTotals {
    let Some(at) = out.rfind("Accumulated forward statistics for all ports") else {
        return TestpmdTotals::default();
    };
    let mut totals = TestpmdTotals::default();
    for line in out[at..].lines().take(8) {
        let words: Vec<&str> = line.split_whitespace().collect();
        for pair in words.windows(2) {
            match pair[0] {
                "RX-packets:" => totals.rx = pair[1].parse().unwrap_or(0),
                "TX-packets:" => totals.tx = pair[1].parse().unwrap_or(0),
                _ => {}
            }
        }
    }
    totals
}
