"""JSONL in and out: strict readers with file:line errors, and an append-only writer that survives crashes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator


class InputError(ValueError):
    """Bad user input; the message is one line naming the input and what is wrong."""


def iter_jsonl(path: str | Path, required: tuple[str, ...] = ()) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; raises InputError naming `path:line`."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    seen = False
    with p.open("rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise InputError(f"{p}:{n}: not valid JSON ({e.__class__.__name__}: {str(e).splitlines()[0]})") from None
            if not isinstance(obj, dict):
                raise InputError(f"{p}:{n}: expected a JSON object, got {type(obj).__name__}")
            missing = [k for k in required if k not in obj]
            if missing:
                raise InputError(f"{p}:{n}: missing key {missing[0]!r}")
            seen = True
            yield n, obj
    if not seen:
        raise InputError(f"{p}: file is empty")


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON through a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Write a whole JSONL file atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    os.replace(tmp, path)


def read_jsonl(path: str | Path, required: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    return [obj for _, obj in iter_jsonl(path, required)]


class ResumableJsonl:
    """Append-only JSONL output. Re-opening keeps every complete line and drops a torn last line,
    so a job killed mid-write resumes with nothing lost. Each append is flushed and fsynced."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: list[dict[str, Any]] = []
        if self.path.exists():
            data = self.path.read_bytes()
            keep = data[: data.rfind(b"\n") + 1]  # a line without its newline was torn by a crash
            for line in keep.splitlines():
                if line.strip():
                    self.records.append(json.loads(line))
            if len(keep) != len(data):
                self.path.write_bytes(keep)
        self._f = self.path.open("a", encoding="utf-8")

    def append(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.records.append(record)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "ResumableJsonl":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
