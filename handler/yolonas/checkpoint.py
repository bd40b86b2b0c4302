"""Reading the checkpoints users have, without ever running code from them.

Accepted layouts:
- super-gradients: ``{"net": sd}``, Trainer checkpoints ``{"net": sd, "ema_net": sd, "processing_params": ..., ...}``
  (EMA weights win, as in super-gradients), or a bare state dict;
- Ultralytics ``yolo_nas_*.pt``: a whole pickled super-gradients model object.

Everything is first read with ``torch.load(weights_only=True)``. Only when that refuses (a pickled model object)
do we fall back to ``restricted_pickle``, which turns every object of an allow-listed module into an inert record
and refuses any other global. Nothing that a file names is ever imported or called, so super_gradients need not be
installed and a crafted pickle cannot run code.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .fusion import fuse_model
from .model import YoloNAS, build_model
from .restricted_pickle import RefusedGlobal, is_pickled_module, module_state_dict, restricted_pickle
from .variants import VARIANTS

STATE_DICT_KEYS = ("ema_net", "net", "state_dict", "model_state_dict", "model", "ema")


class CheckpointError(ValueError):
    """A file that is not a YOLO-NAS checkpoint we can read; the message says what was expected and found."""


def _load_file(path: Path) -> tuple[Any, str]:
    """Returns the unpickled root object and how it was read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True), "weights_only"
    except pickle.UnpicklingError:
        pass  # a pickled object: retry below with the allow-list, never with the full unpickler
    except Exception as exc:  # torch raises RuntimeError for non-zip, truncated or foreign files
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=restricted_pickle), "restricted"
    except RefusedGlobal as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    except Exception as exc:  # not a pickle at all, or a broken one
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc


def _plain(obj: Any) -> Any:
    """Plain Python data (dicts, lists, strings, numbers) from unpickled params; records become None."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return None


def _pickled_model_params(state: dict[str, Any]) -> dict[str, Any] | None:
    """Class names and NMS defaults that super-gradients stores on a model object.

    Its image processor is pickled as objects, which stay inert records here; the COCO pipeline applies instead.
    """
    params = {
        "class_names": state.get("_class_names"),
        "iou": state.get("_default_nms_iou"),
        "conf": state.get("_default_nms_conf"),
    }
    params = {k: v for k, v in params.items() if isinstance(v, (list, tuple, float, int))}
    return params or None


def _describe(obj: Any) -> str:
    if isinstance(obj, dict):
        keys = list(obj)[:5]
        return f"a dict with {len(obj)} keys such as {keys}"
    return f"an object of type {type(obj).__name__}"


def _find_state_dict(root: Any) -> tuple[dict[str, torch.Tensor], str]:
    if is_pickled_module(root):
        return module_state_dict(root), "pickled model object"
    if isinstance(root, dict):
        for key in STATE_DICT_KEYS:
            value = root.get(key)
            if is_pickled_module(value):
                return module_state_dict(value), f"pickled model object under {key!r}"
            if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
                return dict(value), f"state dict under {key!r}"
        if root and all(isinstance(v, torch.Tensor) for v in root.values()):
            return dict(root), "bare state dict"
    raise CheckpointError(
        f"expected a YOLO-NAS checkpoint ({{'net': state_dict}}, {{'ema_net': ...}}, a bare state dict or a pickled "
        f"super-gradients model); found {_describe(root)}"
    )


def _strip_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DataParallel / DDP checkpoints prefix every key with ``module.``."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k.removeprefix("module."): v for k, v in state_dict.items()}
    return state_dict


def _reference_shapes(variant: str, num_classes: int) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = build_model(variant, num_classes)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def infer_architecture(state_dict: dict[str, torch.Tensor]) -> tuple[str, int]:
    """(variant, num_classes) read from tensor names and shapes."""
    cls_key = "heads.head1.cls_pred.weight"
    if cls_key not in state_dict:
        found = list(state_dict)[:3]
        raise CheckpointError(
            f"expected YOLO-NAS weights with key {cls_key!r}; found {len(state_dict)} keys like {found}"
        )
    num_classes = int(state_dict[cls_key].shape[0])
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    references = {variant: _reference_shapes(variant, num_classes) for variant in VARIANTS}
    for variant, reference in references.items():
        if reference == shapes:
            return variant, num_classes
    closest = max(references, key=lambda v: len(references[v].items() & shapes.items()))
    raise CheckpointError(
        f"the weights match no YOLO-NAS variant: expected the keys and shapes of S, M or L "
        f"({'/'.join(str(len(r)) for r in references.values())} keys); found {len(state_dict)} keys; "
        f"against the closest, {closest.upper()}: {_differences(references[closest], shapes)}"
    )


def _differences(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]) -> str:
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    reshaped = [k for k in expected if k in found and found[k] != expected[k]]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]!r})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]!r})")
    if reshaped:
        k = reshaped[0]
        example = f"{k!r}: expected {list(expected[k])}, found {list(found[k])}"
        parts.append(f"{len(reshaped)} with other shapes (e.g. {example})")
    return ", ".join(parts)


@dataclass
class Checkpoint:
    """What a checkpoint file holds that matters for serving."""

    state_dict: dict[str, torch.Tensor]
    variant: str
    num_classes: int
    processing_params: dict[str, Any] | None = None
    source: str = ""


def read_checkpoint(path: str | Path, variant: str | None = None, num_classes: int | None = None) -> Checkpoint:
    """Read weights, architecture and (for Trainer checkpoints) ``processing_params`` from ``path``.

    The architecture is read from the tensors; ``variant`` (``s`` or ``yolo_nas_s``) and ``num_classes``, when
    given, must agree with it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    root, how = _load_file(path)
    state_dict, layout = _find_state_dict(root)
    state_dict = _strip_prefix(state_dict)
    found_variant, found_classes = infer_architecture(state_dict)
    if variant is not None and variant.lower().removeprefix("yolo_nas_") != found_variant:
        raise CheckpointError(f"{path}: expected YOLO-NAS {variant.upper()} weights; found {found_variant.upper()}")
    if num_classes is not None and num_classes != found_classes:
        raise CheckpointError(f"{path}: expected {num_classes} classes; found {found_classes}")
    params = root.get("processing_params") if isinstance(root, dict) else None
    if params is None and is_pickled_module(root):
        params = _pickled_model_params(root.state)
    return Checkpoint(
        state_dict=state_dict,
        variant=found_variant,
        num_classes=found_classes,
        processing_params=_plain(params) if isinstance(params, dict) else None,
        source=f"{layout}, read {how}",
    )


def load_model(
    path: str | Path,
    variant: str | None = None,
    num_classes: int | None = None,
    fuse: bool = True,
    device: str | torch.device = "cpu",
) -> YoloNAS:
    """Load a YOLO-NAS checkpoint into an eval-mode model (fused for serving unless ``fuse=False``).

    ``variant`` and ``num_classes`` are read from the tensors; when given they must agree with them.
    """
    ckpt = read_checkpoint(path, variant, num_classes)
    return model_from_state_dict(ckpt.state_dict, ckpt.variant, ckpt.num_classes, fuse=fuse, device=device)


def model_from_state_dict(
    state_dict: dict[str, torch.Tensor],
    variant: str,
    num_classes: int,
    fuse: bool = True,
    device: str | torch.device = "cpu",
) -> YoloNAS:
    model = build_model(variant, num_classes)
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    if fuse:
        fuse_model(model)
    return model.to(device)
