"""Build a small tokenizer shaped exactly like MiniCPM-V 4.6's (Qwen3.5 byte-level BPE).

We cannot download the real tokenizer, so the tiny test model gets its own: the same normalizer,
pre-tokenizer, decoder, special tokens (same order, same special/non-special flags) and the same
tokenizer_config / chat-template conventions, so every code path that reads a real checkpoint is
exercised by the tiny one. Training uses the corpus shipped in ``edge_runtime/data`` and is
deterministic: same corpus + vocab size gives a byte-identical tokenizer.json.

Regenerate the corpus (rarely needed): ``python -m edge_runtime.tokenizer_build --write-corpus``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from edge_runtime.processing.tokenizer import DEFAULT_EXTRA_SPECIAL_TOKENS

CORPUS_PATH = Path(__file__).parent / "data" / "tokenizer_corpus.txt"

# Qwen3.5's pre-tokenizer split regex (transformers models/qwen3_5/tokenization_qwen3_5.py).
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"""
    r"""| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Added tokens in Qwen3.5's order, appended after the BPE vocabulary as in the real tokenizer
# (there <|endoftext|> = 248044 ... <|image_pad|> = 248056, <|video_pad|> = 248057), then the
# MiniCPM-V placeholder tokens. (content, special): tool/fim/think tokens are not special in Qwen.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
    ("<image>", True),
    ("</image>", True),
    ("<slice>", True),
    ("</slice>", True),
    ("<image_id>", True),
    ("</image_id>", True),
)

EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 2000

# ChatML like the instruct checkpoint: one <|image_pad|> / <|video_pad|> per media item (the
# processor expands it), content trimmed, past assistant turns without their think block, and a
# generation prompt that closes an empty think block unless enable_thinking is true.
CHAT_TEMPLATE = """\
{%- macro render_content(content) %}
    {%- if content is string %}
        {{- content }}
    {%- else %}
        {%- for item in content %}
            {%- if item.type == 'image' or 'image' in item or 'image_url' in item %}
                {{- '<|image_pad|>' }}
            {%- elif item.type == 'video' or 'video' in item %}
                {{- '<|video_pad|>' }}
            {%- elif 'text' in item %}
                {{- item.text }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
{%- endmacro %}
{%- if not messages %}
    {{- raise_exception('No messages provided.') }}
{%- endif %}
{%- for message in messages %}
    {%- set content = render_content(message.content) | trim %}
    {%- if message.role == 'system' and not loop.first %}
        {{- raise_exception('System message must be at the beginning.') }}
    {%- elif message.role == 'assistant' %}
        {%- if '</think>' in content %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}
    {%- elif message.role in ['system', 'user'] %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
    {%- else %}
        {{- raise_exception('Unexpected message role.') }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking %}
        {{- '<think>\\n' }}
    {%- else %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""


def _new_tokenizer() -> Tokenizer:
    """An untrained BPE with Qwen3.5's pipeline: NFC, regex split (isolated), ByteLevel without regex."""
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    # Offsets-only post-processor as in Qwen's tokenizer.json: it adds no BOS/EOS tokens.
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(corpus_path: Path = CORPUS_PATH, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """Train the BPE on the corpus and append the added tokens; ``vocab_size`` counts them too."""
    n_added = len(ADDED_TOKENS)
    if vocab_size < 256 + n_added + 1:
        raise ValueError(f"vocab_size must be at least {256 + n_added + 1} (256 bytes + added tokens)")
    tok = _new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_added,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train([str(corpus_path)], trainer)
    for content, special in ADDED_TOKENS:
        added = AddedToken(
            content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special
        )
        if special:
            tok.add_special_tokens([added])
        else:
            tok.add_tokens([added])
    return tok


def _tokenizer_config(tok: Tokenizer, model_max_length: int) -> dict:
    decoder = {}
    for content, special in ADDED_TOKENS:
        decoder[str(tok.token_to_id(content))] = {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
    return {
        "added_tokens_decoder": decoder,
        "add_bos_token": False,
        "add_prefix_space": False,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "errors": "replace",
        # Named tokens the MiniCPMV4_6Processor reads as attributes (tokenizer.image_token, ...).
        "extra_special_tokens": dict(DEFAULT_EXTRA_SPECIAL_TOKENS),
        "model_max_length": model_max_length,
        "split_special_tokens": False,
        "tokenizer_class": "TokenizersBackend",
    }


def build_tokenizer_files(
    out_dir: str | Path,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    seed: int = 0,
    corpus_path: str | Path = CORPUS_PATH,
    model_max_length: int = 262144,
) -> dict:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja into ``out_dir``.

    ``seed`` is accepted for a uniform builder signature; BPE training has no randomness (ties are
    broken by pair order), so the output depends only on the corpus and ``vocab_size``.
    Returns the facts a checkpoint writer needs: total vocab size, added-token ids, eos/pad ids.
    """
    del seed
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(Path(corpus_path), vocab_size)
    (out / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    config = _tokenizer_config(tok, model_max_length)
    (out / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    token_ids = {content: tok.token_to_id(content) for content, _ in ADDED_TOKENS}
    return {
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "token_ids": token_ids,
        "eos_token_id": token_ids[EOS_TOKEN],
        "pad_token_id": token_ids[PAD_TOKEN],
        "stop_token_ids": [token_ids["<|endoftext|>"], token_ids["<|im_end|>"]],
        "files": ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"],
    }


# --------------------------------------------------------------------------------------------
# Corpus generation. The shipped text file is the source of truth; this only regenerates it.

_COLOURS = [
    ("red", "红色"),
    ("green", "绿色"),
    ("blue", "蓝色"),
    ("yellow", "黄色"),
    ("orange", "橙色"),
    ("purple", "紫色"),
    ("pink", "粉色"),
    ("brown", "棕色"),
    ("black", "黑色"),
    ("white", "白色"),
    ("grey", "灰色"),
    ("cyan", "青色"),
]
_SHAPES = [
    ("circle", "circles", "圆"),
    ("square", "squares", "正方形"),
    ("triangle", "triangles", "三角形"),
    ("rectangle", "rectangles", "长方形"),
    ("star", "stars", "星形"),
    ("heart", "hearts", "心形"),
    ("diamond", "diamonds", "菱形"),
    ("hexagon", "hexagons", "六边形"),
    ("ellipse", "ellipses", "椭圆"),
    ("cross", "crosses", "十字"),
]
_RELATIONS = [
    ("left of", "左边"),
    ("right of", "右边"),
    ("above", "上面"),
    ("below", "下面"),
]
_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
_ZH_NUMBERS = ["零", "一", "两", "三", "四", "五", "六", "七", "八", "九", "十"]
_WORDS = [
    ("cat", "猫"),
    ("dog", "狗"),
    ("sun", "太阳"),
    ("moon", "月亮"),
    ("tree", "树"),
    ("book", "书"),
    ("apple", "苹果"),
    ("water", "水"),
    ("fire", "火"),
    ("house", "房子"),
    ("bird", "鸟"),
    ("fish", "鱼"),
    ("hello", "你好"),
    ("phone", "手机"),
    ("river", "河"),
    ("mountain", "山"),
]
_EMOJI = ["🔴", "🟢", "🔵", "🟡", "🟠", "🟣", "⭐", "❤️", "🔺", "🟦", "⚪", "⚫", "😀", "👍", "🎉", "🐱", "🌞"]
_EMOJI_SEQ = ["👨‍👩‍👧", "👋🏽", "🇨🇳", "🇬🇧", "🧑‍💻", "🏳️‍🌈"]
_CHAT_EN = [
    "Hello! How can I help you today?",
    "Could you describe the picture for me?",
    "Sure, here is a short description of the image.",
    "I am not sure, but it looks like a drawing with simple shapes.",
    "Thank you very much for your help.",
    "You're welcome. Let me know if you have any other questions.",
    "Please answer with a single word.",
    "Please answer yes or no.",
    "The answer is written in the top-left corner of the image.",
    "There is nothing else in the picture.",
    "Can you count the objects one by one?",
    "Let's think about this step by step.",
    "I'd like to know what's in the middle of the picture.",
    "It's a sunny day, and the sky is clear.",
    "We'll meet at 10:30 on 2024-05-17 near gate 3.",
    "The total is 1,234.56 dollars, or about 8,900 yuan.",
    "Version 4.6 runs on phones with 8 GB of memory.",
    "Error 404: the page you're looking for doesn't exist.",
    "Call me at +1 (555) 010-2233 before 9 p.m.",
]
_CHAT_ZH = [
    "你好！有什么可以帮你的吗？",
    "请描述一下这张图片。",
    "好的，下面是这张图片的简短描述。",
    "我不太确定，但看起来像是一幅由简单图形组成的画。",
    "非常感谢你的帮助。",
    "不客气，如果还有其他问题请随时告诉我。",
    "请用一个词回答。",
    "请回答是或不是。",
    "答案写在图片的左上角。",
    "图片里没有别的东西了。",
    "你能一个一个地数一下吗？",
    "我们一步一步来想。",
    "今天天气很好，天空很晴朗。",
    "我们2024年5月17日上午10点30分在3号门见面。",
    "总价是1234.56元。",
    "手机上运行的是4.6版本的模型。",
]
_OTHER_SCRIPTS = [
    "こんにちは、これは円です。",
    "안녕하세요, 이것은 빨간 사각형입니다.",
    "Привет! Сколько здесь кругов?",
    "Γεια σου! Τι χρώμα έχει ο κύκλος;",
    "مرحبا، ما لون الدائرة؟",
    "Café, naïve, façade, jalapeño, Übergröße, smørrebrød.",
    "Cafe\u0301 and re\u0301sume\u0301 are written with combining accents.",
    "नमस्ते, यह एक लाल वृत्त है।",
    "สวัสดี นี่คือวงกลมสีแดง",
    "Math: x² + y² = r², π ≈ 3.14159, ∑ 1/n², ∞, ≠, ≤, ≥, →, ✓.",
]


def _en_sentences(rng: random.Random) -> list[str]:
    (col, _), (col2, _) = rng.sample(_COLOURS, 2)
    (shape, shapes, _), (shape2, _, _) = rng.sample(_SHAPES, 2)
    rel, _ = rng.choice(_RELATIONS)
    n = rng.randint(0, 10)
    word, _ = rng.choice(_WORDS)
    yes = rng.random() < 0.5
    count_answer = (
        f"There {'is' if n == 1 else 'are'} {n} {shape if n == 1 else shapes}."
        if rng.random() < 0.5
        else f"{_NUMBER_WORDS[n].capitalize()}."
    )
    return [
        f"What colour is the {shape}?",
        rng.choice([f"The {shape} is {col}.", f"{col.capitalize()}.", f"It is {col}."]),
        f"How many {shapes} are there?",
        count_answer,
        f"Is the {col} {shape} {rel} the {col2} {shape2}?",
        "Yes." if yes else "No.",
        f"{'Yes' if yes else 'No'}, the {col} {shape} is{'' if yes else ' not'} {rel} the {col2} {shape2}.",
        "What word is written?",
        rng.choice([f'The word is "{word}".', f"{word}", f"It says {word.upper()}."]),
        f"A {col} {shape} is drawn at ({rng.randint(0, 447)}, {rng.randint(0, 447)}) "
        f"with a radius of {rng.randint(4, 120)} pixels.",
        f"I see {n} {col} {shapes} and {rng.randint(0, 9)} {col2} {rng.choice(_SHAPES)[1]}.",
    ]


def _zh_sentences(rng: random.Random) -> list[str]:
    (_, col), (_, col2) = rng.sample(_COLOURS, 2)
    (_, _, shape), (_, _, shape2) = rng.sample(_SHAPES, 2)
    _, rel = rng.choice(_RELATIONS)
    n = rng.randint(0, 10)
    _, word = rng.choice(_WORDS)
    yes = rng.random() < 0.5
    return [
        f"{shape}是什么颜色？",
        rng.choice([f"{shape}是{col}的。", f"{col}。", f"是{col}。"]),
        f"有几个{shape}？",
        rng.choice([f"有{n}个{shape}。", f"{_ZH_NUMBERS[n]}个。", f"{n}个。"]),
        f"{col}的{shape}在{col2}的{shape2}的{rel}吗？",
        "是。" if yes else "不是。",
        f"{'是的' if yes else '不是'}，{col}的{shape}{'在' if yes else '不在'}{col2}的{shape2}的{rel}。",
        "写的是什么字？",
        rng.choice([f"写的是“{word}”。", f"{word}", f"图片上写着“{word}”。"]),
        f"图中有{n}个{col}的{shape}和{rng.randint(0, 9)}个{col2}的{shape2}。",
    ]


def _misc_lines(rng: random.Random) -> list[str]:
    digits = "".join(str(rng.randint(0, 9)) for _ in range(rng.randint(1, 12)))
    return [
        rng.choice(_CHAT_EN),
        rng.choice(_CHAT_ZH),
        f"{rng.choice(_EMOJI)} {rng.choice(_COLOURS)[0]} {rng.choice(_EMOJI)}{rng.choice(_EMOJI_SEQ)}",
        f"{rng.choice(_COLOURS)[1]}{rng.choice(_EMOJI)}{rng.choice(_SHAPES)[2]}",
        rng.choice(_OTHER_SCRIPTS),
        f"Number {digits}, {rng.randint(0, 99)}%, {rng.uniform(0, 100):.2f}, #{rng.randint(1, 999)}.",
        f"  indented {rng.choice(_WORDS)[0]}\twith\ttabs   and    spaces  ",
    ]


def generate_corpus(seed: int = 0, n_blocks: int = 320) -> str:
    """Deterministic synthetic corpus (~250 KB) in the domain of the tiny model's synthetic task."""
    rng = random.Random(seed)
    lines: list[str] = []
    for _ in range(n_blocks):
        lines += _en_sentences(rng) + _zh_sentences(rng)
        if rng.random() < 0.5:
            lines += _misc_lines(rng)
    # The Chinese position answers as lines of their own, so BPE makes each one token: from bytes
    # alone, 左边 and 右边 began with the same token (0xE5) and a model had to decide left or right
    # one token later than in English (docs/eval.md, session 11). English segmentation is unchanged.
    lines += [zh for _, zh in _RELATIONS] * 40
    return "\n".join(lines) + "\n"


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-corpus", action="store_true", help="regenerate the shipped corpus file")
    parser.add_argument("--out", type=Path, help="write tokenizer files into this directory")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    args = parser.parse_args()
    if args.write_corpus:
        CORPUS_PATH.parent.mkdir(parents=True, exist_ok=True)
        CORPUS_PATH.write_text(generate_corpus(), encoding="utf-8")
        print(f"wrote {CORPUS_PATH} ({CORPUS_PATH.stat().st_size} bytes)")
    if args.out:
        print(json.dumps(build_tokenizer_files(args.out, vocab_size=args.vocab_size), indent=2))


if __name__ == "__main__":
    _main()
