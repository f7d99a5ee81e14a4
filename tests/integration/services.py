"""Test services (SLURM, ssh hosts) started by the project's own scripts in .ci/services/.

In CI (CI=true) a service that cannot be started fails the test; elsewhere (not root, no Debian
packages) the test is skipped with the reason.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from ..conftest import IN_CI, REPO

SERVICES = REPO / ".ci" / "services"


def start(script: str, *args: str, timeout: int = 300) -> None:
    """Run ``.ci/services/<script>`` (idempotent); fail in CI, skip elsewhere, if it cannot start."""
    why = None
    if os.geteuid() != 0:
        why = "the test services start as root"
    else:
        p = subprocess.run(["bash", str(SERVICES / script), *args], capture_output=True, text=True, timeout=timeout)
        if p.returncode:
            why = f"{script} {' '.join(args)} exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    if why:
        unavailable(f"CI needs this service: {why}")


def unavailable(why: str) -> None:
    """What a test does when something it needs cannot be had here: fail in CI, skip elsewhere."""
    if IN_CI:
        pytest.fail(why)
    pytest.skip(why)
