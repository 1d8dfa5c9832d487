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

/// What serving interfaces takes (load, attach, pin, AF_XDP and tap sockets).
const FOR_INTERFACES: [(u32, &str); 3] = [
    (CAP_BPF, "CAP_BPF"),
    (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
    (CAP_NET_RAW, "CAP_NET_RAW"),
];
/// What pinning the guests' counters alone takes (a daemon serving guests only).
const FOR_PINS: [(u32, &str); 1] = [(CAP_BPF, "CAP_BPF")];

/// Checks that this process may serve interfaces.
pub fn check() -> Result<(), PrivilegeError> {
    check_for(&FOR_INTERFACES)
}

/// Checks that this process may pin maps (the guests' counters).
pub fn check_pins() -> Result<(), PrivilegeError> {
    check_for(&FOR_PINS)
}

fn check_for(needed: &[(u32, &'static str)]) -> Result<(), PrivilegeError> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let missing = missing(effective_caps(&status), needed);
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

/// The capabilities of `needed` that `caps` lacks, by name (CAP_SYS_ADMIN stands for CAP_BPF).
fn missing(caps: u64, needed: &[(u32, &'static str)]) -> Vec<&'static str> {
    let has = |cap: u32| caps & (1u64 << cap) != 0;
    needed
        .iter()
        .filter(|&&(cap, _)| !(has(cap) || (cap == CAP_BPF && has(CAP_SYS_ADMIN))))
        .map(|&(_, name)| name)
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
        assert!(missing(0x1ff_ffff_ffff, &FOR_INTERFACES).is_empty());
        assert_eq!(
            missing(0, &FOR_INTERFACES),
            ["CAP_BPF", "CAP_NET_ADMIN", "CAP_NET_RAW"]
        );
        assert!(
            missing(
                caps(&[CAP_BPF, CAP_NET_ADMIN, CAP_NET_RAW]),
                &FOR_INTERFACES
            )
            .is_empty()
        );
        assert!(
            missing(
                caps(&[CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_NET_RAW]),
                &FOR_INTERFACES
            )
            .is_empty()
        );
        assert_eq!(
            missing(caps(&[CAP_BPF, CAP_NET_ADMIN]), &FOR_INTERFACES),
            ["CAP_NET_RAW"]
        );
        assert!(missing(caps(&[CAP_BPF]), &FOR_PINS).is_empty());
        assert_eq!(missing(caps(&[CAP_NET_ADMIN]), &FOR_PINS), ["CAP_BPF"]);
    }
}
