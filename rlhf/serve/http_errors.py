"""The 413 answer both route modules give: the public and labeler routes (``api.py``) for a text or
a PDF, the admin routes (``admin.py``, which ``api.py`` includes) for an upload. It lives here so
neither module imports the other for it."""

from fastapi import HTTPException


def too_large(field: str, size: int, limit: int) -> HTTPException:
    """413 naming the field, its size and the limit, and what to send instead."""
    return HTTPException(413, f"{field}: {size} bytes is over the {limit}-byte limit; send a shorter "
                              "text (or one section of the document at a time)")
