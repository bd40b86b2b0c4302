"""The backends, one row each: what an archive of that backend holds, how it runs and what it defaults to. Settings,
archive building, the benchmark, the command-line choices and the docs all read :data:`BACKENDS`; adding a backend
is one row here plus its runtime class (``runtime.py``) where its family is new.

``auto`` is resolved when the worker loads (:func:`resolve_backend`): fp16 on a CUDA device, else OpenVINO when the
archive carries an IR and openvino is installed, else torch; bf16 where the CPU has it natively. onnxruntime and
openvino are imported only by the runtime that needs them, so the torch path works without them. The box-decoding
tail (softmax, expectation, anchors, sigmoid) runs in float32 in every backend.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .runtime import OnnxRuntime, OpenVINORuntime, Runtime, TorchRuntime

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.pth"
#  ``auto`` carries an OpenVINO IR under this name beside its weights, when openvino was installed at archive time.
AUTO_OPENVINO_FILES = ("openvino.xml", "openvino.bin")
FAMILIES = ("torch", "onnx", "openvino", "auto")


@dataclass(frozen=True)
class Backend:
    name: str
    family: str  # which runtime runs it: torch, onnx, openvino; auto is resolved to another row at load
    precision: str  # fp32, bf16, fp16, int8 (auto: the resolved row's)
    files: tuple[str, ...]  # what the archive holds; the first is TorchServe's serialized file
    minimal_padding: bool  # the default padding: minimal where exactness is already traded for speed
    needs_calibration: bool  # archiving needs calibration images (post-training quantization)
    own_threads: bool  # the runtime computes on threads of its own: torch keeps one thread for the glue ops
    summary: str  # one line for the CLI help and the docs

    @property
    def serialized_file(self) -> str:
        return self.files[0]

    @property
    def openvino_precision(self) -> str:
        """OpenVINO's inference precision hint: the IR of int8 is quantized already and runs with the f32 hint."""
        return {"bf16": "bf16"}.get(self.precision, "f32")


_IR = ("model.xml", "model.bin")
BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("auto", "auto", "auto", (WEIGHTS_FILE, *AUTO_OPENVINO_FILES), True, False, False,
                "chosen when the worker loads: cuda-fp16 on a GPU, else OpenVINO where installed, else torch; "
                "bf16 where the CPU has it natively"),
        Backend("torch", "torch", "fp32", (WEIGHTS_FILE,), False, False, False,
                "eager PyTorch, fused, channels_last, fp32 (fp16 on a CUDA GPU)"),
        Backend("torch-bf16", "torch", "bf16", (WEIGHTS_FILE,), True, False, False,
                "the same under bf16 autocast where the CPU has bf16 (else fp32)"),
        Backend("cuda-fp16", "torch", "fp16", (WEIGHTS_FILE,), True, False, False,
                "eager PyTorch in fp16 on a CUDA GPU (pinned host memory)"),
        Backend("onnx", "onnx", "fp32", ("model.onnx",), False, False, True,
                "ONNX Runtime (CUDA provider on a GPU when installed)"),
        Backend("openvino", "openvino", "fp32", _IR, False, False, True, "OpenVINO, fp32"),
        Backend("openvino-bf16", "openvino", "bf16", _IR, True, False, True,
                "OpenVINO, bf16 inference precision where the CPU has it"),
        Backend("int8", "openvino", "int8", _IR, True, True, True,
                "OpenVINO INT8 IR (NNCF post-training quantization on --calibration-images)"),
    )
}  # fmt: skip


def cpu_has_bf16() -> bool:
    """Native bf16 arithmetic (AVX-512 BF16 or AMX); elsewhere bf16 is emulated and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(name: str, device: str, model_dir: str | Path) -> Backend:
    """The row that runs: ``auto`` becomes cuda-fp16 on a CUDA device, else openvino(-bf16) when the archive carries
    an IR and openvino is installed, else torch(-bf16); bf16 where the CPU has it. Others pass through."""
    if name != "auto":
        return BACKENDS[name]
    if device.startswith("cuda"):
        return BACKENDS["cuda-fp16"]
    bf16 = cpu_has_bf16()
    if (Path(model_dir) / AUTO_OPENVINO_FILES[0]).is_file() and openvino_available():
        return BACKENDS["openvino-bf16" if bf16 else "openvino"]
    return BACKENDS["torch-bf16" if bf16 else "torch"]


def torch_precision(backend: Backend, device: str) -> str:
    """fp32, bf16 or fp16 for a torch backend on ``device``: every torch archive runs in fp16 on a GPU; bf16 only on
    CPUs with native bf16 (elsewhere fp32, with a warning); cuda-fp16 without a GPU is an error."""
    if device.startswith("cuda"):
        return "fp16"
    if backend.precision == "fp16":
        raise ValueError(f"backend {backend.name} needs a CUDA GPU; this worker has none")
    if backend.precision == "bf16" and not cpu_has_bf16():
        logger.warning("this CPU has no native bf16: backend %s runs in fp32", backend.name)
        return "fp32"
    return backend.precision


def build_runtime(
    name: str,
    path: str | Path,
    variant: str,
    num_classes: int,
    device: str = "cpu",
    threads: int | None = None,
) -> tuple[Runtime, Backend]:
    """The runtime an archive of backend ``name`` asks for, loaded from its serialized file ``path`` (the other
    files sit beside it), and the row that runs it (``auto`` resolved). ``threads`` defaults to torch's current
    setting, which the handler sets from the archive's settings."""
    import torch

    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    threads = threads or torch.get_num_threads()
    model_dir = Path(path).parent
    backend = resolve_backend(name, device, model_dir)
    if name == "auto":
        logger.info("backend auto -> %s", backend.name)
    if backend.family == "torch":
        from yolonas import load_model

        model = load_model(path, variant, num_classes, fuse=True)  # auto's serialized file is its weights too
        return TorchRuntime(model, device, torch_precision(backend, device)), backend
    if device.startswith("cuda") and backend.family != "onnx":
        logger.warning("backend %s runs on the CPU, not on %s", backend.name, device)
    if backend.family == "onnx":
        return OnnxRuntime(path, threads, device), backend
    ir = model_dir / (AUTO_OPENVINO_FILES[0] if name == "auto" else backend.serialized_file)
    return OpenVINORuntime(ir, threads, backend.openvino_precision), backend
