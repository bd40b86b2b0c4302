"""Inference runtimes behind one call: float32 NCHW batch (numpy) -> (boxes [B, A, 4], scores [B, A, C]) on CPU.

An archive names its backend (``model-config.yaml`` ``handler.backend``) and carries the file that backend loads:

==============  =============================== =================================================================
backend         serialized file                 runs
==============  =============================== =================================================================
torch           weights.pth                     eager PyTorch, fused, channels_last, fp32 (fp16 on a CUDA GPU)
torch-bf16      weights.pth                     the same under bf16 autocast where the CPU has bf16 (else fp32)
cuda-fp16       weights.pth                     eager PyTorch in fp16 on a CUDA GPU (pinned host memory)
onnx            model.onnx                      ONNX Runtime (CUDA provider on a GPU when installed)
openvino        model.xml (+ model.bin)         OpenVINO, fp32 inference precision
openvino-bf16   model.xml (+ model.bin)         OpenVINO, bf16 inference precision where the CPU has it
int8            model.xml (+ model.bin)         OpenVINO INT8 IR (NNCF post-training quantization)
auto            weights.pth (+ openvino.xml/bin) chosen when the worker loads: see :func:`resolve_backend`
==============  =============================== =================================================================

onnxruntime and openvino are imported only by the runtime that needs them, so the torch path works without them.
The box-decoding tail (softmax, expectation, anchors, sigmoid) runs in float32 in every backend.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "torch-bf16", "cuda-fp16", "onnx", "openvino", "openvino-bf16", "int8")
TORCH_PRECISION = {"torch": "fp32", "torch-bf16": "bf16", "cuda-fp16": "fp16"}
OPENVINO_PRECISION = {"openvino": "f32", "openvino-bf16": "bf16", "int8": "f32"}
#  What each backend's archive holds; ``auto`` also carries an OpenVINO IR under this name beside its weights.
SERIALIZED_FILE = {"onnx": "model.onnx", "openvino": "model.xml", "openvino-bf16": "model.xml", "int8": "model.xml"}
WEIGHTS_FILE = "weights.pth"
AUTO_OPENVINO_FILE = "openvino.xml"
#  What a runtime is to its callers: float32 NCHW batch -> (boxes [B, A, 4], scores [B, A, C]).
Forward = Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]]
#  An image's forward takes milliseconds; this bound only turns a request that never completes into an error.
STREAM_WAIT_S = 120.0
#  Input sizes an OpenVINO runtime compiles with fixed height and width (see :class:`OpenVINORuntime`).
MAX_FIXED_SIZES = 4


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


def resolve_backend(backend: str, device: str, model_dir: str | Path) -> str:
    """The concrete backend for ``auto`` (others pass through): fp16 on a CUDA device; else OpenVINO when the
    archive carries an IR and openvino is installed (bf16 where the CPU has it); else torch (likewise)."""
    if backend != "auto":
        return backend
    if device.startswith("cuda"):
        return "cuda-fp16"
    bf16 = cpu_has_bf16()
    if (Path(model_dir) / AUTO_OPENVINO_FILE).is_file() and openvino_available():
        return "openvino-bf16" if bf16 else "openvino"
    return "torch-bf16" if bf16 else "torch"


def torch_precision(backend: str, device: str) -> str:
    """fp32, bf16 or fp16 for a torch backend on ``device``: every torch archive runs in fp16 on a GPU; bf16 only on
    CPUs with native bf16 (elsewhere fp32, with a warning); cuda-fp16 without a GPU is an error."""
    if device.startswith("cuda"):
        return "fp16"
    precision = TORCH_PRECISION[backend]
    if precision == "fp16":
        raise ValueError("backend cuda-fp16 needs a CUDA GPU; this worker has none")
    if precision == "bf16" and not cpu_has_bf16():
        logger.warning("this CPU has no native bf16: backend %s runs in fp32", backend)
        return "fp32"
    return precision


class TorchRuntime:
    """Eager PyTorch: the fused model, channels_last; bf16 autocast on CPUs that have it, fp16 on CUDA."""

    #  The forward runs on torch's own threads (each runtime says so; the handler sizes torch's pool by it).
    uses_torch_threads = True
    compiles_per_size = False  # any input size runs at once (the handler warms up one)

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu", precision: str = "fp32"):
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16; got {precision!r}")
        self.device = torch.device(device)
        if precision == "fp16" and self.device.type != "cuda":
            raise ValueError("fp16 needs a CUDA device")
        self.precision = precision
        model = model.eval().to(self.device, memory_format=torch.channels_last)
        self.model = model.half() if precision == "fp16" else model
        self._staging: torch.Tensor | None = None  # pinned host buffer, reused across CUDA calls

    def _to_device(self, batch: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(batch)
        if self.device.type != "cuda":
            return x
        # Page-locked memory lets the copy run asynchronously; the outputs' .cpu() waits for everything.
        if self._staging is None or self._staging.shape != x.shape:
            self._staging = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        self._staging.copy_(x)
        return self._staging.to(self.device, non_blocking=True)

    def __call__(self, batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._to_device(batch).contiguous(memory_format=torch.channels_last)
        if self.precision == "fp16":
            x = x.half()
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"),
        ):
            boxes, scores = self.model(x)
        return boxes.float().cpu(), scores.float().cpu()


class OnnxRuntime:
    """ONNX Runtime on an exported model (dynamic batch axis)."""

    uses_torch_threads = False  # its own thread pool; torch keeps only the glue ops around it
    compiles_per_size = False

    def __init__(self, path: str | Path, threads: int = 1, device: str = "cpu"):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle threads spinning for work would steal the cores TorchServe's frontend and decoding need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(device.partition(":")[2] or 0)}))
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        boxes, scores = self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})
        return torch.from_numpy(boxes), torch.from_numpy(scores)


@dataclass
class Compilation:
    """One compiled form of the IR: a latency-tuned request for lone images and, with several threads, the streams
    that run a batch's images concurrently."""

    compiled: Any
    request: Any
    streams: Any | None


class OpenVINORuntime:
    """OpenVINO on CPU, one compiled model per role for every batch size (the IR's batch axis is dynamic;
    interleaved measurements showed no gain from per-size static compilations).

    A lone image runs on a latency-tuned compilation using every thread. Several images run as concurrent
    single-image requests on one stream per thread (OpenVINO's throughput mode): one thread per image avoids the
    synchronisation a multi-threaded forward pays per layer and keeps its speed when another process takes a core.
    :meth:`begin` starts each image as soon as it is added, so the caller decodes the next image and post-processes
    finished ones while the streams compute; images that would leave threads idle (the third of 3 on 2 threads) run
    after the streams on the latency compilation.

    An IR whose height and width follow the image (minimal or automatic padding) is also compiled once per input
    size it meets, with that size fixed: fixed sizes run faster than the dynamic compilation (INT8 S at 640x384 on
    2 threads: 13.1 vs 15.3 ms) and compile in about 0.6 s (latency and streams). Each size holds its own buffers
    (about 150 MB for S at 640x480 on 2 threads), so past ``MAX_FIXED_SIZES`` sizes the dynamic compilation
    (``default``, compiled then) serves the rest and memory stays bounded whatever clients send.
    """

    uses_torch_threads = False  # its own threads; torch keeps only the glue ops around it

    def __init__(self, path: str | Path, threads: int = 1, precision: str = "f32"):
        import openvino as ov

        self.core = ov.Core()
        if precision == "bf16" and "BF16" not in self.core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            logger.warning("this CPU has no bf16: OpenVINO runs in fp32")
            precision = "f32"
        self.precision = precision
        self.threads = threads
        self.model = self.core.read_model(str(path))
        spatial = self.model.input(0).get_partial_shape()[2:]
        self.compiles_per_size = any(dim.is_dynamic for dim in spatial)
        # The IR as read: its one fixed size, or any size (compiled when first needed, past MAX_FIXED_SIZES).
        self.default: Compilation | None = None if self.compiles_per_size else self._compile(self.model)
        self.fixed_sizes: dict[tuple[int, int], Compilation] = {}

    def _compile(self, model: Any) -> Compilation:
        common = {
            "INFERENCE_PRECISION_HINT": self.precision,
            # Each worker would pin its threads to the same first cores; the OS spreads workers (and TorchServe's
            # frontend) better.
            "ENABLE_CPU_PINNING": False,
        }
        latency = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "INFERENCE_NUM_THREADS": self.threads}
        compiled = self.core.compile_model(model, "CPU", {**common, **latency})
        streams = None
        if self.threads > 1:
            import openvino as ov

            throughput = {
                "PERFORMANCE_HINT": "THROUGHPUT",
                "NUM_STREAMS": self.threads,
                "INFERENCE_NUM_THREADS": self.threads,
            }
            streams = ov.AsyncInferQueue(self.core.compile_model(model, "CPU", {**common, **throughput}), self.threads)
        return Compilation(compiled, compiled.create_infer_request(), streams)

    def compilation(self, height: int, width: int) -> Compilation:
        """The compilation for inputs of this size: its own fixed-size one where the IR's size is dynamic."""
        if not self.compiles_per_size:
            return self.default
        found = self.fixed_sizes.get((height, width))
        if found is None:
            if len(self.fixed_sizes) >= MAX_FIXED_SIZES:
                if self.default is None:
                    self.default = self._compile(self.model)
                return self.default
            model = self.model.clone()
            model.reshape([-1, 3, height, width])
            found = self.fixed_sizes[height, width] = self._compile(model)
            logger.info("OpenVINO compiled for %dx%d inputs (%d sizes)", width, height, len(self.fixed_sizes))
        return found

    def begin(self, expected: int) -> RuntimeBatch:
        """A batch of ``expected`` images: on the streams when there are several, else on the latency compilation."""
        if self.threads < 2 or expected < 2:
            return DeferredBatch(self)
        return StreamedBatch(self, expected)

    def __call__(self, batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        request = self.compilation(*batch.shape[2:]).request
        if self.threads < 2 or len(batch) < 2:
            request.infer({0: batch}, share_inputs=True)
            # The request reuses its output buffers on the next call: copy them out.
            boxes, scores = (torch.from_numpy(request.get_output_tensor(i).data.copy()) for i in range(2))
            return boxes, scores
        with StreamedBatch(self, len(batch)) as streamed:
            slots = [streamed.add(image) for image in batch]
            outputs = [streamed.result(slot) for slot in slots]
        boxes, scores = (torch.cat(parts) for parts in zip(*outputs))
        return boxes, scores


class DeferredBatch:
    """Images added one at a time and run together at the first result, one forward per distinct input shape."""

    def __init__(self, runtime: Forward):
        self.runtime = runtime
        self.images: list[np.ndarray] = []
        self.outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __enter__(self) -> DeferredBatch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass

    def add(self, image: np.ndarray) -> int:
        """Queue one [3, h, w] image; returns its slot."""
        self.images.append(image)
        return len(self.images) - 1

    def result(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The outputs of the image in ``slot``: (boxes [1, A, 4], scores [1, A, C])."""
        if len(self.outputs) < len(self.images):
            self._run()
        return self.outputs[slot]

    def _run(self) -> None:
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, image in enumerate(self.images):
            groups[image.shape].append(i)
        outputs: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.images)
        for indices in groups.values():
            boxes, scores = self.runtime(np.stack([self.images[i] for i in indices]))
            for k, i in enumerate(indices):
                outputs[i] = (boxes[k : k + 1], scores[k : k + 1])
        self.outputs = outputs  # type: ignore[assignment]


class StreamedBatch:
    """Images started on OpenVINO's streams as they are added (the streams compiled for each image's size); a result
    waits for its own image only. Use it as a context manager: leaving it waits for every request, so none outlives
    the batch (the inputs are shared, not copied, and the callback writes into this batch).

    The streams run one image per thread, so of ``expected`` images the last ``expected % threads`` would run with
    threads idle: they wait instead and run one by one on the latency compilation, all threads on each, once the
    streams are done (served INT8 S, 2 threads: a batch of 3 took 63 ms against 38 for a batch of 2)."""

    def __init__(self, runtime: OpenVINORuntime, expected: int):
        self.runtime = runtime
        self.streamed = expected - expected % runtime.threads  # images before this slot start on the streams
        self.queues: list[Any] = []  # the streams this batch has started images on
        self.images: list[np.ndarray] = []
        self.outputs: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        self.done: list[threading.Event] = []

    def __enter__(self) -> StreamedBatch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for queue in self.queues:
            queue.wait_all()
        # Each queue keeps its callback, bound to this batch, until the next batch sets its own: let go of the data.
        self.images.clear()
        self.outputs.clear()

    def _collect(self, request: Any, slot: int) -> None:  # runs on an OpenVINO thread when the request completes
        # The request reuses its output buffers for its next image: copy them out.
        boxes, scores = (torch.from_numpy(request.get_output_tensor(i).data.copy()) for i in range(2))
        self.outputs[slot] = (boxes, scores)
        self.done[slot].set()

    def add(self, image: np.ndarray) -> int:
        """Start one [3, h, w] image on the next free stream (or keep it for the latency compilation); returns its
        slot."""
        image = np.ascontiguousarray(image, dtype=np.float32)[None]
        slot = len(self.images)
        self.images.append(image)  # kept alive: the request reads it in place
        self.outputs.append(None)
        self.done.append(threading.Event())
        if slot >= self.streamed:
            return slot
        queue = self.runtime.compilation(*image.shape[2:]).streams
        if not any(queue is known for known in self.queues):
            queue.set_callback(self._collect)
            self.queues.append(queue)
        queue.start_async({0: image}, slot, share_inputs=True)
        return slot

    def result(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The outputs of the image in ``slot``: (boxes [1, A, 4], scores [1, A, C])."""
        if slot >= self.streamed and not self.done[slot].is_set():
            for queue in self.queues:
                queue.wait_all()
            self.outputs[slot] = self.runtime(self.images[slot])
            self.done[slot].set()
        if not self.done[slot].wait(STREAM_WAIT_S):
            raise RuntimeError(f"OpenVINO gave no outputs for image {slot} within {STREAM_WAIT_S:.0f} s")
        return self.outputs[slot]  # type: ignore[return-value]


RuntimeBatch = DeferredBatch | StreamedBatch


def begin_batch(runtime: Forward, expected: int) -> RuntimeBatch:
    """A batch of ``expected`` images for ``runtime``: its own :meth:`begin` where it has one (OpenVINO's streams),
    else one forward at the first result."""
    begin = getattr(runtime, "begin", None)
    return begin(expected) if begin is not None else DeferredBatch(runtime)


Runtime = TorchRuntime | OnnxRuntime | OpenVINORuntime


def build_runtime(
    backend: str,
    path: str | Path,
    variant: str,
    num_classes: int,
    device: str = "cpu",
    threads: int | None = None,
) -> Runtime:
    """The runtime an archive asks for, loaded from its serialized file ``path`` (other files sit beside it).

    ``threads`` defaults to torch's current setting, which the handler sets from the archive's settings.
    """
    threads = threads or torch.get_num_threads()
    model_dir = Path(path).parent
    concrete = resolve_backend(backend, device, model_dir)
    if backend == "auto":
        logger.info("backend auto -> %s", concrete)
    if concrete in TORCH_PRECISION:
        from yolonas import load_model

        weights = model_dir / WEIGHTS_FILE if backend == "auto" else path
        precision = torch_precision(concrete, device)
        return TorchRuntime(load_model(weights, variant, num_classes, fuse=True), device, precision)
    if device.startswith("cuda") and concrete != "onnx":
        logger.warning("backend %s runs on the CPU, not on %s", concrete, device)
    if concrete == "onnx":
        return OnnxRuntime(path, threads, device)
    if concrete in OPENVINO_PRECISION:
        ir = model_dir / AUTO_OPENVINO_FILE if backend == "auto" else path
        return OpenVINORuntime(ir, threads, OPENVINO_PRECISION[concrete])
    raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
