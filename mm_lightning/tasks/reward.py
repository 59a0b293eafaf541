"""A reward model: the multimodal LLM with a scalar head, trained on preference pairs (TRL's RewardTrainer).

The network is the MLLM of :class:`~mm_lightning.tasks.vlm.VisionLanguageTask` (same building, freezing,
LoRA and initialisation from an instruction-tuned checkpoint: this task subclasses it) plus a
:class:`~mm_lightning.models.reward.ScalarHead` on the LM's last hidden state, pooled at each row's
last attended token by ``attention_mask`` (the end of turn closing the completion; right padding is
never pooled). With ``logprob_weight`` w the reward adds ``w * sum_t log p(y_t | x, y_<t)``, the
completion's log-probability under the reward model's own LM (trained with it): the LM's next-token
computation at every answer position joins the comparison, which a small LM's last token alone cannot
make (shapes, 2-layer LM: val/reward_accuracy 0.750 with the head alone, 0.949 with w = 1, 0.962 adding
``sft_weight`` 1; README).
Batches come from :class:`~mm_lightning.data.preferences.PreferencePipeline`: the
chosen and rejected rows run in ONE forward; the loss is the Bradley-Terry loss
:func:`~mm_lightning.losses.preference.bradley_terry_loss` (optional ``margin`` and
``center_coefficient``).

Logged at ``train/``, ``val/`` and ``test/``: ``loss``, ``reward_accuracy`` (share of pairs whose chosen
reward is higher), ``reward_margin`` (mean chosen - rejected reward), ``rewards_chosen`` and
``rewards_rejected``. The best checkpoint is picked by ``val/reward_accuracy``; the policy-optimisation
task (:mod:`mm_lightning.tasks.rlhf`) scores its samples with it (``reward_model: CKPT``).
"""

from __future__ import annotations

from typing import Any

import torch

from mm_lightning.data.preferences import concatenated
from mm_lightning.data.tokenizer import Tokenizer
from mm_lightning.losses.preference import bradley_terry_loss, completion_logprobs
from mm_lightning.models.reward import ScalarHead
from mm_lightning.models.vlm import lm_hidden_size
from mm_lightning.tasks.base import param_groups
from mm_lightning.tasks.vlm import VisionLanguageTask


class RewardTask(VisionLanguageTask):
    """The MLLM with a scalar reward head, trained with the Bradley-Terry loss (see the module docstring).

    Args:
        tokenizer: the conversation tokenizer object (configured once as ``tokenizer:``); not saved.
        margin: a margin the chosen reward must exceed the rejected one by (``None``: none).
        center_coefficient: weight of ``(r_c + r_r)^2``, which keeps rewards near 0 (``None``: none).
        head_lr: learning rate of the head (default ``lr``).
        head_init_std: standard deviation of the head's initial weights (0: every reward starts at 0).
        logprob_weight: ``w`` of an added ``w * sum_t log p(y_t | x, y_<t)``, the completion's summed
            log-probability under the reward model's own LM (None: the head alone, TRL's reward model).
        sft_weight: weight of the chosen completions' mean token NLL added to the loss (0: none), which
            keeps the reward model's LM a model of right answers, so that answers unlike any in the pairs
            (a policy's drift) score low (the text-generation regulariser of GRM, Yang et al. 2024).
        monitor: metric that picks the best checkpoint (default ``val/reward_accuracy``).
        **kwargs: the arguments of :class:`~mm_lightning.tasks.vlm.VisionLanguageTask` (``init`` the
            instruction-tuned checkpoint, connector, LM, LoRA, learning rates, ...); ``stage`` is ``instruct``.
    """

    def __init__(
        self,
        tokenizer: Tokenizer | None = None,
        margin: float | None = None,
        center_coefficient: float | None = None,
        head_lr: float | None = None,
        head_init_std: float = 0.0,
        logprob_weight: float | None = None,
        sft_weight: float = 0.0,
        monitor: str | None = None,
        **kwargs: Any,
    ) -> None:
        stage = kwargs.pop("stage", "instruct")
        if stage != "instruct":
            raise ValueError(f"model.stage: the reward model trains on the instruction-tuned model (stage instruct), got {stage!r}")
        super().__init__(tokenizer, stage="instruct", monitor=monitor or "val/reward_accuracy", **kwargs)
        self.margin, self.center_coefficient, self.head_lr = margin, center_coefficient, head_lr
        if logprob_weight is not None and logprob_weight <= 0:
            raise ValueError(f"model.logprob_weight must be > 0 (or null: the head alone), got {logprob_weight}")
        if sft_weight < 0:
            raise ValueError(f"model.sft_weight must be >= 0, got {sft_weight}")
        self.logprob_weight, self.sft_weight = logprob_weight, sft_weight
        self.value_head = ScalarHead(lm_hidden_size(self.model.lm), head_init_std)

    # ------------------------------------------------------------------------- rewards
    def rewards(self, image: torch.Tensor | None, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """One reward per row ``(B,)``: the head on the last hidden state at the row's last attended token
        (plus ``logprob_weight`` times the summed log-probability of the tokens ``labels`` marks)."""
        return self.rewards_and_logprobs(image, input_ids, attention_mask, labels)[0]

    def rewards_and_logprobs(self, image: torch.Tensor | None, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                             labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rewards ``(B,)`` and, given ``labels``, the completions' summed log-probabilities ``(B,)``."""
        if self.logprob_weight and labels is None:
            raise ValueError("a reward model with logprob_weight needs the completion's labels to score it")
        out = self.model(image, input_ids, attention_mask, output_hidden_states=True)
        reward = self.value_head(out.hidden_states[-1], attention_mask).float()
        logps = completion_logprobs(out.logits, labels)[0].sum(dim=-1) if labels is not None else None
        if self.logprob_weight:
            reward = reward + self.logprob_weight * logps
        return reward, logps

    def reward_step(self, batch: dict[str, Any], split: str) -> torch.Tensor:
        inputs = concatenated(batch)
        n = batch["chosen_input_ids"].shape[0]
        rewards, logps = self.rewards_and_logprobs(inputs["image"], inputs["input_ids"], inputs["attention_mask"],
                                                   inputs["labels"])
        chosen, rejected = rewards[:n], rewards[n:]
        loss = bradley_terry_loss(chosen, rejected, self.margin, self.center_coefficient).mean()
        if self.sft_weight:
            tokens = (batch["chosen_labels"][:, 1:] != -100).sum().clamp(min=1)
            loss = loss + self.sft_weight * (-logps[:n].sum() / tokens)
        metrics = {
            "loss": loss,
            "reward_accuracy": (chosen > rejected).float().mean(),
            "reward_margin": (chosen - rejected).detach().mean(),
            "rewards_chosen": chosen.detach().mean(),
            "rewards_rejected": rejected.detach().mean(),
        }
        for name, value in metrics.items():
            self.log(f"{split}/{name}", value, batch_size=n, sync_dist=split != "train",
                     prog_bar=name in ("loss", "reward_accuracy"))
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self.reward_step(batch, "train")

    def _eval_step(self, batch: dict[str, Any], split: str) -> None:
        self.reward_step(batch, split)

    # ---------------------------------------------------------------------- parameters
    def optimizer_param_groups(self) -> list[dict[str, Any]]:
        """The MLLM's groups per part, plus the head's at ``head_lr``."""
        groups = super().optimizer_param_groups()
        lr = self.head_lr or self.lr
        for group, suffix in zip(param_groups(self.value_head, self.weight_decay), ("", "/no_decay")):
            if group["params"]:
                groups.append({**group, "lr": lr, "name": f"head{suffix}"})
        return groups

    def optimized_module(self) -> torch.nn.Module:
        return self
