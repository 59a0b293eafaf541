"""The multimodal LLM's task: stages and freezing, optimizer groups, LoRA, weight hand-over, exact resume."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
import torch

from mm_lightning.data.conversations import CaptionPipeline, ConversationPipeline, TextPipeline
from mm_lightning.data.datamodule import WebDataModule
from mm_lightning.tasks.vlm import VisionLanguageTask
from tests.vlm_fixtures import TINY_LM, TINY_VISION, shapes_tokenizer, tiny_task, write_shapes

PARTS = ("vision", "connector", "lm")


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    return shapes_tokenizer(tmp_path_factory.mktemp("task_tok"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return write_shapes(tmp_path_factory.mktemp("task_shapes"), train=96, val=32, test=32, samples_per_shard=24)


def datamodule(tok, shards: dict[str, str], stage: str, n_image: int, batch_size: int = 8) -> WebDataModule:
    if stage == "lm":
        pipeline = TextPipeline(tok, max_length=128)
    elif stage == "align":
        pipeline = CaptionPipeline(tok, num_image_tokens=n_image, max_length=96, image_size=32)
    else:
        pipeline = ConversationPipeline(tok, num_image_tokens=n_image, max_length=128, image_size=32)
    return WebDataModule(train=shards["train"], val=shards["val"], test=shards["test"], pipeline=pipeline,
                         batch_size=batch_size, num_workers=0, shuffle_buffer=16)


def trainer(root: Path, steps: int, callbacks: list | None = None, **kwargs) -> L.Trainer:
    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     num_sanity_val_steps=0, default_root_dir=root, callbacks=callbacks or [], **kwargs)


class Modes(L.Callback):
    """Records, at every training batch, which parts are in training mode and which parameters got a gradient."""

    def __init__(self) -> None:
        self.modes: list[dict[str, bool]] = []
        self.grads: set[str] = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.modes.append({p: any(m.training for m in getattr(pl_module.model, p).modules()) for p in PARTS})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads |= {n for n, p in pl_module.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------------------ stages
TRAINED = {"lm": {"lm"}, "align": {"connector"}, "instruct": {"connector", "lm"}}


@pytest.mark.parametrize("stage", ["lm", "align", "instruct"])
@pytest.mark.parametrize("kind", ["mlp", "xattn"])
def test_frozen_parts_get_no_gradient_stay_in_eval_and_are_not_optimized(tok, shards, tmp_path, stage, kind) -> None:
    task = tiny_task(tok, kind, stage)
    before = {n: p.detach().clone() for n, p in task.named_parameters()}
    modes = Modes()
    fit = trainer(tmp_path, 2, [modes])
    fit.fit(task, datamodule=datamodule(tok, shards, stage, task.num_image_tokens))
    trained = TRAINED[stage]
    optimized = {id(p) for g in fit.optimizers[0].param_groups for p in g["params"]}
    for name, p in task.named_parameters():
        part = name.split(".")[1]
        if part in trained:
            assert p.requires_grad and id(p) in optimized, name
        else:
            assert not p.requires_grad and id(p) not in optimized and name not in modes.grads, name
            assert torch.equal(p, before[name]), name  # weight decay does not touch it either
    for mode in modes.modes:  # every step: frozen parts in eval (no dropout, fixed norms), trained ones training
        assert {p for p, training in mode.items() if training} == trained
    changed = {n.split(".")[1] for n, p in task.named_parameters() if not torch.equal(p, before[n])}
    if kind == "mlp":
        assert changed == trained
    else:  # gates at 0: the cross-attention weights get gradient 0 until the gates move, but the gates learn
        assert changed == trained and any("gate" in n for n in modes.grads)


def test_each_part_has_its_own_learning_rate(tok) -> None:
    task = tiny_task(tok, "mlp", "instruct", train_vision=True, lr=1e-3, vision_lr=1e-5, connector_lr=2e-3)
    groups = {g["name"]: g for g in task.optimizer_param_groups()}
    assert {n: g["lr"] for n, g in groups.items()} == {
        "vision": 1e-5, "vision/no_decay": 1e-5, "connector": 2e-3, "connector/no_decay": 2e-3, "lm": 1e-3,
        "lm/no_decay": 1e-3}
    assert groups["lm/no_decay"]["weight_decay"] == 0.0 and groups["lm"]["weight_decay"] == task.weight_decay
    assert sum(len(g["params"]) for g in groups.values()) == sum(1 for p in task.parameters() if p.requires_grad)


def test_a_stage_that_trains_nothing_is_an_error(tok) -> None:
    task = tiny_task(tok, "mlp", "align", train_connector=False)
    with pytest.raises(ValueError, match="trains nothing"):
        task.optimizer_param_groups()


# -------------------------------------------------------------------------------------------- LoRA
def test_lora_trains_only_adapters_and_disabling_them_gives_the_base(tok) -> None:
    base = tiny_task(tok, "mlp", "instruct").model.eval()
    task = tiny_task(tok, "mlp", "instruct", lora_r=4, lora_alpha=8)
    model = task.model.eval()
    trainable = [n for n, p in model.lm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-2] for n in trainable if "lora_A" in n} == {"default"}
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj"}
    for name, p in model.lm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a trained adapter (fresh ones start at B = 0: no change yet)
    ids = torch.randint(6, tok.vocab_size, (2, 4 + model.num_image_tokens))
    ids[:, 1 : 1 + model.num_image_tokens] = tok.image_token_id
    mask, image = torch.ones_like(ids), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = base(image, ids, mask).logits
        adapted = model(image, ids, mask).logits
        with model.lm.disable_adapter():
            disabled = model(image, ids, mask).logits
    assert torch.equal(disabled, plain)
    assert not torch.allclose(adapted, plain, atol=1e-3)
    task.merge_lora()
    assert not any("lora_" in n for n in task.model.state_dict())
    with torch.no_grad():
        merged = task.model(image, ids, mask).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)


def test_qlora_needs_cuda_and_says_so(tok) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="qlora needs a CUDA GPU"):
        tiny_task(tok, "mlp", "instruct", lora_r=4, qlora=True)


# ----------------------------------------------------------------------------------- hand-over
def test_later_stages_start_from_earlier_checkpoints(tok, tmp_path) -> None:
    from mm_lightning.tasks.clip import CLIPTask

    lm_stage = tiny_task(tok, "mlp", "lm")
    lm_ckpt = tmp_path / "lm.ckpt"
    torch.save({"state_dict": lm_stage.state_dict()}, lm_ckpt)
    clip = CLIPTask(image_backbone="vit_tiny_patch16_224", image_backbone_kwargs=TINY_VISION, vocab_size=64,
                    context_length=8, text_width=32, text_layers=1, text_heads=2)
    clip_ckpt = tmp_path / "clip.ckpt"
    torch.save({"state_dict": clip.state_dict()}, clip_ckpt)
    torch.manual_seed(1)
    task = VisionLanguageTask(tok, stage="instruct", vision_kwargs=TINY_VISION, lm=lm_stage.hparams["lm"],
                              connector_kwargs={}, lm_init=str(lm_ckpt), vision_init=str(clip_ckpt), lora_r=4)
    task.setup("fit")
    peft_lm = task.model.lm.get_base_model()
    for name, p in lm_stage.model.lm.named_parameters():  # under peft's wrapping (base_layer) the same weights
        wrapped = peft_lm.get_parameter(re.sub(r"([qkvo]_proj)\.", r"\1.base_layer.", name))
        assert torch.equal(wrapped, p), name
    for name, p in clip.model.image_encoder.state_dict().items():
        assert torch.equal(task.model.vision.model.state_dict()[name], p), name  # the timm model the tower wraps
    assert not torch.equal(task.model.connector.fc1.weight, lm_stage.model.connector.fc1.weight)  # lm_init: LM only
    task_ckpt = tmp_path / "instruct.ckpt"
    torch.save({"state_dict": task.state_dict()}, task_ckpt)
    plain = tiny_task(tok, "mlp", "instruct", init=str(task_ckpt))
    with pytest.raises(ValueError, match="LoRA adapters"):
        plain.setup("fit")


def test_init_from_another_model_names_the_mismatch(tok, tmp_path) -> None:
    other = tiny_task(tok, "mlp", "lm", lm={**TINY_LM, "hidden_size": 48})
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": other.state_dict()}, path)
    task = tiny_task(tok, "mlp", "instruct", lm_init=str(path))
    with pytest.raises(ValueError, match=r"model.lm_init .*other shape.*lm.model.embed_tokens.weight"):
        task.setup("fit")


# ------------------------------------------------------------------------------------------ resume
class StopAt(L.Callback):
    """Interrupts a run after ``step`` optimizer steps (as a preemption would), keeping its schedule."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def test_a_resumed_run_ends_with_the_same_weights(tok, shards, tmp_path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(root: Path, ckpt: str | None = None, stop: int | None = None):
        L.seed_everything(0)
        task = tiny_task(tok, "qformer", "instruct", warmup_steps=2)
        callbacks = []
        if stop:  # a mid-epoch checkpoint (as --checkpoint_every_n_steps writes), then the run dies
            callbacks = [ModelCheckpoint(dirpath=root, filename="mid", every_n_train_steps=stop), StopAt(stop)]
        fit = trainer(root, 6, callbacks, enable_checkpointing=bool(stop))
        fit.fit(task, datamodule=datamodule(tok, shards, "instruct", task.num_image_tokens), ckpt_path=ckpt)
        return task, fit

    straight, _ = run(tmp_path / "a")
    interrupted, fit = run(tmp_path / "b", stop=3)
    assert fit.global_step == 3
    half = tmp_path / "b" / "mid.ckpt"
    ckpt = torch.load(half, weights_only=True)
    assert "tokenizer" not in ckpt["hyper_parameters"]  # the object is not saved, only where it came from
    assert ckpt["hyper_parameters"]["tokenizer_path"] == tok.path
    resumed, fit = run(tmp_path / "c", ckpt=str(half))
    assert fit.global_step == 6
    for (name, p), q, r in zip(straight.named_parameters(), resumed.parameters(), interrupted.parameters()):
        assert torch.equal(p, q), name
    assert not all(torch.equal(p, r) for p, r in zip(straight.parameters(), interrupted.parameters()))


def test_from_checkpoint_rebuilds_the_task(tok, tmp_path) -> None:
    task = tiny_task(tok, "resampler", "instruct")
    path = tmp_path / "t.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}, path)
    again = VisionLanguageTask.from_checkpoint(str(path), tok)
    for (name, p), q in zip(task.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), name
