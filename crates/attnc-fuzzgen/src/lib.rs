//! Randomized differential testing of attnc, in the manner of Cranelift's `cranelift-fuzzgen`:
//! random valid programs, run by the JIT in every configuration and by the f64 interpreter,
//! compared by the documented semantics (docs/language.md, "Values beyond the f32 range";
//! docs/testing.md).
//!
//! - [`program`] generates a `.attn` program from a seed (every op, pattern, fill and dtype;
//!   shapes with 0, 1 and tile edges);
//! - [`values`] draws its inputs (ordinary numbers and, by chance, NaN, ±inf, subnormals,
//!   values near the f32 limit);
//! - [`bound`] evaluates a kernel to its values and, per element, how far a correct f32
//!   engine may be from them (`+inf` where the rules leave the result unspecified);
//! - [`judge`] compares a result by that rule;
//! - [`case`] runs one seed through everything.
//!
//! Everything is deterministic from the seed, so a failure prints its program, shapes and seed
//! and replays with `cargo run --release -p attnc-fuzzgen --bin differential -- --seed S`.
//!
//! ```no_run
//! match attnc_fuzzgen::case::run(7) {
//!     attnc_fuzzgen::case::Outcome::Failed(report) => panic!("{report}"),
//!     other => println!("{other:?}"),
//! }
//! ```
#![warn(missing_docs)]

pub mod bound;
pub mod case;
pub mod judge;
pub mod program;
pub mod rng;
pub mod values;
