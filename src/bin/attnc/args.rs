//! Command-line definitions (clap derive).

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// attnc: a compiler for attention.
#[derive(Debug, Parser)]
#[command(name = "attnc", version, about = "A compiler for attention", long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Parse and type-check a file; print each kernel's signature
    Check(CheckArgs),
    /// Compile and run one kernel
    Run(RunArgs),
    /// Show what the compiler did and why
    Explain(ExplainArgs),
    /// Time the compiled kernel against baselines
    Bench(BenchArgs),
    /// Compute gradients: the vector-Jacobian product of the kernel's output
    Grad(GradArgs),
}

impl Command {
    /// The output format the subcommand asked for.
    pub fn format(&self) -> Format {
        match self {
            Command::Check(a) => a.format,
            Command::Run(a) => a.shared.format,
            Command::Explain(a) => a.shared.format,
            Command::Bench(a) => a.shared.format,
            Command::Grad(a) => a.shared.format,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EngineArg {
    Jit,
    Interp,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The .attn file
    pub file: PathBuf,
    /// Human text or one JSON document on stdout
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

/// Options shared by `run`, `explain` and `bench`.
#[derive(Clone, Debug, Args)]
pub struct SharedArgs {
    /// The .attn file
    pub file: PathBuf,
    /// Which kernel (needed only when the file has several)
    #[arg(long)]
    pub kernel: Option<String>,
    /// Bind dimension symbols, e.g. h=8,n=4096,d=64
    #[arg(long, value_name = "SYM=N,...")]
    pub shape: Vec<String>,
    /// A parameter from a .npy file (NAME=PATH), or every matching tensor of a .safetensors file
    #[arg(long, value_name = "NAME=PATH|PATH.safetensors")]
    pub input: Vec<String>,
    /// Fill every unbound input with standard-normal values from this seed
    #[arg(long, value_name = "SEED", allow_negative_numbers = true)]
    pub random: Option<u64>,
    /// Allowed approximations, overriding the kernel's @approx (e.g. bf16,lowrank(r=64),
    /// nystrom(m=64))
    #[arg(long, value_name = "LIST")]
    pub approx: Option<String>,
    /// Largest accepted relative L2 error of an approximation
    #[arg(long, value_name = "X", allow_negative_numbers = true)]
    pub tol: Option<f64>,
    /// Forbid every approximation
    #[arg(long, conflicts_with = "approx")]
    pub exact: bool,
    /// A calibration tensor for validating approximations (NAME=PATH or PATH.safetensors);
    /// parameters without one are validated on the run's inputs (those `--random` draws
    /// included), else drawn from the policy's seed
    #[arg(long, value_name = "NAME=PATH|PATH.safetensors")]
    pub calibrate: Vec<String>,
    /// Worker threads (default: all cores)
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub threads: Option<u32>,
    /// `interp` runs the reference interpreter instead of machine code
    #[arg(long, value_enum)]
    pub engine: Option<EngineArg>,
    /// The most memory a plan's buffers may take, e.g. 2G, 512M, 100000 (default: the memory
    /// available); a plan that needs more is refused before anything is allocated
    #[arg(long, value_name = "BYTES", value_parser = crate::memory::parse_size)]
    pub memory_limit: Option<u64>,
    /// Human text or one JSON document on stdout
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub shared: SharedArgs,
    /// Write the result to this .npy file (float32 unless the return type is f16); repeat it
    /// once per output, in order, for a kernel returning several
    #[arg(long, value_name = "PATH.npy")]
    pub output: Vec<PathBuf>,
    /// Also run the reference interpreter on the same inputs and report the relative L2 error
    #[arg(long)]
    pub verify: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Emit {
    /// The IR, one node a line
    Ir,
    /// The IR as a Graphviz graph
    Dot,
    /// The optimizer's e-graph: iterations, rules applied, stop reason, derivation
    Egraph,
    /// The kernels of the plan and their Cranelift IR
    Clif,
    /// Cranelift's machine-code listing of each kernel
    Asm,
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub shared: SharedArgs,
    /// Print one stage instead of the whole report
    #[arg(long, value_enum)]
    pub emit: Option<Emit>,
    /// Explain the gradients with respect to these parameters instead (e.g. q,k,v): the
    /// backward graph and how it was derived
    #[arg(long, value_name = "LIST")]
    pub grad: Option<String>,
}

#[derive(Debug, Args)]
pub struct GradArgs {
    #[command(flatten)]
    pub shared: SharedArgs,
    /// The parameters to differentiate with respect to, e.g. q,k,v
    #[arg(long, value_name = "LIST")]
    pub wrt: String,
    /// The gradient of the output (a .npy file of the output's shape; default: ones); once
    /// per output, in order, for a kernel that returns several
    #[arg(long, value_name = "PATH.npy")]
    pub cotangent: Vec<PathBuf>,
    /// Write each gradient to DIR/<parameter>.npy (float32), created if missing
    #[arg(long, value_name = "DIR")]
    pub output_dir: PathBuf,
    /// Also compute the gradients with the reference interpreter and report the relative L2
    /// errors (fails past 1e-4)
    #[arg(long)]
    pub verify: bool,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub shared: SharedArgs,
    /// Timed runs per engine (median and minimum are reported)
    #[arg(long, value_name = "N", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub runs: u32,
    /// Untimed runs before timing
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub warmup: u32,
    /// Do not time the reference interpreter
    #[arg(long)]
    pub no_interp: bool,
    /// Do not time the naive Rust baseline
    #[arg(long)]
    pub no_naive: bool,
    /// Time every kernel of the file at each value of one dimension, e.g. n=1024,2048,4096
    #[arg(long, value_name = "SYM=V1,V2,...")]
    pub sweep: Option<String>,
    /// Draw time against the swept dimension as an SVG plot (sweeps n when --sweep is absent)
    #[arg(long, value_name = "PATH.svg")]
    pub plot: Option<PathBuf>,
}
