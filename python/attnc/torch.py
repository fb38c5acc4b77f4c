"""attnc kernels as torch operators.

    >>> import attnc.torch
    >>> f = attnc.torch.kernel("examples/local.attn")
    >>> o = f(q, k, v)                      # CPU tensors in, a tensor out

:func:`kernel` compiles a kernel and registers it as a ``torch.library.custom_op`` with a fake
(meta) implementation, so ``torch.compile`` traces through it as one opaque node, and an
autograd formula, so it sits in a model like any other op. Each call converts the tensors
without copying where their layout allows (float32/float16 in place, bfloat16 as its bit
patterns) and runs the compiled kernel with the interpreter lock released.

Dtypes: any floating-point tensor is accepted for any parameter and converted to the
parameter's declared type (widened exactly, or rounded to nearest-even as ``attnc run`` stores
an input of another type), so the op runs under ``torch.autocast`` whatever dtypes the
surrounding ops produce. The result has the kernel's declared type when that is f16 or bf16,
and otherwise the promoted dtype of the inputs (float32 inputs give float32; under autocast,
bfloat16 or float16 inputs give that dtype, like ``scaled_dot_product_attention``).

Gradients: the op's backward runs attnc's compiled gradients (:meth:`attnc.Kernel.grad`: the
exact form of the kernel differentiated, a fused attention's gradients in one FlashAttention-2
step that visits only the tiles its mask reaches), for the inputs that require grad only. When
an input requires grad, a call runs the training op (``<op>_train``): where the kernel's result
is a fused attention (exact, float32) its forward also returns the rows' log-sum-exps, and the
backward starts from the saved output and those instead of recomputing the forward; for any
other kernel it is the plain forward, and the backward recomputes what it needs. The backward is a custom op of its own (``<op>_grad``, with a
fake implementation), so ``torch.compile`` traces training steps too. Each gradient is computed
in float32 and returned in its input's dtype. The backward is not itself differentiable
(no double backward). A kernel holding an op whose gradient attnc does not derive raises
:class:`attnc.GradientUnavailableError` from ``backward()``.

Several results: a kernel returning a tuple (``examples/lse.attn``'s ``(o, lse)``) becomes an op
returning a tuple of tensors. Its backward takes one gradient per result (zeros for a result
the loss does not use) and runs the compiled gradients of all of them in one pass; it
recomputes the forward (no training op keeps log-sum-exps for it).
"""

from __future__ import annotations

import itertools
import keyword
import os
import re
import threading
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

import attnc
from ._errors import InputError, ShapeError
from ._inputs import from_torch

__all__ = ["kernel", "KernelOp"]

_DECLARED = {"f16": torch.float16, "bf16": torch.bfloat16}
_ops: Dict[Tuple[Any, ...], "KernelOp"] = {}
_ops_lock = threading.Lock()
_serial = itertools.count()


class KernelOp:
    """A compiled attnc kernel as a torch operator: call it on tensors, positionally or by
    parameter name. ``op`` is the registered ``torch.library`` operator (for
    ``torch.library.opcheck``), ``kernel`` the :class:`attnc.Kernel` it runs."""

    def __init__(self, compiled: attnc.Kernel, ops: Tuple[Any, Any]) -> None:
        self.kernel = compiled
        self.op, self.train_op = ops
        self._names = [name for name, _, _ in compiled.params]

    def __call__(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> Any:
        if kwargs or len(args) != len(self._names):
            args = tuple(_positional(self.kernel, self._names, args, kwargs))
        if (
            self.train_op is not None
            and torch.is_grad_enabled()
            and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        ):
            # Under autograd: the forward that keeps what the backward needs.
            return self.train_op(*args)[0]
        return self.op(*args)

    @property
    def signature(self) -> str:
        """The kernel's signature."""
        return self.kernel.signature

    @property
    def plan(self) -> str:
        """The plan of the most recent call (see :attr:`attnc.Kernel.plan`)."""
        return self.kernel.plan

    def explain(self) -> dict:
        """The optimizer's trace (see :meth:`attnc.Kernel.explain`)."""
        return self.kernel.explain()

    @property
    def validations(self) -> list:
        """How the most recent plan's approximations were measured (see
        :attr:`attnc.Kernel.validations`)."""
        return self.kernel.validations

    def __reduce__(self):
        # The kernel pickles as its program and options; the op is registered again (or found
        # registered) where it is unpickled.
        return (_op_for, (self.kernel,))

    def __repr__(self) -> str:
        return f"<attnc.torch.KernelOp {self.op._qualname}: {self.kernel.signature}>"


def _op_for(compiled: attnc.Kernel) -> KernelOp:
    """The op of an unpickled kernel: one per program and options."""
    _, (source, name, shapes, approx, tol, threads, _) = compiled.__reduce__()
    key = ("kernel", source, name, tuple(sorted(shapes.items())), approx, tol, threads)
    with _ops_lock:
        cached = _ops.get(key)
        if cached is None:
            cached = _ops[key] = KernelOp(compiled, _define(compiled))
        return cached


def kernel(
    source_or_path: attnc.Source,
    kernel: Optional[str] = None,
    shapes: Optional[Dict[str, int]] = None,
    approx: Any = None,
    tol: Optional[float] = None,
    threads: Optional[int] = None,
) -> KernelOp:
    """Compiles a kernel (arguments as :func:`attnc.compile`) and returns it as a torch op.

    The same arguments (and, for a path, the same file contents' modification time) return the
    same op, so building a model twice does not register operators twice.
    """
    key = _cache_key(source_or_path, kernel, shapes, approx, tol, threads)
    with _ops_lock:
        cached = _ops.get(key) if key is not None else None
        if cached is not None:
            return cached
        compiled = attnc.compile(
            source_or_path, kernel=kernel, shapes=shapes, approx=approx, tol=tol, threads=threads
        )
        wrapped = KernelOp(compiled, _define(compiled))
        if key is not None:
            _ops[key] = wrapped
        return wrapped


def _cache_key(source_or_path, kernel, shapes, approx, tol, threads) -> Optional[Tuple[Any, ...]]:
    if isinstance(source_or_path, (str, bytes)) and (
        isinstance(source_or_path, bytes) or "{" in source_or_path or "\n" in source_or_path
    ):
        source: Any = ("text", source_or_path)
    else:
        try:
            path = os.path.abspath(os.fspath(source_or_path))
            stat = os.stat(path)
        except (OSError, TypeError):
            return None  # attnc.compile says what is wrong
        source = ("file", path, stat.st_mtime_ns, stat.st_size)
    try:
        shapes_key = tuple(sorted(dict(shapes).items())) if shapes is not None else None
        approx_key = approx if approx is None or isinstance(approx, str) else tuple(approx)
        key = (source, kernel, shapes_key, approx_key, tol, threads)
        hash(key)
    except TypeError:
        return None
    return key


def _define(compiled: attnc.Kernel) -> Tuple[Any, Any]:
    """Registers ``compiled`` as a custom op with its fake and autograd implementations, and
    its training op (the same result and the saved log-sum-exps); returns both. A kernel
    returning several values gets an op returning a tuple, and no training op."""
    if len(compiled.return_dtypes) > 1:
        return _define_several(compiled), None
    params = compiled.params
    names = [_schema_name(name, i) for i, (name, _, _) in enumerate(params)]
    schema = "(" + ", ".join(f"Tensor {n}" for n in names) + ") -> Tensor"
    qualname = f"attnc::{_op_name(compiled.name)}_{next(_serial)}"

    def forward(*tensors: torch.Tensor) -> torch.Tensor:
        arrays, bits = _converted(params, tensors)
        result = torch.from_numpy(compiled._run(arrays, bits))
        dtype = _result_dtype(compiled, tensors)
        return result if result.dtype == dtype else result.to(dtype)

    op = torch.library.custom_op(qualname, forward, mutates_args=(), schema=schema)

    def fake(*tensors: torch.Tensor) -> torch.Tensor:
        _check_fake_inputs(params, tensors)
        sizes = [tuple(t.shape) for t in tensors]
        if all(isinstance(s, int) for shape in sizes for s in shape):
            out_shape = compiled.output_shape([list(s) for s in sizes])
        else:
            out_shape = _symbolic_output_shape(compiled, tensors)
        return tensors[0].new_empty(out_shape, dtype=_result_dtype(compiled, tensors))

    op.register_fake(fake)
    grad_op = _define_grad(compiled, names, qualname)

    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Any) -> None:
        ctx.save_for_backward(*inputs)

    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        inputs = ctx.saved_tensors
        wanted = [bool(w) for w in ctx.needs_input_grad[: len(inputs)]]
        if not any(wanted):
            return tuple(None for _ in inputs)
        grads = iter(grad_op(*inputs, grad, wanted))
        return tuple(next(grads) if w else None for w in wanted)

    op.register_autograd(backward, setup_context=setup_context)
    return op, _define_train(compiled, names, qualname, fake, grad_op)


def _define_train(
    compiled: attnc.Kernel, names: Sequence[str], qualname: str, fake_forward: Any, grad_op: Any
) -> Any:
    """Registers the training op of ``qualname``: the result and the row log-sum-exps of its
    fused attention (float32, the result's shape without its last axis; NaN where the kernel
    keeps none), with an autograd formula whose backward starts from them."""
    params = compiled.params
    schema = "(" + ", ".join(f"Tensor {n}" for n in names) + ") -> (Tensor, Tensor)"

    def forward(*tensors: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        arrays, bits = _converted(params, tensors)
        out, lse = compiled._forward_saving(arrays, bits)
        result = torch.from_numpy(out)
        dtype = _result_dtype(compiled, tensors)
        if result.dtype != dtype:
            result = result.to(dtype)
        if lse is None or dtype != torch.float32:
            # Nothing kept (or a rounded result): the backward recomputes the forward.
            return result, torch.full(result.shape[:-1], float("nan"))
        return result, torch.from_numpy(lse)

    train = torch.library.custom_op(qualname + "_train", forward, mutates_args=(), schema=schema)

    def fake(*tensors: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        out = fake_forward(*tensors)
        return out, out.new_empty(out.shape[:-1], dtype=torch.float32)

    train.register_fake(fake)
    saved_grad_op = _define_saved_grad(compiled, names, qualname)

    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Any) -> None:
        ctx.save_for_backward(*inputs, *output)

    def backward(ctx: Any, grad: torch.Tensor, _grad_lse: Any) -> Any:
        *inputs, out, lse = ctx.saved_tensors
        wanted = [bool(w) for w in ctx.needs_input_grad[: len(inputs)]]
        if not any(wanted):
            return tuple(None for _ in inputs)
        grads = iter(saved_grad_op(*inputs, out, lse, grad, wanted))
        return tuple(next(grads) if w else None for w in wanted)

    train.register_autograd(backward, setup_context=setup_context)
    return train


def _define_saved_grad(compiled: attnc.Kernel, names: Sequence[str], qualname: str) -> Any:
    """Registers the backward of the training op of ``qualname`` as a custom op: the inputs,
    the saved result and log-sum-exps, the output's gradient and ``wrt`` in, those gradients
    out. It starts from the saved forward where the training op kept one (float32, no NaN in
    the log-sum-exps), else recomputes it."""
    params = compiled.params
    schema = (
        "("
        + ", ".join(f"Tensor {n}" for n in names)
        + ", Tensor out, Tensor lse, Tensor grad, bool[] wrt) -> Tensor[]"
    )

    def backward(*args: Any) -> list:
        *tensors, out, lse, grad, wrt = args
        arrays, bits = _converted(params, tensors)
        cotangent, cotangent_bf16 = from_torch(grad, "cotangent")
        chosen = [name for w, (name, _, _) in zip(wrt, params) if w]
        if out.dtype == torch.float32 and not bool(torch.isnan(lse).any()):
            saved_out = out.detach().contiguous().numpy()
            saved_lse = lse.detach().contiguous().numpy()
            results = compiled._grad_saved(
                arrays, bits, saved_out, saved_lse, cotangent, cotangent_bf16, chosen
            )
        else:
            results = compiled._grad(arrays, bits, cotangent, cotangent_bf16, chosen)
        return _in_input_dtypes(results, wrt, tensors)

    op = torch.library.custom_op(qualname + "_grad_saved", backward, mutates_args=(), schema=schema)

    def fake(*args: Any) -> list:
        *tensors, _out, _lse, _grad, wrt = args
        return [t.new_empty(t.shape) for w, t in zip(wrt, tensors) if w]

    op.register_fake(fake)
    return op


def _in_input_dtypes(results: Sequence[Any], wrt: Sequence[bool], tensors: Sequence[torch.Tensor]) -> list:
    """The gradient arrays ``results`` (one per input ``wrt`` selects, in order) as tensors of
    their inputs' dtypes."""
    out = []
    for result, tensor in zip(results, (t for w, t in zip(wrt, tensors) if w)):
        g = torch.from_numpy(result)
        out.append(g if g.dtype == tensor.dtype else g.to(tensor.dtype))
    return out


def _converted(params: Sequence[Any], tensors: Sequence[torch.Tensor]) -> Tuple[list, list]:
    """The tensors as the arrays ``attnc.Kernel._run`` takes, and which hold bfloat16 bits."""
    arrays, bits = [], []
    for tensor, (name, _, _) in zip(tensors, params):
        array, is_bf16 = from_torch(tensor, name)
        arrays.append(array)
        bits.append(is_bf16)
    return arrays, bits


def _define_grad(compiled: attnc.Kernel, names: Sequence[str], qualname: str) -> Any:
    """Registers the backward of ``qualname`` as a custom op: the inputs, the output's
    gradient and which inputs to differentiate (``wrt``) in, those gradients out, in order."""
    params = compiled.params
    schema = (
        "(" + ", ".join(f"Tensor {n}" for n in names) + ", Tensor grad, bool[] wrt) -> Tensor[]"
    )

    def backward(*args: Any) -> list:
        *tensors, grad, wrt = args
        arrays, bits = _converted(params, tensors)
        cotangent, cotangent_bf16 = from_torch(grad, "cotangent")
        chosen = [name for w, (name, _, _) in zip(wrt, params) if w]
        results = compiled._grad(arrays, bits, cotangent, cotangent_bf16, chosen)
        return _in_input_dtypes(results, wrt, tensors)

    grad_op = torch.library.custom_op(qualname + "_grad", backward, mutates_args=(), schema=schema)

    def fake(*args: Any) -> list:
        *tensors, _grad, wrt = args
        return [t.new_empty(t.shape) for w, t in zip(wrt, tensors) if w]

    grad_op.register_fake(fake)
    return grad_op


def _define_several(compiled: attnc.Kernel) -> Any:
    """The op of a kernel returning several values: a tuple of tensors, each of its declared
    dtype (promoted from the inputs where that is f32, as for one result), with a fake
    implementation and an autograd formula whose backward takes one gradient per result
    (zeros where a result was not used) and runs attnc's compiled gradients of all of them at
    once (:meth:`attnc.Kernel.grad` with a tuple of cotangents). The backward recomputes the
    forward."""
    params = compiled.params
    count = len(compiled.return_dtypes)
    names = [_schema_name(name, i) for i, (name, _, _) in enumerate(params)]
    schema = (
        "(" + ", ".join(f"Tensor {n}" for n in names) + ") -> (" + ", ".join(["Tensor"] * count) + ")"
    )
    qualname = f"attnc::{_op_name(compiled.name)}_{next(_serial)}"

    def forward(*tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        arrays, bits = _converted(params, tensors)
        results = compiled._run(arrays, bits)
        out = []
        for k, array in enumerate(results):
            result = torch.from_numpy(array)
            dtype = _result_dtype(compiled, tensors, k)
            out.append(result if result.dtype == dtype else result.to(dtype))
        return tuple(out)

    op = torch.library.custom_op(qualname, forward, mutates_args=(), schema=schema)

    def fake(*tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        _check_fake_inputs(params, tensors)
        sizes = [tuple(t.shape) for t in tensors]
        if all(isinstance(s, int) for shape in sizes for s in shape):
            shapes = compiled.output_shapes([list(s) for s in sizes])
        else:
            shapes = [_symbolic_output_shape(compiled, tensors, k) for k in range(count)]
        return tuple(
            tensors[0].new_empty(shape, dtype=_result_dtype(compiled, tensors, k))
            for k, shape in enumerate(shapes)
        )

    op.register_fake(fake)
    grad_schema = (
        "(" + ", ".join(f"Tensor {n}" for n in names) + ", Tensor[] grads, bool[] wrt) -> Tensor[]"
    )

    def gradients(*args: Any) -> list:
        *tensors, grads, wrt = args
        arrays, bits = _converted(params, tensors)
        cotangents = tuple(
            g.detach().to(torch.float32).contiguous().numpy() for g in grads
        )
        chosen = [name for w, (name, _, _) in zip(wrt, params) if w]
        results = compiled._grad(arrays, bits, cotangents, False, chosen)
        return _in_input_dtypes(results, wrt, tensors)

    grad_op = torch.library.custom_op(
        qualname + "_grad", gradients, mutates_args=(), schema=grad_schema
    )

    def grad_fake(*args: Any) -> list:
        *tensors, _grads, wrt = args
        return [t.new_empty(t.shape) for w, t in zip(wrt, tensors) if w]

    grad_op.register_fake(grad_fake)

    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Any) -> None:
        ctx.save_for_backward(*inputs)

    def backward(ctx: Any, *grads: Optional[torch.Tensor]) -> Any:
        inputs = ctx.saved_tensors
        wanted = [bool(w) for w in ctx.needs_input_grad[: len(inputs)]]
        if not any(wanted):
            return tuple(None for _ in inputs)
        shapes = compiled.output_shapes([list(t.shape) for t in inputs])
        cotangents = [
            g if g is not None else torch.zeros(shape, dtype=torch.float32)
            for g, shape in zip(grads, shapes)
        ]
        results = iter(grad_op(*inputs, cotangents, wanted))
        return tuple(next(results) if w else None for w in wanted)

    op.register_autograd(backward, setup_context=setup_context)
    return op


def _check_fake_inputs(params: Sequence[Any], tensors: Sequence[torch.Tensor]) -> None:
    """The device and rank checks of the fake implementations."""
    first = tensors[0].device if tensors else None
    for tensor, (name, _, shape) in zip(tensors, params):
        if tensor.device.type not in ("cpu", "meta") or tensor.device != first:
            raise InputError(
                f"input `{name}` is on {tensor.device} (input `{params[0][0]}` on {first}); "
                "attnc runs on the CPU",
                input=name,
            )
        if tensor.dim() != len(shape):
            raise ShapeError(
                f"input `{name}` has rank {tensor.dim()} but is declared "
                f"[{', '.join(map(str, shape))}] with rank {len(shape)}",
                input=name,
            )


def _symbolic_output_shape(
    compiled: attnc.Kernel, tensors: Sequence[torch.Tensor], output: int = 0
) -> list:
    shape = []
    for dim in compiled.output_dims(output):
        if dim[0] in ("const", "given"):
            shape.append(dim[1])
        elif dim[0] == "input":
            shape.append(tensors[dim[1]].shape[dim[2]])
        else:
            raise ShapeError(
                f"dimension `{dim[1]}` of the result is not bound: pass shapes={{'{dim[1]}': ...}}",
                dimension=dim[1],
            )
    return shape


def _result_dtype(
    compiled: attnc.Kernel, tensors: Sequence[torch.Tensor], output: int = 0
) -> torch.dtype:
    declared = _DECLARED.get(compiled.return_dtypes[output])
    if declared is not None:
        return declared
    dtype = torch.float32
    floats = [t.dtype for t in tensors if t.is_floating_point()]
    if floats:
        dtype = floats[0]
        for other in floats[1:]:
            dtype = torch.promote_types(dtype, other)
    return dtype


def _positional(
    compiled: attnc.Kernel,
    names: Sequence[str],
    args: Sequence[Any],
    kwargs: Dict[str, Any],
) -> list:
    if len(args) > len(names):
        raise InputError(
            f"kernel `{compiled.name}` takes {len(names)} inputs ({', '.join(names)}) "
            f"but {len(args)} were given"
        )
    slots: list = list(args) + [None] * (len(names) - len(args))
    for key, value in kwargs.items():
        if key not in names:
            raise InputError(
                f"kernel `{compiled.name}` has no parameter `{key}` (parameters: "
                f"{', '.join(names)})",
                input=key,
            )
        index = names.index(key)
        if index < len(args):
            raise InputError(f"input `{key}` is given twice (by position and by name)", input=key)
        slots[index] = value
    for name, value in zip(names, slots):
        if value is None:
            raise InputError(f"input `{name}` of kernel `{compiled.name}` is missing", input=name)
    return slots


_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _schema_name(name: str, index: int) -> str:
    if _IDENT.match(name) and not keyword.iskeyword(name) and name not in ("self", "out"):
        return name
    return f"arg{index}"


def _op_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return cleaned if _IDENT.match(cleaned) else f"kernel_{cleaned}"
