"""``experiments.submit`` without a cluster: the sbatch script, dry runs, job arrays, errors, requeue resume."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from jsonargparse import Namespace

from experiments import submit
from experiments.run import MMLightningCLI, UsageError
from tests.conftest import REPO

SHAPES = "experiments/configs/vit_shapes.yaml"
TINY = "tests/configs/tiny_vit.yaml"
FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def _fake_bin(tmp_path: Path, **scripts: str) -> Path:
    """A directory of executable stand-ins (``sbatch``, ``srun``, ``scontrol``) to put first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return bin_dir


FAKE_SRUN = f"""#!{sys.executable}
import json, os, sys
keys = ("MASTER_ADDR", "MASTER_PORT", "MM_RUN_DIR", "WANDB_MODE", "OMP_NUM_THREADS", "SRUN_CPUS_PER_TASK",
        "PYTHONUNBUFFERED")
with open(os.environ["SRUN_RECORD"], "w") as f:
    json.dump({{"argv": sys.argv[1:], "env": {{k: os.environ.get(k) for k in keys}}}}, f)
"""


def _run_script(tmp_path: Path, script: str, **env: str) -> dict:
    """Execute a generated script with bash, ``srun`` and ``scontrol`` faked; returns what srun received."""
    bin_dir = _fake_bin(tmp_path, srun=FAKE_SRUN, scontrol="#!/bin/sh\necho node-a\necho node-b\n")
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    record = tmp_path / "srun.json"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_")) and k != "WANDB_MODE"}
    full_env = {**clean, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SRUN_RECORD": str(record),
                "SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "node-[a-b]", **env}
    proc = subprocess.run(["bash", str(path)], env=full_env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    recorded = json.loads(record.read_text())
    argv = recorded["argv"]
    first = next(i for i, a in enumerate(argv) if not a.startswith("-"))  # srun's own options come first
    return {**recorded, "srun_options": argv[:first], "argv": argv[first:]}


def _directives(script: str) -> list[str]:
    return [line[len("#SBATCH "):] for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_gpu_job_script_has_directives_one_task_per_gpu_and_requeue(in_repo, tmp_path):
    sub = submit.plan(["--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--time", "04:00:00",
                       "--account", "proj", "--qos", "high", "--cpus-per-task", "8", "--mem", "480G",
                       "--sbatch", "--constraint=h100", "--setup", "echo loading modules",
                       "--", "fit", "--config", SHAPES, "--trainer.max_epochs=3"], now="20250101-000000")
    run_dir = REPO / "runs" / "vit_shapes" / "20250101-000000"
    assert sub.run_dirs == [run_dir] and sub.script_path == run_dir / "job.sbatch"
    d = _directives(sub.script)
    for line in ("--job-name=vit_shapes", "--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8",
                 "--cpus-per-task=8", "--mem=480G", "--time=04:00:00", "--partition=gpu", "--account=proj",
                 "--qos=high", "--signal=USR1@90", "--requeue", "--open-mode=append", "--constraint=h100",
                 f"--output={run_dir}/slurm-%j.out", f"--chdir={REPO}"):
        assert line in d, (line, d)
    assert not (run_dir.exists()), "plan() must not write anything"
    srun = _run_script(tmp_path, sub.script, SLURM_CPUS_PER_TASK="8")
    argv = srun["argv"]
    assert srun["srun_options"] == ["--kill-on-bad-exit=1"]
    assert argv[:3] == [sys.executable, "-m", "experiments.run"]
    assert argv[3:7] == ["fit", "--config", SHAPES, "--trainer.max_epochs=3"]
    for flag in ("--trainer.num_nodes=2", "--trainer.devices=8", "--trainer.accelerator=gpu",
                 "--trainer.strategy=ddp", f"--trainer.default_root_dir={run_dir}"):
        assert flag in argv, (flag, argv)
    assert srun["env"] == {"MASTER_ADDR": "node-a", "MASTER_PORT": str(20000 + 1234 % 20000), "MM_RUN_DIR": str(run_dir),
                           "WANDB_MODE": "offline", "OMP_NUM_THREADS": "8", "SRUN_CPUS_PER_TASK": "8",
                           "PYTHONUNBUFFERED": "1"}
    assert sub.script.index("echo loading modules") < sub.script.index("srun --kill-on-bad-exit")


def test_cpu_job_tasks_per_node_choose_devices_and_ddp(in_repo, tmp_path):
    two = submit.plan(["--gpus-per-node", "0", "--ntasks-per-node", "2", "--", "fit", "--config", TINY])
    d = _directives(two.script)
    assert "--ntasks-per-node=2" in d and not any(x.startswith("--gpus") for x in d)
    argv = _run_script(tmp_path, two.script)["argv"]
    assert {"--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.num_nodes=1",
            "--trainer.strategy=ddp"} <= set(argv)
    one = submit.plan(["--gpus-per-node", "0", "--", "fit", "--config", TINY])
    argv = _run_script(tmp_path, one.script)["argv"]
    assert "--trainer.devices=1" in argv and not any(a.startswith("--trainer.strategy") for a in argv)


def test_user_strategy_from_flag_or_config_is_kept(in_repo, tmp_path):
    flag = submit.plan(["--gpus-per-node", "4", "--", "fit", "--config", SHAPES, "--trainer.strategy", "fsdp"])
    assert "--trainer.strategy=ddp" not in flag.script and "--trainer.strategy fsdp" in flag.script
    preset = tmp_path / "fsdp.yaml"
    preset.write_text("trainer:\n  strategy: fsdp\n")
    stacked = submit.plan(["--gpus-per-node", "4", "--", "fit", "--config", SHAPES, "--config", str(preset)])
    assert "--trainer.strategy" not in stacked.script


def test_generated_run_command_parses(in_repo, tmp_path):
    """The flags the submitter adds are valid for experiments.run (jsonargparse rejects unknown keys)."""
    sub = submit.plan(["--gpus-per-node", "0", "--ntasks-per-node", "2", "--",
                       "fit", "--config", TINY, "--trainer.max_epochs=1"])
    argv = _run_script(tmp_path, sub.script)["argv"]
    proc = subprocess.run([*argv, "--print_config"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trainer = yaml.safe_load(proc.stdout)["trainer"]
    assert (str(trainer["devices"]), trainer["num_nodes"], trainer["accelerator"], trainer["strategy"]) == ("2", 1, "cpu", "ddp")
    assert trainer["default_root_dir"] == str(sub.run_dirs[0])


def test_dry_run_prints_the_script_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    sub = submit.main(["--gpus-per-node", "0", "--dry-run", "--", "fit", "--config", str(REPO / TINY)])
    out = capsys.readouterr().out
    assert out == sub.script and out.startswith("#!/bin/bash\n")
    assert not (tmp_path / "runs").exists()


def test_submit_writes_script_into_run_dir_and_prints_job_id(tmp_path, monkeypatch, capsys):
    calls = tmp_path / "sbatch.args"
    bin_dir = _fake_bin(tmp_path, sbatch=f"#!/bin/sh\necho \"$@\" > {calls}\necho '4242;cluster'\n")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.chdir(tmp_path)
    sub = submit.main(["--gpus-per-node", "0", "--", "fit", "--config", str(REPO / TINY), "--run_name", "exp1"])
    out = capsys.readouterr().out
    run_dir = sub.run_dirs[0]
    assert run_dir.parent == tmp_path / "runs" / "exp1" and sub.job_id == "4242"
    assert "Submitted job 4242" in out and f"Run directory: {run_dir}" in out
    script = run_dir / "job.sbatch"
    assert script.read_text() == sub.script and os.access(script, os.X_OK)
    assert calls.read_text().split() == ["--parsable", str(script)]
    assert "--job-name=exp1" in _directives(sub.script)
    # the API key in the submitting environment is never written; the job inherits it through sbatch's --export=ALL
    assert FAKE_KEY not in sub.script and not re.search(r"WANDB_API_KEY\s*=", sub.script)
    # a second submission in the same second gets its own directory
    again = submit.main(["--gpus-per-node", "0", "--", "fit", "--config", str(REPO / TINY), "--run_name", "exp1"])
    assert again.run_dirs[0] != run_dir


def test_override_sets_submit_a_job_array_one_run_dir_each(tmp_path, monkeypatch, capsys):
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump([
        {"model.init_args.lr": 1e-3},
        {"--model.init_args.lr": 3e-3, "data.batch_size": 64, "model.init_args.betas": [0.9, 0.95]},
        ["--trainer.max_epochs=1"],
        "--seed_everything 7 --run_name 'a b'",
    ]))
    bin_dir = _fake_bin(tmp_path, sbatch="#!/bin/sh\necho 77\n")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    sub = submit.main(["--gpus-per-node", "0", "--sweep", str(sweep_file), "--set", "--trainer.precision=bf16-mixed",
                       "--max-parallel", "2", "--", "fit", "--config", str(REPO / TINY)])
    base = sub.script_path.parent
    assert sub.run_dirs == [base / str(i) for i in range(5)] and all(d.is_dir() for d in sub.run_dirs)
    d = _directives(sub.script)
    assert "--array=0-4%2" in d and f"--output={base}/%a/slurm-%A_%a.out" in d
    out = capsys.readouterr().out
    assert f"77_4: {base / '4'}  --trainer.precision=bf16-mixed" in out
    tasks = yaml.safe_load((base / "sweep.yaml").read_text())
    assert [t["run_dir"] for t in tasks] == [str(r) for r in sub.run_dirs]
    assert tasks[1]["overrides"] == ["--model.init_args.lr=0.003", "--data.batch_size=64",
                                     "--model.init_args.betas=[0.9, 0.95]"]
    for task, expected in ((1, tasks[1]["overrides"]), (3, ["--seed_everything", "7", "--run_name", "a b"])):
        argv = _run_script(tmp_path, sub.script, SLURM_ARRAY_TASK_ID=str(task))["argv"]
        assert argv[-len(expected) - 1:] == [*expected, f"--trainer.default_root_dir={base / str(task)}"]


@pytest.mark.parametrize("argv, message", [
    (["--nodes", "1", "fit", "--config", TINY], "missing '--'"),
    (["--", "--config", TINY], "must start with one of fit"),
    (["--", "fit", "--config", "nope.yaml"], "--config nope.yaml: no such file"),
    (["--", "fit", "--config", TINY, "--trainer.devices=2"], "--trainer.devices is set by the submitter"),
    (["--", "fit", "--config", TINY, "--trainer.num_nodes", "2"], "--trainer.num_nodes is set by the submitter"),
    (["--gpus-per-node", "4", "--ntasks-per-node", "2", "--", "fit"], "--ntasks-per-node 2 must equal --gpus-per-node 4"),
    (["--gpus-per-node", "-1", "--", "fit"], "--gpus-per-node must be 0"),
    (["--nodes", "0", "--", "fit"], "--nodes must be at least 1"),
    (["--time", "2h", "--", "fit"], "--time '2h'"),
    (["--job-name", "bash", "--", "fit"], "--job-name 'bash'"),
    (["--set", "--config=x.yaml", "--", "fit"], "may not contain --config"),
    (["--set", "lr=1", "--", "fit"], "must start with '--'"),
    (["--sweep", "missing.yaml", "--", "fit"], "--sweep missing.yaml: no such file"),
    (["--setup", f"export WANDB_API_KEY={FAKE_KEY}", "--", "fit"], "W&B API key on the command line"),
])
def test_mistakes_fail_naming_the_flag(in_repo, argv, message):
    with pytest.raises(submit.SubmitError) as err:
        submit.plan(argv)
    assert message in str(err.value.code)


def test_existing_run_directory_is_refused(in_repo, tmp_path):
    (tmp_path / "config.yaml").write_text("trainer: {}\n")
    with pytest.raises(submit.SubmitError, match="already holds a run"):
        submit.plan(["--", "fit", "--config", TINY, f"--trainer.default_root_dir={tmp_path}"])
    empty = tmp_path / "new"
    assert submit.plan(["--", "fit", "--config", TINY, "--trainer.default_root_dir", str(empty)]).run_dirs == [empty]


def test_requeued_job_resumes_from_the_newest_checkpoint_in_its_run_dir(tmp_path, monkeypatch):
    """experiments.run under SLURM_RESTART_COUNT>0: hpc_ckpt (saved on USR1) or last.ckpt, whichever is newer."""
    root = tmp_path / "run"
    (root / "checkpoints").mkdir(parents=True)
    (root / "config.yaml").write_text("x: 1\n")
    check = MMLightningCLI._check_resume
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    cfg = Namespace(ckpt_path=None)
    check(None, cfg, str(root))  # requeued before any checkpoint: start over in the same directory
    assert cfg.ckpt_path is None
    last, hpc = root / "checkpoints" / "last.ckpt", root / "hpc_ckpt_1.ckpt"
    for path, age in ((last, 20), (hpc, 10)):
        path.write_bytes(b"x")
        os.utime(path, (time.time() - age, time.time() - age))
    check(None, cfg, str(root))
    assert cfg.ckpt_path == str(hpc)
    os.utime(last, None)  # an epoch ended after the USR1 checkpoint
    cfg = Namespace(ckpt_path=None)
    check(None, cfg, str(root))
    assert cfg.ckpt_path == str(last)
    monkeypatch.delenv("SLURM_RESTART_COUNT")  # a fresh job may not reuse a finished run directory
    hpc.unlink()
    with pytest.raises(UsageError, match="already holds a run"):
        check(None, Namespace(ckpt_path=None), str(root))
