"""Submit an experiment to SLURM: ``python -m experiments.submit [resources] -- fit --config X.yaml [...]``.

Everything after ``--`` is an ``experiments.run`` command line. The submitter decides the run
directory now (``--trainer.default_root_dir`` if given, else ``runs/<run name>/<timestamp>``),
writes ``job.sbatch`` into it and submits it with ``sbatch``. The script runs one task per GPU
(``srun python -m experiments.run ... --trainer.num_nodes N --trainer.devices G``), so every rank
and every requeued restart of the job work in that one directory. ``--gpus-per-node 0`` asks
for a CPU job with ``--ntasks-per-node`` tasks (gloo DDP when there are several).

Preemption and time limits: the job asks SLURM for ``USR1`` 90 s before its end
(``--signal=USR1@90``) and may be requeued (``--requeue``). Lightning's ``SLURMEnvironment``
(chosen automatically under ``srun``) saves ``hpc_ckpt_<n>.ckpt`` into the run directory on
``USR1`` and runs ``scontrol requeue``; the restarted job resumes from the newest checkpoint in
that directory and finishes the planned epochs.

Sweeps: ``--sweep sweeps.yaml`` (a YAML list of override sets) or repeated ``--set "FLAGS"``
submit one job array; array task ``i`` runs with the common arguments plus override set ``i`` in
``<sweep dir>/<i>``; ``sweep.yaml`` in the sweep directory maps tasks to overrides.

``--dry-run`` prints the script and writes nothing (no run directory is created). The script
never holds secrets: the job inherits the submitting shell's environment (``sbatch``'s default
``--export=ALL``), so a ``WANDB_API_KEY`` there reaches the job without being written anywhere.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

SUBCOMMANDS = ("fit", "validate", "test", "predict")
SCRIPT_NAME = "job.sbatch"
SWEEP_FILE = "sweep.yaml"
# Trainer settings that must match the SLURM allocation; the submitter sets them.
RESOURCE_KEYS = ("trainer.devices", "trainer.num_nodes", "trainer.accelerator")
SECRET_RE = re.compile(r"WANDB_API_KEY\s*=\s*\S")
TIME_RE = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$|^\d+-\d+$")


class SubmitError(SystemExit):
    """A user mistake found before submitting; exits with status 2 and a message naming the flag or file."""

    def __init__(self, message: str) -> None:
        super().__init__(f"error: {message}")


@dataclass
class Submission:
    """What will be submitted: the sbatch script, where it goes, and the run directory of each task."""

    script: str
    script_path: Path
    run_dirs: list[Path]
    sweep: list[list[str]] | None = None
    job_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_array(self) -> bool:
        return self.sweep is not None


# ------------------------------------------------------------------ argument parsing
def build_parser() -> argparse.ArgumentParser:
    """The submitter's own flags (everything before ``--``)."""
    p = argparse.ArgumentParser(
        prog="python -m experiments.submit",
        description="Write an sbatch script into the run directory and submit it. "
        "Usage: python -m experiments.submit [options] -- fit --config experiments/configs/X.yaml [overrides]",
    )
    r = p.add_argument_group("resources")
    r.add_argument("--nodes", type=int, default=1, help="Number of nodes (--trainer.num_nodes).")
    r.add_argument("--gpus-per-node", type=int, default=1,
                   help="GPUs per node; one task per GPU (--trainer.devices). 0 submits a CPU job.")
    r.add_argument("--ntasks-per-node", type=int, default=None,
                   help="Tasks (ranks) per node; with GPUs it must equal --gpus-per-node. CPU jobs: default 1.")
    r.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per task (data loader workers + 1).")
    r.add_argument("--mem", default=None, help="Memory per node, e.g. 64G (SLURM's --mem).")
    r.add_argument("--time", default=None, help="Time limit, e.g. 04:00:00 or 1-00:00:00.")
    r.add_argument("--partition", default=None, help="SLURM partition.")
    r.add_argument("--account", default=None, help="SLURM account to charge.")
    r.add_argument("--qos", default=None, help="SLURM quality of service.")
    r.add_argument("--job-name", default=None, help="Job name (default: the run name).")
    r.add_argument("--signal-time", type=int, default=90,
                   help="Seconds before the time limit at which SLURM sends USR1 (checkpoint + requeue).")
    r.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="Extra sbatch option written as '#SBATCH OPTION', e.g. --sbatch=--constraint=a100 (repeatable).")
    r.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="Shell line run before srun, e.g. 'module load cuda/12.4' (repeatable).")
    r.add_argument("--python", default=sys.executable, help="Python interpreter on the nodes (default: this one).")
    s = p.add_argument_group("sweeps (job arrays)")
    s.add_argument("--sweep", default=None, metavar="FILE",
                   help="YAML list of override sets ({key: value} mappings or lists of flags); one array task each.")
    s.add_argument("--set", dest="sets", action="append", default=[], metavar="FLAGS",
                   help="One override set as a string of flags, e.g. --set '--model.init_args.lr=1e-3' (repeatable).")
    s.add_argument("--max-parallel", type=int, default=None, help="Run at most this many array tasks at once.")
    p.add_argument("--dry-run", action="store_true", help="Print the script; submit nothing and write nothing.")
    return p


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split at the first ``--`` into the submitter's flags and the ``experiments.run`` command line."""
    argv = list(argv)
    if "--" not in argv:
        raise SubmitError("missing '--' before the run command, e.g. "
                          "python -m experiments.submit --nodes 1 -- fit --config experiments/configs/vit_shapes.yaml")
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]


def _join_values(own: list[str]) -> list[str]:
    """``--set --lr=1`` -> ``--set=--lr=1``: argparse would take a value starting with '--' for a flag."""
    out, i = [], 0
    while i < len(own):
        if own[i] in ("--set", "--sbatch") and i + 1 < len(own):
            out.append(f"{own[i]}={own[i + 1]}")
            i += 2
        else:
            out.append(own[i])
            i += 1
    return out


def _flag_value(args: list[str], key: str) -> list[str]:
    """Every value given to ``--key`` as ``--key V`` or ``--key=V`` in ``args``."""
    values, flag = [], f"--{key}"
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            values.append(args[i + 1])
        elif arg.startswith(flag + "="):
            values.append(arg[len(flag) + 1 :])
    return values


def _has_flag(args: list[str], key: str) -> bool:
    flag = f"--{key}"
    return any(a == flag or a.startswith(flag + "=") for a in args)


def _yaml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float, str)):
        return str(value)
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()


def override_set(entry: Any, where: str) -> list[str]:
    """One sweep entry as CLI flags: ``{key: value}`` -> ``--key=value``; a list or string of flags as is."""
    if isinstance(entry, dict):
        if not entry:
            raise SubmitError(f"{where}: an empty override set")
        return [f"--{str(k).lstrip('-')}={_yaml_value(v)}" for k, v in entry.items()]
    if isinstance(entry, str):
        flags = shlex.split(entry)
    elif isinstance(entry, list) and all(isinstance(x, str) for x in entry):
        flags = list(entry)
    else:
        raise SubmitError(f"{where}: an override set must be a mapping, a list of flags or a string, got {entry!r}")
    if not flags or not flags[0].startswith("--"):
        raise SubmitError(f"{where}: override flags must start with '--', got {entry!r}")
    return flags


def load_sweep(path: str | None, sets: list[str]) -> list[list[str]] | None:
    """The override sets from ``--sweep FILE`` and ``--set`` (in that order), or None for a single job."""
    entries: list[list[str]] = []
    if path:
        if not os.path.isfile(path):
            raise SubmitError(f"--sweep {path}: no such file")
        with open(path) as f:
            data = yaml.safe_load(f)
        if not isinstance(data, list) or not data:
            raise SubmitError(f"--sweep {path}: expected a non-empty YAML list of override sets")
        entries += [override_set(e, f"--sweep {path} item {i}") for i, e in enumerate(data)]
    entries += [override_set(s, f"--set {s!r}") for s in sets]
    return entries or None


def _config_sets_strategy(configs: list[str]) -> bool:
    for path in configs:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        trainer = data.get("trainer") if isinstance(data, dict) else None
        if isinstance(trainer, dict) and trainer.get("strategy") is not None:
            return True
    return False


def _unique_dir(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}-{n}")
        n += 1
    return candidate


# ------------------------------------------------------------------ the script
def _sbatch_lines(opts: argparse.Namespace, job_name: str, ntasks: int, output: str, chdir: Path,
                  array: str | None) -> list[str]:
    lines = [
        f"--job-name={job_name}",
        f"--nodes={opts.nodes}",
        f"--ntasks-per-node={ntasks}",
    ]
    if opts.gpus_per_node > 0:
        lines.append(f"--gpus-per-node={opts.gpus_per_node}")
    for flag, value in (("cpus-per-task", opts.cpus_per_task), ("mem", opts.mem), ("time", opts.time),
                        ("partition", opts.partition), ("account", opts.account), ("qos", opts.qos)):
        if value is not None:
            lines.append(f"--{flag}={value}")
    if array:
        lines.append(f"--array={array}")
    lines += [
        f"--output={output}",
        "--open-mode=append",  # a requeued job appends to the same log
        f"--signal=USR1@{opts.signal_time}",  # to the tasks: Lightning checkpoints and requeues
        "--requeue",
        f"--chdir={chdir}",
    ]
    lines += list(opts.sbatch)
    return [f"#SBATCH {line}" for line in lines]


def render_script(*, opts: argparse.Namespace, job_name: str, ntasks: int, run_cmd: list[str],
                  run_dirs: list[Path], sweep: list[list[str]] | None, chdir: Path, output: str,
                  command: str = "python -m experiments.submit") -> str:
    """The sbatch script: directives, the environment Lightning's SLURMEnvironment reads, and ``srun``."""
    array = None
    if sweep is not None:
        array = f"0-{len(sweep) - 1}" + (f"%{opts.max_parallel}" if opts.max_parallel else "")
    q = shlex.quote
    out = [
        "#!/bin/bash",
        f"# Written by: {command}",
        "# SLURM may requeue this job (preemption, or USR1 before the time limit); it then resumes in the same run dir.",
        *_sbatch_lines(opts, job_name, ntasks, output, chdir, array),
        "",
        "set -euo pipefail",
    ]
    if sweep is None:
        out.append(f"RUN_DIR={q(str(run_dirs[0]))}")
        out.append("OVERRIDES=()")
    else:
        out.append('case "$SLURM_ARRAY_TASK_ID" in')
        for i, (run_dir, flags) in enumerate(zip(run_dirs, sweep)):
            out.append(f"  {i}) RUN_DIR={q(str(run_dir))}; OVERRIDES=({' '.join(q(f) for f in flags)}) ;;")
        out.append('  *) echo "unknown array task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;')
        out.append("esac")
    out += [
        "",
        "# srun sets what Lightning's SLURMEnvironment reads: SLURM_NTASKS, SLURM_NTASKS_PER_NODE, SLURM_NNODES,",
        "# SLURM_PROCID (global rank), SLURM_LOCALID (local rank), SLURM_NODEID (node rank), SLURM_JOB_ID.",
        "# The rendezvous address is the first node of the allocation; the port is derived from the job id.",
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
        'export MM_RUN_DIR="$RUN_DIR"',
        "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}",
        "# srun does not inherit sbatch's --cpus-per-task on SLURM 22.05+: data loader workers need those CPUs",
        'if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"; fi',
        "export PYTHONUNBUFFERED=1",
        "# W&B stays offline unless the submitting shell set WANDB_MODE=online (then `wandb login` or an",
        "# exported WANDB_API_KEY authenticates; no key is ever written here). Sync later: wandb sync <run dir>/wandb/offline-run-*",
        "export WANDB_MODE=${WANDB_MODE:-offline}",
        *opts.setup,
        "",
        'echo "job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}: ${RUN_DIR}"',
        "srun --kill-on-bad-exit=1 \\",
        f"  {' '.join(q(a) for a in run_cmd)} \\",
        '  ${OVERRIDES[@]+"${OVERRIDES[@]}"} --trainer.default_root_dir="$RUN_DIR"',
        "",
    ]
    return "\n".join(out)


def plan(argv: Sequence[str], now: str | None = None) -> Submission:
    """Parse a submit command line and build the :class:`Submission` (nothing is written)."""
    own, run_args = split_argv(argv)
    if any(SECRET_RE.search(arg) for arg in argv):
        raise SubmitError("a W&B API key on the command line would be written into the job script: run "
                          "`wandb login` (or export WANDB_API_KEY in your shell; the job inherits it) instead")
    opts = build_parser().parse_args(_join_values(own))
    if not run_args or run_args[0] not in SUBCOMMANDS:
        raise SubmitError(f"the run command after '--' must start with one of {', '.join(SUBCOMMANDS)}, "
                          f"got {' '.join(run_args) or 'nothing'!r}")
    if opts.nodes < 1:
        raise SubmitError(f"--nodes must be at least 1, got {opts.nodes}")
    if opts.gpus_per_node < 0:
        raise SubmitError(f"--gpus-per-node must be 0 (CPU job) or more, got {opts.gpus_per_node}")
    if opts.gpus_per_node > 0:
        if opts.ntasks_per_node not in (None, opts.gpus_per_node):
            raise SubmitError(f"--ntasks-per-node {opts.ntasks_per_node} must equal --gpus-per-node "
                              f"{opts.gpus_per_node}: one task per GPU")
        ntasks = opts.gpus_per_node
    else:
        ntasks = 1 if opts.ntasks_per_node is None else opts.ntasks_per_node
        if ntasks < 1:
            raise SubmitError(f"--ntasks-per-node must be at least 1, got {ntasks}")
    if opts.time is not None and not TIME_RE.match(opts.time):
        raise SubmitError(f"--time {opts.time!r}: expected MM, HH:MM:SS or D-HH[:MM[:SS]]")
    if opts.signal_time < 1:
        raise SubmitError(f"--signal-time must be at least 1 second, got {opts.signal_time}")
    if opts.max_parallel is not None and opts.max_parallel < 1:
        raise SubmitError(f"--max-parallel must be at least 1, got {opts.max_parallel}")

    for key in RESOURCE_KEYS:
        if _has_flag(run_args, key):
            raise SubmitError(f"--{key} is set by the submitter from --nodes/--gpus-per-node/--ntasks-per-node; "
                              "remove it from the run command")
    configs = _flag_value(run_args, "config")
    for path in configs:
        if not os.path.isfile(path):
            raise SubmitError(f"--config {path}: no such file")
    sweep = load_sweep(opts.sweep, opts.sets)
    if sweep is not None:
        for flags in sweep:
            for key in (*RESOURCE_KEYS, "trainer.default_root_dir", "config"):
                if _has_flag(flags, key):
                    raise SubmitError(f"a sweep override set may not contain --{key}: {' '.join(flags)}")

    names = _flag_value(run_args, "run_name")
    run_name = names[-1] if names else (Path(configs[0]).stem if configs else "run")
    job_name = opts.job_name or run_name
    if job_name in ("bash", "interactive"):  # Lightning ignores SLURM for jobs named so
        raise SubmitError(f"--job-name {job_name!r} hides the job from Lightning's SLURM detection; choose another")

    roots = _flag_value(run_args, "trainer.default_root_dir")
    run_args = [a for i, a in enumerate(run_args) if not (
        a.startswith("--trainer.default_root_dir") or (i > 0 and run_args[i - 1] == "--trainer.default_root_dir"))]
    if roots:
        base = Path(roots[-1]).expanduser().resolve()
        if sweep is None and (base / "config.yaml").exists():
            raise SubmitError(f"--trainer.default_root_dir {roots[-1]} already holds a run; choose another directory")
    else:
        base = _unique_dir(Path("runs", run_name, now or time.strftime("%Y%m%d-%H%M%S")).resolve())
    run_dirs = [base] if sweep is None else [base / str(i) for i in range(len(sweep))]

    world = opts.nodes * ntasks
    resources = [f"--trainer.num_nodes={opts.nodes}", f"--trainer.devices={ntasks}",
                 f"--trainer.accelerator={'gpu' if opts.gpus_per_node > 0 else 'cpu'}"]
    if world > 1 and not _has_flag(run_args, "trainer.strategy") and not _config_sets_strategy(configs):
        resources.append("--trainer.strategy=ddp")
    run_cmd = [opts.python, "-m", "experiments.run", *run_args, *resources]
    output = str(base / ("%a" if sweep is not None else "") / ("slurm-%A_%a.out" if sweep is not None else "slurm-%j.out"))
    script = render_script(opts=opts, job_name=job_name, ntasks=ntasks, run_cmd=run_cmd, run_dirs=run_dirs,
                           sweep=sweep, chdir=Path.cwd(), output=output,
                           command=shlex.join(["python", "-m", "experiments.submit", *argv]).replace("\n", " "))
    return Submission(script=script, script_path=base / SCRIPT_NAME, run_dirs=run_dirs, sweep=sweep,
                      extra={"dry_run": opts.dry_run, "run_name": run_name})


def write(sub: Submission) -> None:
    """Create the run directories and write the script (and ``sweep.yaml`` for an array)."""
    for run_dir in sub.run_dirs:
        run_dir.mkdir(parents=True, exist_ok=True)  # also where SLURM writes each task's log
    sub.script_path.write_text(sub.script)
    sub.script_path.chmod(0o755)
    if sub.sweep is not None:
        tasks = [{"task": i, "run_dir": str(d), "overrides": flags} for i, (d, flags) in enumerate(zip(sub.run_dirs, sub.sweep))]
        (sub.script_path.parent / SWEEP_FILE).write_text(yaml.safe_dump(tasks, sort_keys=False))


def sbatch(script_path: Path) -> str:
    """Submit with ``sbatch --parsable``; returns the job id."""
    try:
        proc = subprocess.run(["sbatch", "--parsable", str(script_path)], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise SubmitError("sbatch not found: run this on a SLURM login node (or use --dry-run)") from None
    if proc.returncode != 0:
        raise SubmitError(f"sbatch {script_path} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]


def main(argv: Sequence[str] | None = None) -> Submission:
    """Plan, write and submit; prints the job id and the run directory (or, with ``--dry-run``, the script)."""
    sub = plan(sys.argv[1:] if argv is None else argv)
    if sub.extra["dry_run"]:
        print(sub.script, end="")
        return sub
    write(sub)
    sub.job_id = sbatch(sub.script_path)
    print(f"Submitted job {sub.job_id}")
    print(f"Script: {sub.script_path}")
    if sub.sweep is None:
        print(f"Run directory: {sub.run_dirs[0]}")
    else:
        print(f"Sweep directory: {sub.script_path.parent}")
        for i, (run_dir, flags) in enumerate(zip(sub.run_dirs, sub.sweep)):
            print(f"  {sub.job_id}_{i}: {run_dir}  {' '.join(flags)}")
    sys.stdout.flush()
    return sub


if __name__ == "__main__":
    main()
