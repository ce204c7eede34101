"""Read one file field of a multipart upload into memory, with a size limit, never to disk.

Starlette's ``request.form()`` stores file parts in ``SpooledTemporaryFile``s that roll over to
a temporary file on disk beyond 1 MB; a medical image must not land on the server's disk. So the
body is streamed through python-multipart's push parser here instead, into one ``bytearray``:

- a declared ``Content-Length`` over the limit is refused before the body is read;
- the bytes actually received are counted too (chunked uploads declare no length), and the
  read stops at the limit;
- only the named field is kept; other parts are counted and dropped.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from shpeft.serve.decode import RequestError

# Room for the multipart framing (boundaries, part headers) around the file itself.
FRAMING_BYTES = 64 * 1024
MAX_PARTS = 16


@dataclass
class Upload:
    """The file part: its bytes, file name and declared content type."""

    data: bytes
    filename: str
    content_type: str


async def read_file_field(
    content_type: str,
    content_length: str | None,
    body: AsyncIterator[bytes],
    *,
    field: str = "file",
    max_bytes: int,
) -> Upload:
    """Parse a ``multipart/form-data`` body and return its ``field`` part, held in memory.

    Args:
        content_type: the request's ``Content-Type`` header.
        content_length: its ``Content-Length`` header, if any.
        body: the request body's chunks (``request.stream()``).
        field: the form field holding the file.
        max_bytes: the largest file accepted.

    Raises:
        RequestError: 415 when the body is not multipart, 413 over the limit, 400 for a malformed
            body, 422 when the field is missing.
    """
    mime, params = parse_options_header(content_type)
    if mime != b"multipart/form-data":
        raise RequestError(415, f"send the image as multipart/form-data in the field {field!r}")
    boundary = params.get(b"boundary")
    if not boundary:
        raise RequestError(400, "the multipart body has no boundary in its Content-Type")
    limit = max_bytes + FRAMING_BYTES
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise _too_large(max_bytes)

    parts = _Parts(field.encode())
    try:
        parser = MultipartParser(boundary, parts.callbacks())
        received = 0
        async for chunk in body:
            received += len(chunk)
            if received > limit:
                raise _too_large(max_bytes)
            parser.write(chunk)
            if len(parts.data) > max_bytes:
                raise _too_large(max_bytes)
        parser.finalize()
    except FormParserError as e:
        raise RequestError(400, "the multipart body is malformed") from e
    except _TooManyParts:
        raise RequestError(400, f"the multipart body has more than {MAX_PARTS} parts") from None
    if not parts.found:
        raise RequestError(422, f"the upload has no file in the form field {field!r}")
    if not parts.complete:
        raise RequestError(400, "the multipart body ended before the file part did")
    return Upload(bytes(parts.data), parts.filename, parts.content_type)


def _too_large(max_bytes: int) -> RequestError:
    return RequestError(413, f"the upload is larger than this server's limit of {_mb(max_bytes)}")


def _mb(n: int) -> str:
    return f"{n / 2**20:g} MiB" if n >= 2**20 else f"{n:,} bytes"


class _TooManyParts(Exception):
    pass


class _Parts:
    """python-multipart callbacks that keep the wanted field's bytes and drop the rest."""

    def __init__(self, field: bytes) -> None:
        self.field = field
        self.data = bytearray()
        self.filename = ""
        self.content_type = ""
        self.found = False
        self.complete = False
        self._count = 0
        self._keep = False
        self._headers: dict[bytes, bytes] = {}
        self._name = b""
        self._value = b""

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_done,
            "on_part_data": self._data,
            "on_part_end": self._end,
        }

    def _begin(self) -> None:
        self._count += 1
        if self._count > MAX_PARTS:
            raise _TooManyParts
        self._headers, self._keep = {}, False

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._name.strip().lower()] = self._value.strip()
        self._name, self._value = b"", b""

    def _headers_done(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        # The first part with the field's name is the file; a repeated field is ignored.
        self._keep = options.get(b"name") == self.field and not self.found
        if self._keep:
            self.found = True
            self.filename = options.get(b"filename", b"").decode("utf-8", "replace")
            self.content_type = self._headers.get(b"content-type", b"").decode("latin-1")

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._keep:
            self.data += data[start:end]

    def _end(self) -> None:
        if self._keep:
            self.complete, self._keep = True, False
