"""Conversions of what callers pass into arrays the native module reads.

NumPy float32 and float16 arrays never come here: the native module reads them directly
(in place when C-contiguous and aligned). Everything else does, and leaves as
``(array, is_bf16)``: a float32/float16 NumPy array, or a ``uint16`` array of bfloat16 bit
patterns with ``is_bf16`` true.

- torch tensors: on the CPU, strided, floating point; float32/float16 are viewed in place
  (``Tensor.numpy``), bfloat16 is viewed as its 16-bit patterns, float64 is rounded to
  float32. A tensor whose storage is smaller than its shape and strides need (storage freed or
  resized, as FSDP does to parameters) is refused: reading it would read freed memory.
- NumPy arrays of another float type: ``ml_dtypes`` bfloat16 viewed as bits, float64 and
  non-native byte orders converted; integer, bool, complex and object arrays are refused.
- objects with ``__dlpack__``: through ``numpy.from_dlpack``, or through torch for bfloat16
  (NumPy has no bfloat16 type).
- anything else NumPy can turn into an array (lists, scalars, ``__array__``).
"""

from __future__ import annotations

import sys
from typing import Any, Tuple

import numpy as np

from ._errors import InputError

_TYPES = "float32, float16 or bfloat16"


def coerce(obj: Any, name: str) -> Tuple[np.ndarray, bool]:
    """``obj`` (the argument for input ``name``) as ``(array, is_bf16)``."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return from_torch(obj, name)
    if isinstance(obj, np.ndarray):
        return _from_numpy(obj, name)
    if hasattr(obj, "__dlpack__"):
        return _from_dlpack(obj, name)
    if isinstance(obj, (str, bytes, dict, set)) or obj is None:
        raise InputError(
            f"input `{name}`: expected a NumPy array or a torch tensor, got {type(obj).__name__}",
            input=name,
        )
    try:
        array = np.asarray(obj)
    except Exception as error:  # NumPy says why; attnc says which input
        raise InputError(
            f"input `{name}`: cannot make an array of {type(obj).__name__}: {error}", input=name
        ) from error
    return _from_numpy(array, name)


def _from_numpy(array: np.ndarray, name: str) -> Tuple[np.ndarray, bool]:
    dtype = array.dtype
    if dtype.name == "bfloat16" and dtype.itemsize == 2:  # ml_dtypes' type
        return array.view(np.uint16), True
    if dtype.kind == "f":
        target = np.float16 if dtype.itemsize == 2 else np.float32
        return array.astype(target), False  # a copy: another width or byte order
    raise InputError(
        f"input `{name}`: dtype {dtype} is not a floating-point type (attnc takes {_TYPES} data)",
        input=name,
    )


def _from_dlpack(obj: Any, name: str) -> Tuple[np.ndarray, bool]:
    try:
        return _from_numpy(np.from_dlpack(obj), name)
    except InputError:
        raise
    except Exception as error:
        # NumPy has no bfloat16; torch reads every DLPack float type.
        try:
            import torch
        except ImportError:
            raise InputError(
                f"input `{name}`: NumPy cannot read this DLPack tensor ({error}); "
                "bfloat16 DLPack tensors need torch installed",
                input=name,
            ) from error
        try:
            tensor = torch.from_dlpack(obj)
        except Exception as torch_error:
            raise InputError(
                f"input `{name}`: cannot read the DLPack tensor: {torch_error}", input=name
            ) from torch_error
        return from_torch(tensor, name)


def from_torch(tensor: Any, name: str) -> Tuple[np.ndarray, bool]:
    """A CPU torch tensor as ``(array, is_bf16)``, in place where its layout allows."""
    import torch

    if not tensor.is_cpu:
        raise InputError(
            f"input `{name}` is on {tensor.device}; attnc runs on the CPU (move it with .cpu())",
            input=name,
        )
    if tensor.layout != torch.strided:
        raise InputError(
            f"input `{name}` has layout {tensor.layout}; attnc takes dense (strided) tensors",
            input=name,
        )
    dtype = tensor.dtype
    if not dtype.is_floating_point:
        raise InputError(
            f"input `{name}`: dtype {dtype} is not a floating-point type "
            f"(attnc takes {_TYPES} data)",
            input=name,
        )
    if tensor.requires_grad:
        tensor = tensor.detach()
    if tensor.is_neg():
        tensor = tensor.resolve_neg()
    check_storage(tensor, name)
    if dtype == torch.bfloat16:
        bits = tensor.contiguous().view(torch.int16).numpy().view(np.uint16)
        return bits, True
    if dtype != torch.float32 and dtype != torch.float16:
        tensor = tensor.to(torch.float32)
    return tensor.numpy(), False


def check_storage(tensor: Any, name: str) -> None:
    """Refuses a tensor whose storage does not hold every element its shape and strides reach
    (a freed or shrunk storage: ``untyped_storage().resize_(0)``)."""
    count = tensor.numel()
    if count == 0:
        return
    if tensor.is_contiguous():
        last = tensor.storage_offset() + count - 1
    else:
        strides = tensor.stride()
        if any(stride < 0 for stride in strides):
            raise InputError(f"input `{name}` has a negative stride", input=name)
        last = tensor.storage_offset() + sum(
            (size - 1) * stride for size, stride in zip(tensor.shape, strides)
        )
    needed = (last + 1) * tensor.element_size()
    held = tensor.untyped_storage().nbytes()
    if held < needed:
        raise InputError(
            f"input `{name}`: its storage holds {held} bytes but its shape {tuple(tensor.shape)} "
            f"needs {needed} (was the storage freed or resized?)",
            input=name,
        )
