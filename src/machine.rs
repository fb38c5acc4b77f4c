//! This machine's ceilings for the cost model, measured once per machine and cached: the one
//! module of the library that measures the machine and writes a file, for the front ends (the
//! `attnc` binary and the Python package) to call, so both read and write the same cache and a
//! kernel compiled from Python gets the plan `attnc run` chooses on the same machine.
//!
//! The f32x4 FMA ceiling comes from `attnc_jit::ceiling` (a register-resident FMA loop, the
//! figure `attnc bench` reports) and the memory bandwidth from `attnc_jit::bandwidth` (generated
//! code summing a 64 MiB buffer, best of three passes), so a debug build measures the same as a
//! release build; the clock stays the assumed 3 GHz (it only scales cycles). The result is
//! cached as JSON in `$XDG_CACHE_HOME/attnc/` (or `~/.cache/attnc/`), one file per CPU feature
//! string (the string Cranelift compiles for, also stored in the file and checked on reading),
//! written atomically. Any failure to read or write the cache falls back to measuring; nothing
//! here is ever an error.
//!
//! `ATTNC_CEILINGS=default` forces the documented constants (deterministic costs for tests);
//! `ATTNC_CEILINGS=measure` measures again and rewrites the cache. Within one process the
//! answer is computed once.

use crate::io::{read_bounded, write_atomically};
use attnc_opt::Ceilings;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Starts the process's one-time setups on threads of their own, for a front end to call as
/// it begins (before it parses a program and reads the inputs): the calibration of the clock
/// the optimizer's e-graph runner reads, and the cache-size table of the matrix products
/// (`attnc_wide::gemm::prepare_in_background`). Either otherwise runs inside the first
/// compile that needs it, 1–2 ms each; a compile that starts before one ends waits for it.
pub fn prepare_in_background() {
    attnc_opt::saturate::prepare_clock();
    attnc_wide::gemm::prepare_in_background();
}

/// The environment variable that chooses the ceilings' source.
pub const ENV: &str = "ATTNC_CEILINGS";
/// Bytes summed by the bandwidth probe (far larger than any cache level).
pub const PROBE_BYTES: usize = 64 << 20;
/// Version of the cache file's layout.
const CACHE_VERSION: u32 = 1;

/// Where the ceilings in use came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The documented constants (`ATTNC_CEILINGS=default`, or measuring failed).
    Default,
    /// Read from this machine's cache file.
    Cached,
    /// Measured by this process.
    Measured,
}

/// The ceilings the engine passes to the optimizer, and their source.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct MachineCeilings {
    /// The figures.
    pub ceilings: Ceilings,
    /// Where they came from.
    pub source: Source,
    /// How long measuring them took, when this process measured them (once per machine: the
    /// result is cached), so that a first run reports it apart from compile time.
    pub measure_ms: Option<f64>,
}

impl std::fmt::Display for MachineCeilings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let source = match self.source {
            Source::Default => "defaults",
            Source::Cached => "measured on this machine, cached",
            Source::Measured => "measured on this machine now",
        };
        write!(f, "{} ({source})", self.ceilings)
    }
}

/// The cache file's contents.
#[derive(Debug, Serialize, Deserialize)]
struct CacheEntry {
    version: u32,
    features: String,
    ceilings: Ceilings,
}

/// This machine's ceilings, computed once per process (see the module docs).
pub fn machine_ceilings() -> MachineCeilings {
    static CEILINGS: OnceLock<MachineCeilings> = OnceLock::new();
    *CEILINGS.get_or_init(|| {
        let mode = std::env::var(ENV).unwrap_or_default();
        if mode == "default" {
            return MachineCeilings {
                ceilings: Ceilings::default(),
                source: Source::Default,
                measure_ms: None,
            };
        }
        let features = attnc_jit::jit::cpu_features();
        let file = cache_dir().map(|dir| cache_file(&dir, &features));
        if mode != "measure" {
            if let Some(ceilings) = file.as_deref().and_then(|f| load(f, &features)) {
                return MachineCeilings {
                    ceilings,
                    source: Source::Cached,
                    measure_ms: None,
                };
            }
        }
        let start = std::time::Instant::now();
        let measured = measure();
        let measure_ms = Some(start.elapsed().as_secs_f64() * 1e3);
        match measured {
            Some(ceilings) => {
                if let Some(f) = &file {
                    store(f, &features, ceilings);
                }
                MachineCeilings {
                    ceilings,
                    source: Source::Measured,
                    measure_ms,
                }
            }
            None => MachineCeilings {
                ceilings: Ceilings::default(),
                source: Source::Default,
                measure_ms,
            },
        }
    })
}

/// `$XDG_CACHE_HOME/attnc` when set to an absolute path, else `$HOME/.cache/attnc`.
pub fn cache_dir() -> Option<PathBuf> {
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
pub fn cache_file(dir: &Path, features: &str) -> PathBuf {
    dir.join(format!("ceilings-{:016x}.json", fnv1a(features)))
}

/// FNV-1a, 64 bits: a stable file-name hash (std's hasher may change between releases).
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The cached ceilings in `file` when it holds valid ones for `features`.
pub fn load(file: &Path, features: &str) -> Option<Ceilings> {
    // A cache is a few hundred bytes; anything else (a FIFO, a device, a huge file) is ignored
    // and the machine measured again.
    let bytes = read_bounded(file, 64 << 10).ok()?;
    let entry: CacheEntry = serde_json::from_slice(&bytes).ok()?;
    (entry.version == CACHE_VERSION && entry.features == features && entry.ceilings.is_valid())
        .then_some(entry.ceilings)
}

/// Writes `ceilings` for `features` to `file` atomically; failures are ignored (the next run
/// measures again).
pub fn store(file: &Path, features: &str, ceilings: Ceilings) {
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
    let _ = write_atomically(file, &bytes);
}

/// Measures the FMA ceiling of one core and the memory bandwidth; `None` when the JIT cannot
/// compile for this CPU or a figure is not a positive number.
pub fn measure() -> Option<Ceilings> {
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
        assert_ne!(file, cache_file(dir.path(), "x86_64 has_avx"));
    }

    #[test]
    fn the_file_name_is_stable() {
        // FNV-1a of "f" is the published test vector 0xaf63db4c8601ead9: the name must not
        // change between releases, or every machine would measure again.
        let file = cache_file(Path::new("/c"), "f");
        assert_eq!(file, Path::new("/c/ceilings-af63db4c8601ead9.json"));
    }

    #[test]
    fn bad_cache_files_are_ignored() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = cache_file(dir.path(), "f");
        assert_eq!(load(&file, "f"), None, "missing");
        for text in [
            "",
            "{",
            "[]",
            r#"{"version":1,"features":"f","ceilings":{"gflops":-1,"gbytes_per_second":1,"ghz":3}}"#,
            r#"{"version":9,"features":"f","ceilings":{"gflops":1,"gbytes_per_second":1,"ghz":3}}"#,
        ] {
            std::fs::write(&file, text).expect("written");
            assert_eq!(load(&file, "f"), None, "{text}");
        }
        let ok =
            r#"{"version":1,"features":"f","ceilings":{"gflops":1,"gbytes_per_second":2,"ghz":3}}"#;
        std::fs::write(&file, ok).expect("written");
        assert!(load(&file, "f").is_some());
    }

    #[test]
    fn an_unwritable_cache_is_silently_skipped() {
        let dir = tempfile::tempdir().expect("temp dir");
        // A file where the cache directory should be: creating it fails, storing does nothing.
        let blocker = dir.path().join("attnc");
        std::fs::write(&blocker, "not a directory").expect("written");
        let file = cache_file(&blocker, "f");
        store(&file, "f", Ceilings::default());
        assert_eq!(load(&file, "f"), None);
    }
}
