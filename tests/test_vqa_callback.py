"""VQA evaluation of the multimodal LLM: per-type exact match, the W&B table, predictions to JSONL, experiments.ask."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch

from mm_lightning.callbacks.vqa import VQAEvaluation
from mm_lightning.data.conversations import ConversationPipeline
from mm_lightning.data.datamodule import WebDataModule
from mm_lightning.data.vqa import exact_match
from mm_lightning.tasks.vlm import VisionLanguageTask
from tests.vlm_fixtures import TINY_CONNECTORS, TINY_LM, TINY_VISION, shapes_tokenizer, tiny_task, write_shapes


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    return shapes_tokenizer(tmp_path_factory.mktemp("vqa_tok"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return write_shapes(tmp_path_factory.mktemp("vqa_shapes"), train=32, val=24, test=40, samples_per_shard=10)


def datamodule(tok, shards, n_image: int) -> WebDataModule:
    pipeline = ConversationPipeline(tok, num_image_tokens=n_image, max_length=128, image_size=32)
    return WebDataModule(train=shards["train"], val=shards["val"], test=shards["test"], predict=shards["test"],
                         pipeline=pipeline, batch_size=8, eval_batch_size=16, num_workers=0)


class Oracle(VisionLanguageTask):
    """Answers the reference for two questions in three and a wrong answer for the third (by batch position)."""

    def _eval_step(self, batch, split):
        self._references = list(batch["answers"])
        return super()._eval_step(batch, split)

    def answer(self, image, prompt_input_ids, prompt_attention_mask, max_new_tokens=None):
        return [r.upper() if i % 3 else "Wrong." for i, r in enumerate(self._references)]  # case does not matter


def test_exact_match_is_counted_per_question_type(tok, shards, tmp_path) -> None:
    torch.manual_seed(0)
    task = Oracle(tok, vision_kwargs=TINY_VISION, lm=TINY_LM, connector_kwargs=TINY_CONNECTORS["mlp"])
    data = datamodule(tok, shards, task.num_image_tokens)
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[VQAEvaluation()], default_root_dir=tmp_path,
                        enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.test(task, datamodule=data)[0]
    data.setup("test")  # what the callback must have counted, from the shards themselves
    correct, total = Counter(), Counter()
    for batch in data.test_dataloader():
        for i, qtype in enumerate(batch["question_types"]):
            correct[qtype] += int(i % 3 != 0)
            total[qtype] += 1
    assert sum(total.values()) == 40 and len(total) == 5  # every type occurs in 40 shapes samples
    assert metrics["test/vqa_questions"] == 40
    assert metrics["test/vqa_exact_match"] == pytest.approx(sum(correct.values()) / 40)
    for qtype in total:
        assert metrics[f"test/vqa_exact_match/{qtype}"] == pytest.approx(correct[qtype] / total[qtype]), qtype


def test_predict_writes_the_models_answers_and_logs_a_wandb_table(tok, shards, tmp_path) -> None:
    from lightning.pytorch.loggers import WandbLogger

    task = tiny_task(tok, "mlp", "instruct", max_new_tokens=4)
    data = datamodule(tok, shards, task.num_image_tokens)
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="test-vqa")
    trainer = L.Trainer(accelerator="cpu", logger=logger, callbacks=[VQAEvaluation(num_examples=5)],
                        default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False)
    trainer.test(task, datamodule=data)
    trainer.predict(task, datamodule=data, return_predictions=False)
    import wandb

    run_dir = Path(wandb.run.dir)
    wandb.finish()
    tables = list(run_dir.rglob("*vqa_examples*.table.json"))
    assert tables, f"no vqa_examples table under {run_dir}"
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["image", "type", "question", "reference", "prediction", "correct"]
    assert len(table["data"]) == 5
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and len({r["key"] for r in rows}) == 40
    data.setup("predict")
    batch = next(iter(data.predict_dataloader()))
    expected = task.eval().answer(batch["image"], batch["prompt_input_ids"], batch["prompt_attention_mask"])
    assert [r["prediction"] for r in rows[: len(expected)]] == expected
    assert [r["reference"] for r in rows[: len(expected)]] == batch["answers"]
    assert all(r["correct"] == exact_match(r["prediction"], r["reference"]) for r in rows)
    again = L.Trainer(accelerator="cpu", logger=False, callbacks=[VQAEvaluation()], default_root_dir=tmp_path,
                      enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(FileExistsError, match="predictions.jsonl exists"):  # never overwritten
        again.predict(task, datamodule=data, return_predictions=False)


def test_ask_answers_one_image_as_the_model_does(tok, shards, tmp_path, monkeypatch) -> None:
    from experiments.ask import AskError, ask
    from mm_lightning.data.samples import IMAGENET_MEAN, IMAGENET_STD, decode_rgb, image_transforms

    task = tiny_task(tok, "resampler", "instruct", max_new_tokens=5)
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}, ckpt)
    from mm_lightning.data import synthetic

    png = tmp_path / "scene.png"
    png.write_bytes(synthetic.make_sample(3, seed=5)["png"])
    prompts = []
    answer_of = VisionLanguageTask.answer

    def spy(self, image, ids, *args, **kwargs):  # the prompt ask hands the model
        prompts.append(ids[0].tolist())
        return answer_of(self, image, ids, *args, **kwargs)

    monkeypatch.setattr(VisionLanguageTask, "answer", spy)
    answer = ask(str(ckpt), str(png), "How many shapes are there?", tokenizer=tok.path)
    monkeypatch.undo()
    from mm_lightning.data.conversations import encode_segments, parse_conversation

    # ... is the evaluation prompt the conversation pipeline builds for the same question (LLaVA's from/value)
    turns = parse_conversation([{"from": "human", "value": "<image>\nHow many shapes are there?"},
                                {"from": "gpt", "value": "Two."}])
    pipeline = encode_segments(tok, [(t.role, t.text, t.role == "assistant") for t in turns], task.num_image_tokens)
    assert prompts == [pipeline.input_ids[:pipeline.starts[-1]]]

    image = image_transforms(32, False, mean=IMAGENET_MEAN, std=IMAGENET_STD)(decode_rgb(png.read_bytes()))[None]
    # the pipeline's layout (parse_conversation): <image> right in front of the question, no newline between
    ids = encode_segments(tok, [("user", "<image>How many shapes are there?", False)], task.num_image_tokens).input_ids
    ids = torch.tensor([ids + tok.assistant_ids])
    assert answer == task.eval().answer(image, ids, torch.ones_like(ids))[0]
    with pytest.raises(AskError, match="--image .*missing.png: no such file"):
        ask(str(ckpt), str(tmp_path / "missing.png"), "What?", tokenizer=tok.path)
    not_vlm = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, not_vlm)
    with pytest.raises(AskError, match="not a checkpoint of VisionLanguageTask"):
        ask(str(not_vlm), str(png), "What?", tokenizer=tok.path)
