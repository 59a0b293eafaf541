"""mm_lightning.parallel: block discovery, TP plans, activation checkpointing, and 2-process FSDP2 / HSDP /
tensor-parallel / pipeline-parallel runs whose losses match one process."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mm_lightning import parallel
from tests.conftest import REPO
from tests.parallel_common import STEPS, make_task, reference_run


def tiny_vit_task(**kwargs):
    return make_task(**kwargs)


def test_finds_blocks_of_timm_vit_text_tower_llama_and_resnet():
    import timm
    from transformers import LlamaConfig, LlamaForCausalLM

    from mm_lightning.models.text import TextTransformer

    task = tiny_vit_task()
    blocks = task.transformer_blocks()
    assert [type(b).__name__ for b in blocks] == ["Block", "Block"]
    assert blocks[0] is task.model.blocks[0]
    text = parallel.find_transformer_blocks(TextTransformer(vocab_size=50, width=32, heads=2, layers=3))
    assert len(text) == 3 and all(isinstance(b, nn.TransformerEncoderLayer) for b in text)
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=64))
    assert [type(b).__name__ for b in parallel.find_transformer_blocks(llama)] == ["LlamaDecoderLayer"] * 2
    resnet = timm.create_model("resnet18", num_classes=0)
    assert len(parallel.find_transformer_blocks(resnet)) == 8  # BasicBlocks, found generically
    assert parallel.find_transformer_blocks(nn.Linear(2, 2)) == []


def test_tensor_parallel_plans():
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    vit_plan = parallel.tensor_parallel_plan(tiny_vit_task().model.blocks[0], 2)
    assert list(vit_plan) == ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
    assert isinstance(vit_plan["attn.proj"], RowwiseParallel) and isinstance(vit_plan["mlp.fc1"], ColwiseParallel)
    assert type(vit_plan["attn.qkv"]).__name__ == "PackedColwiseParallel"  # fused q, k, v split head-wise
    text_block = nn.TransformerEncoderLayer(32, 2, 64, batch_first=True)
    assert list(parallel.tensor_parallel_plan(text_block, 2)) == ["linear1", "linear2"]  # MHA stays replicated
    with pytest.raises(ValueError, match="num_heads=3 is not divisible by tensor_parallel_size=2"):
        parallel.tensor_parallel_plan(make_task().model.blocks[0].__class__(dim=48, num_heads=3), 2)


def _block_calls_and_saved_tensors(module: nn.Module, blocks: list[nn.Module], step) -> tuple[int, int]:
    """Calls of ``blocks`` (forward and recomputation) and tensors autograd saves, during one forward + backward."""
    calls = [0]
    # a pre-hook: torch's non-reentrant checkpoint stops recomputing a block once it has the tensors it needs
    hooks = [b.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for b in blocks]
    saved = [0]

    def pack(t):
        saved[0] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step(module)
    loss.backward()
    for h in hooks:
        h.remove()
    return calls[0], saved[0]


def test_activation_checkpointing_recomputes_blocks_with_the_same_gradients_and_keys():
    """Each checkpointed block runs twice per step (forward, then recomputed in backward), autograd keeps fewer
    tensors, the gradients are the same and so are the parameter names (timm's own switch, no wrapping)."""
    task = tiny_vit_task()
    checked = copy.deepcopy(task)
    checked.activation_checkpointing = True
    checked.configure_model()
    checked.configure_model()  # idempotent: Lightning calls it for every fit/test
    assert checked.model.grad_checkpointing is True and task.model.grad_checkpointing is False
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    step = lambda m: F.cross_entropy(m(x), y)  # noqa: E731
    plain_calls, plain_saved = _block_calls_and_saved_tensors(task, list(task.model.blocks), step)
    calls, saved = _block_calls_and_saved_tensors(checked, list(checked.model.blocks), step)
    assert plain_calls == 2 and calls == 4  # 2 blocks: once each, or forward + recompute each
    assert saved < plain_saved, (saved, plain_saved)
    for a, b in zip(task.parameters(), checked.parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    assert list(checked.state_dict()) == list(task.state_dict())  # same names: loads into a plain model and back
    assert [n for n, _ in checked.named_parameters()] == [n for n, _ in task.named_parameters()]
    copy.deepcopy(checked)
    fresh = tiny_vit_task(activation_checkpointing=True)
    fresh.configure_model()
    fresh.load_state_dict(task.state_dict())


def test_activation_checkpointing_of_the_clip_text_tower_and_a_hugging_face_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    from mm_lightning.models.clip import CLIP

    torch.manual_seed(0)
    clip = CLIP(image_backbone="vit_tiny_patch16_224",
                image_backbone_kwargs={"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2},
                embed_dim=16, vocab_size=50, context_length=8, text_width=32, text_layers=2, text_heads=2)
    checked = copy.deepcopy(clip)
    switched = parallel.apply_activation_checkpointing(checked)
    assert {type(m).__name__ for m in switched} == {"VisionTransformer", "TextTransformer"}
    ids = torch.randint(3, 50, (4, 8))
    step = lambda m: m.encode_text(ids).sum()  # noqa: E731
    plain = _block_calls_and_saved_tensors(clip, list(clip.text_encoder.transformer.layers), step)
    calls = _block_calls_and_saved_tensors(checked, list(checked.text_encoder.transformer.layers), step)
    assert plain[0] == 2 and calls[0] == 4 and calls[1] < plain[1], (plain, calls)
    for a, b in zip(clip.text_encoder.parameters(), checked.text_encoder.parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=64))
    assert parallel.apply_activation_checkpointing(llama) == [llama] and llama.is_activation_checkpointing
    assert parallel.apply_activation_checkpointing(nn.Linear(2, 2)) == []


def test_compile_switch_compiles_blocks_in_place():
    task = tiny_vit_task(compile=True)
    names = list(task.state_dict())
    task.configure_model()
    assert all(block._compiled_call_impl is not None for block in task.model.blocks)
    assert list(task.state_dict()) == names


def test_ema_is_refused_under_model_parallel():
    from lightning.pytorch.strategies import ModelParallelStrategy

    task = make_task(ema_decay=0.99)

    class FakeTrainer:
        strategy = ModelParallelStrategy.__new__(ModelParallelStrategy)

    task._trainer = FakeTrainer()
    with pytest.raises(ValueError, match="ema_decay"):
        task.configure_model()
    task._trainer = None


@pytest.mark.slow
def test_two_process_fsdp_hsdp_tensor_and_pipeline_parallel_match_one_process(tmp_path):
    """One torchrun launch (2 gloo ranks) runs all checks; each must reproduce the 1-process losses."""
    checks = ["fsdp", "hsdp", "fsdp_noreshard_ac", "tp", "pipeline_gpipe", "pipeline_1f1b"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "dist_parallel.py"), str(tmp_path), *checks]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ref_losses, ref_weights = reference_run()
    assert len(ref_losses) == STEPS and ref_losses[0] != ref_losses[-1]
    for check in checks:
        losses = json.loads((tmp_path / f"{check}.json").read_text())["losses"]
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), atol=2e-5, rtol=0, msg=check)
        ckpt = tmp_path / f"{check}.ckpt"
        if ckpt.exists():  # the gathered full checkpoint holds the same weights as the 1-process model
            state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
            weights = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
            assert set(weights) == set(ref_weights), check
            for name, value in ref_weights.items():
                torch.testing.assert_close(weights[name], value, atol=5e-4, rtol=0, msg=f"{check}: {name}")
