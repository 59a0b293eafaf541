"""A fast reader of the members of a tar shard: 512-byte headers parsed directly, data read in one call each.

Why not ``tarfile``: profiling the CLIP run's data workers put 43% of their CPU time in
``tarfile``'s header parsing (``TarInfo`` objects, PAX/GNU machinery, per-member seeks), which
webdataset's ``tar_file_iterator`` goes through. Shards are plain sequential archives of small
files, so a reader that takes the ustar header fields it needs (name, prefix, size, type) and the
two extensions that carry long names (GNU ``L`` and PAX ``path``) reads the same members with a
fraction of the work. Compressed tars (gzip, bzip2, xz) go to webdataset's ``tarfile`` reader.

:func:`tar_members` yields what ``webdataset.tariterators.tar_file_iterator`` yields (``{"fname",
"data"}`` per regular file, webdataset's ``__...__`` meta members skipped), so
``webdataset.tariterators.group_by_keys`` groups them into samples as before. A damaged archive
(bad header checksum, data cut short, not a tar at all) raises ``ValueError`` naming the byte offset,
after the members read before the damage.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, BinaryIO

BLOCK = 512
_META = re.compile(r"__[^/]*__($|/)")
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")  # gzip, bzip2, xz
_REGULAR = (b"0", b"\x00", b"7")  # regular file, old-style regular file, contiguous file


def _number(field: bytes, offset: int) -> int:
    """An octal header number (NUL/space padded), or GNU's base-256 form for large values."""
    if field and field[0] & 0x80:  # base-256: the remaining bits, big-endian
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\x00", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise ValueError(f"not a tar archive: bad number field {field!r} in the header at byte {offset}") from None


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


def _read(stream: BinaryIO, size: int, offset: int, what: str) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise ValueError(f"truncated tar archive: {what} at byte {offset} needs {size} bytes, {len(data)} remain")
    return data


def tar_members(stream: BinaryIO, skip_meta: bool = True) -> Iterator[dict[str, Any]]:
    """``{"fname": name, "data": bytes}`` for each regular file of the tar archive read from ``stream``.

    ``stream`` is a binary file object positioned at the start of the archive (a shard opened with
    ``open(path, "rb")``). Directories, links and other special members are skipped, as are
    webdataset's ``__...__`` meta members with ``skip_meta``.
    """
    head = stream.peek(8)[:8] if hasattr(stream, "peek") else b""
    if head.startswith(_COMPRESSED):
        from webdataset.tariterators import tar_file_iterator

        yield from tar_file_iterator(stream, skip_meta=r"__[^/]*__($|/)" if skip_meta else None)
        return
    offset = 0
    long_name: str | None = None
    while True:
        header = stream.read(BLOCK)
        if not header:
            if offset == 0:
                raise ValueError("not a tar archive: the file is empty")
            return  # no end-of-archive blocks: tarfile accepts this too
        if len(header) != BLOCK:
            raise ValueError(f"truncated tar archive: a header at byte {offset} has {len(header)} of {BLOCK} bytes")
        if header.count(0) == BLOCK:  # an end-of-archive block
            return
        checksum = _number(header[148:156], offset)
        if checksum != sum(header[:148]) + sum(header[156:]) + 8 * 32:  # the checksum field counts as spaces
            raise ValueError(f"not a tar archive (or a damaged one): bad header checksum at byte {offset}")
        size = _number(header[124:136], offset)
        kind = header[156:157]
        data_offset = offset + BLOCK
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        if kind in (b"L", b"x"):  # the next member's long name: GNU longname or a PAX extended header
            data = _read(stream, padded, data_offset, "an extended header")[:size]
            long_name = _name(data) if kind == b"L" else (_pax_path(data) or long_name)
            offset = data_offset + padded
            continue
        if long_name is not None:
            name, long_name = long_name, None
        else:
            name = _name(header[:100])
            if header[257:262] == b"ustar" and header[345]:
                name = _name(header[345:500]) + "/" + name
        if kind in _REGULAR and not (skip_meta and _META.match(name)):
            data = _read(stream, size, data_offset, f"member {name!r}")
            if padded > size:
                _read(stream, padded - size, data_offset + size, f"padding of member {name!r}")
            yield {"fname": name, "data": data}
        elif padded:
            _read(stream, padded, data_offset, f"member {name!r}")
        offset = data_offset + padded
