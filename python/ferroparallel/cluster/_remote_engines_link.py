"""Run on the remote host by :class:`~.ssh_proxy.SSHProxyEngineSetLauncher` (its source is sent
as ``python -c``, so it imports nothing from ferroparallel and must stay standalone).

``python -c <this> CMD...`` reads one JSON line from stdin, ``{"files": {path: text}}``, writes
those files (mode 0600, their directories created with mode 0700), then runs ``CMD`` (the
remote ``ferroparallel cluster engines ... --stdin-link``) with the rest of stdin as its stdin:

- ``signal N`` lines reach ``CMD`` itself, which signals its engines, and end of stdin (the ssh
  connection is gone) makes it stop them;
- SIGTERM, SIGHUP or SIGINT to this program become SIGTERM to ``CMD`` (which stops its engines);
- once ``CMD`` has exited, the files this run wrote are removed (a file that was already there
  with the same content, such as the controller's own on the same host, is left alone);
- it exits with ``CMD``'s status (``128 + N`` if a signal ``N`` ended it).
"""

import json
import os
import signal
import subprocess
import sys


def _first_line():
    # byte by byte: whatever follows the line stays in the pipe for the child
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(0, 1)
        if not chunk:
            break
        data += chunk
    return data


def _write(path, text):
    """Write ``text`` to ``path`` (0600); whether this run created or changed it."""
    data = text.encode("utf-8")
    try:
        with open(path, "rb") as f:
            if f.read() == data:
                return False
    except OSError:
        pass
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, mode=0o700, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return True


def _main(cmd):
    line = _first_line()
    if not line.strip():
        sys.stderr.write("ferroparallel link: no files line on stdin\n")
        os._exit(2)
    written = []
    code = 1
    try:
        for path, text in json.loads(line)["files"].items():
            if _write(path, text):
                written.append(path)
        child = subprocess.Popen(cmd)

        def forward(signum, frame):
            try:
                child.send_signal(signal.SIGTERM)
            except OSError:
                pass

        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, forward)
        while True:
            try:
                code = child.wait()
                break
            except InterruptedError:  # pragma: no cover - (PEP 475 retries)
                continue
    finally:
        for path in written:
            try:
                os.unlink(path)
            except OSError:
                pass
    try:
        sys.stdout.flush()
    except OSError:
        pass  # (the ssh channel is gone)
    os._exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    _main(sys.argv[1:])
