"""The one base class of the trainer's user errors (bad config, data, model files, cache, eval input)."""


class UserError(ValueError):
    """A mistake in what the user gave: reported as one ``error: ...`` line and exit status 2, no traceback."""


class ModelFileError(UserError):
    """Missing or unusable model files; the message is one line."""
