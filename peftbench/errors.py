"""One error type for bad user input: printed as a single line, before any training starts."""

from __future__ import annotations

from collections.abc import Iterable


class ConfigError(ValueError):
    """A bad configuration value. The message names the bad value and what is accepted."""


def bad_value(what: str, value: object, accepted: Iterable[object] | str) -> ConfigError:
    """Build a one-line error: `<what>=<value!r> is not valid; accepted: <accepted>`."""
    if not isinstance(accepted, str):
        accepted = ", ".join(str(a) for a in accepted)
    return ConfigError(f"{what}={value!r} is not valid; accepted: {accepted}")


def is_int(value: object) -> bool:
    """An integer that is not a bool (YAML's `true` is an int to Python, never a count to peftbench)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An int or a float that is not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_int(what: str, value: object, minimum: int = 1, accepted: str | None = None) -> int:
    """`value` if it is an integer >= `minimum`, else `bad_value(what, value, accepted)` (default: "an integer
    >= <minimum>")."""
    if not is_int(value) or value < minimum:  # type: ignore[operator]
        raise bad_value(what, value, accepted or f"an integer >= {minimum}")
    return value  # type: ignore[return-value]
