"""transformers-side references for tests: the MiniCPM-V 4.6 processor built from its parts.

`AutoProcessor` wants torchvision only for the video processor, which is not installable here,
so tests assemble `MiniCPMV4_6Processor` from the tokenizer, the PIL image processor and a video
processor stand-in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from transformers import AutoImageProcessor, AutoTokenizer, BatchFeature
from transformers.models.minicpmv4_6.processing_minicpmv4_6 import MiniCPMV4_6Processor
from transformers.video_processing_utils import VideoProcessorMixin

from edge_runtime.processing.prompt import load_chat_template


class FakeVideoProcessor(VideoProcessorMixin):
    """The real video processor needs torchvision; this one returns whatever `output` holds."""

    slice_mode = True

    def __init__(self, downsample_mode: str) -> None:
        self.downsample_mode = downsample_mode
        self.output: dict = {}

    def __call__(self, videos, **kwargs):
        return BatchFeature(self.output)


class Processor(MiniCPMV4_6Processor):
    """Without torchvision, transformers cannot resolve the video processor base class by name."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor":
            return type(argument)
        return super().check_argument_for_proper_class(argument_name, argument)


def build_processor(checkpoint_dir: str | Path, downsample_mode: str = "16x", **image_kwargs) -> Processor:
    """The upstream processor for a checkpoint directory (tokenizer + preprocessor_config + template)."""
    image_processor = AutoImageProcessor.from_pretrained(
        str(checkpoint_dir), backend="pil", downsample_mode=downsample_mode, **image_kwargs
    )
    return Processor(
        image_processor=image_processor,
        video_processor=FakeVideoProcessor(downsample_mode),
        tokenizer=AutoTokenizer.from_pretrained(str(checkpoint_dir)),
        chat_template=load_chat_template(checkpoint_dir),
    )


def split_reference(pixel_values, target_sizes, patch: int = 14) -> list[np.ndarray]:
    """Upstream NaViT packing [1, 3, P, sum(L)*P] -> per-slice row-major patches [L, 3*P*P]."""
    packed, out, start = np.asarray(pixel_values)[0], [], 0
    for h, w in np.asarray(target_sizes).tolist():
        n = h * w
        seg = packed[:, :, start * patch : (start + n) * patch].reshape(3, patch, n, patch)
        out.append(seg.transpose(2, 0, 1, 3).reshape(n, 3 * patch * patch))
        start += n
    assert start * patch == packed.shape[-1]
    return out


def hf_chat_turn(processor, model, images, prompt: str, max_new_tokens: int, **generate_kwargs):
    """One user turn through transformers: the processor's chat template (thinking off) and greedy
    `generate`. Returns (prompt ids, new ids up to and without the first stop id)."""
    import torch
    from PIL import Image

    content = [{"type": "image", "image": Image.open(p)} for p in images] + [{"type": "text", "text": prompt}]
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True,
        return_dict=True, return_tensors="pt", enable_thinking=False,
    )  # fmt: skip
    keep = ("input_ids", "attention_mask", "pixel_values", "target_sizes")
    inputs = {k: v for k, v in inputs.items() if k in keep}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **generate_kwargs)
    prompt_ids = inputs["input_ids"][0].tolist()
    new = out[0, len(prompt_ids) :].tolist()
    stops = model.generation_config.eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops] if stops is not None else [])
    for i, token in enumerate(new):
        if token in stops:
            return prompt_ids, new[:i]
    return prompt_ids, new
