# Security, limits and soak tests against a real kasminad (label rpc), included from
# client/CMakeLists.txt (they drive the daemon through libkasmina-client). The certificates are
# made by openssl (Debian package openssl) at test time.
find_program(KSM_OPENSSL openssl)
foreach(t security limits)
  if(t STREQUAL "security" AND NOT KSM_OPENSSL)
    message(STATUS "kasmina: openssl missing: rpc_security not registered")
    continue()
  endif()
  add_executable(rpc_test_${t} ${CMAKE_SOURCE_DIR}/tests/rpc/test_${t}.c)
  target_compile_options(rpc_test_${t} PRIVATE ${KSM_C_WARNINGS} -Wno-missing-prototypes)
  target_link_libraries(rpc_test_${t} PRIVATE ksm_test_helpers kasmina_client Threads::Threads)
  target_compile_definitions(rpc_test_${t} PRIVATE KSM_KASMINAD="$<TARGET_FILE:kasminad>")
  add_dependencies(rpc_test_${t} kasminad)
  add_test(NAME rpc_${t} COMMAND rpc_test_${t} --jobs=1)
  set_tests_properties(rpc_${t} PROPERTIES LABELS rpc TIMEOUT 300)
endforeach()
