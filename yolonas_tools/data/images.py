"""Which files are images, and the Content-Type each is sent with: the one list for datasets, calibration sets,
batch jobs and clients."""

from __future__ import annotations

from pathlib import Path

#  Suffix (lower case) -> MIME type. MPO (a camera's multi-picture JPEG) decodes as its first JPEG frame.
MIME_TYPES: dict[str, str] = {
    ".bmp": "image/bmp",
    ".gif": "image/gif",
    ".jpeg": "image/jpeg",
    ".jpg": "image/jpeg",
    ".mpo": "image/jpeg",
    ".png": "image/png",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
    ".webp": "image/webp",
}
IMAGE_SUFFIXES = frozenset(MIME_TYPES)


def is_image(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def content_type(path: str | Path) -> str:
    """The Content-Type a file is sent with; application/octet-stream for an unknown suffix (the server sniffs)."""
    return MIME_TYPES.get(Path(path).suffix.lower(), "application/octet-stream")
