"""attnc kernels as torch operators: the op, opcheck, torch.compile, autocast, GradScaler,
a transformer block against scaled_dot_product_attention, trained like it (the gradients
themselves are checked in test_grad.py)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch integration needs torch installed")
import torch.nn.functional as F  # noqa: E402

import attnc  # noqa: E402
import attnc.torch  # noqa: E402

from blocks import CAUSAL, VOCAB, synthetic_batch, train, twin_models  # noqa: E402
from conftest import EXAMPLES  # noqa: E402


def normal(*shape, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(dtype)


# --- the op -------------------------------------------------------------------------------


def test_the_op_computes_what_the_numpy_api_computes():
    op = attnc.torch.kernel(EXAMPLES / "local.attn", threads=2)
    q, k, v = (normal(2, 97, 24, seed=s) for s in range(3))
    out = op(q, k, v)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    expected = attnc.compile(EXAMPLES / "local.attn", threads=2)(q.numpy(), k.numpy(), v.numpy())
    assert np.array_equal(out.numpy(), expected)
    assert torch.equal(op(q=q, k=k, v=v), out)
    assert op.signature.startswith("local(") and "fused attention" in op.plan


def test_the_same_arguments_give_the_same_op():
    a = attnc.torch.kernel(CAUSAL)
    assert attnc.torch.kernel(CAUSAL) is a
    assert attnc.torch.kernel(CAUSAL, threads=1) is not a


def test_a_model_with_the_op_pickles():
    import io
    import pickle

    ours, _ = twin_models(seed=5)
    tokens, _ = synthetic_batch(3)
    with torch.no_grad():
        expected = ours(tokens)
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(tokens), expected)
    op = ours.block.attend
    assert pickle.loads(pickle.dumps(op)) is pickle.loads(pickle.dumps(op))


def test_bfloat16_tensors_match_rounded_float32_arrays():
    """bf16 key/value caches (decode.attn) read in place from torch: the same values as the
    float32 arrays `attnc run` rounds to bf16."""
    op = attnc.torch.kernel(EXAMPLES / "decode.attn")
    q, kv = normal(4, 1, 32, seed=1), normal(4, 300, 32, seed=2)
    kv16 = kv.to(torch.bfloat16)
    out = op(q, kv16, kv16)
    assert out.dtype == torch.float32  # promoted over (f32, bf16, bf16), the declared f32
    expected = attnc.compile(EXAMPLES / "decode.attn")(q.numpy(), kv.numpy(), kv.numpy())
    assert np.array_equal(out.numpy(), expected)
    numpy_api = attnc.compile(EXAMPLES / "decode.attn")
    assert numpy_api._copies(q, kv16, kv16) == [False, False, False]
    assert np.array_equal(numpy_api(q, kv16, kv16), expected)


BF16_DENSE = """kernel a(q: bf16[h, n, d], k: bf16[h, n, d], v: bf16[h, n, d]) -> f32[h, n, d] {
    return softmax(q @ k.T / sqrt(d)) @ v;
}"""


def test_bf16_products_on_bf16_tensors_hold_torch_bf16_error():
    """`bf16_products` on bf16 tensors: where the CPU has bf16 products (AMX tiles, or
    AVX-512 BF16 vectors) the plan uses them, and the result is within torch's own bf16 SDPA
    error of float64 attention over the same values; elsewhere the report says why not."""
    op = attnc.torch.kernel(BF16_DENSE, approx="bf16_products", tol=0.01)
    q, k, v = (normal(2, 200, 64, seed=s, dtype=torch.bfloat16) for s in (11, 12, 13))
    out = op(q, k, v)
    assert out.dtype == torch.bfloat16  # the inputs' type, as torch's own result
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    torch_bf16 = F.scaled_dot_product_attention(q, k, v).double()
    error = ((out.double() - exact).norm() / exact.norm()).item()
    torch_error = ((torch_bf16 - exact).norm() / exact.norm()).item()
    # The result is rounded to bf16 like torch's, whichever kernel ran.
    assert error <= max(torch_error, 3e-3) * 1.25, (error, torch_error)
    (outcome,) = op.explain()["approximations"]
    if outcome["applied"]:
        assert "bf16 products" in op.plan, op.plan
    else:
        assert "AMX" in outcome["reason"], outcome


def test_dlpack_objects_including_bfloat16():
    class OnlyDlpack:
        def __init__(self, tensor):
            self.tensor = tensor

        def __dlpack__(self, **kwargs):
            return self.tensor.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return self.tensor.__dlpack_device__()

    kernel = attnc.compile(EXAMPLES / "decode.attn")
    q, kv = normal(2, 1, 8, seed=3), normal(2, 40, 8, seed=4).to(torch.bfloat16)
    expected = kernel(q, kv, kv)
    assert np.array_equal(kernel(OnlyDlpack(q), OnlyDlpack(kv), OnlyDlpack(kv)), expected)


def test_strided_and_half_tensors():
    op = attnc.torch.kernel(CAUSAL)
    q = normal(3, 40, 8, seed=5)
    t = normal(3, 8, 40, seed=6).transpose(1, 2)
    assert torch.equal(op(q, t, t), op(q, t.contiguous(), t.contiguous()))
    half = op(q.half(), q.half(), q.half())
    assert half.dtype == torch.float16
    assert torch.allclose(half.float(), op(q, q, q), atol=2e-2)
    assert op(q.double(), q, q).dtype == torch.float64


def test_bad_tensors_are_input_errors():
    op = attnc.torch.kernel(CAUSAL)
    q = normal(2, 10, 4)
    with pytest.raises(attnc.InputError, match="input `k`.*not a floating-point"):
        op(q, q.to(torch.int32), q)
    with pytest.raises(attnc.InputError, match="input `v` is on meta"):
        op(q, q, torch.empty(2, 10, 4, device="meta"))
    meta = torch.empty(2, 10, 4, device="meta")
    assert op(meta, meta, meta).shape == (2, 10, 4)  # shape inference, as torch ops do
    freed = q.clone()
    freed.untyped_storage().resize_(0)
    with pytest.raises(attnc.InputError, match="input `q`: its storage holds 0 bytes"):
        op(freed, q, q)
    with pytest.raises(attnc.ShapeError, match="rank"):
        op(q[0], q, q)
    with pytest.raises(attnc.InputError, match="missing"):
        op(q, q)


# --- torch.library ------------------------------------------------------------------------


def test_opcheck_passes():
    op = attnc.torch.kernel(CAUSAL)
    for shape in [(2, 13, 8), (1, 1, 3), (3, 0, 4)]:
        args = tuple(normal(*shape, seed=s) for s in range(3))
        result = torch.library.opcheck(op.op, args)
        assert set(result.values()) == {"SUCCESS"}, result


def test_opcheck_passes_on_bfloat16_and_float16_inputs():
    decode = attnc.torch.kernel(EXAMPLES / "decode.attn")
    q, kv = normal(2, 1, 8, seed=1), normal(2, 33, 8, seed=2).to(torch.bfloat16)
    result = torch.library.opcheck(decode.op, (q, kv, kv))
    assert set(result.values()) == {"SUCCESS"}, result
    half = attnc.torch.kernel(EXAMPLES / "blocksparse.attn")
    x = normal(2, 70, 16, seed=3).half()
    result = torch.library.opcheck(half.op, (x, x, x))
    assert set(result.values()) == {"SUCCESS"}, result


def test_backward_fills_the_gradients_and_no_grad_builds_no_graph():
    op = attnc.torch.kernel(CAUSAL)
    q = normal(2, 10, 4).requires_grad_()
    out = op(q, q, q)
    assert out.requires_grad
    out.sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape and torch.isfinite(q.grad).all()
    with torch.no_grad():
        assert not op(q, q, q).requires_grad


# --- a transformer block ------------------------------------------------------------------


def test_the_block_computes_what_sdpa_computes():
    ours, theirs = twin_models()
    tokens, _ = synthetic_batch(0)
    with torch.no_grad():
        a, b = ours(tokens), theirs(tokens)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a - b).abs().max()


def test_torch_compile_of_a_model_with_the_op_matches_eager():
    torch._dynamo.reset()
    ours, _ = twin_models(seed=1)
    compiled = torch.compile(ours)
    for step in range(2):
        tokens, _ = synthetic_batch(step)
        with torch.no_grad():
            eager, traced = ours(tokens), compiled(tokens)
        assert torch.allclose(eager, traced, rtol=1e-5, atol=1e-5), (eager - traced).abs().max()
    # Another sequence length: traced again (symbolic sizes through the fake implementation).
    tokens, _ = synthetic_batch(5, n=17)
    with torch.no_grad():
        assert torch.allclose(ours(tokens), compiled(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_autocast_forward(dtype):
    ours, theirs = twin_models(seed=2)
    tokens, _ = synthetic_batch(1)
    with torch.no_grad():
        full = ours(tokens)
        with torch.autocast("cpu", dtype=dtype):
            mixed = ours(tokens)
            reference = theirs(tokens)
    assert mixed.dtype == dtype
    error = (mixed.float() - full).norm() / full.norm()
    reference_error = (reference.float() - full).norm() / full.norm()
    assert error < max(3e-2, 2 * reference_error), (error, reference_error)


def test_grad_scaler_scales_the_loss_and_unscales_the_gradients():
    """Under bf16 autocast with a GradScaler, the unscaled gradients of the attnc model are
    those of the SDPA model (same weights, same data) within bf16's error, and the step runs."""
    ours, theirs = twin_models(seed=3)
    tokens, targets = synthetic_batch(2)
    grads = []
    for model in (ours, theirs):
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(tokens)
            loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), targets.reshape(-1))
        scaled = scaler.scale(loss)
        assert torch.isfinite(scaled) and torch.allclose(scaled, loss * 1024.0)
        scaled.backward()
        scaler.unscale_(optimizer)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        scaler.step(optimizer)
        scaler.update()
        assert scaler.get_scale() == 1024.0  # no inf/NaN: the scale stays
    error = (grads[0] - grads[1]).norm() / grads[1].norm()
    assert error < 3e-2, float(error)


def test_the_block_trains_like_sdpa():
    """Issue 15's training criterion: a few hundred steps on the synthetic task, the final loss
    within 1 % of the same block with SDPA (same init, same data)."""
    ours, theirs = twin_models(seed=4)
    ours_loss = train(ours, 300)
    reference = train(theirs, 300)
    # Two of the 24 targets are random (loss ln 16 each): 0.23 is all there is to learn.
    assert reference < 0.5, f"the task is not learned even with SDPA: {reference}"
    assert abs(ours_loss - reference) <= 0.01 * reference, (ours_loss, reference)
