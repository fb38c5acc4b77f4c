"""Kernels returning several values: `k(...)` returns a tuple of arrays, in order; the torch
op refuses them with a clear error."""

from __future__ import annotations

import numpy as np
import pytest

import attnc

from conftest import EXAMPLES

LSE = EXAMPLES / "lse.attn"


def normal(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def reference(q, k, v):
    """Causal (end-aligned) attention and the log-sum-exp of its scores, in float64."""
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    s = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    i = np.arange(q.shape[-2])[:, None] + (k.shape[-2] - q.shape[-2])
    j = np.arange(k.shape[-2])[None, :]
    s = np.where(j <= i, s, -np.inf)
    top = s.max(-1, keepdims=True)
    lse = top + np.log(np.exp(s - top).sum(-1, keepdims=True))
    return np.exp(s - lse) @ v, lse


def test_a_tuple_kernel_returns_a_tuple_of_arrays_matching_float64():
    kernel = attnc.compile(LSE, threads=2)
    q, k, v = normal(2, 5, 8, seed=1), normal(2, 9, 8, seed=2), normal(2, 9, 8, seed=3)
    out = kernel(q=q, k=k, v=v)
    assert isinstance(out, tuple) and len(out) == 2
    o, lse = out
    assert o.shape == (2, 5, 8) and lse.shape == (2, 5, 1)
    assert o.dtype == np.float32 and lse.dtype == np.float32
    want_o, want_lse = reference(q, k, v)
    np.testing.assert_allclose(o, want_o, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)
    assert "-> (f32[h, m, d], f32[h, m, 1])" in kernel.signature


def test_split_kv_partials_merge_through_their_lse():
    """Attention over all keys equals the LSE-weighted merge of attention over two halves."""
    dense = """
    kernel part(q: f32[m, d], k: f32[n, d], v: f32[n, d]) -> (f32[m, d], f32[m, 1]) {
        let s = q @ k.T / sqrt(d);
        return (softmax(s) @ v, logsumexp(s, -1));
    }
    """
    kernel = attnc.compile(dense)
    q, k, v = normal(3, 4, seed=4), normal(10, 4, seed=5), normal(10, 4, seed=6)
    o, lse = kernel(q, k, v)
    (o1, l1), (o2, l2) = kernel(q, k[:6], v[:6]), kernel(q, k[6:], v[6:])
    total = np.logaddexp(l1, l2)
    np.testing.assert_allclose(total, lse, rtol=1e-5, atol=1e-5)
    merged = np.exp(l1 - total) * o1 + np.exp(l2 - total) * o2
    np.testing.assert_allclose(merged, o, rtol=1e-4, atol=1e-5)


def test_the_torch_op_refuses_several_outputs():
    torch = pytest.importorskip("torch")
    del torch
    import attnc.torch as attnc_torch

    with pytest.raises(attnc.CompileError, match="returns several values"):
        attnc_torch.kernel(LSE)
