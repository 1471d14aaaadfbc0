"""Checks of JSON data against the form it must have: the one schema check of plan files and
save manifests.

:func:`tucker_fx.planning.plan.check_plan_data` checks a plan with these helpers;
``tucker_fx.io`` checks the rest of a manifest with them and the plan with that function.
Every failure is a :class:`SchemaError` (a ``ValueError``) whose message says where, what was
expected and what arrived.

>>> need(isinstance(3, str), "config.lowering", "a string", 3)
Traceback (most recent call last):
...
tucker_fx.planning.schema.SchemaError: config.lowering: expected a string, got int 3
>>> from typing import Optional
>>> conforms([2, 3], Optional[tuple[int, ...]]), conforms([True], tuple[int, ...])
(True, False)
"""

from __future__ import annotations

import re
import types
import typing
from typing import Any, Union

__all__ = [
    "SchemaError",
    "check_types",
    "conforms",
    "describe",
    "hint_text",
    "is_int",
    "need",
    "require_object",
]


class SchemaError(ValueError):
    """A JSON field of the wrong form; the message says where, what was expected, what arrived."""


def describe(value: Any) -> str:
    """Type and (shortened) repr of a value, for messages.

    >>> describe([1, 2])
    'list [1, 2]'
    """
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 80 else text[:77] + '...'}"


def need(ok: bool, where: str, expected: str, value: Any) -> None:
    """Raise ``SchemaError("<where>: expected <expected>, got <value>")`` unless ``ok``.

    >>> need(True, "x", "an int", 1)
    """
    if not ok:
        raise SchemaError(f"{where}: expected {expected}, got {describe(value)}")


def is_int(v: Any) -> bool:
    """An int that is not a bool (JSON's true/false load as bools).

    >>> is_int(3), is_int(True), is_int(3.0)
    (True, False, False)
    """
    return isinstance(v, int) and not isinstance(v, bool)


def require_object(value: Any, where: str, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """``value`` if it is a JSON object holding ``keys``, else a :class:`SchemaError`.

    >>> require_object({"a": 1}, "config", ("a", "b"))
    Traceback (most recent call last):
    ...
    tucker_fx.planning.schema.SchemaError: config: lacks the field(s) ['b']
    """
    need(isinstance(value, dict), where, "an object", value)
    missing = [k for k in keys if k not in value]
    if missing:
        raise SchemaError(f"{where}: lacks the field(s) {missing}")
    return value


def conforms(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a (simple) type hint: unions, None, bool, int, float, str,
    lists/tuples (JSON has lists only; lengths are not checked) and dicts of those.

    >>> conforms({"fft": 1.5}, dict[str, float]), conforms(None, int)
    (True, False)
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return is_int(value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(conforms(v, args[0] if args else Any) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(conforms(k, args[0]) and conforms(v, args[1])
                                               for k, v in value.items())
    return not isinstance(hint, type) or isinstance(value, hint)


def hint_text(hint: Any) -> str:
    """A type hint as a reader writes it.

    >>> from typing import Optional
    >>> hint_text(Optional[str]), hint_text(int)
    ('Optional[str]', 'int')
    """
    return re.sub(r"typing\.|<class '(\w+)'>", lambda m: m.group(1) or "", str(hint))


def check_types(data: dict[str, Any], hints: dict[str, Any], where: str) -> None:
    """Each field of ``data`` that ``hints`` names fits its hint, else a :class:`SchemaError`
    ``"<where>.<field>: expected <hint>, got <value>"``.

    >>> check_types({"a": 1, "b": "x"}, {"a": int, "b": int}, "entry")
    Traceback (most recent call last):
    ...
    tucker_fx.planning.schema.SchemaError: entry.b: expected int, got str 'x'
    """
    for key, value in data.items():
        if key in hints and not conforms(value, hints[key]):
            raise SchemaError(f"{where}.{key}: expected {hint_text(hints[key])}, got {describe(value)}")
