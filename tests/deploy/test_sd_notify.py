#!/usr/bin/env python3
"""kasminad's systemd notifications, for real: a unix datagram socket stands in for systemd
(NOTIFY_SOCKET), and the test checks the protocol sd_notify(3) speaks on it.

  1. READY=1 arrives, and at that moment the gRPC socket already answers a health Check;
     without WATCHDOG_USEC no WATCHDOG=1 is sent.
  2. With WATCHDOG_USEC=200000, WATCHDOG=1 arrives about every 100 ms.
  3. SIGTERM sends STOPPING=1, then kasminad exits 0.

usage: test_sd_notify.py KASMINAD
"""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import grpc

KASMINAD = sys.argv[1]
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
SERVING = b"\x08\x01"  # HealthCheckResponse{status: SERVING}
failures = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        failures.append(what)


def recv_all(sock, until, stop_on=None):
    """Datagrams received until the deadline (or the first one containing stop_on)."""
    out = []
    while time.monotonic() < until:
        sock.settimeout(max(0.01, until - time.monotonic()))
        try:
            msg = sock.recv(4096).decode()
        except socket.timeout:
            break
        out.append((time.monotonic(), msg))
        if stop_on is not None and stop_on in msg.split("\n"):
            break
    return out


def health_now(target):
    """One health Check with a short deadline and no wait-for-ready: does it answer now?"""
    with grpc.insecure_channel(target) as ch:
        call = ch.unary_unary(HEALTH_CHECK)
        try:
            return call(b"", timeout=2.0, wait_for_ready=False) == SERVING
        except grpc.RpcError as e:
            print("     health Check failed:", e.code(), e.details())
            return False


def run(tmp, watchdog_usec):
    notify_path = os.path.join(tmp, "notify.sock")
    if os.path.exists(notify_path):
        os.unlink(notify_path)
    nsock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    nsock.bind(notify_path)
    sock_path = os.path.join(tmp, "k.sock")
    env = dict(os.environ)
    env["NOTIFY_SOCKET"] = notify_path
    env.pop("WATCHDOG_PID", None)
    env.pop("WATCHDOG_USEC", None)
    if watchdog_usec:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    log = open(os.path.join(tmp, "kasminad-%d.log" % watchdog_usec), "w+")
    proc = subprocess.Popen(
        [KASMINAD, "--listen", "unix:" + sock_path, "--no-persist", "--log-level", "info"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        t0 = time.monotonic()
        msgs = recv_all(nsock, t0 + 30, stop_on="READY=1")
        ready = [m for _, m in msgs if "READY=1" in m.split("\n")]
        check(len(ready) == 1, "READY=1 received (%d datagrams before it)" % (len(msgs) - 1))
        if ready:
            check("STATUS=" in ready[0], "READY=1 comes with a STATUS= line: %r" % ready[0])
            # The daemon said it is ready: the socket must answer right away.
            check(os.path.exists(sock_path), "the gRPC socket exists at READY=1")
            check(health_now("unix:" + sock_path), "health Check answers SERVING at READY=1")

        later = recv_all(nsock, time.monotonic() + 1.0)
        wd = [t for t, m in later if "WATCHDOG=1" in m.split("\n")]
        if watchdog_usec:
            # 1 s at a 100 ms period: about 10 pings; allow a slow shared machine.
            check(len(wd) >= 4, "WATCHDOG=1 sent %d times in 1 s with WATCHDOG_USEC=%d"
                  % (len(wd), watchdog_usec))
            gaps = [b - a for a, b in zip(wd, wd[1:])]
            if gaps:
                check(min(gaps) >= 0.05,
                      "WATCHDOG=1 no more often than half the interval (min gap %.3f s)"
                      % min(gaps))
        else:
            check(not wd, "no WATCHDOG=1 without WATCHDOG_USEC (%d seen)" % len(wd))

        proc.send_signal(signal.SIGTERM)
        msgs = recv_all(nsock, time.monotonic() + 15, stop_on="STOPPING=1")
        check(any("STOPPING=1" in m.split("\n") for _, m in msgs), "STOPPING=1 on SIGTERM")
        rc = proc.wait(timeout=20)
        check(rc == 0, "kasminad exits 0 after SIGTERM (got %s)" % rc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        nsock.close()
        if failures:
            log.seek(0)
            sys.stdout.write("---- kasminad log ----\n" + log.read())
        log.close()


def main():
    with tempfile.TemporaryDirectory(prefix="ksm-notify-") as tmp:
        print("-- without a watchdog")
        run(tmp, 0)
        print("-- WATCHDOG_USEC=200000")
        run(tmp, 200000)
    if failures:
        print("%d check(s) failed" % len(failures))
        return 1
    print("all sd_notify checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
