"""The command line run as a user runs it: a fresh process, offline, warnings off."""

from __future__ import annotations

import os
import subprocess
import sys


def run_cli(*arguments: str, umask: int | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m hiddenpool ARGUMENTS`` (under ``umask`` when given)."""
    environment = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", "hiddenpool", *arguments],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
        preexec_fn=(lambda: os.umask(umask)) if umask is not None else None,
    )
