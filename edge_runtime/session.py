"""The host half of a chat turn, shared by `chat`, `parity`, `bench` and `eval` on every backend.

image files + question -> slices -> vision graph per slice -> prompt ids -> spliced embeddings
-> generation loop -> text. The host files (tokenizer, chat template, preprocessor config,
generation config) are read from a checkpoint directory or a bundle, which carries copies.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .backends.base import Backend
from .errors import CheckpointError, InputError
from .generation import GenerationResult, SamplingConfig, build_input_embeddings, generate
from .jsonfile import read_json_file
from .processing.canvas_positions import CanvasLayout, CanvasTokens, canvas_positions
from .processing.patches import slice_to_patches
from .processing.prompt import ImageLayout, Message, Prompt, PromptBuilder, VideoLayout
from .processing.slicing import PreparedImage, SliceConfig, merge_factor, prepare_image
from .processing.tokenizer import StreamDecoder, Tokenizer
from .processing.video import load_video, prepare_units

VideoInput = str | Path | Sequence[PreparedImage]


@dataclass
class HostAssets:
    """Everything the host needs besides the graphs: tokenizer, prompts, slicing, stop ids."""

    tokenizer: Tokenizer
    prompts: PromptBuilder
    slice_config: SliceConfig
    num_patches_per_side: int
    stop_ids: tuple[int, ...]
    # marker ids of Canvas M-RoPE, for a family whose RoPE positions are host-computed rows
    # (Family.rope_positions == "canvas"); None: positions are the cache index
    canvas_tokens: CanvasTokens | None = None

    @classmethod
    def from_dir(
        cls,
        path: str | Path,
        num_patches_per_side: int,
        default_mode: str | None = None,
        family: Any = None,
        canvas_config: Mapping[str, Any] | None = None,
        **slice_overrides: Any,
    ) -> HostAssets:
        """Read host files from a checkpoint or bundle directory; CLI flags override the preprocessor
        config, and `default_mode` (the model's default vision variant) stands in where it names
        none (a remote-code processor config has no downsample_mode). `family` supplies placeholder
        names, a chat template and preprocessing values where the checkpoint's files have none (a
        remote-code family). `canvas_config`: the Canvas M-RoPE marker ids where the directory has
        no config.json (a bundle's manifest `model.canvas_tokens`)."""
        path = Path(path)
        pre_path = path / "preprocessor_config.json"
        pre = read_json_file(pre_path, "preprocessor config", CheckpointError, missing_ok=True)
        if pre is None:  # a release without one (2.0 slices in its modeling code): the family's values
            pre = dict(getattr(family, "preprocessor", None) or {})
        named = isinstance(pre, dict) and "downsample_mode" in pre.get("image_processor", pre)
        if default_mode is not None and not named and slice_overrides.get("downsample_mode") is None:
            slice_overrides["downsample_mode"] = default_mode
        overrides = {k: v for k, v in slice_overrides.items() if v is not None}
        slice_config = SliceConfig.from_preprocessor_config(pre, **overrides)
        tokens = getattr(family, "prompt_tokens", None)
        tokenizer = Tokenizer(path, dict(tokens) if tokens else None)
        prompts = PromptBuilder.from_dir(
            path,
            tokenizer,
            use_image_id=slice_config.use_image_id,
            fallback_template=getattr(family, "chat_template", None),
        )
        canvas = None
        if getattr(family, "rope_positions", "cache") == "canvas":
            raw = canvas_config or read_json_file(path / "config.json", "config", CheckpointError)
            canvas = CanvasTokens.from_config(raw)
        return cls(tokenizer, prompts, slice_config, num_patches_per_side, tuple(tokenizer.stop_ids), canvas)


VisionInput = tuple[np.ndarray, np.ndarray | None, str]  # (patches or uint8 pixels, position ids, mode)


@dataclass
class PromptPlan:
    """A prompt and the vision graph inputs of its images and video frames, in prompt order."""

    prompt: Prompt
    images: list[PreparedImage]
    image_inputs: list[VisionInput]
    video_inputs: list[VisionInput]
    preprocess_ms: float
    rope: CanvasLayout | None = None  # the prompt's Canvas M-RoPE rows, where the family has them


@dataclass
class PreparedInput:
    """A prompt ready for the decoder, with what it took to get there."""

    prompt: Prompt
    images: list[PreparedImage]
    slice_embeds: list[np.ndarray]  # image slices, then video slices, in prompt order
    embeds: np.ndarray
    preprocess_ms: float
    vision_ms: float
    vision_slice_ms: list[float] = field(default_factory=list)
    # RoPE position rows [3, T] + decode offset of a Canvas M-RoPE family; None: the cache index
    rope: CanvasLayout | None = None

    @property
    def n_slices(self) -> int:
        return len(self.slice_embeds)

    @property
    def n_image_tokens(self) -> int:
        return sum(e.shape[0] for e in self.slice_embeds)


@dataclass
class ChatResult:
    text: str
    prepared: PreparedInput
    generation: GenerationResult

    def to_json(self) -> dict[str, Any]:
        """The documented `chat --json` object."""
        g = self.generation
        t = g.timings
        return {
            "text": self.text,
            "prompt_token_ids": list(self.prepared.prompt.ids),
            "token_ids": list(g.token_ids),
            "stop_reason": g.stop_reason,
            "n_prompt_tokens": len(self.prepared.prompt.ids),
            "n_slices": self.prepared.n_slices,
            "n_image_tokens": self.prepared.n_image_tokens,
            "preprocess_ms": self.prepared.preprocess_ms,
            "vision_ms": self.prepared.vision_ms,
            "vision_slice_ms": list(self.prepared.vision_slice_ms),
            "prefill_ms": t.prefill_ms,
            "ttft_ms": self.prepared.preprocess_ms + self.prepared.vision_ms + t.ttft_ms,
            "decode_tok_s": t.decode_tok_s,
        }


class Session:
    """One backend plus host assets: prepares prompts and runs the shared generation loop."""

    def __init__(self, backend: Backend, assets: HostAssets):
        self.backend = backend
        self.assets = assets

    def slice_config(
        self, downsample_mode: str | None = None, max_slice_nums: int | None = None
    ) -> SliceConfig:
        changes = {"downsample_mode": downsample_mode, "max_slice_nums": max_slice_nums}
        return replace(self.assets.slice_config, **{k: v for k, v in changes.items() if v is not None})

    def plan(
        self,
        text: str,
        images: Sequence[str | Path | PreparedImage] = (),
        history: Sequence[Message] = (),
        downsample_mode: str | None = None,
        max_slice_nums: int | None = None,
        videos: Sequence[VideoInput] = (),
    ) -> PromptPlan:
        """Slice images (and video frames) and build the prompt, without running any graph: what
        `prepare` encodes, and what a trainer feeds its own differentiable forward."""
        config = self.slice_config(downsample_mode, max_slice_nums)
        t0 = time.perf_counter()
        prepared = [im if isinstance(im, PreparedImage) else prepare_image(im, config) for im in images]
        clips = [self._video_units(v, config) for v in videos]
        prompt = self.assets.prompts.chat(
            text, [image_layout(im) for im in prepared], [VideoLayout([image_layout(u) for u in clip]) for clip in clips],
            history=history,
        )  # fmt: skip
        image_inputs = [x for im in prepared for x in self._vision_inputs(im, config)]
        video_inputs = [x for clip in clips for unit in clip for x in self._vision_inputs(unit, config)]
        rope = self._canvas_layout(prompt.ids, prepared, clips, config)
        ms = (time.perf_counter() - t0) * 1000
        return PromptPlan(prompt, prepared, image_inputs, video_inputs, ms, rope)

    def prepare(
        self,
        text: str,
        images: Sequence[str | Path | PreparedImage] = (),
        history: Sequence[Message] = (),
        downsample_mode: str | None = None,
        max_slice_nums: int | None = None,
        videos: Sequence[VideoInput] = (),
    ) -> PreparedInput:
        """Slice and encode images (and video frames), build the prompt, splice features into its embeddings.

        A video is a file (decoded at 1 fps, needs PyAV) or its already prepared visual units; each
        unit is sliced like an image and fills `<|video_pad|>` placeholders.
        """
        plan = self.plan(text, images, history, downsample_mode, max_slice_nums, videos)
        slice_ms: list[float] = []
        image_embeds = self._encode(plan.image_inputs, slice_ms)
        video_embeds = self._encode(plan.video_inputs, slice_ms)
        info = self.backend.info
        embeds = build_input_embeddings(
            self.backend, plan.prompt.ids, image_embeds, image_token_id=info.image_token_id,
            video_embeds=video_embeds, video_token_id=info.video_token_id,
        )  # fmt: skip
        return PreparedInput(
            plan.prompt,
            plan.images,
            image_embeds + video_embeds,
            embeds,
            plan.preprocess_ms,
            sum(slice_ms),
            slice_ms,
            plan.rope,
        )

    def _canvas_layout(
        self,
        ids: Sequence[int],
        images: Sequence[PreparedImage],
        clips: Sequence[Sequence[PreparedImage]],
        config: SliceConfig,
    ) -> CanvasLayout | None:
        """Canvas M-RoPE rows of a prompt from its ids and every crop's patch grid (None for a family
        whose positions are the cache index). Computed here, next to the prompt, so that every
        caller of `plan` / `prepare` (chat, parity, bench, eval, trainers) gets the same rows."""
        tokens = self.assets.canvas_tokens
        if tokens is None:
            return None
        frames = [u for clip in clips for u in clip]
        modes = {u.downsample_mode for u in (*images, *frames)} or {config.downsample_mode}
        if len(modes) > 1:
            raise InputError(f"one prompt mixes downsample modes {sorted(modes)}; Canvas M-RoPE needs one")
        return canvas_positions(
            ids,
            tokens,
            [g for im in images for g in im.patch_grids],
            [g for u in frames for g in u.patch_grids],
            merge=merge_factor(modes.pop()),
        )

    def _video_units(self, video: VideoInput, config: SliceConfig) -> list[PreparedImage]:
        if isinstance(video, str | Path):
            return prepare_units(load_video(video, max_pixels=config.max_pixels), config)
        return list(video)

    def _slice_inputs(
        self, image: PreparedImage, config: SliceConfig
    ) -> list[tuple[np.ndarray, np.ndarray, str]]:
        """(patches, position ids, mode) of every slice, in the vision graph's window-major order."""
        mode, side = image.downsample_mode, self.assets.num_patches_per_side
        return [(*slice_to_patches(s, mode, config.patch_size, side), mode) for s in image.slices]

    def _vision_inputs(self, image: PreparedImage, config: SliceConfig) -> list[VisionInput]:
        """What the backend's vision graph takes per slice: (patches, position ids, mode), or
        (uint8 pixels, None, mode) for a graph that normalises and patchifies itself."""
        if self.backend.takes_pixels and len(image.pixels) == len(image.slices):
            return [(px, None, image.downsample_mode) for px in image.pixels]
        return self._slice_inputs(image, config)

    def _encode(self, inputs: list[VisionInput], times: list[float]) -> list[np.ndarray]:
        """Run the vision graph slice by slice, recording each slice's time."""
        out = []
        for patches, positions, mode in inputs:
            t0 = time.perf_counter()
            if positions is None:
                out.append(self.backend.vision_encoder_pixels(patches, mode))
            else:
                out.append(self.backend.vision_encoder(patches, positions, mode))
            times.append((time.perf_counter() - t0) * 1000)
        return out

    def sampling(self, **kwargs: Any) -> SamplingConfig:
        """A SamplingConfig with this checkpoint's stop ids unless the caller gives others."""
        kwargs.setdefault("stop_ids", self.assets.stop_ids)
        return SamplingConfig(**kwargs)

    def generate(
        self, prepared: PreparedInput, sampling: SamplingConfig, on_text: Callable[[str], None] | None = None
    ) -> ChatResult:
        """Run the shared loop; `on_text` receives complete UTF-8 text pieces as they are decoded."""
        decoder = StreamDecoder(self.assets.tokenizer)
        on_token = None
        if on_text is not None:

            def on_token(token_id: int) -> None:
                piece = decoder.push(token_id)
                if piece:
                    on_text(piece)

        result = generate(
            self.backend, prepared.embeds, sampling, on_token=on_token, prompt_ids=prepared.prompt.ids,
            rope=prepared.rope,
        )  # fmt: skip
        if on_text is not None:
            tail = decoder.flush()
            if tail:
                on_text(tail)
        text = self.assets.tokenizer.decode(list(result.token_ids))
        return ChatResult(text, prepared, result)


def image_layout(image: PreparedImage) -> ImageLayout:
    """Token counts of one prepared image (or video unit) for placeholder expansion."""
    return ImageLayout(image.token_counts[0], image.grid, list(image.token_counts[1:]))
