"""The sandbox wherever Python lives: an interpreter under /tmp (which the sandbox replaces with its scratch),
reached through a symlink, and a probe failure that names its cause."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from rstar_jax.sandbox import SandboxError, SandboxPool
from rstar_jax.sandbox import isolation

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")

VENV_RUN = """
import sys
from rstar_jax.sandbox import SandboxPool
with SandboxPool(workers=1, timeout_s=5.0) as pool:
    [r] = pool.run(["import os, sys, tempfile, numpy\\nopen(tempfile.gettempdir() + '/f', 'w').write('x')\\n"
                    "print(sys.executable, os.listdir(tempfile.gettempdir()))"])
print(pool.isolation_mode, r.status, r.last_line, sep="|")
"""


@needs_bwrap
def test_sandbox_runs_from_a_venv_under_tmp_and_through_a_symlink():
    """The sandbox mounts its scratch where /tmp was; an interpreter that lives under /tmp (or is reached through a
    symlink) must still be there, under the name this process uses."""
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", f"{tmp}/venv"],
                       check=True)
        os.symlink(f"{tmp}/venv", f"{tmp}/link")
        for python in (f"{tmp}/venv/bin/python", f"{tmp}/link/bin/python"):
            r = subprocess.run([python, "-c", VENV_RUN], capture_output=True, text=True, timeout=300,
                               env={**os.environ, "PYTHONPATH": str(repo)})
            assert r.returncode == 0, r.stderr[-2000:]
            mode, status, last = r.stdout.strip().splitlines()[-1].split("|")
            assert mode.startswith("bwrap+uid") and status == "ok" and last == f"{python} ['f']"


@needs_bwrap
def test_a_failing_bubblewrap_is_named_as_the_cause(monkeypatch):
    monkeypatch.setattr(isolation, "_bwrap_prefix", lambda *a: ["bwrap", "--no-such-option"])
    with pytest.raises(SandboxError) as e:
        SandboxPool(workers=1)
    msg = str(e.value)
    assert "bubblewrap is installed but could not start" in msg and "--no-such-option" in msg
    assert "install bubblewrap" not in msg and "--allow-insecure-sandbox" in msg
