"""The scalar head of a reward model: the LM's last hidden state at each row's last attended token -> a reward.

Hugging Face sequence-classification heads pool the last non-pad token found from ``input_ids``;
given only ``inputs_embeds`` (as the multimodal LLM feeds its LM) they take position -1, which is a
padding position in a right-padded row. :func:`last_token_pool` finds the position from the
``attention_mask`` instead, so right-padded, left-padded and unpadded rows all pool their last real
token. No Lightning imports (:mod:`mm_lightning.tasks.reward` trains it).
"""

from __future__ import annotations

import torch
import torch.nn as nn


def last_attended_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per row, the index of its last position whose mask is 1 ``(B,)`` (right or left padding alike)."""
    if attention_mask.ndim != 2:
        raise ValueError(f"attention_mask must be (B, L), got shape {tuple(attention_mask.shape)}")
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    index = torch.where(attention_mask.bool(), positions, torch.full_like(positions, -1)).amax(dim=1)
    if bool((index < 0).any()):
        raise ValueError(f"row {int((index < 0).nonzero()[0, 0])} of the batch has no attended token to pool")
    return index


def last_token_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``hidden_states`` ``(B, L, D)`` at each row's last attended token: ``(B, D)``."""
    index = last_attended_index(attention_mask)
    return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), index]


class ScalarHead(nn.Module):
    """A linear map from the pooled last hidden state to one reward per sequence.

    Args:
        hidden_size: width of the LM's hidden states.
        init_std: standard deviation of the initial weights (0: the head starts at reward 0 everywhere).
    """

    def __init__(self, hidden_size: int, init_std: float = 0.0) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.linear.weight, std=init_std) if init_std > 0 else nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Rewards ``(B,)`` of the rows of ``hidden_states`` ``(B, L, D)``, pooled by ``attention_mask``."""
        pooled = last_token_pool(hidden_states, attention_mask)
        return self.linear(pooled.to(self.linear.weight.dtype)).squeeze(-1)
