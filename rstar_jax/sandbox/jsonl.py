"""`rstar-jax exec`: run a JSONL file of programs through the sandbox, results in input order."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rstar_jax.sandbox.pool import SandboxPool
from rstar_jax.sandbox.results import SandboxError

_CHUNK = 256  # results are written after each chunk, so a long file shows progress and keeps partial output


def read_programs(path: str | Path) -> list[tuple[object, str]]:
    """(id, code) per non-blank line; a malformed line is a SandboxError naming file and line."""
    programs = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SandboxError(f"{path}: cannot read programs file ({exc})") from exc
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise SandboxError(f"{path}:{lineno}: not valid JSON ({exc})") from exc
        if not isinstance(obj, dict) or "id" not in obj or not isinstance(obj.get("code"), str):
            raise SandboxError(f'{path}:{lineno}: expected an object with "id" and a string "code"')
        programs.append((obj["id"], obj["code"]))
    return programs


def exec_file(programs_path: str | Path, out_path: str | Path | None = None, timeout_s: float = 5.0,
              memory_mb: int = 1024, workers: int | None = None, allow_insecure: bool = False) -> None:
    programs = read_programs(programs_path)
    out = open(out_path, "w", encoding="utf-8") if out_path is not None else sys.stdout
    try:
        with SandboxPool(workers=workers, timeout_s=timeout_s, memory_mb=memory_mb, allow_insecure=allow_insecure) as pool:
            for start in range(0, len(programs), _CHUNK):
                chunk = programs[start:start + _CHUNK]
                for (pid, _), result in zip(chunk, pool.run([code for _, code in chunk])):
                    out.write(json.dumps({"id": pid, **result.to_json()}) + "\n")
                out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
