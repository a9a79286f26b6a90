#!/usr/bin/python3
"""gRPC server reflection against a real kasminad on a temporary Unix socket, driven the way
grpcurl drives it, with no kasmina .proto at hand.

Usage: test_reflection.py <kasminad> <proto dir of the source tree>

The reflection messages come from the repository's vendored grpc/reflection/v1alpha/
reflection.proto, compiled by protoc at test time (Debian ships no grpc_reflection module).

1. One ServerReflectionInfo stream (v1alpha, then v1) answers several requests in order:
   list_services (Kasmina, Health and both reflection services), file_containing_symbol
   (services, messages, a nested enum value's enum, a method), file_by_filename, an unknown
   symbol and file (NOT_FOUND error responses), all_extension_numbers_of_type; original_request
   echoes each request; the stream ends with OK when the client half-closes.
2. The FileDescriptorProtos returned build a descriptor pool from which GetServerInfo and
   Health/Check are called with messages made from the reflected descriptors only (what grpcurl
   does without -proto); the reflected kasmina.proto equals protoc's descriptor of the source.
3. A request that is not a ServerReflectionRequest ends the stream with INVALID_ARGUMENT.
"""
import os
import shutil
import subprocess
import sys
import tempfile

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "helpers"))
from kasminad import Kasminad  # noqa: E402

BIN, PROTO = sys.argv[1], os.path.abspath(sys.argv[2])
FAILS = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        FAILS.append(what)
    return cond


def msg_class(desc):
    """The message class of a descriptor (protobuf >= 4.22 and Debian's 3.21)."""
    if hasattr(message_factory, "GetMessageClass"):
        return message_factory.GetMessageClass(desc)
    return message_factory.MessageFactory(desc.file.pool).GetPrototype(desc)


def main():
    tmp = tempfile.mkdtemp(prefix="ksm-refl-")
    d = None
    try:
        rpb = compile_refl(tmp)
        d = Kasminad(BIN, os.path.join(tmp, "k.sock"), os.path.join(tmp, "kasminad.log"),
                     "--no-cuda", "--no-persist", log_mode="w+")
        for version in ("v1alpha", "v1"):
            path = "/grpc.reflection.%s.ServerReflection/ServerReflectionInfo" % version
            stream = d.ch.stream_stream(path, request_serializer=lambda m: m.SerializeToString(),
                                        response_deserializer=rpb.ServerReflectionResponse.FromString)
            R = rpb.ServerReflectionRequest
            reqs = [R(host="h", list_services=""),
                    R(file_containing_symbol="kasmina.v1.Kasmina"),
                    R(file_containing_symbol="grpc.health.v1.Health"),
                    R(file_containing_symbol="kasmina.v1.ForwardRequest"),
                    R(file_containing_symbol="kasmina.v1.Kasmina.AdvanceStage"),
                    R(file_containing_symbol="grpc.health.v1.HealthCheckResponse.ServingStatus"),
                    R(file_by_filename="grpc/health/v1/health.proto"),
                    R(file_containing_symbol="kasmina.v1.NoSuchThing"),
                    R(file_by_filename="nope.proto"),
                    R(all_extension_numbers_of_type="kasmina.v1.Tensor"),
                    R(file_containing_symbol="grpc.reflection.%s.ServerReflection" % version)]
            call = stream(iter(reqs), timeout=30)
            resps = list(call)
            check(call.code() == grpc.StatusCode.OK, "%s: the stream ends OK after the client "
                  "half-closes (%s)" % (version, call.code()))
            check(len(resps) == len(reqs), "%s: one answer per request (%d)" % (version, len(resps)))
            if len(resps) != len(reqs):
                continue
            check(all(r.original_request == q for r, q in zip(resps, reqs)),
                  "%s: original_request echoes each request, in order" % version)
            check(resps[0].valid_host == "h", "%s: valid_host echoes host" % version)
            names = sorted(s.name for s in resps[0].list_services_response.service)
            check(names == ["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
                            "grpc.reflection.v1alpha.ServerReflection", "kasmina.v1.Kasmina"],
                  "%s: list_services: %s" % (version, names))

            def files(r):
                out = []
                for b in r.file_descriptor_response.file_descriptor_proto:
                    fd = descriptor_pb2.FileDescriptorProto()
                    fd.ParseFromString(b)
                    out.append(fd)
                return out

            for i, want in ((1, "kasmina/v1/kasmina.proto"), (2, "grpc/health/v1/health.proto"),
                            (3, "kasmina/v1/kasmina.proto"), (4, "kasmina/v1/kasmina.proto"),
                            (5, "grpc/health/v1/health.proto"), (6, "grpc/health/v1/health.proto"),
                            (10, "grpc/reflection/%s/reflection.proto" % version)):
                got = [f.name for f in files(resps[i])]
                check(got == [want], "%s: %s -> %s" % (version, reqs[i].WhichOneof(
                    "message_request") + " " + getattr(reqs[i], reqs[i].WhichOneof(
                        "message_request")), got))
            for i in (7, 8):
                e = resps[i].error_response
                check(resps[i].WhichOneof("message_response") == "error_response" and
                      e.error_code == grpc.StatusCode.NOT_FOUND.value[0] and e.error_message,
                      "%s: not found -> error_response NOT_FOUND: %r" % (version, e.error_message))
            ext = resps[9].all_extension_numbers_response
            check(resps[9].WhichOneof("message_response") == "all_extension_numbers_response" and
                  ext.base_type_name == "kasmina.v1.Tensor" and not ext.extension_number,
                  "%s: all_extension_numbers_of_type: none" % version)

            # Call the daemon with messages built from the reflected descriptors only.
            kfd = files(resps[1])[0]
            hfd = files(resps[2])[0]
            src = descriptor_pb2.FileDescriptorSet()
            src.ParseFromString(open(os.path.join(tmp, "k.pb"), "rb").read())
            check(kfd == src.file[0], "%s: the reflected kasmina.proto equals protoc's "
                  "descriptor of the source" % version)
            pool = descriptor_pool.DescriptorPool()
            pool.Add(kfd)
            pool.Add(hfd)
            svc = pool.FindServiceByName("kasmina.v1.Kasmina")
            check("Forward" in [m.name for m in svc.methods] and
                  "ConfigureSlot" in [m.name for m in svc.methods],
                  "%s: the reflected service lists its methods" % version)
            m = svc.methods_by_name["GetServerInfo"]
            Req = msg_class(m.input_type)
            Rep = msg_class(m.output_type)
            info = d.ch.unary_unary("/kasmina.v1.Kasmina/GetServerInfo",
                                    request_serializer=lambda x: x.SerializeToString(),
                                    response_deserializer=Rep.FromString)(Req(), timeout=10)
            check(info.name == "kasminad" and len(info.cnn_blueprints) > 0,
                  "%s: GetServerInfo called from reflected descriptors: %s" % (version, info.name))
            hm = pool.FindServiceByName("grpc.health.v1.Health").methods_by_name["Check"]
            HRep = msg_class(hm.output_type)
            h = d.ch.unary_unary("/grpc.health.v1.Health/Check",
                                 request_serializer=lambda x: x.SerializeToString(),
                                 response_deserializer=HRep.FromString)(
                msg_class(hm.input_type)(), timeout=10)
            check(HRep.DESCRIPTOR.enum_types_by_name["ServingStatus"].values_by_number[
                h.status].name == "SERVING", "%s: Health/Check from reflected descriptors" % version)

        # Not a ServerReflectionRequest: INVALID_ARGUMENT, naming the message.
        raw = d.ch.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                 request_serializer=lambda b: b, response_deserializer=lambda b: b)
        call = raw(iter([b"\xff\xff\xff"]), timeout=10)
        try:
            list(call)
        except grpc.RpcError:
            pass
        check(call.code() == grpc.StatusCode.INVALID_ARGUMENT and
              "ServerReflectionRequest" in (call.details() or ""),
              "garbage: INVALID_ARGUMENT (%s: %s)" % (call.code(), call.details()))
        # A stream with no request at all ends OK.
        call = raw(iter([]), timeout=10)
        check(list(call) == [] and call.code() == grpc.StatusCode.OK, "an empty stream ends OK")
        rc = d.stop()
        check(rc == 0, "kasminad exits 0 after SIGTERM (rc %s)" % rc)
        d = None
    finally:
        if d is not None:
            d.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    if FAILS:
        print("%d check(s) failed" % len(FAILS))
        return 1
    print("all reflection checks passed")
    return 0


def compile_refl(tmp):
    """protoc --python_out for the vendored reflection.proto; the module is loaded from its
    file (its package path grpc/reflection/... would collide with the grpc package)."""
    import importlib.util
    protoc = shutil.which("protoc")
    if protoc is None:
        print("SKIP: protoc is not installed")
        sys.exit(77)
    out = os.path.join(tmp, "py")
    os.makedirs(out)
    subprocess.run([protoc, "-I" + PROTO, "--python_out=" + out,
                    "grpc/reflection/v1alpha/reflection.proto"], check=True)
    subprocess.run([protoc, "-I" + PROTO, "--descriptor_set_out=" + os.path.join(tmp, "k.pb"),
                    "kasmina/v1/kasmina.proto"], check=True)
    path = os.path.join(out, "grpc", "reflection", "v1alpha", "reflection_pb2.py")
    spec = importlib.util.spec_from_file_location("ksm_reflection_pb2", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


if __name__ == "__main__":
    sys.exit(main())
