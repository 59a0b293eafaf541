"""Shard writing, listing and the sizes manifest."""

from __future__ import annotations

import json

import pytest

from mm_lightning.data.shards import (
    ShardSpecError,
    count_samples,
    list_shards,
    read_manifest,
    read_sizes,
    write_manifest,
    write_shards,
)


def _samples(n: int, prefix: str = "s"):
    return ({"__key__": f"{prefix}{i:04d}", "txt": f"caption {i}", "cls": i % 3} for i in range(n))


def test_write_shards_splits_by_count_and_records_sizes(tmp_path):
    counts = write_shards(_samples(25), tmp_path, "demo-train", max_count=10)
    assert counts == {"demo-train-000000.tar": 10, "demo-train-000001.tar": 10, "demo-train-000002.tar": 5}
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    assert sizes == counts
    shards = list_shards(str(tmp_path / "demo-train-{000000..000002}.tar"))
    assert count_samples(shards) == 25


def test_write_shards_respects_max_size(tmp_path):
    big = ({"__key__": f"k{i:03d}", "bin": b"x" * 20_000} for i in range(10))
    counts = write_shards(big, tmp_path, "big", max_count=1000, max_size=50_000)
    assert len(counts) >= 4 and sum(counts.values()) == 10


def test_rewrite_drops_stale_shards_and_keeps_other_prefixes(tmp_path):
    write_shards(_samples(30), tmp_path, "a", max_count=10)
    write_shards(_samples(5), tmp_path, "b", max_count=10)
    write_shards(_samples(12), tmp_path, "a", max_count=10)
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    assert sizes == {"a-000000.tar": 10, "a-000001.tar": 2, "b-000000.tar": 5}


def test_list_shards_forms(tmp_path):
    write_shards(_samples(30), tmp_path, "x-train", max_count=10)
    write_shards(_samples(10), tmp_path, "x-val", max_count=10)
    every = list_shards(str(tmp_path))
    assert len(every) == 4
    assert list_shards(str(tmp_path / "x-train-*.tar")) == every[:3]
    assert len(list_shards(str(tmp_path / "x-train-{000000..000001}.tar"))) == 2
    joined = f"{tmp_path}/x-train-000000.tar::{tmp_path}/x-val-000000.tar"
    assert len(list_shards(joined)) == 2
    assert len(list_shards([str(tmp_path / "x-val-000000.tar"), str(tmp_path / "x-train-*.tar")])) == 4


@pytest.mark.parametrize(
    "spec, message",
    [
        ("{d}/nope-*.tar", "no shard matches"),
        ("{d}/x-train-{{000000..000009}}.tar", "does not exist"),
        ("{d}/empty", "holds no .tar shards"),
        ([], "empty"),
    ],
)
def test_list_shards_errors_name_the_spec(tmp_path, spec, message):
    write_shards(_samples(10), tmp_path, "x-train", max_count=10)
    (tmp_path / "empty").mkdir()
    spec = spec.format(d=tmp_path) if isinstance(spec, str) else spec
    with pytest.raises(ShardSpecError, match=message):
        list_shards(spec)


def test_sizes_unknown_for_unlisted_shards_and_manifest_merges(tmp_path):
    write_shards(_samples(5), tmp_path, "y", max_count=10)
    (tmp_path / "sizes.json").unlink()
    shards = list_shards(str(tmp_path))
    assert read_sizes(shards) == {shards[0]: None}
    assert count_samples(shards) is None
    write_manifest(tmp_path, classes=["a", "b"], splits={"train": {"num_samples": 5}})
    write_manifest(tmp_path, splits={"val": {"num_samples": 2}})
    manifest = read_manifest(shards)
    assert manifest["classes"] == ["a", "b"] and set(manifest["splits"]) == {"train", "val"}
