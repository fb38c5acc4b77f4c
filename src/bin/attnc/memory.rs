//! How much memory a plan may use: `--memory-limit`, and the memory this machine has available.

/// Parses a size: bytes, or a number with a `K`, `M`, `G` or `T` suffix (powers of 1024,
/// optionally followed by `B` or `iB`).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let upper = t.to_ascii_uppercase();
    let digits = upper.trim_end_matches("IB").trim_end_matches('B');
    let (number, shift) = match digits.chars().last() {
        Some('K') => (&digits[..digits.len() - 1], 10),
        Some('M') => (&digits[..digits.len() - 1], 20),
        Some('G') => (&digits[..digits.len() - 1], 30),
        Some('T') => (&digits[..digits.len() - 1], 40),
        _ => (digits, 0),
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a size (e.g. 2G, 512M or a number of bytes)"))?;
    let bytes = value * (1u64 << shift) as f64;
    if !(bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("`{text}` is not a positive size"));
    }
    Ok(bytes as u64)
}

/// The memory budget of a plan: `limit` when given, else the memory the kernel reports
/// available (`MemAvailable` of `/proc/meminfo`); either way no more than the address space
/// this process may still map (`ulimit -v`), where an allocation past it would abort.
/// `None` when nothing is known.
pub fn budget(limit: Option<u64>) -> Option<u64> {
    let wanted = limit.or_else(available);
    match (wanted, address_space_left()) {
        (Some(w), Some(a)) => Some(w.min(a)),
        (w, a) => w.or(a),
    }
}

/// Address space left under the soft `RLIMIT_AS`, less a reserve for what the run maps
/// besides its buffers (thread stacks, generated code, the allocator's arenas); `None` when
/// unlimited or unknown.
fn address_space_left() -> Option<u64> {
    /// What a run maps besides its buffers: measured at under 200 MiB with 16 threads.
    const RESERVE: u64 = 256 << 20;
    let limits = attnc::io::read_small_text("/proc/self/limits", 1 << 16).ok()?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max address space"))?;
    let soft: u64 = line
        .trim_start_matches("Max address space")
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let status = attnc::io::read_small_text("/proc/self/status", 1 << 16).ok()?;
    let mapped_kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmSize:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(
        soft.saturating_sub(mapped_kib.saturating_mul(1024))
            .saturating_sub(RESERVE),
    )
}

/// `MemAvailable` in bytes, if this system reports it.
fn available() -> Option<u64> {
    let text = attnc::io::read_small_text("/proc/meminfo", 1 << 20).ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("2K"), Ok(2048));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("3mb"), Ok(3 << 20));
        for bad in ["", "-1", "0", "G", "1e400", "twelve"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
