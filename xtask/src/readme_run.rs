//! The last step of `cargo xtask test`: the README's `cargo xtask run`, exactly as a new user
//! types it (no arguments, so the demo veth, made without queue counts), checked end to end.
//! It must come up, the counters in its pinned maps must move with traffic from the demo
//! namespace, and Ctrl-C (SIGINT to its process group, as a terminal sends it) must stop
//! xvio with status 0 and remove the demo.
//!
//! It runs `cargo xtask run` itself rather than the xtask binary: `cargo xtask test` is this
//! binary, which cargo started after its build and holds no build lock, so the nested cargo
//! builds and runs as it does for a user (the suite's nested `cargo test` works the same way).
//! Every wait is bounded; on any failure the demo's process group is stopped, the demo
//! removed, and its output printed.

use std::{
    fs::File,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::{
    sys::signal::{Signal, killpg},
    unistd::Pid,
};

use crate::{
    run::{DEMO_GUEST_MAC, DEMO_IF, DEMO_NETNS, DEMO_PEER, DEMO_STEERED_ADDR, remove_demo},
    target_dir, workspace_root,
};

/// The release build on a fresh machine happens inside `cargo xtask run`.
const UP_WITHIN: Duration = Duration::from_secs(20 * 60);
const COUNTERS_WITHIN: Duration = Duration::from_secs(15);
const EXIT_WITHIN: Duration = Duration::from_secs(30);

/// Runs the check; as root only (in CI, without root, it fails: it must not skip there).
pub fn check() -> Result<()> {
    if !crate::deps::is_root() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            bail!("the README run check needs root, and it must not skip in CI (CI=true)");
        }
        eprintln!("xtask: not root: skipping the README run check (`cargo xtask run` demo)");
        return Ok(());
    }
    if Path::new("/run/netns").join(DEMO_NETNS).exists() {
        bail!(
            "netns {} exists: is a `cargo xtask run` demo running? Stop it with Ctrl-C (or \
             remove a leftover with `ip netns del {}`) and run the tests again",
            DEMO_NETNS,
            DEMO_NETNS
        );
    }
    println!("xtask: the README's `cargo xtask run`, with its demo, end to end");
    let mut run = DemoRun::start()?;
    let outcome = run.exercise();
    if outcome.is_err() {
        run.abort();
        eprintln!("--- output of `cargo xtask run` ---\n{}", run.output());
    }
    outcome
}

/// `cargo xtask run` in its own process group, its output in a file.
struct DemoRun {
    child: Option<Child>,
    group: Pid,
    log: PathBuf,
    xvio: PathBuf,
}

impl DemoRun {
    fn start() -> Result<DemoRun> {
        let log = target_dir().join("xtask-readme-run.log");
        std::fs::create_dir_all(target_dir()).context("creating the target dir")?;
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("cloning the log file")?;
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let child = Command::new(&cargo)
            .args(["xtask", "run"])
            .current_dir(workspace_root())
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting `{cargo} xtask run`"))?;
        let group = Pid::from_raw(i32::try_from(child.id()).context("pid")?);
        Ok(DemoRun {
            child: Some(child),
            group,
            log,
            xvio: target_dir().join("release/xvio"),
        })
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn exercise(&mut self) -> Result<()> {
        let report = self.wait_until_up()?;
        let before = Counters::parse(&report);
        println!("xtask: demo up: {}", before.describe());
        ip_netns_exec(&["ping", "-c", "3", "-i", "0.2", "-W", "2", "10.199.0.1"])
            .context("the demo's own address must answer (traffic that passes to the kernel)")?;
        demo_ip(&[
            "neigh",
            "replace",
            DEMO_STEERED_ADDR,
            "lladdr",
            DEMO_GUEST_MAC,
            "dev",
            DEMO_PEER,
            "nud",
            "permanent",
        ])?;
        // Nothing answers for the steered MAC (no guest yet): the pings fail, by design.
        let _ = ip_netns_exec(&["ping", "-c", "5", "-i", "0.2", "-W", "1", DEMO_STEERED_ADDR]);
        let after = self.wait_for_counters(&before)?;
        println!("xtask: counters moved: {}", after.describe());
        let dump = output_of(Command::new("bpftool").args([
            "map",
            "dump",
            "pinned",
            &format!("/sys/fs/bpf/xvio/{}/daemon_stats", DEMO_IF),
        ]))?;
        if !dump.contains("\"uptime_ms\"") {
            bail!("bpftool shows no named daemon_stats fields:\n{dump}");
        }
        let status = self.ctrl_c()?;
        if !status.success() {
            bail!("after Ctrl-C, `cargo xtask run` exited with {status}");
        }
        self.check_removed()?;
        println!("xtask: Ctrl-C stopped xvio (status 0) and removed the demo");
        Ok(())
    }

    /// Waits until xvio has published its counters, and checks it reports one AF_XDP socket;
    /// returns `xvio stats`.
    fn wait_until_up(&mut self) -> Result<String> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_wait()? {
                bail!("`cargo xtask run` exited with {status} before the demo was up");
            }
            // The pins appear before the daemon first publishes (then its pid is 0).
            if self.xvio.exists()
                && let Ok(report) = self.stats()
                && !report.contains("daemon pid 0,")
            {
                if !report.contains("AF_XDP sockets: 1 (") {
                    bail!("the demo veth enables one queue, so one AF_XDP socket:\n{report}");
                }
                return Ok(report);
            }
            if start.elapsed() > UP_WITHIN {
                bail!("the demo was not up within {} s", UP_WITHIN.as_secs());
            }
            sleep(Duration::from_millis(250));
        }
    }

    /// Waits until the pinned counters show the traffic (the daemon publishes once a second).
    fn wait_for_counters(&mut self, before: &Counters) -> Result<Counters> {
        let start = Instant::now();
        loop {
            let report = self.stats()?;
            let now = Counters::parse(&report);
            if now.passed >= before.passed + 3
                && now.redirected >= before.redirected + 5
                && now.queue0_rx >= before.queue0_rx + 5
            {
                return Ok(now);
            }
            if start.elapsed() > COUNTERS_WITHIN {
                bail!(
                    "after 3 pings to the demo and 5 to the steered MAC, xdp_stats passed must \
                     grow by 3, redirected and queue 0's rx by 5; before: {}; now:\n{report}",
                    before.describe()
                );
            }
            sleep(Duration::from_millis(250));
        }
    }

    fn stats(&self) -> Result<String> {
        output_of(Command::new(&self.xvio).args(["stats", "--iface", DEMO_IF]))
    }

    /// What a terminal's Ctrl-C does: SIGINT to the foreground process group.
    fn ctrl_c(&mut self) -> Result<ExitStatus> {
        killpg(self.group, Signal::SIGINT).context("sending SIGINT to the demo")?;
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            if start.elapsed() > EXIT_WITHIN {
                bail!(
                    "`cargo xtask run` did not exit within {} s of Ctrl-C",
                    EXIT_WITHIN.as_secs()
                );
            }
            sleep(Duration::from_millis(100));
        }
    }

    fn check_removed(&self) -> Result<()> {
        let left: Vec<String> = [
            PathBuf::from("/run/netns").join(DEMO_NETNS),
            PathBuf::from("/sys/class/net").join(DEMO_IF),
            PathBuf::from("/sys/fs/bpf/xvio").join(DEMO_IF),
        ]
        .into_iter()
        .filter(|p| p.exists())
        .map(|p| p.display().to_string())
        .collect();
        if !left.is_empty() {
            bail!("after Ctrl-C these remain: {}", left.join(", "));
        }
        if !self.output().contains("demo removed") {
            bail!("`cargo xtask run` did not say it removed the demo");
        }
        Ok(())
    }

    fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        let Some(child) = self.child.as_mut() else {
            bail!("`cargo xtask run` already exited");
        };
        let status = child.try_wait().context("waiting for `cargo xtask run`")?;
        if status.is_some() {
            self.child = None;
        }
        Ok(status)
    }

    /// Stops whatever of the demo still runs (Ctrl-C, then SIGKILL) and removes the demo.
    fn abort(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = killpg(self.group, Signal::SIGINT);
            let start = Instant::now();
            while child.try_wait().ok().flatten().is_none() {
                if start.elapsed() > EXIT_WITHIN {
                    let _ = killpg(self.group, Signal::SIGKILL);
                    let _ = child.wait();
                    break;
                }
                sleep(Duration::from_millis(100));
            }
        }
        remove_demo();
    }
}

impl Drop for DemoRun {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.abort();
        }
    }
}

/// The counters the check watches, from `xvio stats`.
#[derive(Debug, Default)]
struct Counters {
    passed: u64,
    redirected: u64,
    queue0_rx: u64,
}

impl Counters {
    fn parse(report: &str) -> Counters {
        let outcome = |name: &str| {
            report
                .lines()
                .find_map(|l| {
                    l.strip_prefix(name)?
                        .split_whitespace()
                        .next()?
                        .parse()
                        .ok()
                })
                .unwrap_or(0)
        };
        let queue0_rx = report
            .lines()
            .find_map(|l| {
                let rest = l.trim_start().strip_prefix("queue 0:")?;
                rest.split(", rx ").nth(1)?.split(' ').next()?.parse().ok()
            })
            .unwrap_or(0);
        Counters {
            passed: outcome("passed "),
            redirected: outcome("redirected "),
            queue0_rx,
        }
    }

    fn describe(&self) -> String {
        format!(
            "xdp_stats passed {}, redirected {}; port_stats queue 0 rx {}",
            self.passed, self.redirected, self.queue0_rx
        )
    }
}

/// Runs `ip netns exec <demo netns> ARGS…`, failing on a non-zero status.
fn ip_netns_exec(args: &[&str]) -> Result<String> {
    output_of(
        Command::new("ip")
            .args(["netns", "exec", DEMO_NETNS])
            .args(args),
    )
}

fn demo_ip(args: &[&str]) -> Result<String> {
    output_of(Command::new("ip").args(["-n", DEMO_NETNS]).args(args))
}

/// The stdout of `command`, or an error with its stderr.
fn output_of(command: &mut Command) -> Result<String> {
    let out = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::Counters;

    #[test]
    fn reads_the_counters_of_xvio_stats() {
        let report = "xvio-demo0: xdp_mode XVIO_XDP_MODE_NATIVE, daemon pid 7, uptime 3 s, steer entries: 1\n\
                      outcome             packets            bytes\n\
                      passed                   12             1176\n\
                      redirected                5              490\n\
                      AF_XDP sockets: 1 (0 zero-copy)\n  \
                      queue 0: copy mode, need_wakeup, rx 5 pkts 490 B, tx 0 pkts 0 B, no guest 5, drops: …\n";
        let c = Counters::parse(report);
        assert_eq!((c.passed, c.redirected, c.queue0_rx), (12, 5, 5));
        let none = Counters::parse("");
        assert_eq!((none.passed, none.redirected, none.queue0_rx), (0, 0, 0));
    }
}
