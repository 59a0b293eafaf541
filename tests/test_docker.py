"""The Docker image's structure (no Docker engine runs here): base, install, user, entrypoint, volumes, secrets."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

DOCKERFILE = REPO / "docker" / "Dockerfile"
COMPOSE = REPO / "docker" / "compose.yaml"
DOCKERIGNORE = REPO / ".dockerignore"
WORKDIR = "/workspace/mm-lightning"
SECRET_NAME = re.compile(r"(API_?KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.I)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        word, _, rest = current.partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def pip_installs(command: str) -> list[str]:
    """Every ``pip install ...`` in a shell command line, normalised to single spaces."""
    found = []
    for part in re.split(r"&&|;|\|\|", command):
        words = shlex.split(part)
        for i in range(len(words) - 1):
            if words[i].endswith("pip") and words[i + 1] == "install":
                found.append(" ".join(["pip", *words[i + 1 :]]))
                break
    return found


@pytest.fixture(scope="module")
def steps() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def _strip_run_flags(args: str) -> str:
    return re.sub(r"^(--\w+(=\S+)?\s+)+", "", args)  # RUN --mount=... --network=... <command>


def test_base_image_is_a_build_argument_defaulting_to_cuda_runtime_matching_the_pinned_torch_build(steps):
    bases = [args for word, args in steps if word == "FROM"]
    assert bases == ["${BASE_IMAGE}"], f"FROM {bases}: the base must be the build argument BASE_IMAGE"
    first_from = next(i for i, (word, _) in enumerate(steps) if word == "FROM")
    defaults = dict(args.split("=", 1) for word, args in steps[:first_from] if word == "ARG" and "=" in args)
    assert "BASE_IMAGE" in defaults, "ARG BASE_IMAGE=<default> must come before FROM"
    image = defaults["BASE_IMAGE"].strip('"')
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)(\.\d+)?-(cudnn-)?runtime-ubuntu\d+\.\d+", image) or re.fullmatch(
        r"pytorch/pytorch:[\d.]+-cuda(\d+)\.(\d+)-cudnn\d+-runtime", image)
    assert match, f"{image}: expected an NVIDIA CUDA runtime or PyTorch CUDA runtime image"
    pin = re.search(r'"torch==([^"]+)"', (REPO / "pyproject.toml").read_text())
    assert pin, "pyproject.toml must pin torch"
    torch = pytest.importorskip("torch")
    if torch.__version__.split("+")[0] == pin.group(1) and torch.version.cuda:  # the pinned wheel, as installed here
        assert tuple(match.group(1, 2)) == tuple(torch.version.cuda.split(".")[:2]), (
            f"base image {image} vs torch {torch.__version__} built with CUDA {torch.version.cuda}")


def test_project_is_installed_with_the_readme_install_command(steps):
    readme = (REPO / "README.md").read_text()
    # shell lines of the README's code blocks (prose may mention `pip install` beside an apostrophe)
    code = "\n".join(re.findall(r"```[a-z]*\n(.*?)```", readme, flags=re.S))
    readme_installs = [cmd for line in code.splitlines() if "pip install" in line and not line.lstrip().startswith("#")
                       for cmd in pip_installs(line.split("  #")[0].strip())]
    assert readme_installs, "README.md has no `pip install` command"
    ours = [cmd for word, args in steps if word == "RUN" for cmd in pip_installs(_strip_run_flags(args))]
    assert ours == [readme_installs[0]], f"Dockerfile installs {ours}, README says {readme_installs[0]!r}"
    assert not any(re.search(r"\btorch\b", cmd) for cmd in ours), "torch must come from the project's pin"
    copies = [args for word, args in steps if word == "COPY"]
    assert any(args.split()[-2:] == [".", "."] for args in copies), "the whole project must be copied in"
    for name in ("pyproject.toml", "README.md"):  # what `pip install -e .` reads
        assert any(name in args for args in copies), name


def test_runs_as_non_root_user(steps):
    users = [args for word, args in steps if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    last_user = max(i for i, (word, _) in enumerate(steps) if word == "USER")
    install = next(i for i, (word, args) in enumerate(steps) if word == "RUN" and "pip install" in args)
    assert last_user < install, "the project is installed as the runtime user, so it owns its files"


def test_entrypoint_and_volumes(steps):
    entry = [args for word, args in steps if word == "ENTRYPOINT"]
    assert len(entry) == 1 and json.loads(entry[0]) == ["python", "-m", "experiments.run"]
    workdir = [args for word, args in steps if word == "WORKDIR"][-1]
    assert workdir == WORKDIR
    volumes = [v for word, args in steps if word == "VOLUME" for v in json.loads(args)]
    assert set(volumes) >= {f"{WORKDIR}/data/shards", f"{WORKDIR}/runs", f"{WORKDIR}/wandb"}, volumes
    env = " ".join(args for word, args in steps if word == "ENV")
    assert "WANDB_MODE=offline" in env and f"WANDB_DIR={WORKDIR}/wandb" in env


def test_no_secrets_baked_into_image_or_compose(steps):
    for word, args in steps:
        if word in ("ENV", "ARG", "LABEL"):
            names = re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_.-]*)=", args) or [args.split()[0]]
            assert not [n for n in names if SECRET_NAME.search(n)], f"{word} {args}"
        if word in ("COPY", "ADD"):
            assert not re.search(r"\.netrc|\.env\b|wandb/settings|credentials", args), f"{word} {args}"
    text = DOCKERFILE.read_text()
    assert not re.search(r"WANDB_API_KEY\s*=", text) and "wandb login" not in text
    compose = yaml.safe_load(COMPOSE.read_text())
    env = compose["services"]["train"]["environment"]
    for name, value in env.items():  # secrets may be named (passed through from the shell), never given a value
        if SECRET_NAME.search(name):
            assert value is None, f"compose sets {name}"


def test_compose_reserves_gpus_and_mounts_data_runs_wandb():
    service = yaml.safe_load(COMPOSE.read_text())["services"]["train"]
    assert service["build"]["dockerfile"] == "docker/Dockerfile" and service["build"]["context"] == ".."
    steps = instructions(DOCKERFILE.read_text())
    default = next(args.split("=", 1)[1] for word, args in steps if word == "ARG" and args.startswith("BASE_IMAGE="))
    assert service["build"]["args"]["BASE_IMAGE"] == f"${{BASE_IMAGE:-{default}}}", "compose and Dockerfile bases differ"
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    targets = {v.split(":")[1] for v in service["volumes"]}
    assert targets == {f"{WORKDIR}/data/shards", f"{WORKDIR}/runs", f"{WORKDIR}/wandb"}
    assert service["command"][:3] == ["fit", "--config", "experiments/configs/vit_shapes.yaml"]
    assert (REPO / service["command"][2]).exists()


def _pattern_regex(pattern: str) -> str:
    """A .dockerignore pattern as a regex: ``*`` and ``?`` stay within one path element, ``**`` spans any."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins, ``!`` re-includes, a directory covers its files."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _pattern_regex(pattern.lstrip("!").strip("/"))
        if any(re.fullmatch(regex, p) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_data_and_runs_out_of_the_build_context():
    patterns = [l.strip() for l in DOCKERIGNORE.read_text().splitlines() if l.strip() and not l.startswith("#")]
    for path in ("data/shards/shapes/shapes-train-000000.tar", "runs/vit_shapes/20250101-000000/checkpoints/last.ckpt",
                 "wandb/offline-run-x/run.wandb", ".venv/bin/python", ".git/HEAD", "mm_lightning/__pycache__/x.pyc",
                 "runs/x/wandb/debug.log", ".netrc", ".env"):
        assert _ignored(path, patterns), f"{path} would be sent to the Docker daemon"
    for path in ("pyproject.toml", "README.md", "mm_lightning/__init__.py", "mm_lightning/data/shards.py",
                 "data/prepare.py", "data/__init__.py", "experiments/run.py", "experiments/configs/vit_shapes.yaml",
                 "docker/Dockerfile"):
        assert (REPO / path).exists(), path
        assert not _ignored(path, patterns), f"{path} is needed in the image but ignored"
