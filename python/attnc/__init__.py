"""attnc: compile attention written the way the math reads, and run it on NumPy arrays.

    >>> import attnc, numpy as np
    >>> k = attnc.compile('''
    ... kernel attend(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {
    ...     return softmax(mask(q @ k.T / sqrt(d), causal)) @ v;
    ... }''')
    >>> q = np.random.default_rng(0).standard_normal((2, 16, 8), dtype=np.float32)
    >>> k(q=q, k=q, v=q).shape
    (2, 16, 8)

``attnc.compile`` returns a :class:`Kernel`; calling it compiles machine code for the inputs'
shapes (once per shape) and runs it with the interpreter lock released. ``attnc.torch`` wraps a
kernel as a torch custom op. The language is specified in ``docs/language.md``.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Optional, Union

from ._attnc import Kernel, __version__
from ._attnc import _compile as _native_compile
from ._errors import (
    AttncError,
    CompileError,
    GradientUnavailableError,
    InputError,
    RunError,
    ShapeError,
)

__all__ = [
    "compile",
    "Kernel",
    "AttncError",
    "CompileError",
    "InputError",
    "ShapeError",
    "RunError",
    "GradientUnavailableError",
    "__version__",
]

Source = Union[str, bytes, "os.PathLike[str]"]


def compile(
    source_or_path: Source,
    kernel: Optional[str] = None,
    shapes: Optional[Mapping[str, int]] = None,
    approx: Union[None, str, Iterable[str]] = None,
    tol: Optional[float] = None,
    threads: Optional[int] = None,
) -> Kernel:
    """Parses and checks a kernel, ready to run on arrays.

    source_or_path: the program's text (a ``str`` holding ``{`` or a newline, or ``bytes``),
        or the path of a ``.attn`` file (any other ``str``, or an ``os.PathLike``).
    kernel: which kernel of the file (needed only when it has several).
    shapes: sizes of dimension symbols no input binds, e.g. ``{"n": 4096}``; a value that
        contradicts an input is a :class:`ShapeError` when the kernel is called.
    approx: the approximations allowed, overriding the kernel's ``@approx``: a list such as
        ``"int8"`` or ``["bf16", "lowrank(r=64)"]``; ``"exact"`` or ``[]`` allows none.
    tol: the largest relative L2 error an allowed approximation may have (default: the
        kernel's ``tol``, else 1e-2).
    threads: worker threads of each call (default: every core).

    Raises :class:`CompileError` (with ``line``, ``column``, ``message``) when the program is
    wrong and :class:`InputError` for a bad argument.
    """
    source: Optional[bytes] = None
    path: Optional[str] = None
    if isinstance(source_or_path, bytes):
        source = source_or_path
    elif isinstance(source_or_path, str) and ("{" in source_or_path or "\n" in source_or_path):
        source = source_or_path.encode("utf-8", errors="surrogatepass")
    elif isinstance(source_or_path, (str, os.PathLike)):
        path = os.fspath(source_or_path)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not os.path.exists(path):
            raise FileNotFoundError(2, "no such .attn file (source text holds `{`)", path)
        if os.path.isdir(path):
            raise IsADirectoryError(21, "a directory, not a .attn file", path)
        if not os.path.isfile(path):
            raise InputError(f"{path}: not a regular file (a device, pipe or socket), not a .attn file")
    else:
        raise InputError(
            "source_or_path: expected program text or a path, "
            f"got {type(source_or_path).__name__}"
        )
    return _native_compile(
        source=source,
        path=path,
        kernel=_optional_str("kernel", kernel),
        shapes=_shapes(shapes),
        approx=_approx(approx),
        tol=_tol(tol),
        threads=_threads(threads),
    )


def _rebuild(source, kernel, shapes, approx, tol, threads, file) -> Kernel:
    """Unpickles a :class:`Kernel`: the same program and options, compiled again."""
    return _native_compile(
        source=source.encode("utf-8"), kernel=kernel, shapes=shapes, approx=approx, tol=tol,
        threads=threads, file=file,
    )


def _optional_str(what: str, value: Any) -> Optional[str]:
    if value is None or isinstance(value, str):
        return value
    raise InputError(f"{what}: expected a name, got {type(value).__name__}")


def _is_int(value: Any) -> bool:
    return hasattr(value, "__index__") and not isinstance(value, bool)


def _shapes(shapes: Optional[Mapping[str, int]]) -> Optional[dict]:
    if shapes is None:
        return None
    if not hasattr(shapes, "items"):
        raise InputError(f"shapes: expected a dict such as {{'n': 4096}}, got {type(shapes).__name__}")
    out = {}
    for symbol, size in shapes.items():
        if not isinstance(symbol, str):
            raise InputError(f"shapes: dimension names are strings, got {symbol!r}")
        if not _is_int(size) or size.__index__() < 0 or size.__index__() >= 2**63:
            raise InputError(
                f"shapes: `{symbol}` must be a non-negative integer, got {size!r}",
                dimension=symbol,
            )
        out[symbol] = size.__index__()
    return out


def _approx(approx: Union[None, str, Iterable[str]]) -> Optional[str]:
    if approx is None:
        return None
    if isinstance(approx, str):
        return "exact" if approx.strip() in ("", "exact") else approx
    items = list(approx)
    if not all(isinstance(item, str) for item in items):
        raise InputError(f"approx: expected approximation names, got {items!r}")
    return ",".join(items) if items else "exact"


def _tol(tol: Optional[float]) -> Optional[float]:
    if tol is None:
        return None
    if isinstance(tol, bool) or not isinstance(tol, (int, float)):
        raise InputError(f"tol: expected a number, got {type(tol).__name__}")
    return float(tol)


def _threads(threads: Optional[int]) -> Optional[int]:
    if threads is None:
        return None
    if not _is_int(threads) or threads.__index__() < 1:
        raise InputError(f"threads: expected a positive integer, got {threads!r}")
    return min(threads.__index__(), 1 << 16)
