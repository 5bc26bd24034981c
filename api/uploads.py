"""Streaming multipart upload: the file part goes straight to a temporary file, counted, and is cut off at the limit;
the temporary files an API stopped mid-upload left behind are swept."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import IO

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from api.errors import ApiError, problem
from core.config import Settings
from core.datasets import UPLOAD_TEMP_PREFIX, sweep_upload_temps

log = logging.getLogger(__name__)
MAX_FIELD_BYTES = 1024  # the text fields (name, label_column) are short
MAX_PARTS = 8


@dataclass
class Upload:
    """A received file (a temporary file the caller moves or deletes), its sha256, and the form's text fields."""

    path: Path
    filename: str
    size_bytes: int
    sha256: str
    fields: dict[str, str] = field(default_factory=dict)


async def receive_upload(
    request: Request, *, folder: Path, max_bytes: int, suffixes: tuple[str, ...], file_field: str = "file"
) -> Upload:
    """Stream a multipart body: the `file_field` part to a temporary file in `folder` (413 past `max_bytes`, before
    the rest is read), other parts as short text fields."""
    parts = _Parts(folder, max_bytes, suffixes, file_field)
    parser = MultipartParser(_boundary(request), parts.callbacks())
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
        return parts.result()
    except FormParserError as exc:
        parts.discard()
        raise ApiError(422, "invalid_request", f"malformed multipart body: {exc}") from None
    except BaseException:
        parts.discard()
        raise
    finally:
        parts.close()


async def sweep_stale_uploads(settings: Settings) -> None:
    """Delete the temporary files of uploads whose API stopped mid-upload (they are in no listing and no quota)."""
    try:
        removed = await run_in_threadpool(sweep_upload_temps, settings.dataset_dir, settings.upload_temp_max_age_s)
    except OSError as exc:
        log.warning("cannot sweep stale uploads in %s: %s", settings.dataset_dir, exc)
        return
    for path in removed:
        log.info("removed %s, left by an upload that never finished", path)


async def keep_sweeping_stale_uploads(settings: Settings) -> None:
    """sweep_stale_uploads every quarter of settings.upload_temp_max_age_s, until cancelled."""
    while True:
        await asyncio.sleep(settings.upload_temp_max_age_s / 4)
        await sweep_stale_uploads(settings)


def _boundary(request: Request) -> bytes:
    content_type, params = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data":
        raise ApiError(415, "unsupported_media_type", "send the file as multipart/form-data")
    if not params.get(b"boundary"):
        raise ApiError(422, "invalid_request", "multipart body without a boundary")
    return params[b"boundary"]


class _Parts:
    """python-multipart callbacks: the current part's headers, then its data to the file or a text buffer."""

    def __init__(self, folder: Path, max_bytes: int, suffixes: tuple[str, ...], file_field: str):
        self.folder, self.max_bytes, self.suffixes, self.file_field = folder, max_bytes, suffixes, file_field
        self.fields: dict[str, str] = {}
        self.path: Path | None = None
        self.filename = ""
        self.size = 0
        self.digest = hashlib.sha256()
        self.ended = False
        self._file: IO[bytes] | None = None
        self._in_file = False
        self._count = 0
        self._name = ""
        self._text = bytearray()
        self._header = [b"", b""]
        self._headers: dict[bytes, bytes] = {}

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._add_header(0, data[start:end]),
            "on_header_value": lambda data, start, end: self._add_header(1, data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._count += 1
        if self._count > MAX_PARTS:
            raise ApiError(422, "invalid_request", f"at most {MAX_PARTS} form fields")
        self._headers, self._text, self._in_file = {}, bytearray(), False

    def _add_header(self, i: int, data: bytes) -> None:
        self._header[i] += data

    def _header_end(self) -> None:
        self._headers[self._header[0].strip().lower()] = self._header[1].strip()
        self._header = [b"", b""]

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition"))
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        if self._name == self.file_field:
            self._open(options.get(b"filename", b"").decode("utf-8", "replace"))

    def _open(self, filename: str) -> None:
        if self._file is not None or self.path is not None:
            raise ApiError(422, "invalid_request", f"send one `{self.file_field}` part")
        self.filename = PurePath(filename.replace("\\", "/")).name[:255]
        suffix = PurePath(self.filename).suffix.lower()
        if suffix not in self.suffixes:
            message = f"use a {' or '.join(self.suffixes)} file"
            details = [problem(self.file_field, message, "invalid_dataset")]
            raise ApiError(422, "invalid_dataset", f"{self.filename!r}: {message}", details)
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.folder, prefix=UPLOAD_TEMP_PREFIX, suffix=suffix)
        self._file, self.path, self._in_file = os.fdopen(fd, "wb"), Path(name), True

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file and self._file is not None:
            self.size += end - start
            if self.size > self.max_bytes:
                mib = self.max_bytes / 2**20
                raise ApiError(413, "payload_too_large", f"the file is larger than the limit of {mib:g} MiB")
            self._file.write(data[start:end])
            self.digest.update(data[start:end])
            self._file.flush()  # the file's mtime then tells the stale-upload sweep that this upload is alive
            return
        self._text += data[start:end]
        if len(self._text) > MAX_FIELD_BYTES:
            raise ApiError(422, "invalid_request", f"form field {self._name!r} is longer than {MAX_FIELD_BYTES} bytes")

    def _part_end(self) -> None:
        if self._in_file:
            self._in_file = False
            return
        try:
            self.fields[self._name] = self._text.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(422, "invalid_request", f"form field {self._name!r} is not UTF-8") from None

    def _end(self) -> None:
        self.ended = True

    def result(self) -> Upload:
        if not self.ended:
            raise ApiError(422, "invalid_request", "the multipart body ended early")
        if self.path is None:
            details = [problem(self.file_field, "field required", "missing")]
            raise ApiError(422, "invalid_request", f"no `{self.file_field}` part in the form", details)
        self.close()
        return Upload(self.path, self.filename, self.size, self.digest.hexdigest(), self.fields)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def discard(self) -> None:
        self.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)
