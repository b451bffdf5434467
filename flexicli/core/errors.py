"""Typed errors. Library code raises these; the CLI turns each into one line and an exit code."""


class FlexiError(Exception):
    """Base class. `exit_code` is what the CLI exits with; `hint` is the next step for the user."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def line(self) -> str:
        msg = str(self)
        return f"{msg} ({self.hint})" if self.hint else msg


class BadInput(FlexiError):
    """The user gave something we cannot use: a missing model, a wrong folder, a bad flag value."""

    exit_code = 2


class UnsupportedModel(BadInput):
    """The model is not a decoder we know how to wrap."""


class CheckpointError(BadInput):
    """A checkpoint folder is missing, incomplete, corrupted or does not match its base model."""


class Failure(FlexiError):
    """Something went wrong while doing the work (not the user's input)."""

    exit_code = 1
