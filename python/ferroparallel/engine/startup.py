"""Code an engine runs once registered: ipyparallel's ``IPEngine.startup_script`` and
``IPEngine.startup_command``, read from the profile's ``ipengine_config.py`` (ipyparallel's
file) and then ``ferroparallel_engine_config.py`` (ours, which wins).

::

    c.IPEngine.startup_script = "~/setup_engine.py"   # a file, run first
    c.IPEngine.startup_command = "import numpy as np"  # then this code

Both run in the engine's user namespace, as if pushed there before any request; an error is
logged and the engine serves anyway. Other ``IPEngine`` settings are named in a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import paths
from ..config_files import load_py_config, unused_settings

log = logging.getLogger(__name__)

#: Config files read from the profile directory, in order (later ones win).
CONFIG_FILES = ("ipengine_config.py", "ferroparallel_engine_config.py")
#: The settings used, by name in the ``IPEngine`` section.
_KEYS = ("startup_script", "startup_command")


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


def load_startup(profile_dir: str | Path | None) -> Startup:
    """The startup settings of the config files in ``profile_dir`` (none when it is None or
    has none). A file that cannot be loaded is reported and skipped."""
    startup = Startup()
    if profile_dir is None:
        return startup
    for path in paths.config_files(profile_dir, CONFIG_FILES):
        try:
            cfg = load_py_config(path)
        except ValueError as e:  # the user's file: report, serve anyway
            log.error("%s", e)
            continue
        section = cfg.get("IPEngine", {})
        for key in _KEYS:
            if key in section:
                value = section[key]
                setattr(startup, key.removeprefix("startup_"), str(value) if value else None)
        unused = unused_settings({"IPEngine": section}, {("IPEngine", k) for k in _KEYS})
        if unused:
            log.warning("config file %s: settings ferroparallel does not use: %s", path, unused)
    return startup
