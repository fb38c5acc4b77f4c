"""The package computes what `attnc run` computes: every example, the same `.npy` inputs, the
same threads, bit for bit; and `Kernel.explain()` is the trace `attnc explain` reports."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

import attnc

from conftest import EXAMPLES

# Odd sizes (not multiples of any tile), small enough for the whole suite to take seconds.
SIZES = {"h": 2, "n": 203, "m": 37, "d": 24, "e": 20, "r": 8}
STORED = {"f32": np.float32, "f16": np.float16, "bf16": np.float32}  # .npy has no bfloat16

EXAMPLE_FILES = sorted(EXAMPLES.glob("*.attn"))

# Symbols no input's shape binds (pattern and pool sizes), per example: the CLI gets them as
# `--shape`, the package as `shapes=`.
UNBOUND = {
    "window_param": {"w": 16},
    "hierarchical": {"w": 16},
    "hierarchical_summaries": {"w": 16, "p": 24},
}


def inputs_for(kernel: attnc.Kernel, seed: int) -> dict:
    """Standard-normal inputs at SIZES in each parameter's `.npy` type (bf16 parameters get
    float32 files, which `attnc run` and the package both round to bf16 the same way)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, dtype, shape in kernel.params:
        dims = [d if isinstance(d, int) else SIZES[d] for d in shape]
        if dtype == "i32":
            # Segment ids: sorted documents of random lengths.
            arrays[name] = np.sort(rng.integers(0, 5, dims)).astype(np.int32)
        else:
            arrays[name] = rng.standard_normal(dims).astype(STORED[dtype])
    return arrays


def run_cli(
    cli: Path, example: Path, arrays: dict, tmp: Path, threads: int, outputs: int = 1
) -> tuple:
    """The CLI's results, one array per output (`--output` once each)."""
    args = [str(cli), "run", str(example), "--threads", str(threads)]
    if example.stem in UNBOUND:
        args += ["--shape", ",".join(f"{k}={v}" for k, v in UNBOUND[example.stem].items())]
    for name, array in arrays.items():
        path = tmp / f"{name}.npy"
        np.save(path, array)
        args += ["--input", f"{name}={path}"]
    paths = [tmp / f"out{k}.npy" for k in range(outputs)]
    for path in paths:
        args += ["--output", str(path)]
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return tuple(np.load(path) for path in paths)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_every_example_is_covered():
    assert len(EXAMPLE_FILES) >= 19, [p.name for p in EXAMPLE_FILES]


@pytest.mark.parametrize("example", EXAMPLE_FILES, ids=lambda p: p.stem)
def test_results_equal_the_clis_bit_for_bit(cli, tmp_path, example):
    shapes = UNBOUND.get(example.stem)
    kernel = attnc.compile(example, shapes=shapes, threads=2)
    arrays = inputs_for(kernel, seed=11)
    if any(dtype == "i32" for _, dtype, _ in kernel.params):
        # The package does not take segment ids yet: a clear refusal, never a crash.
        with pytest.raises(attnc.InputError):
            kernel(**arrays)
        return
    got = kernel(**arrays)
    several = isinstance(got, tuple)
    got = got if several else (got,)
    expected = run_cli(cli, example, arrays, tmp_path, threads=2, outputs=len(got))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert same_bits(g, e), (
            f"{example.name}: max abs difference "
            f"{np.max(np.abs(g.astype(np.float64) - e.astype(np.float64)))}"
        )
    # Positional arguments and another thread count give the same bits.
    one_thread = attnc.compile(example, shapes=shapes, threads=1)(*arrays.values())
    one_thread = one_thread if several else (one_thread,)
    assert len(one_thread) == len(expected)
    assert all(same_bits(g, e) for g, e in zip(one_thread, expected))


def test_an_f16_kernel_returns_float16_like_the_cli(cli, tmp_path):
    example = EXAMPLES / "blocksparse.attn"
    kernel = attnc.compile(example, threads=2)
    arrays = inputs_for(kernel, seed=3)
    got = kernel(**arrays)
    assert got.dtype == np.float16
    assert same_bits(got, run_cli(cli, example, arrays, tmp_path, threads=2)[0])


# Wall-clock fields differ between any two runs; everything else is the same record.
def is_timing(key: str) -> bool:
    return key.endswith(("seconds", "_ms", "millis"))


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if not is_timing(k)}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


@pytest.mark.parametrize("name", ["local", "linear", "decode"])
def test_explain_is_the_clis_trace(cli, name):
    example = EXAMPLES / f"{name}.attn"
    shapes = {"h": 2, "n": 64, "d": 16}
    done = subprocess.run(
        [str(cli), "explain", str(example), "--format", "json", "--shape",
         ",".join(f"{k}={v}" for k, v in shapes.items())],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    expected = json.loads(done.stdout)["trace"]
    kernel = attnc.compile(example, shapes=shapes)
    trace = kernel.explain()
    assert without_timings(trace) == without_timings(expected)
    assert trace["kernel"] == name and trace["decision"]
    # The plan the trace describes is the one `explain` prints.
    assert kernel.plan == json.loads(done.stdout)["plan"]
