"""The harness's one error type for bad input (re-exported by spec.py, where it is used most).

It lives apart from spec.py so that the small helpers every config section uses (keys.py) can
raise it without importing the specs.
"""

from __future__ import annotations


class SpecError(ValueError):
    """A spec field has a value the harness cannot run; the message names the field."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
