"""Where batchSize and maxBatchDelay come from when several places set them, read back with DescribeModel (gRPC):
register parameters > the archive's model-config.yaml > ``models=`` in config.properties > TorchServe's defaults
(1, 100 ms). ``models=`` is keyed by the name a model is registered under (the manifest's name unless the register
call or load_models gives another), applies to models registered later through the API too, and fills in only what
the archive's model-config.yaml leaves unset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import with_model_config
from yolonas_tools.build import archive
from yolonas_tools.serve import server
from yolonas_tools.serve.grpc_client import GrpcClient

MODEL = "yolo_nas_s"
ARCHIVE = (archive.DEFAULT_BATCH_SIZE, archive.DEFAULT_MAX_BATCH_DELAY_MS)  # what scripts/archive.py writes
CONFIG = (3, 33)  # models= in config.properties
PARAMS = (6, 66)  # register parameters


@pytest.fixture(scope="module")
def configured(tmp_path_factory: pytest.TempPathFactory, model_store: Path, s_archive: Path):
    """A server whose config.properties sets batch settings in ``models=`` for yolo_nas_s (loaded at start) and for
    two names registered later; plus an archive whose model-config.yaml sets none."""
    assert len({ARCHIVE, CONFIG, PARAMS, (1, 100)}) == 4
    with_model_config(s_archive, model_store / "unbatched.mar", batchSize=None, maxBatchDelay=None)
    entry = {
        "marName": s_archive.name,
        "minWorkers": 1,
        "maxWorkers": 1,
        "batchSize": CONFIG[0],
        "maxBatchDelay": CONFIG[1],
    }
    models = {name: {"1.0": {**entry, "defaultVersion": True}} for name in (MODEL, "unbatched", "by_params")}
    extra = {"models": json.dumps(models), "load_models": s_archive.name}
    run_dir = tmp_path_factory.mktemp("run_batch_config")
    endpoints = server.start(run_dir, model_store, ports=server.free_ports(), extra_config=extra)
    with GrpcClient(endpoints) as client:
        client.wait_ready()
        yield endpoints, client
    server.stop(run_dir)


def batching(client: GrpcClient, name: str) -> tuple[int, int]:
    [described] = client.describe(name)
    return described["batchSize"], described["maxBatchDelay"]


def register(endpoints, archive_name: str, name: str, **params: object) -> None:
    # No workers: batch settings are fixed at registration, and loading a model would only cost time.
    server.register(endpoints, archive_name, name=name, initial_workers=0, **params)


def test_precedence(configured):
    endpoints, client = configured
    # The archive beats models=: the model loaded at start keeps the archive's settings.
    assert batching(client, MODEL) == ARCHIVE
    # models= fills in what the archive leaves unset, by registered name...
    register(endpoints, "unbatched.mar", "unbatched")
    assert batching(client, "unbatched") == CONFIG
    # ...and a name it does not list gets TorchServe's defaults.
    register(endpoints, "unbatched.mar", "unlisted")
    assert batching(client, "unlisted") == (1, 100)
    # Register parameters beat the archive and models= together.
    register(endpoints, f"{MODEL}.mar", "by_params", batch_size=PARAMS[0], max_batch_delay=PARAMS[1])
    assert batching(client, "by_params") == PARAMS
