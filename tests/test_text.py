"""Tokenizers (trained byte-level BPE, local HF directories) and the text towers."""

from __future__ import annotations

import pytest
import torch

from mm_lightning.data.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    TextTokenizer,
    train_bpe_tokenizer,
    train_tokenizer_from_shards,
)
from mm_lightning.data.shards import write_shards
from mm_lightning.models.text import HFTextEncoder, TextTransformer, pool_tokens

CAPTIONS = [f"a photo of {n} {c} {s}" for n in ("one", "two", "three") for c in ("red", "blue", "green")
            for s in ("circles", "squares")] * 3


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe_tokenizer(CAPTIONS, vocab_size=300).save(str(path))
    return str(path)


def test_trained_tokenizer_wraps_pads_truncates_and_round_trips(tokenizer_file):
    tok = TextTokenizer(tokenizer_file, context_length=10)
    assert 256 + 3 <= tok.vocab_size <= 300
    batch = tok(["A photo of two RED circles", "one blue square " * 10])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape == (2, 10) and ids.dtype == torch.long
    hf = tok.hf
    bos, eos = hf.convert_tokens_to_ids(BOS_TOKEN), hf.convert_tokens_to_ids(EOS_TOKEN)
    n = int(mask[0].sum())
    assert ids[0, 0] == bos and ids[0, n - 1] == eos and (ids[0, n:] == tok.pad_token_id).all() and mask[0, n:].sum() == 0
    assert ids[1, -1] == eos and mask[1].all()  # truncated, the end-of-text token kept
    assert tok.decode(ids[0]) == "a photo of two red circles"  # lower-cased
    # whole caption words became single tokens: 6 words + 2 special tokens, then 2 pads
    assert n == 8 and len(hf.tokenize("a photo of two red circles")) == 6


def test_tokenizer_trained_from_shards_and_missing_file_error(tmp_path):
    samples = [{"__key__": f"{i:04d}", "txt": c, "png": b"x"} for i, c in enumerate(CAPTIONS)]
    write_shards(samples, tmp_path, "cap-train", max_count=20)
    out = train_tokenizer_from_shards(sorted(tmp_path.glob("cap-train-*.tar")), tmp_path / "tokenizer.json", 300)
    assert TextTokenizer(out)(["two green squares"])["attention_mask"].sum() == 5
    with pytest.raises(FileNotFoundError, match="nowhere/tokenizer.json.*data.prepare shapes"):
        TextTokenizer(tmp_path / "nowhere" / "tokenizer.json").vocab_size


def test_local_hugging_face_tokenizer_directory(tmp_path, tokenizer_file):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=tokenizer_file, eos_token=EOS_TOKEN, bos_token=BOS_TOKEN)
    hf.save_pretrained(tmp_path / "hf_tok")  # no pad token: the loader pads with end-of-text
    tok = TextTokenizer(tmp_path / "hf_tok", context_length=10)
    batch = tok(["one red circles"])
    assert batch["input_ids"].shape == (1, 10) and tok.pad_token_id == hf.eos_token_id


def _ids(vocab: int = 40, length: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (3, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    mask[1, 3:] = 0
    return ids * mask, mask


@pytest.mark.parametrize("causal", [True, False])
def test_text_transformer_ignores_padding(causal):
    torch.manual_seed(0)
    model = TextTransformer(vocab_size=40, embed_dim=8, context_length=10, width=16, layers=2, heads=2, causal=causal).eval()
    ids, mask = _ids()
    out = model(ids, mask)
    assert out.shape == (3, 8)
    garbage = ids.clone()
    garbage[mask == 0] = 7  # other ids where the mask is 0
    assert torch.allclose(model(garbage, mask), out, atol=1e-5)


def test_causal_mask_hides_later_tokens_and_bidirectional_does_not():
    ids, mask = _ids()
    changed = ids.clone()
    changed[2, 5] = (changed[2, 5] + 1) % 40 + 3
    for causal in (True, False):
        torch.manual_seed(0)
        model = TextTransformer(40, 8, 10, 16, 2, 2, causal=causal, pooling="first").eval()
        same_first = torch.allclose(model(ids, mask)[2], model(changed, mask)[2], atol=1e-6)
        assert same_first == causal  # the first token sees token 5 only without the causal mask


def test_pooling_at_end_of_text_mean_and_first():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float).view(2, 4, 1)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert pool_tokens(hidden, mask, "eot").flatten().tolist() == [1.0, 7.0]
    assert pool_tokens(hidden, mask, "first").flatten().tolist() == [0.0, 4.0]
    assert pool_tokens(hidden, mask, "mean").flatten().tolist() == [0.5, 5.5]
    with pytest.raises(ValueError, match="pooling 'cls'"):
        TextTransformer(40, pooling="cls")  # type: ignore[arg-type]


def test_too_long_text_and_indivisible_heads_are_errors():
    with pytest.raises(ValueError, match="not divisible"):
        TextTransformer(40, width=10, heads=4)
    model = TextTransformer(40, 8, context_length=4, width=8, layers=1, heads=2)
    with pytest.raises(ValueError, match="context_length 4"):
        model(torch.ones(1, 6, dtype=torch.long))


def test_hugging_face_encoder_from_a_local_directory(tmp_path):
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16)
    BertModel(config).save_pretrained(tmp_path / "bert")
    encoder = HFTextEncoder(tmp_path / "bert", embed_dim=8, pooling="first")
    ids, mask = _ids(vocab=60, length=10)
    assert encoder(ids, mask).shape == (3, 8) and encoder.vocab_size == 60
    with pytest.raises(FileNotFoundError, match="model.text_model"):
        HFTextEncoder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="model.text_model '.*empty': the directory holds no config.json"):
        HFTextEncoder(tmp_path / "empty")


def test_tokenizer_contract_is_structural():
    """The CLI's ``tokenizer:`` accepts Tokenizer subclasses and any class with vocab_size, pad_token_id and decode
    (the chat tokenizer), nothing else."""
    from mm_lightning.data.chat_tokenizer import ChatTokenizer
    from mm_lightning.data.tokenizer import Tokenizer

    class Partial:
        vocab_size = 3

        def decode(self, ids):
            return ""

    assert issubclass(TextTokenizer, Tokenizer) and issubclass(ChatTokenizer, Tokenizer)
    assert not issubclass(Partial, Tokenizer) and not issubclass(dict, Tokenizer)
