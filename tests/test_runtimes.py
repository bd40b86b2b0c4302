"""Runtimes behind one call: torch (fp32, bf16, fp16 selection), ONNX Runtime and OpenVINO give the model's
outputs at any batch size; INT8 keeps the decoding tail in float; the torch path needs neither onnxruntime nor
openvino; backends are validated and ``auto`` resolves per host."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from yolonas import load_model, read_checkpoint
from yolonas.export import export_onnx
from yolonas_serving import backends as bk
from yolonas_serving import runtime as rt
from yolonas_serving.backends import BACKENDS, build_runtime, resolve_backend, torch_precision
from yolonas_serving.pipeline import COCO_PIPELINE
from yolonas_serving.runtime import OnnxRuntime, TorchRuntime
from yolonas_serving.settings import HandlerSettings

BOX_ATOL, SCORE_ATOL = 0.05, 2e-4  # the fp32 claim against super-gradients holds between fp32 runtimes too
SIZE = (160, 224)


@pytest.fixture(scope="module")
def checkpoint(random_checkpoint):
    return random_checkpoint("s")


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint, fuse=True)


@pytest.fixture(scope="module")
def dynamic_onnx(model, tmp_path_factory):
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "model.onnx", input_size=None)


@pytest.fixture(scope="module")
def openvino_ir(checkpoint, tmp_path_factory):
    pytest.importorskip("openvino")
    from yolonas_tools.build.backends import write_backend_files

    folder = tmp_path_factory.mktemp("openvino")
    xml, beside = write_backend_files("openvino", read_checkpoint(checkpoint), SIZE, folder)
    assert xml.name == "model.xml" and [p.name for p in beside] == ["model.bin"]
    return xml


def batch(n: int, height: int = SIZE[0], width: int = SIZE[1], seed: int = 0) -> np.ndarray:
    coarse = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear").numpy()


def expected(model, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model(torch.from_numpy(x))


def assert_close(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> None:
    assert got[0].dtype == got[1].dtype == torch.float32 and got[0].device.type == "cpu"
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=BOX_ATOL)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=SCORE_ATOL)


# -- torch ----------------------------------------------------------------------------------------------------------


def test_torch_fp32_channels_last_matches_model(model):
    runtime = TorchRuntime(model, "cpu", "fp32")
    assert not BACKENDS["torch"].own_threads  # the handler keeps torch's threads for it
    for n in (1, 3):
        x = batch(n, seed=n)
        assert_close(runtime(x), expected(model, x))


def test_torch_bf16_computes_in_bf16_and_returns_float32(model, checkpoint):
    """Asked for bf16, the runtime autocasts on any CPU (emulated where bf16 is not native): float32 outputs near
    fp32's, and not equal to them. The torch-bf16 backend asks for it only where the CPU has bf16 natively."""
    x = batch(2)
    boxes, scores = TorchRuntime(model, "cpu", "bf16")(x)
    assert boxes.dtype == scores.dtype == torch.float32
    assert boxes.shape == (2, 735, 4) and scores.shape == (2, 735, 80)
    assert (boxes[..., 2:] >= boxes[..., :2]).all()  # float decoding: expected distances are never negative
    want = expected(model, x)
    assert (scores - want[1]).abs().max() < 0.1 and (boxes - want[0]).abs().mean() < 1  # measured 0.04, 0.2 px
    assert (boxes - want[0]).abs().mean() > 0.01, "bf16 was not applied"
    runtime, _ = build_runtime("torch-bf16", checkpoint, "s", 80)
    assert runtime.precision == ("bf16" if bk.cpu_has_bf16() else "fp32")


def test_torch_precision_per_device(monkeypatch):
    torch_fp32, torch_bf16, cuda_fp16 = BACKENDS["torch"], BACKENDS["torch-bf16"], BACKENDS["cuda-fp16"]
    assert torch_precision(torch_fp32, "cuda:0") == "fp16"
    assert torch_precision(torch_bf16, "cuda:1") == "fp16"
    assert torch_precision(cuda_fp16, "cuda:0") == "fp16"
    assert torch_precision(torch_fp32, "cpu") == "fp32"
    monkeypatch.setattr(bk, "cpu_has_bf16", lambda: True)
    assert torch_precision(torch_bf16, "cpu") == "bf16"
    monkeypatch.setattr(bk, "cpu_has_bf16", lambda: False)
    assert torch_precision(torch_bf16, "cpu") == "fp32"
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        torch_precision(cuda_fp16, "cpu")


def test_fp16_refused_on_cpu(model, checkpoint):
    with pytest.raises(ValueError, match="CUDA"):
        TorchRuntime(model, "cpu", "fp16")
    with pytest.raises(ValueError, match="CUDA"):
        build_runtime("cuda-fp16", checkpoint, "s", 80, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_fp16_close_to_fp32(model):
    x = batch(2)
    boxes, scores = TorchRuntime(copy.deepcopy(model), "cuda", "fp16")(x)  # the runtime moves its model
    want = expected(model, x)
    assert boxes.device.type == "cpu" and boxes.dtype == torch.float32
    assert (scores - want[1]).abs().max() < 0.05


# -- backend names and auto ---------------------------------------------------------------------------------------


def test_settings_validate_backend():
    for backend in BACKENDS:
        assert HandlerSettings.from_config({"backend": backend}).backend == backend
    with pytest.raises(ValueError, match="backend: got 'tensorrt'; allowed: one of auto"):
        HandlerSettings.from_config({"backend": "tensorrt"})


def test_auto_resolves_per_host(monkeypatch, tmp_path):
    def resolved(name: str, device: str = "cpu") -> str:
        return resolve_backend(name, device, tmp_path).name

    ir = tmp_path / bk.AUTO_OPENVINO_FILES[0]
    assert resolved("auto", "cuda:0") == "cuda-fp16"
    assert resolved("int8") == "int8"  # explicit choices pass through
    monkeypatch.setattr(bk, "openvino_available", lambda: True)
    for has_bf16, without_ir, with_ir in ((True, "torch-bf16", "openvino-bf16"), (False, "torch", "openvino")):
        monkeypatch.setattr(bk, "cpu_has_bf16", lambda value=has_bf16: value)
        ir.unlink(missing_ok=True)
        assert resolved("auto") == without_ir
        ir.touch()
        assert resolved("auto") == with_ir
    monkeypatch.setattr(bk, "openvino_available", lambda: False)
    assert resolved("auto") == "torch"


def test_torch_path_without_onnxruntime_openvino_nncf(checkpoint, tmp_path):
    """The optional runtimes are imported lazily: a host without them serves torch archives (and auto -> torch)."""
    (tmp_path / "weights.pth").symlink_to(checkpoint)
    (tmp_path / bk.AUTO_OPENVINO_FILES[0]).touch()
    code = textwrap.dedent(f"""
        import json, sys
        for name in ("onnxruntime", "openvino", "nncf"):
            sys.modules[name] = None  # any import of them now fails
        import numpy as np
        from yolonas_serving import backends
        from yolonas_serving.detector import Detector
        from yolonas_serving.settings import HandlerSettings
        out = {{"openvino": backends.openvino_available()}}
        for backend in ("torch", "auto"):
            run, _ = backends.build_runtime(backend, {str(tmp_path / "weights.pth")!r}, "s", 80, threads=1)
            boxes, scores = run(np.zeros((2, 3, 64, 96), np.float32))
            out[backend] = [type(run).__name__, list(boxes.shape), list(scores.shape)]
        print(json.dumps(out))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["openvino"] is False
    assert out["torch"] == out["auto"] == ["TorchRuntime", [2, 126, 4], [2, 126, 80]]


# -- ONNX Runtime and OpenVINO ------------------------------------------------------------------------------------


def test_onnx_runtime_any_batch_and_size(model, dynamic_onnx):
    pytest.importorskip("onnxruntime")
    runtime = OnnxRuntime(dynamic_onnx, threads=1)
    assert runtime.session.get_session_options().intra_op_num_threads == 1
    assert BACKENDS["onnx"].own_threads  # the handler drops torch to one thread beside it
    for n, height, width in ((1, *SIZE), (4, *SIZE), (2, 96, 320)):
        x = batch(n, height, width, seed=n)
        assert_close(runtime(x), expected(model, x))


def test_openvino_fp32_any_batch(model, openvino_ir):
    runtime, backend = build_runtime("openvino", openvino_ir, "s", 80, threads=1)
    assert isinstance(runtime, rt.OpenVINORuntime) and backend.own_threads
    assert runtime.default.compiled.get_property("INFERENCE_NUM_THREADS") == 1
    assert str(runtime.default.compiled.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'float32'>"
    first = None
    for n in (1, 3, 2):
        x = batch(n, seed=n)
        got = runtime(x)
        assert_close(got, expected(model, x))
        first = first if first is not None else got[0]
    assert first.shape == (1, 735, 4)  # outputs are copies, not views of the request's reused buffers


def test_openvino_streams_answer_each_image_in_its_slot(model, openvino_ir):
    """With two threads a batch runs as concurrent single-image requests on two streams; a lone image runs on the
    latency compilation. Either way every image's outputs are its own."""
    runtime, _ = build_runtime("openvino", openvino_ir, "s", 80, threads=2)
    assert runtime.default.compiled.get_property("INFERENCE_NUM_THREADS") == 2
    x = batch(5, seed=7)
    got = runtime(x)
    assert_close(got, expected(model, x))
    alone = runtime(x[3:4])
    assert_close(alone, expected(model, x[3:4]))
    assert torch.allclose(got[0][3:4], alone[0], atol=BOX_ATOL)
    assert build_runtime("openvino", openvino_ir, "s", 80, threads=1)[0].default.streams is None


def test_openvino_streamed_batch_answers_each_slot_whenever_asked(model, openvino_ir, monkeypatch):
    """Images start on the streams as they are added; the odd one out of 3 on 2 threads waits and runs alone on the
    latency compilation; results can be asked for in any order, each its own, and leaving the batch waits for every
    request."""
    runtime, _ = build_runtime("openvino", openvino_ir, "s", 80, threads=2)
    alone = []
    on_latency = rt.OpenVINORuntime.__call__
    monkeypatch.setattr(rt.OpenVINORuntime, "__call__", lambda self, x: alone.append(len(x)) or on_latency(self, x))
    x = batch(3, seed=11)
    with runtime.begin(3) as streamed:
        assert isinstance(streamed, rt.StreamedBatch)
        slots = [streamed.add(image) for image in x]
        assert alone == [] and not streamed.done[2].is_set()
        outputs = {slot: streamed.result(slot) for slot in reversed(slots)}
    assert alone == [1]
    for slot in slots:
        assert_close(outputs[slot], expected(model, x[slot : slot + 1]))
    lone = runtime.begin(1)
    assert lone.streamed == 0, "a lone image runs on the latency compilation"
    lone.expect(1)  # a request's tiles are announced once it is cut
    assert lone.streamed == 2


def test_openvino_dynamic_size(model, dynamic_onnx):
    pytest.importorskip("openvino")
    runtime = rt.OpenVINORuntime(dynamic_onnx, threads=1, precision="f32")
    for n, height, width in ((1, 128, 192), (2, 224, 96)):
        x = batch(n, height, width)
        assert_close(runtime(x), expected(model, x))


def test_openvino_compiles_each_input_size_once(model, dynamic_onnx, openvino_ir, monkeypatch):
    """An IR whose size follows the image gets a fixed-size compilation per input size it meets, up to
    MAX_FIXED_SIZES; past that the dynamic compilation answers. A batch mixing sizes runs each image on its own
    size's streams. An IR of fixed size has its one compilation."""
    monkeypatch.setattr(rt, "MAX_FIXED_SIZES", 2)
    runtime = rt.OpenVINORuntime(dynamic_onnx, threads=2, precision="f32")
    assert runtime.compiles_per_size
    for n, height, width in ((1, 96, 160), (1, 160, 96), (2, 96, 160), (1, 128, 128)):
        x = batch(n, height, width, seed=height)
        assert_close(runtime(x), expected(model, x))
    assert list(runtime.fixed_sizes) == [(96, 160), (160, 96)]
    assert runtime.fixed_sizes[96, 160].compiled.input(0).get_partial_shape().to_string() == "[?,3,96,160]"
    assert runtime.compilation(128, 128) is runtime.default
    sizes = ((96, 160), (160, 96), (128, 128))
    images = [batch(1, height, width, seed=i)[0] for i, (height, width) in enumerate(sizes)]
    with runtime.begin(3) as streamed:
        slots = [streamed.add(image) for image in images]
        outputs = [streamed.result(slot) for slot in slots]
    for image, output in zip(images, outputs):
        assert_close(output, expected(model, image[None]))
    fixed, _ = build_runtime("openvino", openvino_ir, "s", 80, threads=1)
    assert not fixed.compiles_per_size and fixed.compilation(*SIZE) is fixed.default and not fixed.fixed_sizes


def test_openvino_bf16_precision(openvino_ir):
    """bf16 where the CPU has it; elsewhere OpenVINO itself keeps f32 (the hint is a request, not an order)."""
    runtime, _ = build_runtime("openvino-bf16", openvino_ir, "s", 80, threads=1)
    want = "bfloat16" if bk.cpu_has_bf16() else "float32"
    assert str(runtime.default.compiled.get_property("INFERENCE_PRECISION_HINT")) == f"<Type: '{want}'>"
    boxes, scores = runtime(batch(2))
    assert boxes.dtype == torch.float32 and (boxes[..., 2:] >= boxes[..., :2]).all()


def test_int8_leaves_decoding_tail_in_float(openvino_ir, tmp_path):
    pytest.importorskip("nncf")
    import openvino as ov

    from yolonas_tools.build.backends import DECODING_TAIL, calibration_batches, quantize_int8
    from yolonas_tools.data.synthetic import write_shapes_images

    write_shapes_images(tmp_path / "images", 3, seed=2, size=200)
    batches = calibration_batches(tmp_path / "images", COCO_PIPELINE.with_input_size(*SIZE))
    assert len(batches) == 3 and batches[0].shape == (1, 3, *SIZE)
    quantized = quantize_int8(ov.Core().read_model(str(openvino_ir)), batches)
    fake_quantized = [op for op in quantized.get_ordered_ops() if op.get_type_name() == "FakeQuantize"]
    assert len(fake_quantized) > 50
    fed = {
        target.get_node().get_friendly_name()
        for op in fake_quantized
        for output in op.outputs()
        for target in output.get_target_inputs()
    }
    assert not [name for name in fed if re.match(DECODING_TAIL, name)]
    assert any("reg_pred" in name for name in fed) and any("cls_pred" in name for name in fed)
    ov.save_model(quantized, tmp_path / "model.xml", compress_to_fp16=False)
    boxes, scores = build_runtime("int8", tmp_path / "model.xml", "s", 80, threads=1)[0](batch(2))
    assert boxes.shape == (2, 735, 4) and torch.isfinite(boxes).all()
    assert (boxes[..., 2:] >= boxes[..., :2]).all() and ((scores >= 0) & (scores <= 1)).all()
