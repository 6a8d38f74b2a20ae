# Unit tests: every tests/unit/test_*.c is one executable and one CTest test.
file(GLOB MPS_UNIT_TESTS ${CMAKE_SOURCE_DIR}/tests/unit/test_*.c)
foreach(src ${MPS_UNIT_TESTS})
  get_filename_component(name ${src} NAME_WE)
  add_executable(${name} ${src})
  target_link_libraries(${name} PRIVATE mpscore)
  add_test(NAME unit.${name} COMMAND ${name})
  set_tests_properties(unit.${name} PROPERTIES ENVIRONMENT
    "MPS_TEST_TMP=${CMAKE_BINARY_DIR}/tmp;MPSHARD=$<TARGET_FILE:mpshard>;MPS_PLUGIN_DIR=${CMAKE_BINARY_DIR}/plugins")
endforeach()

# Integration tests: every tests/cli/*.sh runs against the built CLI.
file(GLOB MPS_CLI_TESTS ${CMAKE_SOURCE_DIR}/tests/cli/*.sh)
foreach(script ${MPS_CLI_TESTS})
  get_filename_component(name ${script} NAME_WE)
  add_test(NAME cli.${name} COMMAND bash ${script})
  set_tests_properties(cli.${name} PROPERTIES ENVIRONMENT
    "MPSHARD=$<TARGET_FILE:mpshard>;MPS_PLUGIN_DIR=${CMAKE_BINARY_DIR}/plugins;MPS_TEST_TMP=${CMAKE_BINARY_DIR}/tmp;MPS_SRC=${CMAKE_SOURCE_DIR}")
endforeach()
