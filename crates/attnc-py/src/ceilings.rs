//! This machine's ceilings for the cost model, shared with the `attnc` binary.
//!
//! The library never measures the machine (its ceilings are handed in), so each host does:
//! the binary and this module read and write the same cache file, in the same layout, so a
//! kernel compiled from Python gets the plan `attnc run` chooses on the same machine.
//! `ATTNC_CEILINGS=default` forces the documented constants (deterministic plans for tests),
//! `ATTNC_CEILINGS=measure` measures again; otherwise a valid cache entry for this CPU's
//! feature string is used, and a missing one is measured (about a second, once per machine)
//! and stored. Failing to read or write the cache only means measuring; nothing here is an
//! error.

use attnc_opt::Ceilings;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The environment variable that chooses the ceilings' source (as for the binary).
pub const ENV: &str = "ATTNC_CEILINGS";
/// Bytes summed by the bandwidth probe (the binary's figure).
const PROBE_BYTES: usize = 64 << 20;
/// Version of the cache file's layout (the binary's).
const CACHE_VERSION: u32 = 1;
/// A cache entry is a few hundred bytes; anything larger is not one.
const MAX_CACHE_BYTES: u64 = 64 << 10;

/// The cache file's contents.
#[derive(Debug, Serialize, Deserialize)]
struct CacheEntry {
    version: u32,
    features: String,
    ceilings: Ceilings,
}

/// This machine's ceilings, computed once per process.
pub fn machine_ceilings() -> Ceilings {
    static CEILINGS: OnceLock<Ceilings> = OnceLock::new();
    *CEILINGS.get_or_init(|| {
        let mode = std::env::var(ENV).unwrap_or_default();
        if mode == "default" {
            return Ceilings::default();
        }
        let features = attnc_jit::jit::cpu_features();
        let file = cache_dir().map(|dir| cache_file(&dir, &features));
        if mode != "measure" {
            if let Some(ceilings) = file.as_deref().and_then(|f| load(f, &features)) {
                return ceilings;
            }
        }
        match measure() {
            Some(ceilings) => {
                if let Some(f) = &file {
                    store(f, &features, ceilings);
                }
                ceilings
            }
            None => Ceilings::default(),
        }
    })
}

/// `$XDG_CACHE_HOME/attnc` when set to an absolute path, else `$HOME/.cache/attnc`.
fn cache_dir() -> Option<PathBuf> {
    let absolute = |v: std::ffi::OsString| {
        let p = PathBuf::from(v);
        p.is_absolute().then_some(p)
    };
    std::env::var_os("XDG_CACHE_HOME")
        .and_then(absolute)
        .or_else(|| {
            std::env::var_os("HOME")
                .and_then(absolute)
                .map(|h| h.join(".cache"))
        })
        .map(|base| base.join("attnc"))
}

/// The cache file for `features` in `dir`: named by a hash of the feature string.
fn cache_file(dir: &Path, features: &str) -> PathBuf {
    dir.join(format!("ceilings-{:016x}.json", fnv1a(features)))
}

/// FNV-1a, 64 bits: the file-name hash the binary uses.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The cached ceilings in `file` when it holds valid ones for `features`.
fn load(file: &Path, features: &str) -> Option<Ceilings> {
    let bytes = attnc::io::read_bounded(file, MAX_CACHE_BYTES).ok()?;
    let entry: CacheEntry = serde_json::from_slice(&bytes).ok()?;
    (entry.version == CACHE_VERSION && entry.features == features && entry.ceilings.is_valid())
        .then_some(entry.ceilings)
}

/// Writes `ceilings` for `features` to `file` atomically; failures are ignored.
fn store(file: &Path, features: &str, ceilings: Ceilings) {
    let entry = CacheEntry {
        version: CACHE_VERSION,
        features: features.to_string(),
        ceilings,
    };
    let Ok(bytes) = serde_json::to_vec_pretty(&entry) else {
        return;
    };
    if let Some(dir) = file.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = attnc::io::write_atomically(file, &bytes);
}

/// The FMA ceiling of one core and the memory bandwidth; `None` when a figure cannot be had.
fn measure() -> Option<Ceilings> {
    let gflops = attnc_jit::ceiling::measure_f32x4_ceiling(1)
        .ok()?
        .gflops_per_thread;
    let ceilings = Ceilings {
        gflops,
        gbytes_per_second: attnc_jit::bandwidth::measure_bandwidth(PROBE_BYTES).ok()?,
        ..Ceilings::default()
    };
    ceilings.is_valid().then_some(ceilings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_round_trips_and_is_keyed_by_features() {
        let dir = tempfile::tempdir().expect("temp dir");
        let c = Ceilings {
            gflops: 47.5,
            gbytes_per_second: 9.25,
            ghz: 3.0,
        };
        let file = cache_file(dir.path(), "x86_64 has_avx,has_fma");
        store(&file, "x86_64 has_avx,has_fma", c);
        assert_eq!(load(&file, "x86_64 has_avx,has_fma"), Some(c));
        assert_eq!(load(&file, "x86_64 has_avx"), None);
    }

    #[test]
    fn the_file_is_the_binarys() {
        // FNV-1a of "f" is the published test vector 0xaf63db4c8601ead9; a different name or
        // layout than the binary's would make the two hosts measure and plan apart.
        let file = cache_file(Path::new("/c"), "f");
        assert_eq!(file, Path::new("/c/ceilings-af63db4c8601ead9.json"));
        let written =
            r#"{"version":1,"features":"f","ceilings":{"gflops":1,"gbytes_per_second":2,"ghz":3}}"#;
        let dir = tempfile::tempdir().expect("temp dir");
        let file = cache_file(dir.path(), "f");
        std::fs::write(&file, written).expect("written");
        assert_eq!(
            load(&file, "f"),
            Some(Ceilings {
                gflops: 1.0,
                gbytes_per_second: 2.0,
                ghz: 3.0
            })
        );
    }

    #[test]
    fn bad_cache_files_are_ignored() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = cache_file(dir.path(), "f");
        assert_eq!(load(&file, "f"), None, "missing");
        for text in [
            "",
            "{",
            r#"{"version":1,"features":"f","ceilings":{"gflops":-1,"gbytes_per_second":1,"ghz":3}}"#,
            r#"{"version":9,"features":"f","ceilings":{"gflops":1,"gbytes_per_second":1,"ghz":3}}"#,
        ] {
            std::fs::write(&file, text).expect("written");
            assert_eq!(load(&file, "f"), None, "{text}");
        }
    }
}
