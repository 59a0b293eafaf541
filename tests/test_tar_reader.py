"""mm_lightning.data.tar_reader: the same members as webdataset's tarfile-based reader, damage named."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest
from webdataset.tariterators import tar_file_iterator

from mm_lightning.data.shards import write_shards
from mm_lightning.data.tar_reader import TarReadError, tar_members


def _members(path: Path, reader) -> list[tuple[str, bytes]]:
    with open(path, "rb") as f:
        return [(m["fname"], m["data"]) for m in reader(f)]


def _tar(path: Path, entries: list[tuple[str, bytes | None]], fmt: int = tarfile.PAX_FORMAT, gz: bool = False) -> Path:
    """A tar of ``(name, data)`` entries (``None``: a directory) in the given format."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    raw = buffer.getvalue()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


ENTRIES = [
    ("dir/", None),
    ("a0001.png", b"\x89PNG" + bytes(range(256)) * 3),
    ("a0001.cls", b"3"),
    ("a0001.txt", "une légende".encode()),
    ("x" * 120 + ".txt", b"a long name"),  # beyond the 100-byte name field
    ("deep/" * 30 + "b0002.json", b"{}"),  # ustar prefix or an extension header
    ("__meta__/info.json", b"skipped"),
    ("c0003.bin", b""),
    ("c0003.npy", bytes(1000)),
]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT], ids=["pax", "gnu", "ustar"])
def test_same_members_as_webdatasets_reader(tmp_path, fmt):
    entries = [e for e in ENTRIES if fmt != tarfile.USTAR_FORMAT or len(e[0]) <= 100 or "/" in e[0]]
    path = _tar(tmp_path / "s.tar", entries, fmt)
    ours = _members(path, tar_members)
    assert ours == _members(path, tar_file_iterator)
    assert [name for name, _ in ours] == [n for n, d in entries if d is not None and not n.startswith("__")]


def test_shards_written_by_the_project_and_compressed_ones(tmp_path):
    samples = [{"__key__": f"k{i:04d}", "png": bytes([i]) * (i * 37), "cls": i, "txt": f"caption {i}"} for i in range(50)]
    write_shards(samples, tmp_path, "s", max_count=50)
    shard = next(tmp_path.glob("s-*.tar"))
    assert _members(shard, tar_members) == _members(shard, tar_file_iterator)
    assert len(_members(shard, tar_members)) == 150
    gz = _tar(tmp_path / "s.tar.gz", ENTRIES, gz=True)
    assert _members(gz, tar_members) == _members(gz, tar_file_iterator)


def test_damaged_archives_raise_after_the_members_before_the_damage(tmp_path):
    path = _tar(tmp_path / "s.tar", [(f"k{i}.bin", bytes([i]) * 700) for i in range(6)])
    data = path.read_bytes()
    cut = tmp_path / "cut.tar"
    member = 512 + 1024  # a header and 700 bytes padded to 2 blocks
    cut.write_bytes(data[: 3 * member + 512 + 100])  # members 0-2 whole, then mid-member 3
    got = []
    with pytest.raises(ValueError, match=r"truncated tar archive: member 'k3.bin'"):
        with open(cut, "rb") as f:
            got.extend(m["fname"] for m in tar_members(f))
    assert got == ["k0.bin", "k1.bin", "k2.bin"]
    with pytest.raises(tarfile.ReadError):  # tarfile stops at the same place
        _members(cut, tar_file_iterator)
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(ValueError, match="not a tar archive.*at byte 0"):
        _members(garbage, tar_members)
    flipped = bytearray(data)
    flipped[member + 10] ^= 0xFF  # a byte of the second member's name
    (tmp_path / "flipped.tar").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=f"bad header checksum at byte {member}"):
        _members(tmp_path / "flipped.tar", tar_members)
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        _members(tmp_path / "empty.tar", tar_members)


def test_the_cut_member_is_named_and_headers_only_counting_sees_the_same_cut(tmp_path):
    path = _tar(tmp_path / "s.tar", [(f"k{i}.bin", bytes([i]) * 700) for i in range(4)])
    data = path.read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: 2 * 1536 + 512 + 100])  # inside k2.bin's data
    for read_data in (True, False):
        got = []
        with pytest.raises(TarReadError) as info, open(tmp_path / "cut.tar", "rb") as f:
            got.extend(m["fname"] for m in tar_members(f, read_data=read_data))
        assert got == ["k0.bin", "k1.bin"] and info.value.member == "k2.bin", read_data
    (tmp_path / "header.tar").write_bytes(data[: 2 * 1536 + 100])  # inside k2.bin's header
    with pytest.raises(TarReadError) as info, open(tmp_path / "header.tar", "rb") as f:
        list(tar_members(f))
    assert info.value.member is None and "a header at byte 3072" in str(info.value)
    with open(path, "rb") as f:
        assert [(m["fname"], m["data"]) for m in tar_members(f, read_data=False)] == [(f"k{i}.bin", None) for i in range(4)]
    gz = tmp_path / "cut.tar.gz"
    gz.write_bytes(gzip.compress(data)[:-30])  # a corrupt (cut) gzip stream
    with pytest.raises(TarReadError, match="corrupt compressed stream"), open(gz, "rb") as f:
        list(tar_members(f))
