//! `attnc bench --sweep` and `--plot`: a tiny sweep writes a well-formed SVG plot; every way the
//! plot cannot be written ends in exit status 1 with no file left behind; malformed sweeps are
//! usage errors. No timing assertions (the machine is shared).

mod common;

use common::*;
use std::path::Path;

/// Two attention kernels with `n` and one without.
const THREE_KERNELS: &str = "
kernel full(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {
    return softmax(q @ k.T / sqrt(d)) @ v;
}
kernel masked(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {
    return softmax(mask(q @ k.T / sqrt(d), causal)) @ v;
}
kernel proj(x: f32[r, d], w: f32[d, d]) -> f32[r, d] { return x @ w; }
";

/// The options of a quick benchmark.
const QUICK: [&str; 7] = [
    "--runs",
    "1",
    "--warmup",
    "0",
    "--no-interp",
    "--threads",
    "2",
];

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("directory readable")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Whether `text` is one XML element tree: an optional declaration, then tags that all close
/// in order. Enough to catch a truncated or interleaved file; not a full XML parser.
fn balanced_xml(text: &str) -> Result<(), String> {
    let mut open: Vec<&str> = Vec::new();
    let mut rest = text.trim_start();
    let mut roots = 0;
    while let Some(start) = rest.find('<') {
        let end = rest[start..]
            .find('>')
            .ok_or_else(|| "a tag never ends".to_string())?
            + start;
        let tag = &rest[start + 1..end];
        rest = &rest[end + 1..];
        if tag.starts_with('?') || tag.starts_with('!') {
            continue;
        }
        if let Some(name) = tag.strip_prefix('/') {
            let top = open
                .pop()
                .ok_or_else(|| format!("`</{name}>` closes nothing"))?;
            if top != name.trim() {
                return Err(format!("`<{top}>` closed by `</{name}>`"));
            }
            continue;
        }
        if open.is_empty() {
            roots += 1;
        }
        let name = tag.split_whitespace().next().unwrap_or("");
        if !tag.ends_with('/') {
            open.push(name.trim_end_matches('/'));
        }
    }
    match (open.last(), roots) {
        (Some(top), _) => Err(format!("`<{top}>` is never closed")),
        (None, 1) => Ok(()),
        (None, n) => Err(format!("{n} root elements")),
    }
}

#[test]
fn balanced_xml_catches_truncation_and_misnesting() {
    assert!(balanced_xml("<?xml version=\"1.0\"?><svg a=\"1\"><g><rect/></g></svg>").is_ok());
    assert!(balanced_xml("<svg><g></svg>").is_err());
    assert!(balanced_xml("<svg><g></g>").is_err());
    assert!(balanced_xml("<svg></svg><svg></svg>").is_err());
    assert!(balanced_xml("<svg><g").is_err());
}

#[test]
fn sweep_of_every_kernel_writes_a_well_formed_svg_plot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = write(dir.path(), "three.attn", THREE_KERNELS);
    let plot = dir.path().join("time.svg");
    let mut args = vec!["bench", p(&src), "--shape", "h=1,d=8", "--sweep", "n=24,12"];
    args.extend(QUICK);
    args.extend(["--plot", p(&plot), "--format", "json"]);
    let out = attnc(&args);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    // Piped stderr: no progress bar, nothing but notes.
    let err = stderr(&out);
    assert!(
        err.lines().all(|l| l.is_empty() || l.starts_with("note:")),
        "{err}"
    );
    let doc = json(&out);
    assert_eq!(doc["ok"], true);
    assert_eq!(doc["sweep"]["symbol"], "n");
    assert_eq!(doc["sweep"]["values"], serde_json::json!([12, 24]));
    assert_eq!(doc["kernels"], serde_json::json!(["full", "masked"]));
    assert_eq!(doc["plot"], p(&plot));
    assert_eq!(doc["seed"], 0, "the default seed is recorded");
    let notes = doc["notes"].as_array().expect("notes");
    assert!(
        notes.iter().any(|n| n
            .as_str()
            .is_some_and(|n| n.contains("`proj`") && n.contains("not swept"))),
        "{notes:?}"
    );
    let points = doc["points"].as_array().expect("points");
    let seen: Vec<(&str, u64)> = points
        .iter()
        .map(|pt| {
            (
                pt["kernel"].as_str().expect("kernel"),
                pt["value"].as_u64().expect("value"),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [("full", 12), ("full", 24), ("masked", 12), ("masked", 24)]
    );
    for pt in points {
        assert_eq!(pt["bindings"]["n"], pt["value"]);
        let engines: Vec<&str> = pt["results"]
            .as_array()
            .expect("results")
            .iter()
            .map(|r| r["engine"].as_str().expect("engine"))
            .collect();
        assert!(
            engines.contains(&"jit") && engines.contains(&"naive"),
            "{engines:?}"
        );
        assert!(!engines.contains(&"interp"), "--no-interp: {engines:?}");
    }

    let svg = std::fs::read_to_string(&plot).expect("the plot is written");
    assert!(
        svg.starts_with("<svg") || svg.starts_with("<?xml"),
        "{}",
        &svg[..svg.len().min(100)]
    );
    balanced_xml(&svg).unwrap_or_else(|e| panic!("malformed SVG ({e})"));
    for text in [
        "full (jit)",
        "full (naive)",
        "masked (jit)",
        "masked (naive)",
        "n (log scale)",
    ] {
        assert!(svg.contains(text), "the plot shows `{text}`");
    }
    assert!(
        svg.contains("ms, log scale"),
        "the time axis names its unit"
    );
    assert_eq!(
        entries(dir.path()),
        ["three.attn", "time.svg"],
        "no temporary file"
    );
}

#[test]
fn text_sweep_prints_one_line_per_kernel_and_value() {
    let file = examples_dir().join("local.attn");
    let mut args = vec![
        "bench",
        p(&file),
        "--shape",
        "h=1,d=4",
        "--sweep",
        "n=8,16,32",
    ];
    args.extend(QUICK);
    let out = attnc(&args);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with("bench sweep n = 8, 16, 32 [d=4, h=1]"),
        "{text}"
    );
    let rows = text.lines().filter(|l| l.starts_with("local ")).count();
    assert_eq!(rows, 3, "{text}");
}

#[test]
fn plot_alone_sweeps_n_up_to_the_given_n() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plot = dir.path().join("default.svg");
    let file = examples_dir().join("local.attn");
    let mut args = vec!["bench", p(&file), "--shape", "h=1,d=4,n=600"];
    args.extend(QUICK);
    args.extend(["--no-naive", "--plot", p(&plot), "--format", "json"]);
    let out = attnc(&args);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    assert_eq!(
        json(&out)["sweep"]["values"],
        serde_json::json!([256, 512, 600])
    );
    assert!(plot.is_file());
}

#[test]
fn plot_to_dev_full_is_exit_1() {
    if !Path::new("/dev/full").exists() {
        eprintln!("note: no /dev/full on this system; skipped");
        return;
    }
    let file = examples_dir().join("local.attn");
    let mut args = vec!["bench", p(&file), "--shape", "h=1,d=4", "--sweep", "n=8"];
    args.extend(QUICK);
    args.extend(["--plot", "/dev/full"]);
    let out = attnc(&args);
    assert_eq!(status(&out), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("/dev/full"), "{}", stderr(&out));
}

#[test]
fn plot_into_a_missing_directory_fails_before_benchmarking() {
    let file = examples_dir().join("local.attn");
    let args = [
        "bench",
        p(&file),
        "--shape",
        "h=1,d=4",
        "--plot",
        "/no/such/dir/p.svg",
        "--format",
        "json",
    ];
    let out = attnc(&args);
    assert_eq!(status(&out), 1, "{}", stderr(&out));
    let doc = json(&out);
    assert_eq!(doc["error"]["kind"], "output");
    assert!(doc["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("/no/such/dir")));
}

#[cfg(unix)]
#[test]
fn plot_into_an_unwritable_directory_is_exit_1_and_leaves_nothing() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let Some(dir) = unwritable_dir(scratch.path()) else {
        eprintln!("note: no unwritable directory available; skipped");
        return;
    };
    let before = entries(&dir);
    let plot = dir.join("p.svg");
    let file = examples_dir().join("local.attn");
    let mut args = vec!["bench", p(&file), "--shape", "h=1,d=4", "--sweep", "n=8"];
    args.extend(QUICK);
    args.extend(["--plot", p(&plot)]);
    let out = attnc(&args);
    assert_eq!(status(&out), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains(p(&plot)), "{}", stderr(&out));
    assert_eq!(entries(&dir), before, "nothing left behind");
}

#[test]
fn malformed_sweeps_are_usage_errors() {
    let file = examples_dir().join("local.attn");
    let npy = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/npy/f32_2x3.npy");
    let q = format!("q={}", p(&npy));
    for bad in [
        vec!["--sweep", "n"],
        vec!["--sweep", "n="],
        vec!["--sweep", "n=0,8"],
        vec!["--sweep", "n=8,x"],
        vec!["--sweep", "1 2=8"],
        vec!["--sweep", "n=8", "--shape", "n=4"],
        vec!["--sweep", "n=8", "--input", q.as_str()],
    ] {
        let mut args = vec!["bench", p(&file), "--shape", "h=1,d=4", "--format", "json"];
        args.extend(bad.iter().copied());
        let out = attnc(&args);
        assert_eq!(status(&out), 2, "{bad:?}: {}", stdout(&out));
        assert_eq!(json(&out)["error"]["kind"], "usage", "{bad:?}");
    }
}

#[test]
fn sweeping_a_dimension_no_kernel_has_is_exit_1() {
    let file = examples_dir().join("local.attn");
    let out = attnc(&[
        "bench",
        p(&file),
        "--shape",
        "h=1,d=4,n=8",
        "--sweep",
        "m=2,4",
    ]);
    assert_eq!(status(&out), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("no kernel"), "{}", stderr(&out));
}

#[test]
fn progress_bar_is_drawn_when_stderr_is_a_terminal() {
    // util-linux `script` runs the command on a pseudo-terminal and copies what it shows.
    let file = examples_dir().join("local.attn");
    let command = format!(
        "'{}' bench '{}' --shape h=1,d=4 --sweep n=8,16 --runs 1 --warmup 0 --no-interp",
        env!("CARGO_BIN_EXE_attnc"),
        p(&file)
    );
    let shown = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .output();
    let Some(shown) = shown.ok().filter(|o| o.status.success()) else {
        eprintln!("note: no usable `script` (util-linux) to provide a terminal; skipped");
        return;
    };
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(text.contains("2/2"), "the bar counts the points: {text}");
    assert!(
        text.contains("local n=16"),
        "the bar names the point: {text}"
    );
    assert!(text.contains("bench sweep n = 8, 16"), "{text}");
}
