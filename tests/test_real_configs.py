"""The real-size configs (experiments/configs/real/) build through experiments.run's CLI, and their networks have the
parameter counts that transformers, timm and open_clip give for the same published architectures.

Nothing is downloaded and no weight exists: each test writes the published architecture (config.json, as the hub
repository holds it) and a tokenizer of the published vocabulary size into ``tmp_path``, points the config's hub ids
at those directories (``random_init: true``: towers and LMs built from their config.json alone), and builds model,
data module and trainer under ``torch.device("meta")`` exactly as ``python -m experiments.run fit --config ...``
does, without allocating the 7 B parameters. A config whose architecture, stage or hyper-parameters drift from the
published recipe fails here.

``python -m tests.test_real_configs`` prints the parameter-count table of docs/real_models.md.
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import REPO

REAL = REPO / "experiments" / "configs" / "real"
PRESETS = REPO / "experiments" / "configs" / "presets"

# ------------------------------------------------------------------------------------- published architectures
# openai/clip-vit-large-patch14-336, config.json (the vision_config LLaVA-1.5 uses; text_config as published)
CLIP_L14_336_VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                       "num_attention_heads": 16, "image_size": 336, "patch_size": 14, "projection_dim": 768,
                       "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
CLIP_L14_336_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                     "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": 768, "hidden_act": "quick_gelu"}
# lmsys/vicuna-7b-v1.5, config.json (Llama-2-7B's architecture)
VICUNA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
             "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
# google/siglip-base-patch16-224, config.json
SIGLIP_B16_224_VISION = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                         "num_attention_heads": 12, "image_size": 224, "patch_size": 16}
SIGLIP_B16_224_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                       "vocab_size": 32000, "max_position_embeddings": 64}
# HuggingFaceTB/SmolLM2-135M-Instruct, config.json (a Llama; nanoVLM's VLMConfig lm_* fields say the same)
SMOLLM2_135M = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192, "rope_theta": 100000.0,
                "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
                "pad_token_id": 2}
# SmolLM2-Instruct's chat template (ChatML with a default system prompt), from its tokenizer_config.json
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# open_clip's src/open_clip/model_configs/ViT-B-32.json, and the count open_clip.create_model('ViT-B-32') gives
OPEN_CLIP_VIT_B32 = {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
                     "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}}
OPEN_CLIP_VIT_B32_PARAMS = 151_277_313
# timm.create_model('deit_base_patch16_224') (1000 classes)
DEIT_B16_PARAMS = 86_567_656
# the published totals the MLLM sums reproduce (tokenizer vocabulary as published, before <image> is added)
LLAVA15_7B_PARAMS = 7_062_902_784  # LLaVA-1.5-7B (vocab 32000; llava-hf's copy pads it to 32064: 7,063,427,072)
NANOVLM_222M_PARAMS = 222_081_600  # SigLIP-B/16 without its pooling head + SmolLM2-135M + 3072x576 projector


def n_params(module: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


# --------------------------------------------------------------------------------------------------- tokenizers
def write_bpe_tokenizer(directory: Path, vocab_size: int, specials: dict[int, str], **hf_kwargs: Any) -> Path:
    """A byte-level BPE tokenizer directory of exactly ``vocab_size`` ids: ``specials`` at their published ids, the
    256 byte symbols, then filler entries. Its merges are empty (texts encode byte by byte): what matters here is
    the vocabulary size and the special tokens, which size the embedding tables."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    symbols = iter(pre_tokenizers.ByteLevel.alphabet())
    filler = 0
    for i in range(vocab_size):
        if i in specials:
            vocab[specials[i]] = i
            continue
        symbol = next(symbols, None)
        if symbol is None:
            symbol, filler = f"<filler_{filler}>", filler + 1
        vocab[symbol] = i
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials.values()])
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **hf_kwargs)
    assert len(hf) == vocab_size
    hf.save_pretrained(str(directory))
    return directory


# ------------------------------------------------------------------------------- architectures as hub repositories
def write_vicuna_7b(directory: Path) -> Path:
    from transformers import LlamaConfig

    LlamaConfig(**VICUNA_7B).save_pretrained(directory)
    return write_bpe_tokenizer(directory, 32000, {0: "<unk>", 1: "<s>", 2: "</s>"},
                               unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def write_smollm2_135m_instruct(directory: Path) -> Path:
    from transformers import LlamaConfig

    LlamaConfig(**SMOLLM2_135M).save_pretrained(directory)
    write_bpe_tokenizer(directory, 49152, {0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>"},
                        unk_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|im_end|>")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    tok.chat_template = SMOLLM2_CHAT_TEMPLATE
    tok.save_pretrained(str(directory))
    return directory


def write_clip_vit_l14_336(directory: Path) -> Path:
    from transformers import CLIPConfig

    CLIPConfig(text_config=CLIP_L14_336_TEXT, vision_config=CLIP_L14_336_VISION, projection_dim=768).save_pretrained(
        directory)
    return directory


def write_siglip_b16_224(directory: Path) -> Path:
    from transformers import SiglipConfig

    SiglipConfig(text_config=SIGLIP_B16_224_TEXT, vision_config=SIGLIP_B16_224_VISION).save_pretrained(directory)
    return directory


def write_clip_tokenizer(directory: Path) -> Path:
    """OpenAI CLIP's BPE as open_clip uses it: 49408 ids, <|startoftext|> 49406 and <|endoftext|> 49407."""
    return write_bpe_tokenizer(directory, 49408, {49406: "<|startoftext|>", 49407: "<|endoftext|>"},
                               bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def write_mllm_architectures(root: str | os.PathLike) -> dict[str, Path]:
    """The four hub repositories of the MLLM configs as config-only directories under ``root`` (the GPU check uses
    them where the HF cache lacks the models)."""
    root = Path(root)
    writers = {"siglip": write_siglip_b16_224, "smollm2": write_smollm2_135m_instruct,
               "clip_l14_336": write_clip_vit_l14_336, "vicuna": write_vicuna_7b}
    out = {}
    for name, write in writers.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        out[name] = write(root / name)
    return out


# ----------------------------------------------------------------------------------------------------- building
def build_cli(configs: list[Path], overrides: list[str], run_dir: Path, device: str = "meta") -> Any:
    """model, data module and trainer of ``fit --config ... overrides`` as experiments.run builds them, on ``device``
    (meta: no memory for the weights)."""
    from experiments.run import MMLightningCLI

    args = [a for c in configs for a in ("--config", str(c))]
    args += [*overrides, "--prepare_data=false", "--logger=none", f"--trainer.default_root_dir={run_dir}"]
    with torch.device(device):
        return MMLightningCLI(args=args, run=False)


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # the configs' relative data paths point nowhere; nothing is prepared
    monkeypatch.setattr(sys, "argv", ["experiments.run"])
    monkeypatch.setenv("MM_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub id left in a config fails instead of downloading
    return tmp_path


def global_batch(cli: Any) -> int:
    """Samples per optimizer step on the config's own devices: batch x devices x nodes x accumulation."""
    trainer = cli.trainer
    return cli.datamodule.batch_size * trainer.num_devices * trainer.num_nodes * trainer.accumulate_grad_batches


# --------------------------------------------------------------------------------------------------- CLIP, ViT
def open_clip_vit_b32_params() -> int:
    open_clip = pytest.importorskip("open_clip")
    assert open_clip.get_model_config("ViT-B-32") == OPEN_CLIP_VIT_B32  # the architecture the config spells out
    return n_params(open_clip.create_model("ViT-B-32", device="meta"))


def build_clip_vit_b32(tmp: Path, *extra: str) -> Any:
    tokenizer = write_clip_tokenizer(tmp / "openai-clip")
    return build_cli([REAL / "clip_vit_b32.yaml"], [f"--tokenizer.init_args.path={tokenizer}", *extra], tmp / "run")


def test_clip_vit_b32_has_open_clips_parameter_count_and_recipe(cli_env: Path) -> None:
    cli = build_clip_vit_b32(cli_env)
    model = cli.model.model
    assert next(model.parameters()).device.type == "meta"
    assert n_params(model) == open_clip_vit_b32_params() == OPEN_CLIP_VIT_B32_PARAMS
    text = model.text_encoder
    assert (text.vocab_size, text.context_length) == (49408, 77)  # from the tokenizer, as open_clip's text_cfg
    task = cli.model
    assert (task.lr, task.betas, task.eps, task.weight_decay, task.warmup_steps) == (5e-4, (0.9, 0.98), 1e-6, 0.2, 2000)
    assert task.local_loss and task.gather_with_grad and task.loss_name == "clip"
    # the batch is contrastive: 256 per GPU and no accumulation (32768 = 128 GPUs x 256)
    assert cli.datamodule.batch_size == 256 and cli.trainer.accumulate_grad_batches == 1
    assert cli.trainer.max_epochs == 32
    assert cli.datamodule.pipeline.image_size == 224


def test_vit_b16_imagenet_has_timms_parameter_count_and_deits_recipe(cli_env: Path) -> None:
    import timm

    # on the CPU: timm's ModelEmaV3 (ema_decay) refuses a meta model; 86.6 M parameters (+ the EMA copy) are 0.7 GB
    cli = build_cli([REAL / "vit_b16_imagenet.yaml"], [], cli_env / "run", device="cpu")
    model = cli.model.model
    with torch.device("meta"):
        reference = timm.create_model("deit_base_patch16_224")
    assert n_params(model) == n_params(reference) == DEIT_B16_PARAMS
    task = cli.model
    assert global_batch(cli) == 1024  # DeiT-B: 16 GPUs x 64
    assert task.lr == pytest.approx(5e-4 * global_batch(cli) / 512)  # main.py's linear scaling
    assert (task.weight_decay, task.warmup_epochs, task.min_lr_ratio) == (0.05, 5, pytest.approx(1e-5 / 1e-3))
    assert cli.trainer.max_epochs == 300
    assert task.label_smoothing == 0.1 and task.mixup is not None
    assert (task.mixup.mixup_alpha, task.mixup.cutmix_alpha, task.mixup.switch_prob) == (0.8, 1.0, 0.5)
    assert task.hparams.drop_path_rate == 0.1 and task.ema is not None


# ------------------------------------------------------------------------------------------------------- MLLMs
def _mllm_loaders_landed() -> bool:
    from mm_lightning.tasks.vlm import VisionLanguageTask

    return "vision_source" in inspect.signature(VisionLanguageTask.__init__).parameters


needs_hub_towers = pytest.mark.skipif(
    not _mllm_loaders_landed(),
    reason="VisionLanguageTask cannot yet build transformers towers by hub id or directory (vision_source)")


def mllm_overrides(vision: Path, lm: Path) -> list[str]:
    return [f"--model.init_args.vision={vision}", f"--model.init_args.lm={lm}", f"--tokenizer.init_args.path={lm}",
            "--model.init_args.random_init=true"]


def mlp_params(vision_dim: int, lm_dim: int, downsample: int = 1) -> int:
    """Our ``mlp`` connector (LLaVA's mlp2x_gelu after an optional pixel shuffle): Linear(r^2 Dv, D) + GELU + Linear(D, D)."""
    d_in = vision_dim * downsample * downsample
    return d_in * lm_dim + lm_dim + lm_dim * lm_dim + lm_dim


def llava_reference(vocab_size: int) -> torch.nn.Module:
    """transformers' LlavaForConditionalGeneration of LLaVA-1.5-7B, on meta."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = {**VICUNA_7B, "vocab_size": vocab_size}
    config = LlavaConfig(vision_config=CLIPVisionConfig(**CLIP_L14_336_VISION), text_config=LlamaConfig(**text),
                         vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         image_token_index=32000)
    with torch.device("meta"):
        return LlavaForConditionalGeneration(config)


def siglip_smollm2_reference(vocab_size: int) -> dict[str, int]:
    """transformers' SiglipVisionModel and LlamaForCausalLM of the published configs, on meta, and our connector."""
    from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

    with torch.device("meta"):
        vision = SiglipVisionModel(SiglipVisionConfig(**SIGLIP_B16_224_VISION))
        lm = LlamaForCausalLM(LlamaConfig(**{**SMOLLM2_135M, "vocab_size": vocab_size}))
    return {"vision": n_params(vision), "vision_head": n_params(vision.head), "lm": n_params(lm),
            "connector": mlp_params(768, 576, downsample=2)}


@pytest.fixture(scope="module")
def mllm_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_mllm_architectures(tmp_path_factory.mktemp("hub"))


def build_llava(dirs: dict[str, Path], tmp: Path, *configs: Path, extra: tuple[str, ...] = ()) -> Any:
    return build_cli([REAL / "llava15_7b.yaml", *configs], [*mllm_overrides(dirs["clip_l14_336"], dirs["vicuna"]),
                                                            *extra], tmp / "run")


def build_siglip_smollm2(dirs: dict[str, Path], tmp: Path, *configs: Path, extra: tuple[str, ...] = ()) -> Any:
    return build_cli([REAL / "mllm_siglip_smollm2.yaml", *configs],
                     [*mllm_overrides(dirs["siglip"], dirs["smollm2"]), *extra], tmp / "run")


@needs_hub_towers
def test_llava15_7b_has_transformers_llava_parameter_count(mllm_dirs: dict[str, Path], cli_env: Path) -> None:
    cli = build_llava(mllm_dirs, cli_env)
    task = cli.model
    assert next(task.model.parameters()).device.type == "meta"
    vocab = task.tokenizer.vocab_size
    assert vocab == VICUNA_7B["vocab_size"] + 1  # <image> is added to Vicuna's 32000 ids: one more row in each table
    reference = llava_reference(vocab)
    assert n_params(task.model) == n_params(reference)
    assert n_params(task.model) - 2 * VICUNA_7B["hidden_size"] == n_params(llava_reference(32000)) == LLAVA15_7B_PARAMS
    assert task.num_image_tokens == (336 // 14) ** 2 == 576  # layer -2's patches, class token dropped
    assert n_params(task.model.connector) == n_params(reference.model.multi_modal_projector)
    # stage 2 (this file): projector + LM train, the tower is frozen
    assert n_params(task.model, trainable=True) == n_params(task.model.connector) + n_params(task.model.lm)
    assert (task.lr, task.weight_decay, task.warmup_epochs, task.min_lr_ratio) == (2e-5, 0.0, 0.03, 0.0)
    assert global_batch(cli) == 128 and cli.trainer.max_epochs == 1  # finetune.sh: 16 x 8 GPUs
    assert task.activation_checkpointing
    pipeline = cli.datamodule.pipeline
    assert pipeline.max_length == 2048 and pipeline.image_size == 336  # the tower's input size


@needs_hub_towers
def test_llava15_7b_pretrain_stage_trains_the_projector_only(mllm_dirs: dict[str, Path], cli_env: Path) -> None:
    cli = build_llava(mllm_dirs, cli_env, REAL / "llava15_7b_pretrain.yaml")
    task = cli.model
    assert task.stage == "align"
    assert n_params(task.model, trainable=True) == n_params(task.model.connector) == mlp_params(1024, 4096)
    assert (task.lr, task.weight_decay, task.warmup_epochs) == (1e-3, 0.0, 0.03)
    assert global_batch(cli) == 256 and cli.trainer.max_epochs == 1  # pretrain.sh: 32 x 8 GPUs


@needs_hub_towers
def test_llava15_7b_on_8_gpus_with_fsdp_builds(mllm_dirs: dict[str, Path], cli_env: Path) -> None:
    """The 8-GPU command of docs/real_models.md parses and builds (the strategy is set up only when fit starts)."""
    from mm_lightning.parallel import ModelParallel

    cli = build_llava(mllm_dirs, cli_env, PRESETS / "fsdp.yaml", extra=(
        "--trainer.accelerator=cpu", "--trainer.devices=8", "--trainer.accumulate_grad_batches=1",
        "--trainer.strategy.init_args.mixed_precision=bf16"))
    assert isinstance(cli.trainer.strategy, ModelParallel) and cli.trainer.strategy.mixed_precision == "bf16"
    assert global_batch(cli) == 128


@needs_hub_towers
def test_siglip_smollm2_has_transformers_parameter_count(mllm_dirs: dict[str, Path], cli_env: Path) -> None:
    cli = build_siglip_smollm2(mllm_dirs, cli_env)
    task = cli.model
    model = task.model
    assert next(model.parameters()).device.type == "meta"
    vocab = task.tokenizer.vocab_size
    assert vocab == SMOLLM2_135M["vocab_size"] + 1  # <image> added: one more row of the tied table
    ref = siglip_smollm2_reference(vocab)
    assert n_params(model.lm) == ref["lm"]
    assert n_params(model.connector) == ref["connector"] == 2_102_400
    assert n_params(model.vision) == ref["vision"]  # transformers' SiglipVisionModel, its pooling head included
    assert n_params(model) == ref["vision"] + ref["lm"] + ref["connector"]
    # against nanoVLM-222M: its ViT has no pooling head, its projector one bias-free Linear, its vocabulary 49152
    nano = NANOVLM_222M_PARAMS
    assert n_params(model) - nano == ref["vision_head"] + (ref["connector"] - 3072 * 576) + SMOLLM2_135M["hidden_size"]
    assert task.num_image_tokens == (224 // 16 // 2) ** 2 == 49
    assert n_params(model, trainable=True) == n_params(model)  # nanoVLM trains all three parts
    assert task.part_lr == {"vision": 1e-4, "connector": 2e-3, "lm": 1e-4}
    assert (task.weight_decay, task.min_lr_ratio) == (0.01, 0.1)
    assert task.warmup_epochs / cli.trainer.max_epochs == pytest.approx(0.03)  # 3% of all steps
    assert global_batch(cli) == 256 and cli.trainer.max_epochs == 5
    pipeline = cli.datamodule.pipeline
    assert pipeline.image_size == 224 and pipeline.max_length == 1024


@needs_hub_towers
def test_siglip_smollm2_align_stage_trains_the_projector_only(mllm_dirs: dict[str, Path], cli_env: Path) -> None:
    cli = build_siglip_smollm2(mllm_dirs, cli_env, REAL / "mllm_siglip_smollm2_align.yaml")
    task = cli.model
    assert task.stage == "align"
    assert n_params(task.model, trainable=True) == n_params(task.model.connector) == 2_102_400
    assert task.part_lr["connector"] == task.lr == 2e-3
    assert global_batch(cli) == 256 and cli.trainer.max_epochs == 1
    assert cli.datamodule.pipeline.max_length == 256


def test_every_real_config_is_tested() -> None:
    shipped = {p.name for p in REAL.glob("*.yaml")}
    assert shipped == {"clip_vit_b32.yaml", "vit_b16_imagenet.yaml", "llava15_7b.yaml", "llava15_7b_pretrain.yaml",
                       "mllm_siglip_smollm2.yaml", "mllm_siglip_smollm2_align.yaml"}


# ------------------------------------------------------------------------------------------------- the table
def main() -> None:
    """Print the parameter-count table (config, ours, library's, equal?) of docs/real_models.md."""
    import tempfile

    import timm

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.chdir(root)
        os.environ["MM_RUN_DIR"] = str(root / "run")
        cli = build_clip_vit_b32(root)
        rows.append(("clip_vit_b32", n_params(cli.model.model), "open_clip.create_model('ViT-B-32')",
                     open_clip_vit_b32_params()))
        cli = build_cli([REAL / "vit_b16_imagenet.yaml"], [], root / "run", device="cpu")
        with torch.device("meta"):
            deit = n_params(timm.create_model("deit_base_patch16_224"))
        rows.append(("vit_b16_imagenet", n_params(cli.model.model), "timm.create_model('deit_base_patch16_224')", deit))
        if _mllm_loaders_landed():
            dirs = write_mllm_architectures(root / "hub")
            cli = build_llava(dirs, root)
            vocab = cli.model.tokenizer.vocab_size
            rows.append(("llava15_7b", n_params(cli.model.model), f"LlavaForConditionalGeneration (vocab {vocab})",
                         n_params(llava_reference(vocab))))
            cli = build_siglip_smollm2(dirs, root)
            vocab = cli.model.tokenizer.vocab_size
            ref = siglip_smollm2_reference(vocab)
            rows.append(("mllm_siglip_smollm2", n_params(cli.model.model),
                         f"SiglipVisionModel + LlamaForCausalLM (vocab {vocab}) + mlp formula",
                         ref["vision"] + ref["lm"] + ref["connector"]))
        else:
            rows.append(("llava15_7b / mllm_siglip_smollm2", 0, "not built: transformers towers not landed yet", 0))
    print("| config | ours | library | library's | equal |")
    print("|---|---:|---|---:|---|")
    for name, ours, what, theirs in rows:
        print(f"| `{name}` | {ours:,} | {what} | {theirs:,} | {'yes' if ours == theirs and ours else 'NO'} |")


if __name__ == "__main__":
    main()
