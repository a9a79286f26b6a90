#!/usr/bin/python3
"""Big weights over the wire, partial exports and per-slot settings (issue 16, part 3), against a
real kasminad on a real socket.

Usage: test_weights_stream.py <kasminad> <dir with the generated stubs and kasmina_client>
                              <kasminactl>

- A transformer whose export is ~80 MB (over the 64 MiB message limits) exports through
  ExportWeightsStream with the default limits (chunks of 2 MiB that a channel with gRPC's default
  4 MiB limit reads, or the chunk_bytes asked for; every CRC-32 right) and
  re-imports through LoadWeightsStream into a second model bit-identically; the unary calls are
  refused with sentences that name max-reply-bytes / max-message-bytes and the streams; the
  Python client streams on its own.
- A stream with a corrupted chunk (DATA_LOSS), chunks out of order, a stream that ends early, a
  wrong blob checksum, a cancelled stream: refused, the model unchanged, the budget released.
- max-weights-bytes bounds one stream and all streams in flight together; stalled streams hold
  no worker (a unary call runs beside two of them on a daemon with one worker).
- ExportWeights(slots, include_host): only those slots (plus the host); the full export is the
  stream's blob byte for byte; a partial blob loads (non-strict) into other models.
- ConfigureSlot: isolate_gradients and auto_forward_gates per slot, validated, acted on by
  StepEpoch, kept across a restart.
- kasminactl: export-weights / load-weights --stream (and automatic), --slot, --include-host,
  --max-message-bytes; configure-slot.
"""
import json
import os
import struct
import subprocess
import sys
import tempfile
import threading
import zlib

BIN, PYDIR, CTL = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, PYDIR)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "helpers"))
import grpc  # noqa: E402
from kasmina.v1 import kasmina_pb2 as pb  # noqa: E402
from kasminad import SERVICE, Kasminad  # noqa: E402
import kasmina_client  # noqa: E402

SC = grpc.StatusCode
FAILS = []
CHECKS = 0
MIB = 1 << 20


def check(cond, what):
    global CHECKS
    CHECKS += 1
    if not cond:
        FAILS.append(what)
        print("FAIL:", what, flush=True)
    return cond


# vocab 16384 x n_embd 512: the tied embedding is 32 MiB and the export writes it twice (as
# torch does), so the file is ~80 MB, over the 64 MiB default message limits.
BIG = pb.TransformerHostSpec(vocab_size=16384, n_embd=512, n_head=8, n_layer=1, block_size=16,
                             num_segments=1)
CNN = pb.CnnHostSpec(num_classes=4, n_blocks=2, base_channels=8, in_channels=3)


def ser(m):
    return m.SerializeToString()


def export_stream(d, mid, ch=None, **kw):
    f = (ch or d.ch).unary_stream(SERVICE + "ExportWeightsStream", request_serializer=ser,
                                  response_deserializer=pb.WeightsChunk.FromString)
    return list(f(pb.ExportWeightsRequest(model_id=mid, **kw), timeout=120))


def load_stream_call(d, ch=None):
    return (ch or d.ch).stream_unary(SERVICE + "LoadWeightsStream", request_serializer=ser,
                                     response_deserializer=pb.LoadWeightsResponse.FromString)


def chunks(blob, mid, n, strict=False, bad_crc=None, bad_blob=False, drop=None, swap=None,
           total=None):
    """The WeightsChunk messages of blob (n bytes each), optionally damaged."""
    out = []
    for i, off in enumerate(range(0, len(blob), n)):
        data = blob[off:off + n]
        c = pb.WeightsChunk(offset=off, data=data, crc32=zlib.crc32(data))
        if off == 0:
            c.model_id, c.total_bytes, c.strict = mid, total or len(blob), strict
        if off + len(data) == len(blob):
            c.blob_crc32 = zlib.crc32(blob) ^ (1 if bad_blob else 0)
        if i == bad_crc:
            c.crc32 ^= 0x10
        out.append(c)
    if swap is not None:
        out[swap], out[swap + 1] = out[swap + 1], out[swap]
    if drop is not None:
        del out[drop]
    return out


def code_of(fn, *a, **kw):
    try:
        fn(*a, **kw)
        return SC.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details() or ""


def st_header(blob):
    """The safetensors header (JSON) of blob."""
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n])


def export(d, mid, **kw):
    return d.call("ExportWeights", pb.ExportWeightsRequest(model_id=mid, **kw)).safetensors


def generation(d, mid):
    return d.call("GetModel", pb.GetModelRequest(model_id=mid)).generation


# ---- 1. an ~80 MB transformer, default message limits ----

def big_weights(d, tmp):
    for mid, seed in (("big", 1), ("big2", 2)):
        d.call("CreateModel", pb.CreateModelRequest(model_id=mid, transformer=BIG, init_seed=seed))
    c, m = d.code("ExportWeights", pb.ExportWeightsRequest(model_id="big"))
    check(c == SC.RESOURCE_EXHAUSTED and "max-reply-bytes = 67108864" in m and
          "ExportWeightsStream" in m,
          "unary ExportWeights of ~80 MB names max-reply-bytes and the stream (%s %r)" % (c, m))

    # A channel with gRPC's own default limits (4 MiB received) reads the stream.
    plain = grpc.insecure_channel("unix:" + d.sock)
    ks = export_stream(d, "big", ch=plain)
    plain.close()
    blob = b"".join(k.data for k in ks)
    check(len(blob) > 64 * MIB, "the export is %d bytes, not over 64 MiB" % len(blob))
    check(len(ks) >= 32 and all(0 < len(k.data) <= 2 * MIB for k in ks),
          "chunks of at most 2 MiB (%d chunks)" % len(ks))
    off = 0
    ok = True
    for k in ks:
        ok &= k.offset == off and k.total_bytes == len(blob) and zlib.crc32(k.data) == k.crc32
        off += len(k.data)
    check(ok, "every chunk in order with total_bytes and a right CRC-32")
    check(ks[-1].blob_crc32 == zlib.crc32(blob) and all(k.blob_crc32 == 0 for k in ks[:-1]),
          "the last chunk carries the blob's CRC-32")
    check(ks[0].model_id == "big", "the first chunk names the model")

    hdr = st_header(blob)
    check("host.tok_emb.weight" in hdr and "host.head.weight" in hdr,
          "the tied weight is in the file under both names")

    g2 = generation(d, "big2")
    r = load_stream_call(d)(iter(chunks(blob, "big2", 5 * MIB, strict=True)), timeout=120)
    check(len(r.loaded) == len(hdr) - 2 and not r.missing and not r.unexpected,
          "LoadWeightsStream loaded every tensor (%d loaded)" % len(r.loaded))
    after2 = b"".join(k.data for k in export_stream(d, "big2"))
    check(after2 == blob and generation(d, "big2") == g2 + 1,
          "the re-imported model (init seed 2, not 1) exports bit-identically")

    # The unary LoadWeights of the same file: refused naming the option and the stream.
    ch2 = grpc.insecure_channel("unix:" + d.sock, options=[("grpc.max_send_message_length", -1)])
    c, m = code_of(ch2.unary_unary(SERVICE + "LoadWeights", request_serializer=ser,
                                   response_deserializer=pb.LoadWeightsResponse.FromString),
                   pb.LoadWeightsRequest(model_id="big2", safetensors=blob), timeout=120)
    ch2.close()
    check(c == SC.RESOURCE_EXHAUSTED and "max-message-bytes = 67108864" in m and
          "LoadWeightsStream" in m and "--max-message-bytes" in m,
          "unary LoadWeights of ~80 MB names max-message-bytes and the stream (%s %r)" % (c, m))

    # The Python client streams by itself with its default 64 MiB limit.
    with kasmina_client.Client("unix:" + d.sock, timeout=120) as cl:
        got = cl.export_weights("big")
        check(got == blob, "kasmina_client.export_weights streamed the big model")
        r = cl.load_weights("big2", blob, strict=True)
        check(len(r.loaded) == len(hdr) - 2, "kasmina_client.load_weights streamed the big file")
        try:
            cl.export_weights("big", stream=False)
            check(False, "kasmina_client.export_weights(stream=False) of 80 MB succeeded")
        except kasmina_client.KasminaError as e:
            check(e.code == SC.RESOURCE_EXHAUSTED and "max-reply-bytes" in e.details,
                  "stream=False: the daemon's sentence (%s)" % e)

    # kasminactl: automatic and --stream, and the unary path's sentence.
    path, path2 = os.path.join(tmp, "big.st"), os.path.join(tmp, "big-s.st")
    ctl = [CTL, "--socket", d.sock, "--deadline", "120000"]
    p = subprocess.run(ctl + ["export-weights", "--stream", "big", path], capture_output=True,
                       text=True)
    check(p.returncode == 0 and open(path, "rb").read() == blob,
          "kasminactl export-weights --stream of an 80 MB model (%d %s)" % (p.returncode, p.stderr))
    p = subprocess.run(ctl + ["export-weights", "--no-stream", "big", path2], capture_output=True,
                       text=True)
    check(p.returncode == 7 and "max-reply-bytes" in p.stderr and "--stream" in p.stderr,
          "kasminactl export-weights --no-stream names max-reply-bytes and --stream (%d %s)" %
          (p.returncode, p.stderr))
    p = subprocess.run(ctl + ["load-weights", "--no-stream", "big2", path], capture_output=True,
                       text=True)
    check(p.returncode == 7 and "client's max message size" in p.stderr and
          "--max-message-bytes" in p.stderr and "--stream" in p.stderr,
          "kasminactl load-weights --no-stream names the client's limit (%d %s)" %
          (p.returncode, p.stderr))
    p = subprocess.run(ctl + ["--max-message-bytes", "100M", "load-weights", "--no-stream",
                              "big2", path], capture_output=True, text=True)
    check(p.returncode == 7 and "max-message-bytes = 67108864" in p.stderr,
          "with --max-message-bytes 100M the daemon's limit is named (%d %s)" %
          (p.returncode, p.stderr))
    p = subprocess.run(ctl + ["--json", "load-weights", "--strict", "big2", path],
                       capture_output=True, text=True)
    check(p.returncode == 0 and len(json.loads(p.stdout)["loaded"]) == len(hdr) - 2,
          "kasminactl load-weights streams an 80 MB file (%d %s)" % (p.returncode, p.stderr))
    d.call("DeleteModel", pb.DeleteModelRequest(model_id="big"))
    d.call("DeleteModel", pb.DeleteModelRequest(model_id="big2"))


# ---- 2. broken streams change nothing ----

def broken_streams(d):
    d.call("CreateModel", pb.CreateModelRequest(model_id="s", cnn=CNN, init_seed=1))
    d.call("CreateModel", pb.CreateModelRequest(model_id="t", cnn=CNN, init_seed=2))
    src = export(d, "s")
    t0, g0 = export(d, "t"), generation(d, "t")
    n = 1024
    check(len(src) > 6 * n, "the small blob spans several chunks (%d bytes)" % len(src))
    ld = load_stream_call(d)

    def unchanged(what):
        check(export(d, "t") == t0 and generation(d, "t") == g0, what + ": t is unchanged")

    c, m = code_of(ld, iter(chunks(src, "t", n, bad_crc=3)), timeout=30)
    check(c == SC.DATA_LOSS and "Chunk 3" in m and "CRC-32" in m,
          "a corrupted chunk: DATA_LOSS naming it (%s %r)" % (c, m))
    unchanged("corrupted chunk")
    c, m = code_of(ld, iter(chunks(src, "t", n, swap=2)), timeout=30)
    check(c == SC.INVALID_ARGUMENT and "offset" in m, "chunks out of order (%s %r)" % (c, m))
    unchanged("out of order")
    c, m = code_of(ld, iter(chunks(src, "t", n, drop=1)), timeout=30)
    check(c == SC.INVALID_ARGUMENT and "offset" in m, "a missing chunk (%s %r)" % (c, m))
    c, m = code_of(ld, iter(chunks(src, "t", n)[:-1]), timeout=30)
    check(c == SC.INVALID_ARGUMENT and "ended after" in m and "nothing was loaded" in m,
          "a stream that ends early (%s %r)" % (c, m))
    unchanged("ended early")
    c, m = code_of(ld, iter(chunks(src, "t", n, bad_blob=True)), timeout=30)
    check(c == SC.DATA_LOSS and "blob_crc32" in m, "a wrong blob CRC-32 (%s %r)" % (c, m))
    unchanged("wrong blob CRC")
    c, m = code_of(ld, iter([]), timeout=30)
    check(c == SC.INVALID_ARGUMENT, "an empty stream (%s %r)" % (c, m))
    c, m = code_of(ld, iter(chunks(src, "nope", n)), timeout=30)
    check(c == SC.NOT_FOUND, "a stream for a missing model (%s %r)" % (c, m))
    k = chunks(src, "t", n)
    k[1].model_id = "s"
    c, m = code_of(ld, iter(k), timeout=30)
    check(c == SC.INVALID_ARGUMENT and "model_id" in m, "a chunk naming another model (%s)" % m)
    c, m = code_of(ld, iter(chunks(src, "t", n, total=len(src) - 10)), timeout=30)
    check(c == SC.INVALID_ARGUMENT and "past total_bytes" in m, "data past total_bytes (%s)" % m)
    c, m = code_of(ld, iter(chunks(src, "t", n, total=300 * MIB)), timeout=30)
    check(c == SC.RESOURCE_EXHAUSTED and "max-weights-bytes = %d" % (200 * MIB) in m,
          "total_bytes over max-weights-bytes (%s %r)" % (c, m))
    c, m = code_of(lambda: export_stream(d, "nope"))
    check(c == SC.NOT_FOUND, "ExportWeightsStream of a missing model (%s)" % c)
    c, m = code_of(lambda: export_stream(d, "s", slots=["r9c9"]))
    check(c == SC.INVALID_ARGUMENT and "r9c9" in m, "ExportWeightsStream of a missing slot (%s)" % m)

    # A stream the client cancels after two chunks; one holding 150 of the 200 MiB budget.
    gate = threading.Event()

    def held(cs, k):
        for i, x in enumerate(cs):
            if i == k:
                gate.wait(30)
                return
            yield x
    f = ld.future(held(chunks(src, "t", n), 2), timeout=60)
    big = chunks(b"\0" * n, "t", n, total=150 * MIB)[0]
    g = ld.future(held([big, big], 1), timeout=60)
    # g's first chunk reserved 150 MiB: another 100 MiB stream does not fit beside it.
    import time
    deadline = time.time() + 20
    c = SC.OK
    while time.time() < deadline:
        c, m = code_of(ld, iter(chunks(b"\0" * n, "t", n, total=100 * MIB)[:1]), timeout=30)
        if c == SC.RESOURCE_EXHAUSTED:
            break
        time.sleep(0.05)  # g's first chunk not taken yet: poll (no timed assertion)
    check(c == SC.RESOURCE_EXHAUSTED and "bounds them together" in m,
          "streams in flight share max-weights-bytes (%s %r)" % (c, m))
    # The stalled streams hold no worker: with --workers 1, a call that needs one still runs.
    c, m = d.code("ListModels", pb.ListModelsRequest(), timeout=30)
    check(c == SC.OK, "ListModels beside two stalled streams on one worker (%s %r)" % (c, m))
    f.cancel()
    g.cancel()
    gate.set()
    check(f.cancelled() and g.cancelled(), "the client cancelled both streams")
    unchanged("cancelled stream")
    # Their reservations were released: 190 MiB fits again (the stream then ends early).
    deadline = time.time() + 20
    while time.time() < deadline:
        c, m = code_of(ld, iter(chunks(b"\0" * n, "t", n, total=190 * MIB)[:1]), timeout=30)
        if c != SC.RESOURCE_EXHAUSTED:
            break
        time.sleep(0.05)  # the cancellations reach the daemon asynchronously
    check(c == SC.INVALID_ARGUMENT and "ended after" in m,
          "after the cancellations the budget is free again (%s %r)" % (c, m))
    ks = export_stream(d, "s", chunk_bytes=4096)
    check(len(ks) > 1 and all(len(k.data) == 4096 for k in ks[:-1]) and
          b"".join(k.data for k in ks) == src, "chunk_bytes 4096: the same blob in 4 KiB chunks")
    c, m = code_of(lambda: export_stream(d, "s", chunk_bytes=100))
    check(c == SC.INVALID_ARGUMENT and "chunk_bytes" in m, "chunk_bytes 100 refused (%s)" % m)
    # A good stream still works, with odd chunk sizes.
    r = ld(iter(chunks(src, "t", 1000, strict=True)), timeout=30)
    check(len(r.loaded) > 0 and export(d, "t") == src, "a good stream after all that loads")


# ---- 3. partial exports ----

def partial_exports(d):
    d.call("CreateModel", pb.CreateModelRequest(model_id="p", cnn=CNN, init_seed=3,
                                                permissive_gates=True))
    d.call("Germinate", pb.GerminateRequest(model_id="p", slot_id="r0c0", blueprint_id="norm"))
    d.call("Germinate", pb.GerminateRequest(model_id="p", slot_id="r0c1",
                                            blueprint_id="conv_light", init_seed=4))
    full = export(d, "p")
    check(b"".join(k.data for k in export_stream(d, "p")) == full,
          "the full unary export is the stream's blob byte for byte")
    fh = st_header(full)
    check(any(k.startswith("host.") for k in fh) and
          any(k.startswith("seed_slots.r0c0.") for k in fh) and
          not any(k.startswith("kasmina.") for k in fh["__metadata__"]),
          "the full export has everything and no kasmina.* keys")

    one = export(d, "p", slots=["r0c1"])
    h = st_header(one)
    names = [k for k in h if k != "__metadata__"]
    check(names and all(k.startswith("seed_slots.r0c1.seed.") for k in names),
          "slots=[r0c1]: only r0c1's tensors (%s)" % names[:3])
    check(sorted(h["__metadata__"]) == ["seed_slots.r0c1._extra_state"],
          "slots=[r0c1]: only r0c1's extra state (%s)" % sorted(h["__metadata__"]))
    withhost = export(d, "p", slots=["r0c1"], include_host=True)
    hh = st_header(withhost)
    check(any(k.startswith("host.") for k in hh) and
          not any(k.startswith("seed_slots.r0c0") for k in hh) and
          all(hh[k] == fh[k] or k == "__metadata__" for k in hh if k.startswith("host.")),
          "include_host adds the host's tensors, not r0c0's")
    check(b"".join(k.data for k in export_stream(d, "p", slots=["r0c1"])) == one,
          "ExportWeightsStream honours slots")
    for bad, want in ((["r0c1", "r0c1"], "twice"), (["zz"], "zz"), ([""], "slots[0]")):
        c, m = d.code("ExportWeights", pb.ExportWeightsRequest(model_id="p", slots=bad))
        check(c == SC.INVALID_ARGUMENT and want in m, "slots=%r refused (%s %r)" % (bad, c, m))

    # A partial blob loads into a fresh model: the slot is restored, the host replaced.
    d.call("CreateModel", pb.CreateModelRequest(model_id="q", cnn=CNN, init_seed=9,
                                                permissive_gates=True))
    r = d.call("LoadWeights", pb.LoadWeightsRequest(model_id="q", safetensors=withhost))
    check(not r.missing and not r.unexpected and len(r.loaded) == len(hh) - 1,
          "q took host + r0c1 (%d loaded, missing %s)" % (len(r.loaded), list(r.missing)[:3]))
    rq = {s.slot_id: s for s in d.call("GetSlotReports",
                                       pb.GetSlotReportsRequest(model_id="q")).slots}
    check(rq["r0c1"].occupied and rq["r0c1"].blueprint_id == "conv_light" and
          not rq["r0c0"].occupied, "q's r0c1 restored, r0c0 still empty")
    qh = st_header(export(d, "q", slots=["r0c1"], include_host=True))
    check({k: v for k, v in qh.items() if k != "__metadata__"} ==
          {k: v for k, v in hh.items() if k != "__metadata__"},
          "q exports the same host and r0c1 tensors as p")
    check(export(d, "q", slots=["r0c1"], include_host=True) == withhost,
          "q's partial export is p's, byte for byte")
    # Into a model with a live seed in another slot: that seed keeps its tensors.
    d.call("CreateModel", pb.CreateModelRequest(model_id="q2", cnn=CNN, init_seed=9,
                                                permissive_gates=True))
    d.call("Germinate", pb.GerminateRequest(model_id="q2", slot_id="r0c0", blueprint_id="norm",
                                            init_seed=7))
    q2_r0c0 = export(d, "q2", slots=["r0c0"])
    r = d.call("LoadWeights", pb.LoadWeightsRequest(model_id="q2", safetensors=one))
    check(r.missing and all(m.startswith("host.") or m.startswith("seed_slots.r0c0.")
                            for m in r.missing),
          "q2: the host's and r0c0's tensors are listed missing (%s)" % list(r.missing)[:4])
    check(export(d, "q2", slots=["r0c0"]) == q2_r0c0, "q2's r0c0 seed is unchanged")
    c, m = d.code("LoadWeights", pb.LoadWeightsRequest(model_id="q2", safetensors=one,
                                                       strict=True))
    check(c == SC.INVALID_ARGUMENT and "missing" in m, "a strict load of a partial blob (%s)" % m)


# ---- 4. per-slot settings, across a restart ----

def slot_settings(tmp):
    state = os.path.join(tmp, "state")

    def start():
        return Kasminad(BIN, tmp + "/run2/k.sock", tmp + "/kasminad2.log", "--no-cuda",
                        "--cpu-devices", "1", state_dir=state)
    d = start()
    try:
        d.call("CreateModel", pb.CreateModelRequest(model_id="c", cnn=CNN, permissive_gates=True,
                                                    slots=["r0c0", "r0c1"]))
        r = d.call("ConfigureSlot", pb.ConfigureSlotRequest(
            model_id="c", slot_id="r0c1", auto_forward_gates=pb.GateLevels(gates=[pb.GATE_G1])))
        check(len(r.slots) == 1 and list(r.slots[0].auto_forward_gates) == [pb.GATE_G1] and
              not r.slots[0].isolate_gradients, "r0c1 auto-forwards through G1")
        r = d.call("ConfigureSlot", pb.ConfigureSlotRequest(model_id="c", slot_id="r0c0",
                                                            isolate_gradients=True))
        check(r.slots[0].isolate_gradients and not r.slots[0].auto_forward_gates,
              "r0c0 isolates gradients (an empty slot reports its settings)")
        for bad, want in ((pb.ConfigureSlotRequest(model_id="c", slot_id="r0c0",
                                                   auto_forward_gates=pb.GateLevels(
                                                       gates=[pb.GATE_G0])), "GATE_G1"),
                          (pb.ConfigureSlotRequest(model_id="c", slot_id="r9c9",
                                                   isolate_gradients=False), "r9c9"),
                          (pb.ConfigureSlotRequest(model_id="c", slot_id="r0c0",
                                                   auto_forward_gates=pb.GateLevels(
                                                       gates=[7])), "GateLevel")):
            c, m = d.code("ConfigureSlot", bad)
            check(c == SC.INVALID_ARGUMENT and want in m, "refused: %s (%s %r)" % (want, c, m))
        c, m = d.code("ConfigureSlot", pb.ConfigureSlotRequest(model_id="nope"))
        check(c == SC.NOT_FOUND, "ConfigureSlot of a missing model (%s)" % c)
        r = d.call("ConfigureSlot", pb.ConfigureSlotRequest(model_id="c"))
        check(len(r.slots) == 2, "slot_id '' with nothing set reports every slot")
        for s in ("r0c0", "r0c1"):
            d.call("Germinate", pb.GerminateRequest(model_id="c", slot_id=s, blueprint_id="norm"))
        st = {s.slot_id: s.stage for s in
              d.call("StepEpoch", pb.StepEpochRequest(model_id="c")).slots}
        check(st == {"r0c0": pb.STAGE_GERMINATED, "r0c1": pb.STAGE_TRAINING},
              "StepEpoch auto-advanced only r0c1 through G1 (%s)" % st)
        with kasmina_client.Client("unix:" + d.sock) as cl:
            r = cl.configure_slot("c", "r0c0", auto_forward_gates=("G1", "G2"))
            check(list(r[0].auto_forward_gates) == [pb.GATE_G1, pb.GATE_G2] and
                  r[0].isolate_gradients, "kasmina_client.configure_slot keeps isolate_gradients")
            r = cl.configure_slot("c", "r0c0", auto_forward_gates=("G1",))
        p = subprocess.run([CTL, "--socket", d.sock, "configure-slot", "c", "r0c1",
                            "--isolate-gradients", "false", "--auto-forward", "G2,G3"],
                           capture_output=True, text=True)
        check(p.returncode == 0 and "r0c1     false             G2,G3" in p.stdout,
              "kasminactl configure-slot (%d %r %s)" % (p.returncode, p.stdout, p.stderr))
        p = subprocess.run([CTL, "--socket", d.sock, "--json", "configure-slot", "c"],
                           capture_output=True, text=True)
        got = json.loads(p.stdout) if p.returncode == 0 else []
        check([(s["slot_id"], s["auto_forward_gates"]) for s in got] ==
              [("r0c0", ["G1"]), ("r0c1", ["G2", "G3"])],
              "kasminactl --json configure-slot reports every slot (%s)" % got)
        p = subprocess.run([CTL, "--socket", d.sock, "configure-slot", "c", "--auto-forward",
                            "G0"], capture_output=True, text=True)
        check(p.returncode == 2, "kasminactl refuses --auto-forward G0 (%d)" % p.returncode)
        want = {s.slot_id: (s.isolate_gradients, list(s.auto_forward_gates)) for s in
                d.call("GetSlotReports", pb.GetSlotReportsRequest(model_id="c")).slots}
    finally:
        rc = d.stop()
    check(rc == 0, "kasminad exited %s" % rc)
    check(want == {"r0c0": (True, [pb.GATE_G1]), "r0c1": (False, [pb.GATE_G2, pb.GATE_G3])},
          "settings before the restart: %s" % want)
    d = start()
    try:
        got = {s.slot_id: (s.isolate_gradients, list(s.auto_forward_gates)) for s in
               d.call("GetSlotReports", pb.GetSlotReportsRequest(model_id="c")).slots}
        check(got == want, "per-slot settings survive a restart (%s vs %s)" % (got, want))
        st = {s.slot_id: s.stage for s in
              d.call("StepEpoch", pb.StepEpochRequest(model_id="c")).slots}
        check(st["r0c0"] == pb.STAGE_TRAINING,
              "after the restart r0c0 auto-advances through G1 (%s)" % st)
    finally:
        rc = d.stop()
    check(rc == 0, "kasminad exited %s after the restart" % rc)


def main():
    with tempfile.TemporaryDirectory() as tmp:
        d = Kasminad(BIN, tmp + "/run/k.sock", tmp + "/kasminad.log", "--no-cuda", "--no-persist",
                     "--cpu-devices", "1", "--max-weights-bytes", "200M", "--workers", "1",
                     timeout=120)
        try:
            big_weights(d, tmp)
            broken_streams(d)
            partial_exports(d)
            check(d.health() == 1, "the daemon still serves")
        finally:
            rc = d.stop()
        check(rc == 0, "kasminad exited %s" % rc)
        slot_settings(tmp)
    print("%d checks, %d failed" % (CHECKS, len(FAILS)))
    print("%d passed, %d failed" % (CHECKS - len(FAILS), len(FAILS)))
    sys.exit(1 if FAILS else 0)


if __name__ == "__main__":
    main()
