"""The multimodal LLM task: a :class:`~mm_lightning.models.vlm.VisionLanguageModel` trained in stages.

Stages (``stage:``), as LLaVA and BLIP-2 train:

- ``lm``: the causal LM alone on text (``TextPipeline`` batches without ``image``), so a
  from-scratch LM knows the language before it sees images. Vision tower and connector frozen.
- ``align``: vision tower and LM frozen, the connector learns to caption (``CaptionPipeline``;
  LLaVA stage 1, BLIP-2 stage 2).
- ``instruct``: connector + LM (or LoRA adapters on the LM) on conversations
  (``ConversationPipeline``; LLaVA stage 2).

What trains follows the stage unless ``train_vision`` / ``train_connector`` / ``train_lm`` say
otherwise. Frozen parts stay in ``eval()``, have ``requires_grad=False`` (no gradient) and are
not in the optimizer; a frozen tower also runs without autograd. Each part has its own learning
rate (``vision_lr``, ``connector_lr``, ``lm_lr``; default ``lr``). Checkpoints hold every weight
(trainable and frozen) plus the optimizer and loop state, so a run resumes exactly and a
checkpoint alone rebuilds the model (:meth:`VisionLanguageTask.from_checkpoint`).

Weights of earlier stages come in at the start of ``fit`` (a resumed run's own checkpoint is
restored afterwards and wins): ``init`` (a checkpoint of this task: every weight that fits,
e.g. the align stage for instruct), ``lm_init`` (only the LM of such a checkpoint, e.g. the ``lm``
stage) and ``vision_init`` (a CLIP, SSL or classification checkpoint of this framework; its image
backbone is found by key suffix, as CLIP's ``image_init`` does).

``init`` may instead name a transformers LLaVA (a directory or hub id whose config.json has ``model_type: llava``,
e.g. what ``experiments.export --to llava`` writes, or ``llava-hf/llava-1.5-7b-hf``). The LLaVA then supplies the
whole model, with its weights, when the task is built: its vision tower (SigLIP or CLIP, at its
``vision_feature_layer`` and select strategy), its projector as the ``mlp`` connector and its language model. The
architecture options (``vision``, ``vision_kwargs``, ``connector``, ``connector_kwargs``, ``lm``, ``image_size``, ...)
stay unset (or agree with the LLaVA's), and the tokenizer is the LLaVA's own (``tokenizer.init_args.path``: the
same directory: its ``<image>`` id must be the LLaVA's ``image_token_index``). Stage, freezing, LoRA and learning
rates apply as to any model, so every stage (align, instruct, DPO, ...) can start from it; checkpoints of such a run
rebuild it from the LLaVA's config.json (:meth:`VisionLanguageTask.from_checkpoint`).

The tokenizer (``ChatTokenizer`` of :mod:`mm_lightning.data.chat_tokenizer`, or any object with its
attributes) is configured once and handed over as an object; its ``vocab_size``,
``pad_token_id``, ``bos_token_id``, ``image_token_id`` and ``end_of_turn_id`` size the LM and stop
generation. It is not saved in the hyper-parameters (only its ``path``, as ``tokenizer_path``).
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Literal

import torch
import torch.nn as nn
from lightning.pytorch.utilities import rank_zero_info

from mm_lightning.checkpoint import load_checkpoint, state_dict_of
from mm_lightning.data.tokenizer import Tokenizer
from mm_lightning.models.clip import load_backbone_weights
from mm_lightning.models.connectors import ConnectorKind
from mm_lightning.models.llava import llava_source
from mm_lightning.models.towers import SelectStrategy, TowerSource, backbone_of, build_tower
from mm_lightning.models.vlm import VisionLanguageModel, build_lm, build_vlm, decoder_layers
from mm_lightning.tasks.base import Task, param_groups

Stage = Literal["lm", "align", "instruct"]

#: the tiny Llama of the shapes recipes (0.4M parameters beside the embeddings)
SHAPES_LM: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Frozen parts stay in eval mode on purpose (see VisionLanguageTask.train); Lightning's notice about it is noise here.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
_PEFT_PREFIX = "base_model.model."


def plain_key(key: str) -> str:
    """A state-dict key without peft's wrapping (``lm.base_model.model.X`` -> ``lm.X``, ``.base_layer`` dropped)
    and without the tower wrapper's (``vision.model.X`` -> ``vision.X``: checkpoints from before the towers were
    wrapped still fit)."""
    if key.startswith("vision.model."):
        key = "vision." + key[len("vision.model."):]
    key = key.replace("lm." + _PEFT_PREFIX, "lm.", 1)
    return key.replace(".base_layer.", ".")


def load_matching(
    module: nn.Module, state: dict[str, torch.Tensor], what: str, path: str, only: str | None = None
) -> dict[str, int]:
    """Copy every tensor of ``state`` (a state dict of this task's ``model``, prefix removed) whose key
    fits one of ``module``'s (peft wrapping ignored on both sides) and whose shape matches.

    ``only`` restricts to keys under that prefix (e.g. ``lm.``). Returns the count loaded per
    top-level part; raises naming ``what``/``path`` when nothing fits, when shapes differ, or when the
    checkpoint holds LoRA adapters that this model has no place for (merge them first).
    """
    source = {plain_key(k): v for k, v in state.items() if "lora_" not in k}
    adapters = [k for k in state if "lora_" in k]
    own = module.state_dict()
    if adapters and not any("lora_" in k for k in own):
        raise ValueError(
            f"{what} {path!r} holds LoRA adapters ({adapters[0]}, ...) and this model has none: export the merged "
            "model first (python -m experiments.export_vlm --ckpt ... --out ...) and initialise from that"
        )
    wanted = {}
    for key in own:
        plain = plain_key(key)
        if only is not None and not plain.startswith(only):
            continue
        if "lora_" in key:
            continue
        wanted[key] = plain
    found = {k: p for k, p in wanted.items() if p in source}
    if not found:
        raise ValueError(
            f"{what} {path!r} holds no weights of this model{f' under {only!r}' if only else ''} (its keys look like "
            f"{', '.join(list(state)[:3])}): is it a checkpoint of this task?"
        )
    wrong = [f"{p}: {tuple(source[p].shape)} vs {tuple(own[k].shape)}" for k, p in found.items()
             if source[p].shape != own[k].shape]
    if wrong:
        raise ValueError(
            f"{what} {path!r}: {len(wrong)} weight(s) have another shape than this model's (checkpoint vs model): "
            f"{'; '.join(wrong[:4])}"
        )
    module.load_state_dict({k: source[p] for k, p in found.items()}, strict=False)
    counts: dict[str, int] = {}
    for k in found:
        part = k.split(".", 1)[0]
        counts[part] = counts.get(part, 0) + 1
    return counts


class VisionLanguageTask(Task):
    """Multimodal LLM: vision tower + connector + causal LM, trained by stage (see the module docstring).

    Batches: ``input_ids``, ``attention_mask``, ``labels`` (-100 where no loss; not shifted) and
    ``image`` except in the ``lm`` stage. Evaluation batches of conversations may also carry the
    left-padded ``prompt_input_ids`` / ``prompt_attention_mask`` that the VQA callback answers.

    Args:
        tokenizer: the conversation tokenizer object (see the module docstring); not saved.
        stage: ``lm``, ``align`` or ``instruct``.
        vision: the vision tower (:mod:`mm_lightning.models.towers`): a timm model name (``vit_tiny_patch16_224``,
            ``hf-hub:timm/...``), a transformers hub id (``google/siglip-base-patch16-224``,
            ``openai/clip-vit-large-patch14-336``, ``facebook/dinov2-base``: SigLIP, CLIP, DINOv2 vision models or the
            vision half of a full CLIP / SigLIP) or a local directory of either.
        vision_kwargs: arguments of ``timm.create_model`` (``img_size``, ``patch_size``, ``embed_dim``, ...), or
            config overrides of a transformers tower (and its ``attn_implementation``).
        vision_pretrained: a timm name's pretrained weights (timm's ``pretrained=True``: the hub when online, the HF
            cache and ``HF_HUB_OFFLINE`` honoured); directories and hub ids always bring their weights.
        vision_weights: a local safetensors file of the timm tower's weights (timm's ``pretrained_cfg_overlay``).
        vision_source: how to read ``vision``: ``auto`` (a directory by its config.json, ``hf-hub:`` timm, ``org/name``
            by its config, else a timm name), ``timm`` or ``transformers``.
        vision_feature_layer: LLaVA's ``vision_feature_layer``: the ``hidden_states`` entry the connector reads
            (default -2 for CLIP as LLaVA-1.5, -1 for SigLIP and DINOv2; a timm tower: ``forward_features``
            unless set, then that block's pre-norm output).
        vision_select: LLaVA's ``vision_feature_select_strategy``: ``default`` drops the class token (and DINOv2's
            register tokens) where the tower has one, ``full`` keeps every token.
        vision_init: a CLIP/SSL/classification checkpoint whose image backbone initialises the tower.
        vision_init_prefix: key prefix of that backbone in ``vision_init`` (found when unset).
        connector: ``mlp``, ``qformer``, ``resampler`` or ``xattn``.
        connector_kwargs: the connector's options (``downsample``, ``num_queries``, ``depth``, ``every``, ...).
        lm: the LM: a config dict (``model_type`` + config fields; a tiny Llama by default), a hub id
            (``HuggingFaceTB/SmolLM2-135M-Instruct``: downloaded when online, the HF cache when ``HF_HUB_OFFLINE``
            is set) or a local directory (:func:`mm_lightning.models.lm.load_causal_lm`: safetensors only, never
            remote code). Its own tokenizer (``tokenizer.init_args.path``: the same id or directory) and chat
            template lay out the conversations.
        lm_init: a checkpoint of this task (e.g. the ``lm`` stage) whose LM weights initialise the LM.
        init: a checkpoint of this task (an earlier stage) whose weights initialise everything they fit; or a
            transformers LLaVA directory / hub id, which supplies the tower, the mlp connector and the LM with their
            weights (see the module docstring; leave the architecture options unset).
        image_size: input side of the tower (default: what the tower was built for).
        random_init: build the tower and the LM from their configs at random initialisation, reading no weights
            (speed checks and parameter counts of real-size architectures; a hub id needs only its config.json).
        train_vision: train the vision tower (default: frozen, as LLaVA and BLIP-2).
        train_connector: train the connector (default: all stages but ``lm``).
        train_lm: train the LM (default: ``lm`` and ``instruct``); with LoRA only the adapters train.
        vision_lr: learning rate of the tower (default ``lr``).
        connector_lr: learning rate of the connector (default ``lr``).
        lm_lr: learning rate of the LM or its adapters (default ``lr``).
        lora_r: LoRA rank on the LM (0: no LoRA, the LM trains fully when it trains).
        lora_alpha: LoRA scaling numerator (the update is ``alpha / r * B A``).
        lora_dropout: dropout on the LoRA input.
        lora_target_modules: names of the LM's linear layers that get adapters.
        qlora: 4-bit (NF4) base weights under the LoRA adapters (bitsandbytes; needs CUDA and ``lm`` a hub
            id or a local directory).
        monitor: metric that picks the best checkpoint (default ``val/loss``); ``val/vqa_exact_match``
            with the VQA callback.
        max_new_tokens: longest generated answer.
        tokenizer_path: not to be set: the task records its tokenizer's ``path`` here (for ``experiments.ask``);
            accepted so a resumed run's checkpoint hyper-parameters fit the signature.
        **kwargs: optimizer settings of :class:`~mm_lightning.tasks.base.Task` (``lr``, ``weight_decay``, ...).
    """

    def __init__(
        self,
        tokenizer: Tokenizer | None = None,
        stage: Stage = "instruct",
        vision: str = "vit_tiny_patch16_224",
        vision_kwargs: dict[str, Any] | None = None,
        vision_pretrained: bool = False,
        vision_weights: str | None = None,
        vision_source: TowerSource = "auto",
        vision_feature_layer: int | None = None,
        vision_select: SelectStrategy = "default",
        vision_init: str | None = None,
        vision_init_prefix: str | None = None,
        connector: ConnectorKind = "mlp",
        connector_kwargs: dict[str, Any] | None = None,
        lm: dict[str, Any] | str | None = None,
        lm_init: str | None = None,
        init: str | None = None,
        image_size: int | None = None,
        random_init: bool = False,
        train_vision: bool = False,
        train_connector: bool | None = None,
        train_lm: bool | None = None,
        vision_lr: float | None = None,
        connector_lr: float | None = None,
        lm_lr: float | None = None,
        lora_r: int = 0,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] | None = None,
        qlora: bool = False,
        monitor: str | None = None,
        max_new_tokens: int = 16,
        tokenizer_path: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if stage not in ("lm", "align", "instruct"):
            raise ValueError(f"model.stage must be 'lm', 'align' or 'instruct', got {stage!r}")
        if tokenizer is None:
            raise ValueError("model.tokenizer is required (the conversation tokenizer, configured once as `tokenizer:`)")
        self.save_hyperparameters(ignore=["tokenizer"])
        self.hparams["tokenizer_path"] = getattr(tokenizer, "path", None)
        self.tokenizer = tokenizer
        self.stage = stage
        self.monitor = monitor or "val/loss"
        self.monitor_mode = "min" if self.monitor.endswith("loss") else "max"
        self.max_new_tokens = max_new_tokens
        self.vision_init, self.vision_init_prefix = vision_init, vision_init_prefix
        self.lm_init, self.init = lm_init, init
        self.part_lr = {"vision": vision_lr, "connector": connector_lr, "lm": lm_lr}

        special = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
                   "eos_token_id": tokenizer.end_of_turn_id}
        if llava_source(init, "model.init"):  # a transformers LLaVA: it supplies the architecture and the weights
            given = {"vision": vision, "vision_kwargs": vision_kwargs, "vision_pretrained": vision_pretrained,
                     "vision_weights": vision_weights, "vision_source": vision_source,
                     "vision_feature_layer": vision_feature_layer, "vision_select": vision_select,
                     "vision_init": vision_init, "connector": connector, "connector_kwargs": connector_kwargs, "lm": lm,
                     "lm_init": lm_init, "image_size": image_size, "qlora": qlora}
            self.model = llava_model(str(init), tokenizer, given, special, random_init)
            self.init = None  # its weights are in already (setup() reads checkpoints of this task only)
        else:
            tower = build_tower(
                vision, vision_kwargs, source=vision_source, pretrained=vision_pretrained, weights=vision_weights,
                feature_layer=vision_feature_layer, select=vision_select, image_size=image_size, random_init=random_init,
            )
            if qlora:
                language_model = self._quantized_lm(lm)
            else:
                language_model = build_lm(SHAPES_LM if lm is None else lm, tokenizer.vocab_size, special,
                                          random_init=random_init)
            self.model = build_vlm(
                tower, language_model, connector, tokenizer.image_token_id, image_size, **dict(connector_kwargs or {})
            )
        self.lora = lora_r > 0
        if qlora and not self.lora:
            raise ValueError("model.qlora trains LoRA adapters over a 4-bit base: set model.lora_r > 0")
        if self.lora:
            self._apply_lora(lora_r, lora_alpha, lora_dropout, lora_target_modules or LORA_TARGETS)
        self.trainable = {
            "vision": train_vision,
            "connector": stage != "lm" if train_connector is None else train_connector,
            "lm": stage != "align" if train_lm is None else train_lm,
        }
        self.configure_trainable()

    @property
    def num_image_tokens(self) -> int:
        """``<image>`` tokens per image in the text: the connector's (``experiments.run`` links it into the pipeline)."""
        return self.model.num_image_tokens

    @property
    def preprocessing(self) -> dict[str, Any]:
        """``{"image_size", "mean", "std"}`` the vision tower takes (``experiments.run`` links it into the pipeline)."""
        return self.model.vision.preprocessing

    def model_spec(self) -> None:
        """No spec for :func:`mm_lightning.models.load_model` (which has no VisionLanguageModel builder): the MLLM is
        rebuilt from its checkpoint's hyper-parameters by :meth:`from_checkpoint`. Without this, every save raised."""
        return None

    # ----------------------------------------------------------------- building
    @staticmethod
    def _quantized_lm(lm: dict[str, Any] | str | None) -> nn.Module:
        """The LM with 4-bit NF4 base weights (QLoRA): CUDA and bitsandbytes only, from a hub id or a local directory
        (:func:`mm_lightning.models.lm.load_causal_lm`'s rules)."""
        if not torch.cuda.is_available():
            raise RuntimeError(
                "model.qlora needs a CUDA GPU (bitsandbytes 4-bit weights); this machine has none: use LoRA "
                "(model.lora_r > 0, model.qlora: false) on CPU"
            )
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise ModuleNotFoundError("model.qlora needs bitsandbytes: pip install 'mm-lightning[bitsandbytes]'")
        if not isinstance(lm, str):
            raise ValueError("model.qlora loads the LM's weights quantized: set model.lm to a hub id or a local directory")
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        from mm_lightning.models.lm import load_causal_lm

        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
        model = load_causal_lm(lm, "model.lm", quantization_config=config)
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)

    def _apply_lora(self, r: int, alpha: float, dropout: float, targets: list[str]) -> None:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none",
            task_type="CAUSAL_LM",
        )
        try:
            with warnings.catch_warnings():  # peft 0.21 still asks transformers' deprecated is_gradient_checkpointing
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
                self.model.lm = get_peft_model(self.model.lm, config)
        except ValueError as err:
            raise ValueError(f"model.lora_target_modules {list(targets)}: {err}") from None

    def configure_trainable(self) -> None:
        """Set ``requires_grad`` per part from ``self.trainable`` (call again after changing it).

        With LoRA the LM's base weights stay frozen and only the adapters follow ``trainable["lm"]``.
        """
        model = self.model
        model.vision.requires_grad_(self.trainable["vision"])
        model.connector.requires_grad_(self.trainable["connector"])
        if self.lora:
            for name, p in model.lm.named_parameters():
                p.requires_grad_(self.trainable["lm"] and "lora_" in name)
        else:
            model.lm.requires_grad_(self.trainable["lm"])
        model.vision_frozen = not self.trainable["vision"]
        self.train(self.training)

    def frozen_parts(self) -> list[str]:
        """The parts (``vision``, ``connector``, ``lm``) without any trainable parameter."""
        return [n for n in ("vision", "connector", "lm")
                if not any(p.requires_grad for p in getattr(self.model, n).parameters())]

    def train(self, mode: bool = True) -> VisionLanguageTask:
        super().train(mode)
        for part in self.frozen_parts():  # frozen parts never leave eval mode (no dropout, fixed norms)
            getattr(self.model, part).eval()
        return self

    def optimized_module(self) -> nn.Module:
        return self.model

    def optimizer_param_groups(self) -> list[dict[str, Any]]:
        """Decay / no-decay groups per trainable part, each at its own learning rate (named for the LR monitor)."""
        groups = []
        for part in ("vision", "connector", "lm"):
            module = getattr(self.model, part)
            lr = self.part_lr[part] or self.lr
            for group, suffix in zip(param_groups(module, self.weight_decay), ("", "/no_decay")):
                if group["params"]:
                    groups.append({**group, "lr": lr, "name": f"{part}{suffix}"})
        if not groups:
            raise ValueError(f"stage {self.stage!r} trains nothing: every part is frozen")
        return groups

    # ---------------------------------------------------------- efficient training
    def transformer_blocks(self) -> list[nn.Module]:
        """The LM's decoder layers and the connector's blocks (FSDP units), plus a trained tower's blocks."""
        from mm_lightning.parallel import find_transformer_blocks

        blocks = list(decoder_layers(self.model.lm)[1]) + self.model.connector.blocks()
        if self.trainable["vision"]:
            blocks += find_transformer_blocks(self.model.vision)
        return blocks

    def configure_model(self) -> None:
        """Activation checkpointing through the LM's own ``activation_checkpointing_enable`` (HF checkpoints
        only modules in training mode: a frozen LM keeps its activations) and on the connector's blocks;
        then the base class's FSDP / compile."""
        if self._model_configured:
            return
        if self.activation_checkpointing:
            from mm_lightning.parallel import apply_activation_checkpointing, find_transformer_blocks

            lm = self.model.lm
            base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            apply_activation_checkpointing(self.model.connector.blocks())
            if self.trainable["vision"]:
                apply_activation_checkpointing(find_transformer_blocks(self.model.vision))
        flag, self.activation_checkpointing = self.activation_checkpointing, False
        try:
            super().configure_model()
        finally:
            self.activation_checkpointing = flag

    # -------------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        """Load ``init``, ``lm_init`` and ``vision_init`` before ``fit`` (in that order; later ones win)."""
        if stage != "fit":
            return
        if self.init:
            counts = load_matching(self.model, state_of_task(self.init, "model.init"), "model.init", self.init)
            rank_zero_info(f"initialised from {self.init}: {counts} tensors per part")
        if self.lm_init:
            state = state_of_task(self.lm_init, "model.lm_init")
            counts = load_matching(self.model, state, "model.lm_init", self.lm_init, only="lm.")
            rank_zero_info(f"LM initialised from {self.lm_init} ({counts.get('lm', 0)} tensors)")
        if self.vision_init:
            prefix = load_backbone_weights(backbone_of(self.model.vision), self.vision_init, self.vision_init_prefix,
                                           what="model.vision_init")
            rank_zero_info(f"vision tower initialised from {self.vision_init} (keys under {prefix!r})")

    # ----------------------------------------------------------------- training
    def forward(self, batch: dict[str, Any]) -> Any:
        """The LM output (``.loss``, ``.logits``) of a batch; ``image`` is ignored in the ``lm`` stage."""
        image = batch.get("image") if self.stage != "lm" else None
        return self.model(image, batch["input_ids"], batch["attention_mask"], labels=batch.get("labels"))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self(batch).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def _eval_step(self, batch: dict[str, Any], split: str) -> None:
        loss = self(batch).loss
        self.log(f"{split}/loss", loss, batch_size=batch["input_ids"].shape[0], sync_dist=True, prog_bar=split == "val")

    # --------------------------------------------------------------- generation
    @torch.no_grad()
    def answer(
        self,
        image: torch.Tensor | None,
        prompt_input_ids: torch.Tensor,
        prompt_attention_mask: torch.Tensor,
        max_new_tokens: int | None = None,
        model: VisionLanguageModel | None = None,
    ) -> list[str]:
        """Greedy answers (decoded text, up to the end-of-turn token) to left-padded prompts.

        ``model`` answers instead of ``self.model`` when given (an alignment task's frozen reference)."""
        eot = self.tokenizer.end_of_turn_id
        new = (model if model is not None else self.model).generate(
            image if self.stage != "lm" else None,
            prompt_input_ids,
            prompt_attention_mask,
            max_new_tokens=max_new_tokens or self.max_new_tokens,
            eos_token_id=eot,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        answers = []
        for row in new.tolist():
            if eot in row:
                row = row[: row.index(eot)]
            answers.append(self.tokenizer.decode(row))
        return answers

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Answers to the batch's prompts with their keys, questions, references and types."""
        predictions = self.answer(batch.get("image"), batch["prompt_input_ids"], batch["prompt_attention_mask"])
        n = len(predictions)
        return {
            "keys": list(batch.get("keys", [None] * n)),
            "questions": list(batch.get("questions", [None] * n)),
            "answers": list(batch.get("answers", [None] * n)),
            "question_types": list(batch.get("question_types", ["unknown"] * n)),
            "predictions": predictions,
        }

    # -------------------------------------------------------------- parameters
    def parameter_counts(self) -> dict[str, int]:
        """``total`` and ``trainable`` parameter counts, and the trainable ones per part."""
        counts = {"total": sum(p.numel() for p in self.model.parameters()),
                  "trainable": sum(p.numel() for p in self.model.parameters() if p.requires_grad)}
        for part in ("vision", "connector", "lm"):
            counts[f"trainable/{part}"] = sum(p.numel() for p in getattr(self.model, part).parameters() if p.requires_grad)
        return counts

    # ------------------------------------------------------------------- export
    def merge_lora(self) -> None:
        """Fold the LoRA adapters into the LM's weights (peft ``merge_and_unload``); the LM becomes plain."""
        if not self.lora:
            return
        self.model.lm = self.model.lm.merge_and_unload()
        self.lora = False
        self.model.attach_fusion()
        self.configure_trainable()

    @classmethod
    def from_checkpoint(cls, path: str, tokenizer: Any, **overrides: Any) -> VisionLanguageTask:
        """Rebuild the task of a checkpoint of this task (weights-only load) with ``tokenizer``.

        The earlier-stage sources (``init``, ``lm_init``, ``vision_init``) are not read again and the tower and
        the LM are built from their configs (``random_init``): the checkpoint holds every weight. A LLaVA ``init``
        names the architecture, so its ``config.json`` is read (:func:`rebuild_arguments`).
        """
        ckpt = load_checkpoint(path, "--ckpt")
        hparams = dict(ckpt.get("hyper_parameters") or {})
        if not hparams or "state_dict" not in ckpt:
            raise ValueError(f"--ckpt {path!r} is not a checkpoint of {cls.__name__} (no hyper_parameters/state_dict)")
        hparams.pop("tokenizer_path", None)
        hparams = {k: v for k, v in hparams.items() if not k.startswith("_")}  # LightningCLI's _class_path, ...
        hparams = rebuild_arguments(hparams)
        hparams.update(**overrides)
        # a subclass's checkpoint (DPO, reward, ...) read as this class: its own options (beta, ...) are not ours
        accepted = {name for klass in cls.__mro__ if isinstance(klass, type) and issubclass(klass, Task)
                    for name in inspect.signature(klass.__init__).parameters}
        hparams = {k: v for k, v in hparams.items() if k in accepted}
        task = cls(tokenizer=tokenizer, **hparams)
        task.load_state_dict(ckpt["state_dict"])
        return task


def rebuild_arguments(hparams: dict[str, Any]) -> dict[str, Any]:
    """``hparams`` of this task made to rebuild its architecture without reading earlier stages' weights (a checkpoint
    or a copy of the model's weights follows): ``init``, ``lm_init`` and ``vision_init`` cleared and ``random_init``
    set, except that a transformers LLaVA ``init`` stays, since it names the tower, connector and LM (with
    ``random_init`` only its config.json is read)."""
    args = dict(hparams)
    keep = llava_source(args.get("init"), "model.init", strict=False)
    args.update(lm_init=None, vision_init=None, random_init=True)
    if not keep:
        args["init"] = None
    return args


def llava_model(init: str, tokenizer: Tokenizer, given: dict[str, Any], special: dict[str, int | None],
                random_init: bool = False) -> VisionLanguageModel:
    """The model of a transformers LLaVA given as ``model.init`` (:func:`mm_lightning.models.llava.load_llava`): its
    tower, projector (our ``mlp`` connector) and LM with their weights.

    The LLaVA supplies the architecture: each option of ``given`` (``vision``, ``lm``, ``connector_kwargs``, ...)
    must be left at its default or agree with the LLaVA's (``vision_feature_layer``, ``vision_select``,
    ``connector: mlp``, ``image_size``), else a one-line error names it. The tokenizer must be the LLaVA's: its
    ``<image>`` id is the LLaVA's ``image_token_index`` and its vocabulary fits the LM's embeddings.
    ``special`` (pad, bos, eos ids) go into the LM's config and generation config, as for any LM.
    """
    from mm_lightning.models.llava import load_llava, read_llava_config

    config = read_llava_config(init, "model.init")
    agreed = {"vision_feature_layer": config.vision_feature_layer, "vision_select": config.vision_feature_select_strategy,
              "connector": "mlp", "image_size": config.vision_config.image_size}
    defaults = inspect.signature(VisionLanguageTask.__init__).parameters
    for name, value in given.items():
        if value == defaults[name].default or value in ({}, None) or (name in agreed and value == agreed[name]):
            continue
        also = f" (the LLaVA's is {agreed[name]!r})" if name in agreed else ""
        raise ValueError(f"model.{name}={value!r}: model.init {init!r} is a transformers LLaVA, which supplies the vision "
                         f"tower, the mlp connector and the LM{also}: leave model.{name} unset")
    where = f"model.init {init!r}"
    if tokenizer.image_token_id != config.image_token_index:
        raise ValueError(f"{where} puts images at token id {config.image_token_index}, but the tokenizer's <image> is id "
                         f"{tokenizer.image_token_id}: use the LLaVA's own tokenizer (tokenizer.init_args.path: {init})")
    rows = int(config.text_config.vocab_size)
    if tokenizer.vocab_size > rows:
        raise ValueError(f"{where}: the tokenizer has {tokenizer.vocab_size} tokens, the LLaVA's LM {rows} embeddings: "
                         f"use the LLaVA's own tokenizer (tokenizer.init_args.path: {init})")
    parts = load_llava(init, "model.init", random_init=random_init)
    for name, value in special.items():
        if value is not None:
            setattr(parts.lm.config, name, value)
            if getattr(parts.lm, "generation_config", None) is not None:
                setattr(parts.lm.generation_config, name, value)
    return VisionLanguageModel(parts.vision, parts.connector, parts.lm, tokenizer.image_token_id)


def state_of_task(path: str, what: str) -> dict[str, torch.Tensor]:
    """The ``model.``-prefixed weights of a checkpoint of this task, prefix removed."""
    state = state_dict_of(path, what)
    inner = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    return inner or state
