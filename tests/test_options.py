"""The request options, declared once: parsing per request, the archive's defaults under the same names and
ranges, their headers, and the docs table rendered from the same rows."""

from __future__ import annotations

import re

import pytest

from helpers import REPO
from yolonas_serving.errors import RequestError
from yolonas_serving.options import (
    ARCHIVE_OPTIONS,
    OPTIONS,
    RequestOptions,
    header_options,
    parse_options,
)
from yolonas_serving.settings import HandlerSettings, SettingsError
from yolonas_tools.docs import stale_tables

NAMES = ["person", "bicycle", "car"]
DEFAULTS = RequestOptions()


def test_options_override_defaults_and_names_resolve():
    options = parse_options({"conf": "0.5", "iou": 0.6, "max_det": "10", "classes": "car,0"}, DEFAULTS, NAMES)
    assert (options.conf, options.iou, options.max_det, options.classes) == (0.5, 0.6, 10, (0, 2))
    assert options.format is None and parse_options({"format": "JPEG"}, DEFAULTS, NAMES).format == "jpeg"
    assert parse_options({}, RequestOptions(conf=0.4), NAMES).conf == 0.4  # the archive's default holds
    assert parse_options({"agnostic": "true"}, DEFAULTS, NAMES).agnostic
    assert not parse_options({"agnostic": False}, RequestOptions(agnostic=True), NAMES).agnostic


@pytest.mark.parametrize(
    "value, tile",
    [("640", (640, 640)), (640, (640, 640)), ("640x480", (640, 480)), (" 320 X 256 ", (320, 256)), ([96, 64], (96, 64)),
     ("off", None), (0, None), (None, None), (False, None)],
)  # fmt: skip
def test_slice_sizes(value, tile):
    assert parse_options({"slice": value}, DEFAULTS, NAMES).slice == tile


@pytest.mark.parametrize(
    "options, message",
    [
        ({"conf": -0.1}, "conf: got -0.1; allowed: a number in [0, 1]"),
        ({"conf": "high"}, "conf: got 'high'; allowed: a number in [0, 1]"),
        ({"conf": True}, "conf: got True"),
        ({"conf": float("nan")}, "conf: got nan"),
        ({"iou": 1.5}, "iou: got 1.5; allowed: a number in (0, 1]"),
        ({"iou": 0}, "iou: got 0; allowed: a number in (0, 1]"),
        ({"max_det": 10**9}, "max_det: got 1000000000; allowed: an integer in [1, 10000]"),
        ({"max_det": 2.5}, "max_det: got 2.5; allowed: an integer"),
        ({"classes": ["unicorn"]}, "classes: got 'unicorn'; allowed: class ids or names"),
        ({"classes": [7]}, "classes: got 7; allowed: class ids 0..2"),
        ({"classes": []}, "classes: got []"),
        ({"format": "png"}, "format: got 'png'; allowed: one of json, jpeg"),
        ({"confidence": 0.5}, "unknown option"),
        ({"binary_data_output": True}, "unknown option"),  # reserved v2 names are taken out of v2 requests only
        ({"agnostic": "maybe"}, "agnostic: got 'maybe'; allowed: true or false"),
        ({"slice": "16"}, "slice: got '16'; allowed: off, or a tile size N or WxH in pixels, each side at least 32"),
        ({"slice": "640x"}, "slice: got '640x'"),
        ({"slice": "axb"}, "slice: got 'axb'"),
        ({"slice": 31.5}, "slice: got 31.5"),
        ({"overlap": 0.95}, "overlap: got 0.95; allowed: a number in [0, 0.9]"),
        ({"merge": "wbf"}, "merge: got 'wbf'; allowed: one of greedynmm, nmm, nms"),
        ({"match_metric": "giou"}, "match_metric: got 'giou'; allowed: one of ios, iou"),
        ({"match_threshold": 0}, "match_threshold: got 0; allowed: a number in (0, 1]"),
    ],
)
def test_bad_options_name_the_option_the_value_and_what_is_allowed(options, message):
    with pytest.raises(RequestError, match=re.escape(message)) as caught:
        parse_options(options, DEFAULTS, NAMES)
    assert caught.value.status == 400


def test_headers_are_the_options_x_names_in_any_case():
    assert OPTIONS["max_det"].header == "X-Max-Det" and OPTIONS["match_threshold"].header == "X-Match-Threshold"
    headers = {"X-Conf": "0.5", "x-max-det": "7", "X-SLICE": "640", "X-Other": "1", "body": {"content-type": "a"}}
    assert header_options(headers) == {"conf": "0.5", "max_det": "7", "slice": "640"}


@pytest.mark.parametrize("name", sorted(ARCHIVE_OPTIONS))
def test_an_archive_default_takes_the_same_values_as_the_request_option(name):
    """One range per option: what a request may send, an archive may set as its default (strictly typed), and
    nothing else (the iou of a request and of an archive used to differ)."""
    option = OPTIONS[name]
    good = option.kind.to_config(option.default)
    assert getattr(HandlerSettings.from_config({name: good}).options, name) == option.default
    for bad in {"iou": [0, 1.01], "conf": [-0.01, 1.01], "max_det": [0, 10_001], "overlap": [0.91],
                "match_threshold": [0], "slice": ["31"], "merge": ["x"], "match_metric": ["x"],
                "agnostic": ["yes"], "standard_pred": ["yes"]}[name]:  # fmt: skip
        with pytest.raises(RequestError):
            parse_options({name: bad}, DEFAULTS, NAMES)
        with pytest.raises(SettingsError, match=f"{name}: got"):
            HandlerSettings.from_config({name: bad})


def test_the_docs_tables_are_rendered_from_the_code():
    """The README's options table and the docs' backends table are those of the code now."""
    assert stale_tables() == [], "run: python scripts/docs_tables.py"
    readme = (REPO / "README.md").read_text()
    assert all(f"| `{name}` | `{option.header}` |" in readme for name, option in OPTIONS.items())
