# Server tests (label rpc): a real kasminad on a temporary Unix socket, driven from Python
# (Debian's python3-grpcio) with the stubs proto/ generates into build/client/python.
if(KSM_HAVE_PYTHON_STUBS AND Python3_Interpreter_FOUND)
  set(py_out ${KSM_PY_DIR})
  add_test(NAME rpc_server
    COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_SOURCE_DIR}/rpc/test_server.py
            $<TARGET_FILE:kasminad> ${py_out})
  set_tests_properties(rpc_server PROPERTIES LABELS rpc TIMEOUT 300)
  # Crash-safe state: restart, state-dir lock, torn/damaged journals, kill -9 at 20 points of
  # 1,000 random mutations (KASMINA_KILL_MUTATIONS / KASMINA_KILLS for longer runs).
  add_test(NAME rpc_persist
    COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_SOURCE_DIR}/rpc/test_persist.py
            $<TARGET_FILE:kasminad> ${py_out})
  set_tests_properties(rpc_persist PROPERTIES LABELS rpc TIMEOUT 300)
  # Hostile state directories (issue 12): planted links, world-writable modes, damaged models
  # quarantined, out-of-order journal records, a missing journal, snapshot checksums.
  add_test(NAME rpc_persist_hostile
    COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_SOURCE_DIR}/rpc/test_persist_hostile.py
            $<TARGET_FILE:kasminad> ${py_out})
  set_tests_properties(rpc_persist_hostile PROPERTIES LABELS rpc TIMEOUT 180)
  # Device faults through the daemon: OOM, a device that breaks while serving, restart.
  add_test(NAME rpc_faults
    COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_SOURCE_DIR}/rpc/test_faults.py
            $<TARGET_FILE:kasminad_faults> ${py_out})
  set_tests_properties(rpc_faults PROPERTIES LABELS rpc TIMEOUT 120)
  # Hostile input (issue 12): every string field with bad UTF-8 and NUL, the id grammar, a
  # StepEpoch/DeleteModel race, non-finite metrics, strict LoadWeights; then a restart.
  add_test(NAME rpc_hostile
    COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_SOURCE_DIR}/rpc/test_hostile.py
            $<TARGET_FILE:kasminad> ${py_out})
  set_tests_properties(rpc_hostile PROPERTIES LABELS rpc TIMEOUT 300)
  # Hostile traffic (issue 12): compressed-request bombs (RSS, latency of other calls), bad-token
  # log flooding, a non-loopback metrics listener, replies over max-reply-bytes.
  add_test(NAME rpc_server_hostile
    COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_SOURCE_DIR}/rpc/test_server_hostile.py
            $<TARGET_FILE:kasminad> ${py_out})
  set_tests_properties(rpc_server_hostile PROPERTIES LABELS rpc TIMEOUT 300)
  # Every SeedMetrics / SlotReport field over the wire, RecordMetrics' attribution sums and
  # clear_auto_pruned, across a restart.
  add_test(NAME rpc_seed_metrics
    COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_SOURCE_DIR}/rpc/test_seed_metrics.py
            $<TARGET_FILE:kasminad> ${py_out})
  set_tests_properties(rpc_seed_metrics PROPERTIES LABELS rpc TIMEOUT 120)
  # Gate checks with values and thresholds, kasmina-warning trailing metadata, and the JSON log
  # of a daemon at --log-level debug (lifecycle lines, per-call lines, rate-limited failures).
  add_test(NAME rpc_gates_logs
    COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_SOURCE_DIR}/rpc/test_gates_logs.py
            $<TARGET_FILE:kasminad> ${py_out})
  set_tests_properties(rpc_gates_logs PROPERTIES LABELS rpc TIMEOUT 120)
else()
  message(STATUS "kasmina: no Python stubs or interpreter: rpc server tests not registered")
endif()
