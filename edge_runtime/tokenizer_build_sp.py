"""A Llama / SentencePiece-layout tokenizer trained on our corpus, for families whose release ships
one (MiniCPM-V 4.0's LlamaTokenizerFast): `<unk>` `<s>` `</s>` at ids 0-2, the 256 byte-fallback
tokens `<0x00>`..`<0xFF>` next, the trained BPE pieces (`▁` marks a word start), then the chat and
placeholder tokens as added tokens, as in the released tokenizer.json.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors, trainers

from edge_runtime.tokenizer_build import CORPUS_PATH

BASE_SPECIAL = ("<unk>", "<s>", "</s>")
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))


def _pipeline(tok: Tokenizer) -> None:
    """Llama-2 style: prepend ▁ and turn spaces into ▁ (no pre-tokenizer), byte fallback on decode."""
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )


def train_sp_tokenizer(
    vocab_size: int, added: Sequence[tuple[str, bool]], corpus_path: Path = CORPUS_PATH
) -> Tokenizer:
    """Train BPE pieces, then lay the vocabulary out as a SentencePiece export does."""
    n_fixed = len(BASE_SPECIAL) + len(BYTE_TOKENS) + len(added)
    if vocab_size < n_fixed + 64:
        raise ValueError(f"vocab_size must be at least {n_fixed + 64}")
    trainee = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    _pipeline(trainee)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_fixed + 1, min_frequency=2, show_progress=False, special_tokens=["<unk>"]
    )
    trainee.train([str(corpus_path)], trainer)
    spec = json.loads(trainee.to_str())
    trained = sorted(spec["model"]["vocab"].items(), key=lambda item: item[1])
    pieces = [p for p, _ in trained if p not in BASE_SPECIAL and p not in BYTE_TOKENS]
    vocab = {p: i for i, p in enumerate((*BASE_SPECIAL, *BYTE_TOKENS, *pieces))}
    merges = [m for m in spec["model"]["merges"]]
    model = models.BPE(
        vocab=vocab,
        merges=[tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges],
        unk_token="<unk>",
        fuse_unk=True,
        byte_fallback=True,
    )
    tok = Tokenizer(model)
    _pipeline(tok)
    tok.add_special_tokens([_added(t) for t in BASE_SPECIAL])
    for content, special in added:
        if special:
            tok.add_special_tokens([_added(content)])
        else:
            tok.add_tokens([_added(content, special=False)])
    return tok


def _added(content: str, special: bool = True) -> AddedToken:
    return AddedToken(
        content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special
    )


def build_sp_tokenizer_files(
    out_dir: str | Path,
    *,
    added: Sequence[tuple[str, bool]],
    chat_template: str,
    config: dict[str, Any],
    vocab_size: int,
    bos: bool = False,
    corpus_path: Path = CORPUS_PATH,
) -> dict[str, Any]:
    """Write tokenizer.json, tokenizer_config.json (`config` plus the added-token table) and
    chat_template.jinja; return the vocabulary size and every special/added token's id. `bos`:
    the post-processor prepends `<s>` to an encoded text, as a Llama tokenizer with add_bos_token."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_sp_tokenizer(vocab_size, added, corpus_path)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    (out / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    contents = [*BASE_SPECIAL, *(c for c, _ in added)]
    specials = {*BASE_SPECIAL, *(c for c, s in added if s)}
    table = {
        str(tok.token_to_id(c)): {
            "content": c,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": c in specials,
        }
        for c in contents
    }
    full_config = {"added_tokens_decoder": table, **config}
    (out / "tokenizer_config.json").write_text(
        json.dumps(full_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    return {
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "token_ids": {c: tok.token_to_id(c) for c in contents},
        "files": ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"],
    }
