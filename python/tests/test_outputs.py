"""Kernels returning several values: `k(...)` returns a tuple of arrays, in order; the torch
op returns a tuple of tensors and differentiates through all of them."""

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


def torch_reference(torch, q, k, v):
    """`reference` in torch float64, differentiable."""
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    i = torch.arange(q.shape[-2])[:, None] + (k.shape[-2] - q.shape[-2])
    j = torch.arange(k.shape[-2])[None, :]
    s = s.masked_fill(j > i, float("-inf"))
    lse = torch.logsumexp(s, -1, keepdim=True)
    return torch.exp(s - lse) @ v, lse


def test_the_torch_op_returns_both_values_and_their_gradients():
    torch = pytest.importorskip("torch")
    import attnc.torch as attnc_torch

    op = attnc_torch.kernel(LSE, threads=2)
    arrays = normal(2, 5, 8, seed=7), normal(2, 9, 8, seed=8), normal(2, 9, 8, seed=9)
    q, k, v = (torch.from_numpy(a).requires_grad_() for a in arrays)
    o, lse = op(q, k, v)
    assert o.shape == (2, 5, 8) and lse.shape == (2, 5, 1)
    assert o.dtype == torch.float32 and lse.dtype == torch.float32
    d_o, d_lse = torch.from_numpy(normal(2, 5, 8, seed=10)), torch.from_numpy(normal(2, 5, 1, seed=11))
    ((o * d_o).sum() + (lse * d_lse).sum()).backward()
    q64, k64, v64 = (torch.from_numpy(a).double().requires_grad_() for a in arrays)
    o64, lse64 = torch_reference(torch, q64, k64, v64)
    ((o64 * d_o.double()).sum() + (lse64 * d_lse.double()).sum()).backward()
    np.testing.assert_allclose(o.detach().numpy(), o64.detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(lse.detach().numpy(), lse64.detach().numpy(), atol=1e-5)
    for got, want in ((q, q64), (k, k64), (v, v64)):
        np.testing.assert_allclose(got.grad.numpy(), want.grad.numpy(), rtol=1e-4, atol=1e-5)
    # A result left out of the loss contributes no gradient (its cotangent is zero).
    q.grad = k.grad = v.grad = None
    q64.grad = k64.grad = v64.grad = None
    _, lse = op(q, k, v)
    lse.sum().backward()
    _, lse64 = torch_reference(torch, q64, k64, v64)
    lse64.sum().backward()
    np.testing.assert_allclose(q.grad.numpy(), q64.grad.numpy(), rtol=1e-4, atol=1e-5)
    assert v.grad is None or float(v.grad.abs().max()) == 0.0


def test_the_torch_op_of_several_values_passes_opcheck_and_compiles():
    torch = pytest.importorskip("torch")
    import attnc.torch as attnc_torch

    op = attnc_torch.kernel(LSE)
    args = [torch.from_numpy(a) for a in (normal(1, 4, 8, seed=1), normal(1, 6, 8, seed=2), normal(1, 6, 8, seed=3))]
    torch.library.opcheck(op.op, args)
    compiled = torch.compile(lambda q, k, v: op(q, k, v), fullgraph=True)
    got = compiled(*args)
    want = op(*args)
    assert len(got) == 2
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
