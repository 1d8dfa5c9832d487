//! Whether this process may load XDP programs: root, or the capabilities that takes.

use thiserror::Error;

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// The process lacks the privileges xvio needs.
#[derive(Debug, Error)]
#[error(
    "xvio needs root (or CAP_BPF and CAP_NET_ADMIN) to load XDP programs and pin maps; run it with sudo"
)]
pub struct PrivilegeError;

/// Checks the effective capabilities of this process.
pub fn check() -> Result<(), PrivilegeError> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if has_needed(effective_caps(&status)) {
        Ok(())
    } else {
        Err(PrivilegeError)
    }
}

fn effective_caps(status: &str) -> u64 {
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0)
}

fn has_needed(caps: u64) -> bool {
    let has = |cap: u32| caps & (1u64 << cap) != 0;
    has(CAP_NET_ADMIN) && (has(CAP_BPF) || has(CAP_SYS_ADMIN))
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
        assert!(has_needed(0x1ff_ffff_ffff));
        assert!(!has_needed(0));
        assert!(!has_needed(1 << CAP_BPF));
        assert!(has_needed((1 << CAP_BPF) | (1 << CAP_NET_ADMIN)));
        assert_eq!(effective_caps("garbage"), 0);
    }
}
