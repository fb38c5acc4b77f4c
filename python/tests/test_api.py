"""The Python API as LANGUAGE.md §5 spells it: compile, call, explain, signature, plan."""

from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import pytest

import attnc

from conftest import EXAMPLES

LOCAL = EXAMPLES / "local.attn"
CAUSAL = """
kernel attend(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {
    return softmax(mask(q @ k.T / sqrt(d), causal)) @ v;
}
"""


def normal(*shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def reference(q, k, v, causal=True, window=None):
    """Causal (windowed) softmax attention in float64."""
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    s = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    i = np.arange(q.shape[-2])[:, None] + (k.shape[-2] - q.shape[-2])
    j = np.arange(k.shape[-2])[None, :]
    keep = j <= i if causal else np.ones_like(j <= i)
    if window is not None:
        keep &= np.abs(i - j) <= window
    s = np.where(keep, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def test_compile_from_text_path_and_pathlike():
    for source in (CAUSAL, CAUSAL.encode(), str(LOCAL), LOCAL):
        kernel = attnc.compile(source)
        assert isinstance(kernel, attnc.Kernel)
    assert attnc.compile(LOCAL).file == str(LOCAL)
    assert attnc.compile(CAUSAL).file == "<string>"


def test_call_returns_numpy_and_matches_float64():
    kernel = attnc.compile(CAUSAL, threads=2)
    q, k, v = normal(3, 113, 40, seed=1), normal(3, 113, 40, seed=2), normal(3, 113, 40, seed=3)
    out = kernel(q=q, k=k, v=v)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (3, 113, 40)
    expected = reference(q, k, v)
    assert np.linalg.norm(out - expected) / np.linalg.norm(expected) < 1e-5
    assert np.array_equal(kernel(q, k, v), out), "positional and keyword calls agree"
    assert np.array_equal(kernel(q, k, v=v), out)


def test_signature_params_and_return_type():
    kernel = attnc.compile(EXAMPLES / "decode.attn")
    assert kernel.name == "decode"
    assert kernel.signature == "decode(q: f32[h, 1, d], k: bf16[h, n, d], v: bf16[h, n, d]) -> f32[h, 1, d]"
    assert kernel.params[1] == ("k", "bf16", ("h", "n", "d"))
    assert kernel.params[0][2] == ("h", 1, "d")
    assert kernel.return_dtype == "f32"
    performer = attnc.compile(EXAMPLES / "performer.attn")
    assert performer.signature.startswith("@approx(random_features(m = 256, seed = 7), tol = 0.1) ")
    assert repr(kernel).startswith("<attnc.Kernel decode(")


def test_plan_and_explain_follow_the_latest_call():
    kernel = attnc.compile(LOCAL)
    with pytest.raises(attnc.ShapeError, match="no plan yet") as caught:
        kernel.plan
    assert caught.value.dimension in ("h", "n", "d")
    symbolic = kernel.explain()  # unbound: the program optimized symbolically
    assert symbolic["kernel"] == "local" and "decision" in symbolic
    kernel(*(normal(2, 70, 16, seed=s) for s in range(3)))
    assert "m=70 n=70 d=16" in kernel.plan and "fused attention" in kernel.plan
    assert kernel.bindings == {"d": 16, "h": 2, "n": 70}
    trace = kernel.explain()
    assert trace["kernel"] == "local"
    assert isinstance(trace["iterations"], list) and trace["cost_after"] <= trace["cost_before"]
    kernel(*(normal(1, 33, 8, seed=s) for s in range(3)))
    assert "m=33 n=33 d=8" in kernel.plan
    assert kernel.cache_size == 2
    kernel.clear_cache()
    assert kernel.cache_size == 0


def test_plan_at_given_shapes_compiles_without_a_call():
    kernel = attnc.compile(LOCAL, shapes={"h": 2, "n": 64, "d": 16})
    assert "m=64 n=64 d=16" in kernel.plan
    assert kernel.shapes == {"d": 16, "h": 2, "n": 64}


def test_shapes_check_the_inputs():
    kernel = attnc.compile(CAUSAL, shapes={"d": 8})
    q = normal(2, 10, 8)
    assert kernel(q, q, q).shape == (2, 10, 8)
    with pytest.raises(attnc.ShapeError, match="contradicts input `q` axis 2") as caught:
        kernel(normal(2, 10, 4), normal(2, 10, 4), normal(2, 10, 4))
    assert (caught.value.input, caught.value.dimension, caught.value.axis) == ("q", "d", 2)


def test_compiled_code_is_cached_per_shape():
    kernel = attnc.compile(CAUSAL)
    q = normal(2, 50, 8)
    kernel(q, q, q)
    start = time.perf_counter()
    for _ in range(20):
        kernel(q, q, q)
    per_call = (time.perf_counter() - start) / 20
    assert kernel.cache_size == 1
    assert per_call < 0.01, f"{per_call * 1e3:.2f} ms per cached call: recompiling?"


def test_float16_and_bfloat16_parameters():
    half = attnc.compile(EXAMPLES / "blocksparse.attn")
    q = normal(2, 70, 16, dtype=np.float16)
    out = half(q, q, q)
    assert out.dtype == np.float16 and out.shape == (2, 70, 16)
    assert half._copies(q, q, q) == [False, False, False]
    decode = attnc.compile(EXAMPLES / "decode.attn")
    q, kv = normal(2, 1, 16), normal(2, 90, 16)
    # bf16 parameters take float32 data rounded once (copied), as `attnc run` rounds `.npy`s.
    assert decode._copies(q, kv, kv) == [False, True, True]
    out = decode(q, kv, kv)
    assert out.shape == (2, 1, 16) and np.isfinite(out).all()


def test_zero_copy_only_for_contiguous_aligned_arrays_of_the_declared_type():
    kernel = attnc.compile(CAUSAL)
    q = normal(2, 30, 8)
    assert kernel._copies(q, q, q) == [False, False, False]
    readonly = q.copy()
    readonly.flags.writeable = False
    assert kernel._copies(readonly, q, q) == [False, False, False]
    fortran = np.asfortranarray(q)
    assert kernel._copies(fortran, q[:, ::-1], q[:, :, :4].repeat(2, axis=2)) == [True, True, False]
    raw = np.zeros(q.size * 4 + 1, dtype=np.uint8)
    misaligned = np.frombuffer(raw.data, dtype=np.float32, count=q.size, offset=1).reshape(q.shape)
    misaligned[...] = q
    assert not misaligned.flags.aligned
    assert kernel._copies(misaligned, q, q) == [True, False, False]
    assert np.array_equal(kernel(misaligned, q, q), kernel(q, q, q))


def test_strided_inputs_compute_on_their_logical_values():
    kernel = attnc.compile(CAUSAL)
    base = normal(2, 60, 16, seed=4)
    views = {
        "fortran": np.asfortranarray(base),
        "reversed": base[:, ::-1, :],
        "every_other": normal(2, 120, 16, seed=5)[:, ::2, :],
        "transposed": np.swapaxes(normal(2, 16, 60, seed=6), 1, 2),
        "broadcast": np.broadcast_to(normal(1, 60, 16, seed=7), (2, 60, 16)),
    }
    for name, view in views.items():
        contiguous = np.ascontiguousarray(view)
        assert np.array_equal(kernel(view, base, view), kernel(contiguous, base, contiguous)), name


def test_other_float_types_and_array_likes_are_converted():
    kernel = attnc.compile(CAUSAL)
    q = normal(1, 10, 4)
    expected = kernel(q, q, q)
    assert np.array_equal(kernel(q.astype(np.float64), q, q.astype(">f4")), expected)
    assert np.array_equal(kernel(q.tolist(), q, q), expected)


def test_the_interpreter_lock_is_released_while_running():
    kernel = attnc.compile(LOCAL, threads=1)
    q = normal(4, 4096, 64, seed=8)
    kernel(q, q, q)  # compile first
    ticks = 0
    done = threading.Event()

    def work():
        for _ in range(3):
            kernel(q, q, q)
        done.set()

    worker = threading.Thread(target=work)
    start = time.perf_counter()
    worker.start()
    while not done.is_set():
        ticks += 1
        time.sleep(0.001)
    worker.join()
    elapsed = time.perf_counter() - start
    # With the lock held for the whole run this loop could not tick during it.
    assert ticks > 0.3 * elapsed / 0.0011, (ticks, elapsed)


def test_many_threads_calling_one_kernel_get_identical_results():
    kernel = attnc.compile(LOCAL, threads=2)
    inputs = [normal(2, 300, 32, seed=s) for s in range(3)]
    expected = kernel(*inputs)
    results = []

    def call():
        for _ in range(5):
            results.append(kernel(*inputs))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 20
    assert all(np.array_equal(r, expected) for r in results)


def test_zero_length_dimensions_give_empty_results():
    kernel = attnc.compile(CAUSAL)
    empty = np.zeros((2, 0, 8), dtype=np.float32)
    out = kernel(empty, empty, empty)
    assert out.shape == (2, 0, 8) and out.dtype == np.float32
    no_heads = np.zeros((0, 5, 8), dtype=np.float32)
    assert kernel(no_heads, no_heads, no_heads).shape == (0, 5, 8)


def test_nan_propagates_to_the_rows_it_reaches():
    kernel = attnc.compile(CAUSAL)
    q, k, v = normal(1, 6, 4, seed=1), normal(1, 6, 4, seed=2), normal(1, 6, 4, seed=3)
    k = k.copy()
    k[0, 3, 0] = np.nan
    out = kernel(q, k, v)
    # Causal: rows 0..2 never see key 3; rows 3..5 do.
    assert np.isfinite(out[0, :3]).all()
    assert np.isnan(out[0, 3:]).all()


def test_approximation_options():
    exact = attnc.compile(EXAMPLES / "performer.attn", approx="exact")
    assert exact.policy == "exact"
    assert attnc.compile(EXAMPLES / "performer.attn", approx=[]).policy == "exact"
    assert "random_features" in attnc.compile(EXAMPLES / "performer.attn").policy
    int8 = attnc.compile(LOCAL, approx="int8", tol=0.05)
    assert int8.policy == "int8 (tol 0.05)"
    q = normal(2, 128, 32)
    out = int8(q, q, q)
    expected = attnc.compile(LOCAL)(q, q, q)
    assert np.linalg.norm(out - expected) / np.linalg.norm(expected) <= 0.05


DENSE = """
kernel dense(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {
    return softmax(q @ k.T / sqrt(d)) @ v;
}
"""


def test_approximations_are_validated_on_the_first_calls_inputs():
    # Performer's random features are accurate where scores are small and fail where they
    # spread: the plan compiled for a call is measured on that call's inputs, and the same
    # kernel takes the approximation for the first data and runs exactly for the second.
    q, k, v = (normal(1, 4096, 32, seed=s) for s in (1, 2, 3))
    options = {"approx": "random_features(m=256,seed=7)", "tol": 0.1}
    small = attnc.compile(EXAMPLES / "performer.attn", **options)
    small(0.3 * q, 0.3 * k, v)
    (measured,) = small.validations
    assert measured["sample"] == "the call's inputs (q, k, v)", measured
    assert measured["accepted"] and measured["measured_error"] <= 0.1, measured
    assert "linear attention" in small.plan, small.plan

    spread = attnc.compile(EXAMPLES / "performer.attn", **options)
    out = spread(q, k, v)
    (measured,) = spread.validations
    assert not measured["accepted"] and measured["measured_error"] > 0.1, measured
    assert "linear attention" not in spread.plan, spread.plan
    exact = attnc.compile(EXAMPLES / "performer.attn", approx="exact")
    expected = exact(q, k, v)
    assert exact.validations == []
    assert np.linalg.norm(out - expected) / np.linalg.norm(expected) <= 1e-5
    # Its plan is exact now: a non-finite input changes nothing and warns of nothing.
    k_inf = k.copy()
    k_inf[0, 7, 0] = np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out_inf = spread(q, k_inf, v)
    assert np.array_equal(out_inf, exact(q, k_inf, v), equal_nan=True)


def test_a_call_with_non_finite_inputs_runs_the_exact_plan():
    q, k, v = (0.3 * normal(1, 4096, 32, seed=s) for s in (1, 2, 3))
    k[0, 100, 5] = np.inf
    kernel = attnc.compile(
        EXAMPLES / "performer.attn", approx="random_features(m=256,seed=7)", tol=0.1
    )
    with pytest.warns(UserWarning, match="input `k` holds NaN or infinite values"):
        out = kernel(q, k, v)
    expected = attnc.compile(EXAMPLES / "performer.attn", approx="exact")(q, k, v)
    assert np.array_equal(np.isnan(out), np.isnan(expected))
    finite = np.isfinite(expected)
    assert np.allclose(out[finite], expected[finite], rtol=1e-5, atol=1e-6)
    # The approximating plan is compiled, and validated, by the next call with finite inputs.
    k[0, 100, 5] = 0.0
    kernel(q, k, v)
    (measured,) = kernel.validations
    assert measured["accepted"] and "linear attention" in kernel.plan, measured


def test_a_plan_compiled_before_any_call_is_validated_on_drawn_values():
    kernel = attnc.compile(DENSE, approx="int8", tol=0.05, shapes={"h": 2, "n": 512, "d": 32})
    assert kernel.validations == []
    assert kernel.plan  # compiled now, from the shapes= values
    (measured,) = kernel.validations
    assert measured["sample"].startswith("random(seed = "), measured


def test_unused_shapes_warn():
    with pytest.warns(UserWarning, match="no dimension `z`"):
        attnc.compile(LOCAL, shapes={"z": 3})


def test_kernels_pickle_as_their_program_and_options():
    import pickle

    kernel = attnc.compile(LOCAL, shapes={"d": 16}, approx="exact", threads=1)
    q = normal(2, 40, 16)
    expected = kernel(q, q, q)
    copy = pickle.loads(pickle.dumps(kernel))
    assert copy.signature == kernel.signature and copy.file == kernel.file
    assert (copy.shapes, copy.policy, copy.threads) == (kernel.shapes, "exact", 1)
    assert copy.cache_size == 0
    assert np.array_equal(copy(q, q, q), expected)
