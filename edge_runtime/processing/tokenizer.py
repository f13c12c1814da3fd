"""Checkpoint tokenizer: the `tokenizers` runtime over tokenizer.json, plus the config facts we need.

Reads a real MiniCPM-V 4.6 (Qwen3.5 byte-level BPE) checkpoint unchanged, and our tiny one. No
transformers import: the phone-side runtime only has `tokenizers`. Encoding never adds BOS/EOS
(Qwen has none) and recognises special tokens written in the text, as transformers does.
"""

from __future__ import annotations

import codecs
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _RustTokenizer
from tokenizers import decoders

from edge_runtime.errors import CheckpointError
from edge_runtime.jsonfile import read_json_file

# Names the MiniCPM-V processor reads from tokenizer_config's `extra_special_tokens`, with the
# strings the 4.6 checkpoint uses; a checkpoint may override any of them.
DEFAULT_EXTRA_SPECIAL_TOKENS: dict[str, str] = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "image_start_token": "<image>",
    "image_end_token": "</image>",
    "slice_start_token": "<slice>",
    "slice_end_token": "</slice>",
    "image_id_start_token": "<image_id>",
    "image_id_end_token": "</image_id>",
}
# extra_special_tokens entries that are text conventions rather than vocabulary tokens
_TEXT_MARKERS = ("image_marker",)
# Named special tokens transformers exposes to chat templates (special_tokens_map).
_NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable character standing for each byte."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _read_json(path: Path, what: str) -> dict[str, Any] | None:
    return read_json_file(path, what, CheckpointError, missing_ok=True)


def _token_str(value: Any) -> str | None:
    """tokenizer_config stores a token as a string or as an AddedToken dict ({"content": ...})."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Encode/decode with a checkpoint's tokenizer; exposes the chat and placeholder token ids."""

    def __init__(self, checkpoint_dir: str | Path, default_tokens: dict[str, str] | None = None) -> None:
        """`default_tokens`: the family's placeholder names where tokenizer_config.json names none
        (remote-code releases hard-code them in their tokenizer class; default: MiniCPM-V 4.6's)."""
        root = Path(checkpoint_dir)
        tok_path = root / "tokenizer.json"
        if not tok_path.is_file():
            raise CheckpointError(f"{root}: tokenizer.json not found")
        try:
            self._tk = _RustTokenizer.from_file(str(tok_path))
        except Exception as exc:  # the Rust side raises a bare Exception on parse errors
            raise CheckpointError(f"{tok_path}: cannot load tokenizer: {str(exc).splitlines()[0]}") from None
        self._tk.no_padding()
        self._tk.no_truncation()
        self.config: dict[str, Any] = (
            _read_json(root / "tokenizer_config.json", "tokenizer_config.json") or {}
        )
        self._generation_config = _read_json(root / "generation_config.json", "generation_config.json")
        self._special_ids = frozenset(i for i, t in self._tk.get_added_tokens_decoder().items() if t.special)
        self._byte_level = isinstance(self._tk.decoder, decoders.ByteLevel)
        self._bytes_cache: dict[int, bytes] = {}

        extra = self.config.get("extra_special_tokens")
        named = {k: v for k, v in extra.items() if isinstance(v, str)} if isinstance(extra, dict) else {}
        self.extra_special_tokens: dict[str, str] = {
            **(default_tokens or DEFAULT_EXTRA_SPECIAL_TOKENS),
            **named,
        }
        vocabulary = [v for k, v in self.extra_special_tokens.items() if k not in _TEXT_MARKERS]
        missing = [t for t in vocabulary if self.token_to_id(t) is None]
        if missing:
            raise CheckpointError(f"{tok_path}: tokenizer lacks MiniCPM-V tokens {', '.join(missing)}")
        self.stop_ids: tuple[int, ...] = self._read_stop_ids(tok_path)

    # ---- ids -------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of token ids including added tokens (the model's embedding may be larger)."""
        return self._tk.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tk.id_to_token(token_id)

    def _id(self, token: str) -> int:
        token_id = self._tk.token_to_id(token)
        assert token_id is not None  # checked in __init__
        return token_id

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    @property
    def im_start_id(self) -> int:
        return self._id("<|im_start|>")

    @property
    def im_end_id(self) -> int:
        return self._id("<|im_end|>")

    @property
    def bos_id(self) -> int:
        """The sequence opener a runner's ABI wants: the tokenizer's BOS, or ChatML's
        `<|im_start|>` where there is none (Qwen)."""
        bos = _token_str(self.config.get("bos_token"))
        found = self.token_to_id(bos) if bos is not None else None
        return found if found is not None else self._id("<|im_start|>")

    @property
    def endoftext_id(self) -> int | None:
        return self.token_to_id("<|endoftext|>")

    def _named_id(self, name: str) -> int:
        return self._id(self.extra_special_tokens[name])

    @property
    def image_pad_id(self) -> int:
        return self._named_id("image_token")

    @property
    def video_pad_id(self) -> int | None:
        """None for a family without a video placeholder."""
        return self._named_id("video_token") if "video_token" in self.extra_special_tokens else None

    @property
    def image_start_id(self) -> int:
        return self._named_id("image_start_token")

    @property
    def image_end_id(self) -> int:
        return self._named_id("image_end_token")

    @property
    def slice_start_id(self) -> int:
        return self._named_id("slice_start_token")

    @property
    def slice_end_id(self) -> int:
        return self._named_id("slice_end_token")

    @property
    def image_id_start_id(self) -> int:
        return self._named_id("image_id_start_token")

    @property
    def image_id_end_id(self) -> int:
        return self._named_id("image_id_end_token")

    @property
    def eos_token(self) -> str | None:
        return _token_str(self.config.get("eos_token"))

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """What transformers passes to chat templates: set named tokens plus extra_special_tokens."""
        out = {}
        for name in _NAMED_SPECIAL:
            value = _token_str(self.config.get(name))
            if value is not None:
                out[name] = value
        return {**out, **self.extra_special_tokens}

    def _read_stop_ids(self, tok_path: Path) -> tuple[int, ...]:
        """generation_config's eos_token_id (int or list) wins; else config eos + ChatML enders."""
        gen = self._generation_config or {}
        eos = gen.get("eos_token_id")
        if eos is not None:
            ids = [eos] if isinstance(eos, int) else eos
            if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
                raise CheckpointError(f"{tok_path.parent}/generation_config.json: bad eos_token_id {eos!r}")
            return tuple(dict.fromkeys(ids))
        names = [self.eos_token, "<|im_end|>", "<|endoftext|>"]
        ids = [self.token_to_id(n) for n in names if n is not None]
        return tuple(dict.fromkeys(i for i in ids if i is not None))

    # ---- encode / decode ---------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids, no BOS/EOS added; special tokens written in ``text`` become their ids."""
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """A whole prompt's ids: tokenizer.json's post-processor adds what the checkpoint's own
        tokenizer adds (BOS for a Llama tokenizer that has it; nothing for Qwen's)."""
        return self._tk.encode(text, add_special_tokens=True).ids

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token for byte-level tokenizers (b"" for an unknown id)."""
        cached = self._bytes_cache.get(token_id)
        if cached is not None:
            return cached
        token = self._tk.id_to_token(token_id)
        if token is None:
            data = b""
        else:
            # Same rule as the ByteLevel decoder: map every char back to its byte, or, if some char
            # is not a byte stand-in (an added token like "<|im_end|>" with non-ASCII), its UTF-8.
            table = _byte_decoder()
            try:
                data = bytes(table[c] for c in token)
            except KeyError:
                data = token.encode("utf-8")
        self._bytes_cache[token_id] = data
        return data

    @property
    def byte_level(self) -> bool:
        return self._byte_level

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; broken UTF-8 becomes U+FFFD, as in transformers' decode."""
        ids = [int(i) for i in ids]
        if not self._byte_level:
            return self._tk.decode(ids, skip_special_tokens=skip_special_tokens)
        data = b"".join(
            self.token_bytes(i) for i in ids if not (skip_special_tokens and i in self._special_ids)
        )
        return data.decode("utf-8", errors="replace")


class StreamDecoder:
    """Incremental detokenizer: feed ids one at a time, get back only complete UTF-8 text.

    A byte-level token can end mid-character (emoji, CJK); those bytes are held until the
    character completes. ``"".join(pieces) + flush()`` equals ``tokenizer.decode(all_ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []  # only used for non-byte-level tokenizers
        self._emitted = 0

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        if self._skip and self._tok.is_special(token_id):
            return ""
        if self._tok.byte_level:
            return self._utf8.decode(self._tok.token_bytes(token_id), final=False)
        # Generic fallback: re-decode everything and hold back an unfinished trailing character.
        self._ids.append(token_id)
        text = self._tok.decode(self._ids, skip_special_tokens=self._skip)
        if text.endswith("\ufffd"):
            return ""
        piece, self._emitted = text[self._emitted :], len(text)
        return piece

    def flush(self) -> str:
        """Emit whatever is held back (incomplete bytes become U+FFFD) and reset."""
        if self._tok.byte_level:
            return self._utf8.decode(b"", final=True)
        text = self._tok.decode(self._ids, skip_special_tokens=self._skip)
        piece = text[self._emitted :]
        self._ids, self._emitted = [], 0
        return piece
