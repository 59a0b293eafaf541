"""Policy optimisation of the multimodal LLM against a reward (RLHF): GRPO / RLOO, as TRL's trainers.

Each training step takes a batch of prompts (:class:`~mm_lightning.data.preferences.PreferencePipeline`
batches: the image, the left-padded prompt, and the chosen answer as the reference) and:

1. **samples** ``num_generations`` (k) answers per prompt from the policy (temperature, ``top_k``,
   ``max_new_tokens``) in eval mode under ``torch.no_grad`` (KV-cached generation; the ``<image>``
   token is never sampled);
2. **scores** them: ``reward: model`` with a reward model of :mod:`mm_lightning.tasks.reward`
   (``reward_model: CKPT``, frozen, scored at the completion's last token, plus the completion's
   log-probability under its LM when it has ``logprob_weight``), or ``reward: exact_match``,
   a rule reward (1 when the answer matches the reference answer after VQA normalisation, else 0);
   with ``missing_eos_penalty`` p, a sample that did not end within ``max_new_tokens`` scores ``r - p``;
3. turns rewards into **group-relative advantages** (:func:`~mm_lightning.losses.preference.group_advantages`:
   ``grpo`` standardised within each prompt's group, or ``rloo`` leave-one-out);
4. minimises the **clipped policy-ratio loss with a KL penalty** to the frozen reference (the starting
   model; :func:`~mm_lightning.losses.preference.policy_gradient_loss`), over the completion tokens only.

With ``num_iterations`` mu > 1 a sampled batch is reused for mu optimizer steps (the ratio to the
sampling policy then moves and is clipped); the prompt batches of the steps in between are not used.

Logged at ``train/``: ``loss``, ``reward_mean`` / ``reward_std`` (over the samples),
``kl`` (mean per-token k3 KL to the reference), ``entropy`` (of the policy's next-token
distributions over the completions), ``completion_length`` (mean sampled tokens, end of turn
included), ``clip_fraction``, ``truncated_fraction`` (samples that hit ``max_new_tokens``) and
``zero_std_fraction`` (groups whose samples all scored the same). At ``val/`` and ``test/`` the
same sampling scores ``reward_mean`` (``eval_rollouts``); with the VQA callbacks the greedy answers of
the policy and the reference are scored by exact match.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from mm_lightning.checkpoint import load_checkpoint
from mm_lightning.data.tokenizer import Tokenizer
from mm_lightning.losses.preference import (
    IGNORE_INDEX,
    AdvantageKind,
    completion_logprobs,
    group_advantages,
    policy_gradient_loss,
    token_entropy,
)
from mm_lightning.tasks.alignment import AlignmentTask, ReferenceKind, freeze

RewardKind = Literal["model", "exact_match"]


@dataclass
class Rollout:
    """``k`` sampled completions per prompt, as model inputs, with their rewards (``N = B k`` rows)."""

    image: torch.Tensor | None
    input_ids: torch.Tensor  # (N, P + T): left-padded prompt, then the completion, right-padded
    attention_mask: torch.Tensor
    labels: torch.Tensor  # the completion tokens (end of turn included), -100 elsewhere
    rewards: torch.Tensor  # (N,)
    advantages: torch.Tensor  # (N,)
    reference_logps: torch.Tensor | None  # (N, P + T - 1) per token
    old_logps: torch.Tensor | None  # (N, P + T - 1) per token, for num_iterations > 1
    truncated: torch.Tensor  # (N,) bool: no end of turn within max_new_tokens
    completions: list[str]


def completion_mask(new_tokens: torch.Tensor, end_of_turn_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask ``(N, T)`` of each generated row up to and including its first end of turn, and which rows have none."""
    is_end = new_tokens == end_of_turn_id
    has_end = is_end.any(dim=1)
    first = torch.where(has_end, is_end.int().argmax(dim=1), torch.full_like(has_end, new_tokens.shape[1] - 1, dtype=torch.long))
    positions = torch.arange(new_tokens.shape[1], device=new_tokens.device)
    return positions[None] <= first[:, None], ~has_end


class PolicyOptimizationTask(AlignmentTask):
    """GRPO / RLOO policy optimisation against a reward model or a rule reward (see the module docstring).

    Args:
        tokenizer: the conversation tokenizer object (configured once as ``tokenizer:``); not saved.
        reward: ``model`` (a trained reward model, ``reward_model``) or ``exact_match`` (rule reward).
        reward_model: checkpoint of :class:`~mm_lightning.tasks.reward.RewardTask` (``reward: model``).
        num_generations: samples per prompt (the group size k, >= 2).
        temperature: sampling temperature.
        top_k: sample among the ``top_k`` most likely tokens (0: all).
        advantage: ``grpo`` (group-standardised) or ``rloo`` (leave-one-out baseline).
        scale_advantages: divide GRPO's advantages by the group's standard deviation (off: Dr. GRPO).
        clip_eps: the ratio's lower clip ``1 - eps`` (and upper ``1 + eps``).
        clip_eps_high: the upper clip ``1 + eps_high`` when given (DAPO's clip-higher).
        kl_coef: weight of the KL penalty to the reference (TRL's ``beta``).
        missing_eos_penalty: subtracted from the reward of a sample with no end of turn within
            ``max_new_tokens`` (TRL's ``missing_eos_penalty``; ``None``: none). A reward model has only seen
            finished answers, so an unfinished one is outside what it was trained to judge.
        num_iterations: optimizer steps per sampled batch (mu; TRL's ``num_iterations``).
        loss_normalization: ``sequence`` (mean over each answer's tokens, then answers: GRPO) or ``token``.
        eval_rollouts: sample and score at validation / test too (``val/reward_mean``).
        reference: ``copy``, ``adapters`` (with LoRA) or ``auto`` (see :mod:`mm_lightning.tasks.alignment`).
        monitor: metric that picks the best checkpoint (default ``val/reward_mean``; with the VQA
            callback ``val/vqa_exact_match``).
        **kwargs: the arguments of :class:`~mm_lightning.tasks.vlm.VisionLanguageTask` (``init``,
            ``max_new_tokens``, connector, LM, LoRA, learning rates, ...).
    """

    def __init__(
        self,
        tokenizer: Tokenizer | None = None,
        reward: RewardKind = "model",
        reward_model: str | None = None,
        num_generations: int = 4,
        temperature: float = 1.0,
        top_k: int = 0,
        advantage: AdvantageKind = "grpo",
        scale_advantages: bool = True,
        clip_eps: float = 0.2,
        clip_eps_high: float | None = None,
        kl_coef: float = 0.04,
        missing_eos_penalty: float | None = None,
        num_iterations: int = 1,
        loss_normalization: Literal["sequence", "token"] = "sequence",
        eval_rollouts: bool = True,
        reference: ReferenceKind = "auto",
        monitor: str | None = None,
        **kwargs: Any,
    ) -> None:
        if reward not in ("model", "exact_match"):
            raise ValueError(f"model.reward must be model or exact_match, got {reward!r}")
        if reward == "model" and not reward_model:
            raise ValueError("model.reward model needs model.reward_model (a checkpoint of the reward task)")
        if num_generations < 2:
            raise ValueError(f"model.num_generations must be >= 2 (advantages are relative within a group), got {num_generations}")
        if temperature <= 0:
            raise ValueError(f"model.temperature must be > 0, got {temperature}")
        if num_iterations < 1:
            raise ValueError(f"model.num_iterations must be >= 1, got {num_iterations}")
        if missing_eos_penalty is not None and missing_eos_penalty < 0:
            raise ValueError(f"model.missing_eos_penalty must be >= 0, got {missing_eos_penalty}")
        if kl_coef < 0:
            raise ValueError(f"model.kl_coef must be >= 0, got {kl_coef}")
        super().__init__(tokenizer, reference=reference, monitor=monitor or "val/reward_mean", **kwargs)
        self.reward_kind, self.reward_model_path = reward, reward_model
        self.num_generations, self.temperature, self.top_k = num_generations, temperature, top_k
        self.advantage, self.scale_advantages = advantage, scale_advantages
        self.clip_eps, self.clip_eps_high, self.kl_coef = clip_eps, clip_eps_high, kl_coef
        self.num_iterations, self.loss_normalization, self.eval_rollouts = num_iterations, loss_normalization, eval_rollouts
        self.missing_eos_penalty = missing_eos_penalty
        self._reward_task: Any = None  # the frozen reward model, kept out of the module tree like the reference
        self._buffer: Rollout | None = None
        self._buffer_uses = 0

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "_reward_task":
            object.__setattr__(self, name, value)
            return
        super().__setattr__(name, value)

    # ------------------------------------------------------------------------- rewards
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.reward_kind == "model" and self._reward_task is None:
            self._reward_task = self.load_reward_model(self.reward_model_path)

    def load_reward_model(self, path: str) -> Any:
        """The frozen reward model of a :class:`~mm_lightning.tasks.reward.RewardTask` checkpoint (weights only)."""
        from mm_lightning.tasks.reward import RewardTask

        hparams = load_checkpoint(path, "model.reward_model").get("hyper_parameters") or {}
        if "head_init_std" not in hparams:
            raise ValueError(f"model.reward_model {path!r} is not a checkpoint of the reward task (RewardTask)")
        task = RewardTask.from_checkpoint(path, self.tokenizer)
        if task.model.num_image_tokens != self.model.num_image_tokens:
            raise ValueError(f"model.reward_model {path!r} expects {task.model.num_image_tokens} <image> tokens per image, "
                             f"the policy {self.model.num_image_tokens}: use a reward model with the policy's connector")
        freeze(task)
        task.model.vision_frozen = True
        return task

    @property
    def reward_task(self) -> Any:
        """The frozen reward model, on the policy's device and in its dtype."""
        policy = next(self.model.parameters())
        ref = next(self._reward_task.parameters())
        if ref.device != policy.device or ref.dtype != policy.dtype:
            self._reward_task.to(device=policy.device, dtype=policy.dtype)
        return self._reward_task

    @torch.no_grad()
    def score(self, rollout_inputs: dict[str, Any], completions: list[str], references: list[str]) -> torch.Tensor:
        """Rewards ``(N,)`` of the sampled completions."""
        if self.reward_kind == "exact_match":
            from mm_lightning.data.vqa import exact_match

            values = [float(exact_match(c, r)) for c, r in zip(completions, references)]
            return torch.tensor(values, device=rollout_inputs["input_ids"].device)
        task = self.reward_task
        return task.rewards(rollout_inputs["image"], rollout_inputs["input_ids"], rollout_inputs["attention_mask"],
                            rollout_inputs["labels"]).float()

    # ------------------------------------------------------------------------- sampling
    def token_logprobs(self, model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token log-probs of the completion tokens under ``model`` at the sampling temperature (as TRL),
        their mask, and the scaled logits."""
        logits = model(inputs["image"], inputs["input_ids"], inputs["attention_mask"]).logits / self.temperature
        logps, mask = completion_logprobs(logits, inputs["labels"])
        return logps, mask, logits

    @torch.no_grad()
    def rollout(self, batch: dict[str, Any], training: bool = True) -> Rollout:
        """Sample, score and compare ``k`` answers per prompt of ``batch`` (see the module docstring); for
        ``training`` also the reference's (and with ``num_iterations > 1`` the sampling policy's) log-probs."""
        k = self.num_generations
        image = batch.get("image")
        image = image.repeat_interleave(k, dim=0) if image is not None else None
        prompt_ids = batch["prompt_input_ids"].repeat_interleave(k, dim=0)
        prompt_mask = batch["prompt_attention_mask"].repeat_interleave(k, dim=0)
        tok = self.tokenizer
        was_training = self.training
        self.eval()
        try:
            new = self.model.generate(
                image, prompt_ids, prompt_mask, max_new_tokens=self.max_new_tokens, eos_token_id=tok.end_of_turn_id,
                pad_token_id=tok.pad_token_id, do_sample=True, temperature=self.temperature, top_k=self.top_k,
                top_p=1.0, suppress_tokens=[tok.image_token_id],
            )
        finally:
            self.train(was_training)
        keep, truncated = completion_mask(new, tok.end_of_turn_id)
        new = new.masked_fill(~keep, tok.pad_token_id)
        inputs = {
            "image": image,
            "input_ids": torch.cat([prompt_ids, new], dim=1),
            "attention_mask": torch.cat([prompt_mask, keep.long()], dim=1),
            "labels": torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), new.masked_fill(~keep, IGNORE_INDEX)], dim=1),
        }
        completions = [tok.decode([t for t in row if t != tok.end_of_turn_id]) for row in new.tolist()]
        references = [a for a in batch.get("answers", [""] * len(batch["prompt_input_ids"])) for _ in range(k)]
        rewards = self.score(inputs, completions, references)
        if self.missing_eos_penalty:
            rewards = rewards - self.missing_eos_penalty * truncated.to(rewards.dtype)
        advantages = group_advantages(rewards, k, self.advantage, self.scale_advantages)
        reference_logps = old_logps = None
        if training and self.kl_coef > 0:
            with self.as_reference() as ref:
                reference_logps = self.token_logprobs(ref, inputs)[0]
        if training and self.num_iterations > 1:
            old_logps = self.token_logprobs(self.model, inputs)[0]
        return Rollout(image=image, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       labels=inputs["labels"], rewards=rewards, advantages=advantages, reference_logps=reference_logps,
                       old_logps=old_logps, truncated=truncated, completions=completions)

    # ------------------------------------------------------------------------- training
    def policy_step(self, rollout: Rollout, split: str, n_prompts: int) -> torch.Tensor:
        """The policy-gradient loss of a rollout; logs the metrics under ``split``."""
        inputs = {"image": rollout.image, "input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask,
                  "labels": rollout.labels}
        logps, mask, logits = self.token_logprobs(self.model, inputs)
        old = rollout.old_logps if rollout.old_logps is not None else logps.detach()
        loss, stats = policy_gradient_loss(
            logps, old, rollout.reference_logps, rollout.advantages, mask, self.clip_eps, self.clip_eps_high,
            self.kl_coef, self.loss_normalization,
        )
        self.log_rollout(rollout, split, n_prompts, loss=loss.detach(), entropy=token_entropy(logits.detach(), rollout.labels),
                         **stats)
        return loss

    def log_rollout(self, rollout: Rollout, split: str, n_prompts: int, **extra: torch.Tensor) -> None:
        groups = rollout.rewards.view(-1, self.num_generations)
        metrics = {
            "reward_mean": rollout.rewards.mean(),
            "reward_std": rollout.rewards.std() if rollout.rewards.numel() > 1 else rollout.rewards.new_zeros(()),
            "completion_length": (rollout.labels[:, 1:] != IGNORE_INDEX).float().sum(1).mean(),
            "truncated_fraction": rollout.truncated.float().mean(),
            "zero_std_fraction": (groups.std(dim=1) < 1e-6).float().mean(),
            **extra,
        }
        for name, value in metrics.items():
            self.log(f"{split}/{name}", value.float(), batch_size=n_prompts, sync_dist=split != "train",
                     prog_bar=name in ("reward_mean", "kl"))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if self._buffer is None or self._buffer_uses >= self.num_iterations:
            self._buffer, self._buffer_uses = self.rollout(batch), 0
        self._buffer_uses += 1
        return self.policy_step(self._buffer, "train", batch["prompt_input_ids"].shape[0])

    def _eval_step(self, batch: dict[str, Any], split: str) -> None:
        if self.eval_rollouts:
            rollout = self.rollout(batch, training=False)
            self.log_rollout(rollout, split, batch["prompt_input_ids"].shape[0])
