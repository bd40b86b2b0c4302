"""The deployment files are well-formed: Dockerfiles (instructions, non-root user, every file they copy exists and is
in the build context, the entry point and health check run scripts the image holds), the KServe InferenceService
(its probes match the config it ships) and the TorchServe config KServe's runtime reads. Nothing here builds an image
or talks to a cluster."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from yolonas_tools.build import archive
from yolonas_tools.paths import read_properties

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
KSERVE = DEPLOY / "kserve"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    result, pending = [], ""
    for line in dockerfile.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            keyword, _, arguments = pending.strip().partition(" ")
            result.append((keyword.upper(), arguments.strip()))
            pending = ""
    assert not pending, f"{dockerfile}: dangling line continuation"
    return result


def copy_sources(arguments: str) -> list[str]:
    parts = json.loads(arguments) if arguments.startswith("[") else shlex.split(arguments)
    return [p for p in parts[:-1] if not p.startswith("--")]


def in_context(path: str, ignore_file: Path) -> bool:
    """Whether a path survives a .dockerignore: later patterns win, ``!`` re-includes, a directory's contents follow
    the directory."""
    included = True
    for pattern in ignore_file.read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = Path(path.rstrip("/")).parts
        if any(fnmatch.fnmatch("/".join(parts[: i + 1]), pattern) for i in range(len(parts))):
            included = negated
    return included


KNOWN = {"FROM", "RUN", "COPY", "ADD", "USER", "WORKDIR", "ENV", "ARG", "EXPOSE", "CMD", "ENTRYPOINT", "LABEL",
         "HEALTHCHECK"}  # fmt: skip


@pytest.mark.parametrize("dockerfile", [DEPLOY / "Dockerfile", KSERVE / "Dockerfile"], ids=["torchserve", "kserve"])
def test_dockerfile(dockerfile: Path):
    steps = instructions(dockerfile)
    assert steps[0][0] == "FROM" and all(keyword in KNOWN for keyword, _ in steps), steps
    users = [arguments for keyword, arguments in steps if keyword == "USER"]
    assert users and users[-1] not in ("root", "0"), "the server must not run as root"


def test_torchserve_image():
    steps = instructions(DEPLOY / "Dockerfile")
    ignore = DEPLOY / "Dockerfile.dockerignore"  # BuildKit's per-Dockerfile ignore file; the context is the repo root
    sources = [source for keyword, arguments in steps if keyword == "COPY" for source in copy_sources(arguments)]
    assert {"requirements.txt", "config.properties", "metrics.yaml", "log4j2.xml", "model_store/"} <= set(sources)
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: not in the repo"
        assert in_context(source, ignore), f"COPY {source}: excluded by {ignore.name}"
    assert not in_context(".venv", ignore) and not in_context("weights/yolo_nas_s_coco.pth", ignore)
    # The image holds the repo's layout in its WORKDIR: every script the entry point and the health check run, and
    # every module they import from scripts/, is copied.
    copied = {source for source in sources if source.startswith("scripts/")}
    for script in sorted(copied):
        imported = re.findall(r"^(?:from|import) (\w+)", (REPO / script).read_text(), flags=re.M)
        local = {f"scripts/{name}.py" for name in imported if (REPO / "scripts" / f"{name}.py").is_file()}
        assert local <= copied, f"{script} imports {sorted(local - copied)}, which the image lacks"
    [command] = [json.loads(arguments) for keyword, arguments in steps if keyword == "CMD"]
    assert command[:3] == ["python", "scripts/server.py", "start"] and "--foreground" in command
    assert "scripts/server.py" in copied and command[command.index("--run-dir") + 1] == "run"
    [health] = [arguments for keyword, arguments in steps if keyword == "HEALTHCHECK"]
    options, _, probe = health.partition(" CMD ")
    assert (
        json.loads(probe) == ["python", "scripts/healthcheck.py", "--run-dir", "run"]
        and "scripts/healthcheck.py" in copied
    )
    assert "--start-period=" in options
    # The image rewrites the loopback addresses of the shipped config; make sure they are there to rewrite.
    shipped = read_properties(REPO / "config.properties")
    assert (
        shipped["inference_address"].startswith("http://127.0.0.1:")
        and shipped["disable_token_authorization"] == "false"
    )


def test_inference_service():
    service = yaml.safe_load((KSERVE / "inferenceservice.yaml").read_text())
    assert (service["apiVersion"], service["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    model = service["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "pytorch" and model["protocolVersion"] == "v2"
    assert model["storageUri"].split("://")[0] in ("gs", "s3", "pvc", "https")
    assert model["image"].endswith(":0.12.0"), "the runtime image must carry the TorchServe the archives target"
    [base] = [arguments for keyword, arguments in instructions(KSERVE / "Dockerfile") if keyword == "FROM"]
    assert base == "pytorch/torchserve-kfs:0.12.0"


def test_inference_service_probes_match_the_shipped_config():
    """The probes ask KServe's wrapper (8080 in the pod, not TorchServe's loopback port) about a model the config
    loads; the wrapper needs no token because TorchServe's token auth is off behind it."""
    model = yaml.safe_load((KSERVE / "inferenceservice.yaml").read_text())["spec"]["predictor"]["model"]
    props = read_properties(KSERVE / "config" / "config.properties")
    loaded = set(json.loads(props["model_snapshot"])["models"])
    ready, live = model["readinessProbe"]["httpGet"], model["livenessProbe"]["httpGet"]
    assert ready["path"].startswith("/v2/models/") and ready["path"].endswith("/ready")
    assert ready["path"].split("/")[3] in loaded and live["path"] == "/v2/health/live"
    torchserve_ports = {int(props[key].rsplit(":", 1)[1]) for key in ("inference_address", "management_address")}
    assert ready["port"] == live["port"] == 8080 and 8080 not in torchserve_ports
    assert props["disable_token_authorization"] == "true" and "httpHeaders" not in ready
    assert model["livenessProbe"]["initialDelaySeconds"] >= model["readinessProbe"]["initialDelaySeconds"]


def test_kserve_torchserve_config():
    props = read_properties(KSERVE / "config" / "config.properties")
    assert props["model_store"] == "/mnt/models/model-store"
    assert props["metrics_config"] == "/mnt/models/config/metrics.yaml" and (REPO / "metrics.yaml").is_file()
    # KServe's wrapper reaches TorchServe on the loopback, without a token.
    for key in ("inference_address", "management_address"):
        assert props[key].startswith("http://127.0.0.1:"), key
    assert props["disable_token_authorization"] == "true" and props["enable_model_api"] == "false"
    assert props["enable_envvars_config"] == "false"  # keeps the runtime's TS_SERVICE_ENVELOPE out
    snapshot = json.loads(props["model_snapshot"])
    assert snapshot["modelCount"] == len(snapshot["models"]) >= 1
    for name, versions in snapshot["models"].items():
        [(version, entry)] = versions.items()
        assert entry["marName"] == f"{name}.mar" and name in {f"yolo_nas_{v}" for v in "sml"}
        assert entry["defaultVersion"] is True and entry["minWorkers"] <= entry["maxWorkers"]
        assert (entry["batchSize"], entry["maxBatchDelay"]) == (
            archive.DEFAULT_BATCH_SIZE,
            archive.DEFAULT_MAX_BATCH_DELAY_MS,
        )
        assert entry["responseTimeout"] == archive.RESPONSE_TIMEOUT_S[name[-1]]
