"""The multimodal LLM's model: connectors, image-token splice, fusion gates, generation, log-probs."""

from __future__ import annotations

import pytest
import torch

from mm_lightning.data.conversations import encode_segments, pad_ids
from mm_lightning.models.connectors import MLPProjector, QFormer, build_connector
from mm_lightning.models.vlm import ImageTokenMismatchError, build_lm, positions_from_mask, vision_tokens
from mm_lightning.models.vision import create_backbone
from tests.vlm_fixtures import TINY_LM, TINY_VISION, shapes_tokenizer, tiny_task

CONNECTORS = ["mlp", "qformer", "resampler", "xattn"]
QUESTIONS = ["What shape is shown?", "How many shapes are there?", "Is the shape small or large?"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    return shapes_tokenizer(tmp_path_factory.mktemp("vlm_tok"))


def prompts(tok, n_image: int, questions=QUESTIONS) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """Left-padded generation prompts (user turn with the image, then the assistant marker)."""
    rows = [encode_segments(tok, [("user", f"<image>\n{q}", False)], n_image).input_ids + tok.assistant_ids
            for q in questions]
    ids = pad_ids(rows, tok.pad_token_id, "left")
    mask = pad_ids([[1] * len(r) for r in rows], 0, "left")
    return ids, mask, rows


def open_gates(model) -> None:
    """Give the fusion blocks non-zero gates (a fresh connector's are 0: the LM's own output)."""
    for block in model.connector.xattn:
        block.attn_gate.data.fill_(1.0)
        block.ff_gate.data.fill_(0.5)


# ------------------------------------------------------------------------------------ connectors
@pytest.mark.parametrize("kind", ["mlp", "qformer", "resampler"])
def test_token_connectors_give_num_image_tokens_at_lm_width(kind: str) -> None:
    kwargs = {"qformer": {"num_queries": 5}, "resampler": {"num_latents": 7}}.get(kind, {})
    conn = build_connector(kind, vision_dim=24, num_visual_tokens=16, lm_dim=40, num_lm_layers=2, **kwargs)
    out = conn(torch.randn(3, 16, 24))
    assert out.shape == (3, conn.num_image_tokens, 40)
    assert conn.num_image_tokens == {"mlp": 16, "qformer": 5, "resampler": 7}[kind]


@pytest.mark.parametrize("pool", ["avg", "pixel_shuffle"])
def test_mlp_downsample_reduces_each_2x2_cell(pool: str) -> None:
    conn = MLPProjector(vision_dim=2, lm_dim=8, num_visual_tokens=16, downsample=2, pool=pool)
    assert conn.num_image_tokens == 4
    grid = torch.arange(16.0).view(4, 4)  # token t of a 4x4 grid, row by row; two channels: t and -t
    x = torch.stack([grid.flatten(), -grid.flatten()], dim=-1)[None]
    reduced = conn.reduce(x)[0]
    cells = [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]  # the tokens of each output cell
    for i, cell in enumerate(cells):
        if pool == "avg":
            assert torch.equal(reduced[i], torch.tensor([sum(cell) / 4, -sum(cell) / 4]))
        else:
            assert sorted(reduced[i, 0::2].tolist()) == cell  # every feature of the cell kept, none of another


def test_mlp_downsample_needs_a_square_grid() -> None:
    with pytest.raises(ValueError, match="square grid"):
        MLPProjector(vision_dim=8, lm_dim=8, num_visual_tokens=15, downsample=2)


@pytest.mark.parametrize("kind", ["qformer", "resampler", "xattn"])
def test_query_connectors_sincos_adds_a_fixed_code_that_checkpoints_do_not_hold(kind: str) -> None:
    """``sincos: true`` changes what the queries read but adds no weight: checkpoints of either setting load
    into the other; a grid that is not square is refused."""
    def build(sincos: bool):
        torch.manual_seed(0)
        return build_connector(kind, vision_dim=24, num_visual_tokens=16, lm_dim=40, num_lm_layers=2, sincos=sincos)

    plain, coded = build(False), build(True)
    assert plain.state_dict().keys() == coded.state_dict().keys()
    coded.load_state_dict(plain.state_dict())
    visual = torch.randn(2, 16, 24)
    read = (lambda c: c.resample(visual)) if kind == "xattn" else (lambda c: c(visual))
    assert not torch.allclose(read(plain), read(coded))
    with pytest.raises(ValueError, match="square token grid"):
        build_connector(kind, vision_dim=24, num_visual_tokens=15, lm_dim=40, num_lm_layers=2, sincos=True)


def test_qformer_queries_start_random_and_distinct() -> None:
    torch.manual_seed(0)
    conn = QFormer(vision_dim=16, lm_dim=32, num_visual_tokens=10, num_queries=8, dim=32, depth=2, heads=2)
    std = conn.queries.std().item()
    assert 0.015 < std < 0.025  # normal(0, 0.02), never zeros (zero queries stay identical forever)
    out = conn(torch.randn(2, 10, 16))
    assert torch.cdist(out[0], out[0]).fill_diagonal_(1.0).min() > 1e-3  # every query reads something different


def test_unknown_connector_option_is_named() -> None:
    with pytest.raises(ValueError, match="num_querys"):
        build_connector("qformer", 16, 16, 32, 2, num_querys=4)


# ----------------------------------------------------------------------------------------- vision
@pytest.mark.parametrize("class_token", [False, True])
def test_vision_tokens_drop_only_prefix_tokens_the_tower_has(class_token: bool) -> None:
    tower = create_backbone("vit_tiny_patch16_224", **{**TINY_VISION, "class_token": class_token,
                                                       "global_pool": "token" if class_token else "avg"}).eval()
    image = torch.randn(2, 3, 32, 32)
    tokens = vision_tokens(tower, image)
    features = tower.forward_features(image)
    assert tokens.shape == (2, 16, 32)  # 4x4 patches either way: a CLS-less tower keeps its first patch
    assert torch.equal(tokens, features[:, 1:] if class_token else features)


def test_lm_embeddings_grow_to_the_tokenizer(tok) -> None:
    lm = build_lm({**TINY_LM, "vocab_size": 10}, vocab_size=tok.vocab_size)
    assert lm.get_input_embeddings().weight.shape[0] == tok.vocab_size


# ------------------------------------------------------------------------------------ splicing
def test_image_features_are_written_at_the_image_positions(tok) -> None:
    model = tiny_task(tok, "mlp").model.eval()
    ids, mask, _ = prompts(tok, model.num_image_tokens)
    image = torch.randn(len(ids), 3, 32, 32)
    inputs = model.prepare_inputs(image, ids, mask)
    is_image = ids == tok.image_token_id
    features = model.connector(vision_tokens(model.vision, image))
    for i in range(len(ids)):
        assert torch.equal(inputs["inputs_embeds"][i][is_image[i]], features[i])  # in order, row by row
    embed = model.lm.get_input_embeddings()
    assert torch.equal(inputs["inputs_embeds"][~is_image], embed(ids)[~is_image])


def test_image_token_count_mismatch_names_the_sample(tok) -> None:
    model = tiny_task(tok, "qformer").model
    ids, mask, _ = prompts(tok, model.num_image_tokens)
    first = (ids[1] == tok.image_token_id).nonzero()[0, 0]
    ids[1, first] = tok.pad_token_id  # row 1 now holds one image token too few
    with pytest.raises(ImageTokenMismatchError, match=r"sample 1 of the batch holds 3 <image> token\(s\).*gives 4"):
        model(torch.randn(len(ids), 3, 32, 32), ids, mask)
    with pytest.raises(ImageTokenMismatchError, match="sample 0 .* no image"):
        model(None, ids, mask)


# ----------------------------------------------------------------------------------------- fusion
def test_xattn_with_zero_gates_gives_exactly_the_lms_logits(tok) -> None:
    model = tiny_task(tok, "xattn").model.eval()
    ids, mask, _ = prompts(tok, 1)
    image = torch.randn(len(ids), 3, 32, 32)
    with torch.no_grad():  # the plain LM on the same ids, with the positions HF generation gives left-padded rows
        plain = model.lm(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
        fused = model(image, ids, mask).logits
    assert torch.equal(fused, plain)
    open_gates(model)
    for block in model.connector.xattn:
        block.ff_gate.data.zero_()  # cross-attention only: text before the image must see nothing of it
    with torch.no_grad():
        fused = model(image, ids, mask).logits
    image_at = (ids == tok.image_token_id).nonzero()
    for row, col in image_at.tolist():
        assert torch.equal(fused[row, :col], plain[row, :col])  # before the image: the LM's own logits
        assert not torch.allclose(fused[row, col:], plain[row, col:])  # from the image on: it attends


def test_xattn_keeps_the_lm_state_dict_and_unhooks(tok) -> None:
    model = tiny_task(tok, "xattn").model
    assert not any("xattn" in k for k in model.lm.state_dict())  # the LM's keys are the plain LM's
    assert len(model.connector._hooks) == 1 + len(model.connector.xattn)


def test_a_deep_copy_of_an_xattn_model_uses_its_own_blocks(tok) -> None:
    """copy.deepcopy (a DPO reference model, the benchmark's bare copy) hooks the copy's layers to the copy's
    cross-attention blocks: the copy gives the same logits, and closing the copy's gates leaves the original as it was."""
    import copy

    model = tiny_task(tok, "xattn").model.eval()
    open_gates(model)
    ids, mask, _ = prompts(tok, 1)
    image = torch.randn(len(ids), 3, 32, 32)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        fused = model(image, ids, mask).logits
        assert torch.equal(twin(image, ids, mask).logits, fused)
        for block in twin.connector.xattn:
            block.attn_gate.data.zero_()
            block.ff_gate.data.zero_()
        plain = model.lm(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
        assert torch.equal(twin(image, ids, mask).logits, plain)  # the copy's gates now close the copy
        assert torch.equal(model(image, ids, mask).logits, fused)  # and only the copy


# ------------------------------------------------------------------------------------ generation
def greedy_without_cache(model, image, row: list[int], steps: int, eot: int) -> list[int]:
    """Reference greedy decoding: the whole sequence through forward() at every step, no KV cache."""
    ids = list(row)
    out: list[int] = []
    for _ in range(steps):
        t = torch.tensor([ids])
        with torch.no_grad():
            logits = model(image, t, torch.ones_like(t)).logits[0, -1]
        nxt = int(logits.argmax())
        out.append(nxt)
        if nxt == eot:
            break
        ids.append(nxt)
    return out


@pytest.mark.parametrize("kind", CONNECTORS)
def test_left_padded_batch_generation_equals_one_by_one_and_no_cache(tok, kind: str) -> None:
    model = tiny_task(tok, kind).model.eval()
    if kind == "xattn":
        open_gates(model)
    ids, mask, rows = prompts(tok, model.num_image_tokens)
    assert len({len(r) for r in rows}) > 1  # the prompts differ in length: the batch is padded
    image = torch.randn(len(rows), 3, 32, 32)
    eot, steps = tok.end_of_turn_id, 6
    batched = model.generate(image, ids, mask, max_new_tokens=steps, eos_token_id=eot, pad_token_id=tok.pad_token_id)
    for i, row in enumerate(rows):
        t = torch.tensor([row])
        alone = model.generate(image[i : i + 1], t, torch.ones_like(t), max_new_tokens=steps, eos_token_id=eot)[0].tolist()
        reference = greedy_without_cache(model, image[i : i + 1], row, steps, eot)
        assert alone[: len(reference)] == reference  # the KV-cached steps keep attending to the image
        got = batched[i].tolist()[: len(reference)]
        assert got == reference


def test_generate_refuses_right_padding(tok) -> None:
    model = tiny_task(tok, "mlp").model.eval()
    ids, mask, _ = prompts(tok, model.num_image_tokens)
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(torch.randn(len(ids), 3, 32, 32), ids.flip(1), mask.flip(1), max_new_tokens=2)


# ------------------------------------------------------------------------------------- log-probs
def test_sequence_logprobs_sum_the_supervised_tokens(tok) -> None:
    model = tiny_task(tok, "mlp").model.eval()
    n = model.num_image_tokens
    rows = [encode_segments(tok, [("user", "<image>\nWhat shape is shown?", False), ("assistant", a, True)], n)
            for a in ("A ring.", "Crosses.")]
    ids = pad_ids([r.input_ids for r in rows], tok.pad_token_id)
    labels = pad_ids([r.labels for r in rows], -100)
    mask = pad_ids([[1] * len(r.input_ids) for r in rows], 0)
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logp = model.sequence_logprobs(image, ids, mask, labels)
        for i in range(2):  # the LM's own mean loss over one row's supervised tokens, times their count
            out = model(image[i : i + 1], ids[i : i + 1], mask[i : i + 1], labels=labels[i : i + 1])
            count = int((labels[i, 1:] != -100).sum())
            torch.testing.assert_close(logp[i], -out.loss * count, rtol=1e-5, atol=1e-5)
