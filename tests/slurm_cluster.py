"""Bring up the local one-node SLURM test cluster (`scripts/slurm_local.sh start`) for tests.

Usage in a fixture::

    env = ensure_cluster()
    if isinstance(env, str):
        pytest.skip(env)
    monkeypatch.setenv(...)  # for each item of env (today only SLURM_CONF)

The cluster is left running (starting it again is a no-op); `scripts/slurm_local.sh stop` ends it.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "slurm_local.sh"


def ensure_cluster(timeout: float = 600) -> dict[str, str] | str:
    """Start the cluster if needed; the env vars a SLURM client needs, or why SLURM is unavailable.

    On success returns e.g. ``{"SLURM_CONF": "/tmp/cehrx-slurm/slurm.conf"}`` (parsed from the
    script's ``export NAME=VALUE`` lines). On failure (not root and SLURM not installed, apt
    failure, a daemon that would not start, ...) returns a one-line reason for `pytest.skip`.
    The timeout covers a first-time `apt-get install` too.
    """
    try:
        proc = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"local SLURM cluster could not start: {exc}"
    if proc.returncode != 0:
        # The script's own one-line reason is the last `slurm_local:` line on stderr.
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("slurm_local:")]
        why = lines[-1] if lines else (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"local SLURM cluster unavailable (exit {proc.returncode}): {why}"
    env = {}
    for line in proc.stdout.splitlines():
        if line.startswith("export ") and "=" in line:
            name, _, value = line[len("export ") :].partition("=")
            env[name.strip()] = shlex.split(value)[0] if value.strip() else ""
    return env or f"local SLURM cluster: no `export` line in output {proc.stdout!r}"
