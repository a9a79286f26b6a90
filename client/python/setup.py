"""Build hook: generates the protobuf/gRPC stubs (kasmina_client._proto) when they are absent.

The stubs are never committed. Built from the checkout (pip install ./client/python), they are
generated from ../../proto (or $KASMINA_PROTO_DIR) by gen_stubs.py, with protoc +
grpc_python_plugin or grpcio-tools, into kasmina_client/_proto (ignored by git); a directory
that already holds them (build/client/python, which CMake fills) is used as it is.
"""

import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))

if not os.path.exists(os.path.join(HERE, "kasmina_client", "_proto", "kasmina", "v1",
                                   "kasmina_pb2.py")):
    sys.path.insert(0, HERE)
    import gen_stubs

    gen_stubs.generate(HERE, os.environ.get("KASMINA_PROTO_DIR",
                                            os.path.join(HERE, "..", "..", "proto")))

setup()
