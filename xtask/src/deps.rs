//! What a fresh Debian machine lacks: apt packages (installed when root, else the exact
//! command is printed) and a mounted bpffs.

use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Packages the build and the tests need: clang and the libbpf headers build the XDP
/// program; bpftool inspects maps; iproute2 and util-linux (nsenter, setpriv) make the
/// namespaces the tests run in; gcc and linux-libc-dev check the DSA encoding against
/// `linux/idxd.h`; dpdk-dev's testpmd is a real vhost-user frontend; QEMU, busybox-static,
/// iperf3 and python3 build and boot the test guest (tests/guest/build-image.sh); ethtool
/// turns the peer's checksum offload off; iputils-ping's ping is the peers' (a fresh Debian
/// has none).
pub const TEST_PACKAGES: &[&str] = &[
    "clang",
    "libbpf-dev",
    "bpftool",
    "iproute2",
    "util-linux",
    "gcc",
    "linux-libc-dev",
    "dpdk-dev",
    "qemu-system-x86",
    "busybox-static",
    "iperf3",
    "python3",
    "ethtool",
    "iputils-ping",
];
/// Packages `cargo xtask run` needs (the demo pings from its namespace).
pub const RUN_PACKAGES: &[&str] = &[
    "clang",
    "libbpf-dev",
    "bpftool",
    "iproute2",
    "util-linux",
    "iputils-ping",
];

/// Whether this process is root.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Installs the missing `packages` (root), or fails with the command to run.
pub fn ensure(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let command = format!("apt-get install -y {}", missing.join(" "));
    if !is_root() {
        bail!(
            "missing packages: {}; install them with: sudo {command}",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    let quiet = |cmd: &mut Command| {
        cmd.env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
    };
    let updated = quiet(Command::new("apt-get").arg("update")).context("running apt-get update")?;
    if !updated.success() {
        eprintln!("xtask: apt-get update failed; trying the install anyway");
    }
    let status = quiet(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
    )
    .context("running apt-get install")?;
    if !status.success() {
        bail!("`{command}` failed ({status})");
    }
    Ok(())
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Mounts bpffs on /sys/fs/bpf when it is not there yet (root only).
pub fn ensure_bpffs() -> Result<()> {
    let mounted = std::fs::read_to_string("/proc/mounts")
        .context("reading /proc/mounts")?
        .lines()
        .any(|l| {
            l.split_whitespace().nth(1) == Some("/sys/fs/bpf")
                && l.split_whitespace().nth(2) == Some("bpf")
        });
    if !mounted {
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status()
            .context("running mount")?;
        if !status.success() {
            bail!("mounting bpffs failed: mount -t bpf bpf /sys/fs/bpf");
        }
    }
    Ok(())
}
