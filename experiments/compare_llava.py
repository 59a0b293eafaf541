"""An MLLM checkpoint and its ``--to llava`` export side by side: the same answers, the same logits.

    python -m experiments.compare_llava --ckpt RUN/checkpoints/best.ckpt --llava DIR \
        --shards 'data/shards/shapes/shapes-test-*.tar' --n 200

For the held-out last question of each of the first ``n`` conversations of the shards (the one the VQA
callback scores), asked alone about the image as :mod:`experiments.ask` asks it:

- ours: :class:`experiments.ask.Asker` (the checkpoint, its tokenizer, the run's evaluation transform);
- LLaVA: ``LlavaForConditionalGeneration.from_pretrained(DIR)`` with ``AutoProcessor.from_pretrained(DIR)``
  (``processor.apply_chat_template`` of ``[{"type": "image"}, {"type": "text", ...}]``, then
  ``processor(images=..., text=...)``), ``generate(do_sample=False)``, the new tokens decoded with special
  tokens skipped. No code of ours on that side.

Prints the count of equal answers, of equal prompt ids and the largest pixel difference, and the max
absolute logits difference on one right-padded batch (``--batch`` questions; positions under the attention
mask). Exit status 1 when an answer differs or the logits differ by more than ``--tol``.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import sys
import tarfile
from collections.abc import Iterator
from typing import Any


def held_out_questions(pattern: str, n: int) -> Iterator[dict[str, Any]]:
    """``{"key", "image" (bytes), "question", "reference", "type"}`` of the last human turn of the first ``n``
    samples (shard order) that have a conversation and an image."""
    count = 0
    for shard in sorted(glob.glob(pattern)):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.isfile():
                    key, _, ext = m.name.partition(".")
                    members.setdefault(key, {})[ext] = tar.extractfile(m).read()  # type: ignore[union-attr]
        for key in sorted(members):
            files = members[key]
            image = next((files[e] for e in ("png", "jpg", "jpeg", "webp") if e in files), None)
            turns = json.loads(files["json"]).get("conversations") if "json" in files else None
            if image is None or not turns:
                continue
            humans = [i for i, t in enumerate(turns) if t["from"] == "human"]
            last = humans[-1]
            reference = turns[last + 1]["value"] if last + 1 < len(turns) else None
            yield {"key": key, "image": image, "question": turns[last]["value"].replace("<image>", "").strip(),
                   "reference": reference, "type": turns[last].get("type")}
            count += 1
            if count >= n:
                return


def llava_inputs(processor: Any, images: list[Any], questions: list[str]) -> Any:
    """The processor's batch of one user turn each (the image, then the question), generation prompt added."""
    prompts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True)
        for q in questions]
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


def compare(ckpt: str, llava_dir: str, shards: str, n: int = 200, batch: int = 8, tol: float = 1e-4,
            verbose: bool = False) -> dict[str, Any]:
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from experiments.ask import Asker

    asker = Asker(ckpt)
    llava = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    processor = AutoProcessor.from_pretrained(llava_dir)
    processor.tokenizer.padding_side = "right"  # valid tokens keep positions 0..len-1 on both sides
    max_new = asker.task.max_new_tokens
    samples = list(held_out_questions(shards, n))
    if len(samples) < n:
        raise SystemExit(f"error: --shards {shards}: {len(samples)} conversations, --n {n} asked")
    equal = same_prompt = correct_ours = correct_llava = 0
    pixel_diff = 0.0
    mismatches = []
    from mm_lightning.data.vqa import exact_match

    for s in samples:
        ours = asker(s["image"], s["question"])
        inputs = llava_inputs(processor, [Image.open(io.BytesIO(s["image"])).convert("RGB")], [s["question"]])
        same_prompt += int(torch.equal(inputs["input_ids"], asker.prompt_ids(s["question"])))
        pixel_diff = max(pixel_diff, (inputs["pixel_values"] - asker.pixels(s["image"])).abs().max().item())
        with torch.no_grad():
            out = llava.generate(**inputs, max_new_tokens=max_new, do_sample=False)
        theirs = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        equal += int(ours == theirs)
        if s["reference"] is not None:
            correct_ours += int(bool(exact_match(ours, s["reference"])))
            correct_llava += int(bool(exact_match(theirs, s["reference"])))
        if ours != theirs:
            mismatches.append({"key": s["key"], "question": s["question"], "ours": ours, "llava": theirs})
        if verbose:
            print(f"{s['key']} {s['question']!r}: ours {ours!r} llava {theirs!r}")

    # logits on one batch: the same pixels and ids through both models
    first = samples[:batch]
    inputs = llava_inputs(processor, [Image.open(io.BytesIO(s["image"])).convert("RGB") for s in first],
                          [s["question"] for s in first])
    with torch.no_grad():
        theirs_logits = llava(**inputs).logits
        ours_logits = asker.task.model(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]).logits
    mask = inputs["attention_mask"].bool()
    logits_diff = (theirs_logits - ours_logits)[mask].abs().max().item()
    return {"n": n, "equal_answers": equal, "equal_prompt_ids": same_prompt, "max_pixel_diff": pixel_diff,
            "exact_match_ours": correct_ours / n, "exact_match_llava": correct_llava / n,
            "logits_batch": len(first), "logits_positions": int(mask.sum()), "max_logits_diff": logits_diff,
            "logits_scale": ours_logits[mask].abs().max().item(), "ok": equal == n and logits_diff <= tol,
            "mismatches": mismatches[:10]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m experiments.compare_llava", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="the MLLM checkpoint (RUN/checkpoints/best.ckpt)")
    parser.add_argument("--llava", required=True, help="its export: python -m experiments.export --to llava --out DIR")
    parser.add_argument("--shards", required=True, help="held-out shards with conversations (a glob)")
    parser.add_argument("--n", type=int, default=200, help="questions to answer both ways")
    parser.add_argument("--batch", type=int, default=8, help="questions in the logits batch")
    parser.add_argument("--tol", type=float, default=1e-4, help="largest allowed max abs logits difference")
    parser.add_argument("--verbose", action="store_true", help="print every question and both answers")
    args = parser.parse_args(argv)
    result = compare(args.ckpt, args.llava, args.shards, args.n, args.batch, args.tol, args.verbose)
    print(f"answers equal: {result['equal_answers']}/{result['n']}; prompt ids equal: "
          f"{result['equal_prompt_ids']}/{result['n']}; max pixel diff {result['max_pixel_diff']:.3g}; "
          f"exact match ours {result['exact_match_ours']:.3f}, llava {result['exact_match_llava']:.3f}")
    print(f"logits: batch of {result['logits_batch']} ({result['logits_positions']} positions), max abs diff "
          f"{result['max_logits_diff']:.3g} (largest |logit| {result['logits_scale']:.3g})")
    for m in result["mismatches"]:
        print(f"  differs: {m}")
    sys.stdout.flush()
    if not result["ok"]:
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
