"""An engine's settings from the profile's config files: ``ipengine_config.py``
(ipyparallel's file) and then ``ferroparallel_engine_config.py`` (ours, which wins).

::

    c.IPEngine.startup_script = "~/setup_engine.py"   # a file, run first
    c.IPEngine.startup_command = "import numpy as np"  # then this code
    c.IPEngine.url_file = "~/ipcontroller-engine.json" # the connection file (ipengine --file)
    c.IPEngine.work_dir = "~/scratch"                  # the engine's working directory

The startup script and command run in the engine's user namespace, as if pushed there before
any request; an error is logged and the engine serves anyway. Also read: ``wait_for_url_file``,
``timeout``, ``max_heartbeat_misses``, ``sshserver`` and ``sshkey`` (the command line wins over
all of them). ipyparallel's old section names ``EngineFactory`` and ``IPEngineApp`` apply where
``IPEngine`` does not set the same name. Other ``IPEngine`` settings are named in a warning.

The settings of the engine's IPython shell apply as on ipyparallel's (ipykernel) engines::

    c.InteractiveShell.colors = "nocolor"   # uncoloured tracebacks
    c.InteractiveShell.xmode = "Plain"      # traceback mode
    c.ZMQInteractiveShell.ast_node_interactivity = "all"

(the sections of :data:`SHELL_SECTIONS`; ``ZMQInteractiveShell``, ipykernel's shell class,
wins over ``InteractiveShell``). ipengine's traitlets command-line options
(``--InteractiveShell.colors=nocolor``, ``--IPEngine.timeout=30``) are read as one more
config file, after the profile's; sections the engine does not use are named in a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import paths
from ..config_files import load_py_config, unused_settings

log = logging.getLogger(__name__)

#: Config files read from the profile directory, in order (later ones win).
CONFIG_FILES = ("ipengine_config.py", "ferroparallel_engine_config.py")
#: The settings used, by name in the ``IPEngine`` section.
_KEYS = ("startup_script", "startup_command")
#: The other settings used: ``IPEngine`` name -> :class:`EngineFileConfig` attribute.
_OPTION_KEYS = {
    "url_file": "url_file",
    "wait_for_url_file": "wait_for_url_file",
    "work_dir": "work_dir",
    "timeout": "timeout",
    "max_heartbeat_misses": "max_missed_pings",
    "sshserver": "sshserver",
    "sshkey": "sshkey",
}
#: ipyparallel's old names of the ``IPEngine`` section (read where ``IPEngine`` is silent).
_DEPRECATED_SECTIONS = ("EngineFactory", "IPEngineApp")
#: Config sections given to the engine's IPython shell: the shell's classes (ipykernel's
#: ``ZMQInteractiveShell`` and its base) and the formatters of its ``execute_result``.
SHELL_SECTIONS = (
    "InteractiveShell",
    "ZMQInteractiveShell",
    "DisplayFormatter",
    "PlainTextFormatter",
)


@dataclass
class Startup:
    """What an engine runs once registered (None: nothing)."""

    script: str | None = None
    command: str | None = None

    def run(self, ns: dict[str, Any]) -> None:
        """Run the script, then the command, in namespace ``ns`` (errors are logged)."""
        if self.script:
            path = Path(self.script).expanduser()
            try:
                code = compile(path.read_text(), str(path), "exec")
                exec(code, ns)  # noqa: S102 - the user's own startup script
                log.info("ran the startup script %s", path)
            except Exception:
                log.exception("the startup script %s failed", path)
        if self.command:
            try:
                exec(compile(self.command, "<startup_command>", "exec"), ns)  # noqa: S102
                log.info("ran the startup command")
            except Exception:
                log.exception("the startup command failed: %r", self.command)


@dataclass
class EngineFileConfig:
    """The engine settings of a profile's config files (None: not set there)."""

    startup: Startup = field(default_factory=Startup)
    url_file: str | None = None
    wait_for_url_file: float | None = None
    work_dir: str | None = None
    timeout: float | None = None
    max_missed_pings: int | None = None
    sshserver: str | None = None
    sshkey: str | None = None
    #: The :data:`SHELL_SECTIONS` settings (a traitlets ``Config``; None: none set).
    shell: Any = None


def _engine_section(cfg: Any) -> dict[str, Any]:
    """``IPEngine``'s settings, with those of its old section names it does not set."""
    section = dict(cfg.get("IPEngine", {}))
    for old in _DEPRECATED_SECTIONS:
        for key, value in cfg.get(old, {}).items():
            section.setdefault(key, value)
    return section


def _coerce(key: str, value: Any) -> Any:
    if key in ("wait_for_url_file", "timeout"):
        return float(value)
    if key == "max_heartbeat_misses":
        return int(value)
    if key in ("url_file", "work_dir", "sshkey"):
        return str(Path(str(value)).expanduser()) if value else None
    return str(value) if value else None


def load_engine_config(
    profile_dir: str | Path | None, command_line: Any = None
) -> EngineFileConfig:
    """The engine settings of the config files in ``profile_dir`` (none when it is None or
    has none), then of ``command_line`` (a traitlets ``Config`` of ``--Class.trait=value``
    options, which wins). A file that cannot be loaded, or a value of the wrong type, is
    reported and skipped."""
    out = EngineFileConfig()
    sources: list[tuple[str, Any]] = []
    for path in paths.config_files(profile_dir, CONFIG_FILES) if profile_dir is not None else ():
        try:
            sources.append((f"config file {path}", load_py_config(path)))
        except ValueError as e:  # the user's file: report, serve anyway
            log.error("%s", e)
    if command_line:
        sources.append(("command line", command_line))
    for source, cfg in sources:
        _read_section(out, _engine_section(cfg), source)
        shell = {name: cfg[name] for name in SHELL_SECTIONS if cfg.get(name)}
        if shell:
            out.shell = _merged(out.shell, shell)
        if source == "command line":  # (files set much else for ipengine: not reported)
            engine_sections = ("IPEngine", *_DEPRECATED_SECTIONS, *SHELL_SECTIONS)
            unused = unused_settings(cfg, set(), skip=set(engine_sections))
            if unused:
                log.warning("command line: options ferroparallel ignores: %s", unused)
    return out


def _read_section(out: EngineFileConfig, section: dict[str, Any], source: str) -> None:
    """Set ``out``'s fields from one source's ``IPEngine`` section (warns of the others)."""
    for key in _KEYS:
        if key in section:
            value = section[key]
            setattr(out.startup, key.removeprefix("startup_"), str(value) if value else None)
    for key, attr in _OPTION_KEYS.items():
        if key in section:
            try:
                setattr(out, attr, _coerce(key, section[key]))
            except (TypeError, ValueError):
                log.error("%s: invalid IPEngine.%s %r", source, key, section[key])
    used = {("IPEngine", k) for k in (*_KEYS, *_OPTION_KEYS)}
    unused = unused_settings({"IPEngine": section}, used)
    if unused:
        log.warning("%s: settings ferroparallel does not use: %s", source, unused)


def _merged(base: Any, update: dict[str, Any]) -> Any:
    """``base`` (a traitlets ``Config`` or None) with the sections of ``update`` over it."""
    from traitlets.config import Config

    out = Config() if base is None else base
    out.merge(Config(update))
    return out


def load_startup(profile_dir: str | Path | None) -> Startup:
    """The startup settings of the config files in ``profile_dir`` (none when it is None or
    has none). A file that cannot be loaded is reported and skipped."""
    return load_engine_config(profile_dir).startup
