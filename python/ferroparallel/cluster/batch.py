"""Engines and controllers started as batch jobs: Slurm, PBS, SGE, LSF, HTCondor, or any
batch system through a template (``Cluster(engines="slurm")``, ``--engines slurm``), with
ipyparallel's launcher names and settings (``c.SlurmEngineSetLauncher.queue = "debug"``, ...).

A launcher writes a batch script from a template (its system's default, ``batch_template``, or
``batch_template_file``), submits it with the system's submit command (``sbatch``, ``qsub``,
``bsub``, ``condor_submit``), reads the job id from that command's output, and ends the job with
the delete command (``scancel``, ``qdel``, ``bkill``, ``condor_rm``). The engines of a set are the
tasks of one job (Slurm: ``--ntasks=N`` and ``srun``; PBS/SGE/LSF: a job array of N; HTCondor:
``queue N``). The job inherits the submitting environment (``--export=ALL``, ``-V``,
``-env all``), which carries the connection info (``IPP_CONNECTION_INFO``) to the engines; a
shared file system is assumed for the profile directory, as in ipyparallel.

Templates are formatted with :meth:`str.format` over the context: ``n``, ``queue``,
``profile_dir``, ``cluster_id``, ``output_file``, ``program``, ``program_args``,
``program_and_args``, ``environment_json``, ``account``/``qos``/``timelimit``/``options``
(Slurm), and the ``namespace`` setting; a field may also be an expression of those names
(``{n // 4}``), as ipyparallel allows.

Only Slurm reports job states here (``squeue``): other systems' jobs count as running from
submission until stopped, as in ipyparallel, whose batch launchers do not poll either.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import string
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import paths
from ..error import ConnectionFileError
from .launchers import LauncherError, LocalControllerLauncher, LocalEngineSetLauncher, _log_name

log = logging.getLogger("ferroparallel.cluster")

__all__ = [
    "BATCH_SYSTEMS",
    "BatchControllerLauncher",
    "BatchEngineSetLauncher",
    "BatchSystem",
    "batch_system_of",
    "controller_launcher",
    "engine_launcher",
]

#: Seconds a job state read with the state command stays valid.
_STATE_TTL = 1.0
#: Job states (Slurm's names) of a job that has ended; any other state may still run.
_ENDED_STATES = frozenset(
    (
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "REVOKED",
        "SPECIAL_EXIT",
        "TIMEOUT",
    )
)


def _ended(state: str | None) -> bool:
    """Whether a :meth:`_BatchJob.job_state` answer means the job has ended."""
    return state is not None and (state == "" or state in _ENDED_STATES)


@dataclass(frozen=True)
class BatchSystem:
    """What differs between batch systems: commands, default templates and the directives a
    launcher adds to a default template."""

    name: str
    submit_command: tuple[str, ...] = ()
    delete_command: tuple[str, ...] = ()
    signal_command: tuple[str, ...] = ()
    #: Reads a job's state (job id appended), one word out; empty: states are not polled.
    state_command: tuple[str, ...] = ()
    #: what the state command says of a job the system no longer knows (it ended long ago)
    unknown_job: str = ""
    #: why a job waits (job id appended), e.g. ``Resources``; empty: not asked
    reason_command: tuple[str, ...] = ()
    job_id_regexp: str = r"\d+"
    job_id_regexp_group: int = 0
    engine_template: str = ""
    controller_template: str = ""
    engine_file_name: str = "batch_engines"
    controller_file_name: str = "batch_controller"
    #: (regexp found in a template when it already sets the option, directive to add)
    job_array: tuple[str, str] = ("", "")
    queue: tuple[str, str] = ("", "")
    output: tuple[str, str] = ("", "")
    #: further options by name (Slurm's account, qos, timelimit, options)
    extra: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    #: the directives go at the end of the script (HTCondor's ``queue N``), not after line 1
    array_at_end: bool = False
    #: the script is given on standard input (``bsub < script``), not as an argument
    script_on_stdin: bool = False
    #: extra environment of the submit command
    submit_env: Mapping[str, str] = field(default_factory=dict)
    #: the program and its arguments are written for HTCondor's submit file, not a shell
    condor_syntax: bool = False
    #: what to install (or set) when the submit command is missing
    install_hint: str = ""


_PBS_ENGINES = "#!/bin/sh\n#PBS -V\n#PBS -N ipengine-{cluster_id}\n{program_and_args}\n"
_PBS_CONTROLLER = "#!/bin/sh\n#PBS -V\n#PBS -N ipcontroller-{cluster_id}\n{program_and_args}\n"
_SGE_ENGINES = "#$ -V\n#$ -S /bin/sh\n#$ -N ipengine-{cluster_id}\n{program_and_args}\n"
_SGE_CONTROLLER = "#$ -V\n#$ -S /bin/sh\n#$ -N ipcontroller-{cluster_id}\n{program_and_args}\n"

_PBS = BatchSystem(
    "pbs",
    submit_command=("qsub",),
    delete_command=("qdel",),
    signal_command=("qsig", "-s"),
    engine_template=_PBS_ENGINES,
    controller_template=_PBS_CONTROLLER,
    engine_file_name="pbs_engines",
    controller_file_name="pbs_controller",
    job_array=(r"#PBS\s+-t\b", "#PBS -t 1-{n}"),
    queue=(r"#PBS\s+-q\b", "#PBS -q {queue}"),
    output=(r"#PBS\s+-o\b", "#PBS -j oe\n#PBS -o {output_file}"),
    install_hint="PBS/Torque's client commands (qsub, qdel, qsig)",
)

BATCH_SYSTEMS: dict[str, BatchSystem] = {
    "slurm": BatchSystem(
        "slurm",
        submit_command=("sbatch",),
        delete_command=("scancel",),
        signal_command=("scancel", "-s"),
        state_command=("squeue", "-h", "-o", "%T", "-j"),
        unknown_job="Invalid job id",
        reason_command=("squeue", "-h", "-o", "%r", "-j"),
        engine_template=(
            "#!/bin/sh\n#SBATCH --export=ALL\n#SBATCH --job-name=ipengine-{cluster_id}\n"
            "srun {program_and_args}\n"
        ),
        controller_template=(
            "#!/bin/sh\n#SBATCH --export=ALL\n#SBATCH --job-name=ipcontroller-{cluster_id}\n"
            "#SBATCH --ntasks=1\n{program_and_args}\n"
        ),
        engine_file_name="slurm_engine.sbatch",
        controller_file_name="slurm_controller.sbatch",
        job_array=(r"#SBATCH\s+(--ntasks|-n)\b", "#SBATCH --ntasks={n}"),
        queue=(r"#SBATCH\s+(--partition|-p)\b", "#SBATCH --partition={queue}"),
        output=(r"#SBATCH\s+(--output|-o)\b", "#SBATCH --output={output_file}"),
        extra={
            "account": (r"#SBATCH\s+(--account|-A)\b", "#SBATCH --account={account}"),
            "qos": (r"#SBATCH\s+--qos\b", "#SBATCH --qos={qos}"),
            "timelimit": (r"#SBATCH\s+(--time|-t)\b", "#SBATCH --time={timelimit}"),
            "options": (r"(?!)", "#SBATCH {options}"),
        },
        install_hint="Slurm's client commands (sbatch, scancel, squeue)",
    ),
    "pbs": _PBS,
    # Grid Engine: PBS's commands, its own directives
    "sge": replace(
        _PBS,
        name="sge",
        engine_template=_SGE_ENGINES,
        controller_template=_SGE_CONTROLLER,
        engine_file_name="sge_engines",
        controller_file_name="sge_controller",
        job_array=(r"#\$\s+-t\b", "#$ -t 1-{n}"),
        queue=(r"#\$\s+-q\b", "#$ -q {queue}"),
        output=(r"#\$\s+-o\b", "#$ -j y\n#$ -o {output_file}"),
        install_hint="Grid Engine's client commands (qsub, qdel)",
    ),
    "lsf": BatchSystem(
        "lsf",
        submit_command=("bsub",),
        delete_command=("bkill",),
        signal_command=("bkill", "-s"),
        engine_template=(
            "#!/bin/sh\n#BSUB -env all\n#BSUB -J ipengine-{cluster_id}[1-{n}]\n{program_and_args}\n"
        ),
        controller_template=(
            "#!/bin/sh\n#BSUB -env all\n#BSUB -J ipcontroller-{cluster_id}\n{program_and_args}\n"
        ),
        engine_file_name="lsf_engines",
        controller_file_name="lsf_controller",
        job_array=(r"#BSUB\s+-J\s+\S+\[\d+-", "#BSUB -J ipengine[1-{n}]"),
        queue=(r"#BSUB\s+-q\b", "#BSUB -q {queue}"),
        output=(r"#BSUB\s+-oo?\b", "#BSUB -o {output_file}\n#BSUB -e {output_file}"),
        script_on_stdin=True,
        submit_env={"LSB_STDOUT_DIRECT": "Y"},
        install_hint="LSF's client commands (bsub, bkill)",
    ),
    "htcondor": BatchSystem(
        "htcondor",
        submit_command=("condor_submit",),
        delete_command=("condor_rm",),
        signal_command=(),
        job_id_regexp=r"(\d+)\.$",
        job_id_regexp_group=1,
        engine_template=(
            "universe = vanilla\nexecutable = {executable}\ntransfer_executable = False\n"
            'getenv = True\narguments = "{executable_args}"\n'
        ),
        controller_template=(
            "universe = vanilla\nexecutable = {executable}\ntransfer_executable = False\n"
            'getenv = True\narguments = "{executable_args}"\n'
        ),
        engine_file_name="htcondor_engines",
        controller_file_name="htcondor_controller",
        job_array=(r"^queue\b", "queue {n}"),
        output=(r"^output\s*=", "output = {output_file}\nerror = {output_file}"),
        array_at_end=True,
        condor_syntax=True,
        install_hint="HTCondor's client commands (condor_submit, condor_rm)",
    ),
    # any other system: every command and the template come from the settings
    "batch": BatchSystem("batch", install_hint="the submit command set in submit_command"),
}

#: Launcher names (lower case) that mean each system, as ipyparallel spells them.
_NAME_SUFFIXES = ("", "launcher", "enginesetlauncher", "engineset", "controllerlauncher")


def batch_system_of(name: str) -> str | None:
    """The batch system (a key of :data:`BATCH_SYSTEMS`) a launcher name means, or None.

    ``"slurm"``, ``"Slurm"``, ``"SlurmEngineSetLauncher"``,
    ``"ipyparallel.cluster.launcher.SlurmEngineSetLauncher"`` all mean ``"slurm"``;
    ``"BatchSystemLauncher"`` means the generic ``"batch"``.
    """
    short = name.rsplit(".", 1)[-1].lower()
    if short in ("batchsystemlauncher", "batchsystem"):
        return "batch"
    for system in BATCH_SYSTEMS:
        if any(short == system + suffix for suffix in _NAME_SUFFIXES):
            return system
    return None


#: Settings of every batch launcher (keyword arguments, or ipyparallel's config sections).
COMMON_OPTIONS = (
    "queue",
    "batch_template",
    "batch_template_file",
    "batch_file_name",
    "namespace",
    "submit_command",
    "delete_command",
    "signal_command",
    "job_id_regexp",
    "job_id_regexp_group",
    "output_file",
)


def option_names(system: str) -> tuple[str, ...]:
    """The settings a launcher of ``system`` takes."""
    return COMMON_OPTIONS + tuple(BATCH_SYSTEMS[system].extra)


def config_sections(system: str, role: str) -> tuple[str, ...]:
    """ipyparallel's config sections for a launcher of ``system`` and ``role`` ("Engine" or
    "Controller"), later ones winning: ``BatchSystemLauncher``, ``SlurmLauncher``,
    ``SlurmEngineSetLauncher``."""
    cls = {"slurm": "Slurm", "pbs": "PBS", "sge": "SGE", "lsf": "LSF", "htcondor": "HTCondor"}
    middle = "EngineSet" if role == "Engine" else "Controller"
    if system == "batch":
        return ("BatchSystemLauncher", f"Batch{middle}Launcher")
    prefix = cls[system]
    # (ipyparallel's SGE launchers are PBS launchers: c.PBSLauncher applies to them too)
    parents = ("PBSLauncher",) if system == "sge" else ()
    return (
        "BatchSystemLauncher",
        f"Batch{middle}Launcher",
        *parents,
        f"{prefix}Launcher",
        f"{prefix}{middle}Launcher",
    )


class _Formatter(string.Formatter):
    """``str.format`` whose fields may be expressions of the context's names (``{n // 4}``)."""

    def get_field(self, field_name: str, args: Any, kwargs: Any) -> Any:
        if field_name.isidentifier():
            if field_name not in kwargs:
                raise LauncherError(
                    f"the batch template uses {{{field_name}}}, which is not defined; "
                    f"known names: {', '.join(sorted(kwargs))} (add more with the "
                    "launcher's namespace setting)"
                )
            return kwargs[field_name], field_name
        try:
            code = compile(field_name, "<batch template>", "eval")
            return eval(code, {"__builtins__": {}}, dict(kwargs)), field_name
        except Exception as e:
            raise LauncherError(f"the batch template field {{{field_name}}} failed: {e}") from e


class _BatchJob:
    """Submission, state and deletion of one batch job (shared by the engine and controller
    launchers)."""

    role = "engines"

    def _init_batch(self, system: str, options: Mapping[str, Any]) -> None:
        spec = BATCH_SYSTEMS[system]
        unknown = sorted(set(options) - set(option_names(system)))
        if unknown:
            raise TypeError(
                f"unexpected settings for the {system} launcher: {', '.join(unknown)}; "
                f"known: {', '.join(option_names(system))}"
            )
        self.system = system
        self.spec = spec
        o = dict(options)
        self.queue = str(o.pop("queue", "") or "")
        self.batch_template = str(o.pop("batch_template", "") or "")
        self.batch_template_file = str(o.pop("batch_template_file", "") or "")
        if self.batch_template_file and not self.batch_template:
            # read once (as ipyparallel): a restart or another process needs neither the
            # file nor the working directory it was named from
            try:
                self.batch_template = Path(self.batch_template_file).read_text()
            except OSError as e:
                raise LauncherError(f"cannot read batch_template_file: {e}") from e
        default_name = (
            spec.engine_file_name if self.role == "engines" else spec.controller_file_name
        )
        self.batch_file_name = str(o.pop("batch_file_name", "") or default_name)
        self.namespace = dict(o.pop("namespace", None) or {})
        self.submit_command = _command(o.pop("submit_command", None), spec.submit_command)
        self.delete_command = _command(o.pop("delete_command", None), spec.delete_command)
        self.signal_command = _command(o.pop("signal_command", None), spec.signal_command)
        self.job_id_regexp = str(o.pop("job_id_regexp", None) or spec.job_id_regexp)
        group = o.pop("job_id_regexp_group", None)
        self.job_id_regexp_group = spec.job_id_regexp_group if group is None else int(group)
        self.output_file = str(o.pop("output_file", "") or "")
        #: the output file is ours (made up here), not one the user chose: removed on stop
        self.own_output = False
        self.extra = {k: o.pop(k) for k in list(o) if k in spec.extra}
        self.job_id: str | None = None
        self.batch_file: Path | None = None
        self._state: tuple[float, str] | None = None
        self._stopped = False

    # -- the script -----------------------------------------------------------------------------

    def _program(self) -> tuple[list[str], list[str]]:
        """The command (``python -m ferroparallel.engine``) and its arguments."""
        raise NotImplementedError

    def _n(self) -> int:
        return 1

    def _job_name_parts(self) -> tuple[str, ...]:
        """What tells this launcher's files from those of its cluster's other launchers."""
        return ()

    def _default_output(self, profile_dir: Path, cluster_id: str) -> str:
        prefix = "ipengine" if self.role == "engines" else "ipcontroller"
        name = _log_name(prefix, cluster_id, *self._job_name_parts(), self.system)
        return str(paths.log_dir(profile_dir) / name)

    def render(self, profile_dir: Path, cluster_id: str, env: Mapping[str, str]) -> str:
        """The batch script (the template with the launcher's directives and context)."""
        spec = self.spec
        if self.batch_template:
            template, add = self.batch_template, False
        else:
            template = spec.engine_template if self.role == "engines" else spec.controller_template
            add = True
        if not template:
            raise LauncherError(
                f"the {self.system} launcher needs a batch script: set batch_template or "
                "batch_template_file (and submit_command, delete_command)"
            )
        if add:  # the directives of the settings given (a user's own template is left as is)
            template = self._with_directives(template)
        command, arguments = self._program()
        program = [*command, *arguments]
        executable_args = _condor_args if spec.condor_syntax else shlex.join
        context: dict[str, Any] = {
            "n": self._n(),
            "queue": self.queue,
            "profile_dir": str(profile_dir),
            "cluster_id": cluster_id,
            "output_file": self.output_file,
            # as ipyparallel's: the command, its arguments, both (shell-quoted)
            "program": shlex.join(command),
            "program_args": shlex.join(arguments),
            "program_and_args": shlex.join(program),
            # one executable and the rest (HTCondor's submit files quote arguments their way)
            "executable": program[0],
            "executable_args": executable_args(program[1:]),
            "environment_json": json.dumps(dict(env)),
            **{k: "" for k in spec.extra},
            **self.extra,
            **self.namespace,
        }
        return _Formatter().format(template, **context)

    def _with_directives(self, template: str) -> str:
        spec = self.spec
        adds: list[str] = []
        wanted = [
            (spec.queue, self.queue),
            (spec.output, self.output_file),
            *((spec.extra[k], v) for k, v in self.extra.items()),
        ]
        for (pattern, directive), value in wanted:
            if value and directive and not re.search(pattern, template, re.M):
                adds.append(directive)
        pattern, directive = spec.job_array
        if self.role == "engines" and directive and not re.search(pattern, template, re.M):
            adds.append(directive)
        if not adds:
            return template
        if spec.array_at_end:
            return template.rstrip("\n") + "\n" + "\n".join(adds) + "\n"
        first, _, rest = template.partition("\n")
        if not first.startswith("#!"):  # no interpreter line: the directives go first
            return "\n".join(adds) + "\n" + template
        return "\n".join([first, *adds, rest])

    # -- the job --------------------------------------------------------------------------------

    def _run(
        self, cmd: Sequence[str], env: Mapping[str, str] | None = None, stdin: Any = None
    ) -> str:
        if not cmd or not cmd[0]:
            raise LauncherError(f"the {self.system} launcher has no command for this; set it")
        if shutil.which(cmd[0], path=(env or os.environ).get("PATH")) is None:
            raise FileNotFoundError(
                f"{cmd[0]!r} not found: the {self.system} launcher needs "
                f"{self.spec.install_hint} on PATH, or set the launcher's command settings"
            )
        try:
            done = subprocess.run(
                list(cmd),
                env=dict(env) if env is not None else None,
                stdin=stdin if stdin is not None else subprocess.DEVNULL,
                capture_output=True,
                timeout=60,
            )
        except subprocess.TimeoutExpired as e:
            raise LauncherError(f"{shlex.join(cmd)} did not finish within 60 s") from e
        out = done.stdout.decode("utf-8", "replace")
        if done.returncode != 0:
            err = done.stderr.decode("utf-8", "replace").strip() or out.strip()
            raise LauncherError(f"{shlex.join(cmd)} failed (exit {done.returncode}): {err}")
        return out

    def submit(self, profile_dir: Path, cluster_id: str, env: Mapping[str, str]) -> str:
        """Write the script (``<profile_dir>/batch/``) and submit it; returns the job id."""
        if self.job_id is not None and self.running:
            raise RuntimeError(f"{self.system} job {self.job_id} is already running")
        if not self.output_file or self.own_output:
            self.output_file = self._default_output(profile_dir, cluster_id)
            self.own_output = True
        Path(self.output_file).parent.mkdir(parents=True, exist_ok=True)
        script = self.render(profile_dir, cluster_id, env)
        work_dir = Path(profile_dir) / "batch"
        work_dir.mkdir(parents=True, exist_ok=True)
        name = "-".join([cluster_id or "default", *self._job_name_parts(), self.batch_file_name])
        self.batch_file = work_dir / name
        with contextlib.suppress(FileNotFoundError):
            self.batch_file.unlink()  # (created anew: private from the start)
        # the script may carry the connection info (environment_json): private from the start
        fd = os.open(self.batch_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
        with os.fdopen(fd, "w") as f:
            f.write(script)
        submit_env = {**env, **self.spec.submit_env}
        try:
            if self.spec.script_on_stdin:
                with open(self.batch_file, "rb") as f:
                    out = self._run(self.submit_command, submit_env, stdin=f)
            else:
                out = self._run([*self.submit_command, str(self.batch_file)], submit_env)
        except BaseException:
            with contextlib.suppress(OSError):
                self.batch_file.unlink()
            raise
        m = re.search(self.job_id_regexp, out, re.M)
        if m is None:
            raise LauncherError(
                f"no job id in the output of {self.submit_command[0]} (job_id_regexp "
                f"{self.job_id_regexp!r}): {out.strip()!r}"
            )
        self.job_id = m.group(self.job_id_regexp_group)
        self._stopped = False
        self._state = None
        return self.job_id

    def _env(self) -> dict[str, str]:
        """The environment of the batch system's commands: the launcher's (e.g. a
        ``SLURM_CONF`` given in ``Cluster(env=...)``), the same for submit, poll and cancel."""
        return dict(getattr(self, "env", None) or os.environ)

    def job_state(self) -> str | None:
        """The job's state word from the state command (e.g. ``RUNNING``; ``""`` once the
        system has forgotten the job), or None when it is not known: this system's states
        are not polled, or the state command failed (the batch system's controller is
        unreachable for a moment: the last known state is kept)."""
        if not self.spec.state_command or self.job_id is None:
            return None
        now = time.monotonic()
        if self._state is not None and now - self._state[0] < _STATE_TTL:
            return self._state[1]
        last = self._state[1] if self._state else None
        cmd = [*self.spec.state_command, self.job_id]
        try:
            done = subprocess.run(
                cmd, capture_output=True, timeout=30, stdin=subprocess.DEVNULL, env=self._env()
            )
        except (OSError, subprocess.TimeoutExpired):
            return last
        if done.returncode == 0:
            state: str | None = done.stdout.decode("utf-8", "replace").strip().split("\n")[0]
            state = state.strip()
        elif self.spec.unknown_job and self.spec.unknown_job in done.stderr.decode(
            errors="replace"
        ):
            state = ""
        else:
            log.debug("%s failed: %s", cmd[0], done.stderr.decode(errors="replace").strip())
            return last
        self._state = (now, state)
        return state

    def shown_state(self) -> str:
        """The job's state for messages: ``state PENDING (reason: Resources)``."""
        state = self.job_state()
        if state is None:
            return "state unknown" if self.spec.state_command else "state not polled"
        if state == "":
            return "ended"
        reason = ""
        if state == "PENDING" and self.spec.reason_command and self.job_id is not None:
            try:
                done = subprocess.run(
                    [*self.spec.reason_command, self.job_id],
                    capture_output=True,
                    timeout=30,
                    stdin=subprocess.DEVNULL,
                    env=self._env(),
                )
                reason = done.stdout.decode(errors="replace").strip() if not done.returncode else ""
            except (OSError, subprocess.TimeoutExpired):
                pass
        return f"state {state}" + (f" (reason: {reason})" if reason else "")

    @property
    def job_running(self) -> bool:
        """True from submission until the job is known to have ended (where states are not
        polled: until it is stopped)."""
        if self.job_id is None or self._stopped:
            return False
        return not _ended(self.job_state())

    def output_tail(self, lines: int = 30) -> str:
        """The last lines of the job's output file."""
        text = self.job_output().rstrip("\n")
        return "\n".join(text.splitlines()[-lines:])

    def ended_early(self) -> str | None:
        """A message when the job ended by itself (it was not stopped), else None."""
        if self.job_id is None or self._stopped or self.job_running:
            return None
        return (
            f"{self.system} job {self.job_id} ({self.role}) ended; output {self.output_file}:\n"
            f"{self.output_tail()}"
        )

    def send_job_signal(self, sig: int) -> None:
        """Signal the job's processes through the batch system."""
        if self.job_id is None or self._stopped:
            return
        if not self.signal_command:
            raise NotImplementedError(f"the {self.system} launcher cannot signal jobs")
        name = signal.Signals(sig).name.removeprefix("SIG")
        self._run([*self.signal_command, name, self.job_id], self._env())

    async def stop_job(self, timeout: float) -> None:
        """Delete the job and wait (up to ``timeout`` s, where states are polled) for it to
        end; its output file goes if the job was still running (it was ended by us)."""
        await asyncio.to_thread(self.stop_job_sync, timeout)

    def stop_job_sync(self, timeout: float) -> None:
        """Blocking :meth:`stop_job`."""
        if self.job_id is None or self._stopped:
            return
        self._state = None  # a fresh read
        ours = not _ended(self.job_state())  # (unknown counts as running: cancel it)
        if ours:
            try:
                self._run([*self.delete_command, self.job_id], self._env())
            except (LauncherError, FileNotFoundError) as e:
                log.warning("could not cancel %s job %s: %s", self.system, self.job_id, e)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                self._state = None
                state = self.job_state()
                if state is None and not self.spec.state_command:
                    break  # (states are not polled here)
                if _ended(state):
                    break
                time.sleep(0.1)
        self._stopped = True
        if self.batch_file is not None:
            with contextlib.suppress(OSError):
                self.batch_file.unlink()
        if ours and self.own_output:  # ended by us: its output goes, as local engines' logs
            self._discard_output()

    def _discard_output(self) -> None:
        self._job_output = self.job_output()
        with contextlib.suppress(OSError):
            Path(self.output_file).unlink()

    def job_output(self) -> str:
        """The text of the job's output file (kept here once the file is removed)."""
        cached = getattr(self, "_job_output", None)
        if cached is not None:
            return cached
        try:
            return Path(self.output_file).read_text(errors="replace") if self.output_file else ""
        except OSError:
            return ""

    def get_output(self, remove: bool = False) -> str:
        """The job's output (as ipyparallel's batch launchers: one file for the whole job).

        Parameters
        ----------
        remove : bool
            Also delete the output file (the text stays available here).
        """
        if remove and self.output_file:
            self._discard_output()
        return self.job_output()

    def job_dict(self) -> dict[str, Any]:
        """The job's state for the cluster file."""
        return {
            "kind": self.system,
            "job_id": self.job_id,
            "stopped": self._stopped,
            "batch_file": str(self.batch_file) if self.batch_file else None,
            "options": {
                "queue": self.queue,
                "batch_template": self.batch_template,
                "batch_template_file": self.batch_template_file,
                "batch_file_name": self.batch_file_name,
                "namespace": self.namespace,
                "submit_command": self.submit_command,
                "delete_command": self.delete_command,
                "signal_command": self.signal_command,
                "job_id_regexp": self.job_id_regexp,
                "job_id_regexp_group": self.job_id_regexp_group,
                "output_file": self.output_file,
                **self.extra,
            },
            "own_output": self.own_output,
        }

    def _load_job(self, d: Mapping[str, Any]) -> None:
        self.job_id = d.get("job_id")
        self._stopped = bool(d.get("stopped"))
        self.own_output = bool(d.get("own_output"))
        self.batch_file = Path(d["batch_file"]) if d.get("batch_file") else None


def _condor_args(args: Sequence[str]) -> str:
    """``args`` in HTCondor's quoted ``arguments = "..."`` syntax (inside the double quotes):
    an argument with spaces or quotes in single quotes, a quote written twice."""
    out = []
    for a in args:
        a = a.replace('"', '""')
        if not a or "'" in a or any(c.isspace() for c in a):
            a = "'" + a.replace("'", "''") + "'"
        out.append(a)
    return " ".join(out)


def _command(value: Any, default: Sequence[str]) -> list[str]:
    if value is None or value == "":
        return list(default)
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


class BatchEngineSetLauncher(_BatchJob, LocalEngineSetLauncher):
    """``n`` engines as the tasks of one batch job.

    Parameters are those of :class:`~.launchers.LocalEngineSetLauncher`, plus ``system`` (a
    key of :data:`BATCH_SYSTEMS`) and the settings of :func:`option_names` as keywords
    (``queue``, ``batch_template``, ``account``, ...).
    """

    role = "engines"
    default_system = "batch"

    def __init__(self, *args: Any, system: str | None = None, **options: Any) -> None:
        base = {
            k: options.pop(k) for k in ("args", "env", "connection_info", "cmd") if k in options
        }
        LocalEngineSetLauncher.__init__(self, *args, **base)
        self._init_batch(system or self.default_system, options)

    @property
    def kind(self) -> str:  # type: ignore[override]
        """The batch system's name (recorded in the cluster file)."""
        return self.system

    def _program(self) -> tuple[list[str], list[str]]:
        full = self.full_cmd()
        return full[: len(self.cmd)], full[len(self.cmd) :]

    def _n(self) -> int:
        return self.n

    def _job_name_parts(self) -> tuple[str, ...]:
        return (self.engine_set_id,)

    @property
    def running(self) -> bool:
        """True while the job may run engines."""
        return self.job_running

    @property
    def pids(self) -> list[int]:
        """Empty: the engines run wherever the batch system puts them."""
        return []

    def start(self) -> list[Any]:
        """Submit the job (without waiting for the engines to register)."""
        if self.running:
            raise RuntimeError(f"engine set {self.engine_set_id!r} is already running")
        self.submit(self.profile_dir, self.cluster_id, self.engine_env())
        self.processes = []
        return []

    @property
    def running_count(self) -> int:
        """``n`` while the job may run, else 0 (the batch system runs the engines)."""
        return self.n if self.running else 0

    def failure(self) -> str | None:
        """Why the set is gone before being stopped, or None."""
        return self.ended_early()

    def log_tails(self, lines: int = 10) -> str:
        """The last lines of the job's output."""
        shown = self.shown_state()
        return f"--- {self.system} job {self.job_id} ({shown}), {self.output_file}:\n" + (
            self.output_tail(lines)
        )

    def signal(self, sig: int) -> None:
        """Signal every engine of the job (through the batch system)."""
        self.send_job_signal(sig)

    async def stop(self, timeout: float = 5.0) -> None:
        """Delete the job (the engines get SIGTERM from the batch system and unregister)."""
        await self.stop_job(timeout)

    def stop_now(self, timeout: float = 5.0) -> None:
        """Blocking :meth:`stop` (interpreter exit)."""
        self.stop_job_sync(timeout)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state."""
        return {**LocalEngineSetLauncher.to_dict(self), **self.job_dict()}

    @classmethod
    def from_dict(
        cls,
        d: Mapping[str, Any],
        profile_dir: str | os.PathLike[str],
        cluster_id: str,
        engine_set_id: str,
    ) -> BatchEngineSetLauncher:
        """Rebuild a launcher (for a job submitted by another process): the base class's
        rebuild, for the launcher class of the recorded system, then the job."""
        kind = ENGINE_LAUNCHERS.get(d.get("kind", ""), cls)
        self = super(BatchEngineSetLauncher, kind).from_dict(
            d, profile_dir, cluster_id, engine_set_id
        )
        assert isinstance(self, BatchEngineSetLauncher)
        self._load_job(d)
        return self

    @classmethod
    def _options_from_dict(cls, d: Mapping[str, Any]) -> dict[str, Any]:
        """The batch settings recorded by :meth:`to_dict`."""
        return _known_options(d)


class BatchControllerLauncher(_BatchJob, LocalControllerLauncher):
    """The controller as a batch job.

    Parameters are those of :class:`~.launchers.LocalControllerLauncher`, plus ``system``
    and the settings of :func:`option_names`. The engines and clients find the controller
    through its connection files in the (shared) profile directory; on a machine other than
    the client's it must listen on an address they reach (``Cluster(controller_ip="*")``).
    """

    role = "controller"
    default_system = "batch"

    def __init__(self, *args: Any, system: str | None = None, **options: Any) -> None:
        base = {k: options.pop(k) for k in ("args", "env", "cmd") if k in options}
        LocalControllerLauncher.__init__(self, *args, **base)
        self._init_batch(system or self.default_system, options)

    @property
    def kind(self) -> str:
        """The batch system's name (recorded in the cluster file)."""
        return self.system

    def _program(self) -> tuple[list[str], list[str]]:
        full = self.full_cmd()
        return full[: len(self.cmd)], full[len(self.cmd) :]

    @property
    def running(self) -> bool:
        """True while the controller's job may run."""
        return self.job_running

    def describe(self) -> str:
        """How the controller runs, for messages (``controller slurm job 12``)."""
        return f"controller {self.system} job {self.job_id}"

    def stopped_cleanly(self) -> bool:
        """Whether the controller's job completed or was cancelled (stopped)."""
        self._state = None
        state = self.job_state()
        return state is None or state in ("", "COMPLETED", "CANCELLED")

    def failure(self) -> str | None:
        """Why the controller is gone before being stopped, or None."""
        ended = self.ended_early()
        return f"the controller's {ended}" if ended else None

    def start(self) -> None:  # type: ignore[override]
        """Submit the controller's job (without waiting for it to be ready)."""
        if self.running:
            raise RuntimeError(f"controller job {self.job_id} already running")
        self.started_at = time.time()
        self.submit(self.profile_dir, self.cluster_id, self.env)

    def _fresh(self, path: Path) -> bool:
        # written after this job's script: both stamped by the (shared) file system's clock,
        # not this machine's and the job's, which may differ
        try:
            written = path.stat().st_mtime
        except FileNotFoundError:
            return False
        try:
            return self.batch_file is None or written >= self.batch_file.stat().st_mtime
        except OSError:
            return super()._fresh(path)

    async def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until the controller has written both connection files (the job may wait in
        the queue first: ``timeout`` counts that too).

        Raises
        ------
        RuntimeError
            The job ended first (the message has its output's tail).
        TimeoutError
            No files after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        files = (self.engine_file, self.client_file)
        while not all(self._fresh(f) for f in files):
            ended = self.failure()
            if ended:
                raise RuntimeError(ended)
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"the controller's {self.system} job {self.job_id} "
                    f"({self.shown_state()}) did not write "
                    f"{self.client_file} within {timeout:g} s; output {self.output_file}:\n"
                    f"{self.output_tail()}"
                )
            await asyncio.sleep(0.05)
        try:
            return paths.load_connection_file(self.engine_file, "engine")
        except ConnectionFileError:
            await asyncio.sleep(0.1)
            return paths.load_connection_file(self.engine_file, "engine")

    async def stop(self, timeout: float = 5.0) -> None:
        """Delete the controller's job; its connection files go if the job was killed."""
        await self.stop_job(timeout)
        self._remove_files()

    def stop_now(self, timeout: float = 5.0) -> None:
        """Blocking :meth:`stop` (interpreter exit)."""
        self.stop_job_sync(timeout)
        self._remove_files()

    def _remove_files(self) -> None:
        if "--reuse" in self.args:
            return
        for f in (self.client_file, self.engine_file):
            with contextlib.suppress(OSError):
                f.unlink()

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state."""
        return {**LocalControllerLauncher.to_dict(self), **self.job_dict()}

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any], profile_dir: str | os.PathLike[str], cluster_id: str
    ) -> BatchControllerLauncher:
        """Rebuild a launcher (for a job submitted by another process)."""
        cls = CONTROLLER_LAUNCHERS.get(d.get("kind", ""), cls)  # type: ignore[assignment]
        self = cls(
            profile_dir,
            cluster_id,
            args=d.get("args") or (),
            cmd=d.get("cmd"),
            **_known_options(d),
        )
        self.started_at = d.get("started_at")
        self._load_job(d)
        return self


def _known_options(d: Mapping[str, Any]) -> dict[str, Any]:
    system = d.get("kind", "batch")
    opts = d.get("options") or {}
    return {k: v for k, v in opts.items() if k in option_names(system)}


def _named(base: type, system: str, name: str) -> Any:
    return type(
        name,
        (base,),
        {
            "default_system": system,
            "__module__": __name__,
            "__doc__": f"{base.__name__} for {system} (ipyparallel's ``{name}``).",
        },
    )


SlurmEngineSetLauncher = _named(BatchEngineSetLauncher, "slurm", "SlurmEngineSetLauncher")
SlurmControllerLauncher = _named(BatchControllerLauncher, "slurm", "SlurmControllerLauncher")
PBSEngineSetLauncher = _named(BatchEngineSetLauncher, "pbs", "PBSEngineSetLauncher")
PBSControllerLauncher = _named(BatchControllerLauncher, "pbs", "PBSControllerLauncher")
SGEEngineSetLauncher = _named(BatchEngineSetLauncher, "sge", "SGEEngineSetLauncher")
SGEControllerLauncher = _named(BatchControllerLauncher, "sge", "SGEControllerLauncher")
LSFEngineSetLauncher = _named(BatchEngineSetLauncher, "lsf", "LSFEngineSetLauncher")
LSFControllerLauncher = _named(BatchControllerLauncher, "lsf", "LSFControllerLauncher")
HTCondorEngineSetLauncher = _named(BatchEngineSetLauncher, "htcondor", "HTCondorEngineSetLauncher")
HTCondorControllerLauncher = _named(
    BatchControllerLauncher, "htcondor", "HTCondorControllerLauncher"
)


ENGINE_LAUNCHERS: dict[str, type[BatchEngineSetLauncher]] = {
    "batch": BatchEngineSetLauncher,
    "slurm": SlurmEngineSetLauncher,
    "pbs": PBSEngineSetLauncher,
    "sge": SGEEngineSetLauncher,
    "lsf": LSFEngineSetLauncher,
    "htcondor": HTCondorEngineSetLauncher,
}
CONTROLLER_LAUNCHERS: dict[str, type[BatchControllerLauncher]] = {
    "batch": BatchControllerLauncher,
    "slurm": SlurmControllerLauncher,
    "pbs": PBSControllerLauncher,
    "sge": SGEControllerLauncher,
    "lsf": LSFControllerLauncher,
    "htcondor": HTCondorControllerLauncher,
}


def engine_launcher(system: str, *args: Any, **kwargs: Any) -> BatchEngineSetLauncher:
    """The engine set launcher of ``system`` (e.g. :class:`SlurmEngineSetLauncher`)."""
    return ENGINE_LAUNCHERS[system](*args, **kwargs)


def controller_launcher(system: str, *args: Any, **kwargs: Any) -> BatchControllerLauncher:
    """The controller launcher of ``system`` (e.g. :class:`SlurmControllerLauncher`)."""
    return CONTROLLER_LAUNCHERS[system](*args, **kwargs)
