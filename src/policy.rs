//! The approximation policy: what a kernel's `@approx` allows, overridden by the command line.

use attnc_syntax::ast::ApproxKind;
use std::fmt;

/// The default largest relative L2 error of an allowed approximation (LANGUAGE.md §3).
pub const DEFAULT_TOL: f64 = 1e-2;

/// Which approximations the compiler may apply, and within what error.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// The allowed approximations (never `Tol`; the tolerance is kept in `tol`).
    pub allowed: Vec<ApproxKind>,
    /// The largest accepted relative L2 error.
    pub tol: f64,
}

impl Policy {
    /// The exact policy: nothing allowed.
    pub fn exact() -> Policy {
        Policy {
            allowed: Vec::new(),
            tol: DEFAULT_TOL,
        }
    }

    /// The policy of a kernel's `@approx` items.
    pub fn from_items(items: &[ApproxKind]) -> Policy {
        let mut policy = Policy::exact();
        for item in items {
            match item {
                ApproxKind::Tol(tol) => policy.tol = *tol,
                other => policy.allowed.push(other.clone()),
            }
        }
        policy
    }

    /// The seed of random matrices and calibration samples: the first `random_features`
    /// seed given, else 0.
    pub fn seed(&self) -> u64 {
        self.allowed
            .iter()
            .find_map(|kind| match kind {
                ApproxKind::RandomFeatures { seed, .. } => *seed,
                _ => None,
            })
            .unwrap_or(0)
    }

    /// True when no approximation is allowed.
    pub fn is_exact(&self) -> bool {
        self.allowed.is_empty()
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_exact() {
            return f.write_str("exact");
        }
        let items: Vec<String> = self.allowed.iter().map(approx_to_string).collect();
        write!(f, "{} (tol {})", items.join(", "), self.tol)
    }
}

/// Writes one approximation as it is spelled in `@approx(...)` and `--approx`.
pub use attnc_syntax::print::print_approx_kind as approx_to_string;

/// Parses a `--approx` list such as `bf16,lowrank(r=64),random_features(m=256,seed=7)` or
/// `nystrom(m=64)`.
///
/// The items are those of `@approx(...)`; `tol = X` is accepted too.
pub fn parse_approx_list(list: &str) -> Result<Vec<ApproxKind>, String> {
    let mut items = Vec::new();
    for raw in split_top_level(list)? {
        let item: String = raw.chars().filter(|c| !c.is_whitespace()).collect();
        if item.is_empty() {
            continue;
        }
        items.push(parse_item(&item)?);
    }
    Ok(items)
}

fn split_top_level(list: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in list.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err(format!("unbalanced `)` in --approx `{list}`"));
                }
            }
            ',' if depth == 0 => {
                parts.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(format!("unclosed `(` in --approx `{list}`"));
    }
    parts.push(&list[start..]);
    Ok(parts)
}

fn parse_item(item: &str) -> Result<ApproxKind, String> {
    match item {
        "bf16" => return Ok(ApproxKind::Bf16),
        "f16" => return Ok(ApproxKind::F16),
        "int8" => return Ok(ApproxKind::Int8),
        "bf16_products" => return Ok(ApproxKind::Bf16Products),
        _ => {}
    }
    if let Some(value) = item.strip_prefix("tol=") {
        let tol: f64 = value
            .parse()
            .map_err(|_| format!("`{value}` is not a number in --approx `{item}`"))?;
        if !(tol.is_finite() && tol > 0.0) {
            return Err(format!(
                "tol must be a positive finite number, got `{value}`"
            ));
        }
        return Ok(ApproxKind::Tol(tol));
    }
    let (name, args) = item
        .strip_suffix(')')
        .and_then(|s| s.split_once('('))
        .ok_or_else(|| unknown_item(item))?;
    let args = parse_named_args(args, item)?;
    let get = |key: &str| args.iter().find(|(k, _)| k == key).map(|(_, v)| *v);
    let allowed: &[&str] = match name {
        "lowrank" => &["r"],
        "random_features" => &["m", "seed"],
        "nystrom" => &["m"],
        _ => return Err(unknown_item(item)),
    };
    if let Some((key, _)) = args.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
        return Err(format!("`{name}` takes no argument `{key}`"));
    }
    let required = |key: &str| {
        get(key)
            .filter(|v| *v >= 1)
            .ok_or_else(|| format!("`{name}` needs `{key} = N` with N >= 1"))
    };
    match name {
        "lowrank" => Ok(ApproxKind::Lowrank { r: required("r")? }),
        "nystrom" => Ok(ApproxKind::Nystrom { m: required("m")? }),
        _ => Ok(ApproxKind::RandomFeatures {
            m: required("m")?,
            seed: get("seed"),
        }),
    }
}

fn parse_named_args(args: &str, item: &str) -> Result<Vec<(String, u64)>, String> {
    let mut out = Vec::new();
    for arg in args.split(',') {
        let (key, value) = arg
            .split_once('=')
            .ok_or_else(|| format!("expected `name = value` in --approx `{item}`"))?;
        let value: u64 = value
            .parse()
            .map_err(|_| format!("`{value}` is not a non-negative integer in `{item}`"))?;
        out.push((key.to_string(), value));
    }
    Ok(out)
}

fn unknown_item(item: &str) -> String {
    format!(
        "unknown approximation `{item}` (expected bf16, f16, int8, lowrank(r=N), \
         random_features(m=N, seed=S), nystrom(m=N) or tol=X)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_item_form() {
        let items = parse_approx_list(
            "bf16, f16,int8,lowrank(r = 64),random_features(m=256,seed=7),nystrom(m = 64),tol=0.1",
        )
        .expect("valid list");
        assert_eq!(
            items,
            vec![
                ApproxKind::Bf16,
                ApproxKind::F16,
                ApproxKind::Int8,
                ApproxKind::Lowrank { r: 64 },
                ApproxKind::RandomFeatures {
                    m: 256,
                    seed: Some(7)
                },
                ApproxKind::Nystrom { m: 64 },
                ApproxKind::Tol(0.1),
            ]
        );
    }

    #[test]
    fn rejects_malformed_items() {
        for bad in [
            "fp8",
            "lowrank",
            "lowrank(r=0)",
            "lowrank(k=3)",
            "random_features(seed=1)",
            "nystrom(m=0)",
            "nystrom(r=8)",
            "nystrom",
            "tol=-1",
            "tol=nan",
            "lowrank(r=3",
            "int8)",
        ] {
            assert!(parse_approx_list(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn policy_keeps_tol_apart() {
        let policy = Policy::from_items(&[ApproxKind::Int8, ApproxKind::Tol(0.05)]);
        assert_eq!(policy.allowed, vec![ApproxKind::Int8]);
        assert_eq!(policy.tol, 0.05);
        assert_eq!(policy.to_string(), "int8 (tol 0.05)");
    }
}
