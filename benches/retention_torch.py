"""Retention (examples/retention.attn) in plain PyTorch, chunkwise as flash-linear-attention's
reference implementations write it: inside a chunk of C rows the decayed quadratic form, across
chunks the [d, dv] state. Writes the inputs it draws as .npy files (q, k, v, slope) so that
`attnc run examples/retention.attn --input ...` runs on the same data, times the torch form
(median of --runs), and with --compare checks an attnc output file against it.

    python benches/retention_torch.py --h 2 --n 65536 --d 64 --dir /tmp/ret
    attnc run examples/retention.attn --input q=/tmp/ret/q.npy --input k=/tmp/ret/k.npy \
        --input v=/tmp/ret/v.npy --input slope=/tmp/ret/slope.npy --output /tmp/ret/out.npy
    python benches/retention_torch.py --h 2 --n 65536 --d 64 --dir /tmp/ret --compare /tmp/ret/out.npy

With --gated the same for examples/gated_decay.attn (inputs q, k, v, g).
"""

import argparse
import os
import time

import numpy as np
import torch


def retention_chunkwise(q, k, v, slope, chunk=64):
    """mask((q kᵀ / sqrt(d)) * exp(|slope| relpos), causal, 0) v for q, k, v: [h, n, d]."""
    h, n, d = q.shape
    dv = v.shape[-1]
    q = q / d**0.5
    log_gamma = -slope.abs().view(h, 1, 1)  # per-head log decay
    out = torch.empty(h, n, dv, dtype=q.dtype)
    state = torch.zeros(h, d, dv, dtype=q.dtype)
    for c0 in range(0, n, chunk):
        length = min(chunk, n - c0)
        qc, kc, vc = q[:, c0 : c0 + length], k[:, c0 : c0 + length], v[:, c0 : c0 + length]
        i = torch.arange(length, dtype=q.dtype)
        diff = i[:, None] - i[None, :]
        decay = torch.where(diff >= 0, torch.exp(log_gamma * diff.clamp(min=0)), 0.0)
        intra = ((qc @ kc.transpose(1, 2)) * decay) @ vc
        inter = (qc * torch.exp(log_gamma * (i + 1)).transpose(1, 2)) @ state
        out[:, c0 : c0 + length] = intra + inter
        # S ← γ^L S + Σ_j γ^(L-1-j) k_j v_jᵀ
        kdec = kc * torch.exp(log_gamma * (length - 1 - i)).transpose(1, 2)
        state = torch.exp(log_gamma * length) * state + kdec.transpose(1, 2) @ vc
    return out


def gated_chunkwise(q, k, v, g, chunk=64):
    """mask((q kᵀ / sqrt(d)) * exp(c - cᵀ), causal, 0) v with c = cumsum(log sigmoid(g)) over
    the positions (examples/gated_decay.attn): gated linear attention's chunkwise form."""
    h, n, d = q.shape
    dv = v.shape[-1]
    q = q / d**0.5
    c = torch.cumsum(torch.nn.functional.logsigmoid(g[..., 0]), dim=1)  # [h, n]
    out = torch.empty(h, n, dv, dtype=q.dtype)
    state = torch.zeros(h, d, dv, dtype=q.dtype)
    for c0 in range(0, n, chunk):
        length = min(chunk, n - c0)
        qc, kc, vc = q[:, c0 : c0 + length], k[:, c0 : c0 + length], v[:, c0 : c0 + length]
        cc = c[:, c0 : c0 + length]  # [h, L]
        diff = cc[:, :, None] - cc[:, None, :]
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        decay = torch.where(causal, torch.exp(diff.masked_fill(~causal, 0.0)), 0.0)
        intra = ((qc @ kc.transpose(1, 2)) * decay) @ vc
        before = c[:, c0 - 1 : c0] if c0 > 0 else torch.zeros(h, 1, dtype=q.dtype)
        inter = (qc * torch.exp(cc - before)[..., None]) @ state
        out[:, c0 : c0 + length] = intra + inter
        last = cc[:, -1:]
        kdec = kc * torch.exp(last - cc)[..., None]
        state = torch.exp(last - before)[..., None] * state + kdec.transpose(1, 2) @ vc
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--h", type=int, default=2)
    p.add_argument("--n", type=int, default=65536)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", required=True)
    p.add_argument("--compare")
    p.add_argument(
        "--gated",
        action="store_true",
        help="gated decay (examples/gated_decay.attn): draws g [h, n, 1] instead of slope",
    )
    a = p.parse_args()
    rng = np.random.default_rng(a.seed)
    shape = (a.h, a.n, a.d)
    os.makedirs(a.dir, exist_ok=True)
    arrays = {
        "q": rng.standard_normal(shape, dtype=np.float32),
        "k": rng.standard_normal(shape, dtype=np.float32),
        "v": rng.standard_normal(shape, dtype=np.float32),
        # RetNet's rates a = -ln(1 - 2^(-5-head)), for h heads
        "slope": np.array(
            [-np.log1p(-(2.0 ** (-5 - i))) for i in range(a.h)], dtype=np.float32
        ).reshape(a.h, 1, 1),
    }
    if a.gated:
        del arrays["slope"]
        arrays["g"] = rng.standard_normal((a.h, a.n, 1), dtype=np.float32)
    fn, last = (gated_chunkwise, "g") if a.gated else (retention_chunkwise, "slope")
    for name, x in arrays.items():
        np.save(os.path.join(a.dir, f"{name}.npy"), x)
    t = {name: torch.from_numpy(x) for name, x in arrays.items()}
    times = []
    for _ in range(a.runs):
        start = time.perf_counter()
        out = fn(t["q"], t["k"], t["v"], t[last], a.chunk)
        times.append(time.perf_counter() - start)
    times.sort()
    what = "gated decay" if a.gated else "retention"
    print(
        f"torch chunkwise {what} h={a.h} n={a.n} d={a.d} chunk={a.chunk} "
        f"threads={torch.get_num_threads()}: median {times[len(times) // 2] * 1e3:.1f} ms"
    )
    if a.compare:
        got = torch.from_numpy(np.load(a.compare)).double()
        want = fn(*(t[x].double() for x in ("q", "k", "v", last)), a.chunk)
        err = ((got - want).norm() / want.norm()).item()
        print(f"attnc vs torch (f64) relative L2: {err:.2e}")


if __name__ == "__main__":
    main()
