"""Core: the error types every surface shows to the user."""

from __future__ import annotations


class SdtrainError(Exception):
    """Base class: a problem the user can fix, with a message that says what and where."""


class ConfigError(SdtrainError):
    """A job configuration field is invalid. `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class FormatError(SdtrainError):
    """A file could not be read as what it claims to be. `path` names it."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = str(path)
        self.message = message


class DatasetError(SdtrainError):
    """The training data cannot be used (missing/empty folder, unusable template...)."""
