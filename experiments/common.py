"""What the entry points other than ``experiments.run`` share: building a run's task and data from its configs.

They parse configs exactly as ``experiments.run`` does, through :class:`~experiments.run.MMLightningCLI`
with ``run=False`` (stacked ``--config`` files, ``key=value`` overrides, the linked tokenizer), so a config
means the same to every entry point.
"""

from __future__ import annotations

import os
from typing import Any


def build_cli(configs: list[str], overrides: list[str] | None = None, prepare_data: bool = True) -> Any:
    """``MMLightningCLI(run=False)`` on stacked ``configs`` and ``key=value`` ``overrides``: the seeded, built
    ``cli.model`` and ``cli.datamodule`` and the resolved ``cli.config``; no trainer (``cli.trainer`` is None).

    No run directory is created, and the process environment is left as it was (the CLI records the
    run directory in ``MM_RUN_DIR`` for launched ranks).
    """
    from experiments.run import RUN_DIR_ENV, MMLightningCLI, UsageError

    class BuildOnly(MMLightningCLI):
        def add_arguments_to_parser(self, parser: Any) -> None:
            super().add_arguments_to_parser(parser)
            # a run's saved config.yaml holds its sub-command's settings (ckpt_path, weights_only, ...): accept
            # them, unused, as the sub-command parsers of experiments.run do
            seen: set[str] = set()
            for name, skip in self.subcommands().items():
                added = parser.add_method_arguments(self.trainer_class, name, skip=set(skip) | seen, as_group=False)
                seen |= set(added)

        def instantiate_trainer(self, **kwargs: Any) -> None:  # the caller trains (or not) by itself
            return None

    args: list[str] = []
    for path in configs:
        if not os.path.isfile(path):
            raise UsageError(f"--config {path}: no such file")
        args += ["--config", path]
    for item in overrides or []:
        key, sep, value = item.lstrip("-").partition("=")
        if not sep:
            raise UsageError(f"--set {item}: expected KEY=VALUE")
        args.append(f"--{key}={value}")
    args += ["--logger=none", f"--prepare_data={str(prepare_data).lower()}"]
    previous = os.environ.get(RUN_DIR_ENV)
    try:
        return BuildOnly(args=args, run=False)
    finally:
        if previous is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = previous


def load_task_and_data(configs: list[str], overrides: list[str] | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """The task, the ``WebDataModule`` and the resolved config (a plain dict) of stacked ``configs``."""
    cli = build_cli(configs, overrides)
    return cli.model, cli.datamodule, cli.config.clone().as_dict()
