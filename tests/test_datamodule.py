"""WebDataModule: epoch length, splitting, shuffling, resampling and bad data."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mm_lightning.data.datamodule import BadSampleError, WebDataModule
from mm_lightning.data.samples import ClassificationPipeline
from mm_lightning.data.shards import ShardSpecError, write_shards
from tests.conftest import colour_image, png_bytes, write_colour_shards

PIPE = ClassificationPipeline(16, (1.0, 1.0), False, (0.5,) * 3, (0.5,) * 3)


def _dm(**kw) -> WebDataModule:
    kw.setdefault("pipeline", PIPE)
    kw.setdefault("num_workers", 0)
    kw.setdefault("batch_size", 16)
    return WebDataModule(**kw)


def _attach(dm: WebDataModule, rank: int = 0, world: int = 1, epoch: int = 0) -> SimpleNamespace:
    trainer = SimpleNamespace(
        global_rank=rank, world_size=world, current_epoch=epoch, training=True, validating=False,
        sanity_checking=False, testing=False,
    )
    dm.trainer = trainer
    return trainer


def _labels(loader) -> list[int]:
    return [int(x) for b in loader for x in b["label"]]


def _keys_seen(loader) -> int:
    return sum(len(b["label"]) for b in loader)


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_reads_every_sample_once_and_len_is_exact(colour_shards, workers):
    dm = _dm(val=colour_shards["val"], num_workers=workers, batch_size=10)
    dm.setup("validate")
    loader = dm.val_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader)
    assert sum(len(b["label"]) for b in batches) == 64
    assert batches[0]["image"].shape == (10, 3, 16, 16) and batches[0]["image"].dtype == torch.float32


@pytest.mark.parametrize("workers", [0, 2])
def test_train_epoch_has_announced_length_of_full_batches(colour_shards, workers):
    dm = _dm(train=colour_shards["train"], num_workers=workers, batch_size=16)
    _attach(dm)
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == 256 // 16
    assert all(len(b["label"]) == 16 for b in batches)


def test_shuffle_is_deterministic_per_epoch_and_differs_between_epochs(colour_shards):
    dm = _dm(train=colour_shards["train"], shuffle_buffer=100)
    trainer = _attach(dm)
    dm.setup("fit")
    first = _labels(dm.train_dataloader())
    again = _labels(dm.train_dataloader())
    trainer.current_epoch = 1
    second = _labels(dm.train_dataloader())
    assert first == again
    assert first != second
    assert sorted(first) == sorted(second)  # same samples, other order


def test_ranks_get_disjoint_shards_and_equal_train_lengths(tmp_path):
    # 5 shards of unequal size over 2 ranks: lengths must still agree, eval covers all once.
    d = tmp_path / "uneven"
    write_colour_shards(d, "u", 150, 32)  # 32,32,32,32,22
    spec = str(d / "u-*.tar")
    lengths, eval_counts = [], []
    for rank in range(2):
        dm = _dm(train=spec, test=spec, batch_size=16, num_workers=1)
        _attach(dm, rank=rank, world=2)
        dm.setup("fit")
        lengths.append(len(dm.train_dataloader()))
        assert len(list(dm.train_dataloader())) == lengths[-1]
        eval_counts.append(_keys_seen(dm.test_dataloader()))
    assert lengths[0] == lengths[1]
    assert sum(eval_counts) == 150


def test_resampled_epoch_length_comes_from_samples_per_epoch(colour_shards):
    dm = _dm(train=colour_shards["train"], resampled=True, samples_per_epoch=96, batch_size=16, num_workers=2)
    _attach(dm)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 6 and len(list(loader)) == 6
    with pytest.raises(ValueError, match="samples_per_epoch"):
        _dm(train=colour_shards["train"], resampled=True)


def test_class_names_come_from_the_manifest(colour_shards):
    dm = _dm(train=colour_shards["train"])
    assert dm.class_names == ["red", "green", "blue", "yellow"]


def test_missing_paths_and_too_few_shards_fail_before_training(tmp_path, colour_shards):
    with pytest.raises(ShardSpecError, match=r"data.train: no shard matches"):
        _dm(train=str(tmp_path / "nowhere-*.tar")).setup("fit")
    with pytest.raises(ShardSpecError, match="fit needs training shards"):
        _dm(val=colour_shards["val"]).setup("fit")
    dm = _dm(train=colour_shards["train"], num_workers=3)  # 4 shards < 2 ranks x 3 workers
    _attach(dm, rank=0, world=2)
    with pytest.raises(ShardSpecError, match=r"fewer than ranks x workers = 2 x 3.*num_workers"):
        dm.setup("fit")


def _corrupt_shards(directory: Path) -> str:
    """Good samples plus: garbage image bytes, a sample with no .cls, and a truncated shard.

    bad-a: 18 good samples, 2 bad ones; bad-b: 20 samples cut in the header after good0030 (11 samples
    before the cut are whole, see :func:`readable_before_cut`). 3 skips in all."""
    rng = np.random.default_rng(0)

    def good(i: int) -> dict:
        return {"__key__": f"good{i:04d}", "png": png_bytes(colour_image(i % 4, rng)), "cls": i % 4}

    samples = [good(i) for i in range(20)]
    samples[3] = {"__key__": "garbage0003", "png": b"this is not a png", "cls": 1}
    samples[7] = {"__key__": "nolabel0007", "png": samples[6]["png"]}
    write_shards(samples, directory, "bad-a", max_count=20)
    write_shards([good(i) for i in range(20, 40)], directory, "bad-b", max_count=20)
    tar = directory / "bad-b-000000.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2 + 100])  # cut mid-member
    (directory / "bad-b.full").write_bytes(data)
    return str(directory / "bad-*.tar")


def whole_samples_before(data: bytes, cut: int) -> int:
    """How many samples of the tar ``data`` lie wholly before byte ``cut`` (every member's data ends before it)."""
    import io
    import tarfile

    ends: dict[str, int] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        for m in t.getmembers():
            key = m.name.split(".", 1)[0]
            ends[key] = max(ends.get(key, 0), m.offset_data + m.size)
    return sum(1 for end in ends.values() if end <= cut)


def readable_before_cut(directory: Path) -> int:
    """Samples of _corrupt_shards' bad-b whose every member lies before the cut (counted from the uncut tar)."""
    return whole_samples_before((directory / "bad-b.full").read_bytes(), (directory / "bad-b-000000.tar").stat().st_size)


def test_bad_samples_are_skipped_counted_and_warned_per_shard(tmp_path):
    spec = _corrupt_shards(tmp_path)
    dm = _dm(test=spec, batch_size=8)
    _attach(dm)
    dm.trainer.training, dm.trainer.testing = False, True
    dm.setup("test")
    with pytest.warns(UserWarning) as record:
        batches = [dm.on_before_batch_transfer(b, 0) for b in dm.test_dataloader()]
    good = sum(len(b["label"]) for b in batches)
    skipped = dm.num_skipped["test"]
    assert readable_before_cut(tmp_path) == 11
    assert good == 18 + 11  # every readable sample, the one right before the cut included
    assert skipped == 3  # garbage image, missing label, the sample cut in the truncated tar
    messages = [str(w.message) for w in record]
    assert any("garbage0003" in m and "bad-a-000000.tar" in m for m in messages)
    assert any("bad-b-000000.tar" in m and "unreadable after sample 'good0030'" in m for m in messages)
    assert len([m for m in messages if "bad-a-000000.tar" in m]) == 1  # once per shard


def test_strict_mode_raises_naming_shard_and_key(tmp_path):
    spec = _corrupt_shards(tmp_path)
    dm = _dm(test=spec, batch_size=8, strict=True)
    dm.setup("test")
    with pytest.raises(BadSampleError, match=r"bad-a-000000\.tar.*garbage0003"):
        list(dm.test_dataloader())


def test_shards_without_sizes_json_are_counted(colour_shards):
    os.remove(Path(colour_shards["val"]).parent / "sizes.json")
    dm = _dm(val=colour_shards["val"], batch_size=10)
    dm.setup("validate")
    with pytest.warns(UserWarning, match="not listed in a sizes.json"):
        loader = dm.val_dataloader()
    assert len(loader) == len(list(loader))


@pytest.mark.parametrize("workers", [0, 2])
def test_training_loader_resumes_mid_epoch_with_the_next_unseen_batch(colour_shards, workers):
    dm = _dm(train=colour_shards["train"], num_workers=workers, batch_size=16, shuffle_buffer=50)
    trainer = _attach(dm, epoch=1)
    dm.setup("fit")
    full = [b["label"].tolist() for b in dm.train_dataloader()]
    trainer.fit_loop = SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(
        current=SimpleNamespace(processed=5))))
    state = dm.train_dataloader().state_dict()
    assert state == {"epoch": 1, "batches": 5}
    resumed = dm.train_dataloader()
    resumed.load_state_dict(state)
    assert [b["label"].tolist() for b in resumed] == full[5:]
    assert [b["label"].tolist() for b in resumed] == full  # the next epoch pass starts whole again
    stale = dm.train_dataloader()
    stale.load_state_dict({"epoch": 0, "batches": 5})  # a state from another epoch is ignored
    assert [b["label"].tolist() for b in stale] == full
