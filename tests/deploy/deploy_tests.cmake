# Deployment tests (tests/deploy), run with Debian's /usr/bin/python3 (python3-grpcio,
# python3-yaml) against the real binaries, loopback only:
#   deploy_manifests   systemd unit, Dockerfiles, Kubernetes, Prometheus, Grafana (label deploy)
#   deploy_sd_notify   READY/STOPPING/WATCHDOG over a real NOTIFY_SOCKET (label deploy; only
#                      when kasminad links libsystemd)
#   rpc_top            kasminactl top --once / live frames against a real kasminad (label rpc)
if(NOT Python3_Interpreter_FOUND)
  message(STATUS "kasmina: no Python interpreter: deploy tests not registered")
  return()
endif()
set(KSM_DEPLOY_TESTS ${PROJECT_SOURCE_DIR}/tests/deploy)
add_test(NAME deploy_manifests
  COMMAND ${Python3_EXECUTABLE} ${KSM_DEPLOY_TESTS}/test_manifests.py
          $<TARGET_FILE:kasminad> $<TARGET_FILE:kasminactl> ${PROJECT_SOURCE_DIR})
set_tests_properties(deploy_manifests PROPERTIES LABELS deploy TIMEOUT 180)
if(SYSTEMD_FOUND)
  add_test(NAME deploy_sd_notify
    COMMAND ${Python3_EXECUTABLE} ${KSM_DEPLOY_TESTS}/test_sd_notify.py $<TARGET_FILE:kasminad>)
  set_tests_properties(deploy_sd_notify PROPERTIES LABELS deploy TIMEOUT 120)
endif()
add_test(NAME rpc_top
  COMMAND ${Python3_EXECUTABLE} ${KSM_DEPLOY_TESTS}/test_top.py
          $<TARGET_FILE:kasminad> $<TARGET_FILE:kasminactl>)
set_tests_properties(rpc_top PROPERTIES LABELS rpc TIMEOUT 180)

# An installed kasmina used from outside the tree: find_package(kasmina) and pkg-config.
add_test(NAME deploy_install COMMAND bash ${PROJECT_SOURCE_DIR}/tests/deploy/install_consumer.sh
  ${PROJECT_BINARY_DIR})
set_tests_properties(deploy_install PROPERTIES LABELS deploy TIMEOUT 300)
