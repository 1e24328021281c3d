"""Run a script in a subprocess with Triton's interpreter (kernels on the CPU), for tests of Triton kernels.

The interpreter is chosen when the kernels are defined, hence a fresh process. ``PREAMBLE`` switches it on,
works around one incompatibility, and puts the repository (the script's first argument) and its tests
folder on ``sys.path``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PREAMBLE = textwrap.dedent("""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import triton.runtime.interpreter as interpreter
    # Triton 3.6's interpreter calls int() on 1-element arrays, which numpy >= 2.4 refuses.
    _patch = interpreter._patch_lang_tensor
    def _patch_lang_tensor(tensor, scope):
        _patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    interpreter._patch_lang_tensor = _patch_lang_tensor
    sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "tests")]
""")


def run_in_interpreter(script: str, *args: str, timeout: int = 300) -> None:
    """Runs PREAMBLE + script (which prints "ok" last) on the CPU; fails the test with its stderr otherwise."""
    result = subprocess.run([sys.executable, "-c", PREAMBLE + textwrap.dedent(script), str(REPO), *args],
                            capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
