"""Inference runtimes behind one interface (:class:`Runtime`): float32 NCHW batch (numpy) -> (boxes [B, A, 4],
scores [B, A, C]) on CPU, and :meth:`Runtime.begin` for a batch whose images arrive one at a time.

Which backend runs on which runtime, and what its archive holds, is the table in ``backends.py``.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

#  An image's forward takes milliseconds; this bound only turns a request that never completes into an error.
STREAM_WAIT_S = 120.0
#  Input sizes an OpenVINO runtime compiles with fixed height and width (see :class:`OpenVINORuntime`).
MAX_FIXED_SIZES = 4
#  Images of one shape a deferred batch runs per forward: a sliced request's tiles come by the dozen, and one
#  forward of all of them would hold every activation at once.
MAX_FORWARD_BATCH = 16

Outputs = tuple[torch.Tensor, torch.Tensor]


class RuntimeBatch(Protocol):
    """Images added one at a time, each with its slot; a result waits for its own image. A context manager: leaving
    it waits for every image, so none outlives the batch."""

    def __enter__(self) -> RuntimeBatch: ...

    def __exit__(self, *exc_info: object) -> None: ...

    def add(self, image: np.ndarray) -> int:
        """Queue or start one [3, h, w] image; returns its slot."""
        ...

    def expect(self, more: int) -> None:
        """``more`` images beyond those announced will be added (a sliced image's tiles)."""
        ...

    def result(self, slot: int) -> Outputs:
        """The outputs of the image in ``slot``: (boxes [1, A, 4], scores [1, A, C])."""
        ...


class Runtime(Protocol):
    """What the detector calls. ``compiles_per_size``: each new input size costs a compilation (warm up several)."""

    compiles_per_size: bool

    def __call__(self, batch: np.ndarray) -> Outputs: ...

    def begin(self, expected: int) -> RuntimeBatch:
        """A batch of ``expected`` images (more may be announced with :meth:`RuntimeBatch.expect`)."""
        ...


class WholeBatchRuntime:
    """A runtime that runs a whole batch in one call: its batches collect the images and run them at the first
    result (:class:`DeferredBatch`)."""

    compiles_per_size = False  # any input size runs at once (the handler warms up one)

    def __call__(self, batch: np.ndarray) -> Outputs:
        raise NotImplementedError

    def begin(self, expected: int) -> RuntimeBatch:
        return DeferredBatch(self)


class TorchRuntime(WholeBatchRuntime):
    """Eager PyTorch: the fused model, channels_last; bf16 autocast on CPUs that have it, fp16 on CUDA."""

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

    def __call__(self, batch: np.ndarray) -> Outputs:
        x = self._to_device(batch).contiguous(memory_format=torch.channels_last)
        if self.precision == "fp16":
            x = x.half()
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"),
        ):
            boxes, scores = self.model(x)
        return boxes.float().cpu(), scores.float().cpu()


class OnnxRuntime(WholeBatchRuntime):
    """ONNX Runtime on an exported model (dynamic batch axis)."""

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

    def __call__(self, batch: np.ndarray) -> Outputs:
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
        """A batch of ``expected`` images: on the streams with several threads, else on the latency compilation."""
        if self.threads < 2:
            return DeferredBatch(self)
        return StreamedBatch(self, expected)

    def __call__(self, batch: np.ndarray) -> Outputs:
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
    """Images added one at a time and run together at the first result, one forward per distinct input shape (of at
    most ``MAX_FORWARD_BATCH`` images)."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.images: list[np.ndarray] = []
        self.outputs: list[Outputs] = []

    def __enter__(self) -> DeferredBatch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass

    def add(self, image: np.ndarray) -> int:
        """Queue one [3, h, w] image; returns its slot."""
        self.images.append(image)
        return len(self.images) - 1

    def expect(self, more: int) -> None:
        """Nothing to plan: every image waits for the first result."""

    def result(self, slot: int) -> Outputs:
        """The outputs of the image in ``slot``: (boxes [1, A, 4], scores [1, A, C])."""
        if len(self.outputs) < len(self.images):
            self._run()
        return self.outputs[slot]

    def _run(self) -> None:
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, image in enumerate(self.images):
            groups[image.shape].append(i)
        outputs: list[Outputs | None] = [None] * len(self.images)
        for indices in groups.values():
            for first in range(0, len(indices), MAX_FORWARD_BATCH):
                chunk = indices[first : first + MAX_FORWARD_BATCH]
                boxes, scores = self.runtime(np.stack([self.images[i] for i in chunk]))
                for k, i in enumerate(chunk):
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
        self.expected = expected
        self.streamed = expected - expected % runtime.threads  # images before this slot start on the streams
        self.queues: list[Any] = []  # the streams this batch has started images on
        self.images: list[np.ndarray] = []
        self.outputs: list[Outputs | None] = []
        self.done: list[threading.Event] = []

    def __enter__(self) -> StreamedBatch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for queue in self.queues:
            queue.wait_all()
        # Each queue keeps its callback, bound to this batch, until the next batch sets its own: let go of the data.
        self.images.clear()
        self.outputs.clear()

    def expect(self, more: int) -> None:
        """More images will come: those that now fill every thread start on the streams too."""
        self.expected += more
        self.streamed = self.expected - self.expected % self.runtime.threads

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

    def result(self, slot: int) -> Outputs:
        """The outputs of the image in ``slot``: (boxes [1, A, 4], scores [1, A, C])."""
        if slot >= self.streamed and not self.done[slot].is_set():
            for queue in self.queues:
                queue.wait_all()
            self.outputs[slot] = self.runtime(self.images[slot])
            self.done[slot].set()
        if not self.done[slot].wait(STREAM_WAIT_S):
            raise RuntimeError(f"OpenVINO gave no outputs for image {slot} within {STREAM_WAIT_S:.0f} s")
        return self.outputs[slot]  # type: ignore[return-value]
