"""Every mistake a caller can make is a Python exception naming what is wrong, never a crash.

The bad inputs of the fault checklist as Python callers make them: wrong dtypes, layouts and
ranks, conflicting shapes, empty and NaN data, freed buffers, missing or unknown inputs, bad
options, broken programs and files.
"""

from __future__ import annotations

import pickle
import subprocess
import sys

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


@pytest.fixture(scope="module")
def kernel():
    return attnc.compile(CAUSAL)


def qkv(h=2, n=10, d=4):
    rng = np.random.default_rng(0)
    return [rng.standard_normal((h, n, d)).astype(np.float32) for _ in range(3)]


# --- programs -----------------------------------------------------------------------------


def test_a_syntax_error_has_line_column_message_and_rendering():
    source = "kernel f(q: f32[n]) -> f32[n] {\n    return q +;\n}\n"
    with pytest.raises(attnc.CompileError) as caught:
        attnc.compile(source)
    error = caught.value
    assert (error.line, error.column) == (2, 15)
    assert error.message == "expected an expression, found `;`"
    assert error.file == "<string>"
    assert "--> <string>:2:15" in str(error) and "^" in str(error)
    assert error.diagnostics[0]["line"] == 2
    assert isinstance(error, ValueError) and isinstance(error, attnc.AttncError)


def test_a_type_error_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "broken.attn"
    path.write_text(
        "kernel f(q: f32[n, d], k: f32[m, e]) -> f32[n, d] {\n"
        "    return q @ k.T;\n"
        "}\n"
    )
    with pytest.raises(attnc.CompileError) as caught:
        attnc.compile(path)
    assert caught.value.file == str(path)
    assert caught.value.line == 2
    assert str(path) in str(caught.value)


def test_columns_count_characters_not_bytes():
    source = "# ünïcödé\nkernel f(q: f32[n]) -> f32[n] { return é; }\n"
    with pytest.raises(attnc.CompileError) as caught:
        attnc.compile(source)
    assert caught.value.line == 2
    assert caught.value.column == len("kernel f(q: f32[n]) -> f32[n] { return ") + 1


def test_invalid_utf8_is_a_compile_error():
    with pytest.raises(attnc.CompileError):
        attnc.compile(b"kernel f(q: f32[n]) -> f32[n] { return q; } \xff\xfe {")


def test_empty_and_comment_only_sources_have_no_kernel():
    with pytest.raises(attnc.InputError, match="no kernel"):
        attnc.compile("# only a comment {\n")


def test_files_that_are_missing_directories_or_devices(tmp_path):
    with pytest.raises(FileNotFoundError):
        attnc.compile(tmp_path / "missing.attn")
    with pytest.raises(IsADirectoryError):
        attnc.compile(tmp_path)
    with pytest.raises(attnc.InputError, match="not a regular file"):
        attnc.compile("/dev/zero")


def test_kernel_choice():
    two = CAUSAL + CAUSAL.replace("attend", "other")
    with pytest.raises(attnc.InputError, match="several kernels .*kernel=NAME"):
        attnc.compile(two)
    with pytest.raises(attnc.InputError, match="no kernel named `missing`"):
        attnc.compile(two, kernel="missing")
    assert attnc.compile(two, kernel="other").name == "other"


@pytest.mark.parametrize(
    "options, match",
    [
        ({"shapes": {"n": -1}}, "non-negative"),
        ({"shapes": {"n": 2.5}}, "non-negative"),
        ({"shapes": [("n", 1)]}, "dict"),
        ({"approx": "nonsense(7)"}, "approx= `nonsense"),
        ({"tol": -1.0}, "positive"),
        ({"tol": float("nan")}, "positive"),
        ({"tol": "small"}, "number"),
        ({"threads": 0}, "positive"),
        ({"threads": True}, "positive"),
        ({"kernel": 3}, "name"),
    ],
)
def test_bad_options(options, match):
    with pytest.raises(attnc.InputError, match=match):
        attnc.compile(CAUSAL, **options)


def test_not_a_source():
    with pytest.raises(attnc.InputError):
        attnc.compile(42)


# --- inputs -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.complex64, np.uint16, object])
def test_non_float_dtypes_name_the_input(kernel, dtype):
    q, k, v = qkv()
    with pytest.raises(attnc.InputError, match="input `k`.*not a floating-point type") as caught:
        kernel(q, k.astype(dtype), v)
    assert caught.value.input == "k"


@pytest.mark.parametrize("bad", [None, "text", {"a": 1}, object()])
def test_non_arrays_name_the_input(kernel, bad):
    q, k, v = qkv()
    with pytest.raises(attnc.InputError) as caught:
        kernel(q, k, bad)
    assert caught.value.input == "v"


def test_wrong_rank_names_the_input(kernel):
    q, k, v = qkv()
    with pytest.raises(attnc.ShapeError, match="input `q` has rank 2") as caught:
        kernel(q[0], k, v)
    assert caught.value.input == "q"
    with pytest.raises(attnc.ShapeError):
        kernel(np.float32(1.0), k, v)


def test_conflicting_dimensions_name_input_dimension_and_axis(kernel):
    q, k, v = qkv()
    with pytest.raises(attnc.ShapeError) as caught:
        kernel(q, k, v[:, :7])
    error = caught.value
    assert (error.input, error.dimension, error.axis) == ("v", "n", 1)
    assert "dimension `n` is 10 from input `q` axis 1 but 7 from input `v` axis 1" in str(error)
    assert isinstance(error, attnc.InputError)


def test_a_literal_size_mismatch():
    decode = attnc.compile(EXAMPLES / "decode.attn")
    q, k, v = qkv()
    with pytest.raises(attnc.ShapeError, match="axis 1 has size 10 but its type declares 1"):
        decode(q, k, v)


def test_a_zero_dimension_used_as_a_number(kernel):
    empty = np.zeros((2, 3, 0), dtype=np.float32)
    with pytest.raises(attnc.ShapeError, match="sqrt") as caught:
        kernel(empty, empty, empty)
    assert caught.value.dimension == "d"


def test_missing_unknown_and_doubled_inputs(kernel):
    q, k, v = qkv()
    with pytest.raises(attnc.InputError, match="input `v` of kernel `attend` is missing"):
        kernel(q, k)
    with pytest.raises(attnc.InputError, match="no parameter `x`"):
        kernel(q, k, v, x=q)
    with pytest.raises(attnc.InputError, match="given twice"):
        kernel(q, k, v, q=q)
    with pytest.raises(attnc.InputError, match="takes 3 inputs"):
        kernel(q, k, v, v)


def test_a_huge_broadcast_view_is_refused_before_copying(kernel):
    one = np.ones((1, 1, 1), dtype=np.float32)
    huge = np.broadcast_to(one, (1 << 16, 1 << 16, 1 << 10))
    with pytest.raises(attnc.InputError, match="input `q`.*available") as caught:
        kernel(huge, huge, huge)
    assert caught.value.input == "q"


def test_a_plan_beyond_memory_is_a_run_error():
    kernel = attnc.compile(
        "kernel scores(q: f32[n, d], k: f32[n, d]) -> f32[n, n] { return q @ k.T; }"
    )
    q = np.broadcast_to(np.ones((1, 1), dtype=np.float32), (1 << 20, 1))
    with pytest.raises(attnc.RunError, match="4.0 TiB") as caught:
        kernel(np.ascontiguousarray(q), np.ascontiguousarray(q))
    assert "--memory-limit" not in str(caught.value)


def test_infinities_and_nan_do_not_crash(kernel):
    q, k, v = qkv()
    for value in (np.nan, np.inf, -np.inf, 1e38, 1e-45):
        bad = q.copy()
        bad[0, 0, 0] = value
        out = kernel(bad, k, v)
        assert out.shape == q.shape


def test_errors_pickle_with_their_fields():
    error = attnc.ShapeError("m", input="q", dimension="n", axis=1)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is attnc.ShapeError and (copy.input, copy.dimension, copy.axis) == ("q", "n", 1)
    assert str(copy) == "m"


def test_nothing_crashes_the_interpreter():
    """The whole list above again, in a fresh interpreter: it must exit normally."""
    script = r"""
import numpy as np, attnc
k = attnc.compile("kernel f(q: f32[n, d], k: f32[n, d], v: f32[n, d]) -> f32[n, d] "
                  "{ return softmax(q @ k.T / sqrt(d)) @ v; }")
q = np.ones((4, 3), np.float32)
bad = [q.astype(np.int8), q[::-1], q.T, np.asfortranarray(q), q[None], q[0], np.zeros((0, 3), np.float32),
       np.full_like(q, np.nan), np.broadcast_to(q[:1], (4, 3)), [[1.0] * 3] * 4, None, "q"]
for b in bad:
    try:
        k(b, q, q)
    except attnc.AttncError:
        pass
print("alive")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "alive"
