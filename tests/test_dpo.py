"""The DPO task: ln 2 at step 0, a frozen reference (bit-identical, no gradient, not in the optimizer or the
checkpoint), the LoRA reference equals the base model, completion-only log-probs, precomputed reference log-probs,
and a short run that raises the held-out preference accuracy well above chance."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mm_lightning.callbacks.reference_vqa import ReferenceVQAEvaluation
from mm_lightning.callbacks.vqa import VQAEvaluation
from mm_lightning.data.preferences import concatenated
from mm_lightning.tasks.dpo import DPOTask
from mm_lightning.tasks.vlm import VisionLanguageTask
from tests.alignment_fixtures import colour_data, colour_tokenizer, first_batch, tiny, trainer


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    return colour_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("colours")


def data(tok, data_dir: Path, **kwargs):
    return colour_data(tok, data_dir, num_image_tokens=16, **kwargs)


def test_at_step_0_the_loss_is_ln2_and_the_rewards_are_0(tok, data_dir: Path, tmp_path: Path) -> None:
    task = tiny(DPOTask, tok)
    metrics = trainer(tmp_path, 1).validate(task, datamodule=data(tok, data_dir), verbose=False)[0]
    assert metrics["val/loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert metrics["val/rewards_chosen"] == 0.0 and metrics["val/rewards_rejected"] == 0.0
    assert metrics["val/rewards_margin"] == 0.0 and metrics["val/rewards_accuracy"] == 0.0


def test_the_reference_stays_frozen_and_out_of_the_optimizer_and_checkpoints(tok, data_dir: Path, tmp_path: Path) -> None:
    task = tiny(DPOTask, tok, lr=1e-2)
    start = {k: v.clone() for k, v in task.model.state_dict().items()}
    fit = trainer(tmp_path, 4, limit_val_batches=0, enable_checkpointing=True)
    fit.fit(task, datamodule=data(tok, data_dir))
    reference = task._reference
    assert reference is not None and not reference.training
    assert all(torch.equal(start[k], v) for k, v in reference.state_dict().items())  # bit-identical
    assert all(p.grad is None and not p.requires_grad for p in reference.parameters())
    assert any(not torch.equal(start[k], v) for k, v in task.model.state_dict().items())  # the policy did train
    in_optimizer = {id(p) for group in fit.optimizers[0].param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in reference.parameters()}
    assert not any(p is q for p in task.parameters() for q in reference.parameters())
    ckpt = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=True)
    assert set(ckpt["state_dict"]) == {f"model.{k}" for k in task.model.state_dict()}  # one model, no reference copy


def test_the_lora_reference_is_the_base_model(tok, data_dir: Path, tmp_path: Path) -> None:
    task = tiny(DPOTask, tok, lora_r=4, lora_alpha=8.0, lr=1e-2)
    assert task.reference_kind == "adapters" and task._reference is None
    trainer(tmp_path, 3, limit_val_batches=0).fit(task, datamodule=data(tok, data_dir))
    assert task._reference is None  # no second copy of the model was built
    base = tiny(VisionLanguageTask, tok)  # the same network without adapters, holding the policy's base weights
    base.load_state_dict({k.replace("lm.base_model.model.", "lm.").replace(".base_layer.", "."): v
                          for k, v in task.state_dict().items() if "lora_" not in k})
    inputs = concatenated(first_batch(data(tok, data_dir)))
    args = (inputs["image"], inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
    base.eval()
    with torch.no_grad():
        expected = base.model.sequence_logprobs(*args)
        policy = task.model.sequence_logprobs(*args)
    task.train()
    reference = task.reference_logprobs(*args)
    assert task.model.lm.training  # the policy is back in training mode after the reference's eval-mode forward
    torch.testing.assert_close(reference, expected, rtol=0, atol=1e-5)
    assert (policy - expected).abs().max() > 1e-3  # the adapters did move the policy


def test_log_probs_count_completion_tokens_only(tok, data_dir: Path) -> None:
    task = tiny(DPOTask, tok).eval()
    batch = first_batch(data(tok, data_dir))
    inputs = concatenated(batch)
    with torch.no_grad():
        logps = task.model.sequence_logprobs(inputs["image"], inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
        logits = task.model(inputs["image"], inputs["input_ids"], inputs["attention_mask"]).logits
    lsm = torch.log_softmax(logits.float(), -1)
    n = len(batch["answers"])
    for row in range(2 * n):
        positions = (inputs["labels"][row] != -100).nonzero().flatten()
        text = batch["answers"][row] if row < n else batch["rejected_answers"][row - n]
        assert positions.numel() == len(tok.encode(text)) + 1  # the completion and its end of turn
        manual = sum(lsm[row, t - 1, inputs["input_ids"][row, t]] for t in positions.tolist())
        assert logps[row].item() == pytest.approx(manual.item(), abs=1e-4)
    # more right padding, and other ids at padded positions, change nothing
    pad = torch.full((inputs["input_ids"].shape[0], 5), 7)
    padded = {"input_ids": torch.cat([inputs["input_ids"], pad], 1),
              "attention_mask": torch.cat([inputs["attention_mask"], torch.zeros_like(pad)], 1),
              "labels": torch.cat([inputs["labels"], torch.full_like(pad, -100)], 1)}
    padded["input_ids"] = padded["input_ids"].masked_fill(padded["attention_mask"] == 0, 9)
    with torch.no_grad():
        again = task.model.sequence_logprobs(inputs["image"], padded["input_ids"], padded["attention_mask"], padded["labels"])
    torch.testing.assert_close(again, logps, rtol=0, atol=1e-5)
    # a prompt token's own probability is not counted: the labels mark no prompt position
    prompt_len = batch["prompt_input_ids"].shape[1]
    assert (inputs["labels"][:, : prompt_len - 1] == -100).all()


def test_precomputed_reference_log_probs_match_the_reference_and_skip_its_forward(tok, data_dir: Path, tmp_path: Path) -> None:
    live = tiny(DPOTask, tok, lr=1e-2)
    trainer(tmp_path / "a", 3, limit_val_batches=2).fit(live, datamodule=data(tok, data_dir))
    table = tiny(DPOTask, tok, lr=1e-2, precompute_reference=True)
    fit = trainer(tmp_path / "b", 3, limit_val_batches=2)
    fit.fit(table, datamodule=data(tok, data_dir))
    assert set(table._reference_table) == {"train", "val"} and len(table._reference_table["train"]) == 256
    calls = []
    table._reference_pair = lambda batch: calls.append(1)  # a step must not run the reference now
    metrics = trainer(tmp_path / "d", 1).validate(table, datamodule=data(tok, data_dir), verbose=False)[0]
    assert not calls
    # the same pairs, the same reference: the same losses as computing the reference in every step
    final = trainer(tmp_path / "c", 1).validate(live, datamodule=data(tok, data_dir), verbose=False)[0]
    assert metrics["val/loss"] == pytest.approx(final["val/loss"], abs=1e-5)
    assert metrics["val/rewards_chosen"] == pytest.approx(final["val/rewards_chosen"], abs=1e-5)


def test_reference_answers_are_scored_beside_the_policy(tok, data_dir: Path, tmp_path: Path) -> None:
    task = tiny(DPOTask, tok)
    fit = trainer(tmp_path, 1, callbacks=[VQAEvaluation(), ReferenceVQAEvaluation()])
    metrics = fit.test(task, datamodule=data(tok, data_dir), verbose=False)[0]
    # untrained: policy == reference, so both answer alike (and at chance or below)
    assert metrics["test/reference_vqa_exact_match"] == metrics["test/vqa_exact_match"]
    assert "test/reference_vqa_exact_match/colour" in metrics


def test_options_are_checked(tok) -> None:
    with pytest.raises(ValueError, match="loss_type"):
        tiny(DPOTask, tok, loss_type="kto")
    with pytest.raises(ValueError, match="reference adapters"):
        tiny(DPOTask, tok, reference="adapters")
    with pytest.raises(ValueError, match="only the LoRA adapters may train"):
        tiny(DPOTask, tok, lora_r=4, train_connector=True, reference="adapters")
    with pytest.raises(ValueError, match="stage"):
        tiny(DPOTask, tok, stage="align")


@pytest.mark.slow
def test_a_short_dpo_run_learns_the_held_out_preferences(tok, data_dir: Path, tmp_path: Path) -> None:
    """Held-out pairs: 128. Which answer is right depends on the image alone (the rejected colour is drawn among
    the other three), so a policy that learned nothing from the image orders a pair right with probability 1/2 at
    best: its accuracy on 128 pairs has standard deviation sqrt(1/4 / 128) = 0.044, and > 0.5 + 4 sigma = 0.68
    happens by chance with probability < 4e-5. (At step 0 every margin is exactly 0: accuracy 0.)"""
    task = tiny(DPOTask, tok, lr=3e-3, beta=0.5, warmup_steps=5)
    fit = trainer(tmp_path, 40, limit_val_batches=0)
    fit.fit(task, datamodule=data(tok, data_dir))
    metrics = trainer(tmp_path, 1).validate(task, datamodule=data(tok, data_dir), verbose=False)[0]
    assert metrics["val/rewards_accuracy"] > 0.68, metrics
    assert metrics["val/rewards_margin"] > 0
