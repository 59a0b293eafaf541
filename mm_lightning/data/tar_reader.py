"""A fast reader of the members of a tar shard: 512-byte headers parsed directly, data read in one call each.

Why not ``tarfile``: profiling the CLIP run's data workers put 43% of their CPU time in
``tarfile``'s header parsing (``TarInfo`` objects, PAX/GNU machinery, per-member seeks), which
webdataset's ``tar_file_iterator`` goes through. Shards are plain sequential archives of small
files, so a reader that takes the ustar header fields it needs (name, prefix, size, type) and the
two extensions that carry long names (GNU ``L`` and PAX ``path``) reads the same members with a
fraction of the work. Compressed tars (gzip, bzip2, xz) are read through the standard library's
decompressing file objects by the same parser.

:func:`tar_members` yields what ``webdataset.tariterators.tar_file_iterator`` yields (``{"fname",
"data"}`` per regular file, webdataset's ``__...__`` meta members skipped);
:func:`mm_lightning.data.shards.tar_samples` groups them into samples. A damaged archive (bad
header checksum, data cut short, not a tar at all, a corrupt compressed stream) raises
:class:`TarReadError` naming the byte offset, after the members read before the damage; its
``member`` is the member whose data was cut (``None`` when a header is).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import re
import zlib
from collections.abc import Iterator
from typing import Any, BinaryIO

BLOCK = 512
_META = re.compile(r"__[^/]*__($|/)")
_REGULAR = (b"0", b"\x00", b"7")  # regular file, old-style regular file, contiguous file
_DECOMPRESSORS = ((b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f)), (b"BZh", bz2.BZ2File), (b"\xfd7zXZ", lzma.LZMAFile))
_STREAM_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError)  # what a corrupt compressed stream raises


class TarReadError(ValueError):
    """The archive breaks off or is not a tar; ``member`` names the member whose data was cut, if any."""

    def __init__(self, message: str, member: str | None = None) -> None:
        super().__init__(message)
        self.member = member


def _number(field: bytes, offset: int) -> int:
    """An octal header number (NUL/space padded), or GNU's base-256 form for large values."""
    if field and field[0] & 0x80:  # base-256: the remaining bits, big-endian
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\x00", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarReadError(f"not a tar archive: bad number field {field!r} in the header at byte {offset}") from None


def _name(field: bytes) -> str:
    return field.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")


def _pax_path(data: bytes) -> str | None:
    """The ``path`` record of a PAX extended header (``"%d path=...\\n"`` records)."""
    pos = 0
    found = None
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            found = value.decode("utf-8", "surrogateescape")
        pos += length
    return found


def _read(stream: BinaryIO, size: int, offset: int, what: str, member: str | None = None) -> bytes:
    try:
        data = stream.read(size)
    except _STREAM_ERRORS as err:
        raise TarReadError(f"corrupt compressed stream: {what} at byte {offset}: {type(err).__name__}: {err}",
                           member) from err
    if len(data) != size:
        raise TarReadError(f"truncated tar archive: {what} at byte {offset} needs {size} bytes, {len(data)} remain",
                           member)
    return data


def _decompressed(stream: BinaryIO) -> BinaryIO:
    head = stream.peek(6)[:6] if hasattr(stream, "peek") else b""
    for magic, opener in _DECOMPRESSORS:
        if head.startswith(magic):
            return opener(stream)  # type: ignore[return-value]
    return stream


def tar_members(stream: BinaryIO, skip_meta: bool = True, read_data: bool = True) -> Iterator[dict[str, Any]]:
    """``{"fname": name, "data": bytes}`` for each regular file of the tar archive read from ``stream``.

    ``stream`` is a binary file object positioned at the start of the archive (a shard opened with
    ``open(path, "rb")``; gzip, bzip2 and xz are recognised and decompressed). Directories, links and
    other special members are skipped, as are webdataset's ``__...__`` meta members with
    ``skip_meta``. With ``read_data=False`` the data is skipped (seeked over in a plain file) and
    ``"data"`` is ``None``: counting members reads only their headers, and a member that runs past
    the end of the file raises :class:`TarReadError` all the same.
    """
    stream = _decompressed(stream)
    end = os.fstat(stream.fileno()).st_size if not read_data and _plain_file(stream) else None
    offset = 0
    long_name: str | None = None
    while True:
        try:
            header = stream.read(BLOCK)
        except _STREAM_ERRORS as err:
            raise TarReadError(f"corrupt compressed stream: a header at byte {offset}: {type(err).__name__}: {err}") from err
        if not header:
            if offset == 0:
                raise TarReadError("not a tar archive: the file is empty")
            return  # no end-of-archive blocks: tarfile accepts this too
        if len(header) != BLOCK:
            raise TarReadError(f"truncated tar archive: a header at byte {offset} has {len(header)} of {BLOCK} bytes")
        if header.count(0) == BLOCK:  # an end-of-archive block
            return
        checksum = _number(header[148:156], offset)
        if checksum != sum(header[:148]) + sum(header[156:]) + 8 * 32:  # the checksum field counts as spaces
            raise TarReadError(f"not a tar archive (or a damaged one): bad header checksum at byte {offset}")
        size = _number(header[124:136], offset)
        kind = header[156:157]
        data_offset = offset + BLOCK
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        offset = data_offset + padded
        if kind in (b"L", b"x"):  # the next member's long name: GNU longname or a PAX extended header
            data = _read(stream, padded, data_offset, "an extended header")[:size]
            long_name = _name(data) if kind == b"L" else (_pax_path(data) or long_name)
            continue
        if long_name is not None:
            name, long_name = long_name, None
        else:
            name = _name(header[:100])
            if header[257:262] == b"ustar" and header[345]:
                name = _name(header[345:500]) + "/" + name
        wanted = kind in _REGULAR and not (skip_meta and _META.match(name))
        if wanted and read_data:
            data = _read(stream, size, data_offset, f"member {name!r}", name)
            yield {"fname": name, "data": data}
            if padded > size:  # the member is whole: a cut here is after it
                _read(stream, padded - size, data_offset + size, f"the padding of member {name!r}")
        elif end is not None:
            if data_offset + size > end:
                raise TarReadError(f"truncated tar archive: member {name!r} at byte {data_offset} needs {size} bytes, "
                                   f"{max(0, end - data_offset)} remain", name if wanted else None)
            stream.seek(offset)
            if wanted:
                yield {"fname": name, "data": None}
        else:
            _read(stream, padded, data_offset, f"member {name!r}", name if wanted else None)
            if wanted:
                yield {"fname": name, "data": None}


def _plain_file(stream: BinaryIO) -> bool:
    try:
        return stream.seekable() and stream.fileno() >= 0 and not isinstance(stream, (gzip.GzipFile, bz2.BZ2File,
                                                                                       lzma.LZMAFile))
    except (OSError, AttributeError, ValueError):
        return False
