"""What the sandbox reports for one program, and its error type."""

from __future__ import annotations

import dataclasses

# ok: ran to the end. error: raised. timeout: wall or CPU limit. memory: MemoryError or OOM kill.
# crashed: killed by a signal (segfault, abort). exit: sys.exit / os._exit / died before reporting.
# sandbox_error: the sandbox failed (worker died or hung, confinement could not be applied).
STATUSES = ("ok", "error", "timeout", "memory", "crashed", "exit", "sandbox_error")


class SandboxError(ValueError):
    """Bad sandbox input, or no acceptable isolation; a ValueError so the CLI prints it as one line."""


@dataclasses.dataclass(frozen=True)
class ExecResult:
    status: str
    stdout: str = ""
    stdout_truncated: bool = False
    last_line: str = ""  # last non-empty stdout line, even when stdout was truncated
    stderr: str = ""  # tail only
    error_type: str = ""
    error_message: str = ""
    traceback: str = ""  # tail, program frames only
    wall_ms: float = 0.0
    cpu_ms: float = 0.0

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"ExecResult.status: {self.status!r} is not one of {STATUSES}")

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> ExecResult:
        return cls(**{f.name: obj[f.name] for f in dataclasses.fields(cls) if f.name in obj})
