"""The query image of a `POST /search`: the raw request body, or the first file of a multipart form;
the body's size is checked against the limit from Content-Length before anything is read."""
from __future__ import annotations

from email import policy
from email.parser import BytesParser
from typing import BinaryIO, Mapping

from unidml.serving.errors import RequestError


def upload_length(headers: Mapping[str, str], limit: int) -> int:
    """The body's declared size: 411 without Content-Length, 400 when malformed, 413 above `limit` bytes."""
    declared = headers.get("Content-Length")
    if declared is None:
        raise RequestError(411, "Content-Length is required (chunked uploads are not accepted)")
    if not declared.strip().isdigit():
        raise RequestError(400, f"Content-Length '{declared[:40]}' is not a byte count")
    length = int(declared)
    if length > limit:
        raise RequestError(413, f"upload of {length} bytes is over the limit of {limit} bytes")
    if length == 0:
        raise RequestError(400, "empty upload: send the image as the request body or as a multipart file")
    return length


def read_upload(headers: Mapping[str, str], body: BinaryIO, limit: int) -> bytes:
    """The image bytes of the request (raw body, or the first file part of multipart/form-data)."""
    data = body.read(upload_length(headers, limit))
    content_type = headers.get("Content-Type", "")
    return multipart_file(data, content_type) if content_type.lower().startswith("multipart/") else data


def multipart_file(data: bytes, content_type: str) -> bytes:
    """The content of the first part carrying a filename (or, failing that, the first part): 400 if none."""
    message = BytesParser(policy=policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n" + data)
    parts = list(message.iter_parts()) if message.is_multipart() else []
    if not parts:
        raise RequestError(400, "multipart upload without parts (is the boundary right?)")
    chosen = next((p for p in parts if p.get_filename()), parts[0])
    payload = chosen.get_payload(decode=True)
    if not payload:
        raise RequestError(400, "the multipart upload's file is empty")
    return payload
