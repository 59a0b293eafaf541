"""Podman on this machine, for the ``container`` tests (and for building the image by hand).

The tests call :func:`start_or_skip` and :func:`build_image`; by hand::

    python -m tests.container_image base               # install podman if missing; build the local base (cached)
    python -m tests.container_image build [--tag T]    # ... then the image from this checkout (default mm-lightning:local)
    python -m tests.container_image clean [--base]     # remove the images built here (--base: the cached base too)

What it does: installs Debian's ``podman runc debootstrap`` with apt-get when podman is missing;
writes a private ``containers.conf`` (the ``runc`` runtime, cgroupfs, ulimits within this
machine's hard limits: the defaults fail here with ``crun: setrlimit RLIMIT_NOFILE``) and points
``CONTAINERS_CONF`` at it for every podman call made here; builds a local base image once with
``debootstrap --variant=minbase <this release> <the mirror apt uses>`` + ``podman import`` and keeps
it (``localhost/mm-lightning-base:<release>``) for later runs on the same machine; builds
``docker/Dockerfile`` with ``--build-arg BASE_IMAGE=<that base>`` and pip's own configuration
(``pip config list``: its index, its local wheel directories, its CA bundle) mounted read-only, so
torch and the CUDA wheels come from local disk. Only the mount points stay in the image, empty.
Images and containers are removed by the names given here.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ["podman", "runc", "debootstrap"]
STATE_DIR = Path(tempfile.gettempdir()) / "mm-lightning-podman"
BASE_REPOSITORY = "localhost/mm-lightning-base"
PIP_MOUNT_ROOT = "/run/pip-host"  # where the build sees the paths pip's configuration names
CONTAINERS_CONF = """\
# Written by tests/container_image.py: podman settings that work on these machines.
[containers]
default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


class PodmanUnavailable(RuntimeError):
    """Podman cannot be installed or run here (not root, no apt-get, no registry): a reason to skip, not a failure."""


def _run(cmd: list[str], timeout: float = 120, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def install() -> None:
    """Install podman, runc and debootstrap with apt-get unless they are present."""
    if all(shutil.which(p, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") for p in PACKAGES):
        return
    if os.geteuid() != 0:
        raise PodmanUnavailable(f"{' '.join(PACKAGES)} are not all installed and installing them needs root (apt-get)")
    if not shutil.which("apt-get"):
        raise PodmanUnavailable(f"{' '.join(PACKAGES)} are not all installed and there is no apt-get to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    if proc.returncode != 0:  # package lists may be missing on a fresh machine
        subprocess.run(["apt-get", "update"], capture_output=True, text=True, timeout=300, env=env)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    if proc.returncode != 0:
        raise PodmanUnavailable(f"`{' '.join(cmd)}` failed (no package registry?): {proc.stderr.strip()[-500:]}")


def podman_env() -> dict[str, str]:
    """The environment for podman: ``CONTAINERS_CONF`` pointing at a private configuration written here."""
    import resource

    STATE_DIR.mkdir(parents=True, exist_ok=True)
    limits = {}
    for name, which, default in (("nofile", resource.RLIMIT_NOFILE, 20000), ("nproc", resource.RLIMIT_NPROC, 32768)):
        hard = resource.getrlimit(which)[1]
        limits[name] = default if hard == resource.RLIM_INFINITY else min(default, hard)
    conf = STATE_DIR / "containers.conf"
    text = CONTAINERS_CONF.format(**limits)
    if not conf.is_file() or conf.read_text() != text:
        tmp = conf.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(conf)
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def podman(*args: str, timeout: float = 120, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run ``podman ARGS`` with the private configuration; raises with its output when it fails and ``check``."""
    return _run(["podman", *args], timeout=timeout, check=check, env=podman_env(), **kwargs)


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """An exclusive lock shared by every process on this machine (two test runs build one base)."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(STATE_DIR / f"{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def host_release() -> tuple[str, str]:
    """(ID, VERSION_CODENAME) of this machine's Debian or Ubuntu release, from /etc/os-release."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            key, _, value = line.partition("=")
            fields[key] = value.strip().strip('"')
    if fields.get("ID") not in ("debian", "ubuntu") or not fields.get("VERSION_CODENAME"):
        raise PodmanUnavailable(f"the local base is built with debootstrap from this machine's release; "
                                f"{fields.get('PRETTY_NAME', 'this system')} is not Debian or Ubuntu")
    return fields["ID"], fields["VERSION_CODENAME"]


def apt_mirror(distro: str, codename: str) -> str:
    """The URI apt uses for ``codename`` itself (not -updates or -security), from apt's sources."""
    paths = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in paths:
        with contextlib.suppress(OSError):
            text = path.read_text()
            if path.suffix == ".sources":  # deb822 stanzas
                for stanza in re.split(r"\n\s*\n", text):
                    uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
                    suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
                    if uris and suites and codename in suites.group(1).split():
                        return uris.group(1)
            else:
                for line in text.splitlines():
                    words = re.sub(r"\[[^]]*\]", "", line).split()
                    if len(words) >= 3 and words[0] == "deb" and words[2] == codename:
                        return words[1]
    return "http://deb.debian.org/debian" if distro == "debian" else "http://archive.ubuntu.com/ubuntu"


def base_image() -> str:
    """The local base's name, ``localhost/mm-lightning-base:<release>``."""
    return f"{BASE_REPOSITORY}:{host_release()[1]}"


def ensure_base() -> tuple[str, float]:
    """Build the local base image unless it exists; returns (its name, seconds spent building it, 0 when cached)."""
    distro, codename = host_release()
    name = f"{BASE_REPOSITORY}:{codename}"
    with _locked("base"):
        if podman("image", "exists", name, check=False).returncode == 0:
            return name, 0.0
        start = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="mm-lightning-base-", dir="/var/tmp") as tmp:
            root = Path(tmp) / "root"
            _run(["debootstrap", "--variant=minbase", codename, str(root), apt_mirror(distro, codename)], timeout=1200)
            for junk in ("var/lib/apt/lists", "var/cache/apt"):  # the image's own apt-get update fetches the lists
                shutil.rmtree(root / junk, ignore_errors=True)
            tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
            try:
                _run(["podman", "import", "--change", 'CMD ["/bin/bash"]', "-", name], timeout=600,
                     stdin=tar.stdout, env=podman_env())
            finally:
                tar.stdout.close()
                tar.wait()
        return name, time.monotonic() - start


def start_or_skip() -> str:
    """Install podman if needed, check that it runs containers, build or reuse the local base; returns the base.

    Raises :class:`PodmanUnavailable` with the reason where podman cannot be installed or run.
    """
    if os.geteuid() != 0:
        raise PodmanUnavailable("the container tests run rootful podman, so they need root")
    install()
    info = podman("info", "--format", "{{.Store.GraphDriverName}}", check=False, timeout=60)
    if info.returncode != 0:
        raise PodmanUnavailable(f"podman does not run here: {info.stderr.strip()[-500:]}")
    base, _ = ensure_base()
    probe = podman("run", "--rm", "--network", "none", base, "true", check=False, timeout=120)
    if probe.returncode != 0:
        raise PodmanUnavailable(f"podman cannot run a container here: {probe.stderr.strip()[-500:]}")
    return base


def pip_settings(pip: list[str] | None = None) -> dict[str, str]:
    """pip's effective settings (``pip config list``): [global] < [install] < PIP_* variables."""
    out = _run([*(pip or [sys.executable, "-m", "pip"]), "config", "list"], timeout=60).stdout
    ranked: dict[str, tuple[int, str]] = {}
    order = {"global": 0, "install": 1, ":env:": 2}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        section, _, name = key.rpartition(".")
        if not sep or section not in order:
            continue
        with contextlib.suppress(ValueError, SyntaxError):
            value = ast.literal_eval(value)
        if name not in ranked or ranked[name][0] <= order[section]:
            ranked[name] = (order[section], str(value))
    return {name: value for name, (_, value) in ranked.items()}


def pip_build_mounts(settings: dict[str, str], conf_dir: Path) -> list[str]:
    """``podman build -v`` arguments that give the build pip's configuration, every local path in it read-only.

    Each local path named (a file or directory, plain or ``file://``; for an index URL the directory
    above the index, which its relative links point into) is mounted under ``/run/pip-host/N``,
    and the settings rewritten to match, into a ``pip.conf`` mounted as ``/etc/pip.conf``: paths
    inside the image (its CA bundle above all) are never covered by the host's.
    """
    mounts: dict[str, str] = {}  # host path -> path in the build

    def inside(token: str, key: str) -> str:
        scheme = "file://" if token.startswith("file://") else ""
        path = token[len(scheme):] if scheme else token
        if not path.startswith("/") or not os.path.exists(path):
            return token
        root = os.path.dirname(path.rstrip("/")) if key.endswith("index-url") else path
        if root not in mounts:  # a file keeps its name: /run/pip-host/N/ca-certificates.crt
            mounts[root] = f"{PIP_MOUNT_ROOT}/{len(mounts)}" + (f"/{os.path.basename(root)}" if os.path.isfile(root) else "")
        return scheme + mounts[root] + path[len(root):]

    lines = ["[global]"]
    for key, value in sorted(settings.items()):
        lines.append(f"{key} = " + " ".join(inside(token, key) for token in value.split()))
    conf_dir.mkdir(parents=True, exist_ok=True)
    (conf_dir / "pip.conf").write_text("\n".join(lines) + "\n")
    args = ["-v", f"{conf_dir / 'pip.conf'}:/etc/pip.conf:ro"]
    for host, target in mounts.items():
        args += ["-v", f"{host}:{target}:ro"]
    return args


def build_image(tag: str, base: str, context: Path = REPO, log: Path | None = None, timeout: float = 1800) -> float:
    """Build ``docker/Dockerfile`` from ``context`` on ``base`` as ``tag``; returns the seconds it took.

    The build's output goes to ``log`` (default ``<tmp>/mm-lightning-podman/build-<tag>.log``), each
    line prefixed with the seconds since the start; a failed build raises with the log's tail.
    ``--layers=false``: one commit at the end and no intermediate images to clean up (the image goes anyway).
    """
    log = log or STATE_DIR / f"build-{re.sub(r'[^A-Za-z0-9_.-]+', '_', tag)}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mm-lightning-pip-") as tmp, open(log, "w") as out:
        cmd = ["podman", "build", "--pull=never", "--network=host", "--layers=false", "--force-rm",
               "-f", str(context / "docker" / "Dockerfile"), "--build-arg", f"BASE_IMAGE={base}",
               *pip_build_mounts(pip_settings(), Path(tmp)), "-t", tag, str(context)]
        out.write(" ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=podman_env())
        watchdog = threading.Timer(timeout, proc.kill)
        watchdog.start()
        try:
            for line in proc.stdout:
                out.write(f"{time.monotonic() - start:7.1f} {line}")
                out.flush()
        finally:
            watchdog.cancel()
            code = proc.wait()
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        raise RuntimeError(f"podman build of {tag} exited {code} (after {time.monotonic() - start:.0f} s; log {log}):\n{tail}")
    return time.monotonic() - start


def remove(images: list[str] = (), containers: list[str] = ()) -> None:
    """Remove containers (with their anonymous volumes) and images by name; missing ones are fine."""
    for name in containers:
        podman("rm", "--force", "--volumes", "--ignore", name, check=False, timeout=120)
    for name in images:
        podman("rmi", "--force", "--ignore", name, check=False, timeout=300)


def remove_stale(prefix: str) -> None:
    """Remove images ``<prefix>:<pid>`` and containers ``<name(prefix)>-<pid>-*`` of test runs no longer alive."""
    def dead(pid: str) -> bool:
        return pid.isdigit() and not Path(f"/proc/{pid}").exists()

    tags = podman("images", "--format", "{{.Repository}}:{{.Tag}}", check=False).stdout.split()
    names = podman("ps", "-a", "--format", "{{.Names}}", check=False).stdout.split()
    short = prefix.rsplit("/", 1)[-1]
    remove(images=[t for t in tags if t.startswith(prefix + ":") and dead(t.rsplit(":", 1)[1])],
           containers=[n for n in names if n.startswith(short + "-") and dead(n[len(short) + 1:].split("-")[0])])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.container_image", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("base", help="install podman if missing and build (or reuse) the local base image")
    build = sub.add_parser("build", help="build the image from this checkout on the local base")
    build.add_argument("--tag", default="localhost/mm-lightning:local")
    clean = sub.add_parser("clean", help="remove the image built here")
    clean.add_argument("--tag", default="localhost/mm-lightning:local")
    clean.add_argument("--base", action="store_true", help="remove the cached local base too")
    args = parser.parse_args(argv)
    try:
        if args.command == "clean":
            remove(images=[args.tag] + ([base_image()] if args.base else []))
            return 0
        base = start_or_skip()
        print(f"base: {base}")
        if args.command == "build":
            seconds = build_image(args.tag, base)
            print(f"built {args.tag} in {seconds:.0f} s")
    except PodmanUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
