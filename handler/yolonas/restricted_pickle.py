"""A pickle reader that never runs code: what a whole pickled model object (Ultralytics' ``yolo_nas_*.pt``) is read
with when ``torch.load(weights_only=True)`` refuses it.

:class:`RestrictedUnpickler` rebuilds tensors and plain containers and turns every object of an allow-listed module
into an inert :class:`PickledObject` record; any other global is refused with :class:`RefusedGlobal`. Nothing that a
file names is ever imported or called.
"""

from __future__ import annotations

import collections
import pickle
import types
from typing import Any

import torch

#  Modules whose objects may appear in a pickled model; they become inert records, never real objects.
STUB_MODULE_PREFIXES = ("super_gradients.", "ultralytics.", "torch.nn.modules.", "omegaconf.", "numpy", "enum")


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names something outside the allow-list: the file may be hostile, and is not read."""


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """Protocol 2 pickles ``bytes`` (numpy arrays' data, say) as ``_codecs.encode(text, "latin1")``: allow only that."""
    if encoding not in ("latin1", "latin-1"):
        raise RefusedGlobal(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


#  Globals that are real and safe: tensor rebuilding and plain containers (what torch's weights_only also allows).
SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("_codecs", "encode"): _latin1_bytes,
}

#  Protocol 2 (torch.save's default) writes Python 2 names, e.g. ``__builtin__.set`` for every module's
#  ``_non_persistent_buffers_set``; pickle's own find_class renames them, an override must do it itself.
PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class PickledObject:
    """Inert stand-in for an object of an allow-listed class: it only records what the pickle gave it."""

    _pickled_class = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<pickled {self._pickled_class}>"


def _stub_class(module: str, name: str) -> type:
    return type(name, (PickledObject,), {"_pickled_class": f"{module}.{name}", "__module__": "yolonas.pickled"})


def _safe_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    if not (isinstance(cls, type) and issubclass(cls, PickledObject)):
        raise RefusedGlobal(f"refused to reconstruct {cls!r}")
    return cls()


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that only resolves allow-listed globals; see the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stubs: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        module = PY2_MODULES.get(module, module)
        if (module, name) in SAFE_GLOBALS:
            return SAFE_GLOBALS[module, name]
        if module == "copyreg" and name == "_reconstructor":
            return _safe_reconstructor
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.startswith(STUB_MODULE_PREFIXES) or module in ("numpy", "enum"):
            key = (module, name)
            if key not in self._stubs:
                self._stubs[key] = _stub_class(module, name)
            return self._stubs[key]
        raise RefusedGlobal(f"refused to load global {module}.{name}: it is not on the allow-list")


#  torch.load(pickle_module=...) wants a module-like object with an Unpickler class and load().
restricted_pickle = types.SimpleNamespace(
    Unpickler=RestrictedUnpickler,
    load=lambda f, **kw: RestrictedUnpickler(f, **kw).load(),
    __name__="yolonas_restricted_pickle",
)


def module_state_dict(obj: PickledObject, prefix: str = "") -> dict[str, torch.Tensor]:
    """The state dict an ``nn.Module`` would produce, read from its pickled ``__dict__``."""
    state = obj.state if isinstance(obj.state, dict) else {}
    result: dict[str, torch.Tensor] = {}
    for name, tensor in (state.get("_parameters") or {}).items():
        if tensor is not None:
            result[prefix + name] = tensor.detach()
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    for name, tensor in (state.get("_buffers") or {}).items():
        if tensor is not None and name not in non_persistent:
            result[prefix + name] = tensor
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, PickledObject):
            result.update(module_state_dict(child, f"{prefix}{name}."))
    return result


def is_pickled_module(obj: Any) -> bool:
    return isinstance(obj, PickledObject) and isinstance(obj.state, dict) and "_modules" in obj.state
