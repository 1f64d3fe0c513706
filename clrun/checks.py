"""Value checks: one spelling for "what is allowed" and one error message for everything
that checks a value (config validation, strategies, buffers, schedules, unlearning).

A :class:`Rule` pairs a predicate with the text that says what it allows. Rules are built by
small factories (:func:`int_at_least`, :func:`number_above`, :func:`number_in`, :func:`one_of`,
:func:`optional`, ...) and applied with :func:`require`, which raises

    ``{key}={value!r} is not allowed: expected {allowed}``

so every message names the key, the value and what would have been accepted, in the same words
whether it comes from ``clrun/config.py``'s ``RULES`` or from a component's constructor. Booleans
are never numbers here (``True`` is not the integer 1), and NaN and ±inf are not finite numbers.
A user's own component may use these too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

T = TypeVar("T")


class Rule(NamedTuple):
    """A predicate on a value and the text that says which values it allows (unpacks as
    ``check, allowed``)."""

    check: Callable[[Any], bool]
    allowed: str


def is_int(v: Any) -> bool:
    """An integer, and not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite int or float, and not a bool."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def int_at_least(lo: int) -> Rule:
    return Rule(lambda v: is_int(v) and v >= lo, f"an integer ≥ {lo}")


def number_above(lo: float = 0) -> Rule:
    return Rule(lambda v: is_number(v) and v > lo, f"a finite number > {lo}")


def number_at_least(lo: float = 0) -> Rule:
    return Rule(lambda v: is_number(v) and v >= lo, f"a finite number ≥ {lo}")


def number_in(lo: float, hi: float, *, open_lo: bool = False, open_hi: bool = False) -> Rule:
    """A finite number in the interval from ``lo`` to ``hi``, each end closed unless open."""

    def check(v: Any) -> bool:
        if not is_number(v):
            return False
        above = v > lo if open_lo else v >= lo
        below = v < hi if open_hi else v <= hi
        return above and below

    return Rule(check, f"a number in {'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}")


def probability() -> Rule:
    """A number in [0, 1]."""
    return number_in(0, 1)


def probability_below_one() -> Rule:
    """A number in [0, 1): rates such as dropout or momentum, where 1 would never decay."""
    return number_in(0, 1, open_hi=True)


def one_of(choices: Sequence[Any]) -> Rule:
    options = tuple(choices)
    return Rule(lambda v: v in options, "one of " + " | ".join(map(str, options)))


def boolean() -> Rule:
    return Rule(lambda v: isinstance(v, bool), "true or false")


def optional(rule: Rule, null: str = "null") -> Rule:
    """``rule``, or None; ``null`` says what None means (e.g. ``"null (= all)"``)."""
    return Rule(lambda v: v is None or rule.check(v), f"{null} or {rule.allowed}")


def not_allowed(key: str, value: Any, allowed: str) -> str:
    """The message every failed check gives."""
    return f"{key}={value!r} is not allowed: expected {allowed}"


def require(key: str, value: T, rule: Rule, error: type[Exception] = ValueError) -> T:
    """``value`` itself if ``rule`` allows it; else raise ``error`` (ValueError unless given)
    with the message of :func:`not_allowed`. ``key`` names the value as the user set it."""
    if not rule.check(value):
        raise error(not_allowed(key, value, rule.allowed))
    return value
