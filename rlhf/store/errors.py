"""What callers of the feedback store can get wrong; each error names the field and the fix.

All are :class:`rlhf.errors.InputError`, so jobs print them as one line and the web API can map
them to HTTP 4xx answers by class (not found -> 404, already decided -> 409, invalid -> 422).
"""

from __future__ import annotations

from rlhf.errors import InputError


class StoreInputError(InputError):
    """Base of the store's input errors; ``field`` is the argument or config key at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFoundError(StoreInputError):
    """An id that the database does not hold."""


class InvalidFeedbackError(StoreInputError):
    """A value the database must not store (a choice other than 0/1, an empty summary...)."""


class AlreadyDecidedError(StoreInputError):
    """A second, different choice for a comparison that already has one."""
