"""Open a model for the host loop: a checkpoint (torch reference) or a bundle (its format's backend)."""

from __future__ import annotations

from pathlib import Path

from .errors import InputError
from .session import HostAssets, Session


def open_checkpoint_session(
    checkpoint: str | Path, max_context: int | None = None, threads: int | None = None, **slice_overrides
) -> Session:
    """The PyTorch reference on a Hugging Face-format checkpoint directory."""
    from .backends.torch_ref import DEFAULT_MAX_CONTEXT, TorchBackend
    from .checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    backend = TorchBackend(ckpt, max_context=max_context or DEFAULT_MAX_CONTEXT, threads=threads)
    assets = HostAssets.from_dir(
        checkpoint,
        ckpt.config.vision.num_patches_per_side,
        ckpt.config.downsample_mode,  # the checkpoint's default variant, as its bundles record it
        ckpt.family,
        **slice_overrides,
    )
    return Session(backend, assets)


def open_session(
    checkpoint: str | Path | None = None,
    bundle: str | Path | None = None,
    max_context: int | None = None,
    threads: int | None = None,
    **slice_overrides,
) -> Session:
    """Exactly one of checkpoint / bundle."""
    if (checkpoint is None) == (bundle is None):
        raise InputError("give exactly one of --checkpoint or --bundle")
    if checkpoint is not None:
        return open_checkpoint_session(checkpoint, max_context, threads, **slice_overrides)
    from .bundle import open_bundle_session

    return open_bundle_session(bundle, max_context=max_context, threads=threads, **slice_overrides)
