"""WebDataModule: the one LightningDataModule that feeds every task from tar shards.

shards -> split by rank (node) -> split by DataLoader worker -> per-epoch shard shuffle
-> samples (tar members grouped by key) -> shuffle buffer -> ``pipeline.decode`` ->
``pipeline.collate`` -> batch dict.

Epoch length is known up front from ``sizes.json``: while training, every worker yields
exactly the same number of full batches (a worker whose shards run out starts them
over), so every rank takes the same number of steps and DDP never waits on a rank
that has run dry. Evaluation reads each sample exactly once.

Bad samples (undecodable image, missing member, truncated or non-tar shard) are
skipped and counted; the count travels with the next batch (key ``skipped``) and is
summed here, where :class:`~mm_lightning.callbacks.data_monitor.DataMonitor` logs it
as ``data/skipped``. ``strict=True`` raises :class:`BadSampleError` instead.
"""

from __future__ import annotations

import math
import random
import tarfile
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys

from mm_lightning.data.samples import ClassificationPipeline, SamplePipeline
from mm_lightning.data.shards import ShardSpec, ShardSpecError, list_shards, read_manifest, read_sizes
from mm_lightning.data.tar_reader import tar_members

SPLITS = ("train", "val", "test", "predict")
# Our IterableDataset's __len__ is exact across workers (see ShardDataset); Lightning's generic caution does not apply.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")


class BadSampleError(RuntimeError):
    """A sample or shard could not be read (raised only with ``strict=True``)."""


class _SkipTracker:
    """Counts skipped samples in one worker; warns once per shard; raises in strict mode."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.pending = 0
        self.warned: set[str] = set()

    def skip(self, shard: str, key: str, error: BaseException) -> None:
        message = f"shard {shard}, sample {key!r}: {type(error).__name__}: {error}"
        if self.strict:
            raise BadSampleError(f"bad data in {message} (strict mode; set data.strict: false to skip it)") from error
        self.pending += 1
        if shard not in self.warned:
            self.warned.add(shard)
            warnings.warn(f"skipping bad data in {message} (further problems in this shard are counted, not shown)")

    def pop(self) -> int:
        count, self.pending = self.pending, 0
        return count


def count_tar_samples(path: str) -> int:
    """Count the distinct sample keys in a tar by reading its headers (for shards without sizes.json)."""
    keys = set()
    with tarfile.open(path, "r|*") as stream:
        for info in stream:
            if info.isreg() and "." in info.name.split("/")[-1]:
                keys.add(info.name.split(".", 1)[0])
    return len(keys)


class ShardDataset(IterableDataset):
    """Iterable over collated batches of one rank's shards (see the module docstring)."""

    def __init__(
        self,
        shards: list[str],
        pipeline: SamplePipeline,
        batch_size: int,
        training: bool,
        worker_batches: int | None,
        shuffle_buffer: int,
        seed: int,
        rank: int,
        resampled: bool,
        strict: bool,
        num_workers: int,
        length: int,
    ) -> None:
        self.shards = shards
        self.pipeline = pipeline
        self.batch_size = batch_size
        self.training = training
        self.worker_batches = worker_batches  # None: read each sample once (evaluation)
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.rank = rank
        self.resampled = resampled
        self.strict = strict
        self.num_workers = num_workers
        self.length = length
        self.epoch = 0
        self.skip_batches = 0  # batches of this epoch already trained on (a resumed run skips them)

    def __len__(self) -> int:
        return self.length

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def _passes(self, rng: random.Random, worker: int, num_workers: int) -> Iterator[list[str]]:
        """Shard lists, one per pass over this worker's shards (endless while training)."""
        if self.resampled:
            while True:
                yield [rng.choice(self.shards) for _ in range(len(self.shards))]
        mine = self.shards[worker::num_workers]
        while True:
            order = list(mine)
            if self.training:
                rng.shuffle(order)
            yield order
            if self.worker_batches is None:
                return

    def _samples(self, shards: list[str], tracker: _SkipTracker) -> Iterator[dict[str, Any]]:
        for shard in shards:
            last_key = "<start of shard>"
            try:
                with open(shard, "rb") as f:
                    files = tar_members(f)
                    for sample in group_by_keys(({**m, "__url__": shard} for m in files)):
                        last_key = sample["__key__"]
                        yield sample
            except (tarfile.TarError, OSError, ValueError) as e:
                tracker.skip(shard, f"after {last_key}", e)

    def _shuffled(self, samples: Iterator[dict[str, Any]], rng: random.Random) -> Iterator[dict[str, Any]]:
        if not self.training or self.shuffle_buffer <= 1:
            yield from samples
            return
        buffer: list[dict[str, Any]] = []
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            i = rng.randrange(len(buffer))
            buffer[i], sample = sample, buffer[i]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = self._worker()
        if self.worker_batches and self.skip_batches:
            # The DataLoader asks its workers in turn from worker 0; rotate the roles so that the
            # first batch served is the first unseen one and the epoch continues in its own order.
            worker = (worker + self.skip_batches) % num_workers
        rng = random.Random(hash((self.seed, self.epoch, self.rank, worker)))
        tracker = _SkipTracker(self.strict)
        # The shuffle buffer drains at the end of each pass, so one epoch sees each sample once
        # (workers with fewer samples start another pass to fill their quota of batches).
        samples = (
            s for order in self._passes(rng, worker, num_workers) for s in self._shuffled(self._samples(order, tracker), rng)
        )
        batch: list[dict[str, Any]] = []
        # Resuming mid-epoch: the DataLoader hands batches out round-robin, so worker w served
        # every num_workers-th batch from w on; drop those samples undecoded.
        emitted = max(0, self.skip_batches - worker + num_workers - 1) // num_workers if self.worker_batches else 0
        to_drop = emitted * self.batch_size
        for sample in samples:
            if to_drop:
                to_drop -= 1
                continue
            try:
                batch.append(self.pipeline.decode(sample, self.training))
            except BadSampleError:
                raise
            except Exception as e:  # any decode failure marks the sample bad
                tracker.skip(sample.get("__url__", "?"), sample.get("__key__", "?"), e)
                continue
            if len(batch) == self.batch_size:
                yield self._collate(batch, tracker)
                batch, emitted = [], emitted + 1
                if self.worker_batches is not None and emitted >= self.worker_batches:
                    return
            elif tracker.pending > 1000 * self.batch_size and not batch:
                raise BadSampleError(f"worker {worker} skipped {tracker.pending} samples in a row: the shards look unreadable")
        if batch:
            yield self._collate(batch, tracker)

    def _collate(self, batch: list[dict[str, Any]], tracker: _SkipTracker) -> dict[str, Any]:
        out = self.pipeline.collate(batch)
        out["skipped"] = tracker.pop()
        return out


class _EpochAwareLoader(DataLoader):
    """A DataLoader that tells its dataset the trainer's current epoch before each pass.

    Workers are re-created every epoch (no persistent workers), so they receive the
    dataset with the new epoch and shuffle differently, and a resumed run reproduces
    the shuffle of the epoch it resumes.
    """

    def __init__(self, dataset: ShardDataset, epoch_fn: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=None, **kwargs)
        self._epoch_fn = epoch_fn

    def __iter__(self):  # type: ignore[override]
        self.dataset.epoch = self._epoch_fn()
        return super().__iter__()


class _ResumableLoader(_EpochAwareLoader):
    """The training loader: its ``state_dict`` (saved by Lightning in every checkpoint) records how
    many batches of which epoch were trained on, so a run resumed mid-epoch continues with the
    next unseen batch instead of reading the epoch from its start again."""

    def __init__(self, dataset: ShardDataset, epoch_fn: Callable[[], int], progress_fn: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(dataset, epoch_fn, **kwargs)
        self._progress_fn = progress_fn
        self._resume: tuple[int, int] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch_fn(), "batches": self._progress_fn()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (int(state["epoch"]), int(state["batches"]))

    def __iter__(self):  # type: ignore[override]
        epoch = self._epoch_fn()
        resume, self._resume = self._resume, None
        skip = resume[1] if resume is not None and resume[0] == epoch and resume[1] < len(self.dataset) else 0
        self.dataset.skip_batches = skip
        return super().__iter__()


class WebDataModule(L.LightningDataModule):
    """One data module for every task: WebDataset shards through a task's sample pipeline.

    Args:
        train: training shards: a directory, a brace pattern (``shapes-train-{000000..000009}.tar``),
            a glob, several joined by ``::``, or a list.
        val: validation shards (same forms); evaluated once per epoch.
        test: test shards; evaluated on the best checkpoint after ``fit``.
        predict: shards for ``predict``.
        pipeline: the sample pipeline that decodes, augments and collates (``mm_lightning.data.samples``).
        batch_size: samples per batch on each rank.
        eval_batch_size: batch size for val/test/predict (defaults to ``batch_size``).
        num_workers: DataLoader worker processes per rank.
        shuffle_buffer: samples held in the shuffle buffer of each training worker.
        seed: base seed of the shard order and sample shuffle (combined with epoch, rank and worker).
        resampled: draw training shards with replacement (for large or unbounded data); needs
            ``samples_per_epoch``.
        samples_per_epoch: global training samples per epoch; by default the size of the training set.
        strict: raise on a bad sample instead of skipping and counting it.
        pin_memory: pin batches in host memory (default: only when CUDA is available).
    """

    def __init__(
        self,
        train: ShardSpec | None = None,
        val: ShardSpec | None = None,
        test: ShardSpec | None = None,
        predict: ShardSpec | None = None,
        pipeline: SamplePipeline | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        resampled: bool = False,
        samples_per_epoch: int | None = None,
        strict: bool = False,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        if resampled and not samples_per_epoch:
            raise ValueError("data.resampled: true needs data.samples_per_epoch (how many samples make an epoch)")
        self.specs = {"train": train, "val": val, "test": test, "predict": predict}
        self.pipeline = pipeline or ClassificationPipeline()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.resampled = resampled
        self.samples_per_epoch = samples_per_epoch
        self.strict = strict
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.shards: dict[str, list[str]] = {}
        self.num_skipped = {split: 0 for split in SPLITS}
        self._manifest: dict[str, Any] | None = None

    # ----------------------------------------------------------------- shards
    def shard_list(self, split: str) -> list[str]:
        """The shards of ``split``, listed once; a clear error if the spec names nothing."""
        if split not in self.shards:
            spec = self.specs[split]
            if spec is None:
                raise ShardSpecError(f"no {split} shards configured: set data.{split}")
            try:
                self.shards[split] = list_shards(spec)
            except ShardSpecError as e:
                hint = " (run `python -m data.prepare --help` to write shards)"
                raise ShardSpecError(f"data.{split}: {e}{hint}") from None
        return self.shards[split]

    @property
    def manifest(self) -> dict[str, Any]:
        """``manifest.json`` of the first configured split (class names, image size, ...)."""
        if self._manifest is None:
            split = next((s for s in SPLITS if self.specs[s] is not None), None)
            self._manifest = read_manifest(self.shard_list(split)) if split else {}
        return self._manifest

    @property
    def class_names(self) -> list[str] | None:
        names = self.manifest.get("classes")
        return list(names) if names else None

    def _rank_world(self) -> tuple[int, int]:
        """This process's data-parallel rank and size: ranks of one tensor-parallel group read the same data."""
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        try:
            split = trainer.strategy.distributed_sampler_kwargs or {}
        except (AttributeError, RuntimeError, AssertionError):  # no strategy yet, or not distributed
            split = {}
        return split.get("rank", trainer.global_rank), split.get("num_replicas", trainer.world_size)

    def _sizes(self, shards: list[str]) -> list[int]:
        sizes = read_sizes(shards)
        missing = [s for s, n in sizes.items() if n is None]
        if missing:
            warnings.warn(f"{len(missing)} shard(s) are not listed in a sizes.json (e.g. {missing[0]}); counting by reading them")
        return [n if n is not None else count_tar_samples(s) for s, n in sizes.items()]

    def setup(self, stage: str | None = None) -> None:
        """List and check the shards of the splits ``stage`` needs, before any step runs."""
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
        for split in needed.get(stage or "", SPLITS):
            if self.specs[split] is not None:
                self.shard_list(split)
        if stage == "fit" and self.specs["train"] is None:
            raise ShardSpecError("fit needs training shards: set data.train")
        rank, world = self._rank_world()
        if stage == "fit" and not self.resampled:
            n, needed_shards = len(self.shards["train"]), world * max(1, self.num_workers)
            if n < needed_shards:
                raise ShardSpecError(
                    f"data.train has {n} shard(s), fewer than ranks x workers = {world} x {max(1, self.num_workers)}: "
                    "write more, smaller shards (data.prepare --samples-per-shard), lower data.num_workers, "
                    "or set data.resampled: true with data.samples_per_epoch"
                )

    # ------------------------------------------------------------ dataloaders
    def _loader(self, split: str) -> DataLoader:
        shards = self.shard_list(split)
        rank, world = self._rank_world()
        training = split == "train"
        batch_size = self.batch_size if training else self.eval_batch_size
        if training and self.resampled:
            mine, workers = shards, max(1, self.num_workers)
        else:
            mine = shards[rank::world]
            workers = max(1, min(self.num_workers, len(mine))) if self.num_workers else 1
        if training:
            if self.samples_per_epoch:
                per_worker = math.ceil(self.samples_per_epoch / (world * workers * batch_size))
            else:
                sizes = dict(zip(shards, self._sizes(shards)))
                most = max(
                    sum(sizes[s] for s in shards[r::world][w::workers]) for r in range(world) for w in range(workers)
                )
                if most < batch_size:
                    raise ShardSpecError(
                        f"data.train: a worker holds only {most} samples, fewer than data.batch_size={batch_size}"
                    )
                per_worker = most // batch_size
            length = per_worker * workers
        else:
            per_worker = None
            sizes = dict(zip(mine, self._sizes(mine)))
            length = sum(math.ceil(sum(sizes[s] for s in mine[w::workers]) / batch_size) for w in range(workers))
        dataset = ShardDataset(
            shards=mine,
            pipeline=self.pipeline,
            batch_size=batch_size,
            training=training,
            worker_batches=per_worker,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            rank=rank,
            resampled=training and self.resampled,
            strict=self.strict,
            num_workers=workers,
            length=length,
        )
        epoch_fn = (lambda: self.trainer.current_epoch) if self.trainer is not None else (lambda: 0)
        loader_kwargs = {"num_workers": workers if self.num_workers else 0, "pin_memory": self.pin_memory}
        if training:
            return _ResumableLoader(dataset, epoch_fn, self._batches_done, **loader_kwargs)
        return _EpochAwareLoader(dataset, epoch_fn, **loader_kwargs)

    def _batches_done(self) -> int:
        """Training batches of the current epoch that the loop counts as done if it resumes from now."""
        if self.trainer is None:
            return 0
        return int(self.trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val") if self.specs["val"] is not None else []

    def test_dataloader(self) -> DataLoader | list:
        return self._loader("test") if self.specs["test"] is not None else []

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Take the skip count off the batch and add it to this split's total."""
        if isinstance(batch, dict) and "skipped" in batch:
            skipped = batch.pop("skipped")
            trainer = self.trainer
            split = "train"
            if trainer is not None:
                split = "train" if trainer.training else "val" if trainer.validating or trainer.sanity_checking else "test" if trainer.testing else "predict"
            self.num_skipped[split] += int(skipped)
        return batch
