//! Whether this process may do what xvio does: root, or the capabilities that takes.
//!
//! Measured on Linux 6.18 with `setpriv --bounding-set=-all,+…` as root: loading the XDP
//! program and its maps needs CAP_BPF (CAP_SYS_ADMIN will do), attaching it CAP_NET_ADMIN,
//! an AF_XDP socket (and the broadcast tap's AF_PACKET socket) CAP_NET_RAW. Not CAP_PERFMON:
//! the program compares packet pointers only with the frame's end and never subtracts them
//! (the verifier refuses either without it). The UMEMs also need locked memory:
//! CAP_IPC_LOCK or a memlock limit above them, which the AF_XDP error names when it is short
//! (not checked here: a raised limit is enough).

use thiserror::Error;

const CAP_NET_ADMIN: u32 = 12;
const CAP_NET_RAW: u32 = 13;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// The process lacks the privileges xvio needs.
#[derive(Debug, Error)]
#[error(
    "xvio needs root, or the capabilities CAP_BPF, CAP_NET_ADMIN and CAP_NET_RAW (missing: \
     {missing}), to load its XDP program, pin maps and open AF_XDP sockets; run it with sudo"
)]
pub struct PrivilegeError {
    missing: String,
}

/// Checks the effective capabilities of this process.
pub fn check() -> Result<(), PrivilegeError> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let missing = missing(effective_caps(&status));
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PrivilegeError {
            missing: missing.join(", "),
        })
    }
}

fn effective_caps(status: &str) -> u64 {
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0)
}

/// The capabilities of those xvio needs that `caps` lacks, by name.
fn missing(caps: u64) -> Vec<&'static str> {
    let has = |cap: u32| caps & (1u64 << cap) != 0;
    let needed = [
        (CAP_BPF, "CAP_BPF", true),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN", false),
        (CAP_NET_RAW, "CAP_NET_RAW", false),
    ];
    needed
        .into_iter()
        .filter(|&(cap, _, sys_admin_will_do)| {
            let held = has(cap) || (sys_admin_will_do && has(CAP_SYS_ADMIN));
            !held
        })
        .map(|(_, name, _)| name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_capabilities() {
        assert_eq!(
            effective_caps("Name:\tx\nCapEff:\t000001ffffffffff\n"),
            0x1ff_ffff_ffff
        );
        assert_eq!(effective_caps("garbage"), 0);
    }

    #[test]
    fn names_what_is_missing() {
        let caps = |list: &[u32]| list.iter().fold(0u64, |c, &cap| c | 1 << cap);
        assert!(missing(0x1ff_ffff_ffff).is_empty());
        assert_eq!(missing(0), ["CAP_BPF", "CAP_NET_ADMIN", "CAP_NET_RAW"]);
        assert!(missing(caps(&[CAP_BPF, CAP_NET_ADMIN, CAP_NET_RAW])).is_empty());
        assert!(missing(caps(&[CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_NET_RAW])).is_empty());
        assert_eq!(missing(caps(&[CAP_BPF, CAP_NET_ADMIN])), ["CAP_NET_RAW"]);
    }
}
