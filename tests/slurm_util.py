"""A private single-node Slurm (slurmctld + slurmd on 127.0.0.1, no munge) for the batch
launcher tests: its own config, state directory and ports, stopped at teardown."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scancel")
SBIN = ("/usr/sbin", "/usr/bin", "/usr/local/sbin")


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def slurm_missing() -> str | None:
    """Which Slurm binary is missing (None when all are installed)."""
    return next((b for b in SLURM_BINARIES if _which(b) is None), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONFIG = """\
ClusterName=fptest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=2
KillWait=5
MpiDefault=none
NodeName=fpnode NodeAddr=127.0.0.1 CPUs=16 RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=fpnode Default=YES MaxTime=INFINITE State=UP
PartitionName=other Nodes=fpnode MaxTime=INFINITE State=UP
"""


class LocalSlurm:
    """Start a private Slurm under ``root``; ``env`` has ``SLURM_CONF`` for its clients."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "state").mkdir(parents=True, exist_ok=True)
        (root / "spool").mkdir(exist_ok=True)
        self.conf = root / "slurm.conf"
        self.conf.write_text(
            CONFIG.format(
                host=socket.gethostname().split(".")[0],
                ctld_port=_free_port(),
                slurmd_port=_free_port(),
                root=root,
            )
        )
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, timeout: float = 30.0) -> None:
        """Start both daemons and wait until the node is idle."""
        for cmd in (
            [_which("slurmctld"), "-D", "-c", "-f", str(self.conf)],
            [_which("slurmd"), "-D", "-N", "fpnode", "-f", str(self.conf)],
        ):
            out = open(self.root / f"{Path(str(cmd[0])).name}.out", "wb")  # noqa: SIM115
            self.procs.append(
                subprocess.Popen(
                    [str(c) for c in cmd],
                    env=self.env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
            out.close()
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            done = subprocess.run(
                ["sinfo", "-h", "-n", "fpnode", "-o", "%T"],
                env=self.env,
                capture_output=True,
                text=True,
            )
            state = done.stdout.strip()
            if done.returncode == 0 and state.startswith("idle"):
                return
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"local Slurm did not come up (node state {state!r}):\n{self.logs()}")

    def jobs(self) -> list[str]:
        """``"<id> <state> <name>"`` of every job Slurm still lists."""
        done = subprocess.run(
            ["squeue", "-h", "-o", "%i %T %j"], env=self.env, capture_output=True, text=True
        )
        return [line for line in done.stdout.splitlines() if line.strip()]

    def logs(self) -> str:
        """The daemons' logs."""
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out"):
            f = self.root / name
            if f.exists():
                parts.append(f"--- {name}:\n{f.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel every job and stop both daemons."""
        subprocess.run(["scancel", "--user", "root"], env=self.env, capture_output=True)
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
