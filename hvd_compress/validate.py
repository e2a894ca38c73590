"""Arguments checked against the constructors' own type hints, once, for every method.

A compressor's settings decide the bytes on the wire and the collectives every rank starts, so a
wrong type must fail where it was written, with the argument's name, not at the first step:
``qsgd:bits=4.0`` would otherwise reach ``torch.empty`` as a float, ``error_feedback='no'`` would
be truthy, ``seed=1.5`` would be truncated.  :func:`checked` wraps an ``__init__`` so that every
bound argument matches its annotation:

* ``int``: an int (not a bool), or a float with an integral value (converted: ``4.0`` -> ``4``);
* ``float``: an int or a float (not a bool); ``bool``: ``True`` or ``False`` only;
* ``str``, classes (``torch.dtype``, ``Link``): an instance; ``X | None``: ``None`` too;
* unions try each member, exact matches before conversions.
"""
from __future__ import annotations

import functools
import inspect
import types
import typing
from typing import Any, Callable

_UNCHECKED = object()


def _convert(value: Any, hint: Any) -> Any:
    """``value`` as ``hint`` wants it, or :data:`_UNCHECKED` when it does not fit."""
    if hint is Any or hint is inspect.Parameter.empty:
        return value
    if hint is None or hint is type(None):
        return value if value is None else _UNCHECKED
    if hint is bool:
        return value if isinstance(value, bool) else _UNCHECKED
    if hint is int:
        if isinstance(value, bool):
            return _UNCHECKED
        if isinstance(value, int):
            return value
        return int(value) if isinstance(value, float) and value.is_integer() else _UNCHECKED
    if hint is float:
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else _UNCHECKED
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(hint)
        for member in members:          # exact matches first: 4.0 for float | int stays 4.0
            if isinstance(member, type) and type(value) is member:
                return value
        for member in members:
            converted = _convert(value, member)
            if converted is not _UNCHECKED:
                return converted
        return _UNCHECKED
    if origin is not None:              # dict[...], list[...]: the container's type only
        hint = origin
    if isinstance(hint, type):
        return value if isinstance(value, hint) else _UNCHECKED
    return value                        # anything else (a TypeVar, a Protocol) is not checked


def describe(hint: Any) -> str:
    """An annotation in words: ``int | None`` -> ``an integer or None``."""
    words = {bool: "True or False", int: "an integer", float: "a number", str: "a string",
             type(None): "None", None: "None"}
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(describe(m) for m in typing.get_args(hint))
    return words.get(hint, getattr(hint, "__name__", str(hint)))


def checked(init: Callable) -> Callable:
    """Wrap ``init`` (an ``__init__``) so that its arguments are checked and converted against
    its annotations; a mismatch raises ``ValueError`` naming the class and the argument."""
    signature = inspect.signature(init)
    hints: dict[str, Any] | None = None

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        nonlocal hints
        if hints is None:      # resolved on first use: the annotations are strings until then
            hints = typing.get_type_hints(init)
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{type(self).__name__}: {e}") from None
        for name, value in list(bound.arguments.items())[1:]:
            hint = hints.get(name)
            if hint is None or signature.parameters[name].kind in (inspect.Parameter.VAR_POSITIONAL,
                                                                  inspect.Parameter.VAR_KEYWORD):
                continue
            converted = _convert(value, hint)
            if converted is _UNCHECKED:
                raise ValueError(f"{type(self).__name__}: {name} must be {describe(hint)}, got {value!r}")
            bound.arguments[name] = converted
        return init(*bound.args, **bound.kwargs)

    wrapper.__checked__ = True
    return wrapper
