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
