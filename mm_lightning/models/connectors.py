"""Connectors: how a vision tower's tokens reach a causal language model.

One interface (:class:`Connector`), chosen by name in :func:`build_connector`:

- ``mlp`` (:class:`MLPProjector`, LLaVA's ``mlp2x_gelu``): one LM token per visual token
  (optionally fewer: 2-D average pooling or pixel-shuffle by ``downsample``).
- ``qformer`` (:class:`QFormer`, BLIP-2): N learnable queries, self-attention among them,
  cross-attention to the visual tokens every ``cross_every``-th layer, a linear map to the LM width.
- ``resampler`` (:class:`PerceiverResampler`, OpenFlamingo/Flamingo): latents attend to the visual
  tokens and themselves, a linear map to the LM width.
- ``xattn`` (:class:`GatedCrossAttentionFusion`, Flamingo): a resampler, then tanh-gated
  cross-attention blocks (gates at 0) run before every ``every``-th decoder layer of the LM.

The first three are *token* connectors: ``forward(visual)`` maps ``(B, Nv, Dv)`` to
``(B, num_image_tokens, D_lm)``, which :class:`~mm_lightning.models.vlm.VisionLanguageModel`
writes at the image-token positions. The fusion connector keeps one ``<image>`` token in the
text (``num_image_tokens == 1``: only its position matters) and acts inside the LM through
forward pre-hooks on the decoder layers (:meth:`GatedCrossAttentionFusion.attach`), so the LM's
own module tree, parameter names and state dict stay those of the plain LM (an LM checkpoint
loads unchanged; LoRA target names never hit the fusion blocks).

We write these small modules ourselves (rather than ``transformers``' ``Blip2QFormerModel``) to
have one attention implementation (``scaled_dot_product_attention``) with the projection names
(``q_proj``/``k_proj``/``v_proj``/``o_proj``, ``fc1``/``fc2``) that the tensor-parallel plan knows,
and to initialise the queries normal(0, 0.02) (``Blip2QFormerModel`` zero-fills them, and zero
queries without position embeddings stay identical forever).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

ConnectorKind = Literal["mlp", "qformer", "resampler", "xattn"]


class Attention(nn.Module):
    """Multi-head attention of ``x`` over ``context`` (self-attention when ``context`` is ``x``).

    ``mask`` ``(B, Lq, Lk)`` bool, True where a query may attend.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.num_heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(context_dim or dim, dim)
        self.v_proj = nn.Linear(context_dim or dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, lq, _ = x.shape
        lk = context.shape[1]
        h = self.num_heads
        q = self.q_proj(x).view(b, lq, h, -1).transpose(1, 2)
        k = self.k_proj(context).view(b, lk, h, -1).transpose(1, 2)
        v = self.v_proj(context).view(b, lk, h, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None])
        return self.o_proj(out.transpose(1, 2).reshape(b, lq, -1))


class FeedForward(nn.Module):
    """Pre-norm MLP: LayerNorm, Linear, GELU, Linear."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


def grid_code(num_tokens: int, dim: int) -> torch.Tensor:
    """:func:`sincos_2d` of a square grid of ``num_tokens`` as ``(1, num_tokens, dim)``; a clear error otherwise."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens or dim % 4:
        raise ValueError(f"connector sincos needs a square token grid and a width divisible by 4 (got {num_tokens} "
                         f"tokens of width {dim})")
    return sincos_2d(side, dim)[None]


def sincos_2d(side: int, dim: int) -> torch.Tensor:
    """MAE's fixed 2-D sine-cosine position code of a ``side x side`` grid, row by row: ``(side**2, dim)``;
    the first half codes the row, the second the column (``dim`` divisible by 4)."""
    quarter = dim // 4
    freqs = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    pos = torch.arange(side, dtype=torch.float32)[:, None] * freqs[None]  # (side, quarter)
    code = torch.cat([pos.sin(), pos.cos()], dim=1)  # (side, dim / 2)
    rows = code[:, None, :].expand(side, side, -1)
    cols = code[None, :, :].expand(side, side, -1)
    return torch.cat([rows, cols], dim=-1).reshape(side * side, 2 * code.shape[1])


class Connector(nn.Module):
    """Base class of the connectors: visual tokens ``(B, Nv, Dv)`` -> what the LM consumes.

    ``num_image_tokens`` is how many ``<image>`` tokens the text must hold per image (the
    conversation pipeline expands the placeholder to exactly that many). ``fusion`` connectors act
    inside the LM (see :class:`GatedCrossAttentionFusion`) instead of returning LM input tokens.
    """

    fusion: bool = False

    @property
    def num_image_tokens(self) -> int:
        raise NotImplementedError

    def blocks(self) -> list[nn.Module]:
        """The repeated blocks (units for FSDP and activation checkpointing); none by default."""
        return []


# ----------------------------------------------------------------------------------------- mlp
class MLPProjector(Connector):
    """LLaVA's ``mlp2x_gelu``: Linear, GELU, Linear, applied to every visual token.

    With ``downsample = r > 1`` the ``h x w`` token grid (``Nv`` must be a square, and ``h``
    divisible by ``r``) is first reduced ``r x r``-fold: ``pool: avg`` averages each ``r x r``
    cell (width ``Dv``), ``pool: pixel_shuffle`` stacks it into one token of width ``r * r * Dv``
    (nanoVLM / Idefics3), so ``num_image_tokens = Nv / r**2``.

    Args:
        vision_dim: width ``Dv`` of the visual tokens.
        lm_dim: the LM's hidden size.
        num_visual_tokens: ``Nv``, visual tokens per image.
        hidden_dim: width of the hidden layer (default ``lm_dim``, as LLaVA).
        downsample: grid reduction factor ``r``.
        pool: ``avg`` or ``pixel_shuffle`` (only used when ``downsample > 1``).
        input_norm: LayerNorm on the visual tokens first (useful for towers whose token
            features are not normalised, e.g. timm ViTs pooled through ``fc_norm``).
        position_embedding: where each image token sits, added to the LM's input: ``none`` (LLaVA),
            ``learned`` (one learned vector per image token, on the output) or ``sincos`` (MAE's fixed 2-D
            sine-cosine code of the patch's row and column, on the normalised visual tokens). The LM's rotary
            positions reach only its attention scores, not the values it reads, and from a 1-D sequence of
            grid tokens a column is hard to tell (left and right cells interleave row by row).
    """

    def __init__(
        self,
        vision_dim: int,
        lm_dim: int,
        num_visual_tokens: int,
        hidden_dim: int | None = None,
        downsample: int = 1,
        pool: Literal["avg", "pixel_shuffle"] = "avg",
        input_norm: bool = False,
        position_embedding: Literal["none", "learned", "sincos"] = "none",
    ) -> None:
        super().__init__()
        if downsample < 1:
            raise ValueError(f"connector downsample must be >= 1, got {downsample}")
        if pool not in ("avg", "pixel_shuffle"):
            raise ValueError(f"connector pool must be 'avg' or 'pixel_shuffle', got {pool!r}")
        side = math.isqrt(num_visual_tokens)
        if downsample > 1 and side * side != num_visual_tokens:
            hint = ""
            if math.isqrt(num_visual_tokens - 1) ** 2 == num_visual_tokens - 1:
                hint = " (a class token kept? model.vision_select: default drops it)"
            raise ValueError(
                f"model.connector_kwargs.downsample={downsample} needs a square grid of visual tokens; the vision "
                f"tower gives {num_visual_tokens} tokens{hint}"
            )
        if downsample > 1 and side % downsample:
            raise ValueError(
                f"model.connector_kwargs.downsample={downsample} does not divide the vision tower's {side}x{side} patch "
                f"grid ({num_visual_tokens} tokens): choose a downsample that divides {side}, or another image size"
            )
        self.num_visual_tokens = num_visual_tokens
        self.downsample = downsample
        self.pool = pool
        self.grid = side
        in_dim = vision_dim * downsample * downsample if downsample > 1 and pool == "pixel_shuffle" else vision_dim
        hidden = hidden_dim or lm_dim
        self.norm = nn.LayerNorm(vision_dim) if input_norm else nn.Identity()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, lm_dim)
        if position_embedding not in ("none", "learned", "sincos"):
            raise ValueError(f"connector position_embedding must be none, learned or sincos, got {position_embedding!r}")
        if position_embedding == "sincos" and (side * side != num_visual_tokens or vision_dim % 4):
            raise ValueError("connector position_embedding: sincos needs a square token grid and a width divisible by 4")
        n = num_visual_tokens // (downsample * downsample)
        self.pos_embed = nn.Parameter(torch.randn(1, n, lm_dim) * 0.02) if position_embedding == "learned" else None
        if position_embedding == "sincos":
            self.register_buffer("grid_code", sincos_2d(side, vision_dim)[None], persistent=False)
        else:
            self.grid_code = None

    @property
    def num_image_tokens(self) -> int:
        return self.num_visual_tokens // (self.downsample * self.downsample)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"} if self.pos_embed is not None else set()

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, Nv, D)`` -> ``(B, Nv / r^2, D or r^2 D)``: the grid reduction (identity for ``r = 1``)."""
        r = self.downsample
        if r == 1:
            return x
        b, n, d = x.shape
        s = self.grid
        grid = x.view(b, s // r, r, s // r, r, d)  # rows split into (cell row, row in cell), same for columns
        if self.pool == "avg":
            return grid.mean(dim=(2, 4)).reshape(b, -1, d)
        return grid.permute(0, 1, 3, 2, 4, 5).reshape(b, (s // r) ** 2, r * r * d)

    def forward(self, visual: torch.Tensor) -> torch.Tensor:
        visual = self.norm(visual)
        if self.grid_code is not None:
            visual = visual + self.grid_code.to(visual.dtype)
        out = self.fc2(F.gelu(self.fc1(self.reduce(visual))))
        return out + self.pos_embed if self.pos_embed is not None else out


# ------------------------------------------------------------------------------------- qformer
class QFormerLayer(nn.Module):
    """One Q-Former layer (pre-norm): self-attention among the queries, optional cross-attention to
    the visual tokens, MLP."""

    def __init__(self, dim: int, heads: int, vision_dim: int, cross: bool, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads)
        self.cross = cross
        if cross:
            self.norm_cross = nn.LayerNorm(dim)
            self.cross_attn = Attention(dim, heads, context_dim=vision_dim)
        self.mlp = FeedForward(dim, mlp_ratio)

    def forward(self, queries: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        h = self.norm1(queries)
        queries = queries + self.self_attn(h, h)
        if self.cross:
            queries = queries + self.cross_attn(self.norm_cross(queries), visual)
        return queries + self.mlp(queries)


class QFormer(Connector):
    """BLIP-2's querying transformer: ``num_queries`` learnable queries read the visual tokens.

    Queries are initialised normal(0, 0.02) (as LAVIS; zeros would never break their symmetry).
    Layer ``i`` cross-attends to the (LayerNorm-ed) visual tokens when ``i % cross_every == 0``
    (BLIP-2: every 2nd layer). A LayerNorm and a Linear map the queries to the LM width.

    A learned position embedding per visual token (``visual_pos_embed``) is added to the keys' input,
    so where a feature sits in the image stays readable whatever the tower kept of its own positions.

    Args:
        vision_dim: width of the visual tokens.
        lm_dim: the LM's hidden size.
        num_visual_tokens: visual tokens per image (for their position embedding).
        num_queries: queries, i.e. image tokens given to the LM.
        dim: width of the Q-Former.
        depth: layers.
        heads: attention heads.
        cross_every: cross-attention in every ``cross_every``-th layer (1: every layer).
        mlp_ratio: MLP width as a multiple of ``dim``.
        sincos: also add MAE's fixed 2-D sine-cosine code of each visual token's row and column (as the
            ``mlp`` connector's ``position_embedding: sincos``).
    """

    def __init__(
        self,
        vision_dim: int,
        lm_dim: int,
        num_visual_tokens: int,
        num_queries: int = 16,
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        cross_every: int = 1,
        mlp_ratio: float = 2.0,
        sincos: bool = False,
    ) -> None:
        super().__init__()
        if num_queries < 1 or depth < 1 or cross_every < 1:
            raise ValueError("connector num_queries, depth and cross_every must be >= 1")
        self.queries = nn.Parameter(torch.randn(1, num_queries, dim) * 0.02)
        self.visual_pos_embed = nn.Parameter(torch.randn(1, num_visual_tokens, vision_dim) * 0.02)
        self.register_buffer("grid_code", grid_code(num_visual_tokens, vision_dim) if sincos else None, persistent=False)
        self.visual_norm = nn.LayerNorm(vision_dim)
        self.layers = nn.ModuleList(
            QFormerLayer(dim, heads, vision_dim, cross=i % cross_every == 0, mlp_ratio=mlp_ratio) for i in range(depth)
        )
        self.out_norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, lm_dim)

    @property
    def num_image_tokens(self) -> int:
        return self.queries.shape[1]

    def no_weight_decay(self) -> set[str]:
        return {"queries", "visual_pos_embed"}

    def blocks(self) -> list[nn.Module]:
        return list(self.layers)

    def forward(self, visual: torch.Tensor) -> torch.Tensor:
        visual = self.visual_norm(visual) + self.visual_pos_embed
        if self.grid_code is not None:
            visual = visual + self.grid_code.to(visual.dtype)
        x = self.queries.expand(visual.shape[0], -1, -1)
        for layer in self.layers:
            x = layer(x, visual)
        return self.proj(self.out_norm(x))


# ----------------------------------------------------------------------------------- resampler
class PerceiverLayer(nn.Module):
    """One Perceiver-resampler layer: latents attend to ``[visual; latents]``, then an MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm_visual = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = FeedForward(dim, mlp_ratio)

    def forward(self, latents: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        h = self.norm_latents(latents)
        context = torch.cat([self.norm_visual(visual), h], dim=1)
        latents = latents + self.attn(h, context)
        return latents + self.mlp(latents)


class Resampler(nn.Module):
    """OpenFlamingo's Perceiver resampler at width ``dim``: ``(B, Nv, Dv)`` -> ``(B, num_latents, dim)``.

    The visual tokens are first mapped to ``dim`` and given a learned position embedding per
    token (``num_visual_tokens`` of them), since attention over them is otherwise order-blind.
    """

    def __init__(
        self, vision_dim: int, num_visual_tokens: int, num_latents: int, dim: int, depth: int, heads: int,
        mlp_ratio: float, sincos: bool = False,
    ) -> None:
        super().__init__()
        if num_latents < 1 or depth < 1:
            raise ValueError("connector num_latents and depth must be >= 1")
        self.input_proj = nn.Linear(vision_dim, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, num_visual_tokens, dim) * 0.02)
        self.register_buffer("grid_code", grid_code(num_visual_tokens, dim) if sincos else None, persistent=False)
        self.latents = nn.Parameter(torch.randn(1, num_latents, dim) * 0.02)
        self.layers = nn.ModuleList(PerceiverLayer(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "latents"}

    def forward(self, visual: torch.Tensor) -> torch.Tensor:
        visual = self.input_proj(visual) + self.pos_embed
        if self.grid_code is not None:  # optional fixed 2-D sine-cosine code on top (``sincos``)
            visual = visual + self.grid_code.to(visual.dtype)
        x = self.latents.expand(visual.shape[0], -1, -1)
        for layer in self.layers:
            x = layer(x, visual)
        return self.norm(x)


class PerceiverResampler(Connector):
    """The resampler as a token connector: ``num_latents`` tokens, linearly mapped to the LM width.

    Args:
        vision_dim: width of the visual tokens.
        lm_dim: the LM's hidden size.
        num_visual_tokens: visual tokens per image (for their position embedding).
        num_latents: latents, i.e. image tokens given to the LM.
        dim: width of the resampler.
        depth: layers.
        heads: attention heads.
        mlp_ratio: MLP width as a multiple of ``dim``.
        sincos: also add the fixed 2-D sine-cosine code of each visual token's row and column.
    """

    def __init__(
        self,
        vision_dim: int,
        lm_dim: int,
        num_visual_tokens: int,
        num_latents: int = 16,
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        sincos: bool = False,
    ) -> None:
        super().__init__()
        self.resampler = Resampler(vision_dim, num_visual_tokens, num_latents, dim, depth, heads, mlp_ratio, sincos)
        self.proj = nn.Linear(dim, lm_dim)

    @property
    def num_image_tokens(self) -> int:
        return self.resampler.latents.shape[1]

    def blocks(self) -> list[nn.Module]:
        return list(self.resampler.layers)

    def forward(self, visual: torch.Tensor) -> torch.Tensor:
        return self.proj(self.resampler(visual))


# ---------------------------------------------------------------------------------------- xattn
class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's gated cross-attention block, run before an LM decoder layer::

        x = x + tanh(g_attn) * m * xattn(norm(x), visual)
        x = x + tanh(g_ff) * ff(x)

    with both gates initialised at 0 (the LM is unchanged at the start) and ``m`` (B, L, 1) zero for
    text before the image (it attends to nothing). The projections are named ``to_q``/``to_k``/...
    (not ``q_proj``...) so LoRA target names meant for the LM never match them.
    """

    def __init__(self, dim: int, visual_dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"LM hidden size {dim} is not divisible by connector heads={heads}")
        self.num_heads = heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(visual_dim, dim, bias=False)
        self.to_v = nn.Linear(visual_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        self.ff_norm = nn.LayerNorm(dim)
        self.ff_in = nn.Linear(dim, int(dim * mlp_ratio), bias=False)
        self.ff_out = nn.Linear(int(dim * mlp_ratio), dim, bias=False)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, visual: torch.Tensor, media_mask: torch.Tensor) -> torch.Tensor:
        b, lq, d = x.shape
        h = self.num_heads
        q = self.to_q(self.norm(x)).view(b, lq, h, -1).transpose(1, 2)
        k = self.to_k(visual).view(b, visual.shape[1], h, -1).transpose(1, 2)
        v = self.to_v(visual).view(b, visual.shape[1], h, -1).transpose(1, 2)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, lq, d)
        x = x + torch.tanh(self.attn_gate) * self.to_out(attn) * media_mask.to(x.dtype)
        return x + torch.tanh(self.ff_gate) * self.ff_out(F.gelu(self.ff_in(self.ff_norm(x))))


class GatedCrossAttentionFusion(Connector):
    """Flamingo-style fusion: a Perceiver resampler, then gated cross-attention in the LM.

    :meth:`attach` registers forward pre-hooks on every ``every``-th decoder layer of a Hugging Face
    causal LM (layers ``0, every, 2 * every, ...``) and one on its decoder stack that records the
    positions of the tokens being run. Before the LM runs, :meth:`condition` sets the visual tokens
    and each row's image position; a token attends to the image iff its position is at or after
    that row's first ``<image>`` token (text before the image attends to nothing). Positions are the
    ``position_ids`` the LM receives (its default ``past + arange(L)`` when none are given), so the
    same rule holds in a full forward, in prefill and in every KV-cached generation step; the
    conditioning stays until :meth:`clear`.

    Args:
        vision_dim: width of the visual tokens.
        lm_dim: the LM's hidden size.
        num_visual_tokens: visual tokens per image.
        num_latents: resampled visual tokens the blocks attend to.
        dim: width of the resampler.
        depth: resampler layers.
        heads: attention heads (resampler and cross-attention).
        every: a cross-attention block before every ``every``-th decoder layer.
        mlp_ratio: MLP width of the resampler and the blocks.
        sincos: also add the fixed 2-D sine-cosine code of each visual token's row and column.
    """

    fusion = True

    def __init__(
        self,
        vision_dim: int,
        lm_dim: int,
        num_visual_tokens: int,
        num_layers: int,
        num_latents: int = 16,
        dim: int = 128,
        depth: int = 1,
        heads: int = 4,
        every: int = 1,
        mlp_ratio: float = 2.0,
        sincos: bool = False,
    ) -> None:
        super().__init__()
        if every < 1:
            raise ValueError(f"connector every must be >= 1, got {every}")
        self.every = every
        self.resampler = Resampler(vision_dim, num_visual_tokens, num_latents, dim, depth, heads, mlp_ratio, sincos)
        self.layer_ids = list(range(0, num_layers, every))
        self.xattn = nn.ModuleList(GatedCrossAttentionBlock(lm_dim, dim, heads, mlp_ratio) for _ in self.layer_ids)
        self._context: dict[str, Any] = {}
        self._hooks: list[Any] = []

    @property
    def num_image_tokens(self) -> int:
        return 1

    def blocks(self) -> list[nn.Module]:
        return list(self.resampler.layers) + list(self.xattn)

    def resample(self, visual: torch.Tensor) -> torch.Tensor:
        """The visual tokens the blocks attend to, ``(B, num_latents, dim)``."""
        return self.resampler(visual)

    # ------------------------------------------------------------------ conditioning
    def condition(self, visual: torch.Tensor | None, image_positions: torch.Tensor | None) -> None:
        """Set the resampled visual tokens ``(B, N, dim)`` and each row's image position ``(B,)``
        (a row without an image: a position no token reaches). ``None`` clears."""
        if visual is None:
            self._context = {}
        else:
            self._context = {"visual": visual, "image_positions": image_positions}

    def clear(self) -> None:
        self._context = {}

    # ----------------------------------------------------------------------- hooks
    def attach(self, decoder: nn.Module, layers: nn.ModuleList | list[nn.Module]) -> None:
        """Hook into ``decoder`` (the LM's decoder stack) and its ``layers``; idempotent."""
        if len(layers) <= self.layer_ids[-1]:
            raise ValueError(
                f"the xattn connector was built for {self.layer_ids[-1] + 1}+ decoder layers, the LM has {len(layers)}"
            )
        self.detach()
        self._hooks.append(decoder.register_forward_pre_hook(self._record_positions, with_kwargs=True))
        for block_index, layer_index in enumerate(self.layer_ids):
            # a partial of a bound method, not a closure: copy.deepcopy of the model (a DPO reference, the
            # benchmark's bare copy) then hooks the copy's layers to the copy's blocks, not to this connector's
            hook = functools.partial(self._cross_attend, block_index)
            self._hooks.append(layers[layer_index].register_forward_pre_hook(hook, with_kwargs=True))

    def detach(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _record_positions(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._context:
            return
        positions = kwargs.get("position_ids")
        if positions is None:
            embeds = kwargs.get("inputs_embeds")
            ids = kwargs.get("input_ids", args[0] if args else None)
            length = embeds.shape[1] if embeds is not None else ids.shape[1]
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
            device = (embeds if embeds is not None else ids).device
            positions = torch.arange(past, past + length, device=device)[None]
        self._context["positions"] = positions

    def _cross_attend(self, block_index: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Forward pre-hook of a decoder layer: its input through gated cross-attention block ``block_index``."""
        ctx = self._context
        if not ctx:
            return None
        if "positions" not in ctx:
            raise RuntimeError("xattn: the decoder stack's positions were not recorded (was attach() called?)")
        hidden = args[0] if args else kwargs["hidden_states"]
        positions = ctx["positions"]
        media_mask = (positions >= ctx["image_positions"][:, None])[..., None]  # (B, L, 1)
        hidden = self.xattn[block_index](hidden, ctx["visual"], media_mask)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}


# -------------------------------------------------------------------------------------- factory
def build_connector(
    kind: ConnectorKind,
    vision_dim: int,
    num_visual_tokens: int,
    lm_dim: int,
    num_lm_layers: int,
    **kwargs: Any,
) -> Connector:
    """The connector ``kind`` for a tower of ``num_visual_tokens`` tokens of width ``vision_dim`` and an
    LM of width ``lm_dim`` with ``num_lm_layers`` decoder layers; ``kwargs`` are the connector's own
    options (see each class). Unknown options fail naming them."""
    import inspect

    classes: dict[str, type[Connector]] = {
        "mlp": MLPProjector, "qformer": QFormer, "resampler": PerceiverResampler, "xattn": GatedCrossAttentionFusion,
    }
    if kind not in classes:
        raise ValueError(f"model.connector must be one of {', '.join(classes)}, got {kind!r}")
    cls = classes[kind]
    given = {"vision_dim": vision_dim, "lm_dim": lm_dim, "num_visual_tokens": num_visual_tokens,
             "num_layers": num_lm_layers}
    params = inspect.signature(cls).parameters
    own = [p for p in params if p not in given]
    unknown = sorted(set(kwargs) - set(own))
    if unknown:
        raise ValueError(f"model.connector_kwargs: {kind} does not take {', '.join(unknown)} (it takes {', '.join(own)})")
    return cls(**{k: v for k, v in given.items() if k in params}, **kwargs)
