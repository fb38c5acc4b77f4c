"""What calling a compiled kernel from Python costs over calling it from Rust.

One decoding step (m = 1, n = 4096, h = 8, d = 64), per call, median of many calls, threads
fixed, from Python by each path a user takes:

- `numpy f32`: `kernel(q, k, v)` on float32 NumPy arrays (f32 cache), read in place;
- `torch bf16`: `kernel(q, k, v)` with the bf16 cache as torch bfloat16 tensors (viewed in
  place through `attnc._inputs`);
- `bits bf16`: `kernel._run(...)` with the cache as uint16 bit patterns (no conversion layer);
- `op bf16`: the `attnc.torch` custom op on torch tensors (dispatcher included).

    python python/bench/overhead.py [--threads 1] [--calls 20000] [--rounds 5]

The baseline is the same compiled code called from Rust in the same process, on the same
arrays (`Kernel._time_native`: the library call alone, timed in Rust), interleaved round by
round with the Python calls. `--rust-binary` also times the separate Rust program (build it
with `cargo build --release -p attnc-py --example decode_overhead`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("ATTNC_CEILINGS", "default")

import numpy as np  # noqa: E402

import attnc  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
H, N, D = 8, 4096, 64
DECODE_F32 = (
    "kernel decode_f32(q: f32[h, 1, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, 1, d] "
    "{ return softmax(q @ k.T / sqrt(d)) @ v; }"
)


def values(count: int) -> np.ndarray:
    i = np.arange(count, dtype=np.int64)
    return (np.float32(0.001) * (i % 997).astype(np.float32) - np.float32(0.5)).astype(np.float32)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bit patterns, rounded to nearest-even (as Rust's `half` rounds)."""
    bits = x.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def time_calls(call, calls: int) -> tuple:
    """(median, least) microseconds per call."""
    for _ in range(max(calls // 10, 1)):
        call()
    clock = time.perf_counter_ns
    samples = []
    for _ in range(calls):
        start = clock()
        call()
        samples.append(clock() - start)
    return statistics.median(samples) / 1e3, min(samples) / 1e3


def python_paths(threads: int):
    """name → (kernel, native timer, Python call)."""
    q = values(H * D).reshape(H, 1, D)
    cache = values(H * N * D).reshape(H, N, D)
    bits = bf16_bits(cache)
    f32 = attnc.compile(DECODE_F32, threads=threads)
    bf16 = attnc.compile(REPO / "examples" / "decode.attn", threads=threads)

    def native_f32(calls):
        return f32._time_native([q, cache, cache], [False, False, False], calls)

    def native_bf16(calls):
        return bf16._time_native([q, bits, bits], [False, True, True], calls)

    paths = {
        "numpy f32": ("decode_f32", native_f32, lambda: f32(q, cache, cache)),
        "bits bf16": (
            "decode_bf16", native_bf16, lambda: bf16._run([q, bits, bits], [False, True, True])
        ),
    }
    try:
        import torch

        import attnc.torch as attnc_torch
        tq = torch.from_numpy(q)
        tcache = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
        op = attnc_torch.kernel(REPO / "examples" / "decode.attn", threads=threads)
        paths["torch bf16"] = ("decode_bf16", native_bf16, lambda: bf16(tq, tcache, tcache))
        paths["op bf16"] = ("decode_bf16", native_bf16, lambda: op(tq, tcache, tcache))
    except ImportError:
        print("torch is not installed: its paths are not measured", file=sys.stderr)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--rust-binary", type=Path,
        help="the decode_overhead example, to also time the calls from a separate Rust program",
    )
    args = parser.parse_args()

    paths = python_paths(args.threads)
    rust = {"decode_f32": [], "decode_bf16": []}
    native = {name: [] for name in paths}
    python = {name: [] for name in paths}
    for _ in range(args.rounds):
        if args.rust_binary is not None:
            done = subprocess.run(
                [str(args.rust_binary), str(args.threads), str(args.calls)],
                capture_output=True, text=True, check=True,
            )
            for line in done.stdout.splitlines():
                record = json.loads(line)
                rust[record["kernel"]].append(record["median_us"])
        # Interleaved in one process: the library call timed in Rust, then from Python.
        for name, (_, time_native, call) in paths.items():
            native[name].append(time_native(args.calls))
            python[name].append(time_calls(call, args.calls))

    print(f"decode m=1 n={N} h={H} d={D}, threads={args.threads}: µs per call over "
          f"{args.calls} calls, {args.rounds} interleaved rounds (median over rounds of each "
          "round's median / least time; the least is the figure load on the machine disturbs least)")
    if args.rust_binary is not None:
        for kernel, times in rust.items():
            print(f"  rust program {kernel:<12} median {statistics.median(times):9.2f}")
    for name, (kernel, _, _) in paths.items():
        row = []
        for which, label in ((0, "median"), (1, "least")):
            ours = [p[which] for p in python[name]]
            base = [n[which] for n in native[name]]
            overhead = statistics.median(p - n for p, n in zip(ours, base))
            row.append(
                f"{label} {statistics.median(base):8.2f} → {statistics.median(ours):8.2f} "
                f"({overhead:+6.2f})"
            )
        print(f"  {name:<11} ({kernel}): Rust → Python: " + "; ".join(row))


if __name__ == "__main__":
    main()
