"""A one-node SLURM cluster on localhost for the tests: munged, slurmctld and slurmd with their own config,
key, sockets and state under one directory (``$SSMLM_TEST_SLURM_DIR``, default /tmp/ssmlm-slurm).

    cluster = LocalSlurm()
    cluster.start()                      # idempotent: reuses a cluster that already answers
    subprocess.run(["sbatch", ...], env=cluster.env())
    cluster.stop()                       # stops only the daemons this object started

    python tests/slurm_cluster.py start  # from a shell (CI): start one, print the SLURM_CONF to use
    python tests/slurm_cluster.py stop   # stop the daemons of the state directory, whoever started them

Needs root (slurmd runs jobs as the submitting user) and Debian's ``slurm-wlm`` and ``munge`` packages.
Process tracking is plain /proc (``proctrack/linuxproc``), no cgroups, so it runs inside containers.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scontrol", "scancel")


def missing() -> str | None:
    """Why a local cluster cannot run here (None when it can)."""
    absent = [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name) is None]
    if absent:
        return f"SLURM / munge not installed (missing {', '.join(absent)}; apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "a local SLURM cluster needs root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    def __init__(self, root: str | Path | None = None, partition: str = "debug"):
        self.root = Path(root or os.environ.get("SSMLM_TEST_SLURM_DIR", "/tmp/ssmlm-slurm"))
        self.partition = partition
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.started: list[str] = []  # the daemons this object started (and will stop)

    def env(self, base: dict | None = None) -> dict:
        """An environment in which sbatch, squeue, scontrol ... talk to this cluster."""
        return dict(base if base is not None else os.environ, SLURM_CONF=str(self.conf))

    def _run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=timeout, check=check)

    def answers(self) -> bool:
        """Whether slurmctld answers and the node takes jobs."""
        if not self.conf.exists():
            return False
        try:
            ping = self._run("scontrol", "ping", check=False, timeout=10)
            node = self._run("sinfo", "-h", "-o", "%t", check=False, timeout=10)
        except subprocess.TimeoutExpired:
            return False
        return "UP" in ping.stdout and node.stdout.strip() in ("idle", "mix", "alloc")

    # --------------------------------------------------------------------------------------------- start
    def start(self, timeout: float = 60) -> None:
        if self.answers():
            return
        self.stop_stale()
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        self._start_munge()
        self._write_conf()
        subprocess.run(["slurmctld", "-c", "-f", str(self.conf)], env=self.env(), check=True, timeout=30)
        self.started.append("slurmctld")
        subprocess.run(["slurmd", "-f", str(self.conf)], env=self.env(), check=True, timeout=30)
        self.started.append("slurmd")
        deadline = time.monotonic() + timeout
        while not self.answers():
            if time.monotonic() > deadline:
                logs = "\n".join(p.read_text()[-1500:] for p in (self.root / "log").glob("*.log"))
                self.stop()
                raise RuntimeError(f"the local SLURM cluster did not come up within {timeout:.0f} s:\n{logs}")
            time.sleep(0.5)

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(secrets.token_bytes(1024))
            os.chmod(key, 0o600)
        probe = subprocess.run(["munge", "-n", "-S", str(self.munge_socket)], capture_output=True)
        if probe.returncode == 0:
            return
        self.munge_socket.unlink(missing_ok=True)
        subprocess.run(["munged", "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
                        f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                        f"--log-file={self.root / 'log' / 'munged.log'}",
                        f"--seed-file={self.root / 'munge' / 'munged.seed'}"], check=True, timeout=30)
        self.started.append("munged")

    def _write_conf(self) -> None:
        host = socket.gethostname().split(".")[0]
        cpus = os.cpu_count() or 1
        mem_mb = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 - 512
        r = self.root
        self.conf.write_text(f"""\
ClusterName=ssmlmtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
SchedulerParameters=sched_interval=2
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName={self.partition} Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
""")

    # ---------------------------------------------------------------------------------------------- stop
    def _pid(self, name: str) -> int | None:
        path = {"munged": self.root / "munge" / "munged.pid", "slurmctld": self.root / "slurmctld.pid",
                "slurmd": self.root / "slurmd.pid"}[name]
        try:
            pid = int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def _kill(self, name: str) -> None:
        pid = self._pid(name)
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while self._pid(name) is not None and time.monotonic() < deadline:
            time.sleep(0.2)

    def stop(self) -> None:
        """Stops the daemons this object started (jobs still running are cancelled first)."""
        if "slurmctld" in self.started:
            subprocess.run(["scancel", "--partition", self.partition], env=self.env(), capture_output=True,
                           timeout=30)
        for name in reversed(self.started):
            self._kill(name)
        self.started.clear()

    def stop_stale(self) -> None:
        """Daemons of an earlier cluster in the same directory that no longer answer: stop them, by pid file."""
        for name in ("slurmd", "slurmctld"):
            self._kill(name)

    def shutdown(self) -> None:
        """Stops every daemon of this state directory (by its pid file), whoever started it."""
        self.started = list(DAEMONS)
        self.stop()


if __name__ == "__main__":
    import sys

    action = sys.argv[1] if len(sys.argv) > 1 else ""
    if action not in ("start", "stop") or missing():
        sys.exit(f"usage: python {sys.argv[0]} start|stop  (needs root, slurm-wlm and munge: {missing() or 'ok'})")
    cluster = LocalSlurm()
    if action == "start":
        cluster.start()
        print(f"SLURM_CONF={cluster.conf}")
    else:
        cluster.shutdown()
