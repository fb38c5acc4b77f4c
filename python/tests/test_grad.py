"""Gradients: ``Kernel.grad`` and the backward of ``attnc.torch`` ops.

Every gradient is compared with torch autograd of the same math in float64 (relative L2 error
≤ 1e-5: attnc computes in float32), and ``Kernel.grad`` with central finite differences of
the float64 math (which checks the float64 reference itself). Shapes are odd on purpose
(lengths 1, 37, 113; m ≠ n), masks have fully masked rows, GQA broadcasting sums over the
shared heads.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the gradient tests compare with torch autograd")

import attnc  # noqa: E402
import attnc.torch  # noqa: E402

from conftest import EXAMPLES  # noqa: E402


def normal(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def rel_l2(got, want):
    got = torch.as_tensor(np.asarray(got), dtype=torch.float64)
    want = torch.as_tensor(want, dtype=torch.float64)
    norm = want.norm()
    diff = (got - want).norm()
    return float(diff / norm) if norm > 0 else float(diff)


def keep(m, n, pattern):
    """Boolean [m, n] mask of a pattern (queries aligned to the end of the keys)."""
    i = torch.arange(m).reshape(-1, 1) + (n - m)
    j = torch.arange(n).reshape(1, -1)
    return pattern(i, j)


def causal(i, j):
    return j <= i


def attend(s, kept):
    """softmax over kept keys (fully masked rows give zeros), as the language defines it."""
    s = s.masked_fill(~kept, -math.inf)
    row_max = s.amax(-1, keepdim=True).clamp_min(-1e300)
    e = torch.exp(s - row_max).masked_fill(~kept, 0.0)
    total = e.sum(-1, keepdim=True)
    return e / torch.where(total > 0, total, torch.ones_like(total))


def local_math(q, k, v):
    n, d = q.shape[-2], q.shape[-1]
    kept = keep(n, n, lambda i, j: causal(i, j) & ((i - j).abs() <= 256))
    return attend(q @ k.transpose(-1, -2) / math.sqrt(d), kept) @ v


def alibi_math(q, k, v, slope):
    n, d = q.shape[-2], q.shape[-1]
    rel = (torch.arange(n).reshape(1, -1) - torch.arange(n).reshape(-1, 1)).to(q.dtype)
    s = q @ k.transpose(-1, -2) / math.sqrt(d) + slope * rel
    return attend(s, keep(n, n, causal)) @ v


def gqa_softcap_math(q, k, v):
    n, d = q.shape[-2], q.shape[-1]
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    s = 30 * torch.tanh(s / 30)
    return attend(s, keep(n, n, causal)) @ v


def linear_math(q, k, v):
    qf = torch.nn.functional.elu(q) + 1
    kf = torch.nn.functional.elu(k) + 1
    a = qf @ kf.transpose(-1, -2)
    return (a @ v) / a.sum(-1, keepdim=True)


def gated_math(x, wq, wk, wv, wg):
    d = wq.shape[-1]
    s = (x @ wq) @ (x @ wk).transpose(-1, -2) / math.sqrt(d)
    a = torch.softmax(s, -1) @ (x @ wv)
    return torch.sigmoid(x @ wg) * a


def prefill_math(q, k, v):
    m, n, d = q.shape[-2], k.shape[-2], q.shape[-1]
    return attend(q @ k.transpose(-1, -2) / math.sqrt(d), keep(m, n, causal)) @ v


CASES = {
    "local": ("local.attn", local_math, lambda: [normal(2, 37, 24, seed=s) for s in range(3)]),
    "alibi": (
        "alibi.attn",
        alibi_math,
        lambda: [normal(3, 41, 16, seed=s) for s in range(3)] + [normal(3, 1, 1, seed=9) * 0.3],
    ),
    "gqa_softcap": (
        "gqa_softcap.attn",
        gqa_softcap_math,
        lambda: [normal(4, 29, 8, seed=1) * 4, normal(1, 29, 8, seed=2) * 4, normal(1, 29, 8, seed=3)],
    ),
    "linear": ("linear.attn", linear_math, lambda: [normal(2, 53, 16, seed=s) for s in range(3)]),
    "gated": (
        "gated.attn",
        gated_math,
        lambda: [normal(31, 12, seed=0)] + [normal(12, 8, seed=s) * 0.3 for s in range(1, 5)],
    ),
    "chunked_prefill": (
        "chunked_prefill.attn",
        prefill_math,
        # m = 7 queries against n = 3 keys: the first 4 rows keep nothing.
        lambda: [normal(2, 7, 5, seed=1), normal(2, 3, 5, seed=2), normal(2, 3, 5, seed=3)],
    ),
}


def torch_grads(math_fn, inputs, cotangent):
    leaves = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in inputs]
    out = math_fn(*leaves)
    out.backward(torch.as_tensor(cotangent, dtype=torch.float64))
    return out.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_grad_matches_torch_autograd_in_float64(case):
    path, math_fn, make = CASES[case]
    kernel = attnc.compile(EXAMPLES / path, threads=2)
    inputs = make()
    out = kernel(*inputs)
    cotangent = normal(*out.shape, seed=77)
    names = [name for name, _, _ in kernel.params]
    grads = kernel.grad(*inputs, cotangent=cotangent)
    assert list(grads) == names
    want_out, want = torch_grads(math_fn, inputs, cotangent)
    assert rel_l2(out, want_out) <= 1e-5, case
    for name, x, w in zip(names, inputs, want):
        g = grads[name]
        assert g.dtype == np.float32 and g.shape == x.shape, name
        assert rel_l2(g, w) <= 1e-5, (case, name, rel_l2(g, w))


def test_grad_with_respect_to_some_parameters_in_the_order_asked():
    kernel = attnc.compile(EXAMPLES / "alibi.attn", threads=2)
    inputs = CASES["alibi"][2]()
    every = kernel.grad(*inputs)  # cotangent: ones
    some = kernel.grad(*inputs, wrt=["slope", "q"])
    assert list(some) == ["slope", "q"]
    for name in some:
        assert np.allclose(some[name], every[name], rtol=1e-5, atol=1e-6), name
    by_name = kernel.grad(q=inputs[0], k=inputs[1], v=inputs[2], slope=inputs[3], wrt=["v"])
    assert np.array_equal(by_name["v"], kernel.grad(*inputs, wrt=["v"])["v"])


def test_grad_matches_central_finite_differences():
    """Directional derivatives: <grad, u> against (f(x + εu) − f(x − εu)) / 2ε of the float64
    math, for a random direction u per parameter."""
    kernel = attnc.compile(EXAMPLES / "alibi.attn", threads=2)
    inputs = CASES["alibi"][2]()
    out = kernel(*inputs)
    cotangent = normal(*out.shape, seed=5)
    grads = kernel.grad(*inputs, cotangent=cotangent)
    c = torch.tensor(cotangent, dtype=torch.float64)
    x64 = [torch.tensor(x, dtype=torch.float64) for x in inputs]
    eps = 1e-6
    for index, (name, _, _) in enumerate(kernel.params):
        u = torch.tensor(normal(*inputs[index].shape, seed=100 + index), dtype=torch.float64)
        plus = [x + eps * u if i == index else x for i, x in enumerate(x64)]
        minus = [x - eps * u if i == index else x for i, x in enumerate(x64)]
        numeric = float(((alibi_math(*plus) - alibi_math(*minus)) * c).sum() / (2 * eps))
        analytic = float((torch.tensor(grads[name], dtype=torch.float64) * u).sum())
        assert abs(analytic - numeric) <= 1e-4 * max(1.0, abs(numeric)), (name, analytic, numeric)


def test_grad_of_several_outputs_takes_one_cotangent_each():
    """lse.attn returns (o, lse): the gradients are those of <c_o, o> + <c_lse, lse>."""
    kernel = attnc.compile(EXAMPLES / "lse.attn", threads=2)
    q, k, v = normal(2, 23, 8, seed=1), normal(2, 37, 8, seed=2), normal(2, 37, 8, seed=3)
    c_o, c_lse = normal(2, 23, 8, seed=4), normal(2, 23, 1, seed=5)
    grads = kernel.grad(q, k, v, cotangent=(c_o, c_lse))
    leaves = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (q, k, v)]
    s = leaves[0] @ leaves[1].transpose(-1, -2) / math.sqrt(8)
    s = s.masked_fill(~keep(23, 37, causal), float("-inf"))
    o = torch.softmax(s, -1) @ leaves[2]
    lse = torch.logsumexp(s, -1, keepdim=True)
    total = (o * torch.tensor(c_o, dtype=torch.float64)).sum()
    total = total + (lse * torch.tensor(c_lse, dtype=torch.float64)).sum()
    total.backward()
    for name, leaf in zip("qkv", leaves):
        assert rel_l2(grads[name], leaf.grad) <= 1e-5, name
    # Default: ones for each output; a single array is refused, naming the count.
    ones = kernel.grad(q, k, v, cotangent=(np.ones_like(c_o), np.ones_like(c_lse)))
    for name, g in kernel.grad(q, k, v).items():
        assert np.array_equal(g, ones[name]), name
    with pytest.raises(attnc.InputError, match="returns 2 values"):
        kernel.grad(q, k, v, cotangent=c_o)


def test_grad_errors_name_what_is_wrong():
    kernel = attnc.compile(EXAMPLES / "local.attn")
    q = normal(2, 9, 4)
    with pytest.raises(attnc.InputError, match="no parameter `x`") as info:
        kernel.grad(q, q, q, wrt=["x"])
    assert info.value.input == "x"
    with pytest.raises(attnc.InputError, match="listed twice"):
        kernel.grad(q, q, q, wrt=["q", "q"])
    with pytest.raises(attnc.InputError, match="no parameter to differentiate"):
        kernel.grad(q, q, q, wrt=[])
    with pytest.raises(attnc.ShapeError, match="cotangent has shape") as info:
        kernel.grad(q, q, q, cotangent=normal(2, 9, 5))
    assert info.value.input == "cotangent"
    with pytest.raises(attnc.InputError, match="missing"):
        kernel.grad(q, q)
    with pytest.raises(attnc.InputError, match="cotangent"):
        kernel.grad(q, q, q, cotangent="ones")


def test_grad_of_empty_dimensions_is_empty_or_zero():
    kernel = attnc.compile(EXAMPLES / "chunked_prefill.attn")
    q, kv = normal(2, 0, 4), normal(2, 5, 4)
    grads = kernel.grad(q, kv, kv)
    assert grads["q"].shape == (2, 0, 4)
    assert np.array_equal(grads["k"], np.zeros((2, 5, 4), np.float32))
    q, kv = normal(2, 3, 4), normal(2, 0, 4)
    grads = kernel.grad(q, kv, kv)
    assert np.array_equal(grads["q"], np.zeros((2, 3, 4), np.float32))
    assert grads["v"].shape == (2, 0, 4)


def test_gradients_are_compiled_once_per_shape_and_parameter_list():
    kernel = attnc.compile(EXAMPLES / "local.attn", threads=1)
    q = normal(1, 20, 8)
    first = kernel.grad(q, q, q, wrt=["k"])["k"]
    assert np.array_equal(kernel.grad(q, q, q, wrt=["k"])["k"], first)
    kernel.clear_cache()
    assert np.array_equal(kernel.grad(q, q, q, wrt=["k"])["k"], first)


# --- attnc.torch --------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["local", "alibi", "gqa_softcap", "linear", "chunked_prefill"])
def test_the_op_backward_matches_torch_autograd(case):
    path, math_fn, make = CASES[case]
    op = attnc.torch.kernel(EXAMPLES / path, threads=2)
    inputs = make()
    leaves = [torch.tensor(x, requires_grad=True) for x in inputs]
    out = op(*leaves)
    cotangent = torch.tensor(normal(*out.shape, seed=3))
    out.backward(cotangent)
    _, want = torch_grads(math_fn, inputs, cotangent.numpy())
    for leaf, w in zip(leaves, want):
        assert leaf.grad is not None and leaf.grad.dtype == torch.float32
        assert rel_l2(leaf.grad.numpy(), w) <= 1e-5, case


def test_only_the_inputs_that_require_grad_get_gradients():
    op = attnc.torch.kernel(EXAMPLES / "local.attn", threads=2)
    q = torch.tensor(normal(2, 17, 8, seed=1), requires_grad=True)
    k, v = (torch.tensor(normal(2, 17, 8, seed=s)) for s in (2, 3))
    op(q, k, v).sum().backward()
    assert q.grad is not None and k.grad is None and v.grad is None
    _, want = torch_grads(local_math, [q.detach().numpy(), k.numpy(), v.numpy()], np.ones((2, 17, 8)))
    assert rel_l2(q.grad.numpy(), want[0]) <= 1e-5


def test_gradients_come_back_in_the_inputs_dtype():
    op = attnc.torch.kernel(EXAMPLES / "local.attn", threads=2)
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        q = torch.tensor(normal(2, 13, 8, seed=4)).to(dtype).requires_grad_()
        op(q, q, q).float().sum().backward()
        assert q.grad.dtype == dtype
        assert torch.isfinite(q.grad.float()).all()


def test_gradcheck_in_float64_through_float32_kernels():
    """torch.autograd.gradcheck with a step and tolerances that float32 arithmetic allows."""
    op = attnc.torch.kernel(EXAMPLES / "alibi.attn", threads=2)
    inputs = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in CASES["alibi"][2]()]
    inputs = [x[:1, :9, :4].detach().clone().requires_grad_() for x in inputs[:3]] + [
        inputs[3][:1].detach().clone().requires_grad_()
    ]
    assert torch.autograd.gradcheck(op, inputs, eps=1e-3, atol=2e-3, rtol=2e-3)


def test_opcheck_passes_with_gradients():
    op = attnc.torch.kernel(
        "kernel attend(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {\n"
        "    return softmax(mask(q @ k.T / sqrt(d), causal)) @ v;\n}"
    )
    args = tuple(torch.tensor(normal(2, 13, 8, seed=s)).requires_grad_() for s in range(3))
    result = torch.library.opcheck(op.op, args)
    assert set(result.values()) == {"SUCCESS"}, result


def test_torch_compile_of_a_training_step_matches_eager():
    torch._dynamo.reset()
    op = attnc.torch.kernel(EXAMPLES / "local.attn", threads=2)

    def step(q, k, v):
        return (op(q, k, v) ** 2).sum()

    compiled = torch.compile(step)
    inputs = [torch.tensor(normal(2, 21, 8, seed=s), requires_grad=True) for s in range(3)]
    twins = [x.detach().clone().requires_grad_() for x in inputs]
    step(*inputs).backward()
    compiled(*twins).backward()
    for a, b in zip(inputs, twins):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_the_training_op_keeps_the_forward_and_gives_the_same_gradients():
    """Under autograd the op runs its training form: the fused forward keeps the rows'
    log-sum-exps and the backward starts from them. The gradients are those of
    ``Kernel.grad`` (which recomputes the forward) bit for bit; the output is the plain
    forward's within the exact bound."""
    source = (
        "kernel attend(q: f32[h, m, d], k: f32[h, n, d], v: f32[h, n, e]) -> f32[h, m, e] {\n"
        "    return softmax(q @ k.T / sqrt(d)) @ v;\n}"
    )
    op = attnc.torch.kernel(source, threads=2)
    for m, n in [(1, 1), (113, 70), (3, 200)]:
        inputs = [normal(2, m, 40, seed=1), normal(2, n, 40, seed=2), normal(2, n, 59, seed=3)]
        leaves = [torch.tensor(x, requires_grad=True) for x in inputs]
        out = op(*leaves)
        with torch.no_grad():
            plain = op(*leaves)
        assert rel_l2(out.detach().numpy(), plain.numpy()) <= 1e-6
        cotangent = normal(*out.shape, seed=4)
        out.backward(torch.tensor(cotangent))
        want = op.kernel.grad(*inputs, cotangent=cotangent)
        for leaf, name in zip(leaves, "qkv"):
            assert np.array_equal(leaf.grad.numpy(), want[name]), (m, n, name)
    args = tuple(torch.tensor(normal(2, 13, 8, seed=s)).requires_grad_() for s in range(3))
    args = args[:2] + (torch.tensor(normal(2, 13, 5, seed=7)).requires_grad_(),)
    result = torch.library.opcheck(op.train_op, args)
    assert set(result.values()) == {"SUCCESS"}, result
