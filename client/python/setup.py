"""Build hook: generates the protobuf/gRPC stubs (kasmina_client._proto) into the build tree.

The stubs are never committed. With the source tree (client/python inside the kasmina checkout)
they are generated from ../../proto by gen_stubs.py (protoc + grpc_python_plugin, or
grpcio-tools); KASMINA_PROTO_DIR names another proto directory; a source directory that already
holds kasmina_client/_proto (build/client/python, which CMake fills) is used as it is.
"""

import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildWithStubs(build_py):
    def run(self):
        stubs = os.path.join(HERE, "kasmina_client", "_proto", "kasmina", "v1", "kasmina_pb2.py")
        if not os.path.exists(stubs):
            sys.path.insert(0, HERE)
            import gen_stubs

            proto = os.environ.get("KASMINA_PROTO_DIR",
                                   os.path.join(HERE, "..", "..", "proto"))
            gen_stubs.generate(HERE, proto)
        super().run()


setup(cmdclass={"build_py": BuildWithStubs})
