"""Import timm without torchvision (tests only).

timm (the MiniCPM-V 2.0 vision tower's reference implementation) imports torchvision when it is
loaded, for its data pipeline (transforms, datasets) and for `FrozenBatchNorm2d` in its norm-layer
registry, although none of that runs when a `VisionTransformer` is built or called. The only
torchvision on PyPI for the pinned torch 2.13.0 (0.28.0) is a CUDA build: next to the CPU torch its
import raises, and once installed it also breaks transformers' `AutoImageProcessor`. So timm is
installed without its dependencies (`pip install --no-deps timm==1.0.31`).

`import_timm()` uses the real torchvision if one imports. Otherwise it puts a stand-in into
`sys.modules` that holds exactly the names timm reads while it is imported (timm 1.0.31; the
optional ones timm guards with `try/except ImportError` are left out), imports timm, and takes the
stand-in out of `sys.modules` again, so that no other library (transformers' `is_torchvision_
available`, for one) ever sees a torchvision. Every stand-in class raises when it is instantiated
and `InterpolationMode` has torchvision's members and values, so a code path that would really use
torchvision fails loudly instead of computing something else.
"""

from __future__ import annotations

import enum
import importlib
import importlib.util
import sys
import types
from typing import Any

_PREFIX = "torchvision"


class InterpolationMode(enum.Enum):
    """torchvision.transforms.functional.InterpolationMode's members (timm maps them to names)."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def _unavailable(qualname: str) -> type:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            f"{qualname} is a test stand-in (tests/torchvision_standin.py): no torchvision here"
        )

    name = qualname.rsplit(".", 1)[-1]
    return type(name, (), {"__init__": __init__, "__module__": qualname.rsplit(".", 1)[0]})


# module -> the names timm 1.0.31 imports from it at load time (unguarded imports only)
_SYMBOLS: dict[str, tuple[str, ...]] = {
    "torchvision": (),
    "torchvision.ops": (),
    "torchvision.ops.misc": ("FrozenBatchNorm2d",),  # timm.layers.{create_norm,norm_act}, timm.utils.model
    "torchvision.transforms": ("ToTensor",),  # timm.data.transforms: class MaybeToTensor(ToTensor)
    "torchvision.transforms.functional": (),  # + InterpolationMode below
    "torchvision.datasets": (  # timm.data.dataset_factory
        "CIFAR100",
        "CIFAR10",
        "MNIST",
        "KMNIST",
        "FashionMNIST",
        "ImageFolder",
    ),  # fmt: skip
}


def _standin_modules() -> dict[str, types.ModuleType]:
    modules: dict[str, types.ModuleType] = {}
    for name, symbols in _SYMBOLS.items():
        module = types.ModuleType(name, "test stand-in for torchvision (tests/torchvision_standin.py)")
        module.__path__ = []  # a package, so that submodule imports resolve through sys.modules
        for symbol in symbols:
            setattr(module, symbol, _unavailable(f"{name}.{symbol}"))
        modules[name] = module
    modules["torchvision.transforms.functional"].InterpolationMode = InterpolationMode
    for name, module in modules.items():  # parent.child attributes, as a real import sets them
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(modules[parent], child, module)
    return modules


def _real_torchvision_imports() -> bool:
    """Whether a working torchvision is installed. PyPI's torchvision for torch 2.13 is a CUDA
    build whose import raises (RuntimeError: operator torchvision::nms does not exist) next to
    the CPU torch; its half-imported modules are removed again."""
    if importlib.util.find_spec(_PREFIX) is None:
        return False
    try:
        importlib.import_module(_PREFIX)
    except Exception:
        for name in [n for n in sys.modules if n == _PREFIX or n.startswith(_PREFIX + ".")]:
            del sys.modules[name]
        return False
    return True


def import_timm() -> types.ModuleType:
    """`import timm`, with the torchvision stand-in in place only while timm loads if needed.
    Raises ImportError if timm is not installed (`pip install --no-deps timm==1.0.31`)."""
    if "timm" in sys.modules or _real_torchvision_imports():
        return importlib.import_module("timm")
    if importlib.util.find_spec("timm") is None:
        raise ImportError("timm is not installed (pip install --no-deps timm==1.0.31)")
    modules = _standin_modules()
    sys.modules.update(modules)
    try:
        return importlib.import_module("timm")
    finally:
        for name in modules:
            if sys.modules.get(name) is modules[name]:
                del sys.modules[name]
