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


# --- open_clip and timm ---------------------------------------------------------------------------------------------

OPEN_CLIP_SCRIPT = """
import sys
import torch, open_clip
out, inputs, result = sys.argv[1:4]
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + out)
tokenize = open_clip.get_tokenizer("local-dir:" + out)
data = torch.load(inputs)
with torch.no_grad():
    ids = tokenize(data["texts"])
    torch.save({"ids": ids, "image": model.eval().encode_image(data["image"], normalize=True),
                "text": model.encode_text(ids, normalize=True), "logit_scale": model.logit_scale.detach(),
                "logit_bias": None if model.logit_bias is None else model.logit_bias.detach(),
                "size": preprocess.transforms[0].size, "ours_imported": "mm_lightning" in sys.modules}, result)
"""

CAPTIONS = ["a photo of a red circle", "two small blue squares on a dark background", "a large green ring",
            "a triangle", "three crosses, one of them yellow"]


def _bpe_tokenizer(tmp_path: Path) -> Path:
    from mm_lightning.data.tokenizer import train_bpe_tokenizer
    from tests.vlm_fixtures import shapes_texts

    path = tmp_path / "tokenizer.json"
    train_bpe_tokenizer(shapes_texts(60) + CAPTIONS, vocab_size=400).save(str(path))
    return path


def _open_clip_run(out: Path, inputs: dict, tmp_path: Path) -> dict:
    """open_clip's embeddings of ``inputs`` from the export in ``out``, computed in a fresh interpreter that never
    imports mm_lightning (only open_clip, timm and transformers read the directory)."""
    import subprocess
    import sys

    torch.save(inputs, tmp_path / "inputs.pt")
    proc = subprocess.run([sys.executable, "-c", OPEN_CLIP_SCRIPT, str(out), str(tmp_path / "inputs.pt"),
                           str(tmp_path / "result.pt")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(tmp_path / "result.pt")
    assert result["ours_imported"] is False
    return result


@pytest.mark.parametrize("tower, pooling, bias", [
    ("vit_shapes", "eot", None),   # our registered ViT (+ kwargs): timm builds it from the export's image_tower/
    ("test_vit", "first", -3.0),   # a timm name built without arguments: open_clip's timm_model_name alone; SigLIP bias
])
def test_a_clip_checkpoint_exports_to_open_clip_with_the_same_embeddings(tmp_path, tower, pooling, bias):
    from mm_lightning.data.tokenizer import TextTokenizer

    tokenizer = TextTokenizer(_bpe_tokenizer(tmp_path), context_length=12)
    torch.manual_seed(0)
    size = 16 if tower == "vit_shapes" else 160
    task = CLIPTask(image_backbone=tower, image_backbone_kwargs=VIT if tower == "vit_shapes" else None, embed_dim=16,
                    vocab_size=tokenizer.vocab_size, context_length=12, text_width=32, text_layers=2, text_heads=2,
                    text_pooling=pooling, loss="siglip" if bias is not None else "clip",
                    init_logit_bias=bias if bias is not None else -10.0)
    _randomise(task.model)
    ckpt = _save(task, tmp_path / "clip.ckpt")
    out = tmp_path / "open_clip"
    export_cli.main(["--ckpt", str(ckpt), "--to", "open_clip", "--out", str(out), "--tokenizer",
                     str(tokenizer.path)])
    names = sorted(p.name for p in out.iterdir())
    assert "open_clip_config.json" in names and "open_clip_model.safetensors" in names and "tokenizer.json" in names
    assert ("image_tower" in names) == (tower == "vit_shapes")
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)

    image = torch.randn(4, 3, size, size)
    theirs = _open_clip_run(out, {"image": image, "texts": CAPTIONS}, tmp_path)
    clip = task.model.eval()
    enc = tokenizer(CAPTIONS)
    assert torch.equal(theirs["ids"], enc["input_ids"])  # open_clip's HFTokenizer gives our ids
    with torch.no_grad():
        ours_image, ours_text = clip.encode_image(image), clip.encode_text(enc["input_ids"], enc["attention_mask"])
    assert (ours_image * theirs["image"]).sum(-1).min().item() >= 0.9999
    assert (ours_text * theirs["text"]).sum(-1).min().item() >= 0.9999
    assert (ours_image - theirs["image"]).abs().max().item() <= 1e-5
    assert (ours_text - theirs["text"]).abs().max().item() <= 1e-5
    assert theirs["logit_scale"].item() == pytest.approx(clip.logit_scale.item())
    if bias is None:
        assert theirs["logit_bias"] is None
    else:
        assert theirs["logit_bias"].item() == pytest.approx(clip.logit_bias.item())
    assert list(theirs["size"]) == [size, size]


@pytest.mark.parametrize("tower, ema", [("vit_shapes", True), ("test_resnet", False)])
def test_a_classifier_checkpoint_exports_to_timm_with_the_same_logits(tmp_path, tower, ema):
    import json

    import timm

    from mm_lightning.tasks.classification import ImageClassifier

    torch.manual_seed(0)
    task = ImageClassifier(backbone=tower, backbone_kwargs=VIT if tower == "vit_shapes" else None, num_classes=3,
                           ema_decay=0.9 if ema else None)
    _randomise(task.model)
    if ema:  # the average away from the trained weights: the export must be the one the run evaluated
        _randomise(task.ema.module)
        with torch.no_grad():
            for p in task.ema.module.parameters():
                p.mul_(0.5)
    ckpt = _save(task, tmp_path / "cls.ckpt")
    out = tmp_path / "timm"
    export_cli.main(["--ckpt", str(ckpt), "--to", "timm", "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == ("vit_tiny_patch16_224" if tower == "vit_shapes" else tower)
    assert config["num_classes"] == 3 and config["pretrained_cfg"]["num_classes"] == 3
    assert not {"license", "tag", "hf_hub_id"} & set(config["pretrained_cfg"])  # not the published weights'

    size = 16 if tower == "vit_shapes" else 32
    assert config["pretrained_cfg"]["input_size"][1:] == ([size, size] if tower == "vit_shapes" else [160, 160])
    x = torch.randn(3, 3, size, size)
    evaluated = task._eval_model().eval()
    with torch.no_grad():
        ours = evaluated(x)
        by_dir = timm.create_model(f"local-dir:{out}", pretrained=True).eval()(x)
        args = {k: v for k, v in config.get("model_args", {}).items() if k != "num_classes"}
        by_name = timm.create_model(config["architecture"], pretrained=True, num_classes=3, pretrained_cfg_overlay=dict(
            file=str(out / "model.safetensors"), num_classes=3), **args).eval()(x)
    assert (ours - by_dir).abs().max().item() <= 1e-5
    assert (ours - by_name).abs().max().item() <= 1e-5
    if ema:
        with torch.no_grad():
            assert (task.model.eval()(x) - by_dir).abs().max().item() > 1e-3


def test_an_open_clip_export_takes_a_tokenizer_that_pads_with_its_end_of_text_token(tmp_path):
    """OpenAI's CLIP tokenizer pads with <|endoftext|>: open_clip's eos pooling takes the first, our eot the last
    unmasked one, the same token."""
    import open_clip
    from transformers import PreTrainedTokenizerFast

    from mm_lightning.data.tokenizer import TextTokenizer

    hf = PreTrainedTokenizerFast(tokenizer_file=str(_bpe_tokenizer(tmp_path)), bos_token="<|startoftext|>",
                                 eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    hf.save_pretrained(tmp_path / "eos_pads")
    tokenizer = TextTokenizer(tmp_path / "eos_pads", context_length=12)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    torch.manual_seed(0)
    task = CLIPTask(image_backbone="vit_shapes", image_backbone_kwargs=VIT, embed_dim=16, context_length=12,
                    vocab_size=tokenizer.vocab_size, text_width=32, text_layers=2, text_heads=2)
    _randomise(task.model)
    out = tmp_path / "open_clip"
    export_cli.main(["--ckpt", str(_save(task, tmp_path / "clip.ckpt")), "--to", "open_clip", "--out", str(out),
                     "--tokenizer", str(tmp_path / "eos_pads")])
    model = open_clip.create_model(f"local-dir:{out}").eval()
    ids = open_clip.get_tokenizer(f"local-dir:{out}")(CAPTIONS)
    enc = tokenizer(CAPTIONS)
    assert torch.equal(ids, enc["input_ids"]) and int(ids[0, -1]) == tokenizer.eos_token_id
    with torch.no_grad():
        ours = task.model.eval().encode_text(enc["input_ids"], enc["attention_mask"])
        diff = model.encode_text(ids, normalize=True) - ours
    assert diff.abs().max().item() <= 1e-5


def mm_test_outside_timm(pretrained: bool = False, **kwargs):
    """A timm model registered outside timm (as a user's own package would): timm cannot build it from a config."""
    from timm.models.vision_transformer import VisionTransformer

    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return VisionTransformer(**{**VIT, **kwargs})


def test_open_clip_and_timm_export_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    from timm.models import register_model

    from mm_lightning.tasks.classification import ImageClassifier

    torch.manual_seed(0)
    tokenizer = _bpe_tokenizer(tmp_path)
    small = {"image_backbone": "vit_shapes", "image_backbone_kwargs": VIT, "embed_dim": 16, "vocab_size": 400,
             "context_length": 8, "text_width": 32, "text_layers": 1, "text_heads": 2}
    clip = _save(CLIPTask(**small), tmp_path / "clip.ckpt")
    bidirectional = _save(CLIPTask(**small, text_causal=False), tmp_path / "bidir.ckpt")
    mean_pooled = _save(CLIPTask(**small, text_pooling="mean"), tmp_path / "mean.ckpt")
    classifier = _save(ImageClassifier(backbone="vit_shapes", backbone_kwargs=VIT, num_classes=3), tmp_path / "c.ckpt")
    import timm

    if not timm.is_model("mm_test_outside_timm"):
        register_model(mm_test_outside_timm)
    outside = _save(ImageClassifier(backbone="mm_test_outside_timm", num_classes=3), tmp_path / "o.ckpt")
    from tokenizers import Tokenizer, processors

    no_eos = Tokenizer.from_file(str(tokenizer))  # texts start with <|startoftext|> but do not end with <|endoftext|>
    no_eos.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A", special_tokens=[("<|startoftext|>", no_eos.token_to_id("<|startoftext|>"))])
    no_eos.save(str(tmp_path / "no_eos.json"))
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    tok = ["--tokenizer", str(tokenizer)]
    cases = [
        (["--ckpt", str(classifier), "--to", "open_clip", *tok], "--to open_clip needs a CLIP checkpoint"),
        (["--ckpt", str(clip), "--to", "timm"], "--to timm needs a classification checkpoint"),
        (["--ckpt", str(bidirectional), "--to", "open_clip", *tok], "model.text_causal: false"),
        (["--ckpt", str(mean_pooled), "--to", "open_clip", *tok], "model.text_pooling: mean"),
        (["--ckpt", str(clip), "--to", "open_clip"], "needs the run's text tokenizer"),
        (["--ckpt", str(clip), "--to", "open_clip", "--tokenizer", str(tmp_path / "none.json")], "none.json"),
        (["--ckpt", str(clip), "--to", "open_clip", "--tokenizer", str(tmp_path / "no_eos.json")],
         "do not end with their first end-of-text token"),
        (["--ckpt", str(classifier), "--to", "timm", *tok], "--tokenizer applies to --to open_clip only"),
        (["--ckpt", str(outside), "--to", "timm"], "outside timm"),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        with pytest.raises(SystemExit) as exit_info:
            export_cli.main([*args, "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and message in err and "\n" not in err, (message, err)
        assert not out.exists()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.export-")] == []
    for args in (["--ckpt", str(clip), "--to", "open_clip", *tok], ["--ckpt", str(classifier), "--to", "timm"]):
        with pytest.raises(SystemExit) as exit_info:
            export_cli.main([*args, "--out", str(full)])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and "exists and is not an empty directory" in err and "\n" not in err
        assert [p.name for p in full.iterdir()] == ["keep.txt"]
