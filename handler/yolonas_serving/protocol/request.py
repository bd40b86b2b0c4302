"""A TorchServe row -> the parsed request of the protocol it speaks.

TorchServe hands the handler a body (bytes, text, or JSON it already decoded) or multipart fields, and the request's
headers. The body may be compressed (``Content-Encoding: gzip`` or ``deflate``, as Triton's client offers; answers
are not). A v2 request is JSON with ``inputs``, or comes under the binary tensor extension; anything else is plain.
Options sent as ``X-`` headers join any request's options (TorchServe does not pass the query string on).
"""

from __future__ import annotations

import json
import zlib
from typing import Any

from ..errors import RequestError
from ..options import header_options
from .base import DEFAULT_LIMITS, ParsedRequest, RequestLimits
from .plain import field_type, parse_form, parse_json, parse_raw
from .v2 import BINARY_HEADER, parse_v2

#  Request body encodings and their zlib window bits ("deflate" is the zlib format, as HTTP and Triton's client use it).
CONTENT_ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
#  A compressed body may expand to this many times the request's byte limit (room for base64 and JSON around images).
MAX_EXPANSION = 2


def header(headers: dict[str, Any], name: str) -> str | None:
    """A request header by name, whatever its case."""
    return next((v for k, v in headers.items() if k.lower() == name and isinstance(v, str)), None)


def parse_request(
    row: dict[str, Any], headers: dict[str, Any] | None = None, limits: RequestLimits = DEFAULT_LIMITS
) -> ParsedRequest:
    """One TorchServe input row (``{"body": ...}`` or multipart fields) and its headers -> its images and options."""
    headers = headers or {}
    if not row:
        raise RequestError("empty request: send an image as the body, a form file, or JSON")
    if "body" in row:
        body = decompressed(row["body"], header(headers, "content-encoding"), limits)
        request = _parse_body(body, field_type(headers, "body"), header(headers, BINARY_HEADER), limits)
    else:
        request = parse_form(row, headers)
    for key, value in header_options(headers).items():
        request.options.setdefault(key, value)
    total = sum(len(image) for image in request.images if isinstance(image, bytes))
    if total > limits.max_bytes:
        raise RequestError(f"the request's images hold {total} bytes; at most {limits.max_bytes}", status=413)
    request.accept = header(headers, "accept")
    return request


def decompressed(body: Any, encoding: str | None, limits: RequestLimits) -> Any:
    """The body with its ``Content-Encoding`` undone; the expansion is bounded, so that a small compressed body cannot
    fill the worker's memory."""
    name = (encoding or "").strip().lower()
    if name in ("", "identity"):
        return body
    if name not in CONTENT_ENCODINGS:
        raise RequestError(
            f"Content-Encoding {encoding!a} is not supported; send {', '.join(CONTENT_ENCODINGS)} or none", status=415
        )
    if not isinstance(body, (bytes, bytearray)):  # TorchServe decoded it as JSON or text: it was not compressed
        raise RequestError(f"a {name} body must be sent as bytes (application/octet-stream), not as JSON or text")
    bound = MAX_EXPANSION * limits.max_bytes
    inflater = zlib.decompressobj(CONTENT_ENCODINGS[name])
    try:
        raw = inflater.decompress(bytes(body), bound + 1)
    except zlib.error as exc:
        raise RequestError(f"the body is not valid {name} data ({exc})") from None
    if len(raw) > bound:
        raise RequestError(f"the {name} body expands beyond {bound} bytes", status=413)
    if not inflater.eof:
        raise RequestError(f"the {name} body is truncated")
    return raw


def _load_json(text: str | bytes | bytearray) -> Any:
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise RequestError(f"the body is not valid JSON: {exc}") from None


def _parse_json(body: Any, limits: RequestLimits, binary: bytes | None = None) -> ParsedRequest:
    if not isinstance(body, dict):
        raise RequestError(f"a JSON request must be an object; got {type(body).__name__}")
    if "inputs" in body or binary is not None:
        return parse_v2(body, limits, binary)
    return parse_json(body, limits)


def _parse_body(body: Any, content_type: str, binary_header: str | None, limits: RequestLimits) -> ParsedRequest:
    if binary_header is not None:
        return _parse_binary_extension(body, binary_header, limits)
    if isinstance(body, (dict, list)):  # TorchServe already decoded an application/json body
        return _parse_json(body, limits)
    if isinstance(body, str):
        return _parse_json(_load_json(body), limits)
    if isinstance(body, (bytes, bytearray)):
        if content_type.startswith("application/json") or bytes(body[:1]) in (b"{", b"["):
            return _parse_json(_load_json(bytes(body)), limits)
        return parse_raw(body)
    raise RequestError(f"unexpected request body of type {type(body).__name__}")


def _parse_binary_extension(body: Any, header_length: str, limits: RequestLimits) -> ParsedRequest:
    """JSON header of ``Inference-Header-Content-Length`` bytes, then the raw tensors."""
    if isinstance(body, dict):  # nothing after the header: TorchServe decoded it as JSON
        return _parse_json(body, limits)
    if not isinstance(body, (str, bytes, bytearray)):  # other JSON TorchServe decoded: null, a number, a list
        raise RequestError(f"a v2 request must be a JSON object; got {type(body).__name__}")
    raw = body.encode("utf-8") if isinstance(body, str) else bytes(body)
    if not header_length.strip().isdecimal() or int(header_length) > len(raw):
        raise RequestError(f"Inference-Header-Content-Length {header_length!a} does not fit a {len(raw)}-byte body")
    size = int(header_length)
    return _parse_json(_load_json(raw[:size]), limits, raw[size:])
