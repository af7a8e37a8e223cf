#!/usr/bin/env python3
"""pyzmq side of the transport benchmark.

Speaks the same tiny protocol as src/common.rs, so it can be the ROUTER echo
server for the Rust DEALER clients, a DEALER client against the Rust ROUTER
echo servers, and both ends of the pyzmq<->pyzmq baseline.

    interop.py echo  tcp://127.0.0.1:PORT
    interop.py lat   tcp://127.0.0.1:PORT [n=20000]
    interop.py thr   tcp://127.0.0.1:PORT [n=200000] [window=500]
    interop.py bw    tcp://127.0.0.1:PORT [mib=128] [reps=5]
    interop.py check tcp://127.0.0.1:PORT
    interop.py quit  tcp://127.0.0.1:PORT
    interop.py curve-echo  tcp://127.0.0.1:PORT SERVER_SECRET_Z85   (curve_probe.sh)
    interop.py curve-check tcp://127.0.0.1:PORT SERVER_PUBLIC_Z85   (curve_probe.sh)
"""

import os
import statistics
import sys
import time

import zmq

IMP = "pyzmq"
ECHO, ACK, IDENT, QUIT = b"E", b"A", b"I", b"Q"


def small_frames():
    header = bytes(ord("a") + (i % 26) for i in range(35))
    body = bytes((i * 7 + 3) & 0xFF for i in range(64))
    return header, body


def socket(ctx, kind):
    s = ctx.socket(kind)
    s.linger = 0
    s.rcvtimeo = 60_000
    s.sndtimeo = 60_000
    return s


def result(test, **kv):
    print(
        f"RESULT impl={IMP} test={test} " + " ".join(f"{k}={v}" for k, v in kv.items()), flush=True
    )


def echo(ep):
    ctx = zmq.Context()
    s = socket(ctx, zmq.ROUTER)
    s.rcvtimeo = -1
    s.bind(ep)
    print(f"pyzmq ROUTER echo bound on {ep}", file=sys.stderr)
    while True:
        frames = [s.recv()]
        tag = s.recv() if s.rcvmore else b""
        frames.append(tag)
        big = tag == ACK  # bulk data: keep it zero-copy on receive
        while s.rcvmore:
            frames.append(s.recv(copy=not big))
        ident = frames[0]
        if tag == ECHO:
            s.send_multipart(frames)
        elif tag == ACK:
            total = sum(len(f.buffer) if isinstance(f, zmq.Frame) else len(f) for f in frames[2:])
            s.send_multipart([ident, ACK, total.to_bytes(8, "little")])
        elif tag == IDENT:
            s.send_multipart([ident, IDENT, ident])
        elif tag == QUIT:
            s.send_multipart([ident, QUIT])
            time.sleep(0.1)
            return
        else:
            print(f"unknown tag {tag!r}", file=sys.stderr)


_IDLE = []


def dealer(ep, ctx=None):
    ctx = ctx or zmq.Context.instance()
    # FP_IDLE_PEERS=N: N extra idle DEALERs connected to the ROUTER (see common.rs)
    for _ in range(int(os.environ.get("FP_IDLE_PEERS", "0"))):
        idle = socket(ctx, zmq.DEALER)
        idle.connect(ep)
        idle.send_multipart([ECHO, b"idle"])
        idle.recv_multipart()
        _IDLE.append(idle)
    s = socket(ctx, zmq.DEALER)
    s.connect(ep)
    return s


def lat(ep, n=20000):
    s = dealer(ep)
    h, b = small_frames()
    msg = [ECHO, h, b]
    warm = min(2000, n)
    samples = []
    clock = time.perf_counter_ns
    for i in range(warm + n):
        t = clock()
        s.send_multipart(msg)
        parts = s.recv_multipart()
        dt = clock() - t
        assert len(parts) == 3
        if i >= warm:
            samples.append(dt / 1000.0)
    samples.sort()

    def pct(p):
        return samples[min(len(samples) - 1, round((len(samples) - 1) * p))]

    result(
        "lat",
        n=n,
        median_us=f"{pct(0.5):.1f}",
        p99_us=f"{pct(0.99):.1f}",
        min_us=f"{samples[0]:.1f}",
    )


def thr(ep, n=200000, window=500):
    s = dealer(ep)
    h, b = small_frames()
    msg = [ECHO, h, b]
    s.send_multipart(msg)
    s.recv_multipart()
    t = time.perf_counter()
    sent = 0
    while sent < min(window, n):
        s.send_multipart(msg)
        sent += 1
    got = 0
    while got < n:
        s.recv_multipart()
        got += 1
        if sent < n:
            s.send_multipart(msg)
            sent += 1
    el = time.perf_counter() - t
    result("thr", n=n, window=window, secs=f"{el:.3f}", msgs_per_s=f"{n / el:.0f}")


def bw(ep, mib=128, reps=5):
    s = dealer(ep)
    length = mib * 1024 * 1024
    template = os.urandom(length)
    rates = []
    for rep in range(reps + 1):
        buf = bytearray(template)  # fresh buffer, copied outside the timing
        t = time.perf_counter()
        s.send(ACK, zmq.SNDMORE)
        s.send(buf, copy=False)
        tag, ack = s.recv_multipart()
        el = time.perf_counter() - t
        assert tag == ACK and int.from_bytes(ack, "little") == length
        if rep > 0:
            rates.append(mib / el)
    result(
        "bw",
        mib=mib,
        reps=",".join(f"{r:.0f}" for r in rates),
        best_mib_s=f"{max(rates):.0f}",
        median_mib_s=f"{statistics.median(rates):.0f}",
    )


def check(ep):
    passed = failed = 0

    def record(name, ok, detail=""):
        nonlocal passed, failed
        passed += bool(ok)
        failed += not ok
        print(f"CHECK client={IMP} {name} {'PASS' if ok else 'FAIL'} {detail}", flush=True)

    def expect_echo(s, frames):
        s.send_multipart(frames)
        try:
            got = s.recv_multipart()
        except zmq.Again:
            return "timeout"
        if got != list(frames):
            return f"mismatch ({len(got)} frames back, want {len(frames)})"
        return None

    ctx = zmq.Context()
    s = dealer(ep, ctx)
    s.rcvtimeo = 20_000
    h, b = small_frames()
    err = expect_echo(s, [ECHO, h, b])
    record("small_multipart_echo", err is None, err or "")
    err = expect_echo(s, [ECHO, b"", os.urandom(300), os.urandom(5 * 1024 * 1024 + 3), b"tail"])
    record("empty+long_frames_echo", err is None, err or "")

    for i in range(1000):
        s.send_multipart([ECHO, i.to_bytes(4, "little")])
    ok = True
    for i in range(1000):
        try:
            got = s.recv_multipart()
        except zmq.Again:
            ok = False
            break
        if got[1] != i.to_bytes(4, "little"):
            ok = False
            break
    record("pipelined_order_1000", ok)

    n = 16 * 1024 * 1024
    s.send(ACK, zmq.SNDMORE)
    s.send(bytearray(n), copy=False)
    try:
        tag, ack = s.recv_multipart()
        ok = tag == ACK and int.from_bytes(ack, "little") == n
    except zmq.Again:
        ok = False
    record("ack_16MiB", ok)
    s.close()

    s2 = socket(ctx, zmq.DEALER)
    s2.rcvtimeo = 10_000
    s2.setsockopt(zmq.IDENTITY, b"fp-engine-7")
    s2.connect(ep)
    s2.send(IDENT)
    try:
        got = s2.recv_multipart()
        ok = got == [IDENT, b"fp-engine-7"]
    except zmq.Again:
        ok = False
    record("dealer_routing_id", ok)
    s2.close()
    ctx.destroy(linger=0)
    print(f"{passed} passed, {failed} failed")
    sys.exit(0 if failed == 0 else 1)


def curve_echo(ep, server_secret):
    """CURVE ROUTER echo (used by curve_probe.sh); exits on the Q tag."""
    ctx = zmq.Context()
    s = socket(ctx, zmq.ROUTER)
    s.rcvtimeo = -1
    s.curve_server = True
    s.curve_secretkey = server_secret.encode()
    s.bind(ep)
    while True:
        parts = s.recv_multipart()
        s.send_multipart(parts)
        if len(parts) > 1 and parts[1] == QUIT:
            time.sleep(0.1)
            return


def curve_check(ep, server_public):
    """CURVE DEALER: one encrypted echo against a CURVE ROUTER."""
    ctx = zmq.Context()
    s = socket(ctx, zmq.DEALER)
    s.rcvtimeo = 10_000
    pub, sec = zmq.curve_keypair()
    s.curve_serverkey = server_public.encode()
    s.curve_publickey, s.curve_secretkey = pub, sec
    s.connect(ep)
    h, b = small_frames()
    s.send_multipart([ECHO, h, b])
    try:
        ok = s.recv_multipart() == [ECHO, h, b]
    except zmq.Again:
        ok = False
    print(f"CHECK client={IMP}+curve curve_echo {'PASS' if ok else 'FAIL'}", flush=True)
    ctx.destroy(linger=0)
    sys.exit(0 if ok else 1)


def quit_(ep):
    s = dealer(ep)
    s.rcvtimeo = 5000
    s.send(QUIT)
    try:
        s.recv_multipart()
    except zmq.Again:
        pass


def main():
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    cmd, ep = sys.argv[1], sys.argv[2]
    if not ep.startswith("tcp://127.0.0.1:"):
        sys.exit(f"refusing endpoint {ep}: loopback only")
    if cmd in ("curve-echo", "curve-check"):
        {"curve-echo": curve_echo, "curve-check": curve_check}[cmd](ep, sys.argv[3])
        return
    args = [int(a) for a in sys.argv[3:]]
    {"echo": echo, "lat": lat, "thr": thr, "bw": bw, "check": check, "quit": quit_}[cmd](ep, *args)


if __name__ == "__main__":
    main()
