"""A real single-node SLURM cluster on localhost, for the ``slurm`` tests (and for trying SLURM locally).

The tests start it once per session (:func:`start_or_skip`); by hand::

    python -m tests.slurm_cluster start     # install Debian's packages if missing, start, leave running
    python -m tests.slurm_cluster status
    python -m tests.slurm_cluster stop

What it does: installs ``slurmctld slurmd slurm-client munge`` with apt-get when ``sbatch`` is
missing, creates the munge key if there is none and starts ``munged`` (as the munge user),
writes ``slurm.conf`` into a state directory (no cgroups, no accounting, the node's shape from
``slurmd -C``, scheduling and requeue delays cut to seconds), starts ``slurmctld`` and ``slurmd``
directly (these machines have no systemd) and waits until the node is ``idle``. Clients find the
configuration through ``SLURM_CONF`` (set in this process, so every subprocess and every job
inherits it) and, where ``/etc/slurm/slurm.conf`` does not exist, through a symlink there.
Only the daemons it started are stopped, by the pids in their pid files.

SLURM's ports (6817/6818) are fixed, so there is one cluster per machine: a cluster that
already answers ``scontrol ping`` is reused and left running.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
ETC_CONF = Path("/etc/slurm/slurm.conf")
PERSISTENT_DIR = Path(tempfile.gettempdir()) / "mm-lightning-slurm"  # used by the command line
PARTITION = "debug"
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])


def which(name: str) -> str | None:
    """``shutil.which`` that also looks in the sbin directories (daemons live there; PATH may lack them)."""
    return shutil.which(name, path=SEARCH_PATH)


class SlurmUnavailable(RuntimeError):
    """SLURM cannot run here (not root, no apt-get, no package registry): a reason to skip, not a failure."""


def _run(cmd: list[str], timeout: float = 60, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc


def install() -> None:
    """Install the SLURM and munge packages with apt-get unless ``sbatch`` and the daemons are present."""
    if all(which(p) for p in ("sbatch", "srun", "scontrol", "slurmctld", "slurmd", "munged", "mungekey")):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("SLURM is not installed and installing it needs root (apt-get)")
    if not which("apt-get"):
        raise SlurmUnavailable("SLURM is not installed and there is no apt-get to install it with")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode != 0:  # package lists may be missing on a fresh machine
        subprocess.run(["apt-get", "update"], capture_output=True, text=True, timeout=300, env=env)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode != 0:
        raise SlurmUnavailable(f"`{' '.join(cmd)}` failed (no package registry?): {proc.stderr.strip()[-500:]}")


def _munge_ok() -> bool:
    if not which("munge"):
        return False
    encode = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
    if encode.returncode != 0:
        return False
    return subprocess.run(["unmunge"], input=encode.stdout, capture_output=True, timeout=10).returncode == 0


def start_munge() -> int | None:
    """Start munged unless it already answers; returns the pid of the munged started here (or None)."""
    if _munge_ok():
        return None
    if os.geteuid() != 0:
        raise SlurmUnavailable("munged is not running and starting it needs root")
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        _run([which("mungekey") or "mungekey", "--create", "--keyfile", str(key)])
    for path in (Path("/etc/munge"), Path("/var/lib/munge"), Path("/var/log/munge"), Path("/run/munge")):
        path.mkdir(parents=True, exist_ok=True)
        shutil.chown(path, "munge", "munge")
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)
    Path("/etc/munge").chmod(0o700)
    _run([which("runuser") or "runuser", "-u", "munge", "--", which("munged") or "/usr/sbin/munged"])
    for _ in range(50):
        if _munge_ok():
            break
        time.sleep(0.1)
    else:
        raise RuntimeError("munged started but `munge -n | unmunge` still fails")
    pid_file = Path("/run/munge/munged.pid")
    return int(pid_file.read_text().strip()) if pid_file.exists() else None


def node_shape() -> dict[str, int]:
    """CPUs, sockets, cores, threads and RealMemory (MB) of this machine, as ``slurmd -C`` reads them."""
    out = _run([which("slurmd") or "slurmd", "-C"]).stdout
    fields = dict(re.findall(r"(\w+)=(\S+)", out.splitlines()[0]))
    return {k: int(fields[k]) for k in ("CPUs", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")}


def write_config(state_dir: Path, hostname: str) -> Path:
    """Write ``slurm.conf`` for one node on 127.0.0.1 with its files under ``state_dir``; returns its path."""
    shape = node_shape()
    for sub in ("state", "spool"):
        (state_dir / sub).mkdir(parents=True, exist_ok=True)
    memory = int(shape["RealMemory"] * 0.95)  # a margin, or the node is drained for "Low RealMemory"
    conf = f"""\
# Written by tests/slurm_cluster.py: one node on localhost, no cgroups, no accounting.
ClusterName=mmlightning
SlurmctldHost={hostname}(127.0.0.1)
SlurmUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again after cred_expire seconds (default 120)
AuthInfo=cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
KillWait=10
InactiveLimit=0
MinJobAge=1800
StateSaveLocation={state_dir / "state"}
SlurmdSpoolDir={state_dir / "spool"}
SlurmctldPidFile={state_dir / "slurmctld.pid"}
SlurmdPidFile={state_dir / "slurmd.pid"}
SlurmctldLogFile={state_dir / "slurmctld.log"}
SlurmdLogFile={state_dir / "slurmd.log"}
NodeName={hostname} NodeAddr=127.0.0.1 CPUs={shape["CPUs"]} SocketsPerBoard={shape["SocketsPerBoard"]} \
CoresPerSocket={shape["CoresPerSocket"]} ThreadsPerCore={shape["ThreadsPerCore"]} RealMemory={memory} State=UNKNOWN
PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
    path = state_dir / "slurm.conf"
    path.write_text(conf)
    return path


def _ping_ok(env: dict[str, str] | None = None) -> bool:
    if not which("scontrol"):
        return False
    try:
        proc = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10, env=env)
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0 and "UP" in proc.stdout


def node_states(env: dict[str, str] | None = None) -> list[str]:
    """The state of every node (``idle``, ``mix``, ``alloc``, ``down``, ``drain`` ...)."""
    proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, timeout=10, env=env)
    return proc.stdout.split() if proc.returncode == 0 else []


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie left for an init that does not reap counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@dataclass
class SlurmCluster:
    """A running single-node cluster: its configuration and the daemons this process started."""

    conf: Path | None
    state_dir: Path | None
    started: list[int] = field(default_factory=list)  # pids of slurmd, slurmctld, munged started here
    linked_etc: bool = False
    startup_s: float = 0.0
    remove_dir: bool = False  # the state directory is a temporary one made by start()

    @property
    def env(self) -> dict[str, str]:
        """``os.environ`` plus ``SLURM_CONF`` for running the client commands."""
        return {**os.environ, **({"SLURM_CONF": str(self.conf)} if self.conf else {})}

    def logs(self) -> str:
        """The tail of the daemons' logs, for failure messages."""
        if not self.state_dir:
            return ""
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.state_dir / name
            if path.exists():
                parts.append(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(parts)

    def stop(self) -> None:
        """Stop the daemons started here (SIGTERM, SIGKILL after 15 s) and remove the /etc/slurm symlink made here."""
        for pid in self.started:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        while any(_alive(p) for p in self.started) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in self.started:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.started = []
        if self.linked_etc and ETC_CONF.is_symlink():
            ETC_CONF.unlink()
            self.linked_etc = False
        if self.remove_dir and self.state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)


def start(state_dir: Path | None = None, timeout: float = 60) -> SlurmCluster:
    """Install if needed and start a single-node cluster (or reuse a running one); sets ``SLURM_CONF``.

    Raises :class:`SlurmUnavailable` where SLURM cannot run here, and ``RuntimeError`` (with the
    daemons' logs) when it is installed but does not come up.
    """
    begin = time.monotonic()
    if sys.platform != "linux":
        raise SlurmUnavailable(f"a local SLURM cluster needs Linux, not {sys.platform}")
    for conf in (os.environ.get("SLURM_CONF"), str(ETC_CONF)):
        if conf and Path(conf).exists() and _ping_ok({**os.environ, "SLURM_CONF": conf}):
            os.environ["SLURM_CONF"] = conf
            return SlurmCluster(conf=Path(conf), state_dir=Path(conf).parent, startup_s=time.monotonic() - begin)
    if os.geteuid() != 0:
        raise SlurmUnavailable("starting slurmctld/slurmd needs root (no SLURM cluster is running)")
    install()
    temporary = state_dir is None
    state_dir = Path(state_dir or tempfile.mkdtemp(prefix="mm-slurm-"))
    state_dir.mkdir(parents=True, exist_ok=True)
    hostname = socket.gethostname().split(".")[0]
    cluster = SlurmCluster(conf=write_config(state_dir, hostname), state_dir=state_dir, remove_dir=temporary)
    env = cluster.env
    try:
        munged = start_munge()
        if munged:
            cluster.started.insert(0, munged)
        for daemon, pid_name, args in (("slurmctld", "slurmctld.pid", ["-i"]), ("slurmd", "slurmd.pid", [])):
            pid_file = state_dir / pid_name
            pid_file.unlink(missing_ok=True)
            _run([which(daemon) or f"/usr/sbin/{daemon}", "-f", str(cluster.conf), *args], env=env)
            for _ in range(100):
                pid = _read_pid(pid_file)
                if pid:
                    break
                time.sleep(0.1)
            else:
                raise RuntimeError(f"{daemon} did not write {pid_file}\n{cluster.logs()}")
            cluster.started.insert(0, pid)  # stopped in reverse order: slurmd, slurmctld, munged
        deadline = time.monotonic() + timeout
        resumed = False
        while time.monotonic() < deadline:
            states = node_states(env)
            if states and all(s == "idle" for s in states):
                break
            if states and any(s.startswith(("drain", "down")) for s in states) and not resumed:
                subprocess.run(["scontrol", "update", f"nodename={hostname}", "state=resume"], env=env,
                               capture_output=True, timeout=10)
                resumed = True
            time.sleep(0.3)
        else:
            raise RuntimeError(f"the SLURM node did not become idle in {timeout:.0f} s: {node_states(env)}\n{cluster.logs()}")
    except BaseException:
        cluster.stop()
        raise
    if not ETC_CONF.exists() and not ETC_CONF.is_symlink():  # so that `sinfo` works in any shell too
        ETC_CONF.parent.mkdir(parents=True, exist_ok=True)
        ETC_CONF.symlink_to(cluster.conf)
        cluster.linked_etc = True
    os.environ["SLURM_CONF"] = str(cluster.conf)
    cluster.startup_s = time.monotonic() - begin
    return cluster


# ------------------------------------------------------------------ jobs
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED"}


def job_info(job_id: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...); empty once SLURM forgot the job."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=10,
                          env=env)
    if proc.returncode != 0:
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout.splitlines()[0]))


def wait_for_job(job_id: str, timeout: float, env: dict[str, str] | None = None, poll: float = 1.0) -> dict[str, str]:
    """Poll until the job reaches a terminal state; returns its final :func:`job_info`."""
    deadline = time.monotonic() + timeout
    info: dict[str, str] = {}
    while time.monotonic() < deadline:
        info = job_info(job_id, env) or info
        if info.get("JobState") in TERMINAL_STATES:
            return info
        time.sleep(poll)
    subprocess.run(["scancel", str(job_id)], env=env, capture_output=True, timeout=10)
    raise TimeoutError(f"SLURM job {job_id} did not finish in {timeout:.0f} s: {info}")


def main(argv: list[str] | None = None) -> None:
    """``python -m tests.slurm_cluster {start,stop,status}``: a local cluster that outlives this command."""
    parser = argparse.ArgumentParser(prog="python -m tests.slurm_cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop", "status"])
    action = parser.parse_args(argv).action
    if action == "start":
        cluster = start(PERSISTENT_DIR)
        if cluster.started:
            (PERSISTENT_DIR / "started.pids").write_text(" ".join(map(str, cluster.started)) + "\n")
            (PERSISTENT_DIR / "linked_etc").write_text("1\n" if cluster.linked_etc else "0\n")
        print(f"SLURM is up ({cluster.startup_s:.1f} s): {node_states(cluster.env)}; export SLURM_CONF={cluster.conf}")
    elif action == "stop":
        pids_file = PERSISTENT_DIR / "started.pids"
        if not pids_file.exists():
            sys.exit(f"no cluster started by this command ({pids_file} missing)")
        linked = (PERSISTENT_DIR / "linked_etc").read_text().strip() == "1"
        SlurmCluster(conf=None, state_dir=PERSISTENT_DIR, started=[int(p) for p in pids_file.read_text().split()],
                     linked_etc=linked).stop()
        pids_file.unlink()
        print("SLURM stopped")
    else:
        conf = os.environ.get("SLURM_CONF") or str(ETC_CONF)
        up = _ping_ok({**os.environ, "SLURM_CONF": conf})
        print(f"SLURM {'up' if up else 'not running'} (SLURM_CONF={conf}) {node_states() if up else ''}")
        sys.exit(0 if up else 1)


if __name__ == "__main__":
    main()
