"""Vision towers from every source (models/towers.py): timm by name / weights file / HF cache / hf-hub / directory,
transformers SigLIP / CLIP / DINOv2 directories and hub ids, full CLIP / SigLIP checkpoints, this framework's own
checkpoints; their token features against the library called directly (max abs difference 0 in float32), the
preprocessing they hand to the data pipeline (through experiments.run too), and one-line errors for bad inputs.

Every model here is a real architecture at tiny width, saved into tmp_path and loaded as a download would be.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from mm_lightning.data.chat_tokenizer import ChatTokenizer
from mm_lightning.data.conversations import ConversationPipeline
from mm_lightning.models.hub import PretrainedError
from mm_lightning.models.towers import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, TimmTower, TransformersTower, build_tower
from tests.conftest import REPO
from tests.vlm_fixtures import put_in_hub_cache, save_vision_model, tiny_task, write_shapes

TINY = str(REPO / "tests" / "configs" / "tiny_vlm.yaml")
#: a timm ViT with a class token (so that dropping it is visible), 4x4 patches of width 32, 2 blocks
TIMM_CLS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0,
            "class_token": True, "global_pool": "token"}
HALF = (0.5, 0.5, 0.5)
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], str]:
    directory = tmp_path_factory.mktemp("tower_shapes")
    shards = write_shapes(directory, train=16, val=8, test=8, samples_per_shard=8)
    return shards, str(directory / "chat_tokenizer")


@pytest.fixture(scope="module")
def tok(shapes) -> ChatTokenizer:
    return ChatTokenizer(shapes[1])


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, offline (HF_HUB_OFFLINE), as on a machine that downloaded models earlier."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def pixels(size: int = 32, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def tokens_of(task, image: torch.Tensor) -> torch.Tensor:
    """What the connector reads: the task's model in eval mode, the tower frozen as in every stage by default."""
    model = task.model.eval()
    return model.encode_image(image)


def same(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    assert ours.dtype == theirs.dtype == torch.float32
    assert ours.shape == theirs.shape, f"{what}: {tuple(ours.shape)} vs {tuple(theirs.shape)}"
    diff = (ours - theirs).abs().max().item()
    print(f"{what}: shape {tuple(ours.shape)}, max abs difference {diff}")
    assert diff == 0.0, what


def assert_pipeline_uses(pipeline, size: int, mean, std) -> None:
    """The pipeline's transforms resize to ``size`` and normalise with ``mean`` / ``std`` (read off the transforms and
    checked on a decoded image)."""
    from torchvision.transforms import v2

    for tf in (pipeline.train_tf, pipeline.eval_tf):
        norm = [t for t in tf.transforms if isinstance(t, v2.Normalize)]
        assert len(norm) == 1 and tuple(norm[0].mean) == tuple(mean) and tuple(norm[0].std) == tuple(std)
    image = torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8)
    out = pipeline.eval_tf(image)
    assert out.shape == (3, size, size)
    resized = v2.functional.resize(image, [size, size], antialias=True).float() / 255
    expected = (resized - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    assert torch.allclose(out, expected, atol=1e-6)


def pipeline_for(task, tok) -> ConversationPipeline:
    """The pipeline as experiments.run builds it: image size, mean and std unset, the task's values handed over."""
    return ConversationPipeline(tok, num_image_tokens=task.num_image_tokens, max_length=128,
                                tower_preprocessing=task.preprocessing)


# ------------------------------------------------------------------------------------------------ timm
def timm_source(seed: int = 0, **overrides):
    import timm

    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", num_classes=0, **{**TIMM_CLS, **overrides}).eval()


def test_timm_name_with_a_local_safetensors_weights_file(tok, tmp_path) -> None:
    from safetensors.torch import save_file

    src = timm_source(seed=3)
    weights = tmp_path / "tower.safetensors"
    save_file(src.state_dict(), str(weights))
    task = tiny_task(tok, vision="vit_tiny_patch16_224", vision_kwargs=TIMM_CLS, vision_weights=str(weights))
    assert isinstance(task.model.vision, TimmTower)
    x = pixels()
    same(tokens_of(task, x), src.forward_features(x)[:, 1:], "timm vision_weights vs forward_features[:, 1:]")
    assert task.num_image_tokens == 16  # the class token is not an image token
    # vit_tiny_patch16_224's pretrained_cfg: mean/std 0.5; the size is the built model's img_size, not the cfg's 224
    assert task.preprocessing == {"image_size": 32, "mean": HALF, "std": HALF}
    assert_pipeline_uses(pipeline_for(task, tok), 32, HALF, HALF)


def test_timm_feature_layer_takes_a_blocks_pre_norm_output(tok, tmp_path) -> None:
    from safetensors.torch import save_file

    src = timm_source(seed=4)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    x = pixels()
    with torch.no_grad():
        hidden = src.norm_pre(src.patch_drop(src._pos_embed(src.patch_embed(x))))
        first = src.blocks[0](hidden)  # hidden_states[1] == hidden_states[-2] of a 2-block ViT
    for layer in (-2, 1):
        task = tiny_task(tok, vision="vit_tiny_patch16_224", vision_kwargs=TIMM_CLS, vision_feature_layer=layer,
                         vision_weights=str(tmp_path / "w.safetensors"))
        same(tokens_of(task, x), first[:, 1:], f"timm vision_feature_layer {layer} vs blocks[0] output[:, 1:]")
    full = tiny_task(tok, vision="vit_tiny_patch16_224", vision_kwargs=TIMM_CLS, vision_feature_layer=-2,
                     vision_select="full", vision_weights=str(tmp_path / "w.safetensors"))
    same(tokens_of(full, x), first, "timm vision_select full keeps the class token")


def test_timm_pretrained_reads_the_hf_cache_offline(tok, hub_cache) -> None:
    """``vision_pretrained: true`` is timm's ``pretrained=True``: the weights of the name's default tag, found in the
    HF cache with HF_HUB_OFFLINE set (no network)."""
    from safetensors.torch import save_file

    src = timm_source(seed=5)
    repo = src.pretrained_cfg["hf_hub_id"]  # timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k
    staged = hub_cache.parent / "staged"
    staged.mkdir()
    save_file(src.state_dict(), str(staged / "model.safetensors"))
    put_in_hub_cache(hub_cache, repo, staged)
    task = tiny_task(tok, vision="vit_tiny_patch16_224", vision_kwargs=TIMM_CLS, vision_pretrained=True)
    x = pixels()
    same(tokens_of(task, x), src.forward_features(x)[:, 1:], f"timm pretrained=True from the HF cache ({repo})")
    plain = tiny_task(tok, vision="vit_tiny_patch16_224", vision_kwargs=TIMM_CLS)  # not asked: random weights
    assert not torch.equal(tokens_of(plain, x), tokens_of(task, x))


def test_timm_saved_directory_and_hf_hub_name(tok, tmp_path, hub_cache) -> None:
    """A timm model saved with ``save_for_hf`` (config.json with ``architecture``): as a local directory, and as
    ``hf-hub:org/name`` from the HF cache (timm semantics: weights with ``vision_pretrained``)."""
    from timm.models import save_for_hf

    src = timm_source(seed=6)
    saved = tmp_path / "timm_dir"
    save_for_hf(src, str(saved), model_args=TIMM_CLS, safe_serialization=True)
    x = pixels()
    expected = src.forward_features(x)[:, 1:]
    task = tiny_task(tok, vision=str(saved), vision_kwargs=None)
    assert isinstance(task.model.vision, TimmTower)
    same(tokens_of(task, x), expected, "timm saved directory vs forward_features[:, 1:]")
    put_in_hub_cache(hub_cache, "someone/tiny-vit", saved)
    hub = tiny_task(tok, vision="hf-hub:someone/tiny-vit", vision_kwargs=None, vision_pretrained=True)
    same(tokens_of(hub, x), expected, "timm hf-hub: name from the HF cache")
    auto = tiny_task(tok, vision="someone/tiny-vit", vision_kwargs=None)  # org/name whose config is timm's
    same(tokens_of(auto, x), expected, "org/name hub id with a timm config")


# -------------------------------------------------------------------------------------- transformers
def test_siglip_directory_gives_hidden_states_minus_1_every_patch(tok, tmp_path) -> None:
    from transformers import SiglipVisionModel

    directory = save_vision_model("siglip", tmp_path / "siglip")
    task = tiny_task(tok, vision=str(directory), vision_kwargs=None)
    assert isinstance(task.model.vision, TransformersTower)
    x = pixels()
    with torch.no_grad():
        out = SiglipVisionModel.from_pretrained(directory)(x, output_hidden_states=True)
    same(tokens_of(task, x), out.hidden_states[-1], "SiglipVisionModel hidden_states[-1]")
    # LLaVA reads hidden_states[-1], before post_layernorm: last_hidden_state is another tensor
    assert not torch.allclose(out.hidden_states[-1], out.last_hidden_state)
    assert task.num_image_tokens == 16  # no class token: 'default' keeps every patch
    assert task.preprocessing == {"image_size": 32, "mean": HALF, "std": HALF}
    assert_pipeline_uses(pipeline_for(task, tok), 32, HALF, HALF)


def test_siglip_hub_id_from_the_hf_cache(tok, tmp_path, hub_cache) -> None:
    from transformers import SiglipVisionModel

    directory = save_vision_model("siglip", tmp_path / "siglip", seed=2)
    put_in_hub_cache(hub_cache, "google/siglip-base-patch16-224", directory)
    task = tiny_task(tok, vision="google/siglip-base-patch16-224", vision_kwargs=None)
    x = pixels()
    with torch.no_grad():
        expected = SiglipVisionModel.from_pretrained("google/siglip-base-patch16-224")(x, output_hidden_states=True)
    same(tokens_of(task, x), expected.hidden_states[-1], "google/siglip-base-patch16-224 (cached) hidden_states[-1]")
    assert task.preprocessing["mean"] == HALF



def test_preprocessor_config_decides_the_normalisation_else_the_class_default(tok, tmp_path) -> None:
    """A SigLIP directory whose image processor says ImageNet's mean/std at 32 px (as a tower we exported from a
    run trained that way would): those, not SigLIP's 0.5. Without preprocessor_config.json: SigLIP's processor
    default (0.5) and the config's image_size."""
    from transformers import SiglipImageProcessor

    directory = save_vision_model("siglip", tmp_path / "siglip", processor=False, image_size=24)
    SiglipImageProcessor(size={"height": 24, "width": 24}, image_mean=list(IMAGENET[0]),
                         image_std=list(IMAGENET[1])).save_pretrained(directory)
    task = tiny_task(tok, vision=str(directory), vision_kwargs=None)
    assert task.preprocessing == {"image_size": 24, "mean": IMAGENET[0], "std": IMAGENET[1]}
    assert_pipeline_uses(pipeline_for(task, tok), 24, *IMAGENET)
    (directory / "preprocessor_config.json").unlink()
    bare = tiny_task(tok, vision=str(directory), vision_kwargs=None)
    assert bare.preprocessing == {"image_size": 24, "mean": HALF, "std": HALF}
    assert bare.num_image_tokens == 9  # 3x3 patches of 8 px

@pytest.mark.parametrize("select", ["default", "full"])
def test_clip_directory_layer_minus_2_class_token_dropped(tok, tmp_path, select: str) -> None:
    from transformers import CLIPVisionModel

    directory = save_vision_model("clip", tmp_path / "clip")
    task = tiny_task(tok, vision=str(directory), vision_kwargs=None, vision_select=select)
    x = pixels()
    with torch.no_grad():
        hidden = CLIPVisionModel.from_pretrained(directory)(x, output_hidden_states=True).hidden_states
    expected = hidden[-2][:, 1:] if select == "default" else hidden[-2]
    same(tokens_of(task, x), expected, f"CLIPVisionModel hidden_states[-2]{'[:, 1:]' if select == 'default' else ''}")
    assert task.num_image_tokens == (16 if select == "default" else 17)
    assert task.preprocessing == {"image_size": 32, "mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD}
    assert_pipeline_uses(pipeline_for(task, tok), 32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    other = tiny_task(tok, vision=str(directory), vision_kwargs=None, vision_feature_layer=-1)
    same(tokens_of(other, x), hidden[-1][:, 1:], "CLIP vision_feature_layer -1")


@pytest.mark.parametrize(("kind", "dropped"), [("dinov2", 1), ("dinov2_registers", 3)])
def test_dinov2_directory_drops_class_and_register_tokens(tok, tmp_path, kind: str, dropped: int) -> None:
    import transformers

    directory = save_vision_model(kind, tmp_path / kind)
    task = tiny_task(tok, vision=str(directory), vision_kwargs=None)
    cls = transformers.Dinov2Model if kind == "dinov2" else transformers.Dinov2WithRegistersModel
    x = pixels()  # 32 px: the processor's crop, while the config says 48 (DINOv2 interpolates its positions)
    with torch.no_grad():
        hidden = cls.from_pretrained(directory)(x, output_hidden_states=True).hidden_states
    same(tokens_of(task, x), hidden[-1][:, dropped:], f"{cls.__name__} hidden_states[-1][:, {dropped}:]")
    assert task.num_image_tokens == 16
    assert task.preprocessing == {"image_size": 32, "mean": IMAGENET[0], "std": IMAGENET[1]}
    assert_pipeline_uses(pipeline_for(task, tok), 32, *IMAGENET)


@pytest.mark.parametrize("kind", ["clip_full", "siglip_full"])
def test_full_clip_or_siglip_checkpoint_gives_its_vision_half(tok, tmp_path, kind: str) -> None:
    import transformers

    directory = save_vision_model(kind, tmp_path / kind)
    assert json.loads((directory / "config.json").read_text())["model_type"] == kind.split("_")[0]
    task = tiny_task(tok, vision=str(directory), vision_kwargs=None)
    full = (transformers.CLIPModel if kind == "clip_full" else transformers.SiglipModel).from_pretrained(directory)
    x = pixels()
    with torch.no_grad():
        hidden = full.vision_model(x, output_hidden_states=True).hidden_states
    expected = hidden[-2][:, 1:] if kind == "clip_full" else hidden[-1]
    same(tokens_of(task, x), expected, f"{type(full).__name__}.vision_model features")
    assert not any("text" in k for k in task.model.vision.state_dict())  # only the vision half was built


def test_own_clip_checkpoint_through_vision_init(tok, tmp_path) -> None:
    from mm_lightning.tasks.clip import CLIPTask
    from tests.vlm_fixtures import TINY_VISION

    torch.manual_seed(7)
    clip = CLIPTask(image_backbone="vit_tiny_patch16_224", image_backbone_kwargs=TINY_VISION, vocab_size=64,
                    context_length=8, text_width=32, text_layers=1, text_heads=2)
    ckpt = tmp_path / "clip.ckpt"
    torch.save({"state_dict": clip.state_dict()}, ckpt)
    task = tiny_task(tok, vision_init=str(ckpt))
    task.setup("fit")
    x = pixels()
    encoder = clip.model.image_encoder.eval()
    same(tokens_of(task, x), encoder.forward_features(x), "vision_init (our CLIP) vs its image encoder")


def test_random_init_reads_only_the_config(tok, tmp_path) -> None:
    directory = save_vision_model("siglip", tmp_path / "siglip", seed=5)  # not tiny_task's seed: other weights
    loaded = tiny_task(tok, vision=str(directory), vision_kwargs=None)
    (directory / "model.safetensors").unlink()  # nothing left to read but config.json and the processor's
    fresh = tiny_task(tok, vision=str(directory), vision_kwargs=None, random_init=True)
    assert fresh.num_image_tokens == loaded.num_image_tokens and fresh.preprocessing == loaded.preprocessing
    assert not torch.equal(tokens_of(fresh, pixels()), tokens_of(loaded, pixels()))
    timm_task = tiny_task(tok, vision_kwargs=TIMM_CLS, vision_weights=str(tmp_path / "absent.safetensors"),
                          random_init=True)  # not opened
    assert timm_task.num_image_tokens == 16


def test_explicit_mean_and_std_win_over_the_towers(tok, tmp_path) -> None:
    directory = save_vision_model("clip", tmp_path / "clip")
    task = tiny_task(tok, vision=str(directory), vision_kwargs=None)
    pipe = ConversationPipeline(tok, num_image_tokens=task.num_image_tokens, max_length=128, image_size=32,
                                mean=HALF, std=HALF, tower_preprocessing=task.preprocessing)
    assert_pipeline_uses(pipe, 32, HALF, HALF)


# --------------------------------------------------------------------------------------- through the CLI
def cli_flags(shapes) -> list[str]:
    shards, tokenizer = shapes
    return [f"--data.{s}={spec}" for s, spec in shards.items()] + [f"--tokenizer.init_args.path={tokenizer}",
                                                                   "--prepare_data=false", "--logger=none"]


def build_cli(args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from experiments.run import MMLightningCLI

    monkeypatch.setattr(sys, "argv", ["experiments.run"])
    monkeypatch.setenv("MM_RUN_DIR", str(tmp_path / "run"))
    return MMLightningCLI(args=[*args, f"--trainer.default_root_dir={tmp_path / 'run'}"], run=False)


def test_run_hands_the_towers_preprocessing_to_the_pipeline(shapes, tmp_path, monkeypatch) -> None:
    directory = save_vision_model("clip", tmp_path / "clip")
    cli = build_cli(["--config", TINY, *cli_flags(shapes), f"--model.init_args.vision={directory}",
                     "--model.init_args.vision_kwargs=null"], tmp_path, monkeypatch)
    pipeline = cli.datamodule.pipeline
    assert (pipeline.image_size, pipeline.mean, pipeline.std) == (32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    assert_pipeline_uses(pipeline, 32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    assert pipeline.num_image_tokens == cli.model.num_image_tokens == 16


SHAPES_STACKS = [
    ["mllm_mlp_shapes.yaml"], ["mllm_qformer_shapes.yaml"], ["mllm_xattn_shapes.yaml"],
    ["mllm_mlp_shapes.yaml", "stages/mllm_align.yaml"], ["mllm_mlp_shapes.yaml", "stages/mllm_noisy_sft.yaml"],
    ["mllm_mlp_shapes.yaml", "stages/dpo_shapes.yaml"],
]


@pytest.mark.parametrize("stack", SHAPES_STACKS, ids=["+".join(Path(c).stem for c in s) for s in SHAPES_STACKS])
def test_shipped_shapes_configs_keep_32_px_and_half_normalisation(shapes, tmp_path, monkeypatch, stack) -> None:
    """The shapes configs no longer spell image_size / mean / std: their timm tower (img_size 32, vit_tiny's
    pretrained_cfg 0.5 / 0.5) gives the numbers they spelled before."""
    configs = [a for c in stack for a in ("--config", str(REPO / "experiments" / "configs" / c))]
    cli = build_cli([*configs, *cli_flags(shapes)], tmp_path, monkeypatch)
    pipeline = cli.datamodule.pipeline
    for key in ("image_size", "mean", "std"):  # not in the config: from the tower
        assert cli.config["data"]["pipeline"]["init_args"].get(key) is None, key
    assert (pipeline.image_size, pipeline.mean, pipeline.std) == (32, HALF, HALF)
    assert_pipeline_uses(pipeline, 32, HALF, HALF)


def run_main(args: list[str], capsys) -> tuple[int, str]:
    from experiments.run import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # (Lightning may log "Seed set" too)
    assert len(errors) == 1, err
    return exit_info.value.code, errors[0]


def test_bad_tower_through_run_exits_2_with_one_line_and_writes_nothing(shapes, tmp_path, capsys,
                                                                        monkeypatch) -> None:
    from transformers import LlamaConfig

    llama = tmp_path / "llama"
    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=64).save_pretrained(llama)
    run = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["experiments.run"])
    code, err = run_main(["fit", "--config", TINY, *cli_flags(shapes), f"--model.init_args.vision={llama}",
                          f"--trainer.default_root_dir={run}"], capsys)
    print(err)
    assert code == 2 and "\n" not in err
    assert err.endswith(f"model.vision '{llama}': model_type 'llama' is not a supported vision tower (supported: clip, "
                        "clip_vision_model, dinov2, dinov2_with_registers, siglip, siglip_vision_model; or a timm model)")
    assert not (run / "config.yaml").exists() and not (run / "checkpoints").exists()
    code, err = run_main(["fit", "--config", TINY, *cli_flags(shapes), "--data.pipeline.init_args.image_size=64",
                          f"--trainer.default_root_dir={run}"], capsys)
    print(err)
    assert code == 2 and "\n" not in err
    assert ("data.pipeline.init_args.image_size 64 differs from the vision tower's input size 32: drop image_size "
            "(the tower's is used) or set model.init_args.image_size 64") in err
    assert not (run / "config.yaml").exists() and not (run / "checkpoints").exists()


# ------------------------------------------------------------------------------------------ bad inputs
def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    print(message)
    assert "\n" not in message
    return message


def test_unknown_tower_type_names_it_and_the_supported(tmp_path) -> None:
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=64).save_pretrained(tmp_path / "llama")
    with pytest.raises(PretrainedError) as err:
        build_tower(str(tmp_path / "llama"))
    assert one_line(err) == (f"model.vision '{tmp_path / 'llama'}': model_type 'llama' is not a supported vision tower "
                             "(supported: clip, clip_vision_model, dinov2, dinov2_with_registers, siglip, "
                             "siglip_vision_model; or a timm model)")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(PretrainedError) as err:
        build_tower(str(tmp_path / "odd"))
    assert "neither model_type (a transformers model) nor architecture (a timm model)" in one_line(err)


def test_directory_without_config(tmp_path) -> None:
    directory = save_vision_model("siglip", tmp_path / "siglip")
    (directory / "config.json").unlink()
    with pytest.raises(PretrainedError) as err:
        build_tower(str(directory))
    assert one_line(err) == (f"model.vision '{directory}': the directory holds no config.json (is it a model saved "
                             "with save_pretrained?)")


def test_weights_of_another_width_name_the_path(tmp_path) -> None:
    directory = save_vision_model("siglip", tmp_path / "siglip")
    wide = save_vision_model("siglip", tmp_path / "wide", hidden_size=48)
    shutil.copy(wide / "model.safetensors", directory / "model.safetensors")  # config says 32, weights are 48 wide
    with pytest.raises(PretrainedError) as err:
        build_tower(str(directory))
    message = one_line(err)
    assert message.startswith(f"model.vision '{directory}': ") and "do not fit its config.json" in message
    assert "(48,) vs (32,)" in message or "48) vs (" in message


def test_timm_weights_file_of_another_width_names_the_file(tmp_path) -> None:
    from safetensors.torch import save_file

    weights = tmp_path / "wide.safetensors"
    save_file(timm_source(embed_dim=48, num_heads=2).state_dict(), str(weights))
    with pytest.raises(PretrainedError) as err:
        build_tower("vit_tiny_patch16_224", TIMM_CLS, weights=str(weights))
    message = one_line(err)
    assert message.startswith(f"model.vision_weights '{weights}' does not fit the timm model 'vit_tiny_patch16_224' "
                              "built with vision_kwargs")
    assert "size mismatch for" in message and "torch.Size([1, 1, 48])" in message


def test_patch_grid_that_the_connector_cannot_reduce(tok, tmp_path) -> None:
    directory = save_vision_model("siglip", tmp_path / "siglip", image_size=40)  # 5x5 patches of 8 px
    with pytest.raises(ValueError) as err:
        tiny_task(tok, vision=str(directory), vision_kwargs=None,
                  connector_kwargs={"downsample": 2, "pool": "pixel_shuffle"})
    assert one_line(err) == ("model.connector_kwargs.downsample=2 does not divide the vision tower's 5x5 patch grid "
                             "(25 tokens): choose a downsample that divides 5, or another image size")
    clip = save_vision_model("clip", tmp_path / "clip")  # 'full' keeps CLIP's class token: 17 tokens, no square
    with pytest.raises(ValueError) as err:
        tiny_task(tok, vision=str(clip), vision_kwargs=None, vision_select="full", connector_kwargs={"downsample": 2})
    assert one_line(err) == ("model.connector_kwargs.downsample=2 needs a square grid of visual tokens; the vision "
                             "tower gives 17 tokens (a class token kept? model.vision_select: default drops it)")


def test_pipeline_image_size_other_than_the_towers(tok, tmp_path) -> None:
    directory = save_vision_model("siglip", tmp_path / "siglip")
    task = tiny_task(tok, vision=str(directory), vision_kwargs=None)
    with pytest.raises(ValueError) as err:
        ConversationPipeline(tok, num_image_tokens=task.num_image_tokens, image_size=64,
                             tower_preprocessing=task.preprocessing)
    assert one_line(err) == ("data.pipeline.init_args.image_size 64 differs from the vision tower's input size 32: "
                             "drop image_size (the tower's is used) or set model.init_args.image_size 64")


def test_feature_layer_outside_the_tower(tmp_path) -> None:
    directory = save_vision_model("clip", tmp_path / "clip")
    with pytest.raises(ValueError) as err:
        build_tower(str(directory), feature_layer=-5)
    assert one_line(err) == (f"model.vision_feature_layer -5 is outside the 3 layers of '{directory}' (hidden_states "
                             "has 4 entries: -4..3)")


def test_hub_id_not_cached_offline(hub_cache) -> None:
    with pytest.raises(PretrainedError) as err:
        build_tower("google/siglip-base-patch16-224")
    assert one_line(err) == ("model.vision 'google/siglip-base-patch16-224' is not in the Hugging Face cache and "
                             "HF_HUB_OFFLINE is set: download it first (hf download google/siglip-base-patch16-224) or "
                             "unset HF_HUB_OFFLINE")



def test_checkpoints_from_before_the_wrapper_still_load(tok, tmp_path) -> None:
    """Checkpoints written when the timm model was ``model.vision`` itself (keys ``model.vision.<timm key>``) load
    into the wrapped tower (``model.vision.model.<timm key>``): strictly, and as ``model.init``."""
    old = tiny_task(tok)
    torch.nn.init.normal_(old.model.vision.model.patch_embed.proj.weight)  # not what a fresh task draws
    legacy = {k.replace("model.vision.model.", "model.vision.", 1): v for k, v in old.state_dict().items()}
    assert "model.vision.patch_embed.proj.weight" in legacy
    strict = tiny_task(tok)
    strict.load_state_dict(legacy)
    path = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": legacy}, path)
    fresh = tiny_task(tok, init=str(path))
    fresh.setup("fit")
    for task in (strict, fresh):
        assert torch.equal(task.model.vision.model.patch_embed.proj.weight, old.model.vision.model.patch_embed.proj.weight)
