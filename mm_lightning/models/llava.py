"""The multimodal LLM in and out of transformers' LLaVA layout (``LlavaForConditionalGeneration``).

Out (:func:`to_llava`, :func:`save_llava`): a :class:`~mm_lightning.models.vlm.VisionLanguageModel` whose tower
is a transformers SigLIP or CLIP vision model (:class:`~mm_lightning.models.towers.TransformersTower`), whose
connector is the ``mlp`` one in LLaVA's own form, and whose LM is a transformers causal LM becomes a directory
that ``LlavaForConditionalGeneration.from_pretrained`` and ``AutoProcessor.from_pretrained`` (a
``LlavaProcessor``) load with no code of ours. The mapping is exact, module for module:

- the tower's model -> ``model.vision_tower`` (``vision_config`` = its config); ``vision_feature_layer`` = the
  tower's; ``vision_feature_select_strategy``: ``full`` for SigLIP (no class token: our towers keep every patch,
  and LLaVA's ``default`` would drop the first patch), ``default`` for CLIP with ``vision_select: default``
  (LLaVA drops token 0, the class token), ``full`` for CLIP with ``vision_select: full``;
- the connector's ``fc1`` / ``fc2`` -> ``multi_modal_projector.linear_1`` / ``linear_2``
  (``projector_hidden_act: gelu``, exact GELU as ours, ``multimodal_projector_bias: true``);
- the LM's base model -> ``model.language_model``, its head -> ``lm_head`` (``text_config`` = its config);
- ``image_token_index`` = our ``<image>`` id, ``image_seq_length`` = the image tokens per image.

What LLaVA's projector (Linear, GELU, Linear on every visual token) cannot represent is refused in one line
naming the option (:func:`check_exportable`): ``downsample > 1`` (``pool: pixel_shuffle`` is the
Idefics3 / SmolVLM connector, transformers' ``Idefics3ForConditionalGeneration``; ``pool: avg`` has no
transformers counterpart), ``input_norm``, ``position_embedding`` ``learned`` / ``sincos``, ``hidden_dim`` other
than the LM's width, the ``qformer`` / ``resampler`` / ``xattn`` connectors, timm towers (export the tower with
``--to siglip`` first and train with it), DINOv2 towers, a tower run at another image size than its config's
(LLaVA does not interpolate position embeddings), LoRA adapters not merged.

The processor: the tower's image processor (SigLIP's or CLIP's class) at the size, mean and std the model
was trained with, the tokenizer with its chat template and ``<image>``, ``patch_size``,
``vision_feature_select_strategy`` and ``num_additional_image_tokens`` (1 for CLIP's class token), so the
processor expands ``<image>`` into exactly the model's image tokens. The processor's chat template is the
tokenizer's behind a preamble that turns content lists (``[{"type": "image"}, {"type": "text", ...}]``) into
``<image>`` + text, so ``processor.apply_chat_template`` renders what the tokenizer's template renders.

In (:func:`load_llava`): a LLaVA directory or hub id becomes our tower, ``mlp`` connector and LM holding its
very tensors (the modules are moved, not copied), so exporting it again gives the same tensors bit for bit.
LLaVAs we cannot represent are refused in one line: another projector activation, no projector bias, a
feature layer list, a tower other than SigLIP / CLIP, SigLIP with ``default`` (LLaVA drops a patch there).

No Lightning imports.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mm_lightning.models import hub
from mm_lightning.models.connectors import MLPProjector
from mm_lightning.models.convert import ConversionError
from mm_lightning.models.hub import PretrainedError
from mm_lightning.models.towers import HF_TOWERS, TowerRef, TransformersTower, hf_preprocessing

#: vision configs a LLaVA export / import handles: transformers model_type -> (family, non-patch tokens)
LLAVA_TOWERS = {"siglip_vision_model": ("siglip", 0), "clip_vision_model": ("clip", 1)}
IMAGE_TOKEN = "<image>"
#: the preamble of the processor's chat template: content lists become ``<image>`` + text strings, so the
#: tokenizer's template (which reads ``message['content']`` as a string) renders them
CONTENT_PREAMBLE = (
    "{%- set _mm = namespace(messages=[]) -%}{%- for m in messages -%}{%- if m['content'] is string -%}"
    "{%- set _mm.messages = _mm.messages + [m] -%}{%- else -%}{%- set _text = namespace(s='') -%}"
    "{%- for part in m['content'] -%}{%- if part['type'] == 'image' -%}{%- set _text.s = _text.s + '" + IMAGE_TOKEN
    + "' -%}{%- elif part['type'] == 'text' -%}{%- set _text.s = _text.s + part['text'] -%}{%- endif -%}{%- endfor -%}"
    "{%- set _mm.messages = _mm.messages + [dict(m, content=_text.s)] -%}{%- endif -%}{%- endfor -%}"
    "{%- set messages = _mm.messages %}"
)


# ------------------------------------------------------------------------------------------------- out
def check_exportable(model: nn.Module) -> None:
    """Raise :class:`ConversionError` (one line, naming the option and what to use instead) unless ``model``'s
    tower, connector and LM map onto ``LlavaForConditionalGeneration`` exactly (module docstring)."""
    from mm_lightning.models.vlm import lm_hidden_size

    tower, connector, lm = model.vision, model.connector, model.lm
    if not isinstance(tower, TransformersTower):
        source = getattr(tower, "source", "") or type(tower).__name__
        raise ConversionError(
            f"model.vision is a {source} tower; a LLaVA needs a transformers SigLIP or CLIP vision model: export the "
            "tower with --to siglip first and train with it (model.vision: that directory)")
    if tower.model_type not in LLAVA_TOWERS:
        raise ConversionError(f"model.vision is a transformers {tower.model_type} tower; the LLaVA export takes "
                              f"SigLIP or CLIP vision models ({', '.join(LLAVA_TOWERS)})")
    native = int(tower.model.config.image_size)
    if tower.image_size != native:
        raise ConversionError(f"model.image_size {tower.image_size} differs from the tower's config image_size "
                              f"{native}: LLaVA runs its tower at the config's size (no position interpolation); "
                              f"train at {native}")
    if tower.select == "default" and tower.num_prefix_tokens > 1:
        raise ConversionError(f"model.vision_select default drops {tower.num_prefix_tokens} leading tokens; LLaVA's "
                              "default drops exactly one: use vision_select full")
    if type(connector) is not MLPProjector:
        raise ConversionError(
            f"model.connector is {type(connector).__name__}; LLaVA has only the mlp projector (Linear, GELU, Linear): "
            "train with connector: mlp, or export this model with --to mm-lightning")
    if connector.downsample > 1:
        if connector.pool == "pixel_shuffle":
            raise ConversionError(
                f"model.connector_kwargs downsample={connector.downsample} with pool pixel_shuffle is the Idefics3 / "
                "SmolVLM connector (transformers' Idefics3ForConditionalGeneration), not LLaVA's projector: train "
                "with downsample: 1 for a LLaVA export")
        raise ConversionError(f"model.connector_kwargs downsample={connector.downsample} (pool avg) pools the token "
                              "grid, which LLaVA's projector does not: train with downsample: 1")
    if not isinstance(connector.norm, nn.Identity):
        raise ConversionError("model.connector_kwargs input_norm: true puts a LayerNorm before the projector, which "
                              "LLaVA's projector has no place for: train with input_norm: false")
    if connector.pos_embed is not None or connector.grid_code is not None:
        kind = "learned" if connector.pos_embed is not None else "sincos"
        raise ConversionError(f"model.connector_kwargs position_embedding: {kind} adds a per-token code that LLaVA's "
                              "projector cannot hold: train with position_embedding: none")
    width = lm_hidden_size(lm)
    if connector.fc1.out_features != width:
        raise ConversionError(f"model.connector_kwargs hidden_dim={connector.fc1.out_features}: LLaVA's projector's "
                              f"hidden layer is the LM's width {width}: leave hidden_dim unset")
    if connector.fc1.bias is None or connector.fc2.bias is None:
        raise ConversionError("the mlp connector has no biases; LLaVA's multimodal_projector_bias is one switch for both")
    if hasattr(lm, "merge_and_unload") or hasattr(lm, "get_base_model"):
        raise ConversionError("the LM carries LoRA adapters: merge them first (VisionLanguageTask.merge_lora)")
    prefix = getattr(lm, "base_model_prefix", "")
    if not prefix or not isinstance(getattr(lm, prefix, None), nn.Module) or lm.get_output_embeddings() is None:
        raise ConversionError(f"the LM {type(lm).__name__} is not a transformers causal LM with a base model and an "
                              "output head")


def llava_config(model: nn.Module) -> Any:
    """The ``LlavaConfig`` of ``model`` (checked by :func:`check_exportable`)."""
    import copy

    from transformers import LlavaConfig

    check_exportable(model)
    tower = model.vision
    _, prefix_tokens = LLAVA_TOWERS[tower.model_type]
    strategy = "default" if tower.select == "default" and prefix_tokens == 1 else "full"
    text_config = copy.deepcopy(model.lm.config)
    return LlavaConfig(
        vision_config=copy.deepcopy(tower.model.config).to_dict(),
        text_config=text_config.to_dict(),
        image_token_index=int(model.image_token_id),
        image_seq_length=int(model.num_image_tokens),
        projector_hidden_act="gelu",
        vision_feature_select_strategy=strategy,
        vision_feature_layer=int(tower.feature_layer),
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )


def to_llava(model: nn.Module) -> nn.Module:
    """A ``LlavaForConditionalGeneration`` built around ``model``'s own modules (they are shared, not copied)."""
    from transformers import LlavaForConditionalGeneration

    config = llava_config(model)
    with torch.device("meta"):  # no weights allocated: every module is replaced by ours below
        llava = LlavaForConditionalGeneration(config)
    lm = model.lm
    llava.model.vision_tower = model.vision.model
    llava.model.multi_modal_projector.linear_1 = model.connector.fc1
    llava.model.multi_modal_projector.linear_2 = model.connector.fc2
    llava.model.language_model = getattr(lm, lm.base_model_prefix)
    llava.lm_head = lm.get_output_embeddings()
    if getattr(lm, "generation_config", None) is not None:
        llava.generation_config = lm.generation_config
    left = [name for name, t in [*llava.named_parameters(), *llava.named_buffers()] if t.is_meta]
    if left:
        raise ConversionError(f"LLaVA export: {len(left)} tensor(s) of the LLaVA have no counterpart here ({left[0]})")
    return llava


def image_processor(tower: TransformersTower, preprocessing: dict[str, Any]) -> Any:
    """The tower's image processor class at the size, mean and std the model was trained with: SigLIP's resizes to
    the square size, CLIP's resizes the short side and crops the centre (as their published checkpoints)."""
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    size = int(preprocessing["image_size"])
    mean = [float(v) for v in preprocessing["mean"]]
    std = [float(v) for v in preprocessing["std"]]
    if LLAVA_TOWERS[tower.model_type][0] == "siglip":
        return SiglipImageProcessor(size={"height": size, "width": size}, image_mean=mean, image_std=std)
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              image_mean=mean, image_std=std)


def processor_chat_template(template: str | None) -> str | None:
    """The tokenizer's chat template behind :data:`CONTENT_PREAMBLE` (once: a re-export does not stack it)."""
    if not template:
        return None
    return template if template.startswith(CONTENT_PREAMBLE) else CONTENT_PREAMBLE + template


def save_llava(model: nn.Module, tokenizer: Any, out: str | os.PathLike,
               preprocessing: dict[str, Any] | None = None) -> Any:
    """Write ``model`` as a transformers LLaVA directory with its ``LlavaProcessor`` (module docstring).

    ``tokenizer``: the Hugging Face tokenizer holding ``<image>`` (``ChatTokenizer.hf``); ``preprocessing``:
    ``{"image_size", "mean", "std"}`` the model was trained with (default: the tower's). Returns the config.
    """
    from transformers import LlavaProcessor

    llava = to_llava(model)
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != model.image_token_id:
        raise ConversionError(f"the tokenizer's {IMAGE_TOKEN} is id {tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}, the "
                              f"model's image token id is {model.image_token_id}: export with the model's tokenizer")
    tower = model.vision
    prep = dict(tower.preprocessing, **(preprocessing or {}))
    if int(prep["image_size"]) != tower.image_size:
        raise ConversionError(f"the run's image_size {prep['image_size']} differs from the tower's {tower.image_size}")
    llava.save_pretrained(out, safe_serialization=True)
    own = getattr(tokenizer, "chat_template", None)
    template = processor_chat_template(own)
    # the tokenizer and the processor share chat_template.jinja: the tokenizer gets the processor's template, which
    # renders string contents exactly as its own
    tokenizer.chat_template = template
    try:
        processor = LlavaProcessor(
            image_processor=image_processor(tower, prep), tokenizer=tokenizer, patch_size=int(tower.patch_size),
            vision_feature_select_strategy=llava.config.vision_feature_select_strategy, chat_template=template,
            image_token=IMAGE_TOKEN, num_additional_image_tokens=LLAVA_TOWERS[tower.model_type][1],
        )
        processor.save_pretrained(out)
    finally:
        tokenizer.chat_template = own
    return llava.config


def model_card(config: Any, task: str, summary: dict[str, Any] | None = None, command: str | None = None,
               run_config: str | None = None) -> str:
    """A short README.md: what the model is, how to load it, the run's final metrics and how it was trained."""
    vision, text = config.vision_config, config.text_config
    lines = [
        "---", "library_name: transformers", "pipeline_tag: image-text-to-text", "tags: [llava, mm-lightning]", "---", "",
        "# LLaVA exported from mm-lightning", "",
        f"{task}. Vision tower: {vision.model_type} ({vision.num_hidden_layers} layers, width {vision.hidden_size}, "
        f"{vision.image_size} px, patch {vision.patch_size}; features of hidden_states[{config.vision_feature_layer}], "
        f"select strategy {config.vision_feature_select_strategy}); projector Linear-GELU-Linear; language model: "
        f"{text.model_type} ({text.num_hidden_layers} layers, width {text.hidden_size}, vocabulary {text.vocab_size}). "
        f"{config.image_seq_length} image tokens per image (`<image>` is id {config.image_token_index}).", "",
        "```python",
        "from transformers import AutoProcessor, LlavaForConditionalGeneration",
        "model = LlavaForConditionalGeneration.from_pretrained(DIR)",
        "processor = AutoProcessor.from_pretrained(DIR)",
        'messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]',
        "prompt = processor.apply_chat_template(messages, add_generation_prompt=True)",
        'inputs = processor(images=image, text=prompt, return_tensors="pt")',
        "answer = model.generate(**inputs, max_new_tokens=32, do_sample=False)",
        "```", "",
    ]
    if summary:
        lines += ["## Metrics (the run's summary.json)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(summary.items())]
        lines.append("")
    if command:
        lines += ["## Training", "", "```bash", command, "```", ""]
        if run_config:
            lines += ["<details><summary>config.yaml</summary>", "", "```yaml", run_config.rstrip(), "```", "",
                      "</details>", ""]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- in
@dataclass
class LlavaParts:
    """What a LLaVA becomes here: our tower, ``mlp`` connector and causal LM, and its ``<image>`` id."""

    vision: TransformersTower
    connector: MLPProjector
    lm: nn.Module
    image_token_id: int
    config: Any


def llava_source(name: str | os.PathLike | None, option: str = "model.init", strict: bool = True) -> bool:
    """Whether ``name`` is a transformers LLaVA: a directory or hub id whose ``config.json`` has ``model_type``
    ``llava``. A file (a checkpoint of this framework) is not. ``strict``: a directory, or a hub id whose config
    is readable, that is not a LLaVA raises :class:`PretrainedError` naming ``option``; otherwise ``False``."""
    if not name:
        return False
    text = os.fspath(name)
    if os.path.isfile(text) or text.endswith((".ckpt", ".pt", ".pth", ".safetensors")):
        return False
    if os.path.isdir(text):
        path = Path(text) / hub.CONFIG_FILE
        if not path.is_file():
            if strict:
                raise PretrainedError(f"{option} {text!r}: a directory without {hub.CONFIG_FILE}, so not a transformers "
                                      "LLaVA model; give a checkpoint of this task or a LLaVA directory / hub id")
            return False
        config = hub.read_json(path, f"{option} {text!r}: its")
    elif hub.looks_like_hub_id(text):
        try:
            config = _hub_config(text, option)
        except PretrainedError:
            if strict:
                raise
            return False
    else:
        return False
    model_type = config.get("model_type")
    if model_type == "llava":
        return True
    if strict:
        raise PretrainedError(f"{option} {text!r} is not a transformers LLaVA model (its config.json has model_type "
                              f"{model_type!r}, not 'llava'); give a checkpoint of this task or a LLaVA directory / "
                              "hub id")
    return False


def _hub_config(repo_id: str, option: str) -> dict[str, Any]:
    from transformers.utils import cached_file

    hub.check_cached(repo_id, option)
    try:
        path = cached_file(repo_id, hub.CONFIG_FILE, local_files_only=hub.is_offline())
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PretrainedError(f"{option} {repo_id!r}: cannot read its {hub.CONFIG_FILE}: {first}") from None
    return hub.read_json(path, f"{option} {repo_id!r}: its")


def check_importable(config: Any, name: str, option: str = "model.init") -> tuple[str, int]:
    """Raise :class:`PretrainedError` unless the ``LlavaConfig`` ``config`` maps onto our parts; returns the tower's
    transformers ``model_type`` and the feature layer."""
    where = f"{option} {name!r}"
    vision_type = getattr(config.vision_config, "model_type", None)
    if vision_type not in LLAVA_TOWERS:
        raise PretrainedError(f"{where}: its vision tower is {vision_type!r}; LLaVAs with a SigLIP or CLIP vision tower "
                              f"({', '.join(LLAVA_TOWERS)}) are supported")
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise PretrainedError(f"{where}: vision_feature_layer {layer!r} concatenates several layers; one layer (an int) "
                              "is supported")
    if config.vision_feature_select_strategy == "default" and LLAVA_TOWERS[vision_type][1] == 0:
        raise PretrainedError(f"{where}: vision_feature_select_strategy default on a SigLIP tower drops its first patch "
                              "(SigLIP has no class token), which our towers never do; only 'full' is supported there")
    if config.projector_hidden_act != "gelu":
        raise PretrainedError(f"{where}: projector_hidden_act {config.projector_hidden_act!r}; the mlp connector uses "
                              "exact GELU ('gelu')")
    if not config.multimodal_projector_bias:
        raise PretrainedError(f"{where}: multimodal_projector_bias false; the mlp connector's linears have biases")
    return vision_type, int(layer)


def read_llava_config(name: str | os.PathLike, option: str = "model.init") -> Any:
    """The checked ``LlavaConfig`` of the LLaVA ``name`` (directory or hub id; only its ``config.json`` is read)."""
    from transformers import LlavaConfig

    text = os.fspath(name)
    llava_source(text, option, strict=True)
    source = hub.resolve(text, option)
    try:
        config = LlavaConfig.from_pretrained(source, local_files_only=hub.is_offline())
    except (OSError, ValueError, TypeError) as err:
        raise PretrainedError(f"{option} {text!r}: cannot build its LlavaConfig: {_first_line(err)}") from None
    check_importable(config, text, option)
    return config


def load_llava(name: str | os.PathLike, option: str = "model.init", random_init: bool = False) -> LlavaParts:
    """The tower, ``mlp`` connector and LM of the LLaVA ``name`` (directory or hub id; :mod:`~mm_lightning.models.hub`'s
    rules: safetensors only, no remote code, the HF cache when offline), holding its tensors as loaded (float32).

    ``random_init``: its ``config.json`` alone, no weights read (the architecture of a run that started from it,
    rebuilt before its checkpoint is loaded).
    """
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    text = os.fspath(name)
    config = read_llava_config(text, option)
    source = hub.resolve(text, option)
    if random_init:
        llava = LlavaForConditionalGeneration._from_config(config, dtype=torch.float32)
    else:
        try:
            llava, info = hub.load_pretrained(LlavaForConditionalGeneration, text, option, dtype=torch.float32,
                                              output_loading_info=True, ignore_mismatched_sizes=True)
        except PretrainedError as err:
            raise PretrainedError(str(err).splitlines()[0]) from None
        except Exception as err:  # noqa: BLE001 - safetensors' and transformers' other load errors, one line too
            raise PretrainedError(f"{option} {text!r} could not be loaded: {type(err).__name__}: "
                                  f"{_first_line(err)}") from None
        problems = [(what, sorted(map(str, info.get(key) or []))) for key, what in
                    (("mismatched_keys", "of another shape than its config says"), ("missing_keys", "missing"),
                     ("unexpected_keys", "with no place in the architecture"))]
        for what, keys in problems:
            if keys:
                raise PretrainedError(f"{option} {text!r}: {len(keys)} weight(s) {what} ({keys[0]}, ...): its "
                                      f"model.safetensors does not fit its {hub.CONFIG_FILE}")
    llava.eval()
    config = llava.config
    vision_type, layer = check_importable(config, text, option)
    kind = HF_TOWERS[vision_type]
    ref = TowerRef("transformers", source, config.vision_config.to_dict(), directory=os.path.isdir(source), bundled=True)
    size, mean, std = hf_preprocessing(ref, kind, config.vision_config)
    if size != int(config.vision_config.image_size):
        raise PretrainedError(f"{option} {text!r}: its image processor gives {size} px images, its vision tower is "
                              f"built for {config.vision_config.image_size}")
    select = config.vision_feature_select_strategy
    tower = TransformersTower(llava.model.vision_tower, text, kind, size, mean, std, feature_layer=layer, select=select)
    with torch.device("meta"):  # no weights allocated: the base model and head are the LLaVA's
        lm = AutoModelForCausalLM.from_config(config.text_config)
    setattr(lm, lm.base_model_prefix, llava.model.language_model)
    lm.set_output_embeddings(llava.lm_head)
    if getattr(llava, "generation_config", None) is not None:
        lm.generation_config = llava.generation_config
    tokens, width = tower.token_shape()
    projector = llava.model.multi_modal_projector
    connector = MLPProjector(width, int(config.text_config.hidden_size), tokens)
    connector.fc1, connector.fc2 = projector.linear_1, projector.linear_2
    left = [n for n, t in [*lm.named_parameters(), *lm.named_buffers()] if t.is_meta]
    if left:
        raise PretrainedError(f"{option} {text!r}: its language model {type(lm).__name__} has tensors the LLaVA's "
                              f"language_model lacks ({left[0]})")
    lm.eval()
    return LlavaParts(tower, connector, lm, int(config.image_token_index), config)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
