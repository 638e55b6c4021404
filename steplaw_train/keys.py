"""Unknown-key checks for every config section: one message, naming the valid keys.

A misspelt key (`launcher.partiton=gpu`) silently ignored is the costliest config bug there is:
the sweep runs, on the wrong partition, for days. Every section that is read from YAML or the
command line (spec sections, options, resources, grid blocks, the search and launcher sections)
goes through `check_keys`, so they all refuse the same way, submitit style: the unknown key first,
then the keys that would have been accepted.
"""

from __future__ import annotations

from collections.abc import Iterable

from steplaw_train.errors import SpecError


def unknown_keys_message(given: Iterable[str], valid: Iterable[str]) -> str | None:
    """None when every key of `given` is valid, else "unknown key 'x'; allowed keys: [...]"."""
    valid = sorted(set(valid))
    unknown = sorted(set(given) - set(valid))
    if not unknown:
        return None
    more = f" (and {unknown[1:]})" if len(unknown) > 1 else ""
    return f"unknown key {unknown[0]!r}{more}; allowed keys: {valid}"


def check_keys(given: Iterable[str], valid: Iterable[str], section: str) -> None:
    """Raise SpecError(`section.<first unknown key>`, message) when a key is not valid."""
    given = list(given)
    message = unknown_keys_message(given, valid)
    if message is not None:
        first = sorted(set(given) - set(valid))[0]
        raise SpecError(f"{section}.{first}" if section else first, message)
