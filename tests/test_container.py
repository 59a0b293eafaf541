"""The Docker image built and run for real with podman, on a local base (``--build-arg BASE_IMAGE``).

The image is built once per module from this checkout (``tests/container_image.py`` installs
podman, builds the local base once per machine and mounts pip's configuration into the build),
then it prints ``fit --help`` and trains the main job for one epoch as its non-root user, with
the shards mounted read-only and the run directory mounted writable. The two tests at the top
check the read-only-shards rules on the host, without a container.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from tests import container_image as ci

WORKDIR = "/workspace/mm-lightning"
IMAGE_PREFIX = "localhost/mm-lightning-test"
PREBUILT_ENV = "MM_TEST_IMAGE"  # test an image built beforehand instead of building one (never set in CI)


def _snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every entry under ``directory``: relative path -> (size, mtime in ns)."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*")}


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    """A directory holding ``data/shards/shapes``: a complete tiny built-in shapes data set."""
    from data.prepare import prepare_shapes

    root = tmp_path_factory.mktemp("shapes-root")
    prepare_shapes(out_dir=root / "data/shards/shapes", train=64, val=16, test=16, progress=False)
    return root


def test_complete_builtin_shards_are_only_read(shapes_root, monkeypatch):
    """prepare_builtin_data on complete shards writes nothing (no lock file): what a read-only volume needs."""
    from data.builtin import ensure_builtin, pending_builtin
    from experiments.run import prepare_builtin_data

    monkeypatch.chdir(shapes_root)
    shards = shapes_root / "data/shards"
    before = _snapshot(shards)
    specs = [f"data/shards/shapes/shapes-{split}-*.tar" for split in ("train", "val", "test")]
    assert all(pending_builtin(spec) == [] for spec in specs)
    prepare_builtin_data(specs)
    assert [ensure_builtin(spec) for spec in specs] == [False] * 3
    after = _snapshot(shards)
    assert after == before, f"written into the shards: {sorted(set(after.items()) - set(before.items()))}"
    assert pending_builtin("data/shards/digits/digits-train-*.tar") == ["data/shards/digits"]  # missing: to write


def test_missing_builtin_shards_that_cannot_be_written_fail_in_one_line(tmp_path, monkeypatch):
    """The shapes data set is missing and data/shards cannot take it: one line naming the spec and the cause."""
    from experiments.run import UsageError, prepare_builtin_data

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data/shards").write_text("")  # not a directory: writing there fails, as on a read-only volume
    with pytest.raises(UsageError, match=r"^error: data/shards/shapes/shapes-train-\*\.tar: the built-in data set is "
                                         r"missing and cannot be written \(File exists: data/shards\); write it first"):
        prepare_builtin_data(["data/shards/shapes/shapes-train-*.tar"])
    assert (tmp_path / "data/shards").read_text() == ""


# ---------------------------------------------------------------------------- the image itself
def container_test(test):
    """Marks a test ``container`` (podman builds and runs the image) and ``slow`` (minutes: the build)."""
    return pytest.mark.container(pytest.mark.slow(test))


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    """The image built from this checkout on the local base; removed by name afterwards (also after a failure)."""
    try:
        base = ci.start_or_skip()
    except ci.PodmanUnavailable as exc:
        pytest.skip(f"podman unavailable: {exc}")
    if os.environ.get(PREBUILT_ENV):  # an image built by hand (python -m tests.container_image build): kept
        yield os.environ[PREBUILT_ENV]
        return
    ci.remove_stale(IMAGE_PREFIX)  # left by runs that were killed before their own clean-up
    tag = f"{IMAGE_PREFIX}:{os.getpid()}"
    try:
        seconds = ci.build_image(tag, base)
        print(f"\nbuilt {tag} on {base} in {seconds:.0f} s", file=sys.stderr)
        yield tag
    finally:
        ci.remove(images=[tag])


def _container_name(what: str) -> str:
    return f"{IMAGE_PREFIX.rsplit('/', 1)[-1]}-{os.getpid()}-{what}"


def run_container(image: str, what: str, *args: str, options: tuple[str, ...] = (), timeout: float = 900
                  ) -> subprocess.CompletedProcess:
    """``podman run --rm`` with no network, named after this test run; removed by name afterwards."""
    name = _container_name(what)
    try:
        return ci.podman("run", "--rm", "--name", name, "--network", "none", *options, image, *args,
                         check=False, timeout=timeout)
    finally:
        ci.remove(containers=[name])


@container_test
def test_image_is_built_on_the_base_argument_and_keeps_nothing_mounted(image):
    inspect = json.loads(ci.podman("image", "inspect", image).stdout)[0]["Config"]
    assert inspect["User"] == "mm" and inspect["Entrypoint"] == ["python", "-m", "experiments.run"]
    script = ("grep ^VERSION_CODENAME= /etc/os-release; id -u; "
              f"find /etc/pip.conf {ci.PIP_MOUNT_ROOT} -type f -size +0 2>/dev/null; "  # mount points may stay, empty
              "pip config list | grep -v '^:env:' || true")  # settings from files; the image's own PIP_* variables aside
    out = run_container(image, "inspect", "-c", script, options=("--entrypoint", "sh"))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert lines[0] == f"VERSION_CODENAME={ci.host_release()[1]}", "not built on the local base (BASE_IMAGE ignored?)"
    assert lines[1] != "0", "the image's user is root"
    assert lines[2:] == [], f"pip's configuration or files mounted into the build stayed in the image: {lines[2:]}"


@container_test
def test_fit_help_runs_as_the_non_root_user(image):
    out = run_container(image, "help", "fit", "--help")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "--trainer.max_epochs" in out.stdout and "--data.train" in out.stdout


@container_test
def test_tiny_run_with_read_only_shards_writes_the_run_directory(image, shapes_root, tmp_path):
    from mm_lightning.checkpoint import load_checkpoint

    shards = shapes_root / "data/shards"
    runs = tmp_path / "runs"
    runs.mkdir()
    uid = int(run_container(image, "uid", "-u", options=("--entrypoint", "id")).stdout)
    os.chown(runs, uid, uid)  # the bind-mounted run directory belongs to the image's user, as on a laptop
    before = _snapshot(shards)
    out = run_container(
        image, "fit", "fit", "--config", "experiments/configs/vit_shapes.yaml", "--trainer.max_epochs", "1",
        "--data.batch_size", "32", "--trainer.enable_progress_bar", "false",
        options=("-v", f"{shards}:{WORKDIR}/data/shards:ro", "-v", f"{runs}:{WORKDIR}/runs"))
    assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    assert _snapshot(shards) == before, "the run wrote into the read-only shards volume"

    run_dirs = [p.parent for p in runs.glob("vit_shapes/*/config.yaml")]
    assert len(run_dirs) == 1, sorted(str(p) for p in runs.rglob("*"))
    run = run_dirs[0]
    summary = json.loads((run / "summary.json").read_text())
    assert 0.0 <= summary["test/acc"] <= 1.0 and (summary["epochs"], summary["steps"]) == (1, 2), summary  # 64 / 32
    checkpoints = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in checkpoints and len(checkpoints) >= 2, checkpoints  # last + the best by val
    state = load_checkpoint(run / "checkpoints" / "last.ckpt")  # weights only, on the host
    assert state["global_step"] == 2 and state["state_dict"], sorted(state)  # 64 samples / batch 32
    assert list(run.glob("wandb/offline-run-*")), "no offline W&B run in the run directory"
    owners = {p.lstat().st_uid for p in [run, *run.rglob("*")]}  # W&B links to paths inside the container
    assert owners == {uid}, f"run directory owned by {owners}, expected the image's user {uid}"

