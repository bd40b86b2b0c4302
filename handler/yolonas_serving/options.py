"""The request options, declared once: each field of :class:`RequestOptions` is an option with its default, the
values it takes and a line of documentation. Every way in reads this table: the protocols collect raw values under
these names (``X-Max-Det`` headers for ``max_det``; form fields, JSON keys, v2 parameters and gRPC input entries
under the name itself), :func:`parse_options` checks them, the archive's ``model-config.yaml`` sets the defaults
of those marked ``archive`` under the same names, the clients build their flags from it and the docs table is
rendered from it.

Values come as JSON or YAML values, or as text (headers, form fields, gRPC entries): text is read leniently, typed
values must have their type where ``strict`` (archive settings, which TorchServe's own keys sit beside).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .errors import RequestError
from .postprocess import NMSOptions
from .slicing import MATCH_METRICS, MERGE_METHODS

MAX_DET_LIMIT = 10_000
MIN_TILE_SIDE = 32
#  Text that means "off" for an option that can be switched off (slice).
OFF = ("off", "none", "0", "false")


class OptionError(ValueError):
    """A value an option does not take; the message names the option, the value and what is allowed."""

    def __init__(self, name: str, value: Any, allowed: str):
        # !a: TorchServe 0.12 sends the message as the HTTP reason phrase, framed by character count, so a non-ASCII
        # message would corrupt the reply and kill the worker.
        super().__init__(f"{name}: got {_shown(value)}; allowed: {allowed}")


def _shown(value: Any) -> str:
    return ascii(value) if isinstance(value, str) else ascii(repr(value))[1:-1]


def _text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) else None


@dataclass(frozen=True)
class Number:
    """An int or float in a range; ``low_open`` excludes the low end."""

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False

    @property
    def allowed(self) -> str:
        text = "an integer" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            return f"{text} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"
        if self.low is not None:
            return f"{text} {'>' if self.low_open else '>='} {self.low:g}"
        return text

    def parse(self, name: str, value: Any, strict: bool = False) -> Any:
        number, text = value, _text(value)
        if text is not None and not strict:
            try:
                number = float(text) if self.kind is float else int(text)
            except ValueError:
                raise OptionError(name, value, self.allowed) from None
        typed = isinstance(number, (int, float)) and not isinstance(number, bool)
        if not typed or not math.isfinite(number) or (self.kind is int and number != int(number)):
            raise OptionError(name, value, self.allowed)
        if (strict and self.kind is int and not isinstance(number, int)) or not self._in_range(number):
            raise OptionError(name, value, self.allowed)
        return self.kind(number)

    def _in_range(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        return above and (self.high is None or value <= self.high)

    def to_config(self, value: Any) -> Any:
        return value


@dataclass(frozen=True)
class Flag:
    """true or false; text and numbers 1/0 too, except where strict."""

    allowed: str = "true or false"

    def parse(self, name: str, value: Any, strict: bool = False) -> bool:
        if isinstance(value, bool):
            return value
        text = _text(value)
        if not strict and isinstance(value, int) and value in (0, 1):
            return bool(value)
        if not strict and text is not None and text.lower() in ("true", "false", "1", "0"):
            return text.lower() in ("true", "1")
        raise OptionError(name, value, self.allowed)

    def to_config(self, value: Any) -> Any:
        return value


@dataclass(frozen=True)
class Choice:
    values: tuple[str, ...]

    @property
    def allowed(self) -> str:
        return "one of " + ", ".join(self.values)

    def parse(self, name: str, value: Any, strict: bool = False) -> str:
        text = _text(value)
        if text is None or text.lower() not in self.values:
            raise OptionError(name, value, self.allowed)
        return text.lower()

    def to_config(self, value: Any) -> Any:
        return value


@dataclass(frozen=True)
class TileSize:
    """A tile's (width, height): ``640`` or ``640x480``; off (None) as ``off``, 0, false or null."""

    minimum: int = MIN_TILE_SIDE

    @property
    def allowed(self) -> str:
        return f"off, or a tile size N or WxH in pixels, each side at least {self.minimum}"

    def parse(self, name: str, value: Any, strict: bool = False) -> tuple[int, int] | None:
        if value is None or value is False or value == 0 or (_text(value) or "").lower() in OFF:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            sides = [value, value]
        elif isinstance(value, str) or (isinstance(value, (list, tuple)) and len(value) == 2):
            parts = value.lower().split("x") if isinstance(value, str) else value
            try:
                sides = [int(str(part).strip()) for part in parts]
            except ValueError:
                raise OptionError(name, value, self.allowed) from None
            sides = sides * 2 if len(sides) == 1 else sides
        else:
            raise OptionError(name, value, self.allowed)
        if len(sides) != 2 or min(sides) < self.minimum:
            raise OptionError(name, value, self.allowed)
        return sides[0], sides[1]

    def to_config(self, value: tuple[int, int] | None) -> str:
        return "off" if value is None else f"{value[0]}x{value[1]}"


@dataclass(frozen=True)
class ClassList:
    """Class ids or names, as a list or comma-separated; resolved against the model's names."""

    allowed: str = "class ids or names, a list or comma-separated"

    def parse(self, name: str, value: Any, strict: bool = False, names: Sequence[str] = ()) -> tuple[int, ...] | None:
        if value is None:
            return None
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not items:
            raise OptionError(name, value, self.allowed)
        lookup = {class_name: i for i, class_name in enumerate(names)}
        ids = []
        for item in items:
            item = item.strip() if isinstance(item, str) else item
            if isinstance(item, str) and item in lookup:
                ids.append(lookup[item])
            elif (isinstance(item, int) and not isinstance(item, bool)) or (isinstance(item, str) and item.isdecimal()):
                if not 0 <= int(item) < len(names):
                    raise OptionError(name, item, f"class ids 0..{len(names) - 1}")
                ids.append(int(item))
            else:
                raise OptionError(name, item, f"{self.allowed}; known names are {ascii(list(names[:5]))}... "
                                              f"({len(names)} in all)")  # fmt: skip
        return tuple(sorted(set(ids)))

    def to_config(self, value: Any) -> Any:
        return value


Kind = Number | Flag | Choice | TileSize | ClassList


def option(default: Any, kind: Kind, doc: str, archive: bool = True) -> Any:
    """One row of the table: a field of :class:`RequestOptions`. ``archive``: model-config.yaml's ``handler:``
    section may set its default under the same name."""
    return field(default=default, metadata={"kind": kind, "doc": doc, "archive": archive})


@dataclass(frozen=True)
class RequestOptions:
    """Per request; the defaults are super-gradients' predict() defaults (an archive may change those marked
    ``archive``) and sahi's get_sliced_prediction defaults."""

    conf: float = option(0.25, Number(float, 0, 1), "keep class scores strictly above this")
    iou: float = option(0.7, Number(float, 0, 1, low_open=True), "IoU threshold of the class-aware NMS")
    max_det: int = option(300, Number(int, 1, MAX_DET_LIMIT), "detections kept per image, by score")
    classes: tuple[int, ...] | None = option(
        None, ClassList(), "only these classes (ids or names); applied before the pre-NMS top-k", archive=False
    )
    agnostic: bool = option(
        False, Flag(), "class-agnostic NMS (and merge of sliced tiles): boxes of different classes suppress each other"
    )
    format: str | None = option(
        None, Choice(("json", "jpeg")), "jpeg: the annotated picture (one image); default: as Accept asks, else json",
        archive=False,
    )  # fmt: skip
    slice: tuple[int, int] | None = option(
        None, TileSize(), "sliced inference: tile size, N or WxH pixels (sahi's slice_width x slice_height)"
    )
    overlap: float = option(0.2, Number(float, 0, 0.9), "tile overlap ratio, both axes (sahi's overlap ratios)")
    standard_pred: bool = option(True, Flag(), "sliced: add one prediction on the whole image (sahi's default)")
    merge: str = option("greedynmm", Choice(MERGE_METHODS), "sliced: how tile detections merge (sahi's postprocess)")
    match_metric: str = option("ios", Choice(MATCH_METRICS), "sliced: overlap measure of the merge")
    match_threshold: float = option(
        0.5, Number(float, 0, 1, low_open=True), "sliced: overlap at which detections merge"
    )
    sequence_end: bool = option(
        False, Flag(), "tracking: this is the sequence's last frame; its tracker is freed", archive=False
    )

    def nms(self, pre_nms_top_k: int, multi_label: bool) -> NMSOptions:
        return NMSOptions(self.conf, self.iou, pre_nms_top_k, self.max_det, multi_label, self.agnostic, self.classes)


@dataclass(frozen=True)
class Option:
    name: str
    default: Any
    kind: Kind
    doc: str
    archive: bool

    @property
    def header(self) -> str:
        """Its HTTP header for raw bodies (TorchServe does not pass the query string on): ``X-Max-Det``."""
        return "X-" + "-".join(part.capitalize() for part in self.name.split("_"))

    def parse(self, value: Any, strict: bool = False, names: Sequence[str] = ()) -> Any:
        if isinstance(self.kind, ClassList):
            return self.kind.parse(self.name, value, strict, names)
        return self.kind.parse(self.name, value, strict)


OPTIONS: dict[str, Option] = {f.name: Option(f.name, f.default, **f.metadata) for f in fields(RequestOptions)}
ARCHIVE_OPTIONS = {name: o for name, o in OPTIONS.items() if o.archive}
HEADERS = {o.header.lower(): name for name, o in OPTIONS.items()}


def header_options(headers: Mapping[str, Any]) -> dict[str, Any]:
    """The options among HTTP headers, by their ``X-`` names (any case)."""
    return {
        HEADERS[key.lower()]: value
        for key, value in headers.items()
        if key.lower() in HEADERS and isinstance(value, str)
    }


def parse_options(raw: Mapping[str, Any], defaults: RequestOptions, names: Sequence[str]) -> RequestOptions:
    """A request's raw option values (by name) checked against the table, over the archive's ``defaults``; a bad
    one is a 400 naming the option, the value and what is allowed."""
    unknown = sorted(set(raw) - set(OPTIONS))
    if unknown:
        raise RequestError(f"unknown option(s) {ascii(unknown)}; known: {', '.join(OPTIONS)}")
    try:
        return replace(defaults, **{name: OPTIONS[name].parse(value, names=names) for name, value in raw.items()})
    except OptionError as exc:
        raise RequestError(str(exc)) from None


def archive_defaults(section: Mapping[str, Any]) -> RequestOptions:
    """The defaults an archive's ``handler:`` section sets (strict types, as written by YAML); OptionError on a
    bad one."""
    return RequestOptions(**{name: ARCHIVE_OPTIONS[name].parse(value, strict=True) for name, value in section.items()})


def archive_config(options: RequestOptions) -> dict[str, Any]:
    """The archive-settable options as model-config.yaml values."""
    return {name: o.kind.to_config(getattr(options, name)) for name, o in ARCHIVE_OPTIONS.items()}
