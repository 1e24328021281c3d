"""User-facing errors.

Anything a user can fix (a missing file, a bad config value, a mismatched checkpoint) is raised as
:class:`SsmlmError`. Entry points catch it and print its message, never a traceback from inside torch.
"""


class SsmlmError(Exception):
    """An error the user can act on. The message names the file or config key and the fix."""


class DataError(SsmlmError):
    """Bad or missing data (files, encodings, sizes)."""


class ConfigError(SsmlmError):
    """A config value that cannot work."""


class CheckpointError(SsmlmError):
    """A checkpoint that does not match the run or cannot be read."""
