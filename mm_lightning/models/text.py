"""Text towers for image-text models: a CLIP-style text transformer, or a local Hugging Face encoder.

Both map ``(input_ids, attention_mask)`` of shape ``(B, L)`` to ``(B, embed_dim)`` features
(unnormalised; the task normalises them). Right padding is assumed, as
:class:`~mm_lightning.data.tokenizer.TextTokenizer` produces it: the end-of-text token sits at
the last position where ``attention_mask`` is 1.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
import torch.nn as nn

Pooling = Literal["eot", "first", "mean"]


def pool_tokens(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """One vector per text from token states ``(B, L, D)``.

    ``eot``: the state at the end-of-text token (the last unmasked position, CLIP's choice);
    ``first``: the first token (BERT's ``[CLS]``); ``mean``: the mean over unmasked tokens.
    """
    if pooling == "eot":
        last = attention_mask.long().sum(1).clamp(min=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if pooling == "first":
        return hidden[:, 0]
    if pooling == "mean":
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    raise ValueError(f"unknown text pooling {pooling!r}; choose eot, first or mean")


class TextTransformer(nn.Module):
    """CLIP's text encoder: token + learned position embeddings, pre-norm transformer blocks, a final
    LayerNorm, pooling at the end-of-text token and a linear projection to ``embed_dim``.

    Args:
        vocab_size: rows of the token embedding; must be at least the tokenizer's vocabulary size.
        embed_dim: width of the output features (the joint image-text space).
        context_length: longest token sequence (size of the position table).
        width: hidden size of the transformer.
        layers: number of transformer blocks.
        heads: attention heads (must divide ``width``).
        mlp_ratio: hidden size of the MLP as a multiple of ``width``.
        causal: causal self-attention (CLIP) instead of bidirectional attention over the unpadded tokens.
        pooling: ``eot`` (CLIP), ``first`` or ``mean`` (see :func:`pool_tokens`).
        dropout: dropout inside the blocks.
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 128,
        context_length: int = 32,
        width: int = 128,
        layers: int = 3,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        causal: bool = True,
        pooling: Pooling = "eot",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"text width {width} is not divisible by text heads {heads}")
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.causal = causal
        self.pooling = pooling
        pool_tokens(torch.zeros(1, 1, 1), torch.ones(1, 1), pooling)  # validate the name now
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        block = nn.TransformerEncoderLayer(
            d_model=width,
            nhead=heads,
            dim_feedforward=int(width * mlp_ratio),
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(block, num_layers=layers, enable_nested_tensor=False)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Linear(width, embed_dim, bias=False)
        self.grad_checkpointing = False
        self.init_weights(layers, width)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (timm's switch, same name)."""
        self.grad_checkpointing = enable

    def init_weights(self, layers: int, width: int) -> None:
        """CLIP's initialisation: small embeddings, residual projections scaled down with depth."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        for block in self.transformer.layers:
            nn.init.normal_(block.self_attn.in_proj_weight, std=width**-0.5)
            nn.init.normal_(block.self_attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.linear1.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.linear2.weight, std=proj_std)
        nn.init.normal_(self.text_projection.weight, std=width**-0.5)

    def no_weight_decay(self) -> set[str]:
        """Embedding tables take no weight decay (open_clip's convention); norms and biases are 1-d anyway."""
        return {"positional_embedding", "token_embedding.weight"}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, L)`` token ids (right-padded) -> ``(B, embed_dim)`` features."""
        batch, length = input_ids.shape
        if length > self.context_length:
            raise ValueError(
                f"text of {length} tokens is longer than the text tower's context_length {self.context_length}: "
                "raise model.context_length or lower the pipeline's context_length"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        else:
            # Right padding: drop the columns after the longest text. Exact (pads sit after the
            # end-of-text token and are never attended to) and much cheaper for short captions.
            longest = int(attention_mask.sum(1).max()) if batch else 0
            if 0 < longest < length:
                input_ids, attention_mask, length = input_ids[:, :longest], attention_mask[:, :longest], longest
        x = self.token_embedding(input_ids) + self.positional_embedding[:length]
        mask = pad = None
        if self.causal:
            # Causal attention: a token sees itself and earlier tokens. The pads come after the
            # end-of-text token, so no real token ever attends to them.
            mask = nn.Transformer.generate_square_subsequent_mask(length, device=x.device, dtype=x.dtype)
        else:
            pad = attention_mask == 0
        if self.grad_checkpointing and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            for block in self.transformer.layers:  # what nn.TransformerEncoder runs, block by block
                x = checkpoint(block, x, mask, pad, self.causal, use_reentrant=False)
        elif self.causal:
            x = self.transformer(x, mask=mask, is_causal=True)
        else:
            x = self.transformer(x, src_key_padding_mask=pad)
        x = self.ln_final(x)
        return self.text_projection(pool_tokens(x, attention_mask, self.pooling))


class HFTextEncoder(nn.Module):
    """A pretrained Hugging Face encoder (BERT, RoBERTa, ...) by hub id or local directory, pooled and projected.

    Args:
        path: a hub id or a directory that ``transformers.AutoModel.from_pretrained`` reads (``config.json`` +
            safetensors weights; :mod:`mm_lightning.models.hub`'s rules: the HF cache when offline, no remote code).
        embed_dim: width of the output features.
        pooling: ``first`` (``[CLS]``), ``mean`` or ``eot`` (see :func:`pool_tokens`).
    """

    def __init__(self, path: str | os.PathLike, embed_dim: int = 128, pooling: Pooling = "mean") -> None:
        super().__init__()
        from transformers import AutoModel

        from mm_lightning.models import hub

        path = os.fspath(path)
        if not os.path.isdir(path) and not hub.looks_like_hub_id(path):
            raise FileNotFoundError(f"model.text_model {path!r} is not a directory (a local Hugging Face model) nor a "
                                    "hub id (org/name)")
        try:  # hub id or directory: cached when offline, safetensors only, never remote code
            self.model = hub.load_pretrained(AutoModel, path, "model.text_model")
        except hub.PretrainedError as err:
            raise hub.PretrainedError(str(err)) from None
        pool_tokens(torch.zeros(1, 1, 1), torch.ones(1, 1), pooling)
        self.pooling = pooling
        self.vocab_size = int(self.model.config.vocab_size)
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 0) or 0) or None
        self.text_projection = nn.Linear(self.model.config.hidden_size, embed_dim, bias=False)
        nn.init.normal_(self.text_projection.weight, std=self.model.config.hidden_size**-0.5)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.text_projection(pool_tokens(hidden, attention_mask, self.pooling))
