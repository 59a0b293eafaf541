"""Sample pipelines: one raw WebDataset sample (a dict of bytes) in, one dict of tensors out.

A pipeline has two jobs, both run inside DataLoader workers:
``decode(sample, training)`` turns the members of one sample into tensors (decode,
augment, tokenize) and ``collate(samples)`` stacks them into a batch dict with the
fixed keys of DESIGN.md (``image``, ``label``, ``input_ids``, ...). Any exception in
``decode`` marks the sample as bad: the data module skips and counts it (or raises in
strict mode), naming shard and key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import default_collate
from torchcodec.decoders import ImageReadMode, decode_image
from torchvision.transforms import v2

from mm_lightning.data.tokenizer import Tokenizer

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MissingMemberError(KeyError):
    """A sample lacks a member the pipeline needs (e.g. no ``.cls`` next to the image)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "missing member"


def image_member(sample: dict[str, Any]) -> bytes:
    """The encoded image bytes of a sample, whichever image extension it uses."""
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    raise MissingMemberError(f"no image member (one of .{', .'.join(IMAGE_EXTENSIONS)}); has {member_names(sample)}")


def member(sample: dict[str, Any], name: str) -> Any:
    """Member ``name`` of ``sample``, or a :class:`MissingMemberError` naming what it has."""
    if name not in sample:
        raise MissingMemberError(f"no .{name} member; has {member_names(sample)}")
    return sample[name]


def member_names(sample: dict[str, Any]) -> str:
    return ", ".join("." + k for k in sorted(sample) if not k.startswith("__")) or "nothing"


def decode_rgb(data: bytes) -> torch.Tensor:
    """Decode PNG/JPEG/WebP bytes to a uint8 (3, H, W) tensor with TorchCodec's native image decoders.

    torchvision's decoders (deprecated since 0.29 in favour of TorchCodec) and PIL were the alternatives:
    TorchCodec gives bit-identical tensors to torchvision's and is as fast or faster on our 32 px shards
    (time ratio TorchCodec/torchvision 0.63-1.40 over PNG, JPEG, WebP, two rounds side by side: noise), and torchvision was
    2-4x faster than PIL on them (``../shared/notes/machine.md``).
    """
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return decode_image(buf, mode=ImageReadMode.RGB)


class WholeImageCrop:
    """``RandomResizedCrop(size, scale=(1.0, 1.0))`` without its random draws: the whole image, resized.

    At scale 1 ``RandomResizedCrop`` ends with the whole image (or, for an aspect ratio outside
    ``ratio``, the largest centred crop within it) after up to ten random draws, most of its cost in a
    data worker; this computes that directly. Pixel for pixel the same for square images (every
    shapes and digits image); for other shapes ``RandomResizedCrop`` now and then keeps a draw that
    trims a row or column, which this never does.
    """

    def __init__(self, size: int, ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        self.size = [size, size]
        self.ratio = ratio

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        aspect = width / height
        if aspect < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif aspect > max(self.ratio):
            w, h = int(round(height * max(self.ratio))), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
        return v2.functional.resized_crop(image, top, left, h, w, self.size, antialias=True)


def image_transforms(
    image_size: int,
    training: bool,
    crop_scale: Sequence[float] = (0.08, 1.0),
    hflip: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """timm-style transforms on uint8 tensors: random resized crop + flip to train, resize to evaluate.

    ``crop_scale`` ``(1.0, 1.0)`` crops nothing at random: :class:`WholeImageCrop` gives the same pixels
    without the random draws."""
    ops: list[Any] = []
    if training:
        ops.append(_resized_crop(image_size, crop_scale))
        if hflip:
            ops.append(v2.RandomHorizontalFlip())
    else:
        ops.append(v2.Resize((image_size, image_size), antialias=True))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(ops)


def _resized_crop(image_size: int, crop_scale: Sequence[float]) -> Any:
    if tuple(float(c) for c in crop_scale) == (1.0, 1.0):
        return WholeImageCrop(image_size)
    return v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), antialias=True)


def tower_image_settings(
    image_size: int | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    tower: dict[str, Any] | None,
    what: str = "data.pipeline.init_args",
) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """``(image_size, mean, std)`` of a pipeline that feeds a vision tower whose preprocessing is ``tower``
    (``{"image_size", "mean", "std"}``, handed over by ``experiments.run`` from the task).

    Unset values come from the tower; an explicit ``mean`` / ``std`` wins (a deliberate choice); an explicit
    ``image_size`` must equal the tower's (the tower's token grid, and so the connector, depend on it), else a
    one-line ``ValueError`` names both. Without a tower (a pipeline built by hand) the defaults are those of the
    image pipelines: 224 px, ImageNet's mean and std.
    """
    if tower is None:
        return int(image_size or 224), tuple(mean or IMAGENET_MEAN), tuple(std or IMAGENET_STD)
    own = int(tower["image_size"])
    if image_size is not None and int(image_size) != own:
        raise ValueError(f"{what}.image_size {image_size} differs from the vision tower's input size {own}: drop "
                         f"image_size (the tower's is used) or set model.init_args.image_size {image_size}")
    return own, tuple(tower["mean"] if mean is None else mean), tuple(tower["std"] if std is None else std)


class SamplePipeline:
    """Base class: decode one sample, collate a list of decoded samples into a batch dict."""

    def decode(self, sample: dict[str, Any], training: bool) -> dict[str, Any]:
        raise NotImplementedError

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return default_collate(samples)


class ClassificationPipeline(SamplePipeline):
    """Image + ``.cls`` label (timm / webdataset convention) -> ``{"image", "label"}``.

    Args:
        image_size: side of the square image the model sees.
        crop_scale: area range of the training ``RandomResizedCrop``; ``[1.0, 1.0]`` keeps the whole image.
        hflip: random horizontal flips while training.
        mean: per-channel normalisation mean.
        std: per-channel normalisation standard deviation.
        label_key: the member holding the integer class label.
    """

    def __init__(
        self,
        image_size: int = 224,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        hflip: bool = True,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        label_key: str = "cls",
    ) -> None:
        if not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale}")
        self.image_size = image_size
        self.label_key = label_key
        self.train_tf = image_transforms(image_size, True, crop_scale, hflip, mean, std)
        self.eval_tf = image_transforms(image_size, False, crop_scale, hflip, mean, std)

    def decode(self, sample: dict[str, Any], training: bool) -> dict[str, Any]:
        image = decode_rgb(image_member(sample))
        label = int(member(sample, self.label_key))
        tf = self.train_tf if training else self.eval_tf
        return {"image": tf(image), "label": label}


def simclr_transforms(
    image_size: int,
    crop_scale: Sequence[float] = (0.08, 1.0),
    hflip: float = 0.5,
    jitter: float = 0.8,
    jitter_strength: Sequence[float] = (0.4, 0.4, 0.4, 0.1),
    grayscale: float = 0.2,
    blur: float = 0.5,
    blur_sigma: Sequence[float] = (0.1, 2.0),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """SimCLR's augmentation on uint8 tensors (torchvision v2): random resized crop, horizontal flip,
    colour jitter (brightness, contrast, saturation, hue) with probability ``jitter``, grayscale with
    probability ``grayscale``, Gaussian blur (kernel ~10% of the side, odd) with probability ``blur``."""
    ops: list[Any] = [_resized_crop(image_size, crop_scale)]
    if hflip > 0:
        ops.append(v2.RandomHorizontalFlip(p=hflip))
    if jitter > 0:
        b, c, s, h = jitter_strength
        ops.append(v2.RandomApply([v2.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h)], p=jitter))
    if grayscale > 0:
        ops.append(v2.RandomGrayscale(p=grayscale))
    if blur > 0:
        kernel = max(3, int(0.1 * image_size) // 2 * 2 + 1)
        ops.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=tuple(blur_sigma))], p=blur))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(ops)


class TwoViewPipeline(SamplePipeline):
    """Two independently augmented views of each image for self-supervised learning (SimCLR, MoCo).

    Training: ``{"view1", "view2"}`` plus ``"label"`` when the sample has the label member (used
    only by evaluation callbacks such as the online linear probe, never by the loss).
    Evaluation: ``{"image"}`` (resized, normalised, not augmented) plus ``"label"``, and the two
    views as well with ``eval_views=True`` (for a validation loss).

    Args:
        image_size: side of the square views.
        crop_scale: area range of the random resized crop.
        hflip: probability of a horizontal flip.
        jitter: probability of applying colour jitter.
        jitter_strength: colour jitter's (brightness, contrast, saturation, hue).
        grayscale: probability of converting to grayscale.
        blur: probability of a Gaussian blur (kernel ~10% of ``image_size``).
        blur_sigma: range of the blur's standard deviation.
        mean: per-channel normalisation mean.
        std: per-channel normalisation standard deviation.
        label_key: the member holding the integer class label, if the shards have one.
        eval_views: also produce augmented views at evaluation.
    """

    def __init__(
        self,
        image_size: int = 224,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        hflip: float = 0.5,
        jitter: float = 0.8,
        jitter_strength: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
        grayscale: float = 0.2,
        blur: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        label_key: str = "cls",
        eval_views: bool = False,
    ) -> None:
        if not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale}")
        for name, p in (("hflip", hflip), ("jitter", jitter), ("grayscale", grayscale), ("blur", blur)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} is a probability in [0, 1], got {p}")
        if len(jitter_strength) != 4:
            raise ValueError(f"jitter_strength is (brightness, contrast, saturation, hue), got {jitter_strength}")
        self.image_size = image_size
        self.label_key = label_key
        self.eval_views = eval_views
        self.view_tf = simclr_transforms(
            image_size, crop_scale, hflip, jitter, jitter_strength, grayscale, blur, blur_sigma, mean, std
        )
        self.eval_tf = image_transforms(image_size, False, mean=mean, std=std)

    def decode(self, sample: dict[str, Any], training: bool) -> dict[str, Any]:
        image = decode_rgb(image_member(sample))
        out: dict[str, Any] = {}
        if training or self.eval_views:
            out["view1"] = self.view_tf(image)
            out["view2"] = self.view_tf(image)
        if not training:
            out["image"] = self.eval_tf(image)
        if self.label_key in sample:
            out["label"] = int(sample[self.label_key])
        return out


class ImageTextPipeline(SamplePipeline):
    """Image + caption (img2dataset's layout, as open_clip reads it) -> ``{"image", "input_ids", "attention_mask", "label"}``.

    A sample holds an image under any extension of ``IMAGE_EXTENSIONS``, its caption as ``.txt``
    and optionally ``.json`` metadata; without a ``.txt`` the caption is the ``.json``'s
    ``caption`` field. ``label`` is the ``.cls`` member when the shards have one (zero-shot
    evaluation and probes read it; -1 for a sample without one in a batch with labels; absent
    when no sample of the batch has one). Captions are tokenized per batch in ``collate``.

    Evaluation batches also carry every reference caption of their images when the ``.json`` lists
    them under ``captions_field`` (as COCO and Flickr30k give 5 per image, and the shapes world
    gives its scene in every template): ``caption_input_ids`` / ``caption_attention_mask`` (all
    captions of the batch, flattened) and ``caption_owner`` (the batch index of each caption's
    image). Retrieval (:class:`~mm_lightning.callbacks.retrieval.RetrievalEvaluation`) then ranks
    against all of them, counting a retrieved caption correct if it is any of the image's captions.

    The tokenizer is the run's one tokenizer object (the config's top-level ``tokenizer:`` section,
    linked here by ``experiments.run``; see :mod:`mm_lightning.data.tokenizer`): captions are
    ``context_length`` tokens long as that tokenizer says.

    Args:
        tokenizer: the run's tokenizer (e.g. :class:`~mm_lightning.data.tokenizer.TextTokenizer`); set by
            the config's top-level ``tokenizer:`` section, not here.
        image_size: side of the square image the model sees.
        crop_scale: area range of the training ``RandomResizedCrop``; ``[1.0, 1.0]`` keeps the whole image.
        hflip: random horizontal flips while training (off by default: captions may say "left").
        mean: per-channel normalisation mean.
        std: per-channel normalisation standard deviation.
        caption_key: the member holding the caption.
        label_key: the member holding an integer class label, if any.
        captions_field: the ``.json`` field listing all reference captions of an image (evaluation
            only); ``None`` evaluates against the one caption of each sample.
    """

    def __init__(
        self,
        tokenizer: Tokenizer | None = None,
        image_size: int = 224,
        crop_scale: tuple[float, float] = (0.9, 1.0),
        hflip: bool = False,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        caption_key: str = "txt",
        label_key: str | None = "cls",
        captions_field: str | None = "captions",
    ) -> None:
        if tokenizer is None:
            raise ValueError(
                "ImageTextPipeline needs a tokenizer: give the config a top-level `tokenizer:` section (class_path "
                "mm_lightning.data.tokenizer.TextTokenizer, init_args {path: ..., context_length: ...})"
            )
        if not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale}")
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.caption_key = caption_key
        self.label_key = label_key
        self.captions_field = captions_field
        self.train_tf = image_transforms(image_size, True, crop_scale, hflip, mean, std)
        self.eval_tf = image_transforms(image_size, False, crop_scale, hflip, mean, std)

    @staticmethod
    def metadata(sample: dict[str, Any]) -> dict[str, Any]:
        """The sample's ``.json`` member as a dict (empty without one)."""
        import json

        meta = sample.get("json", {})
        meta = json.loads(meta) if isinstance(meta, (bytes, str)) else meta
        if not isinstance(meta, dict):
            raise ValueError(f".json is a {type(meta).__name__}, not an object")
        return meta

    def caption(self, sample: dict[str, Any]) -> str:
        """The caption of a raw sample: its ``.txt`` (``caption_key``) member, else ``.json``'s ``caption``."""
        if self.caption_key in sample:
            text = sample[self.caption_key]
        elif "json" in sample:
            meta = self.metadata(sample)
            if not isinstance(meta.get("caption"), str):
                raise MissingMemberError(f"no .{self.caption_key} member and no 'caption' in .json; has {member_names(sample)}")
            text = meta["caption"]
        else:
            raise MissingMemberError(f"no .{self.caption_key} member; has {member_names(sample)}")
        text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
        if not text.strip():
            raise ValueError("empty caption")
        return text.strip()

    def decode(self, sample: dict[str, Any], training: bool) -> dict[str, Any]:
        image = decode_rgb(image_member(sample))
        label = int(sample[self.label_key]) if self.label_key and self.label_key in sample else -1
        tf = self.train_tf if training else self.eval_tf
        out = {"image": tf(image), "text": self.caption(sample), "label": label}
        if not training and self.captions_field and "json" in sample:
            captions = self.metadata(sample).get(self.captions_field)
            if captions is not None:
                if not isinstance(captions, list) or not captions or not all(isinstance(c, str) and c.strip() for c in captions):
                    raise ValueError(f".json '{self.captions_field}' must be a non-empty list of non-empty strings")
                out["captions"] = [c.strip() for c in captions]
        return out

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``input_ids`` / ``attention_mask`` of ``texts`` as batches carry them (also for zero-shot prompts)."""
        return self.tokenizer(texts)

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Stack the images, tokenize the captions; ``label`` only when a sample of the batch has one."""
        batch: dict[str, Any] = {"image": torch.stack([s["image"] for s in samples])}
        labels = [s["label"] for s in samples]
        if any(label >= 0 for label in labels):
            batch["label"] = torch.tensor(labels, dtype=torch.long)
        batch.update(self.tokenize([s["text"] for s in samples]))
        if samples and all("captions" in s for s in samples):  # evaluation with every reference caption
            flat = [c for s in samples for c in s["captions"]]
            tokens = self.tokenize(flat)
            batch["caption_input_ids"] = tokens["input_ids"]
            if "attention_mask" in tokens:
                batch["caption_attention_mask"] = tokens["attention_mask"]
            batch["caption_owner"] = torch.tensor([i for i, s in enumerate(samples) for _ in s["captions"]])
        return batch
