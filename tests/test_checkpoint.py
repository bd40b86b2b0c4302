"""Reading checkpoints: every layout users have, Ultralytics' pickled model objects without super_gradients, clear
errors for anything else, and crafted pickles that must never run code."""

from __future__ import annotations

import codecs
import enum
import functools
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from yolonas import CheckpointError, build_model, load_model, read_checkpoint
from yolonas.blocks import Bottleneck, QARepVGGBlock
from yolonas.checkpoint import infer_architecture

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
BOX_ATOL, SCORE_ATOL = 0.1, 1e-3  # ../shared/reference/README.md


@pytest.fixture(scope="module")
def s_state_dict(random_checkpoint) -> dict[str, torch.Tensor]:
    return torch.load(random_checkpoint("s"), map_location="cpu", weights_only=True)["net"]


def assert_state_equal(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    actual = model.state_dict()
    assert actual.keys() == expected.keys()
    assert all(torch.equal(actual[k], expected[k]) for k in expected)


# -- layouts --------------------------------------------------------------------------------------------------------


def _shifted(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy with different class biases: tells which of two state dicts got loaded."""
    return {k: v + 1 if k.endswith("cls_pred.bias") else v.clone() for k, v in sd.items()}


LAYOUTS = {
    "net": lambda sd: {"net": sd},
    "bare": lambda sd: sd,
    "ddp_prefix": lambda sd: {"net": {f"module.{k}": v for k, v in sd.items()}},
    # A Trainer checkpoint: EMA weights win over "net", as in super-gradients.
    "trainer_ema": lambda sd: {
        "net": _shifted(sd),
        "ema_net": sd,
        "epoch": 3,
        "optimizer_state_dict": {"lr": 0.1},
        "processing_params": {"class_names": ["a", "b"], "iou": 0.6, "conf": 0.3},
    },
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reads_layouts(tmp_path, s_state_dict, layout):
    path = tmp_path / "ckpt.pth"
    torch.save(LAYOUTS[layout](s_state_dict), path)
    ckpt = read_checkpoint(path)
    assert (ckpt.variant, ckpt.num_classes) == ("s", 80)
    assert ckpt.source.endswith("read weights_only")  # plain data never goes near the fallback unpickler
    model = load_model(path, fuse=False)
    assert_state_equal(model, s_state_dict)
    if layout == "trainer_ema":
        assert "'ema_net'" in ckpt.source
        assert ckpt.processing_params == {"class_names": ["a", "b"], "iou": 0.6, "conf": 0.3}


@pytest.mark.parametrize("variant, num_classes", [("s", 1), ("s", 80), ("m", 80), ("m", 91), ("l", 80), ("l", 3)])
def test_infers_variant_and_class_count(variant, num_classes):
    with torch.device("meta"):
        sd = build_model(variant, num_classes).state_dict()
    assert infer_architecture(sd) == (variant, num_classes)


def test_loads_other_class_count_from_tensors(tmp_path, s_state_dict):
    path = tmp_path / "seven.pth"
    heads = {k: v[:7] for k, v in s_state_dict.items() if ".cls_pred." in k}  # a fine-tuned model's head
    torch.save({"net": {**s_state_dict, **heads}}, path)
    model = load_model(path)
    assert model.num_classes == 7
    with torch.no_grad():
        _, scores = model(torch.rand(1, 3, 64, 64))
    assert scores.shape == (1, 84, 7)
    assert load_model(path, variant="yolo_nas_s", num_classes=7, fuse=False).num_classes == 7


# -- errors ---------------------------------------------------------------------------------------------------------


def _drop_one(sd):
    return {k: v for k, v in sd.items() if k != "neck.neck2.blocks.conv3.bn.running_var"}


def _reshape_one(sd):
    return {**sd, "heads.head2.reg_pred.bias": torch.zeros(64)}


BAD_CONTENTS = {
    "foreign_state_dict": (
        lambda sd: {"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)},
        r"expected YOLO-NAS weights with key 'heads.head1.cls_pred.weight'; found 2 keys like \['fc.weight'",
    ),
    "missing_key": (
        _drop_one,
        r"match no YOLO-NAS variant.*921/965/1097 keys\); found 920 keys.*closest, S: 1 missing "
        r"\(e.g. 'neck.neck2.blocks.conv3.bn.running_var'\)",
    ),
    "wrong_shape": (
        _reshape_one,
        r"found 921 keys.*closest, S: 1 with other shapes \(e.g. 'heads.head2.reg_pred.bias': "
        r"expected \[68\], found \[64\]\)",
    ),
    "no_tensors": (lambda sd: {"epoch": 3, "net": None}, r"expected a YOLO-NAS checkpoint .*found a dict with 2 keys"),
    "a_list": (lambda sd: [1, 2], r"found an object of type list"),
}


@pytest.mark.parametrize("case", BAD_CONTENTS)
def test_rejects_other_contents_with_expected_and_found(tmp_path, s_state_dict, case):
    make, message = BAD_CONTENTS[case]
    path = tmp_path / "bad.pth"
    torch.save(make(s_state_dict), path)
    with pytest.raises(CheckpointError, match=message):
        load_model(path)


def test_rejects_files_that_are_not_checkpoints(tmp_path, random_checkpoint):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        read_checkpoint(tmp_path / "absent.pth")
    text = tmp_path / "notes.txt"
    text.write_text("not weights\n")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        read_checkpoint(text)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(random_checkpoint("s").read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match="truncated.pth: not a PyTorch checkpoint"):
        read_checkpoint(truncated)


def test_rejects_disagreeing_variant_or_class_count(random_checkpoint):
    path = random_checkpoint("s")
    with pytest.raises(CheckpointError, match="expected YOLO-NAS M weights; found S"):
        load_model(path, variant="m")
    with pytest.raises(CheckpointError, match="expected 91 classes; found 80"):
        load_model(path, num_classes=91)


# -- Ultralytics' pickled super-gradients model objects -------------------------------------------------------------

SG_DET = "super_gradients.training.models.detection_models"
SG_YOLO_NAS = f"{SG_DET}.yolo_nas"
#  Our classes and where super-gradients 3.7.1 defines their counterparts.
SG_CLASSES = {
    "yolonas.backbone.Backbone": "super_gradients.modules.detection_modules.NStageBackbone",
    "yolonas.backbone.Stem": f"{SG_YOLO_NAS}.yolo_stages.YoloNASStem",
    "yolonas.backbone.Stage": f"{SG_YOLO_NAS}.yolo_stages.YoloNASStage",
    "yolonas.backbone.SPP": f"{SG_DET}.csp_darknet53.SPP",
    "yolonas.blocks.QARepVGGBlock": "super_gradients.modules.qarepvgg_block.QARepVGGBlock",
    "yolonas.blocks.ConvBNReLU": "super_gradients.modules.conv_bn_act_block.ConvBNAct",
    "yolonas.blocks.Bottleneck": f"{SG_YOLO_NAS}.yolo_stages.YoloNASBottleneck",
    "yolonas.blocks.CSPLayer": f"{SG_YOLO_NAS}.yolo_stages.YoloNASCSPLayer",
    "yolonas.neck.UpStage": f"{SG_YOLO_NAS}.yolo_stages.YoloNASUpStage",
    "yolonas.neck.DownStage": f"{SG_YOLO_NAS}.yolo_stages.YoloNASDownStage",
    "yolonas.neck.PANNeck": f"{SG_YOLO_NAS}.panneck.YoloNASPANNeckWithC2",
    "yolonas.head.SeqConvBNReLU": "super_gradients.modules.conv_bn_relu_block.ConvBNReLU",
    "yolonas.head.DFLHead": f"{SG_YOLO_NAS}.dfl_heads.YoloNASDFLHead",
    "yolonas.head.Heads": f"{SG_YOLO_NAS}.dfl_heads.NDFLHeads",
}
SG_PROCESSING = "super_gradients.training.processing.processing"
CLASS_NAMES = [f"class_{i}" for i in range(80)]


def _fake_class(qualified: str, bases: tuple[type, ...], namespace: dict | None = None) -> type:
    """A class that pickles as ``qualified``: put in a module registered under that name, parents included."""
    module_name, name = qualified.rsplit(".", 1)
    cls = type(name, bases, {**(namespace or {}), "__module__": module_name, "__qualname__": name})
    setattr(_fake_module(module_name), name, cls)
    return cls


def _fake_module(name: str) -> types.ModuleType:
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    return sys.modules[name]


def _keep_kwargs(self, **kwargs) -> None:
    vars(self).update(kwargs)


class RunsCode:
    """Unpickling this runs a shell command: the classic malicious pickle."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def save_like_ultralytics(checkpoint: str, out_dir: str, marker: str) -> None:
    """Run in a subprocess: turn our model into one that pickles as super-gradients' YoloNAS_S, with the attributes
    sg models carry, and ``torch.save`` the whole object, as Ultralytics' yolo_nas_s.pt does."""
    torch.set_num_threads(2)
    out = Path(out_dir)
    model = load_model(checkpoint, fuse=False)
    fakes = {ours: _fake_class(theirs, (_import_class(ours),)) for ours, theirs in SG_CLASSES.items()}
    variant_class = f"{SG_YOLO_NAS}.yolo_nas_variants.YoloNAS_{model.cfg.name[-1].upper()}"
    del model.cfg  # ours, not sg's: sg keeps _arch_params instead
    fakes["yolonas.model.YoloNAS"] = _fake_class(variant_class, (type(model),))
    residual = _fake_class("super_gradients.modules.skip_connections.Residual", (nn.Module,))
    for module in model.modules():
        if isinstance(module, QARepVGGBlock):  # what sg's block keeps besides its weights
            module.activation_type = nn.ReLU
            module.alpha = 1.0
            if module.residual:
                module.register_buffer("id_tensor", torch.eye(module.rbr_reparam.in_channels), persistent=False)
        if isinstance(module, Bottleneck):
            module.shortcut = residual()
        module.__class__ = fakes.get(f"{type(module).__module__}.{type(module).__qualname__}", type(module))

    processing = {
        name: _fake_class(f"{SG_PROCESSING}.{name}", (), {"__init__": _keep_kwargs})
        for name in (
            "ComposeProcessing",
            "DetectionLongestMaxSizeRescale",
            "DetectionCenterPadding",
            "StandardizeImage",
            "ImagePermute",
        )
    }
    hpm_struct = _fake_class("super_gradients.training.utils.utils.HpmStruct", (), {"__init__": _keep_kwargs})
    upsample_mode = enum.Enum(
        "UpsampleMode",
        {"CONV_TRANSPOSE": "conv_transpose"},
        type=str,
        module="super_gradients.common.data_types.enum.upsample_mode",
    )
    _fake_module(upsample_mode.__module__).UpsampleMode = upsample_mode
    model._class_names = list(CLASS_NAMES)
    model._default_nms_iou = 0.7
    model._default_nms_conf = 0.25
    model._image_processor = processing["ComposeProcessing"](
        processings=[
            processing["DetectionLongestMaxSizeRescale"](output_shape=(636, 636)),
            processing["DetectionCenterPadding"](output_shape=(640, 640), pad_value=114),
            processing["StandardizeImage"](max_value=255.0),
            processing["ImagePermute"](permutation=(2, 0, 1)),
        ]
    )
    # numpy arrays and scalars and enum values: loaded as inert records.
    model._arch_params = hpm_struct(
        num_classes=80,
        upsample_mode=upsample_mode.CONV_TRANSPOSE,
        strides=np.array([8, 16, 32]),
        bn_eps=np.float64(1e-3),
        schema=None,
    )

    x = torch.rand(1, 3, 128, 160, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        boxes, scores = model(x)
    torch.save({"input": x, "boxes": boxes, "scores": scores}, out / "expected.pt")
    torch.save(model, out / "yolo_nas_s.pt")
    model._block_factory = functools.partial(nn.Conv2d, kernel_size=3)  # a callable: refused
    torch.save(model, out / "with_partial.pt")
    del model._block_factory
    model._image_processor.processings.append(RunsCode(f"touch {marker}"))  # a payload inside allow-listed objects
    torch.save(model, out / "with_payload.pt")


def _import_class(qualified: str) -> type:
    module_name, name = qualified.rsplit(".", 1)
    return getattr(__import__(module_name, fromlist=[name]), name)


@pytest.fixture(scope="module")
def ultralytics_files(tmp_path_factory, random_checkpoint) -> Path:
    out = tmp_path_factory.mktemp("ultralytics")
    code = "import sys, test_checkpoint as t; t.save_like_ultralytics(*sys.argv[1:])"  # -c finds it in its cwd
    args = [str(random_checkpoint("s")), str(out), str(out / "MARKER")]
    subprocess.run([sys.executable, "-c", code, *args], cwd=TESTS, check=True, timeout=300)
    return out


def test_pickled_model_really_names_super_gradients(ultralytics_files):
    import zipfile

    with zipfile.ZipFile(ultralytics_files / "yolo_nas_s.pt") as archive:
        data = next(archive.read(n) for n in archive.namelist() if n.endswith("data.pkl"))
    for needed in (b"yolo_nas_variants", b"YoloNAS_S", b"qarepvgg_block", b"QARepVGGBlock", b"HpmStruct", b"numpy"):
        assert needed in data
    with pytest.raises(pickle.UnpicklingError):
        torch.load(ultralytics_files / "yolo_nas_s.pt", weights_only=True)


def test_reads_pickled_model_without_super_gradients(ultralytics_files):
    assert "super_gradients" not in sys.modules
    ckpt = read_checkpoint(ultralytics_files / "yolo_nas_s.pt")
    assert ckpt.source == "pickled model object, read restricted"
    assert (ckpt.variant, ckpt.num_classes) == ("s", 80)
    assert ckpt.processing_params == {"class_names": CLASS_NAMES, "iou": 0.7, "conf": 0.25}
    assert not any(k.endswith("id_tensor") for k in ckpt.state_dict)  # non-persistent buffers stay out

    expected = torch.load(ultralytics_files / "expected.pt", weights_only=True)
    for fuse, atol in ((False, (1e-5, 1e-6)), (True, (BOX_ATOL, SCORE_ATOL))):
        model = load_model(ultralytics_files / "yolo_nas_s.pt", fuse=fuse)
        with torch.no_grad():
            boxes, scores = model(expected["input"])
        torch.testing.assert_close(boxes, expected["boxes"], rtol=0, atol=atol[0])
        torch.testing.assert_close(scores, expected["scores"], rtol=0, atol=atol[1])
    assert "super_gradients" not in sys.modules  # nothing was imported


def test_refuses_callables_in_pickled_model(ultralytics_files):
    """functools.partial (and any callable) is refused rather than stubbed: sg's models keep none, and the message
    names it."""
    with pytest.raises(
        CheckpointError,
        match=r"with_partial.pt: refused to load global functools.partial: it is not "
        r"on the allow-list",
    ):
        read_checkpoint(ultralytics_files / "with_partial.pt")


# -- crafted pickles must not run -----------------------------------------------------------------------------------


def _payload_files(folder: Path, marker: Path, state_dict: dict[str, torch.Tensor]) -> dict[str, Path]:
    command = f"touch {marker}"
    files = {name: folder / f"{name}.pt" for name in ("zip", "raw", "raw_protocol5", "next_to_state_dict", "eval")}
    torch.save(RunsCode(command), files["zip"])
    files["raw"].write_bytes(pickle.dumps(RunsCode(command), protocol=2))
    files["raw_protocol5"].write_bytes(pickle.dumps(RunsCode(command), protocol=5))
    torch.save({"net": state_dict, "extra": RunsCode(command)}, files["next_to_state_dict"])
    evil_eval = type("EvilEval", (), {"__reduce__": lambda self: (eval, (f"__import__('os').system({command!r})",))})
    torch.save({"net": state_dict, "extra": evil_eval()}, files["eval"])
    return files


PAYLOADS = ["zip", "raw", "raw_protocol5", "next_to_state_dict", "eval", "inside_pickled_model"]


@pytest.fixture(scope="module")
def payloads(tmp_path_factory, s_state_dict, ultralytics_files) -> tuple[dict[str, Path], Path]:
    folder = tmp_path_factory.mktemp("payloads")
    marker = ultralytics_files / "MARKER"  # the marker the pickled model's payload would create
    files = _payload_files(folder, marker, s_state_dict)
    files["inside_pickled_model"] = ultralytics_files / "with_payload.pt"
    return files, marker


def test_payloads_are_live(payloads):
    """Control: a plain unpickler does run them, so the marker checks below mean something."""
    files, marker = payloads
    pickle.loads(files["raw"].read_bytes())
    assert marker.exists()
    marker.unlink()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 5")
@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("loader", [read_checkpoint, load_model], ids=["read_checkpoint", "load_model"])
def test_refuses_code_execution(payloads, payload, loader):
    files, marker = payloads
    with pytest.raises(CheckpointError, match="refused"):
        loader(files[payload])
    assert not marker.exists()


def test_codecs_only_decode_latin1(tmp_path):
    """torch's weights_only allows any _codecs.encode; our fallback (forced here by a module object) only latin1."""
    path = tmp_path / "codec.pt"
    rot13 = type("Rot13", (), {"__reduce__": lambda self: (codecs.encode, ("text", "rot13"))})()
    torch.save({"module": nn.Identity(), "x": rot13}, path)
    with pytest.raises(CheckpointError, match="refused _codecs.encode with encoding 'rot13'"):
        read_checkpoint(path)
