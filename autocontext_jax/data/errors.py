"""The error every data reader raises: a file is missing, unreadable or inconsistent."""


class DatasetError(ValueError):
    """A dataset file is missing, unreadable or inconsistent; the message names it."""
