//! The `xvio` binary as a child process, started inside a namespace with
//! `nsenter --net=…` (not `ip netns exec`, which remounts /sys and hides bpffs).

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::netns::Netns;

/// The `xvio` binary cargo built next to this test binary (or `$XVIO_BIN`).
pub fn xvio_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("XVIO_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> → target/<profile>/xvio
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("xvio");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p xvio`",
        bin.display()
    );
    bin
}

/// `xvio ARGS…` run by `wrapper` (a command that execs its arguments, as `setpriv …`), in
/// `ns` when given.
fn command_under(ns: Option<&Netns>, wrapper: &[&str], args: &[&str]) -> Command {
    let xvio = xvio_bin();
    let mut line: Vec<&std::ffi::OsStr> = wrapper.iter().map(std::ffi::OsStr::new).collect();
    line.push(xvio.as_os_str());
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", ns.path())).args(&line);
            c
        }
        None => {
            let mut c = Command::new(line[0]);
            c.args(&line[1..]);
            c
        }
    };
    cmd.args(args).env("XVIO_LOG", "info");
    cmd
}

/// Runs `xvio ARGS…` to completion (for commands expected to fail fast).
pub fn run_xvio(ns: Option<&Netns>, args: &[&str]) -> Output {
    run_xvio_under(ns, &[], args)
}

/// As [`run_xvio`], xvio run by `wrapper` (a command that execs its arguments, as
/// `setpriv …`).
pub fn run_xvio_under(ns: Option<&Netns>, wrapper: &[&str], args: &[&str]) -> Output {
    let mut cmd = command_under(ns, wrapper, args);
    cmd.stdin(Stdio::null());
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn xvio");
    wait_output(child, Duration::from_secs(30))
}

/// Asserts that `out` is a daemon that refused to start because the pins where its own go
/// are those of the running daemon `owner`, saying so and naming `--pin-root`.
pub fn assert_refused_for_pins_of(out: &Output, owner: i32) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("belong to xvio pid {owner}")) && stderr.contains("--pin-root"),
        "{stderr}"
    );
}

fn wait_output(mut child: Child, limit: Duration) -> Output {
    let start = Instant::now();
    while child.try_wait().expect("try_wait").is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("xvio did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("wait_with_output")
}

/// Waits (at most 10 s) until `n` guests in the pinned `guest_stats` map at `map` say
/// `ready` (the datapath delivers frames to them: frames sent before are dropped); the map
/// is written about once a second.
pub fn wait_guests_ready(map: &Path, n: usize) -> Result<(), String> {
    let start = Instant::now();
    let mut dump = String::new();
    while start.elapsed() < Duration::from_secs(10) {
        let out = std::process::Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(map)
            .output()
            .map_err(|e| format!("bpftool: {e}"))?;
        dump = String::from_utf8_lossy(&out.stdout).into_owned();
        if dump.matches("\"ready\":1").count() >= n {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("{n} guests were not ready within 10 s: {dump}"))
}

/// A running daemon; SIGTERMed (and waited for) on drop if not stopped explicitly.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    /// Starts `xvio run ARGS…` in `ns` (or here) and waits until `ready` (a path) exists.
    pub fn start(ns: Option<&Netns>, args: &[&str], ready: &Path) -> Result<Daemon, String> {
        Daemon::start_under(ns, &[], args, ready)
    }

    /// As [`Daemon::start`], xvio run by `wrapper` (a command that execs its arguments, as
    /// `setpriv …`, so that the child's pid is still the daemon's).
    pub fn start_under(
        ns: Option<&Netns>,
        wrapper: &[&str],
        args: &[&str],
        ready: &Path,
    ) -> Result<Daemon, String> {
        let log = std::env::temp_dir().join(format!("{}.log", crate::unique_name("xvio-daemon-")));
        let mut cmd = command_under(ns, wrapper, &[&["run"], args].concat());
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).map_err(|e| e.to_string())?);
        let child = cmd.spawn().map_err(|e| format!("spawn xvio: {e}"))?;
        let mut daemon = Daemon {
            child: Some(child),
            log,
        };
        let start = Instant::now();
        while !ready.exists() {
            if let Some(status) = daemon.child_mut().try_wait().map_err(|e| e.to_string())? {
                daemon.child = None;
                return Err(format!(
                    "xvio exited with {status} before it was ready:\n{}",
                    daemon.log()
                ));
            }
            if start.elapsed() > Duration::from_secs(20) {
                return Err(format!("xvio was not ready within 20 s:\n{}", daemon.log()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(daemon)
    }

    /// The daemon's pid (`nsenter` execs xvio, so the child's pid is the daemon's); `None`
    /// once it was stopped.
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().and_then(|c| i32::try_from(c.id()).ok())
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("daemon already stopped")
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit (at most 20 s).
    pub fn terminate(self) -> (ExitStatus, String) {
        self.stop_with(Signal::SIGTERM)
    }

    /// Sends `signal` and waits for the exit (at most 20 s).
    pub fn stop_with(mut self, signal: Signal) -> (ExitStatus, String) {
        let status = self.stop_by(signal);
        (status, self.log())
    }

    /// Kills it with SIGKILL (a crash: it cleans nothing up) and reaps it.
    pub fn kill(mut self) {
        let mut child = self.child.take().expect("daemon already stopped");
        let _ = child.kill();
        let _ = child.wait();
    }

    fn stop(&mut self) -> ExitStatus {
        self.stop_by(Signal::SIGTERM)
    }

    fn stop_by(&mut self, signal: Signal) -> ExitStatus {
        let mut child = self.child.take().expect("daemon already stopped");
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        // nsenter execs xvio, so the child's pid is the daemon's.
        let _ = kill(pid, signal);
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                panic!("xvio did not stop within 20 s of {signal}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}
