"""`rstar-jax exec`: run a JSONL file of programs through the sandbox, results in input order.

With `--out`, results are appended as chunks finish and a rerun resumes after the last complete one: an existing
file is only appended to, never emptied, and must hold the results of these programs' first ids.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from rstar_jax.config import SandboxSection
from rstar_jax.jsonl import InputError, ResumableJsonl
from rstar_jax.sandbox.pool import SandboxPool
from rstar_jax.sandbox.results import SandboxError


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExecConfig:
    programs: str  # JSONL of {"id": ..., "code": ...}
    out: str = ""  # output JSONL (resumable); stdout when empty
    sandbox: SandboxSection = SandboxSection()

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


def exec_file(cfg: ExecConfig) -> None:
    programs = read_programs(cfg.programs)
    out = ResumableJsonl(cfg.out, "--out") if cfg.out else None
    done = len(out.records) if out else 0
    try:
        if out and [r.get("id") for r in out.records] != [pid for pid, _ in programs[:done]]:
            raise InputError(f"--out {cfg.out}: holds results of other programs; choose another --out")
        if done == len(programs):
            return
        with SandboxPool.from_section(cfg.sandbox) as pool:
            for start in range(done, len(programs), _CHUNK):
                chunk = programs[start:start + _CHUNK]
                for (pid, _), result in zip(chunk, pool.run([code for _, code in chunk])):
                    record = {"id": pid, **result.to_json()}
                    if out:
                        out.append(record)
                    else:
                        print(json.dumps(record), flush=True)
    finally:
        if out:
            out.close()
