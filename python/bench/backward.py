"""The backward of attention against torch's: attnc's compiled gradients and
``scaled_dot_product_attention``'s CPU backward (float32), side by side in one process.

For each workload: the forward alone and forward + backward (gradients of q, k and v for a
fixed cotangent), median of ``--runs`` timed runs after one warm-up, the two libraries'
runs alternating so a busy minute on a shared machine slows both. Workloads:

- ``dense``: n = 4096, h = 8, d = 64, no mask;
- ``window``: causal window(256), n = 8192, h = 4, d = 64; torch gets the boolean mask
  (SDPA has no window form), attnc visits only the key tiles the window reaches.

    python python/bench/backward.py [--threads 2] [--runs 3] [--only dense]

Reported: milliseconds per call, the backward's time (forward + backward − forward) over the
forward's, and attnc's speedup over torch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("ATTNC_CEILINGS", "default")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import attnc.torch  # noqa: E402

DENSE = """
kernel dense(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {
    return softmax(q @ k.T / sqrt(d)) @ v;
}
"""
WINDOW = """
kernel local(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {
    return softmax(mask(q @ k.T / sqrt(d), causal & window(256))) @ v;
}
"""


def window_mask(n: int, w: int) -> torch.Tensor:
    i = torch.arange(n).reshape(-1, 1)
    j = torch.arange(n).reshape(1, -1)
    return (j <= i) & (i - j <= w)


def timed(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def workload(name: str, source: str, h: int, n: int, d: int, threads: int, runs: int) -> None:
    generator = torch.Generator().manual_seed(0)
    q, k, v, g = (torch.randn(h, n, d, generator=generator) for _ in range(4))
    op = attnc.torch.kernel(source, threads=threads)
    mask = window_mask(n, 256) if name == "window" else None

    def ours_forward():
        with torch.no_grad():
            op(q, k, v)

    def theirs_forward():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def both(fn):
        def run():
            leaves = [x.detach().requires_grad_() for x in (q, k, v)]
            fn(*leaves).backward(g)

        return run

    ours_train = both(op)
    theirs_train = both(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask))
    results = {}
    for label, fn in [
        ("attnc forward", ours_forward),
        ("torch forward", theirs_forward),
        ("attnc forward+backward", ours_train),
        ("torch forward+backward", theirs_train),
    ]:
        results[label] = timed(fn, runs)
    print(f"{name}: h={h} n={n} d={d}, {threads} threads, median of {runs}")
    for label, ms in results.items():
        print(f"  {label:>24}: {ms:10.1f} ms")
    for lib in ("attnc", "torch"):
        fwd = results[f"{lib} forward"]
        bwd = results[f"{lib} forward+backward"] - fwd
        print(f"  {lib} backward / forward: {bwd / fwd:.2f}")
    speedup = results["torch forward+backward"] / results["attnc forward+backward"]
    print(f"  attnc vs torch, forward+backward: {speedup:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", choices=["dense", "window"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.only in (None, "dense"):
        workload("dense", DENSE, 8, 4096, 64, args.threads, args.runs)
    if args.only in (None, "window"):
        workload("window", WINDOW, 4, 8192, 64, args.threads, args.runs)


if __name__ == "__main__":
    main()
