"""Run a snippet in a fresh Python process in which `hf_msvit` cannot be imported (as for a Hub user)."""

import os
import subprocess
import sys
import textwrap


_PRELUDE = """
import sys
sys.modules["hf_msvit"] = None  # any `import hf_msvit` now raises ImportError, even with the package installed
try:
    import hf_msvit  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("hf_msvit is importable; the remote-code test would prove nothing")
"""


def run_without_hf_msvit(snippet: str, modules_cache: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs `snippet` with `hf_msvit` blocked, the Hub offline and a private remote-code module cache.

    The child has no stdin, so an interactive "run the custom code? [y/N]" reads EOF instead of waiting.
    Raises `AssertionError` with the child's output if it fails; returns the completed process otherwise.
    """
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=modules_cache, PYTHONPATH="", TRANSFORMERS_VERBOSITY="error")
    os.makedirs(modules_cache, exist_ok=True)
    code = _PRELUDE + textwrap.dedent(snippet)
    result = subprocess.run(
        [sys.executable, "-c", code],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=modules_cache,
    )
    if result.returncode != 0:
        raise AssertionError(f"remote-code subprocess failed:\nSTDOUT:\n{result.stdout}\nSTDERR:\n{result.stderr}")
    return result
