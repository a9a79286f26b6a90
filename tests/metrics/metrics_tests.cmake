# Metrics exporter tests. Included from tests/CMakeLists.txt after rpc/server_tests.cmake (it
# reuses the generated Python stubs in ${py_out}).
#   unit_test_prom          renderers and escaping, no socket (label unit)
#   metrics_prometheus      a real Prometheus scrapes a real kasminad (label integration)
#   metrics_status_page     the status page in headless Chromium (label integration)
# The integration tests exit 77 (SKIP) when prometheus / chromium is not installed.
ksm_add_test(unit_test_prom SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_prom.c LABELS unit TIMEOUT 60)
target_link_libraries(unit_test_prom PRIVATE kasmina_metrics)

if(TARGET kasmina_python_stubs AND Python3_Interpreter_FOUND)
  add_test(NAME metrics_prometheus
    COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_LIST_DIR}/test_prometheus.py
            $<TARGET_FILE:kasminad> ${py_out} ${PROJECT_SOURCE_DIR}/docs/metrics.md)
  add_test(NAME metrics_status_page
    COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_LIST_DIR}/test_status_page.py
            $<TARGET_FILE:kasminad> ${py_out})
  set_tests_properties(metrics_prometheus metrics_status_page PROPERTIES
    LABELS integration TIMEOUT 120 SKIP_RETURN_CODE 77)
endif()
