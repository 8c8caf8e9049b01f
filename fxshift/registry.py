"""The one "register into a table" decorator that the rule registries share."""
from __future__ import annotations

from typing import Any, Callable, MutableMapping, TypeVar

T = TypeVar("T")


def register_into(table: MutableMapping[Any, Any]) -> Callable[[Any], Callable[[T], T]]:
    """``register_into(RULES)(key)`` is a decorator that stores what it decorates as ``RULES[key]``
    and returns it unchanged."""

    def for_key(key: Any) -> Callable[[T], T]:
        def register(value: T) -> T:
            table[key] = value
            return value

        return register

    return for_key
