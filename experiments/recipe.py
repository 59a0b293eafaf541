"""Run a multi-stage recipe: ``python -m experiments.recipe experiments/recipes/X.yaml --out DIR``.

A recipe is a YAML list of stages, each an ``experiments.run fit`` run of its own configs::

    stages:
      - name: lm                                   # run directory DIR/lm
        configs: [experiments/configs/a.yaml, experiments/configs/b.yaml]
        args: [--trainer.max_epochs=2]             # extra flags (optional)
      - name: align
        configs: [...]
        inputs:                                    # flag -> earlier stage: its best checkpoint
          model.init_args.lm_init: lm
      - name: lm_hf                                # an export stage: DIR/lm_hf is written by
        export: {from: lm, to: causal-lm}          #   python -m experiments.export --ckpt <lm's best> --to causal-lm
    args: [--logger=csv]                           # flags for every stage (optional)

An input that names an export stage is that stage's directory (e.g. ``model.init_args.lm: lm_hf``: a
later stage loads the exported model as it would load one from the hub).

Stages run in order, each in a fresh process, in ``DIR/<name>``. A stage is complete when it
exited 0 (the recipe then writes ``DIR/<name>/stage.json`` with its command and summary); a
complete stage is skipped on the next call, an interrupted one resumes from its ``last.ckpt``
(an interrupted stage without a checkpoint is moved aside to ``DIR/<name>.failed-<time>`` and
started over; nothing is deleted). A stage whose command changed since it completed is an
error (remove its directory to rerun it). ``DIR/<recipe>.summary.json`` (``<recipe>`` the recipe file's
name without ``.yaml``, so two recipes sharing a ``DIR`` keep both) holds the final stage's
metrics (flat, as ``experiments.run`` writes them) and each stage's metrics under its name,
with ``stage_wall_time_s`` (the stage's process, start-up and test included), ``stage_cpu_time_s``
(CPU seconds of the stage's processes, data workers included: on a shared machine a measure of the
work that does not grow with the load) and ``recipe_wall_time_s`` (the stages run by this call).

``--override NAME:FLAG`` adds a flag to stage NAME (``*``: every stage; repeatable), e.g.
``--override instruct:--model.init_args.lora_r=8`` or ``--override '*:--logger=csv'``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

STAGE_FILE = "stage.json"
STAGE_KEYS = {"name", "configs", "args", "inputs"}
EXPORT_KEYS = {"name", "export"}


class RecipeError(Exception):
    """A malformed recipe or a failed stage: ``main`` prints it in one line and exits with status 2."""


def load_recipe(path: str) -> dict[str, Any]:
    """Read and check a recipe file; errors name the file, the stage and the key."""
    if not os.path.isfile(path):
        raise RecipeError(f"recipe {path}: no such file")
    with open(path) as f:
        try:
            recipe = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise RecipeError(f"recipe {path}: not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("stages"), list) or not recipe["stages"]:
        raise RecipeError(f"recipe {path}: needs a non-empty 'stages' list")
    unknown = set(recipe) - {"stages", "args"}
    if unknown:
        raise RecipeError(f"recipe {path}: unknown key(s) {', '.join(sorted(unknown))} (known: stages, args)")
    seen: list[str] = []
    exports: set[str] = set()
    for i, stage in enumerate(recipe["stages"]):
        where = f"recipe {path}, stage {i + 1}"
        if not isinstance(stage, dict) or not isinstance(stage.get("name"), str) or not stage["name"]:
            raise RecipeError(f"{where}: needs a 'name'")
        where = f"recipe {path}, stage {stage['name']!r}"
        known = EXPORT_KEYS if "export" in stage else STAGE_KEYS
        bad = set(stage) - known
        if bad:
            raise RecipeError(f"{where}: unknown key(s) {', '.join(sorted(bad))} (known: {', '.join(sorted(known))})")
        if stage["name"] in seen or "/" in stage["name"]:
            raise RecipeError(f"{where}: stage names must be unique and contain no '/'")
        if "export" in stage:
            _check_export(stage, where, seen, exports)
            exports.add(stage["name"])
            seen.append(stage["name"])
            continue
        configs = stage.get("configs")
        if not isinstance(configs, list) or not configs:
            raise RecipeError(f"{where}: needs a non-empty 'configs' list")
        for config in configs:
            if not os.path.isfile(config):
                raise RecipeError(f"{where}: config {config}: no such file")
        for flag, source in (stage.get("inputs") or {}).items():
            if source not in seen:
                raise RecipeError(f"{where}: input {flag} comes from {source!r}, which is not an earlier stage")
        if not isinstance(stage.get("args", []), list):
            raise RecipeError(f"{where}: 'args' must be a list of flags")
        seen.append(stage["name"])
    return recipe


def _check_export(stage: dict[str, Any], where: str, seen: list[str], exports: set[str]) -> None:
    from experiments.export import FORMATS

    spec = stage["export"]
    if not isinstance(spec, dict) or set(spec) != {"from", "to"}:
        raise RecipeError(f"{where}: export needs exactly 'from' (an earlier stage) and 'to' (a format)")
    if spec["from"] not in seen or spec["from"] in exports:
        raise RecipeError(f"{where}: export from {spec['from']!r}, which is not an earlier training stage")
    if spec["to"] not in FORMATS:
        raise RecipeError(f"{where}: export to {spec['to']!r}: unknown format; known: {', '.join(FORMATS)}")


def best_checkpoint(run_dir: Path) -> Path:
    """``best.ckpt`` of a finished stage (``last.ckpt`` when it had nothing to monitor)."""
    for name in ("best.ckpt", "last.ckpt"):
        path = run_dir / "checkpoints" / name
        if path.is_file():
            return path
    raise RecipeError(f"stage {run_dir.name} finished without a checkpoint in {run_dir / 'checkpoints'}")


def stage_command(stage: dict[str, Any], out: Path, common: list[str], overrides: list[str],
                  exports: frozenset[str] = frozenset()) -> list[str]:
    """The ``experiments.run fit`` command line of ``stage`` (without the resume flag), or an export stage's
    ``experiments.export`` command line."""
    if "export" in stage:
        spec = stage["export"]
        return [sys.executable, "-m", "experiments.export", f"--ckpt={best_checkpoint(out / spec['from'])}",
                f"--to={spec['to']}", f"--out={out / stage['name']}"]
    cmd = [sys.executable, "-m", "experiments.run", "fit"]
    for config in stage["configs"]:
        cmd += ["--config", config]
    cmd += [f"--trainer.default_root_dir={out / stage['name']}", f"--run_name={stage['name']}"]
    cmd += [str(a) for a in common] + [str(a) for a in stage.get("args") or []]
    for flag, source in (stage.get("inputs") or {}).items():
        path = out / source if source in exports else best_checkpoint(out / source)
        cmd.append(f"--{flag.lstrip('-')}={path}")
    return cmd + overrides


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _children_cpu() -> float:
    """CPU seconds (user + system) of the finished child processes and their descendants (data workers)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_stage(stage: dict[str, Any], cmd: list[str], out: Path) -> dict[str, Any]:
    """Run (or resume, or skip) one stage; returns its record (command, summary, wall time)."""
    name = stage["name"]
    run_dir = out / name
    marker = run_dir / STAGE_FILE
    if marker.is_file():
        record = _read_json(marker)
        if record.get("command") != cmd[1:]:
            raise RecipeError(
                f"stage {name} is complete in {run_dir} but with another command; remove that directory to rerun it"
                f" (then: {shlex.join(record.get('command') or [])})"
            )
        print(f"[recipe] stage {name}: complete in {run_dir}, skipped", flush=True)
        return record
    resume: list[str] = []
    if run_dir.exists():
        if (run_dir / "checkpoints" / "last.ckpt").is_file():
            resume = ["--ckpt_path", "last"]
            print(f"[recipe] stage {name}: resuming the interrupted run in {run_dir}", flush=True)
        else:
            aside = run_dir.with_name(f"{name}.failed-{time.strftime('%Y%m%d-%H%M%S')}")
            run_dir.rename(aside)
            print(f"[recipe] stage {name}: an earlier attempt left no checkpoint; moved it to {aside}", flush=True)
    print(f"[recipe] stage {name}: {shlex.join(cmd[1:] + resume)}", flush=True)
    start, cpu = time.monotonic(), _children_cpu()
    result = subprocess.run(cmd + resume)
    wall, cpu = round(time.monotonic() - start, 1), round(_children_cpu() - cpu, 1)
    if result.returncode != 0:
        raise RecipeError(f"stage {name} failed (exit status {result.returncode}) after {wall} s; rerun the recipe to resume it")
    summary = _read_json(run_dir / "summary.json")
    record = {"command": cmd[1:], "summary": summary, "stage_wall_time_s": wall, "stage_cpu_time_s": cpu}
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, marker)
    return record


def summary_path(out: Path, recipe: str) -> Path:
    """``DIR/<recipe>.summary.json``: one per recipe, so recipes that share ``DIR`` (and stages) keep theirs."""
    return out / f"{Path(recipe).name.removesuffix('.yaml').removesuffix('.yml')}.summary.json"


def write_summary(path: Path, stages: list[dict[str, Any]], records: dict[str, dict[str, Any]], wall: float) -> dict[str, Any]:
    """The recipe's summary at ``path``: the final stage's metrics flat, each stage's under its name."""
    final = stages[-1]["name"]
    summary: dict[str, Any] = dict(records[final].get("summary") or {})
    for stage in stages:
        record = records[stage["name"]]
        summary[stage["name"]] = {**(record.get("summary") or {}), "stage_wall_time_s": record.get("stage_wall_time_s"),
                                  "stage_cpu_time_s": record.get("stage_cpu_time_s")}
    summary["recipe_wall_time_s"] = round(wall, 1)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, path)
    return summary


def print_report(summary: dict[str, Any], stages: list[dict[str, Any]]) -> None:
    print("\n[recipe] stages:")
    for stage in stages:
        s = summary.get(stage["name"]) or {}
        print(f"  {stage['name']:<10} steps {int(s.get('steps', 0)):>6}  wall {s.get('stage_wall_time_s')} s"
              f"  cpu {s.get('stage_cpu_time_s')} s")
    rows = sorted(k for k in summary if isinstance(summary[k], float) and k.startswith("test/"))
    if rows:
        print("[recipe] final stage, test:")
        for key in rows:
            print(f"  {key:<40} {summary[key]:.4f}")
    print(f"[recipe] wall time of this call: {summary['recipe_wall_time_s']} s")


def parse_overrides(items: list[str], names: list[str], exports: frozenset[str] = frozenset()) -> dict[str, list[str]]:
    """Flags per stage from ``NAME:--flag`` items (``*``: every training stage; export stages take none)."""
    out: dict[str, list[str]] = {n: [] for n in names}
    training = [n for n in names if n not in exports]
    for item in items:
        name, sep, flag = item.partition(":")
        if not sep or (name not in out and name != "*") or not flag.startswith("--"):
            raise RecipeError(f"--override {item!r}: expected NAME:--flag=value with NAME one of {', '.join(names)} or *")
        if name in exports:
            raise RecipeError(f"--override {item!r}: {name} is an export stage, which takes no flags")
        for target in training if name == "*" else [name]:
            out[target].append(flag)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    try:
        return _main(argv)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _main(argv: list[str] | None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m experiments.recipe", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="the recipe YAML (experiments/recipes/*.yaml)")
    parser.add_argument("--out", required=True, help="directory of the recipe's runs (one sub-directory per stage)")
    parser.add_argument("--override", action="append", default=[], metavar="NAME:FLAG",
                        help="an extra flag for stage NAME (* for every stage), e.g. instruct:--model.init_args.lora_r=8 (repeatable)")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe)
    stages = recipe["stages"]
    exports = frozenset(s["name"] for s in stages if "export" in s)
    overrides = parse_overrides(args.override, [s["name"] for s in stages], exports)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    records: dict[str, dict[str, Any]] = {}
    for stage in stages:
        cmd = stage_command(stage, out, recipe.get("args") or [], overrides[stage["name"]], exports)
        records[stage["name"]] = run_stage(stage, cmd, out)
    path = summary_path(out, args.recipe)
    summary = write_summary(path, stages, records, time.monotonic() - start)
    print_report(summary, stages)
    print(f"Summary: {path}")
    return summary


if __name__ == "__main__":
    main()
