# Deployment tests (tests/deploy), run with Debian's /usr/bin/python3 (python3-grpcio,
# python3-yaml) against the real binaries, loopback only:
#   deploy_manifests   systemd unit, Dockerfiles, Kubernetes, Prometheus, Grafana (label deploy)
#   deploy_sd_notify   READY/STOPPING/WATCHDOG over a real NOTIFY_SOCKET (label deploy; only
#                      when kasminad links libsystemd)
#   rpc_top            kasminactl top --once / live frames against a real kasminad (label rpc)
if(NOT EXISTS /usr/bin/python3)
  message(STATUS "kasmina: /usr/bin/python3 missing: deploy tests not registered")
  return()
endif()
set(KSM_DEPLOY_TESTS ${CMAKE_SOURCE_DIR}/tests/deploy)
add_test(NAME deploy_manifests
  COMMAND /usr/bin/python3 ${KSM_DEPLOY_TESTS}/test_manifests.py
          $<TARGET_FILE:kasminad> $<TARGET_FILE:kasminactl> ${CMAKE_SOURCE_DIR})
set_tests_properties(deploy_manifests PROPERTIES LABELS deploy TIMEOUT 180)
if(SYSTEMD_FOUND)
  add_test(NAME deploy_sd_notify
    COMMAND /usr/bin/python3 ${KSM_DEPLOY_TESTS}/test_sd_notify.py $<TARGET_FILE:kasminad>)
  set_tests_properties(deploy_sd_notify PROPERTIES LABELS deploy TIMEOUT 120)
endif()
add_test(NAME rpc_top
  COMMAND /usr/bin/python3 ${KSM_DEPLOY_TESTS}/test_top.py
          $<TARGET_FILE:kasminad> $<TARGET_FILE:kasminactl>)
set_tests_properties(rpc_top PROPERTIES LABELS rpc TIMEOUT 180)
