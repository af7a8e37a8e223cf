"""Run on the remote host by :class:`~.ssh_controller.SSHControllerLauncher` (its source is
sent as ``python -c``, so it imports nothing from ferroparallel and must stay standalone).

``python -c <this> CLIENT_FILE ENGINE_FILE CMD...`` runs ``CMD`` (the controller) as a child and
links it to the ``ssh`` session, as the engines' stdin link does:

- once both connection files have been written by this run, it prints :data:`READY` on
  stdout (the launcher waits for that line in the ssh log, then fetches the files);
- a ``signal N`` line on stdin sends signal ``N`` to the controller;
- end of stdin (the ssh connection is gone), SIGTERM or SIGHUP stop the controller with SIGTERM;
- it exits with the controller's status (``128 + N`` if a signal ``N`` ended it).
"""

import os
import signal
import subprocess
import sys
import threading
import time

READY = "__ferroparallel_controller_ready__"


def _main(argv):
    started = time.time()
    files, cmd = argv[:2], argv[2:]
    child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)

    def forward(sig):
        try:
            child.send_signal(sig)
        except OSError:
            pass

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, lambda s, f: forward(signal.SIGTERM))

    def ready():
        while child.poll() is None:
            try:
                # (a coarse filesystem clock: a little slack)
                if all(os.stat(f).st_mtime >= started - 0.05 for f in files):
                    sys.stdout.write(READY + "\n")
                    sys.stdout.flush()
                    return
            except OSError:
                pass
            time.sleep(0.02)

    def link():
        for line in sys.stdin.buffer:
            words = line.split()
            if len(words) == 2 and words[0] == b"signal" and words[1].isdigit():
                forward(int(words[1]))
        forward(signal.SIGTERM)

    threading.Thread(target=ready, daemon=True).start()
    threading.Thread(target=link, daemon=True).start()
    while True:
        try:
            code = child.wait()
            break
        except InterruptedError:  # pragma: no cover - (PEP 475 retries)
            continue
    sys.stdout.flush()
    os._exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    _main(sys.argv[1:])
