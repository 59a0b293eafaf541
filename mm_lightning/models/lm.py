"""Causal language models by hub id or local directory, under :mod:`mm_lightning.models.hub`'s rules.

``load_causal_lm("HuggingFaceTB/SmolLM2-135M-Instruct")`` or ``load_causal_lm("path/to/dir")``:
downloaded only when online (the HF cache when ``HF_HUB_OFFLINE`` is set), never remote code,
weights only from safetensors (a directory holding only ``pytorch_model.bin`` is refused naming
it), loaded in float32 (the master copy that the trainer's precision setting casts). Weights that do
not fit the ``config.json`` beside them are refused instead of being left at random: a tensor of
another shape (saved at another width), a tensor the architecture needs and the weights lack, or a
tensor the architecture has no place for. ``random_init`` builds the architecture from its
``config.json`` alone and reads no weights (real-size speed checks and parameter counts).

Every failure is one line (:class:`~mm_lightning.models.hub.PretrainedError`) naming the option and
the id or path. No Lightning imports.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn as nn

from mm_lightning.models import hub
from mm_lightning.models.hub import PretrainedError


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def lm_config(name: str | os.PathLike, option: str = "model.lm") -> Any:
    """The ``transformers`` config of the LM ``name`` (hub id or directory; only its ``config.json`` is read)."""
    from transformers import AutoConfig

    text = os.fspath(name)
    try:
        if hub.looks_like_hub_id(text):
            hub.check_cached(text, option)
        else:
            directory = os.path.expanduser(text)
            if not os.path.isdir(directory):
                raise PretrainedError(f"{option} {text!r}: no such directory and not a hub id (org/name)")
            if not os.path.isfile(os.path.join(directory, hub.CONFIG_FILE)):
                raise PretrainedError(f"{option} {text!r}: the directory holds no {hub.CONFIG_FILE} (is it a model "
                                      "saved with save_pretrained?)")
            text = directory
        return AutoConfig.from_pretrained(text, local_files_only=hub.is_offline(), trust_remote_code=False)
    except PretrainedError as err:
        raise PretrainedError(str(err)) from None  # one line: the cause's text is not the user's
    except (OSError, ValueError, KeyError) as err:
        raise PretrainedError(f"{option} {text!r}: its {hub.CONFIG_FILE} could not be read: {_first_line(err)}") from None


def load_causal_lm(name: str | os.PathLike, option: str = "model.lm", random_init: bool = False,
                   **kwargs: Any) -> nn.Module:
    """``AutoModelForCausalLM`` of ``name`` (hub id or directory; see the module docstring).

    ``kwargs`` go to ``from_pretrained`` (e.g. ``quantization_config``); with ``random_init`` the model
    is ``from_config`` of :func:`lm_config` and no weight file is opened.
    """
    from transformers import AutoModelForCausalLM

    text = os.fspath(name)
    if random_init:
        return AutoModelForCausalLM.from_config(lm_config(text, option), dtype=torch.float32)  # as loaded weights
    kwargs = {"dtype": torch.float32, **kwargs, "output_loading_info": True, "ignore_mismatched_sizes": True}
    try:
        model, info = hub.load_pretrained(AutoModelForCausalLM, text, option, **kwargs)
    except PretrainedError as err:
        raise PretrainedError(str(err)) from None
    except Exception as err:  # noqa: BLE001 - safetensors' and transformers' other load errors, one line too
        raise PretrainedError(f"{option} {text!r} could not be loaded: {type(err).__name__}: {_first_line(err)}") from None
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda entry: str(entry[0]))
    if mismatched:
        key, saved, wanted = mismatched[0][:3]
        raise PretrainedError(
            f"{option} {text!r}: its weights do not fit its {hub.CONFIG_FILE}: {key} is {tuple(saved)} in the weights "
            f"but {tuple(wanted)} by the config ({len(mismatched)} tensors differ; saved at another width?): give the "
            f"{hub.CONFIG_FILE} the weights were saved with"
        )
    for what, keys in (("lack {} tensor(s) of the architecture", info.get("missing_keys")),
                       ("hold {} tensor(s) the architecture has no place for", info.get("unexpected_keys"))):
        keys = sorted(keys or [])
        if keys:
            raise PretrainedError(
                f"{option} {text!r}: its weights do not fit its {hub.CONFIG_FILE}: they {what.format(len(keys))} "
                f"({keys[0]}, ...): give the {hub.CONFIG_FILE} the weights were saved with"
            )
    return model
