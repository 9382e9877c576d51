"""Host-side execution of model-written programs: isolated, pre-warmed, many per second."""

from rstar_jax.sandbox.jsonl import exec_file
from rstar_jax.sandbox.pool import SandboxPool
from rstar_jax.sandbox.results import STATUSES, ExecResult, SandboxError

__all__ = ["STATUSES", "ExecResult", "SandboxError", "SandboxPool", "exec_file"]
