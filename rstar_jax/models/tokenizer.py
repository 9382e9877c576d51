"""Fast tokenizer (the `tokenizers` library) plus the chat template, read from and written to an HF folder.

The folder layout is transformers' own: `tokenizer.json` (the full tokenizer, added tokens included) and
`tokenizer_config.json` (special-token names and `chat_template`; newer transformers keep the template in
`chat_template.jinja`, which is read too). Folders we write load with `transformers.AutoTokenizer`.
"""

from __future__ import annotations

import datetime
import functools
import json
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers

from rstar_jax.models.registry import ModelLoadError

_SPECIAL_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")


class Tokenizer:
    """A `tokenizers.Tokenizer` with its special-token names and chat template."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = None,
        source: str = "tokenizer",
    ):
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.chat_template = chat_template
        self.source = source  # names the input in error messages
        for name in _SPECIAL_NAMES:
            token = getattr(self, name)
            if token is not None and backend.token_to_id(token) is None:
                raise ModelLoadError(f"{source}: {name} {token!r} is not in the vocabulary")

    # --- ids ---------------------------------------------------------------------------------------
    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # --- text <-> ids ------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any) -> str:
        """Render `messages` ([{"role", "content"}]) with the folder's jinja chat template."""
        if not self.chat_template:
            raise ModelLoadError(f"{self.source}: the tokenizer has no chat template")
        template = _compile(self.chat_template)
        return template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **extra,
        )

    # --- vocabulary --------------------------------------------------------------------------------
    def add_special_tokens(self, tokens: list[str]) -> int:
        """Add `tokens` as special (never split) tokens; returns how many were new."""
        before = self.vocab_size
        self.backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in tokens])
        return self.vocab_size - before

    # --- files -------------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            **{name: getattr(self, name) for name in _SPECIAL_NAMES if getattr(self, name) is not None},
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """Read `tokenizer.json` (+ `tokenizer_config.json`, `chat_template.jinja`) from an HF folder."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder}: no tokenizer.json (a fast tokenizer file is required)")
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust library raises a bare Exception on malformed files
        raise ModelLoadError(f"{path}: not a valid tokenizer file ({_first_line(e)})") from None
    config = _read_json(folder / "tokenizer_config.json")
    specials = _read_json(folder / "special_tokens_map.json")
    names = {name: _token_content(config.get(name, specials.get(name))) for name in _SPECIAL_NAMES}
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: transformers' default is "default"
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    jinja_file = folder / "chat_template.jinja"
    if template is None and jinja_file.is_file():
        template = jinja_file.read_text()
    return Tokenizer(backend, chat_template=template, source=str(folder), **names)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def _token_content(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    # Same environment options as transformers, so templates written for it render identically.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)
