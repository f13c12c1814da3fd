"""LLaVA-UHD image slicing of MiniCPM-V 4.6 (source view + grid of tiles), as transformers' PIL processor.

The geometry (`plan_slices`) is pure Python integer/float arithmetic done in the same order as the
reference so that every grid and size matches exactly; the prompt builder can use it to count image
tokens without touching pixels, except under MiniCPM-OCR's small_image_upsize "adaptive", which sizes
the source view and each tile from their pixels (processing/small_image_upsize.py).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from edge_runtime.errors import CheckpointError, InputError
from edge_runtime.processing.image import (
    BICUBIC,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MEAN,
    DEFAULT_RESCALE,
    DEFAULT_STD,
    load_image,
    normalize,
    resize,
)
from edge_runtime.processing.small_image_upsize import adaptive_resolution, cell_box, check_choice


@dataclass(frozen=True)
class VisionMode:
    """How one vision-graph variant turns a slice into LLM tokens.

    `merge` patches per side are fused into one token (the slice sides snap to multiples of
    patch_size * merge); a `fixed_tokens` mode (a resampler) gives every slice the preprocessor's
    `image_feature_size` tokens instead. `position_ids(h, w, side)` are the graph's position
    inputs for a row-major grid (None: the default NaViT bucket ids, window-major for merging).
    """

    merge: int
    fixed_tokens: bool = False
    position_ids: Callable[[int, int, int], np.ndarray] | None = None
    # the same ids as graph ops (h, w, fp32 bucket boundaries, side) -> tensor, for a vision graph
    # that takes pixels (the ExecuTorch runner's image input)
    graph_position_ids: Callable[..., Any] | None = None


_MODES: dict[str, VisionMode] = {"16x": VisionMode(4), "4x": VisionMode(2)}  # MiniCPM-V 4.6's


def register_vision_mode(name: str, mode: VisionMode) -> None:
    """A family adds its vision variants (families/*.py); names are unique across families."""
    if not name.isidentifier() or not name.islower():
        raise ValueError(
            f"vision mode {name!r} must be a lower-case identifier (graph and method names use it)"
        )
    if name in _MODES and _MODES[name] != mode:
        raise ValueError(f"vision mode {name!r} is already registered differently")
    _MODES[name] = mode


def vision_mode_names() -> tuple[str, ...]:
    """Every registered vision variant, of every family."""
    import edge_runtime.families  # noqa: F401 - the families register their modes on import

    return tuple(_MODES)


def vision_mode(name: str) -> VisionMode:
    if name not in _MODES:
        import edge_runtime.families  # noqa: F401 - the families register their modes on import
    try:
        return _MODES[name]
    except KeyError:
        raise InputError(f"downsample_mode must be one of {tuple(_MODES)}, got {name!r}") from None


def merge_factor(mode: str) -> int:
    """Patches per side merged into one LLM token: 4 for "16x" (ViT merger + MLP merger), 2 for "4x"."""
    return vision_mode(mode).merge


def token_divisor(mode: str) -> int:
    """Patches per LLM token: 16 for "16x", 4 for "4x"."""
    return merge_factor(mode) ** 2


def tokens_for(patch_h: int, patch_w: int, mode: str, image_feature_size: int = 64) -> int:
    """LLM tokens of one slice of patch grid (patch_h, patch_w)."""
    if vision_mode(mode).fixed_tokens:
        return image_feature_size
    return patch_h * patch_w // token_divisor(mode)


def ensure_divide(length: float, divisor: int) -> int:
    """Nearest multiple of `divisor` (Python banker's rounding, as the reference), at least `divisor`."""
    return max(round(length / divisor) * divisor, divisor)


def get_sliced_grid(
    image_size: tuple[int, int], max_slice_nums: int, scale_resolution: int
) -> tuple[int, int] | None:
    """(rows, cols) of the tile grid, or None when the image is small enough for the source view alone.

    Tries slice counts around ceil(area / scale_resolution^2) and picks the factorisation whose aspect
    ratio is closest in log space; ties go to more rows.
    """
    height, width = image_size
    log_ratio = math.log(width / height)
    ratio = width * height / (scale_resolution * scale_resolution)
    multiple = min(math.ceil(ratio), max_slice_nums)
    if multiple <= 1:
        return None
    best: tuple[int, int] = (1, 1)
    best_err = float("inf")
    for n in (multiple - 1, multiple, multiple + 1):
        if n == 1 or n > max_slice_nums:
            continue
        for rows in range(1, n + 1):
            if n % rows:
                continue
            cols = n // rows
            err = abs(log_ratio - math.log(cols / rows))
            if err < best_err or (err == best_err and rows > best[0]):
                best, best_err = (rows, cols), err
    return best


def find_best_resize(
    image_size: tuple[float, float],
    scale_resolution: int,
    patch_size: int,
    downsample_mode: str,
    allow_upscale: bool = False,
) -> tuple[int, int]:
    """(height, width) in pixels: area scaled to ~scale_resolution^2 (if too big or upscaling is
    allowed), keeping the aspect ratio, then snapped to multiples of patch_size * merge_factor."""
    height, width = image_size
    if height * width > scale_resolution * scale_resolution or allow_upscale:
        aspect = width / height
        height = int(scale_resolution / math.sqrt(aspect))
        width = int(height * aspect)
    unit = patch_size * merge_factor(downsample_mode)
    return ensure_divide(height, unit), ensure_divide(width, unit)


def get_refine_size(
    image_size: tuple[int, int],
    grid: tuple[int, int],
    scale_resolution: int,
    patch_size: int,
    downsample_mode: str,
    allow_upscale: bool = True,
) -> tuple[int, int]:
    """(height, width) of the whole image before it is cut into `grid` equal tiles."""
    height, width = image_size
    rows, cols = grid
    refine_w = ensure_divide(width, cols)
    refine_h = ensure_divide(height, rows)
    tile_h, tile_w = find_best_resize(
        (refine_h / rows, refine_w / cols), scale_resolution, patch_size, downsample_mode, allow_upscale
    )
    return tile_h * rows, tile_w * cols


@dataclass(frozen=True)
class SliceConfig:
    """Preprocessing settings; `from_preprocessor_config` reads them from a checkpoint."""

    max_slice_nums: int = 9
    scale_resolution: int = 448
    patch_size: int = 14
    slice_mode: bool = True
    downsample_mode: str = "16x"
    image_mean: tuple[float, float, float] = DEFAULT_MEAN
    image_std: tuple[float, float, float] = DEFAULT_STD
    rescale_factor: float = DEFAULT_RESCALE
    resample: int = BICUBIC
    use_image_id: bool = True
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    image_feature_size: int = 64  # tokens per slice of a fixed-token (resampler) mode
    # MiniCPM-OCR's processor key (processing/small_image_upsize.py): "always" upscales an unsliced
    # small image to scale_resolution (every family's behaviour), "never" keeps its native size,
    # "adaptive" decides from glyph size and density (needs OpenCV, the `ocr` extra)
    small_image_upsize: str = "always"

    def __post_init__(self) -> None:
        merge_factor(self.downsample_mode)
        check_choice(self.small_image_upsize)
        for name in ("max_slice_nums", "scale_resolution", "patch_size", "image_feature_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if len(value) != 3:
                raise InputError(f"{name} must have 3 values (RGB), got {value!r}")
        if any(s == 0 for s in self.image_std):
            raise InputError(f"image_std must be non-zero, got {self.image_std!r}")

    @property
    def token_divisor(self) -> int:
        return token_divisor(self.downsample_mode)

    @classmethod
    def from_preprocessor_config(cls, config: Mapping[str, Any], **overrides: Any) -> SliceConfig:
        """Build from a `preprocessor_config.json` dict (flat, or nested under "image_processor").

        Reads the transformers keys (max_slice_nums, scale_resolution, patch_size, slice_mode,
        downsample_mode, use_image_id, image_mean, image_std, rescale_factor, resample) and the legacy
        remote-code names norm_mean / norm_std. Absent keys keep the class defaults; `overrides` win.
        """
        cfg = config.get("image_processor", config)
        if not isinstance(cfg, Mapping):
            raise CheckpointError("preprocessor config: 'image_processor' must be an object")
        kwargs: dict[str, Any] = {}
        for key in ("max_slice_nums", "scale_resolution", "patch_size", "resample", "image_feature_size"):
            if cfg.get(key) is not None:
                kwargs[key] = int(cfg[key])
        for key in ("slice_mode", "use_image_id"):
            if cfg.get(key) is not None:
                kwargs[key] = bool(cfg[key])
        for key in ("downsample_mode", "small_image_upsize"):
            if cfg.get(key) is not None:
                kwargs[key] = str(cfg[key])
        if cfg.get("rescale_factor") is not None:
            kwargs["rescale_factor"] = float(cfg["rescale_factor"])
        for key, legacy in (("image_mean", "norm_mean"), ("image_std", "norm_std")):
            value = cfg.get(key, cfg.get(legacy))
            if value is not None:
                values = [value] * 3 if isinstance(value, int | float) else list(value)
                kwargs[key] = tuple(float(v) for v in values)
        kwargs.update(overrides)
        try:
            return cls(**kwargs)
        except InputError as exc:
            raise CheckpointError(f"preprocessor config: {exc}") from None


@dataclass(frozen=True)
class CellTile:
    """A tile taken from the original image's grid cell instead of the refined image (small_image_upsize
    "adaptive", when the cell's own size costs fewer pixels than the regular tile)."""

    box: tuple[int, int, int, int]  # (top, left, bottom, right) in the original image
    size: tuple[int, int]  # (height, width) the cell is resized to; the box's own size: cut as is


@dataclass(frozen=True)
class SlicePlan:
    """Geometry of one image's slices; all sizes are (height, width) in pixels."""

    image_size: tuple[int, int]
    source_size: tuple[int, int]
    grid: tuple[int, int] | None
    refine_size: tuple[int, int] | None
    patch_size: int
    downsample_mode: str
    image_feature_size: int = 64
    # per tile (row-major): a CellTile replacing the regular tile, or None; empty: every tile regular
    cell_tiles: tuple[CellTile | None, ...] = ()

    @property
    def tile_size(self) -> tuple[int, int] | None:
        """The regular tile (a 1/grid share of the refined image); `slice_sizes` has every tile's."""
        if self.grid is None or self.refine_size is None:
            return None
        return self.refine_size[0] // self.grid[0], self.refine_size[1] // self.grid[1]

    @property
    def slice_sizes(self) -> list[tuple[int, int]]:
        """Source first, then one entry per tile in row-major order."""
        tile = self.tile_size
        if tile is None or self.grid is None:
            return [self.source_size]
        n = self.grid[0] * self.grid[1]
        cells = self.cell_tiles or (None,) * n
        return [self.source_size] + [tile if cell is None else cell.size for cell in cells]

    @property
    def patch_grids(self) -> list[tuple[int, int]]:
        p = self.patch_size
        return [(h // p, w // p) for h, w in self.slice_sizes]

    @property
    def token_counts(self) -> list[int]:
        return [tokens_for(h, w, self.downsample_mode, self.image_feature_size) for h, w in self.patch_grids]


def plan_slices(height: int, width: int, config: SliceConfig, image: Image.Image | None = None) -> SlicePlan:
    """Slice geometry for an image of (height, width) pixels; no pixels needed, except under
    small_image_upsize "adaptive" (then `image`, the RGB image itself, is required)."""
    if height < 1 or width < 1:
        raise InputError(f"image has no pixels ({width}x{height})")
    upsize = config.small_image_upsize
    if upsize == "adaptive":
        if image is None:
            raise InputError("small_image_upsize 'adaptive' sizes slices from their pixels: pass the image")
        if (image.height, image.width) != (height, width):
            raise InputError(f"image is {image.width}x{image.height}, the plan is for {width}x{height}")
    grid = (
        get_sliced_grid((height, width), config.max_slice_nums, config.scale_resolution)
        if config.slice_mode
        else None
    )
    scale, patch, mode = config.scale_resolution, config.patch_size, config.downsample_mode
    # a sliced image's source view is larger than scale_resolution^2 and always shrinks to it; an
    # unsliced one is upscaled ("always"), kept ("never") or decided from its pixels ("adaptive")
    resolution, upscale = scale, grid is None and upsize == "always"
    if grid is None and upsize == "adaptive":
        assert image is not None
        chosen = adaptive_resolution(image, scale)
        resolution, upscale = chosen or scale, chosen is not None
    source = find_best_resize((height, width), resolution, patch, mode, allow_upscale=upscale)
    refine = (
        None
        if grid is None
        else get_refine_size((height, width), grid, scale, patch, mode, allow_upscale=True)
    )
    cells: tuple[CellTile | None, ...] = ()
    if grid is not None and refine is not None and upsize == "adaptive":
        assert image is not None
        tile = (refine[0] // grid[0], refine[1] // grid[1])
        cells = tuple(
            _cell_tile(image, grid, r, c, tile, config) for r in range(grid[0]) for c in range(grid[1])
        )
        if all(cell is None for cell in cells):
            cells = ()
    return SlicePlan(
        (height, width),
        source,
        grid,
        refine,
        config.patch_size,
        config.downsample_mode,
        config.image_feature_size,
        cells,
    )


def _cell_tile(
    image: Image.Image,
    grid: tuple[int, int],
    row: int,
    col: int,
    tile: tuple[int, int],
    config: SliceConfig,
) -> CellTile | None:
    """Tile (row, col) of an "adaptive" image: its original-pixel cell at the cell's adaptive size,
    when the cell fits in scale_resolution^2, is not judged small dense text (that gets the regular
    upscaled tile) and costs fewer pixels than the regular tile; else None (the regular tile)."""
    scale = config.scale_resolution
    box = cell_box((image.height, image.width), grid, row, col)
    top, left, bottom, right = box
    cell_h, cell_w = bottom - top, right - left
    if cell_h < 1 or cell_w < 1 or cell_h * cell_w > scale * scale:
        return None
    chosen = adaptive_resolution(image.crop((left, top, right, bottom)), scale)
    if chosen == scale:
        return None
    size = find_best_resize(
        (cell_h, cell_w),
        chosen or scale,
        config.patch_size,
        config.downsample_mode,
        allow_upscale=chosen is not None,
    )
    if size[0] * size[1] >= tile[0] * tile[1]:
        return None
    return CellTile(box, size)


@dataclass
class PreparedImage:
    """Normalised slices of one image, ready for `patches.slice_to_patches`.

    `slices[i]` is float32 [3, H, W] (source first, then tiles row-major); `patch_grids[i]` is its
    (h, w) in patches; `token_counts[i]` its LLM tokens; `grid` is (rows, cols) or None.
    """

    slices: list[np.ndarray]
    patch_grids: list[tuple[int, int]]
    grid: tuple[int, int] | None
    token_counts: list[int]
    downsample_mode: str
    plan: SlicePlan = field(repr=False)
    # the same slices before normalisation: uint8 [3, H, W] (CHW, as ExecuTorch's runner `Image`),
    # for a vision graph that normalises itself (the executorch bundles)
    pixels: list[np.ndarray] = field(default_factory=list, repr=False)

    @property
    def num_tokens(self) -> int:
        return sum(self.token_counts)


def slice_image(image: Image.Image, config: SliceConfig) -> PreparedImage:
    """Resize, cut and normalise an RGB PIL image (see `image.to_rgb`) into its slices."""
    if image.mode != "RGB":
        raise InputError(f"slice_image expects an RGB image, got mode {image.mode!r}")
    plan = plan_slices(image.height, image.width, config, image)
    norm = (config.image_mean, config.image_std, config.rescale_factor)

    src_h, src_w = plan.source_size
    source = resize(image, src_h, src_w, config.resample)
    slices = [normalize(source, *norm)]
    pixels = [np.ascontiguousarray(np.asarray(source).transpose(2, 0, 1))]
    tile = plan.tile_size
    if plan.grid is not None and plan.refine_size is not None and tile is not None:
        whole = resize(image, *plan.refine_size, config.resample)
        refined = normalize(whole, *norm)
        raw = np.asarray(whole).transpose(2, 0, 1)
        rows, cols = plan.grid
        th, tw = tile
        cells = plan.cell_tiles or (None,) * (rows * cols)
        for r in range(rows):
            for c in range(cols):
                cell = cells[r * cols + c]
                if cell is not None:  # "adaptive": the original cell at its own size
                    top, left, bottom, right = cell.box
                    cut_image = image.crop((left, top, right, bottom))
                    if cell.size != (bottom - top, right - left):
                        cut_image = resize(cut_image, *cell.size, BICUBIC)  # BICUBIC whatever `resample`
                    slices.append(normalize(cut_image, *norm))
                    pixels.append(np.ascontiguousarray(np.asarray(cut_image).transpose(2, 0, 1)))
                    continue
                cut = (slice(None), slice(r * th, (r + 1) * th), slice(c * tw, (c + 1) * tw))
                slices.append(np.ascontiguousarray(refined[cut]))
                pixels.append(np.ascontiguousarray(raw[cut]))
    return PreparedImage(
        slices, plan.patch_grids, plan.grid, plan.token_counts, config.downsample_mode, plan, pixels
    )


def prepare_image(path: str | os.PathLike[str], config: SliceConfig | None = None) -> PreparedImage:
    """Load an image file (with the config's pixel limit) and slice it."""
    config = config or SliceConfig()
    return slice_image(load_image(path, max_pixels=config.max_pixels), config)
