"""CLIP task: temperature clamp and weight decay, tower hand-over, zero-shot and retrieval evaluation,
and a run through the CLI on hand-made img2dataset-layout shards (2 DDP ranks)."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mm_lightning.callbacks.retrieval import RetrievalEvaluation, retrieval_metrics, retrieval_ranks
from mm_lightning.callbacks.zeroshot import fill_template, zeroshot_classifier
from mm_lightning.data.tokenizer import TextTokenizer
from mm_lightning.models.clip import CheckpointMismatchError, load_backbone_weights
from mm_lightning.tasks.clip import CLIPTask
from tests.test_run import run_cli

VIT = {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}


def tiny_task(**kwargs) -> CLIPTask:
    args = dict(image_backbone_kwargs=VIT, embed_dim=16, vocab_size=50, context_length=8, text_width=32,
                text_layers=1, text_heads=2)
    return CLIPTask(**{**args, **kwargs})


def _batches(n: int = 3, size: int = 8) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randn(size, 3, 16, 16, generator=g), "input_ids": torch.randint(3, 50, (size, 8), generator=g),
             "attention_mask": torch.ones(size, 8, dtype=torch.long)} for _ in range(n)]


def _fit(task: CLIPTask, steps: int = 2, callbacks: list | None = None):
    import lightning as L

    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(_batches(), batch_size=None))
    return trainer


def _group_of(optimizer: torch.optim.Optimizer, param: torch.nn.Parameter) -> dict:
    return next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))


def test_logit_scale_starts_at_1_over_0_07_is_clamped_and_takes_no_weight_decay():
    assert tiny_task().model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    import lightning as L

    class Record(L.Callback):
        values: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, *args):
            self.values.append(pl_module.model.logit_scale.item())

    task = tiny_task(init_logit_scale=6.0, weight_decay=0.1, lr=1e-4, betas=(0.9, 0.98), eps=1e-6)  # exp(6) = 403 > 100
    trainer = _fit(task, steps=3, callbacks=[Record()])
    # open_clip's AdamW settings for ViTs reach the optimizer
    assert {(g["betas"], g["eps"]) for g in trainer.optimizers[0].param_groups} == {((0.9, 0.98), 1e-6)}
    # clamped to ln(100) after the first optimizer step; later steps move it from there
    assert Record.values[0] == pytest.approx(math.log(100)) and max(Record.values) <= math.log(100) + 1e-7
    assert "train/logit_scale" in trainer.callback_metrics
    optimizer = trainer.optimizers[0]
    assert _group_of(optimizer, task.model.logit_scale)["weight_decay"] == 0.0
    assert _group_of(optimizer, task.model.text_encoder.positional_embedding)["weight_decay"] == 0.0
    assert _group_of(optimizer, task.model.image_projection.weight)["weight_decay"] == 0.1
    assert _group_of(optimizer, task.model.text_encoder.text_projection.weight)["weight_decay"] == 0.1


def test_siglip_has_a_bias_without_weight_decay_and_trains():
    task = tiny_task(loss="siglip", weight_decay=0.1)
    assert task.model.logit_scale.item() == pytest.approx(math.log(10)) and task.model.logit_bias.item() == -10.0
    trainer = _fit(task)
    assert _group_of(trainer.optimizers[0], task.model.logit_bias)["weight_decay"] == 0.0
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_embed_and_encoders():
    task = tiny_task().eval()
    images = torch.randn(3, 3, 16, 16)
    assert task.embed(images).shape == (3, 32)  # pooled backbone features, before the projection
    features = task.encode_image(images)
    assert features.shape == (3, 16) and torch.allclose(features.norm(dim=-1), torch.ones(3))
    text = task.encode_text(torch.randint(3, 50, (3, 8)))
    assert text.shape == (3, 16) and torch.allclose(text.norm(dim=-1), torch.ones(3))


def test_text_tower_from_a_local_hugging_face_encoder(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=16)).save_pretrained(tmp_path / "bert")
    task = tiny_task(text_model=str(tmp_path / "bert"))
    assert task.model.text_encoder.pooling == "mean"
    loss = task.contrastive_loss(*task(torch.randn(4, 3, 16, 16), torch.randint(1, 60, (4, 8)), torch.ones(4, 8, dtype=torch.long)))
    loss.backward()
    assert task.model.text_encoder.model.embeddings.word_embeddings.weight.grad is not None


def test_text_tower_sizes_come_from_the_one_tokenizer(tmp_path):
    """The run's tokenizer sets the text tower's vocabulary and context length; setting them again is an error."""
    from mm_lightning.data.tokenizer import train_bpe_tokenizer

    train_bpe_tokenizer(["a red circle", "two blue squares", "one green ring"] * 4, vocab_size=300).save(
        str(tmp_path / "tokenizer.json"))
    tokenizer = TextTokenizer(tmp_path / "tokenizer.json", context_length=12)
    task = tiny_task(tokenizer=tokenizer, vocab_size=None, context_length=None)
    assert task.tokenizer is tokenizer and "tokenizer" not in task.hparams
    assert task.model.text_encoder.vocab_size == tokenizer.vocab_size and task.model.text_encoder.context_length == 12
    with pytest.raises(ValueError, match="model.vocab_size: read from the tokenizer"):
        tiny_task(tokenizer=tokenizer, context_length=None)
    with pytest.raises(ValueError, match="top-level `tokenizer:`"):
        tiny_task(vocab_size=None)


def test_image_tower_is_initialised_from_a_classification_checkpoint(tmp_path):
    from mm_lightning.tasks.classification import ImageClassifier

    torch.manual_seed(1)
    classifier = ImageClassifier(backbone="vit_tiny_patch16_224", backbone_kwargs=VIT, num_classes=4, ema_decay=0.9)
    path = tmp_path / "classifier.ckpt"
    torch.save({"state_dict": classifier.state_dict(), "hyper_parameters": dict(classifier.hparams)}, path)
    task = tiny_task(image_init=str(path))
    task.setup("fit")
    for name, value in task.model.image_encoder.state_dict().items():
        assert torch.equal(value, classifier.model.state_dict()[name]), name
    # an explicit prefix picks the EMA copy; a prefix that holds nothing is an error naming it
    assert load_backbone_weights(tiny_task().model.image_encoder, str(path), "ema.module.") == "ema.module."
    with pytest.raises(CheckpointMismatchError, match="lacks .* under prefix 'backbone.'"):
        load_backbone_weights(tiny_task().model.image_encoder, str(path), "backbone.")
    wider = tiny_task(image_backbone_kwargs={**VIT, "embed_dim": 48, "num_heads": 2}, image_init=str(path))
    with pytest.raises(CheckpointMismatchError, match=r"classifier.ckpt.*model\..*\(1, 1, 32\) vs \(1, 1, 48\)"):
        wider.setup("fit")
    with pytest.raises(FileNotFoundError, match="model.image_init"):
        tiny_task(image_init=str(tmp_path / "missing.ckpt")).setup("fit")


def test_retrieval_counts_identical_captions_as_the_same_caption():
    # 4 pairs; captions 0 and 2 are the same string (same token ids)
    ids = torch.tensor([[1, 5, 2], [1, 6, 2], [1, 5, 2], [1, 7, 2]])
    texts = torch.eye(4)
    images = F.normalize(torch.tensor([[0.0, 0.0, 1.0, 0.1],   # image 0 is closest to text 2 = its own caption string
                                       [1.0, 0.2, 0.0, 0.0],   # image 1: text 0 first, its own text second
                                       [0.0, 0.5, 0.0, 1.0],   # image 2: texts 3 and 1 first, its caption (0 or 2) third
                                       [0.0, 0.0, 0.0, 1.0]]), dim=-1)
    groups = torch.tensor([0, 1, 0, 2])
    assert retrieval_ranks(images, texts, groups, groups).tolist() == [1, 2, 3, 1]
    # text 0 (= text 2): images 0 and 2 are correct, image 1 scores higher; text 1: image 2 beats image 1
    assert retrieval_ranks(texts, images, groups, groups).tolist() == [2, 2, 1, 1]
    metrics = retrieval_metrics(images, texts, ids, ks=(1, 2))
    assert metrics["i2t_R@1"] == 0.5 and metrics["i2t_R@2"] == 0.75 and metrics["i2t_median_rank"] == 1.0
    assert metrics["t2i_R@1"] == 0.5 and metrics["t2i_R@2"] == 1.0
    # without the identity of captions 0 and 2, image 0 would have missed (text 2 is not "its" text)
    distinct = torch.tensor([[1, 5, 2], [1, 6, 2], [1, 8, 2], [1, 7, 2]])
    assert retrieval_metrics(images, texts, distinct, ks=(1,))["i2t_R@1"] == 0.25


def test_retrieval_with_several_reference_captions_per_image():
    """COCO-style: image i owns several captions; i2t is right if the top distinct caption is any of them,
    every caption row is a t2i query answered by any image owning that string."""
    # captions (token rows): A=[1,5] B=[1,6] C=[1,7] D=[1,8]; image 0 owns A, B; image 1 owns B, C; image 2 owns D
    ids = torch.tensor([[1, 5], [1, 6], [1, 6], [1, 7], [1, 8]])
    owner = torch.tensor([0, 0, 1, 1, 2])
    texts = F.normalize(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 1.0]]), dim=-1)
    images = F.normalize(torch.tensor([[0.1, 1.0, 0.0],    # top caption B: owned -> rank 1
                                       [1.0, 0.0, 0.2],    # A first (not owned), then D, C, B ... best owned is C
                                       [1.0, 0.9, 0.8]]), dim=-1)  # D first -> rank 1
    metrics = retrieval_metrics(images, texts, ids, ks=(1, 2), owner=owner)
    # image 1 scores A 0.98 > D 0.68 > C 0.20 > B 0: its best own caption (C) ranks 3rd among the 4 distinct captions
    assert metrics["i2t_R@1"] == pytest.approx(2 / 3) and metrics["i2t_R@2"] == pytest.approx(2 / 3)
    assert metrics["i2t_median_rank"] == 1.0
    # t2i: A -> image 1 or 2 score above image 0 (rank 3); B (twice) -> image 0 first (rank 1); C -> image 2 beats
    # image 1 (rank 2); D -> image 2 (rank 1)
    assert metrics["t2i_R@1"] == pytest.approx(3 / 5) and metrics["t2i_R@2"] == pytest.approx(4 / 5)
    # one caption per image and no owner: the paired protocol
    assert retrieval_metrics(images, texts[[1, 3, 4]], ids[[1, 3, 4]], ks=(1,))["i2t_R@1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="pass owner"):
        retrieval_metrics(images, texts, ids)


def test_image_text_pipeline_carries_every_reference_caption_at_evaluation(tmp_path):
    """Shapes samples list all their captions in .json: evaluation batches carry them with their owners."""
    import webdataset as wds

    from data.prepare import prepare_shapes
    from mm_lightning.data import synthetic
    from mm_lightning.data.samples import ImageTextPipeline

    out = tmp_path / "shapes"
    prepare_shapes(out, train=24, val=6, test=6, progress=False)
    pipeline = ImageTextPipeline(TextTokenizer(out / "tokenizer.json", context_length=32), image_size=32)
    samples = list(wds.WebDataset([str(f) for f in sorted(out.glob("shapes-val-*.tar"))], shardshuffle=False))[:2]
    batch = pipeline.collate([pipeline.decode(s, training=False) for s in samples])
    n = len(synthetic.CAPTION_TEMPLATES)
    assert batch["caption_input_ids"].shape == (2 * n, 32) and batch["caption_owner"].tolist() == [0] * n + [1] * n
    scene = json.loads(samples[1]["json"])["scene"]
    decoded = [pipeline.tokenizer.decode(row) for row in batch["caption_input_ids"][n:]]
    assert decoded == synthetic.all_captions(scene) and samples[1]["txt"].decode() in decoded
    train = pipeline.collate([pipeline.decode(s, training=True) for s in samples])
    assert "caption_input_ids" not in train  # training reads the sample's one caption
    without = ImageTextPipeline(pipeline.tokenizer, image_size=32, captions_field=None)
    assert "caption_owner" not in without.collate([without.decode(s, training=False) for s in samples])


def test_zeroshot_classifier_averages_normalised_prompt_embeddings():
    assert fill_template("a photo of a {}", "apple") == "a photo of an apple"

    def tokenize(texts):
        return {"input_ids": torch.tensor([[len(t), t.count("o")] for t in texts])}

    def encode_text(ids, mask=None):
        return ids.float()

    weights = zeroshot_classifier(encode_text, tokenize, ["ox", "cat"], ["{}", "a {} too"], "cpu")
    ox = F.normalize(F.normalize(torch.tensor([[2.0, 1.0], [9.0, 3.0]]), dim=-1).mean(0), dim=-1)  # "ox", "an ox too"
    assert torch.allclose(weights[0], ox) and torch.allclose(weights.norm(dim=-1), torch.ones(2))


def test_zeroshot_callback_counts_top1_and_top5_exactly():
    """4 labelled images (one unlabelled, left out) against 3 class prompts: top-1 3/4, top-3 (top-5 capped at the
    class count) 4/4, through torchmetrics' MulticlassAccuracy."""
    from mm_lightning.callbacks.zeroshot import ZeroShotClassification

    names = ["red", "green", "blue"]

    class Tok:
        def __call__(self, texts):
            return {"input_ids": torch.tensor([[next(i for i, n in enumerate(names) if n in t)] for t in texts])}

    logged = {}
    task = SimpleNamespace(
        tokenizer=Tok(), device=torch.device("cpu"),
        encode_text=lambda ids, mask=None: F.one_hot(ids[:, 0], 3).float(),
        log=lambda name, value, **kw: logged.__setitem__(name, float(value)),
    )
    callback = ZeroShotClassification(templates=["a {}", "one {}"], class_names=names)
    trainer = SimpleNamespace(sanity_checking=False, datamodule=None)
    callback.on_test_epoch_start(trainer, task)
    features = torch.tensor([[1.0, 0.2, 0.0], [0.0, 0.1, 1.0], [0.9, 1.0, 0.0], [0.0, 0.5, 0.4], [1.0, 0.0, 0.0]])
    batch = {"image": torch.zeros(5, 3, 2, 2), "label": torch.tensor([0, 2, 0, 1, -1])}
    callback.on_test_batch_end(trainer, task, {"image_features": features}, batch, 0)
    callback.on_test_epoch_end(trainer, task)
    assert logged == {"test/zeroshot_top1": 0.75, "test/zeroshot_top5": 1.0}


def test_retrieval_table_is_logged_to_an_offline_weights_and_biases_run(tmp_path):
    """The W&B table of a real offline run: one row per example image, its caption and the top-3 distinct captions,
    decoded by the task's tokenizer."""
    import glob

    import lightning as L
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    from mm_lightning.data.tokenizer import train_bpe_tokenizer

    captions = ["a red circle", "a blue square", "a red circle", "two green rings"]
    train_bpe_tokenizer(captions * 3, vocab_size=300).save(str(tmp_path / "tokenizer.json"))
    tokenizer = TextTokenizer(tmp_path / "tokenizer.json", context_length=8)
    ids = tokenizer(captions)["input_ids"]
    task = SimpleNamespace(tokenizer=tokenizer)
    callback = RetrievalEvaluation(ks=[1], num_examples=2)
    callback.examples = [torch.randn(3, 3, 4, 4)]
    images = F.normalize(torch.tensor([[1.0, 0.1, 0.5, 0.0], [0.0, 1.0, 0.2, 0.0], [1.0, 0.0, 0.0, 0.1],
                                       [0.0, 0.0, 0.0, 1.0]]), dim=-1)
    texts = torch.eye(4)
    rows = callback.example_rows(task, images, texts, ids)
    assert len(rows) == 2 and rows[0][0].shape == (4, 4, 3) and rows[0][0].dtype == np.uint8
    # image 0 scores captions 0, 2, 1, 3 in that order; 0 and 2 are one string, one gallery item: top-3 are 0, 1, 3
    assert rows[0][1:] == ["a red circle", "a red circle", "a blue square", "two green rings"]
    logger = WandbLogger(save_dir=str(tmp_path), project="test", offline=True)
    trainer = L.Trainer(logger=logger, accelerator="cpu", enable_progress_bar=False, enable_checkpointing=False)
    try:
        callback._log_table(trainer, task, "val", images, texts, ids)
    finally:
        wandb.finish()
    [table] = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "files" / "media" / "table" / "val" /
                            "retrieval_examples_*.table.json"))
    logged = json.loads(Path(table).read_text())
    assert logged["columns"] == ["image", "caption", "top1", "top2", "top3"]
    assert [row[1:] for row in logged["data"]] == [rows[0][1:], rows[1][1:]]
    assert all(row[0] for row in logged["data"])  # wandb 0.31 offline writes an "Image" reference per row


# --------------------------------------------------------------------- img2dataset shards through the CLI
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 80, 230), "yellow": (230, 220, 40)}


def _jpeg(colour: tuple[int, int, int], rng: np.random.Generator) -> bytes:
    image = rng.integers(0, 50, (16, 16, 3), dtype=np.uint8)
    y, x = rng.integers(0, 8, 2)
    image[y : y + 8, x : x + 8] = colour
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_img2dataset_shards(directory: Path, n_shards: int, per_shard: int, seed: int, cls: bool = False) -> str:
    """Shards as img2dataset writes them: ``00000.tar`` ... holding ``KEY.jpg``, ``KEY.txt``, ``KEY.json``
    (no sizes.json; a ``_stats.json`` per shard). ``cls`` adds a ``.cls`` label for zero-shot evaluation."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    for s in range(n_shards):
        with tarfile.open(directory / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                label = int(rng.integers(len(names)))
                caption = f"a photo of a {names[label]} square"
                meta = {"url": f"http://example.com/{key}.jpg", "key": key, "status": "success", "caption": caption,
                        "width": 16, "height": 16, "original_width": 64, "original_height": 64, "error_message": None}
                members = {"jpg": _jpeg(COLOURS[names[label]], rng), "txt": caption.encode(), "json": json.dumps(meta).encode()}
                if cls:
                    members["cls"] = str(label).encode()
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        (directory / f"{s:05d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))
    return str(directory / f"{{00000..{n_shards - 1:05d}}}.tar")


CONFIG = """
trainer:
  accelerator: cpu
  devices: 1
  max_epochs: 5
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: mm_lightning.callbacks.zeroshot.ZeroShotClassification
      init_args: {templates: ["a photo of a {} square"], class_names: [red, green, blue, yellow]}
    - class_path: mm_lightning.callbacks.retrieval.RetrievalEvaluation
      init_args: {ks: [1, 5]}
tokenizer:
  class_path: mm_lightning.data.tokenizer.TextTokenizer
  init_args: {path: TOKENIZER, context_length: 16}
model:
  class_path: mm_lightning.tasks.clip.CLIPTask
  init_args:
    image_backbone_kwargs: {img_size: 16, patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2, mlp_ratio: 2.0}
    embed_dim: 32
    text_width: 32
    text_layers: 1
    text_heads: 2
    text_causal: false
    lr: 5.0e-3
    weight_decay: 0.01
data:
  batch_size: 16
  num_workers: 0
  pipeline:
    class_path: mm_lightning.data.samples.ImageTextPipeline
    init_args: {image_size: 16, crop_scale: [1.0, 1.0], mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}
logger: csv
"""


@pytest.mark.slow
def test_clip_trains_on_img2dataset_shards_with_two_ddp_ranks(tmp_path):
    from data.prepare import main as prepare

    train = write_img2dataset_shards(tmp_path / "train", 4, 80, seed=1)
    val = write_img2dataset_shards(tmp_path / "val", 2, 32, seed=2)  # no labels: zero-shot is skipped there
    test = write_img2dataset_shards(tmp_path / "test", 3, 30, seed=3, cls=True)  # uneven over 2 ranks
    tokenizer = tmp_path / "tokenizer.json"
    prepare(["tokenizer", "--shards", train, "--out", str(tokenizer), "--vocab-size", "300"])
    config = tmp_path / "clip.yaml"
    config.write_text(CONFIG.replace("TOKENIZER", str(tokenizer)))
    data = [f"--data.train={train}", f"--data.val={val}", f"--data.test={test}"]
    run = tmp_path / "run"
    run_cli("fit", "--config", str(config), *data, f"--trainer.default_root_dir={run}",
            "--trainer.devices=2", "--trainer.strategy=ddp", timeout=600)
    ddp = json.loads((run / "summary.json").read_text())
    assert ddp["steps"] == 5 * (320 // 32) and ddp["data/skipped"] == 0
    assert ddp["test/i2t_R@1"] >= 0.9 and ddp["test/zeroshot_top1"] >= 0.9, ddp  # chance: ~0.25
    assert "val/zeroshot_top1" not in ddp and ddp["val/i2t_R@1"] >= 0.9
    # the temperature is learned (it starts at 1/0.07; the clamp at 100 is tested in the fast test above): in 50 steps
    # at this lr its log moved 0.0046 here; a frozen one moves 0 (float32 logging error ~1e-7)
    assert abs(math.log(ddp["train/logit_scale"]) - math.log(1 / 0.07)) > 1e-3, ddp["train/logit_scale"]
    # One process on the same checkpoint sees the same 90 test pairs: the gathered metrics agree.
    single = tmp_path / "single"
    run_cli("test", "--config", str(config), f"--data.test={test}", f"--ckpt_path={run}/checkpoints/best.ckpt",
            f"--trainer.default_root_dir={single}")
    one = json.loads((single / "summary.json").read_text())
    for name in ("i2t_R@1", "i2t_R@5", "t2i_R@1", "i2t_median_rank", "t2i_median_rank", "zeroshot_top1", "zeroshot_top5"):
        assert one[f"test/{name}"] == pytest.approx(ddp[f"test/{name}"], abs=1.5 / 90), name


def test_prepare_captions_writes_img2dataset_shards_and_a_tokenizer(tmp_path):
    """``python -m data.prepare captions --src pairs.jsonl`` -> .jpg/.png + .txt + .json shards, tokenizer.json;
    the image-text pipeline reads them."""
    from data.prepare import main as prepare
    from mm_lightning.data.samples import ImageTextPipeline

    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    rows = []
    for i in range(24):
        name = f"imgs/{i}.{'jpg' if i % 2 else 'png'}"
        Image.fromarray(rng.integers(0, 255, (12, 20, 3), dtype=np.uint8)).save(tmp_path / name)
        rows.append({"image": name, "caption": f"a photo of {list(COLOURS)[i % 4]} noise"})
    src = tmp_path / "pairs.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "shards"
    manifest = prepare(["captions", "--src", str(src), "--out", str(out), "--val-fraction", "0.25",
                        "--test-fraction", "0.25", "--no-progress"])
    assert {k: v["num_samples"] for k, v in manifest["splits"].items()} == {"train": 12, "val": 6, "test": 6}
    with tarfile.open(sorted(out.glob("pairs-train-*.tar"))[0]) as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile(next(n for n in names if n.endswith(".json"))).read())
    assert {n.rsplit(".", 1)[1] for n in names} <= {"jpg", "png", "txt", "json"} and meta["path"].startswith("imgs/")
    pipeline = ImageTextPipeline(tokenizer=TextTokenizer(out / "tokenizer.json", context_length=32), image_size=16)
    import webdataset as wds

    sample = next(iter(wds.WebDataset(str(sorted(out.glob("pairs-val-*.tar"))[0]), shardshuffle=False)))
    batch = pipeline.collate([pipeline.decode(sample, training=True)])
    assert batch["image"].shape == (1, 3, 16, 16) and "label" not in batch  # no .cls in these shards
    assert pipeline.tokenizer.decode(batch["input_ids"][0]) == sample["txt"].decode()
    (tmp_path / "bad.csv").write_text("file_name,words\nx.jpg,hello\n")
    with pytest.raises(SystemExit):
        prepare(["captions", "--src", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "bad")])


def test_shapes_preparation_writes_the_caption_tokenizer(tmp_path):
    """``data.prepare shapes`` saves tokenizer.json beside the shards; shards from before it get one on first use."""
    from data.builtin import ensure_tokenizer
    from data.prepare_shapes import prepare_shapes
    from mm_lightning.data.tokenizer import TextTokenizer

    out = tmp_path / "shapes"
    prepare_shapes(out, train=24, val=6, test=6, progress=False)
    tokenizer = TextTokenizer(out / "tokenizer.json")
    assert tokenizer.decode(tokenizer(["a photo of a red circle"])["input_ids"][0]) == "a photo of a red circle"
    (out / "tokenizer.json").unlink()
    assert ensure_tokenizer(out) and (out / "tokenizer.json").is_file() and not ensure_tokenizer(out)


def test_linear_probe_and_knn_callbacks_work_on_the_clip_task(tmp_path):
    """The contrastive-learning probe reads CLIPTask.embed (pooled image-tower features)."""
    from mm_lightning.callbacks.probe import Probe
    from mm_lightning.data.datamodule import WebDataModule
    from mm_lightning.data.samples import ImageTextPipeline
    from data.prepare import main as prepare

    train = write_img2dataset_shards(tmp_path / "train", 2, 48, seed=1, cls=True)
    test = write_img2dataset_shards(tmp_path / "test", 1, 32, seed=2, cls=True)
    prepare(["tokenizer", "--shards", train, "--out", str(tmp_path / "tokenizer.json"), "--vocab-size", "300"])
    tokenizer = TextTokenizer(tmp_path / "tokenizer.json", context_length=8)
    pipeline = ImageTextPipeline(tokenizer, image_size=16, crop_scale=(1.0, 1.0),
                                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    dm = WebDataModule(train=train, test=test, pipeline=pipeline, batch_size=16, num_workers=0)
    torch.manual_seed(0)
    results = Probe(random_init=False, k=5).evaluate(tiny_task(tokenizer=tokenizer, vocab_size=None, context_length=None), dm, "")
    # colour squares are linearly separable even in random ViT features: far above the 0.25 of chance
    assert results["test/linear_probe_acc"] >= 0.6 and results["test/knn_acc"] >= 0.6, results
