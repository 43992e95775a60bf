"""Errors caused by what the user gave us (config, files, data): jobs print them as one line."""


class InputError(ValueError):
    """Bad user input; the message names the field or file and how to fix it."""
