"""What the alignment tasks share (DPO, policy optimisation): a policy and its frozen reference.

The policy is the multimodal LLM of :class:`~mm_lightning.tasks.vlm.VisionLanguageTask` (same
building, freezing, LoRA and checkpoint-initialisation code: these tasks subclass it), initialised
from an instruction-tuned checkpoint (``init``). The reference is the starting model, frozen:

- ``reference: copy`` (the default without LoRA): a second model built from the same arguments and
  loaded with the policy's weights at the start of ``fit`` (after ``init``). It is kept OUT of the
  module tree: not in ``parameters()`` (so never in the optimizer), not in ``state_dict()`` (so not
  duplicated into every checkpoint: a resumed run rebuilds it from ``init``), always in ``eval()``
  with ``requires_grad=False`` and run under ``torch.no_grad``. It follows the policy's device and
  dtype (``bf16-true``) when used.
- ``reference: adapters`` (the default with LoRA, TRL's peft convention): the policy itself with its
  LoRA adapters disabled (peft ``disable_adapter()``), in eval mode: no second copy of the weights.
  Only the adapters may then train (the connector and tower stay frozen), else the policy with
  adapters off would not be the starting model.

:meth:`AlignmentTask.reference_answer` answers with the reference, which
:class:`~mm_lightning.callbacks.reference_vqa.ReferenceVQAEvaluation` scores on the same held-out
questions as the policy (``test/reference_vqa_exact_match``).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from mm_lightning.data.tokenizer import Tokenizer
from mm_lightning.models.llava import llava_source
from mm_lightning.models.vlm import VisionLanguageModel
from mm_lightning.tasks.vlm import VisionLanguageTask, load_matching, state_of_task

ReferenceKind = Literal["auto", "copy", "adapters"]
#: init arguments of VisionLanguageTask that must not be read again when the reference is rebuilt
_SOURCES = ("init", "lm_init", "vision_init")


class AlignmentTask(VisionLanguageTask):
    """Base of the alignment tasks: the multimodal LLM as a policy, and a frozen reference (module docstring).

    Args:
        tokenizer: the conversation tokenizer object (configured once as ``tokenizer:``); not saved.
        reference: ``copy``, ``adapters`` (needs ``lora_r > 0``) or ``auto`` (``adapters`` with LoRA, else ``copy``).
        **kwargs: the arguments of :class:`~mm_lightning.tasks.vlm.VisionLanguageTask` (``init`` the
            instruction-tuned checkpoint, connector, LM, LoRA, learning rates, ...); ``stage`` is ``instruct``.
    """

    def __init__(self, tokenizer: Tokenizer | None = None, reference: ReferenceKind = "auto", **kwargs: Any) -> None:
        stage = kwargs.pop("stage", "instruct")
        if stage != "instruct":
            raise ValueError(f"model.stage: {type(self).__name__} trains the instruction-tuned model (stage instruct), "
                             f"got {stage!r}")
        if reference not in ("auto", "copy", "adapters"):
            raise ValueError(f"model.reference must be auto, copy or adapters, got {reference!r}")
        lora = int(kwargs.get("lora_r") or 0) > 0
        if reference == "auto":
            reference = "adapters" if lora else "copy"
        if reference == "adapters":
            if not lora:
                raise ValueError("model.reference adapters is the policy with its LoRA adapters disabled: set model.lora_r > 0")
            if kwargs.get("train_connector") or kwargs.get("train_vision"):
                raise ValueError("model.reference adapters: only the LoRA adapters may train (the policy with adapters "
                                 "off must stay the starting model); set train_connector/train_vision false or use "
                                 "model.reference copy")
            kwargs["train_connector"] = False
        super().__init__(tokenizer, stage="instruct", **kwargs)
        self.reference_kind = reference
        self._reference: VisionLanguageModel | None = None  # not a registered submodule (see the module docstring)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "_reference":  # keep the reference out of the module tree: no parameters, no state_dict
            object.__setattr__(self, name, value)
            return
        super().__setattr__(name, value)

    # ----------------------------------------------------------------------- reference
    def build_reference(self) -> VisionLanguageModel:
        """A frozen model with the policy's current weights, built by the MLLM task from the same arguments."""
        params = inspect.signature(VisionLanguageTask.__init__).parameters
        args = {k: v for k, v in self.hparams.items() if k in params and k not in ("self", "tokenizer", *_SOURCES)}
        if llava_source(self.hparams.get("init"), strict=False):  # a LLaVA init names the architecture: its config
            args.update(init=self.hparams["init"], random_init=True)
        with torch.random.fork_rng(devices=[]):  # building draws initial weights: leave the run's stream alone
            twin = VisionLanguageTask(self.tokenizer, **args)
        model = twin.model
        model.load_state_dict(self.model.state_dict())
        return freeze(model)

    def setup(self, stage: str) -> None:
        """Load the earlier stages (``fit``), then take the reference: the policy as it starts."""
        super().setup(stage)
        if self.reference_kind != "copy" or self._reference is not None:
            return
        self._reference = self.build_reference()
        if stage != "fit":  # no init was loaded into the policy (a checkpoint will be): read it into the reference
            if self.init:
                load_matching(self._reference, state_of_task(self.init, "model.init"), "model.init", self.init)
            elif not self.hparams.get("init"):  # (a LLaVA init's weights came in when the task was built)
                rank_zero_warn(f"{type(self).__name__}: no model.init, so the reference is this task's initial model")
        rank_zero_info(f"reference: a frozen copy of the starting model ({sum(p.numel() for p in self._reference.parameters())}"
                       " parameters, not in the optimizer or the checkpoints)")

    @property
    def reference_model(self) -> VisionLanguageModel:
        """The frozen reference (``reference: copy``), on the policy's device and in its dtype."""
        if self._reference is None:
            raise RuntimeError(f"{type(self).__name__}: the reference is built in setup(); call trainer.fit/test first")
        policy = next(self.model.parameters())
        ref = next(self._reference.parameters())
        if ref.device != policy.device or (policy.is_floating_point() and ref.dtype != policy.dtype):
            self._reference.to(device=policy.device, dtype=policy.dtype if policy.is_floating_point() else None)
        return self._reference

    @contextlib.contextmanager
    def as_reference(self) -> Iterator[VisionLanguageModel]:
        """The model that computes the reference, for the ``with`` block: the frozen copy, or the policy in
        eval mode with its adapters disabled. Use under ``torch.no_grad``."""
        if self.reference_kind == "copy":
            yield self.reference_model
            return
        was_training = self.training
        self.eval()
        try:
            with self.model.lm.disable_adapter():
                yield self.model
        finally:
            self.train(was_training)

    @torch.no_grad()
    def reference_logprobs(self, image: torch.Tensor | None, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           labels: torch.Tensor) -> torch.Tensor:
        """The reference's summed log-probabilities of the labelled tokens ``(B,)``."""
        with self.as_reference() as ref:
            return ref.sequence_logprobs(image, input_ids, attention_mask, labels)

    @torch.no_grad()
    def reference_answer(self, image: torch.Tensor | None, prompt_input_ids: torch.Tensor,
                         prompt_attention_mask: torch.Tensor, max_new_tokens: int | None = None) -> list[str]:
        """Greedy answers of the reference (the starting model) to left-padded prompts."""
        with self.as_reference() as ref:
            return self.answer(image, prompt_input_ids, prompt_attention_mask, max_new_tokens, model=ref)


def freeze(model: torch.nn.Module) -> Any:
    """``model`` without gradients, in eval mode, its tower run without autograd."""
    model.requires_grad_(False)
    model.eval()
    if isinstance(model, VisionLanguageModel):
        model.vision_frozen = True
    return model
