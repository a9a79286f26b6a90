# Security, limits and soak tests against a real kasminad (label rpc), included from
# client/CMakeLists.txt (they drive the daemon through libkasmina-client). The certificates are
# made by openssl (Debian package openssl) at test time.
find_program(KSM_OPENSSL openssl)
foreach(t security limits)
  if(t STREQUAL "security" AND NOT KSM_OPENSSL)
    message(STATUS "kasmina: openssl missing: rpc_security not registered")
    continue()
  endif()
  add_executable(rpc_test_${t} ${PROJECT_SOURCE_DIR}/tests/rpc/test_${t}.c)
  target_compile_options(rpc_test_${t} PRIVATE ${KSM_C_WARNINGS} -Wno-missing-prototypes)
  target_link_libraries(rpc_test_${t} PRIVATE ksm_test_helpers kasmina_client Threads::Threads)
  target_compile_definitions(rpc_test_${t} PRIVATE KSM_KASMINAD="$<TARGET_FILE:kasminad>")
  add_dependencies(rpc_test_${t} kasminad)
  add_test(NAME rpc_${t} COMMAND rpc_test_${t} --jobs=1)
  set_tests_properties(rpc_${t} PROPERTIES LABELS rpc TIMEOUT 300)
endforeach()

# Soak: many clients mixing lifecycle, compute and statistics against one kasminad; 0 errors, RSS
# plateau, allocator back to its post-warm-up value. Briefly here (20 s); on demand:
#   build/client/soak --kasminad build/kasminad --duration 600 --threads 16
add_executable(soak ${PROJECT_SOURCE_DIR}/tests/bench/soak.c)
target_compile_options(soak PRIVATE ${KSM_C_WARNINGS} -Wno-missing-prototypes)
target_compile_definitions(soak PRIVATE _GNU_SOURCE)
target_link_libraries(soak PRIVATE kasmina_client Threads::Threads m)
add_dependencies(soak kasminad)
add_test(NAME rpc_soak COMMAND soak --kasminad $<TARGET_FILE:kasminad> --duration 20 --threads 8)
set_tests_properties(rpc_soak PROPERTIES LABELS rpc TIMEOUT 120)
