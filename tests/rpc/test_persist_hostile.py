#!/usr/bin/python3
"""Hostile or damaged state directories never cost data or availability (issue 12), against a
real kasminad on real state directories (helpers from test_persist.py).

Usage: test_persist_hostile.py <kasminad> <dir with the generated kasmina_pb2.py and health_pb2.py>

1. links: symbolic links planted in the state directory are never followed: leftover names
   (.<id>.tmp, .<id>.del) pointing at a victim directory are unlinked themselves and the
   victim's files survive; a link named like a model directory is left alone; a model whose
   journal is a link to a victim file is quarantined and the victim keeps its bytes; a LOCK that
   is a link stops start-up without touching its target.
2. modes: a world-writable state directory or models directory stops start-up with a message
   naming the path and the mode; a group-writable one starts with a warning.
3. quarantine: a journal damaged in its middle, a spec that is not JSON, a snapshot with a flipped
   data byte and a model directory without a spec are each quarantined (moved to
   DIR/quarantine/, bytes unchanged, reason naming the file) while the other models are served
   with their exact state and health stays SERVING; ListModels reports them; stray entries are
   left alone; CreateModel reuses a quarantined id; --strict-restore refuses to start instead,
   naming the file and moving nothing.
4. generations: an appended copy of an older valid record (generation 7 -> 3) quarantines the
   model instead of rolling it back (--strict-restore: start-up stops); the leftovers of a
   compaction that crashed before it emptied the journal (records <= the snapshot's generation
   at its head) still restore, before and after a later append.
5. missing journal: a deleted journal restores the snapshot with an error line naming the file
   and its generation, and an empty journal is recreated.
6. checksum: snapshots carry kasmina.crc32c; one without it (an older kasminad's) still restores,
   with a warning.
"""
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time

import test_persist as t  # noqa: E402  (reads the same argv)
from test_persist import BIN, CNN, Daemon, check, pb, state_of  # noqa: E402
import grpc  # noqa: E402
import health_pb2  # noqa: E402


def up(state, sock, log, extra=()):
    """A started daemon, or None (recorded as a failure) when it refused to start."""
    try:
        return Daemon(state, sock, log, extra)
    except SystemExit as e:
        check(False, "kasminad starts on %s: %s" % (state, str(e)[-600:]))
        return None


def refuses(state, sock, extra=()):
    """(exit status, stderr) of a kasminad that must refuse to start; None if it started."""
    p = subprocess.Popen([BIN, "--listen", "unix:" + sock, "--state-dir", state, "--no-cuda",
                          *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = p.communicate(timeout=15)
        return p.returncode, err
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
        return None, err


def listing(d):
    r = d.call("ListModels", pb.ListModelsRequest())
    return [m.model_id for m in r.models], {q.model_id: q for q in r.quarantined}


def health(d):
    return d.health(timeout=10)


def records(path):
    """(offset, size, generation) of each record of a journal."""
    b, out, off = open(path, "rb").read(), [], 0
    while off + 24 <= len(b):
        magic, ln, _crc, _typ, gen = struct.unpack_from("<4sIIIQ", b, off)
        if magic != b"KSMJ":
            break
        out.append((off, 24 + ln, gen))
        off += 24 + ln
    return out


def files_of(d):
    return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))
            if not os.path.islink(os.path.join(d, f))}


def mutate(d, mid, n_metrics=3):
    """Germinate, advance and a few metrics: the journal holds several records."""
    slots = [s.slot_id for s in d.call("GetModel", pb.GetModelRequest(model_id=mid)).slots]
    d.call("Germinate", pb.GerminateRequest(model_id=mid, slot_id=slots[0],
                                            blueprint_id="conv_light", init_seed=3))
    d.call("AdvanceStage", pb.AdvanceStageRequest(model_id=mid, slot_id=slots[0]))
    for i in range(n_metrics):
        d.call("RecordMetrics", pb.RecordMetricsRequest(model_id=mid, slot_id=slots[0],
                                                        val_accuracy=30 + i, epoch=i))
    return slots


def create(d, mid, seed=7):
    d.call("CreateModel", pb.CreateModelRequest(model_id=mid, cnn=CNN, permissive_gates=True,
                                                init_seed=seed))


def flip(path, at, mask=0x01):
    b = bytearray(open(path, "rb").read())
    b[at] ^= mask
    open(path, "wb").write(bytes(b))


def st_header(path):
    b = open(path, "rb").read()
    n = struct.unpack_from("<Q", b, 0)[0]
    return json.loads(b[8:8 + n]), b[8 + n:]


# ---- 1. links ----

def test_links(tmp):
    state, sock, log = tmp + "/state-l", tmp + "/l.sock", tmp + "/links.log"
    victim, vfile, vlock = tmp + "/victim", tmp + "/victim-file", tmp + "/victim-lock"
    os.mkdir(victim)
    for i in range(3):
        open(os.path.join(victim, "precious-%d" % i), "w").write("precious %d\n" % i)
    open(vfile, "wb").write(b"a precious file, not a journal\n" * 8)
    open(vlock, "wb").write(b"precious lock target\n")
    d = Daemon(state, sock, log)
    create(d, "a", 1)
    create(d, "b", 2)
    mutate(d, "a")
    before = state_of(d, {"a"})
    check(d.stop() == 0, "links: SIGTERM exits 0")
    models = os.path.join(state, "models")
    for name in (".evil.tmp", ".evil.del", ".notours"):
        os.symlink(victim, os.path.join(models, name))
    bj = os.path.join(models, "b.d", "journal")
    os.remove(bj)
    os.symlink(vfile, bj)
    d = up(state, sock, log)
    victim_ok = sorted(os.listdir(victim)) == ["precious-0", "precious-1", "precious-2"] and all(
        open(os.path.join(victim, "precious-%d" % i)).read() == "precious %d\n" % i
        for i in range(3))
    check(victim_ok, "links: the files of a directory that planted links point to are intact (%s)"
          % sorted(os.listdir(victim)))
    check(open(vfile, "rb").read() == b"a precious file, not a journal\n" * 8,
          "links: a file a model's journal links to keeps its bytes")
    if d is None:
        return
    check(not os.path.lexists(os.path.join(models, ".evil.tmp"))
          and not os.path.lexists(os.path.join(models, ".evil.del")),
          "links: leftover-named links (.<id>.tmp, .<id>.del) are unlinked themselves")
    check(os.path.islink(os.path.join(models, ".notours")),
          "links: another dot entry is left alone")
    ids, quar = listing(d)
    check(ids == ["a"] and state_of(d, {"a"}) == before,
          "links: the sound model is served with its exact state (%s)" % ids)
    q = quar.get("b")
    check(q is not None and bj in q.reason and "symbolic link" in q.reason,
          "links: the model whose journal is a link is quarantined naming it (%s)"
          % (q.reason if q else sorted(quar)))
    if q is not None:
        check(os.path.islink(os.path.join(q.moved_to, "journal"))
              and q.moved_to.startswith(os.path.join(state, "quarantine") + "/"),
              "links: its files, link included, are kept under DIR/quarantine (%s)" % q.moved_to)
    check(d.stop() == 0, "links: second SIGTERM exits 0")
    # A link named like a model directory: left alone, not followed, not fatal.
    os.symlink(victim, os.path.join(models, "link.d"))
    d = up(state, sock, log)
    if d is None:
        return
    ids, quar = listing(d)
    check(ids == ["a"] and not quar and os.path.islink(os.path.join(models, "link.d")),
          "links: a link named like a model directory is skipped and left alone (%s, %s)"
          % (ids, sorted(quar)))
    check(d.stop() == 0, "links: third SIGTERM exits 0")
    check("ignoring %s/link.d: a symbolic link" % models in open(log).read(),
          "links: the skipped link is logged")
    # A LOCK that is a link: no start, the target untouched.
    lock = os.path.join(state, "LOCK")
    os.remove(lock)
    os.symlink(vlock, lock)
    rc, err = refuses(state, sock)
    check(rc not in (None, 0) and lock in err and "symbolic link" in err,
          "links: a LOCK that is a link stops start-up naming it: rc %s %r" % (rc, err[-300:]))
    check(open(vlock, "rb").read() == b"precious lock target\n",
          "links: the LOCK link's target keeps its bytes")
    os.remove(lock)


# ---- 2. modes ----

def test_modes(tmp):
    state, sock, log = tmp + "/state-p", tmp + "/p.sock", tmp + "/modes.log"
    d = Daemon(state, sock, log)
    create(d, "a")
    check(d.stop() == 0, "modes: SIGTERM exits 0")
    models = os.path.join(state, "models")
    for path in (state, models):
        os.chmod(path, 0o777)
        rc, err = refuses(state, sock)
        check(rc not in (None, 0) and ("%s is world-writable (mode 0777)" % path) in err,
              "modes: a world-writable %s stops start-up naming path and mode: rc %s %r"
              % (os.path.basename(path), rc, err[-300:]))
        os.chmod(path, 0o700)
    os.chmod(state, 0o770)
    d = up(state, sock, log)
    if d is not None:
        check(listing(d)[0] == ["a"], "modes: a group-writable state directory starts")
        check(d.stop() == 0, "modes: second SIGTERM exits 0")
        check("%s is group-writable (mode 0770)" % state in open(log).read(),
              "modes: the group-writable state directory is logged")
    os.chmod(state, 0o700)


# ---- 3. quarantine ----

def test_quarantine(tmp):
    state, sock, log = tmp + "/state-q", tmp + "/q.sock", tmp + "/quarantine.log"
    d = Daemon(state, sock, log)
    for i, mid in enumerate(["good", "badj", "bads", "badsnap", "later"]):
        create(d, mid, 10 + i)
        mutate(d, mid)
    before = state_of(d, {"good", "later"})
    check(d.stop() == 0, "quarantine: SIGTERM exits 0")
    models = os.path.join(state, "models")
    md = {m: os.path.join(models, m + ".d") for m in ("good", "badj", "bads", "badsnap", "later")}
    check(len(records(md["badj"] + "/journal")) >= 3, "quarantine: badj's journal has records")
    flip(md["badj"] + "/journal", 40, 0x55)              # first record's payload
    open(md["bads"] + "/spec.json", "w").write("{not json")
    snap = md["badsnap"] + "/snapshot.safetensors"
    flip(snap, os.path.getsize(snap) - 1)                 # the last data byte
    os.mkdir(os.path.join(models, "orphan.d"))            # a directory that is not a model
    open(os.path.join(models, "orphan.d", "x"), "w").write("x")
    os.mkdir(os.path.join(models, "notes"))               # stray entries
    open(os.path.join(models, "notes", "keep.txt"), "w").write("keep")
    open(os.path.join(models, "README"), "w").write("readme")
    kept = {m: files_of(md[m]) for m in ("badj", "bads", "badsnap")}
    kept["orphan"] = {"x": b"x"}
    # --strict-restore: the first damage met stops start-up, naming its file; nothing moves.
    rc, err = refuses(state, sock, ("--strict-restore",))
    check(rc not in (None, 0) and "--strict-restore" in err
          and any(p in err for p in (md["badj"] + "/journal", md["bads"] + "/spec.json", snap,
                                     models + "/orphan.d/spec.json")),
          "quarantine: --strict-restore refuses to start naming the damaged file: rc %s %r"
          % (rc, err[-400:]))
    check(all(os.path.isdir(p) for p in md.values())
          and not os.path.exists(os.path.join(state, "quarantine")),
          "quarantine: the strict refusal moved nothing")

    d = up(state, sock, log)
    if d is None:
        return
    check(health(d) == health_pb2.HealthCheckResponse.SERVING, "quarantine: health SERVING")
    ids, quar = listing(d)
    check(ids == ["good", "later"] and state_of(d, {"good", "later"}) == before,
          "quarantine: the sound models are served with their exact state (%s)" % ids)
    check(sorted(quar) == ["badj", "bads", "badsnap", "orphan"],
          "quarantine: ListModels reports the damaged ones (%s)" % sorted(quar))
    want = {"badj": [md["badj"] + "/journal", "damaged at byte 0"],
            "bads": [md["bads"] + "/spec.json", "not valid JSON"],
            "badsnap": [snap, "CRC32C"],
            "orphan": [models + "/orphan.d/spec.json", "cannot read"]}
    for mid, words in want.items():
        q = quar.get(mid)
        check(q is not None and all(w in q.reason for w in words),
              "quarantine: %s's reason names %s (%s)" % (mid, words, q.reason if q else None))
        if q is None:
            continue
        check(os.path.dirname(q.moved_to) == os.path.join(state, "quarantine")
              and os.path.basename(q.moved_to).startswith(mid + ".")
              and files_of(q.moved_to) == kept[mid]
              and not os.path.exists(os.path.join(models, mid + ".d")),
              "quarantine: %s's directory moved to %s with its bytes unchanged" % (mid, q.moved_to))
    check(open(os.path.join(models, "notes", "keep.txt")).read() == "keep"
          and open(os.path.join(models, "README")).read() == "readme",
          "quarantine: stray entries are left alone")
    # The id of a quarantined model is free again.
    create(d, "badj", 99)
    mutate(d, "badj", 1)
    after_create = state_of(d, {"badj"})
    check(d.stop() == 0, "quarantine: SIGTERM exits 0")
    text = open(log).read()
    check("model badj quarantined: journal %s/journal is damaged at byte 0" % md["badj"] in text
          and "2 model(s) restored, 4 quarantined" in text,
          "quarantine: start-up logs each quarantine and the count")
    d = up(state, sock, log)
    if d is None:
        return
    ids, quar = listing(d)
    check(ids == ["good", "later", "badj"] and not quar
          and state_of(d, {"badj"}) == after_create,
          "quarantine: after a restart the re-created model is restored and nothing is newly "
          "quarantined (%s, %s)" % (ids, sorted(quar)))
    check(len(os.listdir(os.path.join(state, "quarantine"))) == 4,
          "quarantine: the quarantined directories are kept")
    check(d.stop() == 0, "quarantine: last SIGTERM exits 0")


# ---- 4. generations ----

def test_generations(tmp):
    state, sock, log = tmp + "/state-g", tmp + "/g.sock", tmp + "/generations.log"
    d = Daemon(state, sock, log)
    create(d, "g")
    mutate(d, "g", 4)  # generations 2 (germinate), 3 (advance), 4..7 (metrics)
    gen = d.call("GetModel", pb.GetModelRequest(model_id="g")).generation
    check(gen == 7, "generations: the model is at generation 7 (%d)" % gen)
    check(d.stop() == 0, "generations: SIGTERM exits 0")
    journal = os.path.join(state, "models", "g.d", "journal")
    good = open(journal, "rb").read()
    recs = records(journal)
    old = [r for r in recs if r[2] == 3]
    check(len(old) == 1 and recs[-1][2] == 7, "generations: records %s" % [r[2] for r in recs])
    if len(old) != 1:
        return
    off, size, _ = old[0]
    open(journal, "ab").write(good[off:off + size])  # a valid copy of an older record
    rc, err = refuses(state, sock, ("--strict-restore",))
    check(rc not in (None, 0) and journal in err
          and "at byte %d has generation 3, below the previous record's 7" % len(good) in err,
          "generations: --strict-restore refuses the out-of-order record: rc %s %r"
          % (rc, err[-400:]))
    d = up(state, sock, log)
    if d is None:
        return
    ids, quar = listing(d)
    q = quar.get("g")
    check("g" not in ids and q is not None and journal in q.reason
          and "generation 3, below the previous record's 7" in q.reason,
          "generations: the appended copy quarantines the model instead of rolling it back to "
          "generation 3 (%s, %s)" % (ids, q.reason if q else None))
    check(d.stop() == 0, "generations: SIGTERM exits 0")

    # Compaction leftovers (records <= the snapshot's generation at the head) are legitimate.
    state, sock = tmp + "/state-g2", tmp + "/g2.sock"
    d = Daemon(state, sock, log)
    create(d, "h")
    mutate(d, "h", 2)
    journal = os.path.join(state, "models", "h.d", "journal")
    leftovers = open(journal, "rb").read()
    blob = d.call("ExportWeights", pb.ExportWeightsRequest(model_id="h")).safetensors
    d.call("LoadWeights", pb.LoadWeightsRequest(model_id="h", safetensors=blob, strict=False))
    check(os.path.getsize(journal) == 0, "generations: LoadWeights emptied the journal")
    st = state_of(d, {"h"})
    check(d.stop() == 0, "generations: SIGTERM exits 0")
    open(journal, "wb").write(leftovers)  # as if the compaction crashed before the truncate
    d = up(state, sock, log)
    if d is None:
        return
    ids, quar = listing(d)
    check(ids == ["h"] and not quar and state_of(d, {"h"}) == st,
          "generations: compaction leftovers are skipped (%s, %s)" % (ids, sorted(quar)))
    slots = [s.slot_id for s in d.call("GetModel", pb.GetModelRequest(model_id="h")).slots]
    d.call("RecordMetrics", pb.RecordMetricsRequest(model_id="h", slot_id=slots[0],
                                                    val_accuracy=77, epoch=9))
    st2 = state_of(d, {"h"})
    check(d.stop() == 0, "generations: SIGTERM exits 0")
    check(len(records(journal)) == len(records_of(leftovers)) + 1,
          "generations: the new record follows the leftovers")
    d = up(state, sock, log)
    if d is None:
        return
    ids, quar = listing(d)
    check(ids == ["h"] and not quar and state_of(d, {"h"}) == st2,
          "generations: a record appended after leftovers restores (%s)" % sorted(quar))
    check(d.stop() == 0, "generations: SIGTERM exits 0")


def records_of(b):
    tmp = tempfile.NamedTemporaryFile(delete=False)
    tmp.write(b)
    tmp.close()
    try:
        return records(tmp.name)
    finally:
        os.unlink(tmp.name)


# ---- 5. missing journal, 6. checksum ----

def test_missing_journal_and_checksum(tmp):
    state, sock, log = tmp + "/state-m", tmp + "/m.sock", tmp + "/missing.log"
    d = Daemon(state, sock, log)
    create(d, "m")
    create(d, "old")
    mutate(d, "m", 1)
    blob = d.call("ExportWeights", pb.ExportWeightsRequest(model_id="m")).safetensors
    d.call("LoadWeights", pb.LoadWeightsRequest(model_id="m", safetensors=blob, strict=False))
    snap_state = state_of(d, {"m"})
    snap_gen = t.generation(snap_state["m"])
    mutate_slot = [s.slot_id for s in d.call("GetModel", pb.GetModelRequest(model_id="m")).slots]
    d.call("RecordMetrics", pb.RecordMetricsRequest(model_id="m", slot_id=mutate_slot[0],
                                                    val_accuracy=55, epoch=3))
    old_state = state_of(d, {"old"})
    check(d.stop() == 0, "missing: SIGTERM exits 0")
    mdir = os.path.join(state, "models", "m.d")
    hdr, _ = st_header(mdir + "/snapshot.safetensors")
    crc = hdr.get("__metadata__", {}).get("kasmina.crc32c", "")
    check(len(crc) == 8 and all(c in "0123456789abcdef" for c in crc),
          "checksum: the snapshot carries kasmina.crc32c (%r)" % crc)
    os.remove(mdir + "/journal")
    # An older kasminad's snapshot: no kasmina.crc32c.
    osnap = os.path.join(state, "models", "old.d", "snapshot.safetensors")
    hdr, data = st_header(osnap)
    hdr["__metadata__"].pop("kasmina.crc32c", None)
    h = json.dumps(hdr, separators=(",", ":")).encode()
    h += b" " * (-(8 + len(h)) % 8)
    open(osnap, "wb").write(struct.pack("<Q", len(h)) + h + data)
    d = up(state, sock, log)
    if d is None:
        return
    ids, quar = listing(d)
    check(ids == ["m", "old"] and not quar, "missing: both models restored (%s, %s)"
          % (ids, sorted(quar)))
    check(state_of(d, {"m"}) == snap_state,
          "missing: the model comes back as its snapshot (generation %d)" % snap_gen)
    check(state_of(d, {"old"}) == old_state,
          "checksum: a snapshot without kasmina.crc32c restores")
    check(os.path.isfile(mdir + "/journal") and os.path.getsize(mdir + "/journal") == 0,
          "missing: an empty journal is recreated")
    check(d.stop() == 0, "missing: SIGTERM exits 0")
    text = open(log).read()
    check("journal %s/journal is missing: model m is restored from snapshot %s/snapshot."
          "safetensors alone (generation %d, i.e. changed after its creation)"
          % (mdir, mdir, snap_gen) in text,
          "missing: the missing journal is reported naming it and the snapshot's generation")
    check("%s has no kasmina.crc32c" % osnap in text,
          "checksum: the unchecked snapshot is logged")


def main():
    with tempfile.TemporaryDirectory(prefix="ksm-hostile-") as tmp:
        for name, fn in (("links", test_links), ("modes", test_modes),
                         ("quarantine", test_quarantine), ("generations", test_generations),
                         ("missing/checksum", test_missing_journal_and_checksum)):
            t0 = time.time()
            fn(tmp)
            print("%s: %.1f s" % (name, time.time() - t0), flush=True)
        if t.FAILS:
            for name in sorted(os.listdir(tmp)):
                if name.endswith(".log"):
                    print("---- %s (tail) ----\n%s" % (name, open(os.path.join(tmp, name))
                                                       .read()[-3000:]))
        for root, dirs, _ in os.walk(tmp):  # let TemporaryDirectory remove everything
            for x in dirs:
                os.chmod(os.path.join(root, x), 0o700)
    print("%d checks, %d failed" % (t.CHECKS, len(t.FAILS)))
    sys.exit(1 if t.FAILS else 0)


if __name__ == "__main__":
    main()
