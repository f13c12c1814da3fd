"""Prompt building: the checkpoint's chat template, then MiniCPM-V 4.6 image/video placeholder expansion.

Two steps, exactly as transformers' MiniCPMV4_6Processor does them, so our token ids are
identical to its ids:
1. render the chat template with jinja2 configured like ``apply_chat_template`` (sandboxed,
   ``trim_blocks``/``lstrip_blocks``, special tokens and ``enable_thinking`` as template
   variables). The template writes one ``<|image_pad|>`` per image item and one
   ``<|video_pad|>`` per video item;
2. replace the i-th such token with the expanded placeholder of the i-th image (video), with an
   ``<image_id>i</image_id>`` prefix when ``use_image_id`` (i counts images, and separately
   videos, from 0 within the prompt).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edge_runtime.errors import CheckpointError, InputError
from edge_runtime.processing.tokenizer import Tokenizer


@dataclass(frozen=True)
class ImageLayout:
    """Token counts of one image: its downsampled source view and, if sliced, its tiles (row-major)."""

    source_tokens: int
    grid: tuple[int, int] | None = None  # (rows, cols)
    tile_tokens: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.source_tokens <= 0 or any(n <= 0 for n in self.tile_tokens):
            raise InputError(f"image token counts must be positive: {self}")
        expected = 0 if self.grid is None else self.grid[0] * self.grid[1]
        if len(self.tile_tokens) != expected:
            raise InputError(
                f"image grid {self.grid} needs {expected} tile token counts, got {len(self.tile_tokens)}"
            )


@dataclass(frozen=True)
class VideoLayout:
    """A video is its sampled frames (or stacked canvases), each laid out like an image."""

    frames: list[ImageLayout]

    def __post_init__(self) -> None:
        if not self.frames:
            raise InputError("a video needs at least one frame")


Part = str | ImageLayout | VideoLayout


@dataclass(frozen=True)
class Message:
    """One chat turn. ``content`` is text, or parts in order (text, images, videos)."""

    role: str
    content: str | Sequence[Part]


@dataclass(frozen=True)
class Prompt:
    text: str
    ids: list[int]


# ---- chat template rendering --------------------------------------------------------------------


class _GenerationNoop(jinja2.ext.Extension):
    """Accept ``{% generation %}...{% endgeneration %}`` (assistant-mask markers) and render the body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False
) -> str:
    # Like transformers: no HTML escaping, unlike jinja's built-in tojson.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationNoop, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise CheckpointError(f"chat template does not parse: {exc.message} (line {exc.lineno})") from None


def load_chat_template(checkpoint_dir: str | Path, fallback: str | None = None) -> str:
    """The checkpoint's template: chat_template.jinja, else tokenizer_config / chat_template.json,
    else `fallback` (a remote-code family whose `chat()` builds the prompt in Python)."""
    root = Path(checkpoint_dir)
    jinja_file = root / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    for name in ("tokenizer_config.json", "chat_template.json"):
        path = root / name
        if not path.is_file():
            continue
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
        except (OSError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{path}: cannot read chat template: {exc}") from None
        if isinstance(value, list):  # named templates: [{"name": ..., "template": ...}]
            value = next((t.get("template") for t in value if t.get("name") == "default"), None)
        if isinstance(value, str):
            return value
    if fallback is not None:
        return fallback
    raise CheckpointError(f"{root}: no chat template (chat_template.jinja or tokenizer_config.json)")


def _template_content(
    content: str | Sequence[Part], image_marker: str | None = None
) -> str | list[dict[str, str]]:
    """Our parts as the content items transformers hands to templates (media values are inert);
    with an `image_marker` (remote-code families), one string as their `chat()` builds it: the
    parts joined by newlines, each image written as the marker."""
    if isinstance(content, str):
        return content
    if image_marker is not None:
        if any(isinstance(part, VideoLayout) for part in content):
            raise InputError("this model family takes no video input (give the frames as images)")
        return "\n".join(image_marker if isinstance(part, ImageLayout) else str(part) for part in content)
    items: list[dict[str, str]] = []
    for part in content:
        if isinstance(part, str):
            items.append({"type": "text", "text": part})
        elif isinstance(part, ImageLayout):
            items.append({"type": "image", "image": "<Image>"})
        elif isinstance(part, VideoLayout):
            items.append({"type": "video", "video": "<video>"})
        else:
            raise InputError(f"unsupported message part {type(part).__name__}")
    return items


def _as_message(m: Message | tuple[str, str | Sequence[Part]]) -> Message:
    return m if isinstance(m, Message) else Message(role=m[0], content=m[1])


def render_chat(
    template: str,
    messages: Sequence[Message],
    *,
    special_tokens: Mapping[str, str] | None = None,
    add_generation_prompt: bool = True,
    image_marker: str | None = None,
    **template_vars: Any,
) -> str:
    """Render like transformers' apply_chat_template(tokenize=False); placeholders not expanded."""
    chat = [{"role": m.role, "content": _template_content(m.content, image_marker)} for m in messages]
    variables = {**(special_tokens or {}), **template_vars}
    try:
        return _compile(template).render(
            messages=chat,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except jinja2.TemplateError as exc:
        raise InputError(f"chat template rejected the conversation: {exc}") from None


# ---- placeholder expansion -----------------------------------------------------------------------


def _block(tokens: Mapping[str, str], pad: str, layout: ImageLayout, per_tile: bool) -> str:
    """`<image>pad×n</image>` then rows joined by "\\n", each row = cols × `<slice>pad×m</slice>`.

    A family may wrap tiles differently: `tile_start_token` / `tile_end_token` around each tile
    (default the slice tokens) and `grid_start_token` / `grid_end_token` around the whole grid
    (default none); MiniCPM-V 2.0 wraps each tile in `<image>` inside one `<slice>` block."""
    out = tokens["image_start_token"] + pad * layout.source_tokens + tokens["image_end_token"]
    if layout.grid is None:
        return out
    rows, cols = layout.grid
    counts = layout.tile_tokens if per_tile else [layout.tile_tokens[0]] * (rows * cols)
    start = tokens.get("tile_start_token", tokens["slice_start_token"])
    end = tokens.get("tile_end_token", tokens["slice_end_token"])
    slices = [start + pad * n + end for n in counts]
    grid = "\n".join("".join(slices[r * cols : (r + 1) * cols]) for r in range(rows))
    return out + tokens.get("grid_start_token", "") + grid + tokens.get("grid_end_token", "")


def image_placeholder(layout: ImageLayout, tokens: Mapping[str, str]) -> str:
    """Expanded text of one image (without the image-id prefix)."""
    return _block(tokens, tokens["image_token"], layout, per_tile=True)


def video_placeholder(video: VideoLayout, tokens: Mapping[str, str]) -> str:
    """Frames back to back, no separator; upstream repeats the first tile's count for every tile
    (tiles of one frame are equal-sized crops, so this equals the per-tile count)."""
    return "".join(_block(tokens, tokens["video_token"], f, per_tile=False) for f in video.frames)


def expand_placeholders(
    text: str,
    images: Sequence[ImageLayout],
    videos: Sequence[VideoLayout],
    tokens: Mapping[str, str],
    *,
    use_image_id: bool = True,
) -> str:
    """Replace each image/video mark written by the template with its full placeholder: the single
    image/video token, or a family's `image_marker` text."""
    image_token = tokens.get("image_marker", tokens["image_token"])
    video_token = tokens.get("video_token", "\0no video token\0")
    found = re.findall(f"{re.escape(image_token)}|{re.escape(video_token)}", text)
    n_img, n_vid = found.count(image_token), found.count(video_token)
    if (n_img, n_vid) != (len(images), len(videos)):
        raise InputError(
            f"prompt has {n_img} image and {n_vid} video placeholders for {len(images)} images "
            f"and {len(videos)} videos (does the text contain {image_token!r} or {video_token!r}?)"
        )
    counters = {image_token: 0, video_token: 0}

    def replace(match: re.Match[str]) -> str:
        token = match.group(0)
        i = counters[token]
        counters[token] += 1
        body = (
            image_placeholder(images[i], tokens)
            if token == image_token
            else video_placeholder(videos[i], tokens)
        )
        prefix = f"{tokens['image_id_start_token']}{i}{tokens['image_id_end_token']}" if use_image_id else ""
        return prefix + body

    return re.sub(f"{re.escape(image_token)}|{re.escape(video_token)}", replace, text)


# ---- builder -----------------------------------------------------------------------------------


class PromptBuilder:
    """Turns a conversation plus per-image token layouts into the model's prompt ids."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: str,
        *,
        use_image_id: bool = True,
        enable_thinking: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.use_image_id = use_image_id
        self.enable_thinking = enable_thinking
        _compile(chat_template)  # fail early on a broken template

    @classmethod
    def from_dir(
        cls, checkpoint_dir: str | Path, tokenizer: Tokenizer | None = None, **kwargs: Any
    ) -> PromptBuilder:
        fallback = kwargs.pop("fallback_template", None)
        return cls(
            tokenizer or Tokenizer(checkpoint_dir), load_chat_template(checkpoint_dir, fallback), **kwargs
        )

    def build(
        self,
        messages: Sequence[Message | tuple[str, str | Sequence[Part]]],
        *,
        add_generation_prompt: bool = True,
        **template_vars: Any,
    ) -> Prompt:
        """Render, expand and encode a whole conversation; images/videos are taken in message order."""
        msgs = [_as_message(m) for m in messages]
        if not msgs:
            raise InputError("empty conversation")
        parts = [p for m in msgs if not isinstance(m.content, str) for p in m.content]
        images = [p for p in parts if isinstance(p, ImageLayout)]
        videos = [p for p in parts if isinstance(p, VideoLayout)]
        template_vars.setdefault("enable_thinking", self.enable_thinking)
        tokens = self.tokenizer.extra_special_tokens
        text = render_chat(
            self.chat_template,
            msgs,
            special_tokens=self.tokenizer.special_tokens_map,
            add_generation_prompt=add_generation_prompt,
            image_marker=tokens.get("image_marker"),
            **template_vars,
        )
        text = expand_placeholders(text, images, videos, tokens, use_image_id=self.use_image_id)
        return Prompt(text=text, ids=self.tokenizer.encode_prompt(text))

    def chat(
        self,
        text: str,
        images: Sequence[ImageLayout] = (),
        videos: Sequence[VideoLayout] = (),
        *,
        history: Sequence[Message | tuple[str, str | Sequence[Part]]] = (),
        system: str | None = None,
    ) -> Prompt:
        """The usual case: optional system prompt, past turns, then one user turn of
        ``images + videos + text`` followed by the assistant generation prompt."""
        msgs: list[Message | tuple[str, str | Sequence[Part]]] = []
        if system is not None:
            msgs.append(Message("system", system))
        msgs += history
        msgs.append(Message("user", [*images, *videos, text]))
        return self.build(msgs)
