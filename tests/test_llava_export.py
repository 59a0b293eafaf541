"""Multimodal LLMs out to, and in from, transformers' LLaVA (mm_lightning/models/llava.py: ``--to llava``,
``init: LLAVA``), and out to our own layout (``--to mm-lightning``, ``VisionLanguageModel.from_pretrained``).

(a) a model with a transformers SigLIP / CLIP tower, the mlp connector and a transformers LM exports to a directory
    that ``LlavaForConditionalGeneration`` / ``AutoProcessor`` load with no code of ours; the LLaVA's logits equal
    ours on a batch built by transformers' own processor (<= 1e-4) and its greedy ``generate`` gives our tokens;
(b) a tiny transformers LLaVA imported as ``model.init`` computes the LLaVA's logits, and exporting it again gives
    back every tensor bit for bit;
(c) a DPO stage starts from an imported LLaVA (policy and reference hold its weights): step-0 loss ln 2;
(d) what LLaVA cannot represent, a timm tower, a non-empty DIR and an ``init`` directory that is not a LLaVA are each
    one line, exit 2, nothing written.

Every model is a real architecture at tiny width saved into tmp_path and loaded as a download would be.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from experiments import export as export_cli
from mm_lightning.data.chat_tokenizer import ChatTokenizer
from mm_lightning.data.conversations import encode_segments
from mm_lightning.data.samples import image_transforms
from mm_lightning.models.hub import PretrainedError
from mm_lightning.models.towers import OPENAI_CLIP_MEAN
from mm_lightning.tasks.vlm import VisionLanguageTask
from tests.alignment_fixtures import data, data_dir, tok, trainer  # noqa: F401 (fixtures)
from tests.conftest import REPO, colour_image
from tests.test_hub_lm import save_tokenizer, saved_lm
from tests.test_towers import hub_cache  # noqa: F401 (fixture)
from tests.vlm_fixtures import TINY_HF_VISION, TINY_LM, put_in_hub_cache, save_vision_model, shapes_tokenizer, tiny_task

QUESTIONS = ["What colour is the shape?", "Where is the square?", "Is there a circle?"]


# --------------------------------------------------------------------------------------------------- helpers
def randomise(module: torch.nn.Module, seed: int = 3, scale: float = 0.2) -> None:
    """Every floating parameter away from its initial value (norms at 1 / biases at 0 would hide a missing copy)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def save_ckpt(task: VisionLanguageTask, run: Path, summary: dict[str, Any] | None = None) -> Path:
    """The checkpoint a run writes (state dict + hyper-parameters) as RUN/checkpoints/last.ckpt, with the run's
    summary.json and a config.yaml beside it."""
    (run / "checkpoints").mkdir(parents=True)
    ckpt = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(ckpt)
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
        (run / "config.yaml").write_text("model:\n  class_path: mm_lightning.tasks.vlm.VisionLanguageTask\n")
    return run / "checkpoints" / "last.ckpt"


def export(ckpt: Path, out: Path) -> Path:
    export_cli.main(["--ckpt", str(ckpt), "--to", "llava", "--out", str(out)])
    return out


def images(n: int = 3, size: int = 32) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [colour_image(i % 4, rng, size) for i in range(n)]


def our_pixels(task: VisionLanguageTask, arrays: list[np.ndarray]) -> torch.Tensor:
    """Our evaluation transform (the conversation pipeline's) at the tower's preprocessing."""
    prep = task.preprocessing
    transform = image_transforms(prep["image_size"], False, mean=prep["mean"], std=prep["std"])
    return torch.stack([transform(torch.from_numpy(a).permute(2, 0, 1)) for a in arrays])


def prompt_messages(question: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def siglip_qwen2_task(root: Path, **kwargs: Any) -> VisionLanguageTask:
    """A SigLIP directory (every patch, hidden_states[-1]) + a Qwen2 LM directory with its Qwen2.5 tokenizer and chat
    template (<image> added as id 420), joined by a fresh mlp connector; LoRA adapters away from zero."""
    tower = save_vision_model("siglip", root / "siglip")
    lm = saved_lm(root / "qwen2", "qwen2", vocab_size=420, tokenizer=save_tokenizer(root / "qwen_tok", "qwen2.5"))
    torch.manual_seed(0)
    task = VisionLanguageTask(ChatTokenizer(lm), vision=str(tower), lm=str(lm), connector="mlp", **kwargs)
    randomise(task.model.connector)
    with torch.no_grad():  # adapters away from zero: an export that drops them changes the logits
        for name, p in task.model.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return task


def clip_llama_task(root: Path, **kwargs: Any) -> VisionLanguageTask:
    """A CLIP directory (class token dropped, hidden_states[-2]) + a Llama built from its config (untied: with tied
    embeddings a random tiny Llama repeats its last token whatever the image), with the shapes chat tokenizer
    (<image> id 5)."""
    tower = save_vision_model("clip", root / "clip")
    torch.manual_seed(0)
    task = VisionLanguageTask(shapes_tokenizer(root), vision=str(tower), lm=dict(TINY_LM, tie_word_embeddings=False),
                              connector="mlp", **kwargs)
    randomise(task.model.connector)
    randomise(task.model.lm, seed=4, scale=0.1)
    return task


MODELS = {"siglip-qwen2": (siglip_qwen2_task, {"lora_r": 4}, "full", -1),
          "clip-llama": (clip_llama_task, {}, "default", -2)}


# ------------------------------------------------------------------------------------------ (a) export
@pytest.mark.parametrize("name", list(MODELS))
def test_export_loads_in_transformers_with_our_logits_and_generations(name: str, tmp_path: Path) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

    build, options, strategy, layer = MODELS[name]
    task = build(tmp_path, **options).eval()
    tok = task.tokenizer
    ckpt = save_ckpt(task, tmp_path / "run", summary={"val/vqa_exact_match": 0.8125, "val/loss": 0.25})
    out = export(ckpt, tmp_path / "llava")
    files = sorted(p.name for p in out.iterdir())
    print(f"{name}: {files}")
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "README.md"} <= set(files)
    assert not any(f.endswith((".bin", ".pt", ".pth", ".ckpt")) for f in files)
    readme = (out / "README.md").read_text()
    assert "| val/vqa_exact_match | 0.8125 |" in readme
    assert f"python -m experiments.run fit --config {(tmp_path / 'run' / 'config.yaml').resolve()}" in readme

    llava = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert isinstance(processor, LlavaProcessor)
    config = llava.config
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (layer, strategy)
    assert config.image_token_index == tok.image_token_id and config.projector_hidden_act == "gelu"
    assert config.multimodal_projector_bias is True
    assert processor.patch_size == 8 and processor.vision_feature_select_strategy == strategy
    assert processor.num_additional_image_tokens == (1 if name.startswith("clip") else 0)

    task.merge_lora()  # our reference: the model with its adapters (merging is exact up to float rounding)
    model = task.model.eval()
    arrays = images()
    prompts = [processor.apply_chat_template(prompt_messages(q), add_generation_prompt=True) for q in QUESTIONS]
    enc = processor(images=[Image.fromarray(a) for a in arrays], text=prompts, padding=True, return_tensors="pt")
    # transformers' processor gives our pipeline's pixels and our ids (the image expanded to our 16 tokens)
    pixel_diff = (enc["pixel_values"] - our_pixels(task, arrays)).abs().max().item()
    assert pixel_diff <= 1e-6, pixel_diff
    for row, question in enumerate(QUESTIONS):
        ours_ids = encode_segments(tok, [("user", f"<image>{question}", False)], model.num_image_tokens).input_ids
        ours_ids = ours_ids + tok.assistant_ids
        assert enc["input_ids"][row][enc["attention_mask"][row] == 1].tolist() == ours_ids
    with torch.no_grad():
        theirs = llava(**enc).logits
        ours = model(enc["pixel_values"], enc["input_ids"], enc["attention_mask"]).logits
    mask = enc["attention_mask"].bool()
    diff = (theirs[mask] - ours[mask]).abs().max().item()
    print(f"{name}: logits {tuple(theirs.shape)}, max |LLaVA - ours| over {int(mask.sum())} positions = {diff:.2e}")
    assert diff <= 1e-4

    # greedy generation, one prompt at a time, with transformers' processor and generate
    generations = []
    for array, question in zip(arrays, QUESTIONS):
        one = processor(images=Image.fromarray(array),
                        text=processor.apply_chat_template(prompt_messages(question), add_generation_prompt=True),
                        return_tensors="pt")
        with torch.no_grad():
            hf = llava.generate(**one, max_new_tokens=8, do_sample=False)[0, one["input_ids"].shape[1]:].tolist()
            mine = model.generate(one["pixel_values"], one["input_ids"], one["attention_mask"], max_new_tokens=8,
                                  eos_token_id=tok.end_of_turn_id, pad_token_id=tok.pad_token_id)[0].tolist()
        print(f"{name}: {question!r}: transformers {hf}, ours {mine}")
        cut = hf.index(tok.end_of_turn_id) + 1 if tok.end_of_turn_id in hf else len(hf)
        assert hf == mine[:len(hf)] and hf[:cut] == mine[:cut]
        generations.append(hf[:cut])
    assert max(map(len, generations)) >= 4  # real generations, not an immediate end of turn
    assert len({tuple(g) for g in generations}) > 1  # that depend on the image and the question


# ------------------------------------------------------------------------------------------- (b) import
def save_llava_dir(directory: Path, tok: ChatTokenizer, vision: str = "siglip", text: str = "llama",
                   seed: int = 0) -> Path:
    """A tiny transformers LLaVA (random weights, every tensor away from its initial value) saved with its
    LlavaProcessor (the tower's image processor, ``tok``'s tokenizer and chat template), built with transformers
    alone."""
    from transformers import (
        CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
        Qwen2Config, SiglipImageProcessor, SiglipVisionConfig,
    )

    torch.manual_seed(seed)
    shape = {"vocab_size": tok.vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
    text_config = LlamaConfig(**shape, tie_word_embeddings=True) if text == "llama" else Qwen2Config(**shape)
    if vision == "siglip":
        vision_config, strategy, layer = SiglipVisionConfig(**TINY_HF_VISION), "full", -1
        image_processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    else:
        vision_config, strategy, layer = CLIPVisionConfig(**TINY_HF_VISION), "default", -2
        image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    config = LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_index=tok.image_token_id,
                         vision_feature_select_strategy=strategy, vision_feature_layer=layer, image_seq_length=16)
    llava = LlavaForConditionalGeneration(config).eval()
    randomise(llava, seed=seed + 1, scale=0.1)
    llava.save_pretrained(directory)
    hf = tok.hf
    LlavaProcessor(image_processor=image_processor, tokenizer=hf, patch_size=8, vision_feature_select_strategy=strategy,
                   chat_template=hf.chat_template, num_additional_image_tokens=int(vision == "clip")
                   ).save_pretrained(directory)
    return directory


def safetensors_of(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


@pytest.mark.parametrize("vision,text", [("siglip", "llama"), ("clip", "qwen2")])
def test_an_imported_llava_computes_its_logits_and_exports_back_bit_identical(vision: str, text: str,
                                                                               tmp_path: Path) -> None:
    from transformers import LlavaForConditionalGeneration

    source = save_llava_dir(tmp_path / "source", shapes_tokenizer(tmp_path), vision, text)
    tok = ChatTokenizer(source)  # the LLaVA's own tokenizer, from its directory
    task = VisionLanguageTask(tok, init=str(source)).eval()
    assert task.model.connector.num_image_tokens == 16 and task.init is None  # weights in already, not at setup
    llava = LlavaForConditionalGeneration.from_pretrained(source).eval()
    arrays = images()
    pixels = our_pixels(task, arrays)
    ids = [encode_segments(tok, [("user", f"<image>{q}", False)], 16).input_ids + tok.assistant_ids for q in QUESTIONS]
    width = max(map(len, ids))
    input_ids = torch.tensor([row + [tok.pad_token_id] * (width - len(row)) for row in ids])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
    with torch.no_grad():
        theirs = llava(input_ids=input_ids, pixel_values=pixels, attention_mask=mask).logits
        ours = task.model(pixels, input_ids, mask).logits
    diff = (theirs[mask.bool()] - ours[mask.bool()]).abs().max().item()
    print(f"{vision}+{text}: imported model vs LLaVA logits: max |diff| = {diff:.2e}")
    assert diff <= 1e-5

    out = export(save_ckpt(task, tmp_path / "run"), tmp_path / "again")
    before, after = safetensors_of(source), safetensors_of(out)
    assert sorted(before) == sorted(after)
    differing = [k for k in before if before[k].dtype != after[k].dtype or not torch.equal(before[k], after[k])]
    print(f"{vision}+{text}: {len(before)} tensors, {len(differing)} differ")
    assert not differing, differing[:5]
    a, b = (json.loads((d / "config.json").read_text()) for d in (source, out))
    for key in ("image_token_index", "vision_feature_layer", "vision_feature_select_strategy", "projector_hidden_act",
                "multimodal_projector_bias", "image_seq_length"):
        assert a[key] == b[key], key
    assert {k: v for k, v in a["vision_config"].items() if k != "dtype"} == \
        {k: v for k, v in b["vision_config"].items() if k != "dtype"}
    c, d = (json.loads((p / "processor_config.json").read_text()) for p in (source, out))
    for key in ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens", "image_token"):
        assert c[key] == d[key], key


def test_a_llava_by_hub_id_from_the_hf_cache_offline(tmp_path: Path, hub_cache: Path) -> None:
    """``init: org/name`` reads the LLaVA from the HF cache (HF_HUB_OFFLINE), as a downloaded llava-hf model."""
    source = save_llava_dir(tmp_path / "source", shapes_tokenizer(tmp_path), "clip", "llama")
    put_in_hub_cache(hub_cache, "someone/tiny-llava", source)
    task = VisionLanguageTask(ChatTokenizer("someone/tiny-llava"), init="someone/tiny-llava")
    state = safetensors_of(source)
    assert torch.equal(task.model.connector.fc2.weight, state["multi_modal_projector.linear_2.weight"])
    assert task.model.vision.select == "default" and task.model.vision.feature_layer == -2
    assert task.preprocessing["mean"] == OPENAI_CLIP_MEAN  # the LLaVA's image processor (CLIP's normalisation)
    with pytest.raises(PretrainedError, match=r"model\.init 'someone/not-cached' is not in the Hugging Face cache"):
        VisionLanguageTask(ChatTokenizer("someone/tiny-llava"), init="someone/not-cached")


def test_a_run_started_from_a_llava_rebuilds_from_its_checkpoint(tmp_path: Path) -> None:
    """from_checkpoint keeps the LLaVA init (it names the architecture) and reads only its config.json."""
    source = save_llava_dir(tmp_path / "source", shapes_tokenizer(tmp_path))
    tok = ChatTokenizer(source)
    task = VisionLanguageTask(tok, init=str(source), lora_r=4)
    ckpt = save_ckpt(task, tmp_path / "run")
    (source / "model.safetensors").unlink()  # only the config is read now
    again = VisionLanguageTask.from_checkpoint(str(ckpt), tok)
    state = again.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in task.state_dict().items())


# ---------------------------------------------------------------------------------------------- (c) DPO
def test_a_dpo_stage_starts_from_an_imported_llava_at_ln2(tok, data_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    from transformers import LlavaForConditionalGeneration

    from mm_lightning.tasks.dpo import DPOTask

    source = save_llava_dir(tmp_path / "llava", tok)
    task = DPOTask(tok, init=str(source), max_new_tokens=6)
    llava = LlavaForConditionalGeneration.from_pretrained(source)
    projector = llava.model.multi_modal_projector
    metrics = trainer(tmp_path, 1).validate(task, datamodule=data(tok, data_dir), verbose=False)[0]
    print(f"DPO from an imported LLaVA: step-0 val/loss {metrics['val/loss']:.7f} (ln 2 = {math.log(2):.7f})")
    assert metrics["val/loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert metrics["val/rewards_margin"] == 0.0
    for model in (task.model, task._reference):  # the policy and its frozen reference both hold the LLaVA's weights
        assert torch.equal(model.connector.fc1.weight, projector.linear_1.weight)
        assert torch.equal(model.connector.fc2.bias, projector.linear_2.bias)
        assert torch.equal(model.lm.get_input_embeddings().weight, llava.get_input_embeddings().weight)
        assert torch.equal(model.vision.model.embeddings.patch_embedding.weight,
                           llava.model.vision_tower.embeddings.patch_embedding.weight)
    trainer(tmp_path / "fit", 2, limit_val_batches=0).fit(task, datamodule=data(tok, data_dir))
    assert not torch.equal(task.model.connector.fc1.weight, projector.linear_1.weight)  # the policy trained
    assert torch.equal(task._reference.connector.fc1.weight, projector.linear_1.weight)  # the reference did not

    # and the tuned policy goes back out as a LLaVA (the DPO checkpoint rebuilt from the LLaVA's config.json)
    out = export(save_ckpt(task, tmp_path / "run"), tmp_path / "tuned")
    tuned = LlavaForConditionalGeneration.from_pretrained(out).eval()
    ids = torch.tensor([encode_segments(tok, [("user", "<image>What colour is the shape?", False)], 16).input_ids])
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    task.eval()
    with torch.no_grad():
        diff = (tuned(input_ids=ids, pixel_values=pixels).logits
                - task.model(pixels, ids, torch.ones_like(ids)).logits).abs().max().item()
    print(f"DPO-tuned policy exported as a LLaVA: max |logits diff| = {diff:.2e}")
    assert diff <= 1e-5


# --------------------------------------------------------------------------------------------- (d) errors
def one_line_exit_2(args: list[str], out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    before = {p.name: p.read_bytes() for p in out.iterdir()} if out.exists() else None
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        export_cli.main([*args, "--out", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()  # transformers' loading progress bars may come first
    errors = [line for line in lines if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(errors) == 1 and lines[-1] == errors[0], lines
    err = errors[0]
    after = {p.name: p.read_bytes() for p in out.iterdir()} if out.exists() else None
    assert after == before  # nothing written
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.export-")]
    return err


UNREPRESENTABLE = {
    "pixel_shuffle": ({"downsample": 2, "pool": "pixel_shuffle"},
                      r"downsample=2 with pool pixel_shuffle is the Idefics3 / SmolVLM connector \(transformers' "
                      r"Idefics3ForConditionalGeneration\).*train with downsample: 1"),
    "avg_pool": ({"downsample": 2, "pool": "avg"}, r"downsample=2 \(pool avg\).*train with downsample: 1"),
    "input_norm": ({"input_norm": True}, r"input_norm: true.*train with input_norm: false"),
    "learned": ({"position_embedding": "learned"}, r"position_embedding: learned.*position_embedding: none"),
    "sincos": ({"position_embedding": "sincos"}, r"position_embedding: sincos.*position_embedding: none"),
    "hidden_dim": ({"hidden_dim": 48}, r"hidden_dim=48.*the LM's width 32: leave hidden_dim unset"),
}


@pytest.mark.parametrize("case", list(UNREPRESENTABLE))
def test_connector_options_llava_cannot_represent_are_refused(case: str, tmp_path: Path, capsys) -> None:
    kwargs, message = UNREPRESENTABLE[case]
    task = siglip_qwen2_task(tmp_path, connector_kwargs=kwargs)
    err = one_line_exit_2(["--ckpt", str(save_ckpt(task, tmp_path / "run")), "--to", "llava"], tmp_path / "out", capsys)
    print(f"{case}: {err}")
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_timm_towers_other_connectors_and_non_empty_out_are_refused(tmp_path: Path, capsys) -> None:
    tok = shapes_tokenizer(tmp_path)
    cases = [
        (tiny_task(tok), r"is a timm tower; .*export the tower with --to siglip first and train with it"),
        (tiny_task(tok, "qformer", vision=str(save_vision_model("siglip", tmp_path / "siglip")), vision_kwargs=None),
         r"model.connector is QFormer; LLaVA has only the mlp projector"),
    ]
    for i, (task, message) in enumerate(cases):
        err = one_line_exit_2(["--ckpt", str(save_ckpt(task, tmp_path / f"run{i}")), "--to", "llava"],
                              tmp_path / "out", capsys)
        print(err)
        assert re.search(message, err), err
    good = save_ckpt(clip_llama_task(tmp_path / "good"), tmp_path / "good" / "run")
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = one_line_exit_2(["--ckpt", str(good), "--to", "llava"], out, capsys)
    assert "exists and is not an empty directory; nothing is overwritten" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_an_init_directory_that_is_not_a_llava_exits_2_through_run(tmp_path: Path, capsys) -> None:
    from experiments.run import main

    tokenizer = save_tokenizer(tmp_path / "tok", "qwen2.5")
    not_llava = saved_lm(tmp_path / "qwen2", "qwen2", vocab_size=420, tokenizer=tokenizer)
    empty = tmp_path / "empty"
    empty.mkdir()
    source = save_llava_dir(tmp_path / "llava", shapes_tokenizer(tmp_path))
    cases = [
        ([f"--model.init_args.init={not_llava}"], rf"model\.init '{not_llava}' is not a transformers LLaVA model \(its "
         r"config\.json has model_type 'qwen2', not 'llava'\)"),
        ([f"--model.init_args.init={empty}"], rf"model\.init '{empty}': a directory without config\.json, so not a "
         "transformers LLaVA model"),
        # the shapes config sets the tower's and the connector's options, which a LLaVA supplies itself
        ([f"--model.init_args.init={source}"], rf"model\.vision_kwargs=.*model\.init '{source}' is a transformers "
         r"LLaVA, which supplies the vision tower, the mlp connector and the LM: leave model\.vision_kwargs unset"),
    ]
    for extra, message in cases:
        run = tmp_path / "run"
        with pytest.raises(SystemExit) as exit_:
            main(["fit", "--config", str(REPO / "experiments" / "configs" / "mllm_mlp_shapes.yaml"),
                  f"--tokenizer.init_args.path={source}", *extra, f"--trainer.default_root_dir={run}",
                  f"--data.train={tmp_path}/none-*.tar"])
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        print(f"exit {exit_.value.code}: {errors}")
        assert exit_.value.code == 2
        assert len(errors) == 1 and re.search(message, errors[0]), errors
        assert not run.exists()


def test_a_llava_init_must_come_with_its_tokenizer_and_agree_with_the_options(tmp_path: Path) -> None:
    source = save_llava_dir(tmp_path / "llava", shapes_tokenizer(tmp_path))
    other = ChatTokenizer(save_tokenizer(tmp_path / "qwen_tok", "qwen2.5"))  # <image> at id 420, not 5
    with pytest.raises(ValueError, match=r"puts images at token id 5, but the tokenizer's <image> is id 420: use the "
                                         r"LLaVA's own tokenizer"):
        VisionLanguageTask(other, init=str(source))
    tok = ChatTokenizer(source)
    with pytest.raises(ValueError, match=r"model.vision_feature_layer=-2: .*\(the LLaVA's is -1\): leave "
                                         r"model.vision_feature_layer unset"):
        VisionLanguageTask(tok, init=str(source), vision_feature_layer=-2)
    with pytest.raises(ValueError, match=r"model.lm=.*leave model.lm unset"):
        VisionLanguageTask(tok, init=str(source), lm=dict(TINY_LM))
    VisionLanguageTask(tok, init=str(source), vision_feature_layer=-1, vision_select="full", connector="mlp")  # agree
    with pytest.raises(PretrainedError, match=r"is not a transformers LLaVA model"):
        VisionLanguageTask(tok, init=str(save_vision_model("siglip", tmp_path / "siglip")))


# ------------------------------------------------------------------------------ --to mm-lightning (our layout)
@pytest.mark.parametrize("case", ["qformer", "resampler", "xattn", "pixel_shuffle"])
def test_connectors_llava_cannot_hold_round_trip_through_our_own_layout(case: str, tmp_path: Path) -> None:
    """``--to mm-lightning``: config.json + model.safetensors + the tokenizer; ``VisionLanguageModel.from_pretrained``
    rebuilds the model from that directory alone (the tower's source directory deleted) with every tensor and the
    logits bit-identical. timm towers by name (qformer, resampler, xattn), a SigLIP directory + Qwen2 directory with
    LoRA merged (mlp with pixel shuffle)."""
    from mm_lightning.models.vlm import VisionLanguageModel

    if case == "pixel_shuffle":
        task = siglip_qwen2_task(tmp_path, lora_r=4, connector_kwargs={"downsample": 2, "pool": "pixel_shuffle"})
    else:
        task = tiny_task(shapes_tokenizer(tmp_path), case)
        randomise(task.model.connector)  # xattn gates away from 0
    tok = task.tokenizer
    out = tmp_path / "ours"
    export_cli.main(["--ckpt", str(save_ckpt(task, tmp_path / "run")), "--to", "mm-lightning", "--out", str(out)])
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    for source in ("siglip", "qwen2", "qwen_tok"):  # nothing outside DIR is read
        if (tmp_path / source).exists():
            for f in (tmp_path / source).iterdir():
                f.unlink()
    model = VisionLanguageModel.from_pretrained(out)
    task.merge_lora()
    expected = task.model.eval().state_dict()
    assert sorted(model.state_dict()) == sorted(expected)
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    again = ChatTokenizer(out)
    n = model.num_image_tokens
    ids = [encode_segments(again, [("user", f"<image>{q}", False)], n).input_ids + again.assistant_ids for q in QUESTIONS]
    assert ids == [encode_segments(tok, [("user", f"<image>{q}", False)], n).input_ids + tok.assistant_ids
                   for q in QUESTIONS]
    width = max(map(len, ids))
    input_ids = torch.tensor([[again.pad_token_id] * (width - len(r)) + r for r in ids])  # left-padded
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
    pixels = our_pixels(task, images())
    with torch.no_grad():
        diff = (model(pixels, input_ids, mask).logits - task.model(pixels, input_ids, mask).logits)[mask.bool()]
    print(f"{case}: {len(expected)} tensors equal; max |logits diff| = {diff.abs().max().item():.2e}")
    assert diff.abs().max().item() == 0.0
