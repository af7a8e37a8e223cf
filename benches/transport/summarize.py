#!/usr/bin/env python3
"""Turn the RESULT / INTEROP lines written by run.sh into markdown tables.

Aggregation over the REPS repetitions (each repetition = fresh server process):
  * latency: median of the per-repetition medians, median of the per-repetition p99s
  * msgs/s:  median over repetitions
  * bandwidth: best single transfer over all repetitions, and the median of all transfers
"""

import os
import statistics
import sys
from collections import defaultdict

MAX_BUSY = float(os.environ.get("MAX_BUSY", "25"))
ORDER = ["libzmq", "libzmq-ffi", "zeromq-ct", "zeromq-mt", "pyzmq"]
LABEL = {
    "libzmq": "libzmq 4.3.4 via `zmq` 0.10",
    "libzmq-ffi": "  ... bw via zmq_msg_init_data + own free fn",
    "zeromq-ct": "`zeromq` 0.7, tokio current_thread",
    "zeromq-mt": "`zeromq` 0.7, tokio multi_thread(2)",
    "pyzmq": "pyzmq <-> pyzmq (baseline)",
}


def parse(path):
    rows = []
    header = []
    busy = []
    dropped = []
    for line in open(path):
        if line.startswith("# cpu busy before run:"):
            # first run.sh revision: one idle check per configuration
            busy.append(float(line.split(":")[1].split("%")[0]))
        elif line.startswith("#"):
            if line.rstrip() not in header:
                header.append(line.rstrip())
        if not line.startswith("RESULT "):
            continue
        kv = dict(tok.split("=", 1) for tok in line.split()[1:])
        if "busy" in kv:
            busy.append(float(kv["busy"]))
            if float(kv["busy"]) > MAX_BUSY:
                dropped.append(kv)
                continue
        rows.append(kv)
    if busy:
        header.append(
            f"# CPU busy (other processes) just before measuring: median {statistics.median(busy):.0f}%, "
            f"max {max(busy):.0f}%; {len(dropped)} of {len(busy)} measurements dropped as started above {MAX_BUSY:.0f}%"
        )
    return header, rows


def main():
    header, rows = parse(sys.argv[1])
    data = defaultdict(lambda: defaultdict(list))
    for r in rows:
        key = (r["cfg"], int(r["idle"]))
        t = r["test"]
        if t == "lat":
            data[key]["lat_med"].append(float(r["median_us"]))
            data[key]["lat_p99"].append(float(r["p99_us"]))
        elif t == "thr":
            data[key]["thr"].append(float(r["msgs_per_s"]))
        elif t == "bw":
            data[key]["bw_all"].extend(float(x) for x in r["reps"].split(","))

    def med(v):
        return statistics.median(v) if v else float("nan")

    idle_levels = sorted({k[1] for k in data if k[1] > 0})

    print()
    print("\n".join(header))
    n_reps = max((len(v["lat_med"]) for v in data.values()), default=0)
    print(f"\nMedians over {n_reps} repetitions (lat: median of per-run median/p99).\n")
    mib = next((r["mib"] for r in rows if r["test"] == "bw"), "?")
    cols = [
        "implementation",
        "RTT median µs",
        "RTT p99 µs",
        "pipelined msgs/s",
        f"{mib} MiB best MiB/s",
        f"{mib} MiB median MiB/s",
    ]
    for lvl in idle_levels:
        cols += [f"RTT median µs (+{lvl} idle peers)", f"msgs/s (+{lvl} idle peers)"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))

    def fmt(x, p=0):
        return "–" if x != x else f"{x:,.{p}f}"

    for cfg in ORDER:
        d = data.get((cfg, 0))
        if not d:
            continue
        cells = [
            LABEL.get(cfg, cfg),
            fmt(med(d["lat_med"]), 1),
            fmt(med(d["lat_p99"]), 1),
            fmt(med(d["thr"])),
            fmt(max(d["bw_all"]) if d["bw_all"] else float("nan")),
            fmt(med(d["bw_all"])),
        ]
        for lvl in idle_levels:
            di = data.get((cfg, lvl), {})
            cells += [fmt(med(di.get("lat_med", [])), 1), fmt(med(di.get("thr", [])))]
        print("| " + " | ".join(cells) + " |")

    print("\nPer-repetition values (to judge the noise):\n")
    for (cfg, lvl), d in sorted(
        data.items(), key=lambda kv: (ORDER.index(kv[0][0]) if kv[0][0] in ORDER else 99, kv[0][1])
    ):
        parts = []
        if d["lat_med"]:
            parts.append("lat_med " + "/".join(f"{x:.0f}" for x in d["lat_med"]))
        if d["thr"]:
            parts.append("msgs/s " + "/".join(f"{x / 1000:.0f}k" for x in d["thr"]))
        if d["bw_all"]:
            parts.append("bw " + "/".join(f"{x:.0f}" for x in d["bw_all"]))
        print(f"- {cfg} idle={lvl}: " + "; ".join(parts))

    if len(sys.argv) > 2:
        print(
            "\nInterop (rows: server ROUTER echo, columns: client DEALER; checks passed/total):\n"
        )
        res = {}
        servers, clients = [], []
        for line in open(sys.argv[2]):
            if not line.startswith("INTEROP"):
                continue
            kv = dict(tok.split("=", 1) for tok in line.split()[1:4])
            rest = line.split()[4:]
            try:
                p, f = int(rest[0]), int(rest[2])
                cell = f"{p}/{p + f}" + (" ✔" if f == 0 and kv["rc"] == "0" else " ✘")
            except (IndexError, ValueError):
                cell = "error"
            res[(kv["server"], kv["client"])] = cell
            servers.append(kv["server"]) if kv["server"] not in servers else None
            clients.append(kv["client"]) if kv["client"] not in clients else None
        print("| server \\ client | " + " | ".join(clients) + " |")
        print("|" + "---|" * (len(clients) + 1))
        for s in servers:
            print(f"| {s} | " + " | ".join(res.get((s, c), "") for c in clients) + " |")


if __name__ == "__main__":
    main()
