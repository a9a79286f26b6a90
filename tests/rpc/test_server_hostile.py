#!/usr/bin/python3
"""Hostile input must never cost data or availability (issue 12): real kasminad daemons on
temporary Unix sockets, driven by grpcio.

Usage: test_server_hostile.py <kasminad> <dir with generated kasmina/v1/kasmina_pb2.py and health_pb2.py>

1. Compressed requests, refused by default: a gzip or deflate Forward, a compressed WatchEvents
   and a compressed health check get UNIMPLEMENTED naming --allow-compressed-requests; five
   600 MB gzip bombs (0.6 MB on the wire) leave kasminad's RSS and peak RSS within 100 MB of where
   they were, and a concurrent GetServerInfo on another connection stays under 1 s.
2. Compressed requests, allowed (with a token): gzip and deflate Forwards give the same output
   as an uncompressed one; bombs without the token get UNAUTHENTICATED with no inflation (peak
   RSS within 64 MB although max-message-bytes is 256M); a bomb with the token gets
   RESOURCE_EXHAUSTED naming max-message-bytes, the RSS back within 100 MB.
3. 1,000 calls with a wrong bearer token write at most a handful of log lines, and the lines
   account for every refusal (logged + "N more refusals not logged").
4. --metrics-listen on a non-loopback address: start-up fails naming --metrics-allow-remote;
   with that option kasminad serves /metrics.
5. max-reply-bytes: a Forward or an Evaluate(return_logits) whose logits would be over 64 MiB
   (default) is refused before compute (RESOURCE_EXHAUSTED naming max-reply-bytes, fast, no RSS
   growth); a smaller one runs; ExportWeights over --max-reply-bytes 1M is refused.
"""
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

BIN, PYDIR = sys.argv[1], sys.argv[2]
sys.path.insert(0, PYDIR)
import grpc  # noqa: E402
from kasmina.v1 import kasmina_pb2 as pb  # noqa: E402
import health_pb2  # noqa: E402
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "helpers"))
from kasminad import Kasminad, unary  # noqa: E402

SC = grpc.StatusCode
FAILS = []
CHECKS = 0
MB = 1 << 20
TOKEN = "s3cret-token-for-hostile-tests"


def check(cond, what):
    global CHECKS
    CHECKS += 1
    print(("ok:   " if cond else "FAIL: ") + what, flush=True)
    if not cond:
        FAILS.append(what)


class Daemon(Kasminad):
    def __init__(self, tmp, name, *extra, wait=True):
        super().__init__(BIN, os.path.join(tmp, name, "k.sock"), os.path.join(tmp, name + ".log"),
                         "--no-cuda", "--no-persist", "--demo", *extra, log_mode="w+",
                         max_receive=64 * MB, max_send=-1, connect=wait)

    def mem(self):
        """(VmRSS, VmHWM) of kasminad in MB."""
        d = {}
        with open("/proc/%d/status" % self.p.pid) as f:
            for line in f:
                k, v = line.split(":", 1)
                if k in ("VmRSS", "VmHWM"):
                    d[k] = int(v.split()[0]) / 1024.0
        return d["VmRSS"], d["VmHWM"]

    def stop(self):
        for ch in self.channels:
            ch.close()
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.p.kill()
        self.close()


def code_of(fn, req, **kw):
    try:
        fn(req, **kw)
        return SC.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details() or ""


def auth(token=TOKEN):
    return [("authorization", "Bearer " + token)]


def zeros_forward(nbytes, model="demo"):
    """A Forward of the demo CNN ([B, 3, 32, 32] f32) whose input is nbytes of zeros, serialized."""
    rows = max(1, nbytes // (4 * 3 * 32 * 32))
    return pb.ForwardRequest(model_id=model, input=pb.Tensor(
        dtype=pb.DTYPE_F32, shape=[rows, 3, 32, 32], data=bytes(rows * 3 * 32 * 32 * 4))).SerializeToString()


POLLER = r"""
import sys, time, grpc
sock, token = sys.argv[1], sys.argv[2]
ch = grpc.insecure_channel("unix:" + sock)
fn = ch.unary_unary("/kasmina.v1.Kasmina/GetServerInfo")
md = [("authorization", "Bearer " + token)] if token else None
worst, n, errors = 0.0, 0, 0
while sys.stdin.readline().strip() != "stop":
    t = time.monotonic()
    try:
        fn(b"", timeout=30, metadata=md)
    except grpc.RpcError:
        errors += 1
    worst = max(worst, time.monotonic() - t)
    n += 1
    sys.stdout.write("next\n")
    sys.stdout.flush()
print(worst, n, errors, flush=True)
"""


class Poller:
    """GetServerInfo in a loop from a process (and connection) of its own, so that the client's
    own work (grpcio compressing 600 MB) does not count; records the slowest call."""

    def __init__(self, d, token=""):
        self.p = subprocess.Popen([sys.executable, "-c", POLLER, d.sock, token],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.stop_ = False
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        while not self.stop_:
            self.p.stdin.write("go\n")
            self.p.stdin.flush()
            self.p.stdout.readline()
            time.sleep(0.02)

    def stop(self):
        self.stop_ = True
        self.t.join()
        out, _ = self.p.communicate("stop\n", timeout=60)
        w, n, e = out.split()
        self.worst, self.n, self.errors = float(w), int(n), int(e)


def bombs(d, n, bomb, metadata=None):
    """Sends n gzip bombs; returns [(code, details)]."""
    fwd = unary(d.channel(), "Forward")
    out = []
    for _ in range(n):
        out.append(code_of(fwd, bomb, timeout=120, compression=grpc.Compression.Gzip,
                           metadata=metadata))
    return out


# ---- 1. compressed requests refused by default ----

def compression_refused(tmp, bomb):
    d = Daemon(tmp, "refuse")
    try:
        small = zeros_forward(2 * 3 * 32 * 32 * 4)
        plain = unary(d.ch, "Forward", pb.ForwardResponse)
        c, _ = code_of(plain, small, timeout=10)
        check(c == SC.OK, "an uncompressed Forward works (%s)" % c)
        for comp in (grpc.Compression.Gzip, grpc.Compression.Deflate):
            fwd = unary(d.channel(compression=comp), "Forward", pb.ForwardResponse)
            c, msg = code_of(fwd, small, timeout=10)
            check(c == SC.UNIMPLEMENTED and "--allow-compressed-requests" in msg,
                  "%s Forward refused naming --allow-compressed-requests (%s %r)" % (comp, c, msg))
        zch = d.channel(compression=grpc.Compression.Gzip)
        w = zch.unary_stream("/kasmina.v1.Kasmina/WatchEvents",
                             request_serializer=pb.WatchEventsRequest.SerializeToString,
                             response_deserializer=pb.LifecycleEvent.FromString)
        try:
            for _ in w(pb.WatchEventsRequest(model_id="m" * 60), timeout=5):
                pass
            c, msg = SC.OK, ""
        except grpc.RpcError as e:
            c, msg = e.code(), e.details() or ""
        check(c == SC.UNIMPLEMENTED and "--allow-compressed-requests" in msg,
              "compressed WatchEvents refused naming the option (%s %r)" % (c, msg))
        h = zch.unary_unary("/grpc.health.v1.Health/Check",
                            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                            response_deserializer=health_pb2.HealthCheckResponse.FromString)
        c, msg = code_of(h, health_pb2.HealthCheckRequest(service="x" * 4000), timeout=5)
        check(c == SC.UNIMPLEMENTED and "--allow-compressed-requests" in msg,
              "compressed health check refused naming the option (%s %r)" % (c, msg))
        # A message too small to gain from compression goes uncompressed on a gzip channel.
        r = h(health_pb2.HealthCheckRequest(service="kasmina.v1.Kasmina"), timeout=5)
        check(r.status == health_pb2.HealthCheckResponse.SERVING,
              "a gzip channel's short health check is SERVING")

        rss0, hwm0 = d.mem()
        poll = Poller(d)
        t = time.monotonic()
        res = bombs(d, 5, bomb)
        took = time.monotonic() - t
        poll.stop()
        rss1, hwm1 = d.mem()
        print("  5 bombs of %d MB (%.1f s): RSS %.0f -> %.0f MB, peak %.0f -> %.0f MB; "
              "GetServerInfo worst %.3f s over %d calls" %
              (len(bomb) // MB, took, rss0, rss1, hwm0, hwm1, poll.worst, poll.n))
        check(all(c == SC.UNIMPLEMENTED and "--allow-compressed-requests" in m for c, m in res),
              "every bomb refused naming the option: %s" % set(c for c, _ in res))
        check(rss1 - rss0 < 100, "RSS grew %.0f MB (< 100) over 5 bombs" % (rss1 - rss0))
        check(hwm1 - hwm0 < 100, "peak RSS grew %.0f MB (< 100) over 5 bombs" % (hwm1 - hwm0))
        check(poll.n > 0 and not poll.errors and poll.worst < 1.0,
              "concurrent GetServerInfo: worst %.3f s (< 1 s), %d errors" % (poll.worst, poll.errors))
    finally:
        d.stop()


# ---- 2. compressed requests allowed, with a token ----

def compression_allowed(tmp, bomb, token_file):
    d = Daemon(tmp, "allow", "--allow-compressed-requests", "--token-file", token_file,
               "--max-message-bytes", "256M")
    try:
        small = zeros_forward(2 * 3 * 32 * 32 * 4)
        want = unary(d.ch, "Forward", pb.ForwardResponse)(small, timeout=10, metadata=auth())
        for comp in (grpc.Compression.Gzip, grpc.Compression.Deflate):
            fwd = unary(d.channel(compression=comp), "Forward", pb.ForwardResponse)
            try:
                got = fwd(small, timeout=10, metadata=auth())
                same = got.output == want.output
            except grpc.RpcError as e:
                same = "%s %s" % (e.code(), e.details())
            check(same is True, "%s Forward with the token = the uncompressed reply (%s)" % (comp, same))

        rss0, hwm0 = d.mem()
        res = bombs(d, 3, bomb)
        rss1, hwm1 = d.mem()
        print("  3 bombs without a token: RSS %.0f -> %.0f MB, peak %.0f -> %.0f MB" %
              (rss0, rss1, hwm0, hwm1))
        check(all(c == SC.UNAUTHENTICATED for c, _ in res),
              "bombs without the token: UNAUTHENTICATED (%s)" % set(c for c, _ in res))
        check(hwm1 - hwm0 < 64, "nothing inflated before authentication: peak RSS grew %.0f MB "
              "(< 64; max-message-bytes is 256M)" % (hwm1 - hwm0))

        poll = Poller(d, TOKEN)
        res = bombs(d, 3, bomb, metadata=auth())
        poll.stop()
        rss2, hwm2 = d.mem()
        print("  3 bombs with the token: RSS %.0f -> %.0f MB, peak %.0f -> %.0f MB; "
              "GetServerInfo worst %.3f s" % (rss1, rss2, hwm1, hwm2, poll.worst))
        check(all(c == SC.RESOURCE_EXHAUSTED and "max-message-bytes = 268435456" in m
                  for c, m in res),
              "bombs with the token: RESOURCE_EXHAUSTED naming max-message-bytes (%s)" % res[:1])
        check(hwm2 - hwm1 < 256 + 64, "inflation stopped at the cap: peak RSS grew %.0f MB"
              % (hwm2 - hwm1))
        check(rss2 - rss1 < 100, "RSS back after the capped bombs: grew %.0f MB (< 100)"
              % (rss2 - rss1))
        check(poll.n > 0 and not poll.errors and poll.worst < 1.0,
              "concurrent GetServerInfo: worst %.3f s (< 1 s)" % poll.worst)
    finally:
        d.stop()


# ---- 3. bad-token log lines ----

def bad_token_logging(tmp, token_file):
    d = Daemon(tmp, "badtoken", "--token-file", token_file)
    try:
        info = unary(d.ch, "GetServerInfo")
        c, _ = code_of(info, b"", timeout=5, metadata=auth())
        check(c == SC.OK, "GetServerInfo with the token works")
        n = 1000
        codes = set()
        t = time.monotonic()
        for i in range(n):
            codes.add(code_of(info, b"", timeout=5, metadata=auth("wrong-%d" % i))[0])
        took = time.monotonic() - t
        check(codes == {SC.UNAUTHENTICATED}, "1000 wrong tokens: UNAUTHENTICATED (%s)" % codes)
        time.sleep(1.1)
        code_of(info, b"", timeout=5)  # no token: one more refusal, its line counts the rest
        time.sleep(0.2)
        lines = [l for l in d.logtext().splitlines() if "refused:" in l]
        left_out = sum(int(m) for m in re.findall(r"and (\d+) more refusals not logged", "\n".join(lines)))
        print("  %d refusals in %.1f s: %d log lines, %d refusals left out" %
              (n + 1, took, len(lines), left_out))
        check(2 <= len(lines) <= 2 + int(took) + 2,
              "%d log lines for %d refusals in %.1f s (at most one a second)" % (len(lines), n + 1, took))
        check(len(lines) + left_out == n + 1,
              "the lines account for every refusal: %d logged + %d left out = %d" %
              (len(lines), left_out, n + 1))
        check(TOKEN not in d.logtext() and "wrong-1" not in d.logtext(), "no token is logged")
    finally:
        d.stop()


# ---- 4. metrics on a non-loopback address ----

def metrics_remote(tmp):
    d = Daemon(tmp, "metrics-refused", "--metrics-listen", "0.0.0.0:0", wait=False)
    try:
        rc = d.p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        rc = None
    text = d.logtext()
    d.stop()
    check(rc not in (None, 0), "kasminad --metrics-listen 0.0.0.0:0 exits at start-up (rc %s)" % rc)
    check("--metrics-allow-remote" in text,
          "the start-up error names --metrics-allow-remote: %r" % text.strip().splitlines()[-1:])

    d = Daemon(tmp, "metrics-remote", "--metrics-listen", "0.0.0.0:0", "--metrics-allow-remote")
    try:
        m = None
        for _ in range(100):
            m = re.search(r"serving http://0\.0\.0\.0:(\d+)/", d.logtext())
            if m:
                break
            time.sleep(0.05)
        check(m is not None, "with --metrics-allow-remote the exporter serves on 0.0.0.0")
        if m:
            body = urllib.request.urlopen("http://127.0.0.1:%s/metrics" % m.group(1), timeout=10).read()
            check(b"kasmina_build_info" in body, "/metrics answers")
        check("not on loopback" in d.logtext(), "and it warns that it is not on loopback")
    finally:
        d.stop()


# ---- 5. max-reply-bytes ----

TF = pb.TransformerHostSpec(vocab_size=50257, n_embd=32, n_head=2, n_layer=3, block_size=256,
                            num_segments=3)


def tokens(b, t):
    return pb.Tensor(dtype=pb.DTYPE_I64, shape=[b, t], data=bytes(8 * b * t))


def max_reply(tmp):
    d = Daemon(tmp, "reply")
    try:
        unary(d.ch, "CreateModel", pb.Model)(
            pb.CreateModelRequest(model_id="tf", transformer=TF, init_seed=1), timeout=30)
        fwd = unary(d.ch, "Forward", pb.ForwardResponse)
        rss0, _ = d.mem()
        t = time.monotonic()
        # [2, 256] tokens x 50257 classes x 4 bytes = 103 MB of logits.
        c, msg = code_of(fwd, pb.ForwardRequest(model_id="tf", input=tokens(2, 256)), timeout=60)
        took = time.monotonic() - t
        rss1, _ = d.mem()
        print("  Forward [2, 256] of a 50257-token vocabulary: %s in %.3f s, RSS %.0f -> %.0f MB: %s"
              % (c, took, rss0, rss1, msg))
        check(c == SC.RESOURCE_EXHAUSTED and "max-reply-bytes = 67108864" in msg,
              "a 103 MB Forward reply is refused naming max-reply-bytes (%s %r)" % (c, msg))
        check(took < 1.0 and rss1 - rss0 < 50,
              "refused before compute: %.3f s, RSS grew %.0f MB" % (took, rss1 - rss0))
        c, msg = code_of(fwd, pb.ForwardRequest(model_id="tf", input=tokens(2, 256),
                                                output_dtype=pb.DTYPE_BF16), timeout=60)
        check(c == SC.OK, "the same Forward in bf16 (51 MB) runs (%s %s)" % (c, msg))
        ev = unary(d.ch, "Evaluate", pb.EvaluateResponse)
        req = pb.EvaluateRequest(model_id="tf", input=tokens(2, 256), targets=tokens(2, 256),
                                 generate_standard=True, return_logits=True)
        c, msg = code_of(ev, req, timeout=60)
        check(c == SC.RESOURCE_EXHAUSTED and "max-reply-bytes" in msg,
              "Evaluate with 103 MB of logits refused naming max-reply-bytes (%s %r)" % (c, msg))
        req.return_logits = False
        c, msg = code_of(ev, req, timeout=60)
        check(c == SC.OK, "the same Evaluate without logits runs (%s %s)" % (c, msg))
    finally:
        d.stop()
    d = Daemon(tmp, "reply-1m", "--max-reply-bytes", "1M")
    try:
        unary(d.ch, "CreateModel", pb.Model)(
            pb.CreateModelRequest(model_id="tf", transformer=TF, init_seed=1), timeout=30)
        exp = unary(d.ch, "ExportWeights", pb.ExportWeightsResponse)
        c, msg = code_of(exp, pb.ExportWeightsRequest(model_id="tf"), timeout=60)
        check(c == SC.RESOURCE_EXHAUSTED and "max-reply-bytes = 1048576" in msg,
              "ExportWeights of a 7 MB model under --max-reply-bytes 1M refused (%s %r)" % (c, msg))
        c, msg = code_of(exp, pb.ExportWeightsRequest(model_id="demo"), timeout=60)
        check(c == SC.OK, "ExportWeights of the small demo model runs (%s %s)" % (c, msg))
    finally:
        d.stop()


def main():
    tmp = tempfile.mkdtemp(prefix="kasmina-hostile-")
    token_file = os.path.join(tmp, "token")
    with open(os.open(token_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write(TOKEN + "\n")
    only = sys.argv[3:]  # optional: names of the parts to run
    parts = ["compression", "token-log", "metrics", "max-reply"]
    if not only or "token-log" in only:
        bad_token_logging(tmp, token_file)
    if not only or "metrics" in only:
        metrics_remote(tmp)
    if not only or "max-reply" in only:
        max_reply(tmp)
    if not only or "compression" in only:
        # 600 MB of zeros: 0.6 MB once gzip-compressed (grpcio compresses it per call).
        bomb = zeros_forward(600 * MB)
        compression_refused(tmp, bomb)
        compression_allowed(tmp, bomb, token_file)
    assert all(p in parts for p in only), only
    if FAILS:
        print("rpc_hostile: %d of %d checks failed" % (len(FAILS), CHECKS))
        sys.exit(1)
    print("rpc_hostile: %d checks passed" % CHECKS)


main()
