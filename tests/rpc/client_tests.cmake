# Client tests, included from client/CMakeLists.txt (the targets they need live there).
# No-server tests carry the label unit; tests against a real kasminad carry rpc.

ksm_add_test(unit_test_ctl SOURCES ${PROJECT_SOURCE_DIR}/tests/rpc/test_ctl.c LABELS unit TIMEOUT 60)
target_link_libraries(unit_test_ctl PRIVATE kasminactl_core kasmina_client)
# The option-table walker of the subcommands (cmds.c): its errors, --help, every real table.
ksm_add_test(unit_test_ctl_cmds SOURCES ${PROJECT_SOURCE_DIR}/tests/rpc/test_ctl_cmds.c LABELS unit
  TIMEOUT 60)
target_link_libraries(unit_test_ctl_cmds PRIVATE kasminactl_core kasmina_client)

# Tensor <-> numpy of the Python wrapper (Debian's /usr/bin/python3: python3-grpcio, -numpy).
if(KSM_HAVE_PYTHON_STUBS AND Python3_Interpreter_FOUND)
  add_test(NAME unit_python_tensor
    COMMAND ${Python3_EXECUTABLE} ${PROJECT_SOURCE_DIR}/tests/rpc/test_python_tensor.py)
  set_tests_properties(unit_python_tensor PROPERTIES LABELS unit TIMEOUT 60
    ENVIRONMENT "PYTHONPATH=${KSM_PY_DIR}")
endif()

# ---- Against a real kasminad on a temporary Unix socket (label rpc) ----
add_executable(rpc_test_client ${PROJECT_SOURCE_DIR}/tests/rpc/test_client.c)
target_compile_options(rpc_test_client PRIVATE ${KSM_C_WARNINGS} -Wno-missing-prototypes)
target_link_libraries(rpc_test_client PRIVATE ksm_test_helpers kasmina_client Threads::Threads)
target_compile_definitions(rpc_test_client PRIVATE KSM_KASMINAD="$<TARGET_FILE:kasminad>")
add_dependencies(rpc_test_client kasminad kasminactl)
add_test(NAME rpc_client COMMAND rpc_test_client --jobs=1)
set_tests_properties(rpc_client PROPERTIES LABELS rpc TIMEOUT 300)

# The client's weight streams (AUTO past its message limit, a cancelled stream, partial exports,
# ConfigureSlot); under ASan the daemon's exit checks that a cancelled stream freed everything.
add_executable(rpc_test_weights_client ${PROJECT_SOURCE_DIR}/tests/rpc/test_weights_client.c)
target_compile_options(rpc_test_weights_client PRIVATE ${KSM_C_WARNINGS} -Wno-missing-prototypes)
target_link_libraries(rpc_test_weights_client PRIVATE ksm_test_helpers kasmina_client
  Threads::Threads)
target_compile_definitions(rpc_test_weights_client PRIVATE KSM_KASMINAD="$<TARGET_FILE:kasminad>")
add_dependencies(rpc_test_weights_client kasminad)
add_test(NAME rpc_weights_client COMMAND rpc_test_weights_client --jobs=1)
set_tests_properties(rpc_weights_client PROPERTIES LABELS rpc TIMEOUT 240)

# kasminactl: every subcommand (tables and --json), --help everywhere, exit code classes.
if(Python3_Interpreter_FOUND)
  add_test(NAME rpc_kasminactl
    COMMAND bash ${PROJECT_SOURCE_DIR}/tests/rpc/kasminactl_test.sh
            $<TARGET_FILE:kasminad> $<TARGET_FILE:kasminactl>)
  set_tests_properties(rpc_kasminactl PROPERTIES LABELS rpc TIMEOUT 300)
endif()

# The Python client: a full lifecycle whose results equal the C client's.
if(KSM_HAVE_PYTHON_STUBS AND Python3_Interpreter_FOUND)
  add_test(NAME rpc_python_client
    COMMAND ${Python3_EXECUTABLE} ${PROJECT_SOURCE_DIR}/tests/rpc/test_python_client.py
            $<TARGET_FILE:kasminad> $<TARGET_FILE:kasminactl>)
  set_tests_properties(rpc_python_client PROPERTIES LABELS rpc TIMEOUT 300
    ENVIRONMENT "PYTHONPATH=${KSM_PY_DIR}")
  # Evaluate's attribution: EXACT against Shapley values computed from explicit coalition
  # configs, PERMUTATION against esper's engine (transcribed), kasminactl --attribution.
  add_test(NAME rpc_attribution
    COMMAND ${Python3_EXECUTABLE} ${PROJECT_SOURCE_DIR}/tests/rpc/test_attribution.py
            $<TARGET_FILE:kasminad> $<TARGET_FILE:kasminactl>)
  set_tests_properties(rpc_attribution PROPERTIES LABELS rpc TIMEOUT 300
    ENVIRONMENT "PYTHONPATH=${KSM_PY_DIR}")
  # Training over the wire: ConfigureTraining, TrainStep (bad inputs change nothing; the loss
  # falls), Checkpoint without persistence, kasminactl training / train.
  add_test(NAME rpc_train
    COMMAND ${Python3_EXECUTABLE} ${PROJECT_SOURCE_DIR}/tests/rpc/test_train.py
            $<TARGET_FILE:kasminad> $<TARGET_FILE:kasminactl> ${KSM_PY_DIR})
  set_tests_properties(rpc_train PROPERTIES LABELS rpc TIMEOUT 300
    ENVIRONMENT "PYTHONPATH=${KSM_PY_DIR}")
  # Checkpoints: SIGKILL during training, then the checkpoint's weights and momentum bit for bit
  # (continuing gives bit-identical results), the journal replayed over a checkpoint,
  # --checkpoint-interval, Checkpoint racing TrainStep, bad input, damaged checkpoints,
  # kasminactl checkpoint and Client.checkpoint.
  add_test(NAME rpc_checkpoint
    COMMAND ${Python3_EXECUTABLE} ${PROJECT_SOURCE_DIR}/tests/rpc/test_checkpoint.py
            $<TARGET_FILE:kasminad> $<TARGET_FILE:kasminactl> ${KSM_PY_DIR})
  set_tests_properties(rpc_checkpoint PROPERTIES LABELS rpc TIMEOUT 300
    ENVIRONMENT "PYTHONPATH=${KSM_PY_DIR}")
  # The Fashion-MNIST example, short: a base-8 host, 260 TrainSteps, the whole lifecycle through
  # strict gates, a falling loss (needs Debian's dataset-fashion-mnist: missing data fails).
  add_test(NAME rpc_example_fashion_mnist
    COMMAND ${Python3_EXECUTABLE} ${PROJECT_SOURCE_DIR}/tests/rpc/test_fashion_mnist.py
            $<TARGET_FILE:kasminad> ${PROJECT_SOURCE_DIR})
  set_tests_properties(rpc_example_fashion_mnist PROPERTIES LABELS rpc TIMEOUT 300
    ENVIRONMENT "PYTHONPATH=${KSM_PY_DIR}")
endif()

# Big weights (issue 16, part 3): an ~80 MB model through ExportWeightsStream/LoadWeightsStream
# with the default limits, broken and cancelled streams, partial exports, ConfigureSlot across a
# restart, kasminactl's flags.
if(KSM_HAVE_PYTHON_STUBS AND Python3_Interpreter_FOUND)
  add_test(NAME rpc_weights_stream
    COMMAND ${Python3_EXECUTABLE} ${PROJECT_SOURCE_DIR}/tests/rpc/test_weights_stream.py
            $<TARGET_FILE:kasminad> ${KSM_PY_DIR} $<TARGET_FILE:kasminactl>)
  set_tests_properties(rpc_weights_stream PROPERTIES LABELS rpc TIMEOUT 300
    ENVIRONMENT "PYTHONPATH=${KSM_PY_DIR}")
endif()

# kasmina_client.esper: presets against esper's tasks.py, state_dict round trips, torch.save
# files refused by the helper and by LoadWeights.
if(KSM_HAVE_PYTHON_STUBS)
  add_test(NAME rpc_python_esper
    COMMAND /usr/bin/python3 ${PROJECT_SOURCE_DIR}/tests/rpc/test_python_esper.py
            $<TARGET_FILE:kasminad> ${KSM_PY_DIR})
  set_tests_properties(rpc_python_esper PROPERTIES LABELS rpc TIMEOUT 120)
endif()

# The README's walkthroughs (kasminactl, then the Python package in a fresh virtualenv), as written.
add_test(NAME rpc_readme_walkthrough
  COMMAND bash ${PROJECT_SOURCE_DIR}/tests/rpc/readme_walkthrough.sh ${PROJECT_SOURCE_DIR} ${PROJECT_BINARY_DIR})
set_tests_properties(rpc_readme_walkthrough PROPERTIES LABELS rpc TIMEOUT 120)
