"""Packed documents in PyTorch, the two ways a user would write them, timed for comparison with
`attnc bench examples/document.attn` on the same shape (causal attention within each document
of a row of n tokens).

- `loop`: one `scaled_dot_product_attention(..., is_causal=True)` per document (its slices of
  q, k, v), written into the output;
- `mask`: one `scaled_dot_product_attention` over the whole row with an n×n boolean mask
  (`seg_i == seg_j and j <= i`), built once outside the timing.

    python benches/documents_torch.py --h 8 --n 16384 --d 64 --docs 16 --threads 2 --runs 3 --seg /tmp/seg.npy
    attnc bench examples/document.attn --shape h=8,n=16384,d=64 --random 1 --input seg=/tmp/seg.npy --threads 2

Writes the segment ids (`np.repeat(arange(docs), n / docs)`, int32) to --seg and prints the
median of each form in ms.
"""

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from timing import median_seconds


def timed(fn, runs):
    """Median milliseconds per call."""
    return 1e3 * median_seconds(fn, runs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--h", type=int, default=8)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seg", default="")
    ap.add_argument("--skip-mask", action="store_true", help="skip the n×n mask form")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    length = a.n // a.docs
    seg = np.repeat(np.arange(a.docs), length).astype(np.int32)
    if a.seg:
        np.save(a.seg, seg)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, a.h, a.n, a.d, generator=g) for _ in range(3))

    def loop():
        out = torch.empty_like(q)
        for s in range(0, a.n, length):
            e = s + length
            out[:, :, s:e] = F.scaled_dot_product_attention(
                q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True
            )
        return out

    print("torch loop over %d documents: median %.1f ms" % (a.docs, timed(loop, a.runs)))
    if not a.skip_mask:
        ids = torch.from_numpy(seg)
        pos = torch.arange(a.n)
        mask = (ids[:, None] == ids[None, :]) & (pos[None, :] <= pos[:, None])
        masked = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
        print("torch n×n boolean mask: median %.1f ms" % timed(masked, a.runs))


if __name__ == "__main__":
    main()
