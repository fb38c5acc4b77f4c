"""bf16 attention, attnc against PyTorch side by side in one run (alternating per round): torch's
`scaled_dot_product_attention` on bf16 Q, K, V against `attnc bench` of
benches/kernels/dense_bf16.attn (bf16 inputs, f32 output) under `--approx bf16_products`.

Also measures each one's error on the same standard-normal inputs (rounded to bf16): relative L2
of the last `--rows` queries of every head against attention in float64 over those bf16 values.

    python benches/bf16_torch.py target/release/attnc --h 8 --n 4096 --d 64 --threads 2 --rounds 3

Prints the medians, the per-round torch/attnc ratios (> 1: attnc is faster) and the errors.
"""

import argparse
import json
import os
import statistics
import subprocess
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

from timing import median_seconds

PROGRAM = "benches/kernels/dense_bf16.attn"


def reference(q, k, v, rows):
    """f64 attention of the last `rows` queries of every head."""
    q, k, v = (x.to(torch.float64) for x in (q, k, v))
    s = q[:, -rows:] @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    return torch.softmax(s, dim=-1) @ v


def relative_l2(got, want):
    return float(torch.linalg.norm(got.to(torch.float64) - want) / torch.linalg.norm(want))


def attnc_bench(binary, a, inputs):
    cmd = [binary, "bench", PROGRAM, "--shape", "h=%d,n=%d,d=%d" % (a.h, a.n, a.d),
           "--threads", str(a.threads), "--no-interp", "--no-naive", "--runs", str(a.runs),
           "--warmup", "1", "--format", "json", "--approx", "bf16_products", "--tol", "0.01"]
    for name, path in inputs.items():
        cmd += ["--input", "%s=%s" % (name, path)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=True)
    doc = json.loads(p.stdout)
    rows = [r for r in doc["results"] if r["engine"] == "jit" and r["threads"] == a.threads]
    return rows[0]["median_ms"] / 1e3, doc["notes"]


def attnc_output(binary, a, inputs, out):
    cmd = [binary, "run", PROGRAM, "--shape", "h=%d,n=%d,d=%d" % (a.h, a.n, a.d),
           "--threads", str(a.threads), "--approx", "bf16_products", "--tol", "0.01",
           "--output", out]
    for name, path in inputs.items():
        cmd += ["--input", "%s=%s" % (name, path)]
    subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=True)
    return torch.from_numpy(np.load(out))


def bf16_npy(x, path):
    """Writes a bf16 tensor as the `.npy` attnc reads for bf16 inputs (float32 values that bf16
    holds exactly)."""
    np.save(path, x.to(torch.float32).numpy())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("attnc")
    ap.add_argument("--h", type=int, default=8)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rows", type=int, default=256)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(a.h, a.n, a.d, generator=g).to(torch.bfloat16) for _ in range(3))
    want = reference(q, k, v, a.rows)
    with tempfile.TemporaryDirectory() as tmp:
        inputs = {}
        for name, x in (("q", q), ("k", k), ("v", v)):
            inputs[name] = os.path.join(tmp, name + ".npy")
            bf16_npy(x, inputs[name])
        torch_out = F.scaled_dot_product_attention(q, k, v)[:, -a.rows:]
        ours = attnc_output(a.attnc, a, inputs, os.path.join(tmp, "o.npy"))[:, -a.rows:]
        torch_s, attnc_s, ratios, notes = [], [], [], []
        for _ in range(a.rounds):
            t = median_seconds(lambda: F.scaled_dot_product_attention(q, k, v), a.runs)
            x, notes = attnc_bench(a.attnc, a, inputs)
            torch_s.append(t)
            attnc_s.append(x)
            ratios.append(t / x)
    print("h=%d n=%d d=%d, %d threads, %d rounds" % (a.h, a.n, a.d, a.threads, a.rounds))
    print("torch bf16 SDPA   median %8.1f ms   error %.2e" % (
        1e3 * statistics.median(torch_s), relative_l2(torch_out, want)))
    print("attnc bf16        median %8.1f ms   error %.2e" % (
        1e3 * statistics.median(attnc_s), relative_l2(ours, want)))
    print("torch / attnc     median %.2fx (rounds %s)" % (
        statistics.median(ratios), " ".join("%.2f" % r for r in ratios)))
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
