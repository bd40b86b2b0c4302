"""The model command-line scripts: make_random_weights.py, model_info.py and get_weights.py (never on the network:
downloads come from a local HTTP server or a refused loopback port)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import torch

from helpers import REPO
from yolonas import build_model, read_checkpoint, summarize
from yolonas_tools.build import weights
from yolonas_tools.cli import run_command

PARAMS = {"yolo_nas_s": 19_053_888, "yolo_nas_m": 51_182_658, "yolo_nas_l": 66_976_392}


# -- make_random_weights.py -----------------------------------------------------------------------------------------


def test_make_random_weights(tmp_path, capsys, random_checkpoint):
    same, other = tmp_path / "seed0.pth", tmp_path / "seed1.pth"
    assert run_command("make_random_weights", ["--variant", "s", "--out", str(same)]) == 0
    assert (
        run_command("make_random_weights", ["--variant", "s", "--num-classes", "3", "--seed", "1", "--out", str(other)])
        == 0
    )
    assert f"wrote {other}: YOLO-NAS S, 3 classes, seed 1" in capsys.readouterr().out
    files = {path: torch.load(path, map_location="cpu", weights_only=True) for path in (same, other)}
    assert all(list(f) == ["net"] for f in files.values())  # the official layout
    a, c = files[same]["net"], files[other]["net"]
    build_model("s", 3).load_state_dict(c, strict=True)
    assert (read_checkpoint(other).variant, read_checkpoint(other).num_classes) == ("s", 3)
    # Same seed (0, the default), same tensors: the conftest fixture made its file in this process with seed 0.
    reference = torch.load(random_checkpoint("s"), map_location="cpu", weights_only=True)["net"]
    assert a.keys() == reference.keys() and all(torch.equal(a[k], reference[k]) for k in a)
    # Another seed: (nearly) every float tensor differs.
    floats = [k for k in a if a[k].is_floating_point() and a[k].shape == c[k].shape and not k.endswith("alpha")]
    differing = sum(not torch.equal(a[k], c[k]) for k in floats)
    assert differing > 0.9 * len(floats), (differing, len(floats))


@pytest.mark.parametrize("args, message", [
    (["--variant", "x"], "argument --variant: invalid choice: 'x' (choose from 's', 'm', 'l')"),
    (["--variant", "s", "--num-classes", "0"], "--num-classes must be at least 1"),
    (["--variant", "s"], "the following arguments are required: --out"),
])  # fmt: skip
def test_make_random_weights_rejects_bad_arguments(tmp_path, capsys, args, message):
    out = [] if args == ["--variant", "s"] else ["--out", str(tmp_path / "w.pth")]
    with pytest.raises(SystemExit) as exc:
        run_command("make_random_weights", args + out)
    assert exc.value.code == 2
    assert f"error: {message}" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_scripts_run_standalone():
    """Each script finds handler/ by itself (through common.py), from any working directory."""
    for script in ("make_random_weights.py", "get_weights.py"):
        out = subprocess.run(
            [sys.executable, str(REPO / "scripts" / script), "--help"],
            cwd="/",
            capture_output=True,
            text=True,
            check=True,
        )
        assert "--variant" in out.stdout
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "model_info.py"), "--variant", "s"],
        cwd="/",
        capture_output=True,
        text=True,
        check=True,
    )
    assert "19,053,888" in out.stdout


# -- model_info.py --------------------------------------------------------------------------------------------------


def run_model_info(capsys, *args: str):
    assert run_command("model_info", list(args)) == 0
    return capsys.readouterr().out


def test_model_info_json(capsys):
    rows = json.loads(run_model_info(capsys, "--json"))
    assert [r["name"] for r in rows] == list(PARAMS)
    for row in rows:
        assert row["params"] == PARAMS[row["name"]]
        assert row["fused_params"] == summarize(row["name"]).fused_params < row["params"]
        assert row["anchors"] == 8400 and row["image_size"] == [640, 640] and row["num_classes"] == 80
    gmacs = [r["gmacs"] for r in rows]
    # Deci publishes about 17 / 47 / 64.5 GMACs; we count the fused convolutions only, a little less.
    assert 15 < gmacs[0] < 17.5 and 42 < gmacs[1] < 48 and 58 < gmacs[2] < 65


def test_model_info_image_size_and_classes(capsys):
    (row,) = json.loads(run_model_info(capsys, "--variant", "m", "--image-size", "320", "416", "--json"))
    assert row["anchors"] == 40 * 52 + 20 * 26 + 10 * 13
    # Every feature map scales with the input area, so the MACs do too, exactly.
    assert row["gmacs"] == pytest.approx(summarize("m").gmacs * (320 * 416) / (640 * 640), rel=1e-9)
    (one_class,) = json.loads(run_model_info(capsys, "--variant", "m", "--num-classes", "1", "--json"))
    head_width = (96, 192, 384)  # M's head inter channels: cls_pred loses 79 outputs per level
    assert row["params"] - one_class["params"] == sum(79 * (c + 1) for c in head_width)


def test_model_info_table(capsys):
    lines = run_model_info(capsys, "--variant", "l").splitlines()
    assert lines[0].split() == ["model", "classes", "params", "(sg)", "params", "(fused)", "GMACs@640x640", "anchors"]
    name, classes, params, fused, gmacs, anchors = lines[1].split()
    assert (name, classes, params, anchors) == ("yolo_nas_l", "80", "66,976,392", "8400")


@pytest.mark.parametrize("size", [["100", "640"], ["640", "0"]])
def test_model_info_rejects_bad_image_size(capsys, size):
    with pytest.raises(SystemExit) as exc:
        run_command("model_info", ["--image-size", *size])
    assert exc.value.code == 2
    message = f"error: image size {size[0]}x{size[1]}: both sides must be positive multiples of 32"
    assert message in capsys.readouterr().err


# -- get_weights.py -------------------------------------------------------------------------------------------------


def test_official_urls():
    assert weights.SOURCES["super-gradients"].format(variant="m") == (
        "https://sg-hub-nv.s3.amazonaws.com/models/yolo_nas_m_coco.pth"
    )
    assert weights.SOURCES["ultralytics"].format(variant="l") == (
        "https://github.com/ultralytics/assets/releases/download/v8.3.0/yolo_nas_l.pt"
    )


def refused_url() -> str:
    """A loopback port nobody listens on: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/models/" + "{name}"


def sources(super_gradients: str, ultralytics: str) -> dict[str, str]:
    return {
        "super-gradients": super_gradients.format(name="yolo_nas_{variant}_coco.pth"),
        "ultralytics": ultralytics.format(name="yolo_nas_{variant}.pt"),
    }


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


class TruncatingHandler(QuietHandler):
    """Announces the full length, sends half, hangs up: a download cut short."""

    def copyfile(self, source, outputfile) -> None:
        data = source.read()
        outputfile.write(data[: len(data) // 2])


@contextlib.contextmanager
def serve(folder: Path, handler: type[http.server.SimpleHTTPRequestHandler] = QuietHandler):
    """A local HTTP server publishing ``folder``; yields a URL template with ``{name}``."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=folder))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/" + "{name}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def file_server(tmp_path):
    """(folder, url template): a local HTTP server publishing ``folder``."""
    folder = tmp_path / "published"
    folder.mkdir()
    with serve(folder) as url:
        yield folder, url


def test_offline_fails_fast_after_trying_every_source(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(weights, "SOURCES", sources(refused_url(), refused_url()))
    out = tmp_path / "weights"
    start = time.monotonic()
    assert run_command("get_weights", ["--variant", "s", "--out", str(out)]) == 2
    assert time.monotonic() - start < 10
    err = capsys.readouterr().err
    assert "super-gradients: download failed: ConnectionError" in err
    assert "ultralytics: download failed: ConnectionError" in err
    assert "could not get YOLO-NAS S weights from super-gradients or ultralytics" in err and "offline?" in err
    assert not list(out.iterdir())


def test_unresolvable_host_tries_sources_in_order_with_short_connect_timeout(tmp_path, monkeypatch, capsys):
    calls = []

    def no_dns(url, **kwargs):
        calls.append((url, kwargs["timeout"]))
        raise requests.ConnectionError(
            f"Failed to resolve '{url.split('/')[2]}' ([Errno -2] Name or service not known)"
        )

    monkeypatch.setattr(weights.requests, "get", no_dns)
    assert run_command("get_weights", ["--variant", "l", "--source", "ultralytics", "--out", str(tmp_path)]) == 2
    assert [url for url, _ in calls] == [
        "https://github.com/ultralytics/assets/releases/download/v8.3.0/yolo_nas_l.pt",
        "https://sg-hub-nv.s3.amazonaws.com/models/yolo_nas_l_coco.pth",
    ]
    assert all(timeout[0] <= 5 for _, timeout in calls)  # (connect, read)
    assert "Failed to resolve 'github.com'" in capsys.readouterr().err


def test_http_error_counts_as_unreachable(tmp_path, monkeypatch, file_server, capsys):
    _, url = file_server  # publishes nothing: 404
    monkeypatch.setattr(weights, "SOURCES", sources(url, url))
    assert run_command("get_weights", ["--variant", "s", "--out", str(tmp_path / "w")]) == 2
    assert "download failed: HTTP 404" in capsys.readouterr().err


def test_interrupted_download_leaves_nothing(tmp_path, monkeypatch, random_checkpoint, capsys):
    folder = tmp_path / "published"
    folder.mkdir()
    (folder / "yolo_nas_s_coco.pth").write_bytes(random_checkpoint("s").read_bytes())
    out = tmp_path / "weights"
    with serve(folder, TruncatingHandler) as url:
        monkeypatch.setattr(weights, "SOURCES", sources(url, refused_url()))
        assert run_command("get_weights", ["--variant", "s", "--out", str(out)]) == 2
    assert "super-gradients: download failed: ChunkedEncodingError" in capsys.readouterr().err
    assert not list(out.iterdir())


def _three_class(checkpoint: Path, target: Path) -> None:
    sd = torch.load(checkpoint, map_location="cpu", weights_only=True)["net"]
    torch.save({"net": {k: v[:3] if ".cls_pred." in k else v for k, v in sd.items()}}, target)


@pytest.mark.parametrize("wrong", ["variant", "classes"])
def test_validation_rejects_the_wrong_model(tmp_path, monkeypatch, file_server, random_checkpoint, capsys, wrong):
    folder, url = file_server
    if wrong == "variant":  # an S published where M is asked for
        args, message = ["--variant", "m"], "expected YOLO-NAS M weights; found S"
        for name in ("yolo_nas_m_coco.pth", "yolo_nas_m.pt"):
            (folder / name).write_bytes(random_checkpoint("s").read_bytes())
    else:
        args, message = ["--variant", "s"], "expected 80 classes; found 3"
        for name in ("yolo_nas_s_coco.pth", "yolo_nas_s.pt"):
            _three_class(random_checkpoint("s"), folder / name)
    monkeypatch.setattr(weights, "SOURCES", sources(url, url))
    out = tmp_path / "weights"
    assert run_command("get_weights", [*args, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("the file is not the expected model, discarded: ") == err.count(message) == 2
    assert not list(out.iterdir())  # neither the .part nor a renamed file stays


def test_downloads_validates_and_falls_back(tmp_path, monkeypatch, file_server, random_checkpoint, capsys):
    folder, url = file_server
    (folder / "yolo_nas_s.pt").write_bytes(random_checkpoint("s").read_bytes())
    monkeypatch.setattr(weights, "SOURCES", sources(refused_url(), url))
    out = tmp_path / "weights"
    assert run_command("get_weights", ["--variant", "s", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "super-gradients: download failed" in captured.err
    target = out / "yolo_nas_s.pt"
    assert sorted(out.iterdir()) == [target]
    assert target.read_bytes() == (folder / "yolo_nas_s.pt").read_bytes()
    assert f"sha256 {hashlib.sha256(target.read_bytes()).hexdigest()}" in captured.out
    assert "YOLO-NAS S from ultralytics" in captured.out

    # A second run finds the checked file in place and needs no network.
    monkeypatch.setattr(weights, "SOURCES", sources(refused_url(), refused_url()))
    assert run_command("get_weights", ["--variant", "s", "--out", str(out)]) == 0
    assert "already present" in capsys.readouterr().out


def test_model_info_times_fusion(capsys):
    (row,) = json.loads(run_model_info(capsys, "--variant", "s", "--image-size", "64", "64", "--time", "1", "--json"))
    assert row["params"] == 19_053_888 and row["unfused_ms"] > 0 and row["fused_ms"] > 0
    assert row["speedup"] == pytest.approx(row["unfused_ms"] / row["fused_ms"])
