"""WebDataModule: the one LightningDataModule that feeds every task from tar shards.

shards -> split by rank (node) -> split by DataLoader worker -> per-epoch shard shuffle
-> samples (tar members grouped by key) -> shuffle buffer -> ``pipeline.decode`` ->
``pipeline.collate`` -> batch dict.

Epoch length is known up front from ``sizes.json``: while training, every worker yields
exactly the same number of full batches (a worker whose shards run out starts them
over), so every rank takes the same number of steps and DDP never waits on a rank
that has run dry. Evaluation reads each sample exactly once.

Bad samples (undecodable image, missing member, a duplicate member, a label outside the
classes: ``data.num_classes``, ``manifest.json``'s, or those the task and its callbacks declare
with :meth:`WebDataModule.declare_label_classes`) and broken shards (empty, truncated, not a
tar: the complete samples before the break are kept, the rest counts as one skip naming the
sample or member where it broke) are skipped, counted and warned about once per shard, naming shard and key.
Counts travel with the batches (key ``skipped``; a worker holds back its last batch until
its stream ends, so a skip after the last full batch is counted too) and are summed here,
where :class:`~mm_lightning.callbacks.data_monitor.DataMonitor` logs them per epoch and in
total. ``strict=True`` raises :class:`BadSampleError` instead, naming shard and key.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mm_lightning.data.samples import ClassificationPipeline, SamplePipeline
from mm_lightning.data.shards import (
    ShardSpec,
    ShardSpecError,
    count_tar_samples,
    list_shards,
    read_manifest,
    read_sizes,
    tar_samples,
)

SPLITS = ("train", "val", "test", "predict")
SKIPPED_ONLY = "__skipped_only__"  # a worker's last word: skips that no batch was left to carry
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

    def skip(self, shard: str, key: str | None, error: BaseException) -> None:
        where = f"shard {shard}" if key is None else f"shard {shard}, sample {key!r}"
        message = f"{where}: {type(error).__name__}: {error}"
        if self.strict:
            raise BadSampleError(f"bad data in {message} (strict mode; set data.strict: false to skip it)") from error
        self.pending += 1
        if shard not in self.warned:
            self.warned.add(shard)
            warnings.warn(f"skipping bad data in {message} (further problems in this shard are counted, not shown)")

    def pop(self) -> int:
        count, self.pending = self.pending, 0
        return count


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
        num_classes: int | None = None,
        classes_from: str = "manifest.json, or data.num_classes",
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
        self.num_classes = num_classes  # labels must lie in [0, num_classes)
        self.classes_from = classes_from  # who set num_classes, for the skip message
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
            yield from tar_samples(shard, tracker.skip)

    def _stream(self, rng: random.Random, worker: int, num_workers: int, tracker: _SkipTracker) -> Iterator[dict[str, Any]]:
        """Every pass's samples, shuffled; a training worker whose shards yield nothing, pass after pass, fails."""
        empty_passes = 0
        for order in self._passes(rng, worker, num_workers):
            got = False
            for sample in self._shuffled(self._samples(order, tracker), rng):
                got = True
                yield sample
            empty_passes = 0 if got else empty_passes + 1
            if empty_passes >= 3:
                shown = ", ".join(order[:3]) + (", ..." if len(order) > 3 else "")
                raise BadSampleError(f"worker {worker} read no sample from its shards ({shown}): they are empty or unreadable")

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
        samples = self._stream(rng, worker, num_workers, tracker)
        batch: list[dict[str, Any]] = []
        ready: list[dict[str, Any]] | None = None  # a full batch held back until the stream goes on
        # Resuming mid-epoch: the DataLoader hands batches out round-robin, so worker w served
        # every num_workers-th batch from w on; drop those samples undecoded.
        emitted = max(0, self.skip_batches - worker + num_workers - 1) // num_workers if self.worker_batches else 0
        to_drop = emitted * self.batch_size
        for sample in samples:
            if to_drop:
                to_drop -= 1
                continue
            decoded = self._decode(sample, tracker)
            if decoded is None:
                if tracker.pending > 1000 * self.batch_size and not batch:
                    raise BadSampleError(
                        f"worker {worker} skipped {tracker.pending} samples in a row: the shards look unreadable"
                    )
                continue
            if ready is not None:  # more data follows: the held batch can go, with the skips so far
                yield self._collate(ready, tracker)
                ready, emitted = None, emitted + 1
            batch.append(decoded)
            if len(batch) == self.batch_size:
                if self.worker_batches is not None and emitted + 1 >= self.worker_batches:
                    yield self._collate(batch, tracker)  # this worker's quota: it reads no further
                    return
                ready, batch = batch, []
        # the last batches carry every skip counted since the one before
        if ready is not None:
            yield self._collate(ready, tracker)
        if batch:
            yield self._collate(batch, tracker)
        if tracker.pending:  # nothing left to carry them: the loader counts this record, the loop never sees it
            yield {SKIPPED_ONLY: tracker.pop()}

    def _decode(self, sample: dict[str, Any], tracker: _SkipTracker) -> dict[str, Any] | None:
        """The pipeline's decoded sample, or ``None`` after counting it as bad."""
        shard, key = sample.get("__url__", "?"), sample.get("__key__", "?")
        try:
            if "__duplicate__" in sample:
                raise ValueError(f"member {sample['__duplicate__']} appears twice")
            decoded = self.pipeline.decode(sample, self.training)
            label = decoded.get("label") if isinstance(decoded, dict) else None
            if self.num_classes and isinstance(label, int) and not 0 <= label < self.num_classes:
                if not (label == -1 and not isinstance(self.pipeline, ClassificationPipeline)):  # -1: "no label"
                    raise ValueError(f"label {label} is outside [0, {self.num_classes}): "
                                     f"{self.num_classes} classes, from {self.classes_from}")
            return decoded
        except BadSampleError:
            raise
        except Exception as e:  # any decode failure marks the sample bad
            tracker.skip(shard, key, e)
            return None

    def _collate(self, batch: list[dict[str, Any]], tracker: _SkipTracker) -> dict[str, Any]:
        out = self.pipeline.collate(batch)
        out["skipped"] = tracker.pop()
        return out


class _EpochAwareLoader(DataLoader):
    """A DataLoader that tells its dataset the trainer's current epoch before each pass.

    Workers are re-created every epoch (no persistent workers), so they receive the
    dataset with the new epoch and shuffle differently, and a resumed run reproduces
    the shuffle of the epoch it resumes. A worker's trailing skip-count record (no batch
    was left to carry it) goes to ``count_fn`` and never reaches the loop.
    """

    def __init__(self, dataset: ShardDataset, epoch_fn: Callable[[], int], count_fn: Callable[[int], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=None, **kwargs)
        self._epoch_fn = epoch_fn
        self._count_fn = count_fn

    def __iter__(self):  # type: ignore[override]
        self.dataset.epoch = self._epoch_fn()
        return self._without_skip_records(super().__iter__())

    def _without_skip_records(self, batches: Iterator[Any]) -> Iterator[Any]:
        for batch in batches:
            if isinstance(batch, dict) and SKIPPED_ONLY in batch:
                if self._count_fn is not None:
                    self._count_fn(int(batch[SKIPPED_ONLY]))
                continue
            yield batch


class _ResumableLoader(_EpochAwareLoader):
    """The training loader: its ``state_dict`` (saved by Lightning in every checkpoint) records how
    many batches of which epoch were trained on, so a run resumed mid-epoch continues with the
    next unseen batch instead of reading the epoch from its start again."""

    def __init__(self, dataset: ShardDataset, epoch_fn: Callable[[], int], progress_fn: Callable[[], int],
                 count_fn: Callable[[int], None] | None = None, **kwargs: Any) -> None:
        super().__init__(dataset, epoch_fn, count_fn, **kwargs)
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
        strict: raise on a bad sample or shard instead of skipping and counting it.
        num_classes: labels (``.cls``) must lie in ``[0, num_classes)``; a sample outside is bad (skipped and
            counted, or an error in strict mode). By default the number of classes in ``manifest.json``, else
            the task's (``task_num_classes``); a task's count that differs from this one is an error.
        task_num_classes: the class count of the task (``model.init_args.num_classes``), handed over by
            ``experiments.run`` (a link from the model, not a setting): the labels must lie in its range too, so
            shards without a manifest cannot feed the model a label it has no class for.
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
        num_classes: int | None = None,
        task_num_classes: int | None = None,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"data.num_classes must be >= 1, got {num_classes}")
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
        self.num_classes = num_classes
        # (count, who) of the parts that take labels and fix their range: data.num_classes first, then the task
        # and callbacks (declare_label_classes); they must agree
        self._class_counts: list[tuple[int, str]] = []
        if num_classes is not None:
            self.declare_label_classes(num_classes, "data.num_classes")
        if task_num_classes is not None:
            self.declare_label_classes(task_num_classes, "model.init_args.num_classes")
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
        counted = {s: count_tar_samples(s) for s in missing}
        empty = [s for s, n in counted.items() if n == 0]
        if empty and self.strict:
            raise BadSampleError(f"shard {empty[0]} holds no readable sample (strict mode; set data.strict: false to skip it)")
        return [n if n is not None else counted[s] for s, n in sizes.items()]

    def declare_label_classes(self, count: int, source: str) -> None:
        """A part of the run that takes labels (the task, a probe, zero-shot class names) fixes their range
        ``[0, count)``; ``source`` names its setting (``model.init_args.num_classes``). A sample whose label lies
        outside is bad data: skipped and counted, or an error naming shard, key and ``source`` with ``strict``.
        Two parts that declare different counts are a configuration error naming both."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"{source} must be a class count >= 1, got {count!r}")
        for other, who in self._class_counts:
            if other != count:
                raise ValueError(f"{who} is {other} but {source} is {count}: the number of classes is set twice "
                                 "and differs; set it once (or make both agree)")
        if (count, source) not in self._class_counts:
            self._class_counts.append((count, source))

    def label_range(self) -> tuple[int, str] | None:
        """``(number of classes, where it comes from)``: labels must lie in ``[0, number)``; ``None`` if nothing
        fixes it. ``data.num_classes`` wins over ``manifest.json``; a task's or callback's count (see
        :meth:`declare_label_classes`) smaller than the manifest's is an error, a larger one leaves the manifest's."""
        if self.num_classes is not None:
            return self.num_classes, "data.num_classes"
        names = self.class_names
        if not self._class_counts:
            return (len(names), "manifest.json") if names else None
        count, source = self._class_counts[0]
        if names and len(names) > count:
            raise ValueError(f"the shards' manifest.json lists {len(names)} classes but {source} is {count}: "
                             f"set {source} to {len(names)}")
        return (len(names), "manifest.json") if names else (count, source)

    @property
    def label_classes(self) -> int | None:
        """The number of classes the labels must lie below (see :meth:`label_range`), or ``None``."""
        found = self.label_range()
        return found[0] if found else None

    def _count_skipped(self, count: int) -> None:
        self.num_skipped[self._current_split()] += count

    def _current_split(self) -> str:
        trainer = self.trainer
        if trainer is None or trainer.training:
            return "train"
        if trainer.validating or trainer.sanity_checking:
            return "val"
        return "test" if trainer.testing else "predict"

    def setup(self, stage: str | None = None) -> None:
        """List and check the shards of the splits ``stage`` needs, before any step runs."""
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
        for split in needed.get(stage or "", SPLITS):
            if self.specs[split] is not None:
                self.shard_list(split)
        if stage == "fit" and self.specs["train"] is None:
            raise ShardSpecError("fit needs training shards: set data.train")
        self.label_range()  # a manifest with more classes than the task: a clear error before any step
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
        label_range = self.label_range()
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
            num_classes=label_range[0] if label_range else None,
            classes_from=label_range[1] if label_range else "",
        )
        epoch_fn = (lambda: self.trainer.current_epoch) if self.trainer is not None else (lambda: 0)
        loader_kwargs = {"num_workers": workers if self.num_workers else 0, "pin_memory": self.pin_memory}
        if training:
            return _ResumableLoader(dataset, epoch_fn, self._batches_done, self._count_skipped, **loader_kwargs)
        return _EpochAwareLoader(dataset, epoch_fn, self._count_skipped, **loader_kwargs)

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
            self._count_skipped(int(batch.pop("skipped")))
        return batch
