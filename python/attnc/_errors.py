"""The exceptions attnc raises.

Every error is an :class:`AttncError`. Problems with what the caller passed are also
``ValueError``s (:class:`CompileError`, :class:`InputError` and its :class:`ShapeError`);
failures of a right call are ``RuntimeError``s (:class:`RunError`); a gradient attnc does not
derive is a ``NotImplementedError`` (:class:`GradientUnavailableError`).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

__all__ = [
    "AttncError",
    "CompileError",
    "InputError",
    "ShapeError",
    "RunError",
    "GradientUnavailableError",
]


def _rebuild(cls: type, args: tuple, state: Dict[str, Any]) -> "AttncError":
    error = cls.__new__(cls, *args)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class AttncError(Exception):
    """Base class of every attnc error."""

    def __reduce__(self):  # keyword attributes survive pickling (multiprocessing, DDP workers)
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


class CompileError(AttncError, ValueError):
    """The program does not parse or type-check.

    ``str(error)`` is the rendered diagnostics (file:line:column, the source line, a caret);
    ``message``, ``line`` and ``column`` are those of the first diagnostic (1-based, columns
    counted in characters); ``diagnostics`` lists every diagnostic as a dict (``message``,
    ``file``, ``line``, ``column``, ``labels``, ``notes``, ``severity``).
    """

    def __init__(
        self,
        rendered: str,
        *,
        message: str = "",
        file: str = "<string>",
        line: Optional[int] = None,
        column: Optional[int] = None,
        diagnostics: Optional[List[Dict[str, Any]]] = None,
    ) -> None:
        super().__init__(rendered)
        self.rendered = rendered
        self.message = message
        self.file = file
        self.line = line
        self.column = column
        self.diagnostics = list(diagnostics or [])


class InputError(AttncError, ValueError):
    """An argument is wrong: an input's type, layout or device, a missing or unknown input, a
    bad option. ``input`` names the input at fault (or is ``None``); ``dimension`` is the
    dimension symbol and ``axis`` the axis at fault where there is one."""

    def __init__(
        self,
        message: str,
        *,
        input: Optional[str] = None,
        dimension: Optional[str] = None,
        axis: Optional[int] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.input = input
        self.dimension = dimension
        self.axis = axis


class ShapeError(InputError):
    """The inputs' shapes do not fit the kernel's declared shapes or each other (a rank, a
    literal size, a dimension two inputs give different sizes, a dimension nothing binds)."""


class RunError(AttncError, RuntimeError):
    """Compiling or running failed although the call was right (a plan larger than the memory
    available, code generation unsupported on this CPU)."""


class GradientUnavailableError(AttncError, NotImplementedError):
    """A gradient was asked of a kernel holding an op whose gradient attnc does not derive
    (from :meth:`Kernel.grad` or from autograd's ``backward()`` through ``attnc.torch``)."""


for _class in (AttncError, CompileError, InputError, ShapeError, RunError, GradientUnavailableError):
    _class.__module__ = "attnc"  # shown as attnc.InputError, pickled by that name
