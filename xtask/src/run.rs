//! `cargo xtask run`: build the daemon and run it, on the named interfaces or on a demo
//! veth pair whose far end sits in netns `xvio-demo`.

use std::process::Command;

use anyhow::{Context, Result, bail};
use nix::sys::signal::{SigHandler, Signal, signal};

use crate::{cargo, deps, target_dir};

/// The demo's namespace.
pub const DEMO_NETNS: &str = "xvio-demo";
/// The demo veth's end here, where xvio attaches.
pub const DEMO_IF: &str = "xvio-demo0";
/// Its peer, in the demo namespace.
pub const DEMO_PEER: &str = "xvio-demo1";
const DEMO_ADDR: &str = "10.199.0.1/24";
const DEMO_PEER_ADDR: &str = "10.199.0.2/24";
/// The MAC the demo steers to AF_XDP: frames to it are redirected to the socket of their
/// queue and, with no guest to take them yet, counted as `rx_no_guest`.
pub const DEMO_GUEST_MAC: &str = "02:58:56:49:4f:01";
/// An address in the demo subnet to give that MAC (a neighbour entry in the demo namespace),
/// so that `ping` sends steered frames.
pub const DEMO_STEERED_ADDR: &str = "10.199.0.99";

/// `cargo xtask run [-- ARGS]`.
pub fn run(args: &[String]) -> Result<()> {
    deps::ensure(deps::RUN_PACKAGES)?;
    cargo(&["build", "--release", "-p", "xvio"])?;
    let bin = target_dir().join("release/xvio");
    let demo = !args
        .iter()
        .any(|a| a == "--iface" || a.starts_with("--iface="));
    let mut daemon_args: Vec<String> = vec!["run".into()];
    if demo {
        make_demo()?;
        daemon_args.extend([
            "--iface".into(),
            DEMO_IF.into(),
            "--steer".into(),
            DEMO_GUEST_MAC.into(),
        ]);
        println!(
            "demo: veth {DEMO_IF} ({DEMO_ADDR}) <-> {DEMO_PEER} ({DEMO_PEER_ADDR}) in netns {DEMO_NETNS}"
        );
        println!(
            "  traffic that passes to the kernel: ip netns exec {DEMO_NETNS} ping -c 3 10.199.0.1"
        );
        println!(
            "  traffic steered to AF_XDP: ip -n {DEMO_NETNS} neigh replace {DEMO_STEERED_ADDR} lladdr \
             {DEMO_GUEST_MAC} dev {DEMO_PEER}; ip netns exec {DEMO_NETNS} ping -c 3 {DEMO_STEERED_ADDR}"
        );
    }
    daemon_args.extend(args.iter().cloned());
    let ifaces: Vec<&str> = daemon_args
        .windows(2)
        .filter(|w| w[0] == "--iface")
        .map(|w| w[1].as_str())
        .collect();
    for iface in &ifaces {
        println!(
            "  counters: {}bpftool map dump pinned /sys/fs/bpf/xvio/{iface}/xdp_stats",
            sudo_prefix()
        );
        println!(
            "  daemon:   {}bpftool map dump pinned /sys/fs/bpf/xvio/{iface}/daemon_stats",
            sudo_prefix()
        );
    }
    println!(
        "Ctrl-C stops xvio{}.",
        if demo { " and removes the demo" } else { "" }
    );

    let mut command = privileged(&bin.to_string_lossy());
    command.args(&daemon_args);
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    // Ctrl-C reaches the daemon (same process group), which cleans up and exits; this
    // process ignores it so that it can remove the demo afterwards.
    // SAFETY: SIG_IGN installs no handler code; nothing else in xtask relies on SIGINT.
    unsafe { signal(Signal::SIGINT, SigHandler::SigIgn) }.context("ignoring SIGINT")?;
    let status = child.wait().context("waiting for xvio")?;
    if demo {
        remove_demo();
        println!("demo removed");
    }
    if !status.success() {
        bail!("xvio exited with {status}");
    }
    Ok(())
}

fn sudo_prefix() -> &'static str {
    if deps::is_root() { "" } else { "sudo " }
}

/// `program` run as root: directly when root, else through sudo.
fn privileged(program: &str) -> Command {
    if deps::is_root() {
        Command::new(program)
    } else {
        let mut c = Command::new("sudo");
        c.arg("--preserve-env=XVIO_LOG").arg(program);
        c
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let status = privileged("ip").args(args).status().context("running ip")?;
    if !status.success() {
        bail!("ip {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn make_demo() -> Result<()> {
    remove_demo(); // left over from a run that was killed
    ip(&["netns", "add", DEMO_NETNS])?;
    ip(&[
        "link", "add", DEMO_IF, "type", "veth", "peer", "name", DEMO_PEER, "netns", DEMO_NETNS,
    ])?;
    ip(&["addr", "add", DEMO_ADDR, "dev", DEMO_IF])?;
    ip(&["link", "set", DEMO_IF, "up"])?;
    ip(&[
        "-n",
        DEMO_NETNS,
        "addr",
        "add",
        DEMO_PEER_ADDR,
        "dev",
        DEMO_PEER,
    ])?;
    ip(&["-n", DEMO_NETNS, "link", "set", DEMO_PEER, "up"])?;
    ip(&["-n", DEMO_NETNS, "link", "set", "lo", "up"])
}

/// Removes the demo (namespace and veth), if it is there.
pub fn remove_demo() {
    // Deleting the namespace deletes the veth pair with it.
    let _ = privileged("ip")
        .args(["netns", "del", DEMO_NETNS])
        .stderr(std::process::Stdio::null())
        .status();
    let _ = privileged("ip")
        .args(["link", "del", DEMO_IF])
        .stderr(std::process::Stdio::null())
        .status();
}
