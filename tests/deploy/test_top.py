#!/usr/bin/env python3
"""kasminactl top against a real kasminad on a temporary Unix socket.

--once prints one plain frame; its numbers must equal what the daemon reports through the
other subcommands' --json output (GetMemoryStats, GetCacheStats, GetSlotReports); empty slots
are hidden unless --all-slots; --model ID keeps one model; --json --once is one JSON document
with the same numbers. The live mode (--count 2) piped writes plain frames with no escape
sequence and fills the per-second rate columns from the second frame on; with --json it writes
one JSON document per frame. (The in-place redraw needs a terminal: a pty here.) Error paths: no
daemon (exit 6), a missing --model (exit 4), bad options (exit 2).

usage: test_top.py KASMINAD KASMINACTL
"""
import json
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time

KASMINAD, CTL = sys.argv[1], sys.argv[2]
failures = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        failures.append(what)


def ctl(sock, *args, want=0):
    p = subprocess.run([CTL, "--socket", sock, *args], capture_output=True, text=True,
                       timeout=60)
    if p.returncode != want:
        print("     kasminactl %s -> %d\n%s%s" % (" ".join(args), p.returncode, p.stdout,
                                                  p.stderr))
    check(p.returncode == want, "kasminactl %s exits %d" % (" ".join(args[:3]), want))
    return p.stdout


def ctl_bytes(n):
    """client/kasminactl/out.c ctl_bytes()."""
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    v, u = float(n), 0
    while v >= 1024 and u < 4:
        v /= 1024
        u += 1
    return "%d B" % n if u == 0 else "%.1f %s" % (v, units[u])


def sections(frame):
    """{title: [rows split on 2+ spaces]} for the MEMORY/CACHES/MODELS/SLOTS tables."""
    out, cur = {}, None
    for line in frame.split("\n"):
        if line in ("MEMORY", "CACHES", "MODELS", "SLOTS"):
            cur = out.setdefault(line, [])
        elif cur is not None and line.strip() and not line.startswith("("):
            cur.append(re.split(r"\s{2,}", line.strip()))
    return out


def write_input(path):
    n, c, h, w = 2, 3, 8, 8
    data = struct.pack("<%df" % (n * c * h * w), *[((i * 7) % 13) / 13.0 for i in range(n * c * h * w)])
    hdr = json.dumps({"x": {"dtype": "F32", "shape": [n, c, h, w],
                            "data_offsets": [0, len(data)]}}).encode()
    hdr += b" " * ((8 - len(hdr) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hdr)) + hdr + data)


def main():
    tmp = tempfile.mkdtemp(prefix="ksm-top-")
    sock = os.path.join(tmp, "k.sock")
    log = open(os.path.join(tmp, "kasminad.log"), "w+")
    proc = subprocess.Popen([KASMINAD, "--listen", "unix:" + sock, "--no-persist", "--demo",
                             "--cpu-devices", "2", "--log-level", "warn"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(300):
            if subprocess.run([CTL, "--socket", sock, "health"], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        # Some state worth showing: a seed with alpha 0.25, a second model, cache traffic.
        ctl(sock, "germinate", "demo", "r0c1", "conv_light")
        ctl(sock, "set-alpha", "demo", "r0c1", "0.25")
        ctl(sock, "create", "m2", "--cnn", "--classes", "4", "--channels", "8", "--init-seed", "3")
        inp = os.path.join(tmp, "in.safetensors")
        write_input(inp)
        for _ in range(3):
            ctl(sock, "forward", "demo", "--input", inp)

        frame = ctl(sock, "top", "--once", "--all-slots")
        print(frame)
        check("\x1b" not in frame, "--once prints no escape sequence")
        first = frame.split("\n")[0]
        check(first.startswith("kasminad ") and "SERVING" in first and sock in first,
              "header: server, target, health: %r" % first)
        sec = sections(frame)
        check(set(sec) == {"MEMORY", "CACHES", "MODELS", "SLOTS"}, "four sections: %s" % list(sec))

        # Memory: one row per device, equal to GetMemoryStats.
        mem = json.loads(ctl(sock, "--json", "stats", "memory"))["devices"]
        rows = {r[0]: r for r in sec.get("MEMORY", [])[1:]}
        check(sorted(rows) == sorted(d["device"] for d in mem) and len(mem) == 2,
              "memory rows = devices %s" % sorted(rows))
        for d in mem:
            r = rows.get(d["device"])
            if r is None:
                continue
            a = d["all"]
            want = [d["device"], ctl_bytes(a["allocated_bytes"]["current"]),
                    ctl_bytes(a["allocated_bytes"]["peak"]), ctl_bytes(a["reserved_bytes"]["current"]),
                    ctl_bytes(a["reserved_bytes"]["peak"]), ctl_bytes(a["active_bytes"]["current"]),
                    ctl_bytes(d["total_bytes"]),
                    ctl_bytes(d["memory_cap_bytes"]) if d["memory_cap_bytes"] else "none",
                    str(a["allocation"]["current"]), "-", str(d["num_ooms"]),
                    str(d["num_alloc_retries"]), str(d["cache_hits"])]
            check(r == want, "memory %s: %s == %s" % (d["device"], r, want))

        # Caches: every counter of GetCacheStats, with its hit rate.
        caches = json.loads(ctl(sock, "--json", "stats", "cache"))["caches"]
        crow = {(r[0], r[1], r[2]): r for r in sec.get("CACHES", [])[1:]}
        check(len(crow) == len(caches) and len(caches) > 0,
              "one cache row per counter (%d rows, %d counters)" % (len(crow), len(caches)))
        hit_seen = False
        for c in caches:
            key = (c["model_id"], c["slot_id"] or "-", c["cache"])
            r = crow.get(key)
            tot = c["hits"] + c["misses"]
            pct = "-" if tot == 0 else "%.1f%%" % (100.0 * c["hits"] / tot)
            want = [str(c["hits"]), str(c["misses"]), pct, "-",
                    "%d/%d" % (c["entries"], c["capacity"]), ctl_bytes(c["bytes"]),
                    str(c["evictions"])]
            ok = r is not None and r[3:10] == want
            check(ok, "cache %s: %s == %s" % ("/".join(key), r and r[3:10], want))
            hit_seen |= c["hits"] > 0
        check(hit_seen, "the forwards produced cache hits (a non-trivial hit rate is shown)")

        # Models and slots: stage, alpha and generation of every slot of every model.
        models = {r[0] for r in sec.get("MODELS", [])[1:]}
        check(models == {"demo", "m2"}, "models shown: %s" % sorted(models))
        srow = {(r[0], r[1]): r for r in sec.get("SLOTS", [])[1:]}
        n_slots = 0
        for mid in ("demo", "m2"):
            for s in json.loads(ctl(sock, "--json", "slots", mid))["slots"]:
                n_slots += 1
                r = srow.get((mid, s["slot_id"]))
                if not s.get("seed_id"):
                    check(r is not None and r[2] == "(empty)", "%s/%s empty" % (mid, s["slot_id"]))
                    continue
                want = [s["stage"], "%.4f" % s["controller"]["alpha"],
                        "%.4f" % s["controller"]["alpha_target"], s["controller"]["mode"],
                        str(s["metrics"]["epochs_in_current_stage"]), str(s["model_generation"])]
                check(r is not None and r[2:8] == want,
                      "%s/%s: %s == %s" % (mid, s["slot_id"], r and r[2:8], want))
        check(len(srow) == n_slots, "one slot row per slot (%d, %d)" % (len(srow), n_slots))
        check(srow.get(("demo", "r0c1"), [None] * 4)[3] == "0.2500", "alpha 0.25 shown for demo/r0c1")

        # Default: empty slots hidden (and said so); --model keeps one model.
        plain = ctl(sock, "top", "--once")
        ps = sections(plain)
        shown = [(r[0], r[1]) for r in ps.get("SLOTS", [])[1:]]
        check(shown == [("demo", "r0c1")], "only the occupied slot is shown: %s" % shown)
        check("%d empty slots hidden; --all-slots shows them" % (n_slots - 1) in plain,
              "the hidden empty slots are counted")
        one = sections(ctl(sock, "top", "--once", "--model", "m2", "--all-slots"))
        check({r[0] for r in one.get("MODELS", [])[1:]} == {"m2"} and
              {r[0] for r in one.get("SLOTS", [])[1:]} == {"m2"} and
              {r[0] for r in one.get("CACHES", [])[1:]} <= {"m2"} and
              len(one.get("MEMORY", [])) == 3, "--model m2 shows m2 only (memory per device)")
        ctl(sock, "top", "--once", "--model", "nope", want=4)

        # --json --once: one document, the same numbers as the other subcommands.
        doc = json.loads(ctl(sock, "--json", "top", "--once"))
        check(doc.get("health") == "SERVING" and doc.get("errors") == [],
              "json: health SERVING, no errors: %s" % {k: doc.get(k) for k in ("health", "errors")})
        check(sorted(d["device"] for d in doc.get("memory", [])) == sorted(d["device"] for d in mem)
              and all(d["all"] == m["all"] for d, m in zip(
                  sorted(doc["memory"], key=lambda d: d["device"]),
                  sorted(mem, key=lambda d: d["device"]))), "json memory == stats memory")
        check(sorted((s["model_id"], s["slot_id"]) for s in doc.get("slots", [])) ==
              [("demo", "r0c1")] and doc.get("empty_slots_hidden") == n_slots - 1,
              "json slots: the occupied one, %d hidden" % (n_slots - 1))
        jslot = doc["slots"][0] if doc.get("slots") else {}
        check(jslot.get("controller", {}).get("alpha") == 0.25 and jslot.get("stage") ==
              "GERMINATED", "json slot alpha/stage: %s" % jslot.get("stage"))
        check({m["model_id"] for m in doc.get("models", [])} == {"demo", "m2"} and
              len(doc.get("caches", [])) == len(caches), "json models and caches")
        jm = json.loads(ctl(sock, "--json", "top", "--once", "--model", "nope", want=4))
        check(jm.get("errors") and jm["errors"][0]["status"] == "NOT_FOUND",
              "json --model nope: a NOT_FOUND error entry: %s" % jm.get("errors"))

        # Live mode, two frames 0.3 s apart, stdout piped: plain frames, no escape sequence.
        p = subprocess.run([CTL, "--socket", sock, "top", "--count", "2", "--interval", "0.3"],
                           capture_output=True, text=True, timeout=30)
        check(p.returncode == 0, "top --count 2 exits 0 (%d)" % p.returncode)
        out = p.stdout
        check("\x1b" not in out, "no escape sequence when stdout is not a terminal")
        heads = [i for i, l in enumerate(out.split("\n")) if l.startswith("kasminad ")]
        check(len(heads) == 2, "two frames: %s" % heads)
        second = "\n".join(out.split("\n")[heads[-1]:]) if heads else ""
        s2 = sections(second)
        rates = [r[6] for r in s2.get("CACHES", [])[1:]]
        check(rates and all(re.fullmatch(r"\d+\.\d", x) for x in rates),
              "second frame has per-second hit rates: %s" % rates[:4])
        check("every 0.3 s" in second.split("\n")[0], "live header shows the interval")

        # On a terminal (a pty): redrawn in place with ANSI sequences on the alternate screen.
        import pty
        mfd, sfd = pty.openpty()
        tp = subprocess.Popen([CTL, "--socket", sock, "top", "--count", "2", "--interval", "0.3"],
                              stdout=sfd, stderr=subprocess.DEVNULL)
        os.close(sfd)
        chunks = []
        while True:
            try:
                b = os.read(mfd, 65536)
            except OSError:
                break
            if not b:
                break
            chunks.append(b)
        os.close(mfd)
        tp.wait(timeout=30)
        tout = b"".join(chunks).decode(errors="replace")
        check(tp.returncode == 0 and tout.count("\x1b[H") == 2 and tout.count("\x1b[J") == 2
              and "\x1b[?1049h" in tout and "\x1b[K" in tout,
              "on a terminal: two frames redrawn in place on the alternate screen")

        # --json live: one JSON document per frame (JSON Lines), rates from the second on.
        p = subprocess.run([CTL, "--socket", sock, "--json", "top", "--count", "2", "--interval",
                            "0.3"], capture_output=True, text=True, timeout=30)
        lines = p.stdout.strip().split("\n")
        docs = [json.loads(l) for l in lines]
        check(p.returncode == 0 and len(docs) == 2 and "\x1b" not in p.stdout,
              "--json live: two JSON lines")
        check(docs and all("hits_per_s" in c for c in docs[-1].get("caches", [])) and
              docs[-1].get("interval_s") == 0.3, "--json second frame has rates and interval")

        # Errors.
        ctl(sock, "top", "--model", "", "--once", want=2)
        ctl(sock, "top", "--interval", "0", want=2)
        ctl(sock, "top", "extra", want=2)
        ctl(os.path.join(tmp, "nobody.sock"), "--deadline", "1000", "top", "--once", want=6)
        help_ = subprocess.run([CTL, "top", "--help"], capture_output=True, text=True)
        check(help_.returncode == 0 and help_.stdout.startswith("usage: kasminactl top"),
              "top --help")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        if failures:
            log.seek(0)
            print("---- kasminad log ----\n" + log.read())
        log.close()
        subprocess.run(["rm", "-rf", tmp])
    if failures:
        print("%d check(s) failed" % len(failures))
        return 1
    print("all kasminactl top checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
