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


def _replace_with(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`: readers never see half a file,
    and a failed write leaves neither a half file nor the temporary one. The temporary name is the process's own,
    so processes of one run that write the same file (a search's settings) do not rename each other's."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    _replace_with(Path(path), json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None


def keep_settings(path: str | Path, settings: dict[str, Any], out: str, holds: str) -> None:
    """Record the settings an output is made with at `path`, or, when an earlier run recorded some, check that
    they are the same: a difference is an InputError naming the first differing key (`holds`: what `out` holds)."""
    from rstar_jax.config import first_difference

    path = Path(path)
    if path.is_file():
        diff = first_difference(read_json(path), json.loads(json.dumps(settings)))
        if diff is not None:
            key, old, new = diff
            raise InputError(f"--out {out}: holds {holds} with {key}={old!r}, not {new!r}; choose another --out")
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"--out {out}: cannot create it ({e.strerror})") from None
    write_json(path, settings)


def _complete_lines(path: Path, name: str) -> tuple[list[dict[str, Any]], bytes | None]:
    """The objects of the file's complete lines, and those lines' bytes when a torn last line (one without its
    newline: a crash mid-write) follows them, else None. A folder, an unreadable file or one that is not JSONL
    is an InputError naming `name` (e.g. `--out`)."""
    if path.is_dir():
        raise InputError(f"{name} {path}: is a folder; expected a JSONL file")
    try:
        data = path.read_bytes() if path.exists() else b""
    except OSError as e:
        raise InputError(f"{name} {path}: cannot read ({e.strerror})") from None
    keep = data[: data.rfind(b"\n") + 1]
    records = []
    for n, line in enumerate(keep.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            obj = None
        if not isinstance(obj, dict):
            raise InputError(f"{name} {path}: exists and is not a JSONL file (line {n}); choose another path")
        records.append(obj)
    return records, keep if len(keep) != len(data) else None


def check_output_file(path: str | Path, name: str = "--out") -> None:
    """Before any work: `path` can become a JSONL output (not a folder, not some other existing file)."""
    path = Path(path)
    _complete_lines(path, name)
    above = next((p for p in path.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise InputError(f"{name} {path}: {above} is not a folder")


def write_jsonl(path: str | Path, records: list[dict[str, Any]], name: str = "--out") -> None:
    """Write a whole JSONL file atomically; an existing file at `path` must be JSONL (it is replaced)."""
    path = Path(path)
    check_output_file(path, name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{name} {path}: cannot create its folder ({e.strerror})") from None
    _replace_with(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_jsonl(path: str | Path, required: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    return [obj for _, obj in iter_jsonl(path, required)]


class ResumableJsonl:
    """Append-only JSONL output. Re-opening keeps every complete line and drops a torn last line,
    so a job killed mid-write resumes with nothing lost. Each append is flushed and fsynced.
    `name` is how errors name the file (e.g. `--out`)."""

    def __init__(self, path: str | Path, name: str = "output"):
        self.path = Path(path)
        self.records, kept = _complete_lines(self.path, name)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if kept is not None:
                self.path.write_bytes(kept)
            self._f = self.path.open("a", encoding="utf-8")
        except OSError as e:
            raise InputError(f"{name} {self.path}: cannot write ({e.strerror})") from None

    @staticmethod
    def read(path: str | Path, name: str = "output") -> list[dict[str, Any]]:
        """The complete lines of such a file (none where it does not exist), without opening it for appending."""
        return _complete_lines(Path(path), name)[0]

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
