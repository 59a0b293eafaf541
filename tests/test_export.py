"""experiments.export: trained models out in the formats their ecosystem loads (transformers, here), read back
with that ecosystem's own loaders; and recipe stages that export and hand the directory on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from experiments import export as export_cli
from experiments.recipe import RecipeError, load_recipe, stage_command
from mm_lightning.models.convert import ConversionError, timm_vit_to_siglip
from mm_lightning.models.vision import create_backbone
from mm_lightning.tasks.clip import CLIPTask
from tests.vlm_fixtures import shapes_tokenizer, tiny_task

VIT = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "class_token": False,
       "global_pool": "avg"}


def _save(task, path: Path) -> Path:
    """The checkpoint a run writes for ``task``: its state dict, hyper-parameters and (through the task's own
    hook) the model spec."""
    ckpt = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path


def _randomise(module: torch.nn.Module) -> None:
    """Every parameter away from its initial value (norms at 1/0 would hide a missing or swapped copy)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("pool", ["max", ""])
def test_a_timm_vit_converts_to_siglip_with_the_same_features(pool):
    torch.manual_seed(0)
    vit = create_backbone("vit_shapes", global_pool=pool, class_token=False).eval()
    _randomise(vit)
    siglip = timm_vit_to_siglip(vit)
    x = torch.randn(3, 3, 32, 32)
    out = siglip(pixel_values=x, output_hidden_states=True)
    ours = vit.forward_features(x)
    # a pooled tower's final norm is timm's fc_norm (after pooling): the blocks' output is the feature map
    theirs = out.hidden_states[-1] if pool else out.last_hidden_state
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert siglip.config.hidden_act == "gelu" and siglip.config.vision_use_head is False


def test_a_vit_siglip_cannot_represent_is_refused_naming_what_differs():
    with pytest.raises(ConversionError, match="class/register token"):
        timm_vit_to_siglip(create_backbone("vit_shapes", class_token=True))
    with pytest.raises(ConversionError, match="layer scale"):
        timm_vit_to_siglip(create_backbone("vit_shapes", class_token=False, global_pool="avg", init_values=0.1))
    with pytest.raises(ConversionError, match="only a timm VisionTransformer"):
        timm_vit_to_siglip(create_backbone("resnet18"))


def test_the_image_tower_of_a_clip_checkpoint_exports_to_a_transformers_siglip(tmp_path):
    from transformers import AutoImageProcessor, SiglipVisionModel

    torch.manual_seed(0)
    task = CLIPTask(image_backbone="vit_shapes", image_backbone_kwargs=VIT, embed_dim=16, vocab_size=50,
                    context_length=8, text_width=32, text_layers=1, text_heads=2)
    _randomise(task.model)
    ckpt = _save(task, tmp_path / "clip.ckpt")
    out = tmp_path / "siglip"
    export_cli.main(["--ckpt", str(ckpt), "--to", "siglip", "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]

    model = SiglipVisionModel.from_pretrained(out).eval()
    x = torch.randn(2, 3, 16, 16)
    tower = task.model.image_encoder.eval()
    with torch.no_grad():
        diff = (tower.forward_features(x) - model(pixel_values=x, output_hidden_states=True).hidden_states[-1]).abs().max()
    assert diff.item() <= 1e-5
    processor = AutoImageProcessor.from_pretrained(out)
    assert (processor.size["height"], processor.size["width"]) == (16, 16)  # the tower's (no run config here)

    # exporting again into the written directory is refused, and nothing there changes
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit) as exit_info:
        export_cli.main(["--ckpt", str(ckpt), "--to", "siglip", "--out", str(out)])
    assert exit_info.value.code == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_the_lm_of_an_mllm_checkpoint_exports_with_its_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = shapes_tokenizer(tmp_path)
    task = tiny_task(tokenizer, lora_r=4)
    with torch.no_grad():  # adapters away from zero, so a merge that drops them changes the logits
        for name, p in task.model.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ckpt = _save(task, tmp_path / "vlm.ckpt")
    out = tmp_path / "lm"
    export_cli.main(["--ckpt", str(ckpt), "--to", "causal-lm", "--out", str(out)])
    assert not any(p.name.endswith((".bin", ".pt", ".pth")) for p in out.iterdir())

    lm = AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([hf_tokenizer.encode("There is a red circle.")])
    task.model.lm.eval()
    with torch.no_grad():
        ours = task.model.lm(input_ids=ids).logits
        theirs = lm(input_ids=ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert hf_tokenizer.chat_template == tokenizer.hf.chat_template
    assert len(hf_tokenizer) == tokenizer.vocab_size  # <image> included


def test_export_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    torch.manual_seed(0)
    classifier = tmp_path / "resnet.ckpt"
    from mm_lightning.tasks.classification import ImageClassifier

    _save(ImageClassifier(backbone="resnet18", num_classes=3), classifier)
    cases = [
        (["--ckpt", str(tmp_path / "missing.ckpt"), "--to", "siglip"], "missing.ckpt: no such file"),
        (["--ckpt", str(classifier), "--to", "siglip"], "needs exactly one timm ViT image tower"),
        (["--ckpt", str(classifier), "--to", "causal-lm"], "needs a multimodal-LLM checkpoint"),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        with pytest.raises(SystemExit) as exit_info:
            export_cli.main([*args, "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and message in err and "\n" not in err, err
        assert not out.exists()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.export-")] == []


def test_a_recipe_export_stage_hands_its_directory_to_later_stages(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "stages:\n"
        f"  - {{name: clip, configs: [{config}]}}\n"
        "  - {name: tower, export: {from: clip, to: siglip}}\n"
        f"  - {{name: align, configs: [{config}], inputs: {{model.init_args.vision: tower, model.init_args.init: clip}}}}\n"
    )
    stages = load_recipe(str(recipe))["stages"]
    out = tmp_path / "runs"
    (out / "clip" / "checkpoints").mkdir(parents=True)
    (out / "clip" / "checkpoints" / "best.ckpt").write_bytes(b"")
    exports = frozenset({"tower"})
    cmd = stage_command(stages[1], out, [], [], exports)
    assert cmd[1:] == ["-m", "experiments.export", f"--ckpt={out / 'clip/checkpoints/best.ckpt'}", "--to=siglip",
                       f"--out={out / 'tower'}"]
    align = stage_command(stages[2], out, [], [], exports)
    assert f"--model.init_args.vision={out / 'tower'}" in align
    assert f"--model.init_args.init={out / 'clip/checkpoints/best.ckpt'}" in align

    for body, message in [
        ("  - {name: tower, export: {from: nowhere, to: siglip}}\n", "not an earlier training stage"),
        (f"  - {{name: clip, configs: [{config}]}}\n  - {{name: t, export: {{from: clip, to: onnx}}}}\n", "unknown format"),
        (f"  - {{name: clip, configs: [{config}]}}\n  - {{name: t, export: {{from: clip}}}}\n", "exactly 'from'"),
        (f"  - {{name: clip, configs: [{config}]}}\n  - {{name: t, export: {{from: clip, to: siglip}}, args: []}}\n",
         "unknown key"),
    ]:
        recipe.write_text("stages:\n" + body)
        with pytest.raises(RecipeError, match=message):
            load_recipe(str(recipe))
    assert os.path.isfile(config)


def test_recipe_overrides_skip_export_stages():
    from experiments.recipe import parse_overrides

    names, exports = ["lm", "lm_hf", "align"], frozenset({"lm_hf"})
    assert parse_overrides(["*:--trainer.max_epochs=1"], names, exports) == {
        "lm": ["--trainer.max_epochs=1"], "lm_hf": [], "align": ["--trainer.max_epochs=1"]}
    with pytest.raises(RecipeError, match="lm_hf is an export stage"):
        parse_overrides(["lm_hf:--x=1"], names, exports)
