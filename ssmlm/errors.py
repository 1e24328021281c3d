"""User-facing errors, and the checks of config values where they are read.

Anything a user can fix (a missing file, a bad config value, a mismatched checkpoint, a full disk) is raised as
:class:`SsmlmError`. Entry points catch it and print its message, never a traceback from inside torch.
"""

from __future__ import annotations

import math
from typing import Any


class SsmlmError(Exception):
    """An error the user can act on. The message names the file or config key and the fix."""


class DataError(SsmlmError):
    """Bad or missing data (files, encodings, sizes)."""


class ConfigError(SsmlmError):
    """A config value that cannot work."""


class CheckpointError(SsmlmError):
    """A checkpoint that does not match the run or cannot be read."""


class RunDirError(SsmlmError):
    """The run directory cannot be used: held by another process, not writable, full, or another run's."""


class TrainingDiverged(SsmlmError):
    """The training loss stopped being a finite number."""


def number(key: str, value: Any, *, minimum: float | None = None, above: float | None = None,
           maximum: float | None = None, integer: bool = False, optional: bool = False) -> Any:
    """``value`` of config key ``key`` if it is a number in range, else a ConfigError naming key, value and range.

    ``minimum``/``maximum`` are inclusive bounds, ``above`` an exclusive lower one; ``optional`` allows null."""
    if value is None and optional:
        return None
    kind = "a whole number" if integer else "a number"
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    ok = ok and not isinstance(value, bool) and (integer or math.isfinite(value))
    if ok:
        ok = ((minimum is None or value >= minimum) and (above is None or value > above)
              and (maximum is None or value <= maximum))
    if ok:
        return value
    bounds = [f">= {minimum}" if minimum is not None else "", f"> {above}" if above is not None else "",
              f"<= {maximum}" if maximum is not None else ""]
    wanted = " and ".join(b for b in bounds if b)
    raise ConfigError(f"{key}={value!r}: expected {kind}{' ' + wanted if wanted else ''}"
                      f"{' (or null)' if optional else ''}; set e.g. {key}=<{kind}> on the command line")
