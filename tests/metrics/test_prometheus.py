#!/usr/bin/python3
"""A real Prometheus scrapes a real kasminad (loopback only), and what it stored must equal what
the daemon's own statistics RPCs return.

Usage: test_prometheus.py <kasminad> <dir with the generated kasmina/v1/kasmina_pb2.py>
                          [docs/metrics.md]

1. kasminad with --metrics-listen 127.0.0.1:0 (2 CPU devices); a workload over gRPC (two models,
   seeds, alphas, forwards, a strict-gate model whose G1 passes and G2 fails after
   RecordMetrics, one NOT_FOUND).
2. /metrics passes `promtool check metrics` (format and naming lint), and every family it
   exports is listed with its type in docs/metrics.md (the reference for dashboards).
3. prometheus (Debian package) with a generated config scraping it every 1 s, storage in a
   temporary directory, its web API on another free loopback port.
4. With the daemon quiet, Prometheus's /api/v1/query values must equal GetMemoryStats (every
   device: allocated/reserved/active current and peak, allocations, OOMs, retries, cache hits,
   deferred frees, device allocs/frees, cap, total) and GetCacheStats (every {cache, model, slot}:
   hits, misses, evictions, invalidations, entries, capacity, bytes), plus slot stage/alpha
   (GetSlotReports), RPC counters and lifecycle event counters; the run metrics (per-slot
   val accuracy, epochs in stage, contribution; gate evaluations by gate and outcome; the last
   gate per slot; compute time per model). Re-read and re-queried until they
   agree or 60 s pass.
Exits 77 (SKIP) when the prometheus binary is not installed.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fixture  # noqa: E402
from fixture import check  # noqa: E402

BIN, PYDIR = sys.argv[1], sys.argv[2]
DOCS = sys.argv[3] if len(sys.argv) > 3 else None
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
if not os.access(PROMETHEUS, os.X_OK):
    print("SKIP: the prometheus binary is not installed (Debian package 'prometheus'; "
          "deploy/install-deps.sh installs it)")
    sys.exit(fixture.SKIP)
sys.path.insert(0, PYDIR)
from kasmina.v1 import kasmina_pb2 as pb  # noqa: E402

T0 = time.time()
DEADLINE = T0 + 60


def prom_query(base, q):
    url = base + "/api/v1/query?" + urllib.parse.urlencode({"query": q})
    _, _, body = fixture.http_get(url)
    doc = json.loads(body)
    if doc.get("status") != "success":
        raise RuntimeError("query %s: %s" % (q, doc))
    return {tuple(sorted((k, v) for k, v in r["metric"].items()
                         if k not in ("__name__", "instance", "job"))): float(r["value"][1])
            for r in doc["data"]["result"]}


def expected(d):
    """What the daemon says over gRPC: {(metric, labels): value}."""
    exp = {}
    mem = d.call("GetMemoryStats", pb.GetMemoryStatsRequest(), pb.MemoryStats)
    for dev in mem.devices:
        lab = (("device", dev.device),)
        a = dev.all
        for name, v in (
                ("kasmina_memory_allocated_bytes", a.allocated_bytes.current),
                ("kasmina_memory_allocated_peak_bytes", a.allocated_bytes.peak),
                ("kasmina_memory_reserved_bytes", a.reserved_bytes.current),
                ("kasmina_memory_reserved_peak_bytes", a.reserved_bytes.peak),
                ("kasmina_memory_active_bytes", a.active_bytes.current),
                ("kasmina_memory_active_peak_bytes", a.active_bytes.peak),
                ("kasmina_memory_inactive_split_bytes", a.inactive_split_bytes.current),
                ("kasmina_memory_blocks", a.allocation.current),
                ("kasmina_memory_segments", a.segment.current),
                ("kasmina_memory_allocations_total", a.allocation.allocated),
                ("kasmina_memory_ooms_total", dev.num_ooms),
                ("kasmina_memory_alloc_retries_total", dev.num_alloc_retries),
                ("kasmina_memory_cache_hits_total", dev.cache_hits),
                ("kasmina_memory_deferred_frees_total", dev.deferred_frees),
                ("kasmina_memory_device_allocs_total", dev.num_device_alloc),
                ("kasmina_memory_device_frees_total", dev.num_device_free),
                ("kasmina_memory_device_syncs_total", dev.num_sync_all_streams),
                ("kasmina_memory_cap_bytes", dev.memory_cap_bytes),
                ("kasmina_device_memory_total_bytes", dev.total_bytes)):
            exp[(name, lab)] = float(v)
    caches = d.call("GetCacheStats", pb.GetCacheStatsRequest(), pb.CacheStats)
    for c in caches.caches:
        # Prometheus stores an empty label value as no label (model-level caches: slot="").
        lab = tuple((k, v) for k, v in (("cache", c.cache), ("model", c.model_id),
                                        ("slot", c.slot_id)) if v)
        for name, v in (("kasmina_cache_hits_total", c.hits),
                        ("kasmina_cache_misses_total", c.misses),
                        ("kasmina_cache_evictions_total", c.evictions),
                        ("kasmina_cache_invalidations_total", c.invalidations),
                        ("kasmina_cache_entries", c.entries),
                        ("kasmina_cache_capacity", c.capacity),
                        ("kasmina_cache_bytes", c.bytes)):
            exp[(name, lab)] = float(v)
    for mid in ("alpha-net", "beta-net", "gamma-net"):
        reps = d.call("GetSlotReports", pb.GetSlotReportsRequest(model_id=mid), pb.SlotReports)
        for r in reps.slots:
            lab = (("model", mid), ("slot", r.slot_id))
            exp[("kasmina_slot_stage", lab)] = float(r.stage if r.occupied else 0)
            exp[("kasmina_slot_alpha", lab)] = float(r.controller.alpha)
            exp[("kasmina_slot_occupied", lab)] = 1.0 if r.occupied else 0.0
            if r.occupied:
                exp[("kasmina_slot_val_accuracy", lab)] = r.metrics.current_val_accuracy
                exp[("kasmina_slot_epochs_in_stage", lab)] = float(
                    r.metrics.epochs_in_current_stage)
            if r.occupied and r.metrics.HasField("counterfactual_contribution"):
                exp[("kasmina_slot_contribution", lab)] = r.metrics.counterfactual_contribution
    return exp, len(mem.devices), len(caches.caches)


def fetch(base, names):
    got = {}
    for n in sorted(names):
        for lab, v in prom_query(base, n).items():
            got[(n, lab)] = v
    return got


def main():
    tmp = tempfile.mkdtemp(prefix="ksm-prom-")
    d = prom = None
    try:
        d = fixture.Daemon(BIN, tmp)
        models = fixture.workload(d, pb)

        # The exposition passes Prometheus's own linter.
        _, ctype, body = fixture.http_get(d.base + "/metrics")
        check(ctype.startswith("text/plain; version=0.0.4"), "content type: %s" % ctype)
        promtool = shutil.which("promtool")
        if promtool:
            r = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True,
                               timeout=20)
            check(r.returncode == 0, "promtool check metrics: %s" %
                  (r.stdout + r.stderr).decode(errors="replace")[:2000])

        if DOCS:
            with open(DOCS) as f:
                doc = f.read()
            for line in body.decode().splitlines():
                if line.startswith("# TYPE "):
                    _, _, name, typ = line.split()
                    check("| `%s` | %s |" % (name, typ) in doc,
                          "%s (%s) is documented in docs/metrics.md" % (name, typ))

        web = fixture.free_port()
        cfg = os.path.join(tmp, "prometheus.yml")
        with open(cfg, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
                    "  evaluation_interval: 1s\n"
                    "scrape_configs:\n  - job_name: kasmina\n    static_configs:\n"
                    "      - targets: ['127.0.0.1:%d']\n" % d.port)
        plog = open(os.path.join(tmp, "prometheus.log"), "w+")
        prom = subprocess.Popen([PROMETHEUS, "--config.file=" + cfg,
                                 "--storage.tsdb.path=" + os.path.join(tmp, "data"),
                                 "--web.listen-address=127.0.0.1:%d" % web,
                                 "--log.level=warn"], stdout=plog, stderr=subprocess.STDOUT)
        pbase = "http://127.0.0.1:%d" % web

        up = None
        while time.time() < DEADLINE:
            if prom.poll() is not None:
                plog.seek(0)
                raise SystemExit("prometheus exited (rc %s):\n%s" % (prom.returncode, plog.read()))
            try:
                up = prom_query(pbase, 'up{job="kasmina"}')
                if up and list(up.values())[0] == 1.0:
                    break
            except OSError:
                pass
            time.sleep(0.25)
        check(up and list(up.values())[0] == 1.0, "prometheus scraped kasminad (up == 1)")
        print("prometheus up after %.1f s" % (time.time() - T0), flush=True)

        # The daemon is quiet now: compare until both sides agree (the exporter samples every
        # 1 s and Prometheus scrapes every 1 s, so this takes a few seconds).
        diff = ["no comparison made"]
        tries = 0
        while time.time() < DEADLINE:
            tries += 1
            exp, n_dev, n_cache = expected(d)
            got = fetch(pbase, {k[0] for k in exp})
            diff = ["%s%s: prometheus %s, rpc %s" % (k[0], dict(k[1]), got.get(k), v)
                    for k, v in sorted(exp.items()) if got.get(k) != v]
            if not diff:
                break
            time.sleep(0.5)
        check(not diff, "scraped values equal GetMemoryStats/GetCacheStats/GetSlotReports:\n  " +
              "\n  ".join(diff[:40]))
        check(n_dev == 2 and n_cache > 0, "2 devices and some caches compared (%d, %d)" %
              (n_dev, n_cache))
        print("compared %d series after %d tries (%.1f s)" % (len(exp), tries, time.time() - T0))

        # Counters kept by the rpc layer and the event sink.
        got = prom_query(pbase, "kasmina_rpc_requests_total")
        key = lambda m, c: (("code", c), ("method", m), ("service", "kasmina.v1.Kasmina"))
        check(got.get(key("CreateModel", "OK")) == 3.0, "CreateModel OK == 3: %s" %
              got.get(key("CreateModel", "OK")))
        check(got.get(key("Forward", "OK")) == 6.0, "Forward OK == 6")
        check(got.get(key("GetModel", "NOT_FOUND")) == 1.0, "GetModel NOT_FOUND == 1")
        hist = prom_query(pbase, 'kasmina_rpc_duration_seconds_count{method="Forward"}')
        check(list(hist.values()) == [6.0], "Forward latency histogram count == 6: %s" % hist)
        inf = prom_query(pbase, 'kasmina_rpc_duration_seconds_bucket{method="Forward",le="+Inf"}')
        check(list(inf.values()) == [6.0], "Forward +Inf bucket == 6: %s" % inf)
        ev = prom_query(pbase, "kasmina_lifecycle_events_total")
        check(ev.get((("type", "SEED_GERMINATED"),)) == 4.0, "4 SEED_GERMINATED events: %s" % ev)

        # Run metrics: gamma-net's seed has the values RecordMetrics set; its gates were
        # counted by gate and outcome (the failed G1 was an OK AdvanceStage call).
        gslot = (("model", "gamma-net"), ("slot", models["gamma-net"][0]))
        acc = prom_query(pbase, "kasmina_slot_val_accuracy")
        check(acc.get(gslot) == 62.5, "gamma-net val_accuracy 62.5: %s" % acc)
        cf = prom_query(pbase, "kasmina_slot_contribution")
        check(cf == {gslot: 1.25}, "only gamma-net has a contribution, 1.25: %s" % cf)
        gates = prom_query(pbase, "kasmina_gate_evaluations_total")
        gk = lambda m, g, o: (("gate", g), ("model", m), ("outcome", o))
        want = {gk("gamma-net", "G1", "passed"): 1.0, gk("gamma-net", "G2", "failed"): 1.0,
                gk("alpha-net", "G1", "passed"): 1.0, gk("beta-net", "G1", "passed"): 1.0}
        check(len(gates) == 3 * 5 * 2, "every model x gate x outcome series: %d" % len(gates))
        check({k: v for k, v in gates.items() if v} == want,
              "gate evaluations by model, gate, outcome: %s" %
              {k: v for k, v in gates.items() if v})
        check(got.get(key("AdvanceStage", "OK")) == 4.0, "AdvanceStage OK == 4 (one failed gate)")
        last = prom_query(pbase, "kasmina_slot_last_gate_passed")
        check(last == {(("gate", "G2"),) + gslot: 0.0,
                       (("gate", "G1"), ("model", "alpha-net"),
                        ("slot", models["alpha-net"][0])): 1.0,
                       (("gate", "G1"), ("model", "beta-net"),
                        ("slot", models["beta-net"][0])): 1.0}, "last gate per slot: %s" % last)
        comp = prom_query(pbase, "kasmina_model_compute_seconds_total")
        for mid in ("alpha-net", "beta-net"):
            check(comp.get((("kind", "forward"), ("model", mid)), 0) > 0,
                  "%s forward compute time > 0: %s" % (mid, comp))
        check(comp.get((("kind", "forward"), ("model", "gamma-net"))) == 0.0 and
              comp.get((("kind", "train"), ("model", "alpha-net"))) == 0.0,
              "no compute time without calls: %s" % comp)
        bi = prom_query(pbase, "kasmina_build_info")
        check(len(bi) == 1 and dict(list(bi)[0]).get("version"), "build_info has a version")
    finally:
        if prom is not None:
            prom.terminate()
            try:
                prom.wait(timeout=15)
            except subprocess.TimeoutExpired:
                prom.kill()
        if d is not None:
            rc = d.stop()
            check(rc == 0, "kasminad exits 0 after SIGTERM (rc %s)" % rc)
        shutil.rmtree(tmp, ignore_errors=True)
    fixture.finish("test_prometheus (%.1f s)" % (time.time() - T0))


main()
