"""Tokenizers: an embedded byte-level tokenizer (no files) and a Hugging Face `tokenizer.json` loaded offline.

Every tokenizer speaks the same small protocol. `encode` never adds special tokens, nor reads them in the text
(a literal "</s>" is encoded as the characters it is): callers decide where BOS and EOS go, by id (the data
pipeline does it once per document), so token counts mean the same for both kinds.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from refine.files import write_atomically

logger = logging.getLogger(__name__)


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline, the rollout engines and evaluation need from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def bos_id(self) -> int | None: ...

    @property
    def pad_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; four special ids follow. Needs no files, so a model trained with it is
    self-contained. Decoding drops special ids and ids past the vocabulary, and replaces invalid UTF-8 (a sampled
    byte sequence may cut a multi-byte character) with U+FFFD instead of failing."""

    PAD_ID = 256
    BOS_ID = 257
    EOS_ID = 258
    SEP_ID = 259
    NUM_BYTES = 256
    SPECIAL_TOKENS = {"<pad>": PAD_ID, "<bos>": BOS_ID, "<eos>": EOS_ID, "<sep>": SEP_ID}

    @property
    def vocab_size(self) -> int:
        return self.NUM_BYTES + len(self.SPECIAL_TOKENS)

    @property
    def eos_id(self) -> int:
        return self.EOS_ID

    @property
    def bos_id(self) -> int:
        return self.BOS_ID

    @property
    def pad_id(self) -> int:
        return self.PAD_ID

    @property
    def sep_id(self) -> int:
        return self.SEP_ID

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"ByteTokenizer.encode expects str, got {type(text).__name__}: {text!r:.80}")
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: list[int]) -> str:
        data = bytearray()
        for position, token_id in enumerate(ids):
            token_id = int(token_id)
            if 0 <= token_id < self.NUM_BYTES:
                data.append(token_id)
            elif token_id < 0:
                raise ValueError(f"token id {token_id} at position {position} is negative")
            # Else a special id, or one past the vocabulary that a model with a larger one may sample: both name no
            # text, and are dropped (as the tokenizers library drops ids its vocabulary lacks).
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"


# Names tried, in order, when a checkpoint's files do not say which token is BOS / EOS.
_FALLBACK_BOS = ("<s>", "<|begin_of_text|>", "<bos>", "[BOS]")
_FALLBACK_EOS = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "[EOS]")


def _is_rust_panic(error: BaseException) -> bool:
    """Whether `error` is a Rust panic of the tokenizers library (a malformed tokenizer.json can cause one). pyo3
    raises it as PanicException, a BaseException that `except Exception` and the command line's error report miss."""
    return type(error).__name__ == "PanicException" and type(error).__module__ == "pyo3_runtime"


class HFTokenizer:
    """A `tokenizer.json` (the `tokenizers` library's format) loaded from a local directory, never from a hub.

    Special ids come from tokenizer_config.json / special_tokens_map.json (token strings), then config.json
    (`bos_token_id`, ...), then common token names. PAD falls back to EOS, as causal-LM checkpoints usually
    have no pad token."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as _RustTokenizer

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer path {str(path)!r} has no tokenizer.json")
        self.file = file
        self.directory = file.parent
        try:
            text = file.read_text(encoding="utf-8")
            self._tokenizer = _RustTokenizer.from_str(text)
        except Exception as error:  # the Rust library raises a bare Exception with its parse message
            raise ValueError(f"cannot read tokenizer file {str(file)!r}: {error}") from error
        except BaseException as error:
            if not _is_rust_panic(error):
                raise
            raise ValueError(f"cannot read tokenizer file {str(file)!r}: the tokenizers library fails on its "
                             f"settings ({error})") from None
        # The files checkpoints save, as read now: a tokenizer directory moved or rewritten during a run must not
        # leave later checkpoints without them, or with another tokenizer than the one the run encodes with.
        self.files: dict[str, str] = {"tokenizer.json": text}
        for name in SPECIAL_TOKEN_FILES:
            if (self.directory / name).is_file():
                try:
                    self.files[name] = (self.directory / name).read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as error:
                    raise ValueError(f"cannot read {str(self.directory / name)!r}: {error}") from error
        # Text is text: a document that writes "</s>" or "<pad>" must not turn into control tokens (an EOS in
        # the middle of a document, a pad the loss would treat as padding). The pipeline adds BOS / EOS by id.
        self._tokenizer.encode_special_tokens = True
        # The size a model's embedding needs: one past the highest id the tokenizer can produce. The library's
        # get_vocab_size counts tokens, which falls short when ids have gaps (a WordLevel vocab with "dog" -> 500
        # counts 12): such a tokenizer would pass the vocabulary checks, then fail the embedding lookup.
        ids = self._tokenizer.get_vocab(with_added_tokens=True).values()
        self._vocab_size = max(ids, default=-1) + 1
        settings = _read_special_token_settings(self.directory, self.files)
        self._bos_id = self._resolve("bos", settings, _FALLBACK_BOS)
        eos_id = self._resolve("eos", settings, _FALLBACK_EOS)
        if eos_id is None:
            raise ValueError(
                f"tokenizer in {str(self.directory)!r} names no EOS token: set eos_token in tokenizer_config.json "
                f"or eos_token_id in config.json"
            )
        self._eos_id = eos_id
        pad_id = self._resolve("pad", settings, ())
        self._pad_id = eos_id if pad_id is None else pad_id

    def _resolve(self, role: str, settings: dict[str, Any], fallback_names: tuple[str, ...]) -> int | None:
        token = settings.get(f"{role}_token")
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str):
            token_id = self._tokenizer.token_to_id(token)
            if token_id is None:
                raise ValueError(
                    f"{role}_token {token!r} configured in {str(self.directory)!r} is not in the tokenizer vocabulary"
                )
            return token_id
        token_id = settings.get(f"{role}_token_id")
        if isinstance(token_id, list):  # some configs list several EOS ids; the first is the canonical one
            token_id = token_id[0] if token_id else None
        if token_id is not None and (isinstance(token_id, bool) or not isinstance(token_id, int)):
            # true, 2.0 or "2" is a broken config, not "no id given": say so rather than fall back silently.
            raise ValueError(f"{role}_token_id in {str(self.directory)!r} must be an integer token id, got {token_id!r}")
        if isinstance(token_id, int):
            if not 0 <= token_id < self._vocab_size:
                raise ValueError(
                    f"{role}_token_id {token_id} in {str(self.directory)!r} is outside the vocabulary "
                    f"[0, {self._vocab_size})"
                )
            return token_id
        for name in fallback_names:
            token_id = self._tokenizer.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"HFTokenizer.encode expects str, got {type(text).__name__}: {text!r:.80}")
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode([int(token_id) for token_id in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.directory)!r}, vocab_size={self.vocab_size})"


def _read_special_token_settings(directory: Path, read: dict[str, str]) -> dict[str, Any]:
    """Merge the special-token fields of the usual files; earlier files win. `read`: the texts of those already
    read (the special-token files a checkpoint saves), by name."""
    settings: dict[str, Any] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json", "config.json"):
        file = directory / name
        if name not in read and not file.is_file():
            continue
        try:
            content = json.loads(read[name] if name in read else file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"cannot parse {str(file)!r}: {error}") from error
        if not isinstance(content, dict):
            continue
        for role in ("bos", "eos", "pad"):
            for key in (f"{role}_token", f"{role}_token_id"):
                if content.get(key) is not None and key not in settings:
                    settings[key] = content[key]
    return settings


BYTE_TOKENIZER_NAMES = ("byte", "bytes")
# The special-token files that travel with tokenizer.json (a tokenizer directory's config.json is a model's).
SPECIAL_TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def save_tokenizer_files(tokenizer: Tokenizer, directory: Path) -> None:
    """Write a Hugging Face tokenizer's files, as it read them, into `directory` (a saved model), where
    `load_tokenizer` and `refine eval --model` find them; the byte tokenizer has none, and is what a directory
    without them gets."""
    if not isinstance(tokenizer, HFTokenizer):
        return
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in tokenizer.files.items():
        write_atomically(directory / name, text)  # whole or not at all: it may be the tokenizer's own directory


def same_tokenizer(tokenizer: Tokenizer, directory: Path) -> bool:
    """Whether `tokenizer` is the one saved with the model in `directory` (by save_tokenizer_files): the same
    tokenizer.json, or none for the byte tokenizer."""
    saved = directory / "tokenizer.json"
    if not isinstance(tokenizer, HFTokenizer):
        return not saved.exists()
    try:
        return json.loads(saved.read_text(encoding="utf-8")) == json.loads(tokenizer.files["tokenizer.json"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False


def tokenizer_name(tokenizer: Tokenizer) -> str:
    """How messages name a tokenizer: its directory, or "byte-level"."""
    return str(tokenizer.directory) if isinstance(tokenizer, HFTokenizer) else "byte-level"


def check_vocab_fits(vocab_size: int, tokenizer: Tokenizer, model: str, remedy: str) -> None:
    """Refuse a tokenizer with ids past the model's embedding (`vocab_size` rows), before any lookup fails on one.
    `model` names the model in the message, `remedy` says what to change."""
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"{model} has vocab_size={vocab_size}, smaller than the vocabulary of tokenizer "
                         f"{tokenizer_name(tokenizer)!r} ({tokenizer.vocab_size}): {remedy}")


def check_eos_matches(model_eos_id: int | None, tokenizer: Tokenizer, model: str, remedy: str) -> None:
    """Refuse a tokenizer whose EOS is not the model's: the model learned to end sequences with its own id, and
    generation stops on the tokenizer's (a byte tokenizer's EOS 258 against a model's 2 stops on byte 0x02).
    `model` names the model in the message (e.g. "--model 'DIR'"), `remedy` says where to give the right one."""
    if model_eos_id != tokenizer.eos_id:
        raise ValueError(f"{model} has eos_token_id={model_eos_id} but tokenizer {tokenizer_name(tokenizer)!r} ends "
                         f"documents with id {tokenizer.eos_id}: {remedy}")


# How a sentencepiece tokenizer.model becomes the tokenizer.json that is read.
CONVERT_TO_TOKENIZER_JSON = ("with transformers (AutoTokenizer.from_pretrained(dir).save_pretrained(dir)) to write "
                             "tokenizer.json")


def load_tokenizer(path: str | Path | None) -> Tokenizer:
    """None or "byte" -> the embedded ByteTokenizer; a directory (or file) with tokenizer.json -> HFTokenizer."""
    if path is None or str(path).strip().lower() in BYTE_TOKENIZER_NAMES:
        return ByteTokenizer()
    location = Path(path).expanduser()
    if not location.exists():
        raise FileNotFoundError(
            f"tokenizer path {str(path)!r} does not exist (use None or 'byte' for the built-in byte tokenizer)"
        )
    if location.is_dir() and not (location / "tokenizer.json").is_file():
        present = sorted(entry.name for entry in location.iterdir())
        hint = ""
        if "tokenizer.model" in present:
            hint = f"; it holds a sentencepiece tokenizer.model: convert it once {CONVERT_TO_TOKENIZER_JSON}"
        raise FileNotFoundError(f"tokenizer directory {str(path)!r} has no tokenizer.json (found {present}){hint}")
    return HFTokenizer(location)


# Files of a Hugging Face tokenizer other than tokenizer.json: a model directory holding one of them came with a
# tokenizer, and is not read as byte-level when its tokenizer.json is missing.
OTHER_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "vocab.json",
                         "merges.txt", "vocab.txt")


def resolve_tokenizer(path: str | Path | None, model_dir: str | Path | None = None) -> Tokenizer:
    """`path` when given; else the tokenizer saved with the model in `model_dir` (every checkpoint's model/
    holds its run's); else, for a model directory without any tokenizer file, the byte tokenizer."""
    if path is not None:
        return load_tokenizer(path)
    if model_dir is None:
        return ByteTokenizer()
    directory = Path(model_dir)
    if (directory / "tokenizer.json").is_file():
        return load_tokenizer(directory)
    others = [name for name in OTHER_TOKENIZER_FILES if (directory / name).is_file()]
    if others:  # bytes would read its text as other ids than it was trained on, silently where the EOS ids agree
        hint = (f": a sentencepiece tokenizer.model converts once {CONVERT_TO_TOKENIZER_JSON}"
                if "tokenizer.model" in others else "")
        raise FileNotFoundError(f"model directory {str(model_dir)!r} holds a tokenizer's {', '.join(others)} but no "
                                f"tokenizer.json, which is what is read{hint}; or give the tokenizer yourself "
                                f"(the config's tokenizer, eval's --tokenizer; 'byte' for the byte-level one)")
    return ByteTokenizer()
