"""A real kasminad on a temporary Unix socket, for the Python rpc tests.

The tests put this directory and the generated stubs (their argv[2]) on sys.path:

    sys.path.insert(0, PYDIR)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "helpers"))
    from kasminad import Kasminad

    d = Kasminad(BIN, tmp + "/main/k.sock", tmp + "/main.log", "--no-cuda", "--no-persist")
    d.call("ListModels", pb.ListModelsRequest())
    d.stop()  # SIGTERM; the exit status

The protobuf stubs are imported when first needed, so a test that only starts and stops the
daemon (the Python client's test) needs no stub directory.
"""
import os
import signal
import subprocess
import threading
import time

import grpc

SERVICE = "/kasmina.v1.Kasmina/"
BIG = 64 << 20  # the channels' default message limits (64 MiB)


def stubs():
    """(kasmina_pb2, health_pb2) from the generated-stub directory on sys.path."""
    from kasmina.v1 import kasmina_pb2
    import health_pb2
    return kasmina_pb2, health_pb2


_RESP = {}


def reply_type(method):
    """The reply message class of Kasmina/<method>, from the service descriptor."""
    if not _RESP:
        pb, _ = stubs()
        for m in pb.DESCRIPTOR.services_by_name["Kasmina"].methods:
            _RESP[m.name] = getattr(pb, m.output_type.name)
    return _RESP[method]


def _serialize(m):
    return m if isinstance(m, bytes) else m.SerializeToString()


def unary(ch, method, resp=None):
    """The callable for Kasmina/<method> on channel ch: requests are messages or raw bytes;
    replies are parsed as resp, or left as raw bytes when resp is None."""
    return ch.unary_unary(SERVICE + method, request_serializer=_serialize,
                          response_deserializer=resp.FromString if resp else (lambda b: b))


class Kasminad:
    """kasminad --listen unix:<sock> [--state-dir <state_dir>] <flags...>, its output in <log>.

    log_mode: how the log file is opened ("a+" keeps the output of earlier daemons on the same
    log; "w+" starts afresh). socket_tries: how many 50 ms polls to wait for the socket (0: do
    not wait for it, only for the channel). ready_timeout: seconds for the channel to connect.
    max_receive / max_send: the channel's message limits (None: grpc's defaults; -1: none).
    ignore_xfsz: start kasminad through a shell that ignores SIGXFSZ and pump its output into
    the log through a pipe (for tests that lower its RLIMIT_FSIZE). connect=False: start the
    process only (no socket wait, no channel). stdout=False: only stderr goes to the log.
    timeout: the default deadline of call() and code(), in seconds.
    """

    def __init__(self, binary, sock, log, *flags, state_dir=None, log_mode="a+", socket_tries=200,
                 ready_timeout=10, max_receive=BIG, max_send=BIG, ignore_xfsz=False,
                 connect=True, stdout=True, timeout=30):
        self.sock, self.logpath = sock, log
        self.timeout = timeout
        self.log = open(log, log_mode)
        self.pump = None
        self.ch = None
        self.channels = []
        self.max_receive, self.max_send = max_receive, max_send
        self.argv = [binary, "--listen", "unix:" + sock]
        if state_dir is not None:
            self.argv += ["--state-dir", state_dir]
        self.argv += list(flags)
        if ignore_xfsz:
            # A write past a lowered RLIMIT_FSIZE must fail with EFBIG rather than SIGXFSZ
            # killing the process (an ignored signal stays ignored across exec, and the shell
            # execs kasminad in its own process); the log goes through a pipe (which has no size
            # limit) so that it is not cut off too.
            self.p = subprocess.Popen(["/bin/sh", "-c", "trap '' XFSZ; exec \"$@\"", "sh",
                                       *self.argv],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

            def pump(src=self.p.stdout, dst=self.log):
                for chunk in iter(lambda: os.read(src.fileno(), 65536), b""):
                    dst.write(chunk.decode(errors="replace"))
                    dst.flush()
            self.pump = threading.Thread(target=pump, daemon=True)
            self.pump.start()
        elif stdout:
            self.p = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT)
        else:
            self.p = subprocess.Popen(self.argv, stderr=self.log)
        if not connect:
            return
        self.wait_socket(socket_tries)
        self.ch = self.channel()
        try:
            grpc.channel_ready_future(self.ch).result(timeout=ready_timeout)
        except grpc.FutureTimeoutError:
            raise SystemExit("kasminad did not come up: " + self.logtext()[-2000:])

    @property
    def pid(self):
        return self.p.pid

    def wait_socket(self, tries=200):
        """Poll (every 50 ms, at most tries times) until the socket exists; SystemExit with the
        log when kasminad exits first."""
        for _ in range(tries):
            if os.path.exists(self.sock):
                return
            if self.p.poll() is not None:
                raise SystemExit("kasminad exited early:\n" + self.logtext())
            time.sleep(0.05)

    def channel(self, **kw):
        """A new channel to the daemon with this daemon's message limits; stop() closes it."""
        opts = []
        if self.max_receive is not None:
            opts.append(("grpc.max_receive_message_length", self.max_receive))
        if self.max_send is not None:
            opts.append(("grpc.max_send_message_length", self.max_send))
        ch = grpc.insecure_channel("unix:" + self.sock, options=opts, **kw)
        self.channels.append(ch)
        return ch

    def unary(self, method, resp=None, ch=None):
        """The callable for Kasmina/<method>: requests are messages or raw bytes; replies are
        parsed as resp (default: the method's reply type; False: raw bytes)."""
        if resp is None:
            resp = reply_type(method)
        return unary(ch or self.ch, method, resp or None)

    def call(self, method, req=None, resp=None, timeout=None, raw=None):
        """Kasmina/<method>(req), or the raw bytes raw in its place, with a deadline of timeout
        seconds (default: the daemon's timeout); raises grpc.RpcError."""
        return self.unary(method, resp)(raw if raw is not None else req,
                                        timeout=timeout or self.timeout)

    def code(self, method, req=None, resp=None, timeout=None, raw=None):
        """(status code, details) of a call: (OK, "") when it succeeded."""
        try:
            self.call(method, req, resp, timeout=timeout, raw=raw)
            return grpc.StatusCode.OK, ""
        except grpc.RpcError as e:
            return e.code(), e.details() or ""

    def health(self, service="", timeout=5):
        """grpc.health.v1 Check: the serving status (an enum number)."""
        _, health_pb2 = stubs()
        f = self.ch.unary_unary("/grpc.health.v1.Health/Check",
                                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                response_deserializer=health_pb2.HealthCheckResponse.FromString)
        return f(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status

    def watch(self, model_id="", after=0, timeout=None, subscribed=True):
        """A WatchEvents call (an iterator of LifecycleEvent); with subscribed, returns once the
        server's metadata has arrived, i.e. once the subscription is in place."""
        pb, _ = stubs()
        f = self.ch.unary_stream(SERVICE + "WatchEvents",
                                 request_serializer=pb.WatchEventsRequest.SerializeToString,
                                 response_deserializer=pb.LifecycleEvent.FromString)
        call = f(pb.WatchEventsRequest(model_id=model_id, after_sequence=after), timeout=timeout)
        if subscribed:
            call.initial_metadata()
        return call

    def logtext(self):
        """Everything kasminad has written to its log so far."""
        if not self.log.closed:
            self.log.flush()
        with open(self.logpath, errors="replace") as f:
            return f.read()

    def close(self):
        """Close the channels and the log (after the process has ended)."""
        for ch in self.channels:
            ch.close()
        self.channels = []
        if self.pump is not None:
            self.pump.join()
            self.p.stdout.close()
            self.pump = None
        self.log.close()

    def stop(self, sig=signal.SIGTERM, timeout=30):
        """Send sig (SIGTERM), wait for the exit, close channels and log: the exit status."""
        self.p.send_signal(sig)
        rc = self.p.wait(timeout=timeout)
        self.close()
        return rc

    def kill(self):
        """SIGKILL if still running, then close: for finally: blocks."""
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(timeout=30)
        if not self.log.closed:
            self.close()
