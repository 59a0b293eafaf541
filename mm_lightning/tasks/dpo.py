"""Direct preference optimisation of the multimodal LLM (DPO and its variants), as TRL's DPOTrainer.

Batches come from :class:`~mm_lightning.data.preferences.PreferencePipeline` (an image, the prompt,
a chosen and a rejected completion). Each step runs ONE forward of the policy over the ``2B``
concatenated rows (chosen, then rejected; the image repeated) and sums the log-probabilities of the
completion tokens only (:meth:`~mm_lightning.models.vlm.VisionLanguageModel.sequence_logprobs`); the
reference does the same without gradient, or its log-probabilities come from a table computed once
before training (``precompute_reference``: one pass over the training and validation shards; the
reference then leaves the accelerator, and steps skip its forward). The loss is
:func:`~mm_lightning.losses.preference.dpo_loss` (``loss_type`` sigmoid, ipo, ipo_sum, hinge or robust,
with ``label_smoothing``; ipo gets each completion's token count to average its log-ratio over, as
TRL), plus ``sft_weight`` times the chosen completions' token-mean NLL (RPO, TRL's ``rpo_alpha``).

Logged with TRL's meanings, at ``train/`` (every step) and ``val/`` / ``test/`` (epoch means):
``loss``, ``rewards_chosen`` / ``rewards_rejected`` (mean ``beta * (logp - logp_ref)``),
``rewards_accuracy`` (share of pairs whose chosen reward exceeds the rejected one),
``rewards_margin`` (mean chosen - rejected reward), ``logps_chosen`` / ``logps_rejected`` (mean
summed log-probabilities of the policy). With :class:`~mm_lightning.callbacks.vqa.VQAEvaluation`
the held-out prompts are also answered greedily (``val/vqa_exact_match``), and with
:class:`~mm_lightning.callbacks.reference_vqa.ReferenceVQAEvaluation` the reference's answers too
(``test/reference_vqa_exact_match``).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from mm_lightning.data.preferences import concatenated
from mm_lightning.data.tokenizer import Tokenizer
from mm_lightning.losses.preference import DPOLossType, completion_lengths, dpo_loss
from mm_lightning.tasks.alignment import AlignmentTask, ReferenceKind


class DPOTask(AlignmentTask):
    """DPO on preference pairs, the policy initialised from an instruction-tuned checkpoint (module docstring).

    Args:
        tokenizer: the conversation tokenizer object (configured once as ``tokenizer:``); not saved.
        beta: the DPO temperature (the strength of the implicit KL penalty to the reference).
        loss_type: ``sigmoid`` (DPO), ``ipo`` (log-ratios averaged over completion tokens, as TRL), ``ipo_sum``
            (IPO on summed log-ratios; no TRL counterpart), ``hinge`` or ``robust``; papers and TRL behaviour
            in :func:`~mm_lightning.losses.preference.dpo_loss`.
        label_smoothing: the assumed rate of flipped labels (conservative DPO, cDPO, with sigmoid, which TRL 1.16
            no longer applies; robust DPO as TRL).
        sft_weight: weight of the chosen completions' NLL added to the loss (0: plain DPO).
        reference: ``copy`` (a frozen second model), ``adapters`` (the LoRA policy with adapters off) or ``auto``.
        precompute_reference: compute the reference log-probabilities of the training and validation pairs
            once before training (keyed by sample key) instead of in every step.
        monitor: metric that picks the best checkpoint (default ``val/rewards_accuracy``; with the VQA
            callback ``val/vqa_exact_match``).
        **kwargs: the arguments of :class:`~mm_lightning.tasks.vlm.VisionLanguageTask` (``init``, connector,
            LM, LoRA, learning rates, ...).
    """

    def __init__(
        self,
        tokenizer: Tokenizer | None = None,
        beta: float = 0.1,
        loss_type: DPOLossType = "sigmoid",
        label_smoothing: float = 0.0,
        sft_weight: float = 0.0,
        reference: ReferenceKind = "auto",
        precompute_reference: bool = False,
        monitor: str | None = None,
        **kwargs: Any,
    ) -> None:
        dpo_loss(*torch.zeros(4, 1), beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                 chosen_lengths=torch.ones(1), rejected_lengths=torch.ones(1))  # checks the options
        if sft_weight < 0:
            raise ValueError(f"model.sft_weight must be >= 0, got {sft_weight}")
        super().__init__(tokenizer, reference=reference, monitor=monitor or "val/rewards_accuracy", **kwargs)
        self.beta, self.loss_type, self.label_smoothing, self.sft_weight = beta, loss_type, label_smoothing, sft_weight
        self.precompute_reference = precompute_reference
        self._reference_table: dict[str, dict[str, tuple[float, float]]] = {}
        self.reference_seconds = 0.0  # wall time spent computing reference log-probs (the benchmark reads it)

    # ------------------------------------------------------------------------ reference
    def on_fit_start(self) -> None:
        if self.precompute_reference and not self._reference_table:
            self.fill_reference_table()

    def fill_reference_table(self) -> None:
        """One pass over the training and validation shards: the reference's log-probs of every pair, by key."""
        from mm_lightning.data.datamodule import WebDataModule

        data = self.trainer.datamodule
        start = time.perf_counter()
        for split in ("train", "val"):
            spec = data.specs.get(split)
            if spec is None:
                continue
            one_pass = WebDataModule(val=spec, pipeline=data.pipeline, eval_batch_size=data.eval_batch_size,
                                     num_workers=data.num_workers, strict=data.strict)
            one_pass.setup("validate")
            table = self._reference_table.setdefault(split, {})
            for batch in one_pass.val_dataloader():
                batch.pop("skipped", None)
                batch = self.transfer_batch_to_device(batch, self.device, 0)
                with self.trainer.precision_plugin.forward_context():  # as in a step (autocast under mixed precision)
                    chosen, rejected = self._reference_pair(batch)
                for key, c, r in zip(batch["keys"], chosen.tolist(), rejected.tolist()):
                    table[key] = (c, r)
        took = time.perf_counter() - start
        self.reference_seconds += took
        sizes = {k: len(v) for k, v in self._reference_table.items()}
        rank_zero_info(f"reference log-probs precomputed for {sizes} pairs in {took:.1f} s")
        if self.reference_kind == "copy":  # no longer needed on the accelerator until test-time answers
            self._reference.to("cpu")

    def _reference_pair(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = concatenated(batch)
        logps = self.reference_logprobs(inputs["image"], inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
        n = batch["chosen_input_ids"].shape[0]
        return logps[:n], logps[n:]

    def reference_pair_logprobs(self, batch: dict[str, Any], split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's (chosen, rejected) log-probs ``(B,)`` of a batch: from the table, else computed."""
        table = self._reference_table.get(split)
        if table is not None:
            missing = [k for k in batch["keys"] if k not in table]
            if not missing:
                values = torch.tensor([table[k] for k in batch["keys"]], dtype=torch.float32, device=self.device)
                return values[:, 0], values[:, 1]
            if split == "train":
                raise KeyError(f"precompute_reference: no reference log-probs for training pair(s) {missing[:3]} "
                               "(were the shards changed after the pass?)")
        start = time.perf_counter()
        try:
            return self._reference_pair(batch)
        finally:
            self.reference_seconds += time.perf_counter() - start

    # ------------------------------------------------------------------------- training
    def dpo_step(self, batch: dict[str, Any], split: str) -> torch.Tensor:
        """Loss of one batch; logs TRL's metrics under ``split``."""
        inputs = concatenated(batch)
        n = batch["chosen_input_ids"].shape[0]
        logps = self.model.sequence_logprobs(inputs["image"], inputs["input_ids"], inputs["attention_mask"],
                                             inputs["labels"])
        chosen, rejected = logps[:n], logps[n:]
        ref_chosen, ref_rejected = self.reference_pair_logprobs(batch, split)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen, rejected, ref_chosen, ref_rejected, self.beta, self.loss_type, self.label_smoothing,
            chosen_lengths=completion_lengths(batch["chosen_labels"]),
            rejected_lengths=completion_lengths(batch["rejected_labels"]),
        )
        loss = losses.mean()
        if self.sft_weight:
            tokens = (batch["chosen_labels"][:, 1:] != -100).sum().clamp(min=1)
            loss = loss + self.sft_weight * (-chosen.sum() / tokens)
        metrics = {
            "loss": loss,
            "rewards_chosen": chosen_rewards.mean(),
            "rewards_rejected": rejected_rewards.mean(),
            "rewards_accuracy": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards_margin": (chosen_rewards - rejected_rewards).mean(),
            "logps_chosen": chosen.detach().mean(),
            "logps_rejected": rejected.detach().mean(),
        }
        evaluating = split != "train"
        for name, value in metrics.items():
            self.log(f"{split}/{name}", value.float(), batch_size=n, sync_dist=evaluating,
                     prog_bar=name in ("loss", "rewards_accuracy"))
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self.dpo_step(batch, "train")

    def _eval_step(self, batch: dict[str, Any], split: str) -> None:
        self.dpo_step(batch, split)
