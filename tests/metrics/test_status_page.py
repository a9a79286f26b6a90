#!/usr/bin/python3
"""The status page at / rendered by a real headless Chromium, checked against the daemon's state.

Usage: test_status_page.py <kasminad> <dir with kasmina/v1/kasmina_pb2.py> [--screenshot PNG]

1. kasminad with --metrics-listen 127.0.0.1:0 and a workload (two models, seeds in different
   stages, alphas 0.375 and 0.8125, forwards; a strict-gate model whose G2 fails).
2. The page as served is self-contained (no external script, style, image or font) and holds
   no state: every row is drawn by its script from /status.json.
3. chromium --headless --dump-dom (the script runs: fetch, render): every model id, device and
   slot appears, and each slot's stage and alpha (attribute and visible text) equal
   GetSlotReports; the cache table has one row per GetCacheStats entry; each slot shows its last
   gate result (the failed G2 with its check details) and val accuracy; the event log lists
   every event of /status.json newest first, the failed gate with its details.
4. --screenshot PNG also writes a screenshot (docs/status-page.png is made this way).
Exits 77 (SKIP) when chromium is not installed.
"""
import html.parser
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fixture  # noqa: E402
from fixture import check  # noqa: E402

BIN, PYDIR = sys.argv[1], sys.argv[2]
SHOT = sys.argv[sys.argv.index("--screenshot") + 1] if "--screenshot" in sys.argv else None
CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"))
                 if p), None)
if CHROMIUM is None:
    print("SKIP: chromium is not installed (Debian package 'chromium'; deploy/install-deps.sh "
          "installs it)")
    sys.exit(fixture.SKIP)
sys.path.insert(0, PYDIR)
from kasmina.v1 import kasmina_pb2 as pb  # noqa: E402

T0 = time.time()


class Dom(html.parser.HTMLParser):
    """Collects rows (tr attributes + text of classed spans/cells) per table id."""

    def __init__(self):
        super().__init__()
        self.table = None
        self.rows = {}
        self.row = None
        self.cls = []
        self.body = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.body = a
        if tag == "table":
            self.table = a.get("id")
            self.rows.setdefault(self.table, [])
        elif tag == "tr" and self.table and any(k.startswith("data-") for k in a):
            self.row = {"attrs": a, "text": {}}
            self.rows[self.table].append(self.row)
        self.cls.append(a.get("class", ""))

    def handle_endtag(self, tag):
        if self.cls:
            self.cls.pop()
        if tag == "tr":
            self.row = None
        if tag == "table":
            self.table = None

    def handle_data(self, data):
        if self.row is not None and self.cls:
            for c in self.cls[-1].split():
                self.row["text"][c] = self.row["text"].get(c, "") + data


def chromium(url, tmp, *args):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--user-data-dir=" + os.path.join(tmp, "chromium-profile"),
           "--virtual-time-budget=6000", *args, url]
    r = subprocess.run(cmd, capture_output=True, timeout=90)
    if r.returncode != 0:
        raise SystemExit("chromium failed (rc %d):\n%s" % (r.returncode,
                                                           r.stderr.decode(errors="replace")))
    return r.stdout.decode()


def stage_name(r):
    return pb.Stage.Name(r.stage).replace("STAGE_", "") if r.occupied else "EMPTY"


def main():
    tmp = tempfile.mkdtemp(prefix="ksm-page-")
    d = None
    try:
        d = fixture.Daemon(BIN, tmp)
        models = fixture.workload(d, pb)
        reports = {mid: d.call("GetSlotReports", pb.GetSlotReportsRequest(model_id=mid),
                               pb.SlotReports).slots for mid in models}
        caches = d.call("GetCacheStats", pb.GetCacheStatsRequest(), pb.CacheStats).caches

        # Served as is: self-contained, no state baked in.
        _, ctype, raw = fixture.http_get(d.base + "/")
        raw = raw.decode()
        check(ctype.startswith("text/html"), "/ is text/html: %s" % ctype)
        for bad in ("<link", " src=", "@import", "url(", "http://", "https://"):
            check(bad not in raw, "the page references no external asset (%r)" % bad)
        served = Dom()
        served.feed(raw)
        check("alpha-net" not in raw and not any(served.rows.values()),
              "the served page holds no state (rows come from /status.json)")

        # Wait until the exporter's sample includes the workload (sampled every 1 s).
        want = time.time()
        while time.time() < T0 + 30:
            _, _, js = fixture.http_get(d.base + "/status.json")
            doc = json.loads(js)
            if doc.get("sampled_at", 0) > want:
                break
            time.sleep(0.2)
        check(doc.get("sampled_at", 0) > want, "status.json resampled after the workload")

        dom_text = chromium(d.base + "/", tmp, "--dump-dom")
        dom = Dom()
        dom.feed(dom_text)
        check(dom.body.get("data-loaded") == "1", "the page's script fetched and rendered "
              "/status.json (body data-loaded=%s)" % dom.body.get("data-loaded"))
        dev_rows = [r["attrs"].get("data-device") for r in dom.rows.get("devices", [])]
        check(dev_rows == ["cpu:0", "cpu:1"], "device rows: %s" % dev_rows)
        model_rows = [r["attrs"].get("data-model") for r in dom.rows.get("models", [])]
        check(model_rows == list(models), "model rows %s == %s" % (model_rows, list(models)))
        shown = {(r["attrs"]["data-model"], r["attrs"]["data-slot"]): r
                 for r in dom.rows.get("slots", [])}
        n = 0
        for mid, reps in reports.items():
            for rep in reps:
                row = shown.get((mid, rep.slot_id))
                check(row is not None, "slot %s/%s is shown" % (mid, rep.slot_id))
                if row is None:
                    continue
                n += 1
                st = stage_name(rep)
                check(row["attrs"].get("data-stage") == st and
                      row["text"].get("stage", "").strip() == st,
                      "%s/%s stage: page %s/%r, rpc %s" % (mid, rep.slot_id,
                                                           row["attrs"].get("data-stage"),
                                                           row["text"].get("stage"), st))
                a = rep.controller.alpha
                check(abs(float(row["attrs"].get("data-alpha", "nan")) - a) < 1e-6 and
                      row["text"].get("alpha", "").strip() == "%.4f" % a,
                      "%s/%s alpha: page %s/%r, rpc %r" % (mid, rep.slot_id,
                                                           row["attrs"].get("data-alpha"),
                                                           row["text"].get("alpha"), a))
        check(len(shown) == n and n == sum(len(r) for r in reports.values()),
              "every slot shown once (%d rows, %d slots)" % (len(shown), n))
        staged = sorted(r["attrs"]["data-stage"] for r in shown.values())
        check("TRAINING" in staged and "GERMINATED" in staged, "stages vary: %s" % staged)
        # Each slot's last gate result, failed checks spelled out; val accuracy.
        gam = shown.get(("gamma-net", models["gamma-net"][0]))
        check(gam is not None and gam["attrs"].get("data-gate") == "G2 failed" and
              "epochs_in_current_stage 1 < 10" in gam["text"].get("checks", "") and
              gam["text"].get("val-accuracy", "").strip() == "62.50",
              "gamma-net's slot shows G2 failed with its checks and val accuracy 62.50: %s" %
              ((gam and (gam["attrs"], gam["text"])),))
        alp = shown.get(("alpha-net", models["alpha-net"][0]))
        check(alp is not None and alp["attrs"].get("data-gate") == "G1 passed",
              "alpha-net's first slot shows G1 passed: %s" % (alp and alp["attrs"]))
        check(shown[("alpha-net", models["alpha-net"][2])]["attrs"].get("data-gate") == "",
              "a slot without a gate evaluation shows none")
        # The live event log: every event so far (fewer than 50), newest first.
        evs = json.loads(fixture.http_get(d.base + "/status.json")[2])["rpc"]["event_log"]
        rows = dom.rows.get("events", [])
        seqs = [int(r["attrs"]["data-seq"]) for r in rows]
        check(len(rows) == len(evs) and seqs == sorted(seqs, reverse=True) and
              seqs == [e["seq"] for e in reversed(evs)] and seqs[-1] == 1,
              "event log rows %s == status.json event_log, newest first" % seqs)
        failed = [r for r in rows if r["attrs"].get("data-type") == "SEED_GATE_EVALUATED" and
                  "G2 for BLENDING: failed" in r["text"].get("text", "")]
        check(len(failed) == 1 and "seed_not_ready" not in failed[0]["text"]["text"] and
              "epochs_in_current_stage 1 < 10" in failed[0]["text"]["text"],
              "the failed G2 is in the log with its check details: %s" % failed)
        check(len(dom.rows.get("caches", [])) == len(caches),
              "cache rows %d == GetCacheStats entries %d" % (len(dom.rows.get("caches", [])),
                                                              len(caches)))
        if SHOT:
            chromium(d.base + "/", tmp, "--hide-scrollbars", "--window-size=1280,1000",
                     "--screenshot=" + os.path.abspath(SHOT))
            check(os.path.getsize(SHOT) > 1000, "screenshot written to %s" % SHOT)
    finally:
        if d is not None:
            rc = d.stop()
            check(rc == 0, "kasminad exits 0 after SIGTERM (rc %s)" % rc)
        shutil.rmtree(tmp, ignore_errors=True)
    fixture.finish("test_status_page (%.1f s)" % (time.time() - T0))


main()
