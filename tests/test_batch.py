"""Batch-system launchers (``Cluster(engines="slurm")`` and PBS, SGE, LSF, HTCondor, generic).

Slurm is real: a private slurmctld + slurmd on 127.0.0.1 (``slurm_util.LocalSlurm``) runs the
jobs, so these tests submit, signal and cancel real jobs whose tasks are real engines. The other
systems cannot run on this machine: their scripts are checked as rendered, and PBS and LSF are
driven end to end through stand-in ``qsub``/``qdel``/``bsub``/``bkill`` commands that start and
kill the batch script's processes as those systems would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from traitlets.config import Config

from cluster_util import pid_running, run_cluster_cli, wait_until
from ferroparallel.cluster import Cluster
from ferroparallel.cluster.batch import BatchEngineSetLauncher, batch_system_of
from ferroparallel.cluster.launcher import (
    HTCondorEngineSetLauncher,
    LauncherError,
    LSFEngineSetLauncher,
    PBSEngineSetLauncher,
    SGEEngineSetLauncher,
    SlurmControllerLauncher,
    SlurmEngineSetLauncher,
)
from ferroparallel.error import RemoteError
from slurm_util import LocalSlurm, slurm_missing

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("fp_root")]

SHORT = 60.0


# -- scripts, without a batch system -------------------------------------------------------------


def _launcher(cls: type, tmp_path: Path, n: int = 3, **opts: object) -> BatchEngineSetLauncher:
    return cls(tmp_path / "profile", "cid", "esid", n, cmd=["python3", "-m", "x"], **opts)


@pytest.mark.parametrize(
    ("cls", "array", "queue"),
    [
        (SlurmEngineSetLauncher, "#SBATCH --ntasks=3", "#SBATCH --partition=q1"),
        (PBSEngineSetLauncher, "#PBS -t 1-3", "#PBS -q q1"),
        (SGEEngineSetLauncher, "#$ -t 1-3", "#$ -q q1"),
        (LSFEngineSetLauncher, "ipengine-cid[1-3]", "#BSUB -q q1"),
    ],
)
def test_default_scripts_carry_the_count_queue_output_and_command(
    tmp_path: Path, cls: type, array: str, queue: str
) -> None:
    es = _launcher(cls, tmp_path, queue="q1", output_file="/x/out.log")
    script = es.render(tmp_path / "profile", "cid", {})
    assert array in script
    assert queue in script
    assert "/x/out.log" in script
    assert "python3 -m x --profile-dir" in script and "--cluster-id cid" in script
    if script.startswith("#!"):
        assert script.splitlines()[0] == "#!/bin/sh"  # directives follow the interpreter line


def test_htcondor_queues_n_at_the_end(tmp_path: Path) -> None:
    es = _launcher(HTCondorEngineSetLauncher, tmp_path, n=4, args=["--x", "a b", "it's"])
    script = es.render(tmp_path, "cid", {})
    assert script.rstrip().splitlines()[-1] == "queue 4"
    assert "executable = python3\n" in script and "getenv = True" in script
    # HTCondor's own quoting: spaces in single quotes, a quote written twice
    assert script.rstrip().splitlines()[-2].endswith(" --x 'a b' 'it''s'\"")


def test_a_template_file_is_read_once_and_the_cluster_file_keeps_the_launchers(
    tmp_path: Path,
) -> None:
    f = tmp_path / "tpl.sh"
    f.write_text("#!/bin/sh\n#SBATCH -n {n}\nsrun {program_and_args}\n")
    es = _launcher(SlurmEngineSetLauncher, tmp_path, batch_template_file=str(f))
    f.unlink()  # (a restart from elsewhere needs neither the file nor its directory)
    again = SlurmEngineSetLauncher.from_dict(es.to_dict(), tmp_path, "cid", "esid")
    assert again.render(tmp_path, "cid", {}).startswith("#!/bin/sh\n#SBATCH -n 3\nsrun ")
    c = Cluster(engines="slurm", controller="pbs", n=2)
    loaded = Cluster.from_dict(c.to_dict())
    assert (loaded.engine_launcher_class, loaded.controller_launcher_class) == ("slurm", "pbs")
    assert Cluster.from_dict(c.to_dict(), engines="local").engine_launcher_class == "local"


def test_slurm_options_become_directives_unless_the_template_has_them(tmp_path: Path) -> None:
    es = _launcher(SlurmEngineSetLauncher, tmp_path, account="acct", qos="hi", timelimit="1:00")
    script = es.render(tmp_path, "cid", {})
    for line in ("#SBATCH --account=acct", "#SBATCH --qos=hi", "#SBATCH --time=1:00"):
        assert line in script
    own = "#!/bin/sh\n#SBATCH -n 8\n#SBATCH -A mine\nsrun {program_and_args}\n"
    es = _launcher(SlurmEngineSetLauncher, tmp_path, account="acct", batch_template=own)
    script = es.render(tmp_path, "cid", {})
    assert "--account" not in script and "--ntasks" not in script  # a user's template is theirs
    assert script.startswith("#!/bin/sh\n#SBATCH -n 8\n#SBATCH -A mine\nsrun python3 -m x")


def test_templates_take_expressions_and_the_namespace(tmp_path: Path) -> None:
    template = "#!/bin/sh\n# nodes={n // per_node} cores={n} env={environment_json}\n{program}\n"
    f = tmp_path / "tpl.sh"
    f.write_text(template)
    es = _launcher(
        SlurmEngineSetLauncher, tmp_path, n=8, batch_template_file=str(f), namespace={"per_node": 4}
    )
    script = es.render(tmp_path, "cid", {"A": "1"})
    assert "# nodes=2 cores=8 env=" + json.dumps({"A": "1"}) in script
    assert script.rstrip().endswith("python3 -m x")  # {program}: the command, as ipyparallel
    es = _launcher(SlurmEngineSetLauncher, tmp_path, batch_template="{wall_time}\n")
    with pytest.raises(LauncherError, match=r"\{wall_time\}.*namespace"):
        es.render(tmp_path, "cid", {})


def test_names_and_bad_settings(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for name in (
        "slurm",
        "Slurm",
        "SlurmEngineSetLauncher",
        "ipyparallel.cluster.launcher.SlurmLauncher",
    ):
        assert batch_system_of(name) == "slurm"
    assert batch_system_of("PBSControllerLauncher") == "pbs"
    assert batch_system_of("BatchSystemLauncher") == "batch"
    assert batch_system_of("local") is None
    assert Cluster(engines="SGEEngineSetLauncher").engine_launcher_class == "sge"
    assert Cluster(controller=SlurmControllerLauncher).controller_launcher_class == "slurm"
    with pytest.raises(NotImplementedError, match="'slurm'"):  # the message lists them
        Cluster(engines="torque-ish")
    # ipcluster's older names, still read by ipyparallel 9, and a misspelt setting is named
    old = Config()
    old.IPClusterEngines.engine_launcher_class = "Slurm"
    old.IPClusterEngines.n = 3
    old.SlurmEngineSetLauncher.partition = "debug"  # (ipyparallel's name is queue)
    legacy = Cluster(config=old)
    assert (legacy.engine_launcher_class, legacy.n) == ("slurm", 3)
    with caplog.at_level("WARNING", logger="ferroparallel.cluster"):
        assert legacy._batch_options("slurm", "Engine", {}) == {}
    assert "c.SlurmEngineSetLauncher: partition not used by the slurm launcher" in caplog.text
    with pytest.raises(TypeError, match="walltime.*known: queue"):
        SlurmEngineSetLauncher(tmp_path, "cid", "esid", 1, walltime="1:00")


def test_a_missing_submit_command_says_what_to_install(tmp_path: Path) -> None:
    es = _launcher(PBSEngineSetLauncher, tmp_path, submit_command=["no-such-qsub"])
    with pytest.raises(FileNotFoundError, match="no-such-qsub.*PBS"):
        es.start()
    generic = _launcher(BatchEngineSetLauncher, tmp_path)
    with pytest.raises(LauncherError, match="batch_template"):
        generic.start()


# -- PBS and LSF through stand-in commands -------------------------------------------------------

FAKE_QSUB = r"""#!/usr/bin/env python3
# qsub stand-in: runs the PBS job array's copies of the script (PBS_ARRAYID=1..N) at once
import os, re, subprocess, sys
script = sys.argv[-1]
text = open(script).read()
m = re.search(r"#PBS -t 1-(\d+)", text)
out = re.search(r"#PBS -o (\S+)", text)
log = open(out.group(1) if out else os.devnull, "ab")
jobs = os.environ["FAKE_BATCH_DIR"]
job = str(len(os.listdir(jobs)) + 100)
pids = []
for i in range(1, int(m.group(1)) + 1 if m else 2):
    env = dict(os.environ, PBS_ARRAYID=str(i), PBS_JOBID=job)
    p = subprocess.Popen(["/bin/sh", script], env=env, stdout=log, stderr=log,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    pids.append(p.pid)
open(os.path.join(jobs, job), "w").write(" ".join(map(str, pids)))
print(f"{job}.fakeserver")
"""

FAKE_DEL = r"""#!/usr/bin/env python3
# qdel/bkill stand-in: SIGTERM the job's processes ([-s SIG] id: another signal)
import os, signal, sys
args = sys.argv[1:]
sig = signal.SIGTERM
if args[0] == "-s":
    sig = signal.Signals["SIG" + args[1]]
    args = args[2:]
job = args[0]
for pid in open(os.path.join(os.environ["FAKE_BATCH_DIR"], job)).read().split():
    try:
        os.killpg(int(pid), sig)
    except ProcessLookupError:
        pass
"""

FAKE_BSUB = r"""#!/usr/bin/env python3
# bsub stand-in: the script comes on stdin (bsub < script); one copy per array index
import os, re, subprocess, sys, tempfile
text = sys.stdin.read()
m = re.search(r"#BSUB -J \S+\[1-(\d+)\]", text)
jobs = os.environ["FAKE_BATCH_DIR"]
job = str(len(os.listdir(jobs)) + 200)
path = os.path.join(jobs, "script-" + job)
open(path, "w").write(text)
open(os.path.join(jobs, "stdout-direct-" + job), "w").write(os.environ.get("LSB_STDOUT_DIRECT", ""))
pids = [subprocess.Popen(["/bin/sh", path], env=dict(os.environ, LSB_JOBINDEX=str(i)),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        start_new_session=True).pid for i in range(1, int(m.group(1)) + 1)]
open(os.path.join(jobs, job), "w").write(" ".join(map(str, pids)))
print(f"Job <{job}> is submitted to default queue <normal>.")
"""


FAKE_SBATCH = r"""#!/usr/bin/env python3
# sbatch stand-in: records the job (state RUNNING); runs nothing
import os, sys
jobs = os.environ["FAKE_BATCH_DIR"]
open(os.path.join(jobs, "77.state"), "w").write("RUNNING")
print("Submitted batch job 77")
"""

FAKE_SQUEUE = r"""#!/usr/bin/env python3
# squeue -h -o %T -j ID stand-in: "down" when the controller is unreachable; the job is only
# known to callers whose environment has FAKE_SLURM_TOKEN (as a SLURM_CONF would select it)
import os, sys
jobs = os.environ["FAKE_BATCH_DIR"]
if os.path.exists(os.path.join(jobs, "squeue-down")):
    sys.exit("slurm_load_jobs error: Unable to contact slurm controller (connect failure)")
state = os.path.join(jobs, sys.argv[-1] + ".state")
if not os.environ.get("FAKE_SLURM_TOKEN") or not os.path.exists(state):
    sys.exit("slurm_load_jobs error: Invalid job id specified")
print(open(state).read())
"""

FAKE_SCANCEL = r"""#!/usr/bin/env python3
import os, sys
jobs = os.environ["FAKE_BATCH_DIR"]
token = " token" if os.environ.get("FAKE_SLURM_TOKEN") else ""
with open(os.path.join(jobs, "scancel.log"), "a") as f:
    f.write(" ".join(["scancel", *sys.argv[1:]]) + token + "\n")
open(os.path.join(jobs, sys.argv[-1] + ".state"), "w").write("CANCELLED")
"""


@pytest.fixture
def fake_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A bin directory with the stand-in commands first on PATH; job records in a sibling."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (
        ("qsub", FAKE_QSUB),
        ("qdel", FAKE_DEL),
        ("qsig", FAKE_DEL),
        ("bsub", FAKE_BSUB),
        ("bkill", FAKE_DEL),
        ("sbatch", FAKE_SBATCH),
        ("squeue", FAKE_SQUEUE),
        ("scancel", FAKE_SCANCEL),
    ):
        f = bin_dir / name
        f.write_text(text.replace("/usr/bin/env python3", sys.executable))
        f.chmod(0o755)
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_BATCH_DIR", str(jobs))
    return jobs


def _job_pids(jobs: Path, job_id: str) -> list[int]:
    return [int(p) for p in (jobs / job_id).read_text().split()]


def _sleep_after_flag(path: str) -> None:
    import os
    import time

    with open(f"{path}.{os.getpid()}", "w"):  # started
        pass
    time.sleep(30)


def _running_sleeps(rc: Any, tmp_path: Path, n: int) -> Any:
    """A 30 s sleep on every engine, once each has started it (then a signal interrupts it)."""
    flag = tmp_path / "started"
    ar = rc[:].apply_async(_sleep_after_flag, str(flag))
    wait_until(lambda: len(list(tmp_path.glob("started.*"))) >= n, timeout=SHORT, what="the sleeps")
    return ar


def test_pbs_engines_through_qsub_and_qdel(fake_batch: Path, tmp_path: Path) -> None:
    cluster = Cluster(n=2, engines="pbs", shutdown_atexit=False)
    rc = cluster.start_and_connect_sync()
    try:
        es = cluster.engine_set
        assert es is not None and es.kind == "pbs" and es.job_id == "100"  # "100.fakeserver"
        ids = rc[:].apply_sync(lambda: os.environ["PBS_ARRAYID"])
        assert sorted(ids) == ["1", "2"]  # one engine per array index
        pids = _job_pids(fake_batch, "100")
        # SIGINT through qsig reaches the engines: the running task is interrupted
        ar = _running_sleeps(rc, tmp_path, 2)
        cluster.signal_engines_sync(signal.SIGINT)
        with pytest.raises(RemoteError, match="KeyboardInterrupt"):
            ar.get(timeout=SHORT)
        assert len(rc[:].apply_sync(os.getpid)) == 2
    finally:
        rc.close()
        cluster.stop_cluster_sync()
    for pid in pids:
        wait_until(lambda p=pid: not pid_running(p), timeout=SHORT, what=f"job process {pid}")
    assert not es.running and es.batch_file is not None and not es.batch_file.exists()


def test_lsf_script_goes_on_stdin(fake_batch: Path, tmp_path: Path) -> None:
    es = _launcher(LSFEngineSetLauncher, tmp_path, n=2)
    es.cmd = [sys.executable, "-c", "import time; time.sleep(60)"]
    es.start()
    try:
        assert es.job_id == "200"
        assert "#BSUB -J ipengine-cid[1-2]" in (fake_batch / "script-200").read_text()
        assert (fake_batch / "stdout-direct-200").read_text() == "Y"  # LSB_STDOUT_DIRECT
        pids = _job_pids(fake_batch, "200")
        assert all(pid_running(p) for p in pids)
    finally:
        es.stop_now(5.0)
    for pid in pids:
        wait_until(lambda p=pid: not pid_running(p), timeout=SHORT, what=f"job process {pid}")


def test_job_states_commands_environment_and_output(fake_batch: Path, tmp_path: Path) -> None:
    """(stand-in Slurm commands) Every batch command runs with the launcher's environment; a
    state command that fails (the batch system unreachable) leaves the job running, so stop
    still cancels it; an output file the user chose is theirs to keep."""
    out = tmp_path / "mine.log"
    es = _launcher(SlurmEngineSetLauncher, tmp_path, output_file=str(out))
    es.env = {**os.environ, "FAKE_SLURM_TOKEN": "yes"}  # (only the launcher's env has it)
    es.start()
    out.write_text("the job's output\n")
    assert es.job_id == "77" and es.job_state() == "RUNNING"
    assert es.running and es.failure() is None
    (fake_batch / "squeue-down").touch()
    es._state = (es._state[0] - 10, es._state[1])  # (expired: asked again)
    assert es.job_state() == "RUNNING"  # the last known state, not "ended"
    assert es.running and es.failure() is None
    es.signal(signal.SIGINT)
    es.stop_now(0.5)
    calls = (fake_batch / "scancel.log").read_text().splitlines()
    assert calls == ["scancel -s INT 77 token", "scancel 77 token"]
    assert not es.running
    assert out.read_text() == "the job's output\n"  # (a default output file would go)
    (fake_batch / "squeue-down").unlink()
    es._stopped, es._state = False, None
    assert es.failure() is not None and "ended" in es.failure()  # CANCELLED: ended


def test_submit_failure_and_unparsable_output_are_launcher_errors(
    fake_batch: Path, tmp_path: Path
) -> None:
    es = _launcher(PBSEngineSetLauncher, tmp_path, submit_command=["false"])
    with pytest.raises(LauncherError, match=r"false .*pbs_engines failed \(exit 1\)"):
        es.start()
    es = _launcher(PBSEngineSetLauncher, tmp_path, submit_command=["true"])
    with pytest.raises(LauncherError, match="no job id in the output of true"):
        es.start()


# -- real Slurm ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSlurm]:
    missing = slurm_missing()
    if missing:
        pytest.skip(f"{missing} is not installed (apt-get install slurmctld slurmd slurm-client)")
    s = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    s.start()
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(s.conf)
    try:
        yield s
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        s.stop()


def _no_jobs(slurm: LocalSlurm) -> bool:
    return not [j for j in slurm.jobs() if "RUNNING" in j or "PENDING" in j or "COMPLET" in j]


def test_slurm_engines_are_the_tasks_of_one_job(slurm: LocalSlurm, tmp_path: Path) -> None:
    cluster = Cluster(n=3, engines="slurm", shutdown_atexit=False)
    rc = cluster.start_and_connect_sync()
    try:
        es = cluster.engine_set
        assert isinstance(es, SlurmEngineSetLauncher) and es.running
        env = rc[:].apply_sync(lambda: (os.environ["SLURM_JOB_ID"], os.environ["SLURM_PROCID"]))
        assert {job for job, _ in env} == {es.job_id}
        assert sorted(rank for _, rank in env) == ["0", "1", "2"]
        assert "#SBATCH --ntasks=3" in es.batch_file.read_text()
        assert any(j.startswith(f"{es.job_id} RUNNING") for j in slurm.jobs())
        # Ctrl-C for the engines goes through scancel -s INT
        ar = _running_sleeps(rc, tmp_path, 3)
        cluster.signal_engines_sync(signal.SIGINT)
        with pytest.raises(RemoteError, match="KeyboardInterrupt"):
            ar.get(timeout=SHORT)
        assert len(rc[:].apply_sync(os.getpid)) == 3
        # restart: a new job with as many engines
        old_job, old_ids = es.job_id, set(rc.ids)
        cluster.restart_engines_sync()
        assert es.job_id != old_job
        wait_until(
            lambda: len(rc.ids) == 3 and not old_ids & set(rc.ids),
            timeout=SHORT,
            what="the new job's engines to replace the old ones",
        )
        output = Path(es.output_file)
    finally:
        rc.close()
        cluster.stop_cluster_sync()
    wait_until(lambda: _no_jobs(slurm), timeout=SHORT, what="the job to end")
    assert not output.exists()  # stopped by us: its output goes, as local engines' logs do


def test_slurm_controller_and_engines_stopped_by_another_process(slurm: LocalSlurm) -> None:
    cfg = Config()
    cfg.SlurmLauncher.queue = "debug"
    cfg.SlurmEngineSetLauncher.queue = "other"  # the more specific section wins
    cfg.SlurmEngineSetLauncher.timelimit = "10:00"
    cluster = Cluster(n=2, engines="slurm", controller="slurm", config=cfg, shutdown_atexit=False)
    rc = cluster.start_and_connect_sync()
    try:
        assert rc[:].apply_sync(lambda: os.environ["SLURM_JOB_PARTITION"]) == ["other"] * 2
        ctl = cluster.controller
        assert isinstance(ctl, SlurmControllerLauncher)
        script = cluster.engine_set.batch_file.read_text()
        assert "#SBATCH --partition=other" in script and "#SBATCH --time=10:00" in script
        listed = subprocess.run(
            [sys.executable, "-m", "ferroparallel", "cluster", "list"],
            capture_output=True,
            text=True,
            timeout=SHORT,
        )
        assert cluster.cluster_id in listed.stdout
    finally:
        rc.close()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ferroparallel",
            "cluster",
            "stop",
            "--cluster-id",
            cluster.cluster_id,
        ],
        capture_output=True,
        text=True,
        timeout=SHORT,
    )
    assert done.returncode == 0, done.stderr
    wait_until(lambda: _no_jobs(slurm), timeout=SHORT, what="both jobs to end")
    assert not cluster.client_file.exists()
    assert not Path(cluster.cluster_file).exists()


def test_cli_with_slurm_controller_engines_and_more_engines(slurm: LocalSlurm) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cluster_cli(*args, "--cluster-id", "cli", timeout=SHORT * 2)

    r = cli("start", "-n", "1", "--engines", "slurm", "--controller", "slurm", "--daemonize")
    try:
        assert r.returncode == 0, r.stderr
        assert "controller slurm job" in r.stdout and "1 registered" in r.stdout
        # more engines: as the cluster's were started (recorded in its file), i.e. a job
        r = cli("engines", "-n", "1", "--daemonize")
        assert r.returncode == 0, r.stderr
        names = [j.split()[2] for j in slurm.jobs() if " RUNNING " in j]
        assert sorted(n.split("-")[0] for n in names) == ["ipcontroller", "ipengine", "ipengine"]
    finally:
        r = cli("stop")
    assert r.returncode == 0, r.stderr
    wait_until(lambda: _no_jobs(slurm), timeout=SHORT, what="the jobs to end")


def test_slurm_rejection_and_failing_engines_are_clear(slurm: LocalSlurm) -> None:
    cluster = Cluster(n=1, engines="slurm", shutdown_atexit=False)
    cluster.start_controller_sync()
    try:
        with pytest.raises(LauncherError, match="sbatch.*(?i:partition)"):
            cluster.start_engines_sync(queue="no-such-partition")
        # engines that die at once: the job's end is reported with its output, not a timeout
        cluster.engine_cmd = [sys.executable, "-c", "import sys; sys.exit('engine broke')"]
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="(?s)slurm job .* ended.*engine broke"):
            cluster.start_and_connect_sync()
        assert time.monotonic() - t0 < SHORT
    finally:
        cluster.stop_cluster_sync()
    wait_until(lambda: _no_jobs(slurm), timeout=SHORT, what="the jobs to end")


def test_a_job_left_pending_times_out_with_its_reason(slurm: LocalSlurm) -> None:
    cfg = Config()
    cfg.SlurmEngineSetLauncher.options = "--begin=now+3600"  # (held in the queue)
    cluster = Cluster(n=1, engines="slurm", engine_timeout=3, config=cfg, shutdown_atexit=False)
    try:
        with pytest.raises(TimeoutError, match=r"state PENDING \(reason: BeginTime\)"):
            cluster.start_and_connect_sync()
    finally:
        cluster.stop_cluster_sync()
    wait_until(lambda: _no_jobs(slurm), timeout=SHORT, what="the job to be cancelled")


def test_interpreter_exit_cancels_the_job(slurm: LocalSlurm, tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import ferroparallel as ipp
        c = ipp.Cluster(n=1, engines="slurm")
        rc = c.start_and_connect_sync()
        print(c.engine_set.job_id, flush=True)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=SHORT * 2
    )
    assert done.returncode == 0, done.stderr
    job = done.stdout.split()[-1]
    assert not any(j.startswith(f"{job} RUNNING") for j in slurm.jobs())
    wait_until(lambda: _no_jobs(slurm), timeout=SHORT, what="the job to end")
