//! Reading the IR text form back: [`parse_kernel`] is the inverse of
//! [`crate::print::print_kernel`], so rewrite and code-generation tests can keep their input
//! and expected output as text files (the optimizer's golden files are IR in, IR out).
//!
//! ```text
//! kernel local(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d]
//!   %0 = input q #0          : f32[h, n, d]
//!   %1 = input k #1          : f32[h, n, d]
//!   %2 = input v #2          : f32[h, n, d]
//!   %3 = attention %0, %1, %2, score=(mul s 0.125), mask=(causal & window(256)) : f32[h, n, d]
//!   return %3
//! ```
//!
//! Node numbers must be `0, 1, 2, …` in order; the type after ` : ` is checked against the
//! shape the node's op gives its operands. Spans are not part of the text (they default).

use crate::backward::{AttentionGrad, BackwardOp, LinearGrad};
use crate::build::GraphBuilder;
use crate::dim::{Dim, Shape};
use crate::fused::{Attention, Decay, LinearAttention, Normalizer, Precision, ScoreExpr};
use crate::graph::{Kernel, KernelOutput, NodeId, Param};
use crate::op::{BinaryOp, DType, Op, PoolOp, RandomKind, ReduceOp, UnaryOp};
use crate::pattern::{MaskPattern, SymbolicPattern};
use attnc_syntax::Span;

/// A line of IR text that does not read, with its 1-based line number.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct TextError {
    /// The line.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// Parses one kernel printed by [`crate::print::print_kernel`].
pub fn parse_kernel(text: &str) -> Result<Kernel, TextError> {
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'));
    let err = |line: usize, message: String| TextError { line, message };
    let (mut no, mut line) = lines.next().ok_or_else(|| err(1, "no kernel".into()))?;
    let approx = if line.starts_with("@approx(") {
        let items = parse_approx(line).map_err(|m| err(no, m))?;
        (no, line) = lines
            .next()
            .ok_or_else(|| err(no + 1, "an @approx line without a kernel".into()))?;
        items
    } else {
        Vec::new()
    };
    let (name, params, ret) = parse_signature(line).map_err(|m| err(no, m))?;
    let mut b = GraphBuilder::default();
    let mut output: Option<Vec<NodeId>> = None;
    for (no, line) in lines {
        if let Some(rest) = line.strip_prefix("return ") {
            let nodes = rest
                .split(',')
                .map(|r| node_ref(r.trim(), b.graph.len()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|m| err(no, m))?;
            if nodes.len() != ret.len() {
                let m = format!("{} returned values for {} types", nodes.len(), ret.len());
                return Err(err(no, m));
            }
            output = Some(nodes);
            continue;
        }
        if output.is_some() {
            return Err(err(no, "a line after `return`".into()));
        }
        parse_node(&mut b, &params, line).map_err(|m| err(no, m))?;
    }
    let output = output.ok_or_else(|| err(0, "no `return` line".into()))?;
    let mut outputs = output
        .into_iter()
        .zip(ret)
        .map(|(node, dtype)| KernelOutput { node, dtype });
    let first = outputs
        .next()
        .ok_or_else(|| err(0, "no returned value".into()))?;
    Ok(Kernel {
        name,
        params,
        graph: b.graph,
        output: first.node,
        ret_dtype: first.dtype,
        extra_outputs: outputs.collect(),
        approx,
        span: Span::default(),
    })
}

/// The items of an `@approx(...)` line, read by the language's own parser.
fn parse_approx(line: &str) -> Result<Vec<attnc_syntax::ast::ApproxKind>, String> {
    let source = format!("{line} kernel k(x: f32[1]) -> f32[1] {{ return x; }}");
    let (file, diagnostics) = attnc_syntax::parse(&source);
    if let Some(d) = diagnostics.first() {
        return Err(format!("a malformed @approx line: {}", d.message));
    }
    let kernel = file.kernels.first().ok_or("a malformed @approx line")?;
    Ok(kernel.approx.iter().map(|a| a.kind.clone()).collect())
}

/// `kernel NAME(p: f32[a, b], ...) -> f32[...]` or `-> (f32[...], f32[...])`.
fn parse_signature(line: &str) -> Result<(String, Vec<Param>, Vec<DType>), String> {
    let rest = line
        .strip_prefix("kernel ")
        .ok_or("expected `kernel NAME(...) -> TYPE`")?;
    let open = rest
        .find('(')
        .ok_or("expected `(` after the kernel's name")?;
    let close = rest.rfind(") -> ").ok_or("expected `) -> TYPE`")?;
    let name = rest[..open].trim().to_string();
    let mut params = Vec::new();
    for part in split_top(&rest[open + 1..close]) {
        let (pname, ty) = part.split_once(':').ok_or("expected `name: type`")?;
        let (dtype, shape) = parse_type(ty.trim())?;
        params.push(Param {
            name: pname.trim().to_string(),
            dtype,
            shape,
            span: Span::default(),
        });
    }
    let ret_text = rest[close + 5..].trim();
    let ret = match ret_text.strip_prefix('(').and_then(|r| r.strip_suffix(')')) {
        Some(inner) => split_top(inner)
            .into_iter()
            .map(|t| parse_type(t.trim()).map(|(dtype, _)| dtype))
            .collect::<Result<Vec<_>, _>>()?,
        None => vec![parse_type(ret_text)?.0],
    };
    Ok((name, params, ret))
}

/// `f32[h, n, d]`.
fn parse_type(text: &str) -> Result<(DType, Shape), String> {
    let open = text
        .find('[')
        .ok_or_else(|| format!("`{text}` is not a type"))?;
    let dtype = match &text[..open] {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::Bf16,
        "i32" => DType::I32,
        other => return Err(format!("unknown element type `{other}`")),
    };
    let dims = text[open + 1..]
        .strip_suffix(']')
        .ok_or_else(|| format!("`{text}` does not end with `]`"))?;
    let shape = dims
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(dim)
        .collect();
    Ok((dtype, shape))
}

fn dim(text: &str) -> Dim {
    if let Some(inner) = text.strip_prefix("ceil(").and_then(|t| t.strip_suffix(')')) {
        // `ceil(n/b)`: split at the `/` outside parentheses.
        let mut depth = 0i32;
        for (i, c) in inner.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                '/' if depth == 0 => {
                    return Dim::CeilDiv(Box::new(dim(&inner[..i])), Box::new(dim(&inner[i + 1..])))
                }
                _ => {}
            }
        }
    }
    match text.parse::<u64>() {
        Ok(v) => Dim::Const(v),
        Err(_) => Dim::Sym(text.to_string()),
    }
}

/// `%N` for a node that exists already.
fn node_ref(text: &str, count: usize) -> Result<NodeId, String> {
    let index: usize = text
        .strip_prefix('%')
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("`{text}` is not a node (`%N`)"))?;
    if index >= count {
        return Err(format!("%{index} is used before it is defined"));
    }
    Ok(NodeId::new(index))
}

/// Splits `text` at commas outside parentheses and brackets.
fn split_top(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(text[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    let last = text[start..].trim();
    if !last.is_empty() {
        parts.push(last);
    }
    parts
}

/// One `%N = mnemonic args : type` line.
fn parse_node(b: &mut GraphBuilder, params: &[Param], line: &str) -> Result<(), String> {
    let (lhs, rest) = line.split_once(" = ").ok_or("expected `%N = ...`")?;
    let index = b.graph.len();
    if lhs.trim() != format!("%{index}") {
        return Err(format!("expected node %{index}, found `{}`", lhs.trim()));
    }
    let (body, ty) = rest
        .rsplit_once(" : ")
        .ok_or("expected ` : TYPE` at the end")?;
    let (dtype, shape) = parse_type(ty.trim())?;
    let (mnemonic, args) = body.split_once(' ').unwrap_or((body, ""));
    let args = split_top(args);
    let operands = |args: &[&str]| -> Result<Vec<NodeId>, String> {
        args.iter()
            .filter(|a| a.starts_with('%'))
            .map(|a| node_ref(a, index))
            .collect()
    };
    let attr = |key: &str| -> Option<&str> {
        args.iter()
            .find_map(|a| a.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
    };
    let number = |text: &str| -> Result<f64, String> {
        match text {
            "inf" => Ok(f64::INFINITY),
            "-inf" => Ok(f64::NEG_INFINITY),
            "NaN" => Ok(f64::NAN),
            t => t.parse().map_err(|_| format!("`{t}` is not a number")),
        }
    };
    let axis = || -> Result<usize, String> {
        attr("axis")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| "expected `axis=N`".to_string())
    };
    let attention = || -> Result<Attention, String> {
        Ok(Attention {
            score: parse_score(attr("score").ok_or("expected `score=...`")?)?,
            mask: attr("mask").map(parse_pattern).transpose()?,
            precision: match attr("precision") {
                None | Some("exact") => Precision::Exact,
                Some("int8") => Precision::Int8,
                Some("bf16") => Precision::Bf16,
                Some(p) => return Err(format!("unknown precision `{p}`")),
            },
            lse: args.contains(&"lse"),
        })
    };
    let linear = || -> Result<LinearAttention, String> {
        let causal = args.contains(&"causal");
        let normalizer = if args.contains(&"unnormalized") {
            Normalizer::None
        } else {
            Normalizer::Sum {
                eps: attr("eps").map(number).transpose()?.unwrap_or(0.0),
            }
        };
        let decay = if args.contains(&"decay") {
            Decay::Slope
        } else if args.contains(&"gate") {
            Decay::Gate
        } else {
            Decay::None
        };
        Ok(LinearAttention {
            causal,
            normalizer,
            decay,
        })
    };
    let wrt = || -> Result<usize, String> {
        attr("wrt")
            .and_then(crate::backward::parse_slot)
            .ok_or_else(|| "expected `wrt=q|k|v|bN`".to_string())
    };
    let ops = operands(&args)?;
    let op = match mnemonic {
        "input" => {
            let words: Vec<&str> = args.first().copied().unwrap_or("").split(' ').collect();
            let [name, idx] = words[..] else {
                return Err("expected `input NAME #INDEX`".into());
            };
            let index: usize = idx
                .strip_prefix('#')
                .and_then(|i| i.parse().ok())
                .ok_or("expected `#INDEX`")?;
            let param = params.get(index).ok_or("no such parameter")?;
            if param.name != name {
                return Err(format!(
                    "parameter #{index} is `{}`, not `{name}`",
                    param.name
                ));
            }
            b.add_node(
                Op::Input {
                    index,
                    name: name.to_string(),
                },
                param.shape.clone(),
                param.dtype,
                &[],
            );
            return Ok(());
        }
        "const" => Op::Const(number(args.first().ok_or("a constant needs a value")?)?),
        "dim" => Op::DimValue(dim(args.first().ok_or("`dim` needs a symbol")?)),
        "fill" => Op::Fill {
            value: number(args.first().ok_or("a fill needs a value")?)?,
        },
        "relpos" => Op::RelPos,
        "matmul" => Op::MatMul,
        "transpose" => Op::Transpose,
        "sum" | "max" | "mean" | "logsumexp" => Op::Reduce {
            op: match mnemonic {
                "sum" => ReduceOp::Sum,
                "max" => ReduceOp::Max,
                "mean" => ReduceOp::Mean,
                _ => ReduceOp::LogSumExp,
            },
            axis: axis()?,
        },
        "softmax" => Op::Softmax { axis: axis()? },
        "softmax-sink" => Op::SoftmaxSink,
        "cumsum" => Op::Cumsum { axis: axis()? },
        "mean-pool" | "max-pool" => Op::Pool {
            op: if mnemonic == "mean-pool" {
                PoolOp::Mean
            } else {
                PoolOp::Max
            },
            size: dim(attr("size").ok_or("expected `size=B`")?),
        },
        "mask" => {
            // After the operands: the scores and any segment ids.
            let pattern = args.get(ops.len()).ok_or("a mask needs a pattern")?;
            Op::Mask {
                pattern: parse_pattern(pattern)?,
                fill: number(attr("fill").ok_or("expected `fill=X`")?)?,
            }
        }
        "cast" => Op::Cast {
            to: parse_type(&format!("{}[]", attr("to").ok_or("expected `to=TYPE`")?))?.0,
        },
        "random" => {
            let words: Vec<&str> = args.first().copied().unwrap_or("").split(' ').collect();
            let [kind, seed] = words[..] else {
                return Err("expected `random KIND seed=S`".into());
            };
            Op::Random {
                kind: RandomKind::from_name(kind).ok_or("unknown random matrix")?,
                seed: seed
                    .strip_prefix("seed=")
                    .and_then(|s| s.parse().ok())
                    .ok_or("expected `seed=S`")?,
            }
        }
        "attention" => Op::Attention(Box::new(attention()?)),
        "linear-attention" => Op::LinearAttention(linear()?),
        "sum-to" => Op::Backward(BackwardOp::SumTo),
        "greater" => Op::Backward(BackwardOp::Greater),
        "mean-unpool" | "max-unpool" => Op::Backward(BackwardOp::Unpool {
            op: if mnemonic == "mean-unpool" {
                PoolOp::Mean
            } else {
                PoolOp::Max
            },
            size: dim(attr("size").ok_or("expected `size=B`")?),
        }),
        "attention-grad" => Op::Backward(BackwardOp::Attention(Box::new(AttentionGrad {
            attention: attention()?,
            wrt: wrt()?,
            lse_cotangent: args.contains(&"lse-cotangent"),
        }))),
        "linear-attention-grad" => Op::Backward(BackwardOp::Linear(LinearGrad {
            linear: linear()?,
            wrt: wrt()?,
        })),
        other => match (unary_op(other), binary_op(other)) {
            (Some(u), _) => Op::Unary(u),
            (_, Some(bop)) => Op::Binary(bop),
            _ => return Err(format!("unknown op `{other}`")),
        },
    };
    let given = matches!(
        op,
        Op::Fill { .. } | Op::RelPos | Op::Random { .. } | Op::Backward(BackwardOp::SumTo)
    )
    .then_some(&shape);
    let id = b.add(op, &ops, given)?;
    let node = b.graph.node(id);
    if node.shape != shape || node.dtype != dtype {
        return Err(format!(
            "the type says {}{} but the op gives {}{}",
            dtype.keyword(),
            crate::dim::format_shape(&shape),
            node.dtype.keyword(),
            crate::dim::format_shape(&node.shape)
        ));
    }
    Ok(())
}

fn unary_op(name: &str) -> Option<UnaryOp> {
    use UnaryOp::*;
    [Neg, Exp, Log, Sqrt, Rsqrt, Tanh, Sigmoid, Relu, Elu, Abs]
        .into_iter()
        .find(|u| u.to_string() == name)
}

fn binary_op(name: &str) -> Option<BinaryOp> {
    use BinaryOp::*;
    [Add, Sub, Mul, Div, Max, Min]
        .into_iter()
        .find(|b| b.to_string() == name)
}

/// A mask pattern as [`MaskPattern`]'s `Display` writes it: `(causal & window(256))`,
/// `window(w)`, `(document(g0) | global(4))`.
pub fn parse_pattern(text: &str) -> Result<SymbolicPattern, String> {
    let tokens = tokenize(text);
    let mut at = 0;
    let p = pattern_or(&tokens, &mut at)?;
    if at != tokens.len() {
        return Err(format!(
            "unexpected `{}` in the pattern `{text}`",
            tokens[at]
        ));
    }
    Ok(p)
}

fn tokenize(text: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut word = String::new();
    for c in text.chars() {
        if c.is_alphanumeric() || c == '_' || c == '.' || c == '-' {
            word.push(c);
            continue;
        }
        if !word.is_empty() {
            tokens.push(std::mem::take(&mut word));
        }
        if !c.is_whitespace() {
            tokens.push(c.to_string());
        }
    }
    if !word.is_empty() {
        tokens.push(word);
    }
    tokens
}

fn pattern_or(t: &[String], at: &mut usize) -> Result<SymbolicPattern, String> {
    let mut p = pattern_and(t, at)?;
    while t.get(*at).map(String::as_str) == Some("|") {
        *at += 1;
        p = MaskPattern::Or(Box::new(p), Box::new(pattern_and(t, at)?));
    }
    Ok(p)
}

fn pattern_and(t: &[String], at: &mut usize) -> Result<SymbolicPattern, String> {
    let mut p = pattern_atom(t, at)?;
    while t.get(*at).map(String::as_str) == Some("&") {
        *at += 1;
        p = MaskPattern::And(Box::new(p), Box::new(pattern_atom(t, at)?));
    }
    Ok(p)
}

fn pattern_atom(t: &[String], at: &mut usize) -> Result<SymbolicPattern, String> {
    let token = t.get(*at).ok_or("a pattern ends early")?.clone();
    *at += 1;
    if token == "(" {
        let p = pattern_or(t, at)?;
        expect(t, at, ")")?;
        return Ok(p);
    }
    let mut args = Vec::new();
    if token != "causal" {
        expect(t, at, "(")?;
        loop {
            let word = t.get(*at).ok_or("expected a size")?;
            let arg = match word.parse::<u64>() {
                Ok(v) => Dim::Const(v),
                Err(_) if word.chars().all(|c| c.is_alphanumeric() || c == '_') => {
                    Dim::Sym(word.clone())
                }
                Err(_) => return Err(format!("expected a size, found `{word}`")),
            };
            args.push(arg);
            *at += 1;
            if t.get(*at).map(String::as_str) == Some(",") {
                *at += 1;
            } else {
                break;
            }
        }
        expect(t, at, ")")?;
    }
    // `document(g0)` / `document(g0, g1)` / `topk_blocks(g0, k, b)`: segment operands by index.
    let segment = |d: &Dim| match d {
        Dim::Sym(s) => s.strip_prefix('g').and_then(|k| k.parse::<usize>().ok()),
        Dim::Const(_) | Dim::CeilDiv(..) => None,
    };
    Ok(match (token.as_str(), args.as_slice()) {
        ("causal", []) => MaskPattern::Causal,
        ("window", [w]) => MaskPattern::Window(w.clone()),
        ("dilated", [w, r]) => MaskPattern::Dilated {
            w: w.clone(),
            r: r.clone(),
        },
        ("global", [g]) => MaskPattern::Global(g.clone()),
        ("block", [b]) => MaskPattern::Block(b.clone()),
        ("document", [g]) => {
            let g = segment(g).ok_or("a document segment is `g<index>`")?;
            MaskPattern::Document { q: g, k: g }
        }
        ("document", [q, k]) => MaskPattern::Document {
            q: segment(q).ok_or("a document segment is `g<index>`")?,
            k: segment(k).ok_or("a document segment is `g<index>`")?,
        },
        ("topk_blocks", [g, Dim::Const(k), Dim::Const(b)]) => MaskPattern::TopkBlocks {
            g: segment(g).ok_or("a topk_blocks gate is `g<index>`")?,
            k: *k,
            b: *b,
        },
        _ => return Err(format!("unknown pattern `{token}`")),
    })
}

fn expect(t: &[String], at: &mut usize, what: &str) -> Result<(), String> {
    if t.get(*at).map(String::as_str) != Some(what) {
        return Err(format!("expected `{what}` in a pattern"));
    }
    *at += 1;
    Ok(())
}

/// A score expression as [`ScoreExpr`]'s `Display` writes it: `(add (mul s 0.125) b0)`.
pub fn parse_score(text: &str) -> Result<ScoreExpr, String> {
    let tokens = tokenize(text);
    let mut at = 0;
    let e = score(&tokens, &mut at, 0)?;
    if at != tokens.len() {
        return Err(format!("unexpected `{}` in the score `{text}`", tokens[at]));
    }
    Ok(e)
}

fn score(t: &[String], at: &mut usize, depth: usize) -> Result<ScoreExpr, String> {
    if depth > crate::fused::MAX_SCORE_DEPTH {
        return Err("the score is too deep".into());
    }
    let token = t.get(*at).ok_or("a score ends early")?.clone();
    *at += 1;
    if token != "(" {
        return Ok(match token.as_str() {
            "s" => ScoreExpr::Scores,
            "relpos" => ScoreExpr::RelPos,
            "inf" => ScoreExpr::Const(f64::INFINITY),
            "-inf" => ScoreExpr::Const(f64::NEG_INFINITY),
            b if b.starts_with('b') && b[1..].parse::<usize>().is_ok() => {
                ScoreExpr::Bias(b[1..].parse().map_err(|_| "a bias index")?)
            }
            n => ScoreExpr::Const(n.parse().map_err(|_| format!("`{n}` in a score"))?),
        });
    }
    let head = t.get(*at).ok_or("a score ends early")?.clone();
    *at += 1;
    let e = if head == "dim" {
        let d = t.get(*at).ok_or("`dim` needs a symbol")?;
        *at += 1;
        ScoreExpr::Dim(dim(d))
    } else if let Some(u) = unary_op(&head) {
        ScoreExpr::Unary(u, Box::new(score(t, at, depth + 1)?))
    } else if let Some(bop) = binary_op(&head) {
        let x = score(t, at, depth + 1)?;
        let y = score(t, at, depth + 1)?;
        ScoreExpr::Binary(bop, Box::new(x), Box::new(y))
    } else {
        return Err(format!("unknown score operation `{head}`"));
    };
    expect(t, at, ")")?;
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::print::print_kernel;

    #[test]
    fn patterns_and_scores_read_what_display_writes() {
        for p in [
            "causal",
            "(causal & window(256))",
            "((dilated(2, 3) | causal) & global(1))",
            "block(4)",
        ] {
            assert_eq!(parse_pattern(p).expect(p).to_string(), p);
        }
        for s in [
            "(mul s 0.125)",
            "(add (div s (sqrt (dim d))) (mul b0 relpos))",
            "(mul 30.0 (tanh (div s 30.0)))",
            "(maximum s -inf)",
        ] {
            assert_eq!(parse_score(s).expect(s).to_string(), s);
        }
    }

    #[test]
    fn a_printed_kernel_parses_back_to_the_same_text() {
        let text = "\
kernel f(q: f32[h, n, d], k: bf16[h, n, d], v: f32[n, e], b: f32[h, 1, 1]) -> f16[h, n, e]
  %0 = input q #0 : f32[h, n, d]
  %1 = input k #1 : bf16[h, n, d]
  %2 = input v #2 : f32[n, e]
  %3 = input b #3 : f32[h, 1, 1]
  %4 = attention %0, %1, %2, %3, score=(add (mul s 0.5) (mul b0 relpos)), mask=(causal & window(4)), precision=int8 : f32[h, n, e]
  %5 = linear-attention %0, %0, %2, causal, eps=1e-6 : f32[h, n, e]
  %6 = add %4, %5 : f32[h, n, e]
  %7 = cast %6, to=f16 : f16[h, n, e]
  return %7
";
        let kernel = parse_kernel(text).expect("parses");
        let printed = print_kernel(&kernel);
        assert_eq!(
            print_kernel(&parse_kernel(&printed).expect("reparses")),
            printed
        );
        assert!(printed.contains("precision=int8"));
        let bad = text.replace(": f32[h, n, e]\n  %5", ": f32[h, n, d]\n  %5");
        let e = parse_kernel(&bad).unwrap_err();
        assert!(e.message.contains("the type says"), "{e}");
    }
}
