"""ONNX export: one checked, self-contained file that ONNX Runtime runs like PyTorch, at fixed or dynamic batch and
size, and NMS inside the graph in the padded "batch" layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from yolonas import load_model
from yolonas.export import DetectorWithNMS, ExportNMS, export_onnx
from yolonas_serving.postprocess import NMSOptions, select
from yolonas_tools.cli import run_command

ort = pytest.importorskip("onnxruntime")

BOX_ATOL, SCORE_ATOL = 0.05, 2e-4  # the fp32 claim against super-gradients; measured here 0.0008 px, 4.3e-6
SIZE = (160, 224)  # small and non-square: fast, and catches swapped axes


@pytest.fixture(scope="module")
def model(random_checkpoint):
    return load_model(random_checkpoint("s"), fuse=True)


def images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Smooth colour fields: the seeded random model finds plenty of boxes in them."""
    coarse = torch.rand(batch, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear")


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def assert_matches_torch(model, sess, x: torch.Tensor) -> None:
    boxes, scores = sess.run(None, {"images": x.numpy()})
    with torch.no_grad():
        expected_boxes, expected_scores = model(x)
    np.testing.assert_allclose(boxes, expected_boxes.numpy(), rtol=0, atol=BOX_ATOL)
    np.testing.assert_allclose(scores, expected_scores.numpy(), rtol=0, atol=SCORE_ATOL)


@pytest.fixture(scope="module")
def dynamic_file(model, tmp_path_factory):
    """Dynamic batch, height and width (what auto-padding pipelines need)."""
    return export_onnx(model, tmp_path_factory.mktemp("dynamic") / "m.onnx", input_size=None)


@pytest.fixture(scope="module")
def nms_file(random_checkpoint, tmp_path_factory):
    """NMS inside, written by scripts/export_onnx.py as a user would."""
    out = tmp_path_factory.mktemp("nms") / "sub" / "s.onnx"
    argv = ["--variant", "s", "--weights", str(random_checkpoint("s")), "--input-size", str(SIZE[0]), str(SIZE[1]),
            "--dynamic-batch", "--nms", "--conf", str(NMS.conf), "--iou", str(NMS.iou), "--max-det", str(NMS.max_det),
            "--out", str(out)]  # fmt: skip
    assert run_command("export_onnx", argv) == 0
    return out


NMS = ExportNMS(conf=0.3, iou=0.6, max_det=50)


def test_static_export_is_one_checked_file(model, tmp_path):
    path = export_onnx(model, tmp_path / "m.onnx", SIZE, dynamic_batch=False)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no external data file
    sess = session(path)
    assert sess.get_inputs()[0].shape == [1, 3, *SIZE]
    assert_matches_torch(model, sess, images(1, *SIZE))


def test_dynamic_batch_and_size(model, dynamic_file):
    sess = session(dynamic_file)
    assert sess.get_inputs()[0].shape == ["batch", 3, "height", "width"]
    for batch, height, width in ((1, *SIZE), (3, *SIZE), (2, 128, 192), (2, 224, 96)):
        assert_matches_torch(model, sess, images(batch, height, width, seed=batch))


def test_export_script_writes_one_file(nms_file):
    assert [p.name for p in nms_file.parent.iterdir()] == ["s.onnx"]
    assert session(nms_file).get_inputs()[0].shape == ["batch", 3, *SIZE]


def assert_same_detections(got: tuple[np.ndarray, ...], want: tuple[np.ndarray, ...]) -> None:
    """One image's (boxes, scores, classes) against another's, order-independently (equal scores may come in either
    order): every detection has its partner of the same class, box and score, and none is left over."""
    left = list(zip(*want))
    for box, score, cls in zip(*got):
        partner = next((i for i, (b, s, c) in enumerate(left) if c == cls and abs(s - score) <= SCORE_ATOL
                        and np.abs(b - box).max() <= BOX_ATOL), None)  # fmt: skip
        assert partner is not None, f"class {cls} score {score:.4f} box {box} has no partner in {left[:3]}"
        left.pop(partner)
    assert not left, f"{len(left)} detections missing, first {left[0]}"


def test_nms_batch_layout_matches_handler_nms(model, nms_file):
    sess = session(nms_file)
    assert [o.name for o in sess.get_outputs()] == ["num_predictions", "boxes", "scores", "classes"]
    x = torch.cat([images(2, *SIZE), torch.zeros(1, 3, *SIZE)])  # the black image has few or no detections
    count, boxes, scores, classes = sess.run(None, {"images": x.numpy()})
    k = NMS.max_det
    assert count.shape == (3, 1) and boxes.shape == (3, k, 4) and scores.shape == (3, k) and classes.shape == (3, k)
    assert count.dtype == np.int64 and classes.dtype == np.int64
    with torch.no_grad():
        raw_boxes, raw_scores = model(x)
    options = NMSOptions(conf=NMS.conf, iou=NMS.iou, pre_nms_top_k=10**6, max_det=k, multi_label=True, agnostic=False,
                         classes=None)  # fmt: skip
    for i in range(3):
        want_boxes, want_scores, want_classes = (t.numpy() for t in select(raw_boxes[i], raw_scores[i], options))
        n = int(count[i, 0])
        assert n == len(want_scores)
        assert (np.diff(scores[i, :n]) <= 0).all(), "sorted by score"
        assert_same_detections((boxes[i, :n], scores[i, :n], classes[i, :n]), (want_boxes, want_scores, want_classes))
        assert (scores[i, n:] == 0).all() and (classes[i, n:] == -1).all() and (boxes[i, n:] == 0).all()
    assert count[:2].min() > 0, "the test images should give detections"
    assert len(set(classes[:2][classes[:2] >= 0].tolist())) > 1, "detections of several classes"


def test_nms_eager_module_equals_graph(model, nms_file):
    """DetectorWithNMS in PyTorch is what the graph computes (export_onnx.py checks files with it)."""
    x = images(2, *SIZE, seed=3)
    with torch.no_grad():
        expected = [t.numpy() for t in DetectorWithNMS(model, NMS)(x)]
    count, boxes, scores, classes = session(nms_file).run(None, {"images": x.numpy()})
    np.testing.assert_array_equal(count, expected[0])
    assert count.min() > 0, "the test images should give detections"
    for i, n in enumerate(count[:, 0]):
        assert_same_detections((boxes[i, :n], scores[i, :n], classes[i, :n]),
                               (expected[1][i, :n], expected[2][i, :n], expected[3][i, :n]))  # fmt: skip


def test_export_script_refuses_bad_size(random_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_command("export_onnx", ["--variant", "s", "--weights", str(random_checkpoint("s")),
                                    "--input-size", "100", "128", "--out", str(tmp_path / "x.onnx")])  # fmt: skip
    assert exc.value.code == 2
    assert "error: --input-size: height and width must be positive multiples of 32" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
