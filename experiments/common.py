"""Helpers shared by the experiment entry points that build a task and data module outside LightningCLI."""

from __future__ import annotations

import os
from typing import Any


def load_task_and_data(configs: list[str], overrides: list[str] | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """Build the task and ``WebDataModule`` of an ``experiments.run`` config (stacked files, then ``--key=value``).

    Only the ``model``, ``data`` and ``seed_everything`` sections are read; the others are ignored.
    """
    import lightning as L
    import yaml
    from jsonargparse import ArgumentParser

    from mm_lightning.data.datamodule import WebDataModule

    merged: dict[str, Any] = {}
    for path in configs:
        if not os.path.isfile(path):
            raise SystemExit(f"error: --config {path}: no such file")
        with open(path) as f:
            _merge(merged, yaml.safe_load(f) or {})
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningModule, "model", required=True)
    parser.add_class_arguments(WebDataModule, "data")
    cfg = parser.parse_object({"model": merged.get("model"), "data": merged.get("data", {})})
    for item in overrides or []:
        key, _, value = item.lstrip("-").partition("=")
        cfg = parser.parse_args([f"--{key}={value}"], namespace=cfg)
    init = parser.instantiate_classes(cfg)
    return init.model, init.data, merged


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
