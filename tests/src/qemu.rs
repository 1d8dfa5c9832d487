//! A real guest: the Debian kernel's virtio-net driver under QEMU (TCG: KVM cannot boot a
//! stock guest on these machines), connected to a vhost-user socket. The image (kernel and a
//! busybox initramfs with iperf3) is built once by tests/guest/build-image.sh and cached in
//! target/xvio-guest.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

/// The cached image folder, built on first use.
pub fn image() -> &'static Path {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = root.join("../target/xvio-guest");
        let out = Command::new("bash")
            .arg(root.join("guest/build-image.sh"))
            .arg(&dir)
            .output()
            .expect("bash");
        assert!(
            out.status.success(),
            "building the guest image failed (needs apt-get, dpkg-deb, python3, busybox-static, iperf3):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
}

/// A QEMU guest running one command.
#[derive(Debug)]
pub struct QemuGuest {
    child: Option<Child>,
    log: PathBuf,
}

impl QemuGuest {
    /// Boots a guest on vhost-user `socket` (QEMU connects as the client) with `mac` and
    /// `ip` (CIDR) on eth0, which runs `cmd` with /bin/sh, with or without MRG_RXBUF.
    pub fn start(socket: &Path, mac: &str, ip: &str, cmd: &str, mrg_rxbuf: bool) -> QemuGuest {
        let image = image();
        let log = std::env::temp_dir().join(format!("{}.log", crate::unique_name("xvio-qemu-")));
        let encoded = cmd.replace('_', "~").replace(' ', "_");
        let child = Command::new("qemu-system-x86_64")
            .args([
                "-accel",
                "tcg",
                "-cpu",
                "qemu64",
                "-m",
                "512",
                "-smp",
                "1",
                "-nographic",
                "-no-reboot",
            ])
            .args(["-nodefaults", "-serial", "stdio", "-kernel"])
            .arg(image.join("vmlinux"))
            .arg("-initrd")
            .arg(image.join("initrd.gz"))
            .arg("-append")
            .arg(format!(
                "console=ttyS0 quiet panic=-1 e2eip={ip} e2ecmd={encoded}"
            ))
            .args([
                "-object",
                "memory-backend-memfd,id=mem,size=512M,share=on",
                "-numa",
                "node,memdev=mem",
            ])
            .arg("-chardev")
            .arg(format!("socket,id=c0,path={}", socket.display()))
            .args(["-netdev", "vhost-user,id=n0,chardev=c0", "-device"])
            // vectors=0: QEMU under TCG crashes setting up MSI-X notifiers for vhost otherwise.
            .arg(format!(
                "virtio-net-pci,netdev=n0,mac={mac},vectors=0,romfile=,mrg_rxbuf={}",
                if mrg_rxbuf { "on" } else { "off" }
            ))
            .stdin(Stdio::null())
            .stdout(File::create(&log).expect("guest log"))
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64 (apt-get install qemu-system-x86)");
        QemuGuest {
            child: Some(child),
            log,
        }
    }

    /// QEMU's process id, while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// Whether QEMU still runs.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// The serial console so far.
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// Waits for the guest to power off (at most `timeout`); returns whether its command
    /// exited 0, and the console.
    pub fn wait(mut self, timeout: Duration) -> (bool, String) {
        let deadline = Instant::now() + timeout;
        if let Some(mut child) = self.child.take() {
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let console = self.console();
        (console.contains("E2E: rc=0"), console)
    }
}

impl Drop for QemuGuest {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}
