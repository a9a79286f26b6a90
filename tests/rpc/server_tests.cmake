# Server tests (label rpc): a real kasminad on a temporary Unix socket, driven from Debian's
# /usr/bin/python3 (python3-grpcio) with protobuf stubs generated into the build tree.
find_program(KSM_RPC_PROTOC protoc)
set(KSM_RPC_PYTHON /usr/bin/python3)
if(KSM_RPC_PROTOC AND EXISTS ${KSM_RPC_PYTHON})
  set(py_out ${CMAKE_CURRENT_BINARY_DIR}/rpc_py)
  set(py_gen ${py_out}/kasmina/v1/kasmina_pb2.py ${py_out}/health_pb2.py)
  add_custom_command(
    OUTPUT ${py_gen}
    COMMAND ${CMAKE_COMMAND} -E make_directory ${py_out}
    COMMAND ${KSM_RPC_PROTOC} -I${CMAKE_SOURCE_DIR}/proto --python_out=${py_out}
            kasmina/v1/kasmina.proto
    # health messages as a top-level module: a grpc/ package would shadow grpcio itself
    COMMAND ${KSM_RPC_PROTOC} -I${CMAKE_SOURCE_DIR}/proto/grpc/health/v1 --python_out=${py_out}
            health.proto
    DEPENDS ${CMAKE_SOURCE_DIR}/proto/kasmina/v1/kasmina.proto
            ${CMAKE_SOURCE_DIR}/proto/grpc/health/v1/health.proto
    COMMENT "protoc --python_out for the rpc server tests"
    VERBATIM)
  add_custom_target(ksm_rpc_test_stubs ALL DEPENDS ${py_gen})
  add_test(NAME rpc_server
    COMMAND ${KSM_RPC_PYTHON} ${CMAKE_CURRENT_SOURCE_DIR}/rpc/test_server.py
            $<TARGET_FILE:kasminad> ${py_out})
  set_tests_properties(rpc_server PROPERTIES LABELS rpc TIMEOUT 300)
  # Crash-safe state: restart, state-dir lock, torn/damaged journals, kill -9 at 20 points of
  # 1,000 random mutations (KASMINA_KILL_MUTATIONS / KASMINA_KILLS for longer runs).
  add_test(NAME rpc_persist
    COMMAND ${KSM_RPC_PYTHON} ${CMAKE_CURRENT_SOURCE_DIR}/rpc/test_persist.py
            $<TARGET_FILE:kasminad> ${py_out})
  set_tests_properties(rpc_persist PROPERTIES LABELS rpc TIMEOUT 300)
  # Hostile state directories (issue 12): planted links, world-writable modes, damaged models
  # quarantined, out-of-order journal records, a missing journal, snapshot checksums.
  add_test(NAME rpc_persist_hostile
    COMMAND ${KSM_RPC_PYTHON} ${CMAKE_CURRENT_SOURCE_DIR}/rpc/test_persist_hostile.py
            $<TARGET_FILE:kasminad> ${py_out})
  set_tests_properties(rpc_persist_hostile PROPERTIES LABELS rpc TIMEOUT 180)
  # Device faults through the daemon: OOM, a device that breaks while serving, restart.
  add_test(NAME rpc_faults
    COMMAND ${KSM_RPC_PYTHON} ${CMAKE_CURRENT_SOURCE_DIR}/rpc/test_faults.py
            $<TARGET_FILE:kasminad> ${py_out})
  set_tests_properties(rpc_faults PROPERTIES LABELS rpc TIMEOUT 120)
  # Hostile input (issue 12): every string field with bad UTF-8 and NUL, the id grammar, a
  # StepEpoch/DeleteModel race, non-finite metrics, strict LoadWeights; then a restart.
  add_test(NAME rpc_hostile
    COMMAND ${KSM_RPC_PYTHON} ${CMAKE_CURRENT_SOURCE_DIR}/rpc/test_hostile.py
            $<TARGET_FILE:kasminad> ${py_out})
  set_tests_properties(rpc_hostile PROPERTIES LABELS rpc TIMEOUT 300)
  # Hostile traffic (issue 12): compressed-request bombs (RSS, latency of other calls), bad-token
  # log flooding, a non-loopback metrics listener, replies over max-reply-bytes.
  add_test(NAME rpc_server_hostile
    COMMAND ${KSM_RPC_PYTHON} ${CMAKE_CURRENT_SOURCE_DIR}/rpc/test_server_hostile.py
            $<TARGET_FILE:kasminad> ${py_out})
  set_tests_properties(rpc_server_hostile PROPERTIES LABELS rpc TIMEOUT 300)
else()
  message(STATUS "kasmina: protoc or /usr/bin/python3 missing: rpc server tests not registered")
endif()
