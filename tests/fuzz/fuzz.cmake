# libFuzzer targets (tests/fuzz/RESULTS.md): configure with clang and -DMPS_FUZZ=ON.
# One executable per tests/fuzz/fuzz_*.c, built with -fsanitize=fuzzer,address,undefined, linked
# against a separate static library of the readers compiled with -fsanitize=fuzzer-no-link (the
# normal build is untouched). tests/fuzz/run.sh builds and runs them.
#
# In a normal (gcc) build this file only adds the CTest test fuzz.short: tests/fuzz/run.sh 10 in
# a clang build directory of its own under this build tree.
option(MPS_FUZZ "Build the libFuzzer targets of tests/fuzz (clang only)" OFF)

if(MPS_FUZZ)
  if(NOT CMAKE_C_COMPILER_ID MATCHES "Clang")
    message(FATAL_ERROR "MPS_FUZZ=ON needs clang (libFuzzer): -DCMAKE_C_COMPILER=clang")
  endif()
  set(_mps_fuzz_flags -fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer)
  # The readers and what they need (not the trainer, shard or reshard): an explicit list, so that
  # a file being edited elsewhere in formats/ does not break the fuzz build.
  set(_mps_fuzz_src arch.c chunk.c ckpt_read.c ckpt_write.c err.c geometry.c h5util.c layout.c llmc.c manifest.c model.c
      hf_config.c modelfile.c pool.c progress.c safe_open.c safetensors.c synth.c trace.c verify.c zstd_filter.c)
  list(TRANSFORM _mps_fuzz_src PREPEND ${CMAKE_SOURCE_DIR}/formats/)
  add_library(mpsfuzz STATIC ${_mps_fuzz_src})
  target_compile_options(mpsfuzz PRIVATE ${_mps_fuzz_flags})
  target_include_directories(mpsfuzz PUBLIC ${CMAKE_SOURCE_DIR}/formats ${HDF5_C_INCLUDE_DIRS} ${ZSTD_INCLUDE_DIR}
    ${JANSSON_INCLUDE_DIR} ${XXHASH_INCLUDE_DIR})
  target_compile_definitions(mpsfuzz PUBLIC MPS_VERSION="${PROJECT_VERSION}")
  target_link_libraries(mpsfuzz PUBLIC ${HDF5_C_LIBRARIES} ${ZSTD_LIBRARY} ${JANSSON_LIBRARY} Threads::Threads m)

  file(GLOB _mps_fuzz_targets ${CMAKE_SOURCE_DIR}/tests/fuzz/fuzz_*.c)
  add_custom_target(fuzz)
  foreach(src ${_mps_fuzz_targets})
    get_filename_component(name ${src} NAME_WE)
    add_executable(${name} ${src})
    target_compile_options(${name} PRIVATE -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
      -fno-omit-frame-pointer)
    target_compile_definitions(${name} PRIVATE MPS_FUZZ_DIR="${CMAKE_SOURCE_DIR}/tests/fuzz")
    target_link_options(${name} PRIVATE -fsanitize=fuzzer,address,undefined)
    target_link_libraries(${name} PRIVATE mpsfuzz)
    add_dependencies(fuzz ${name})
  endforeach()
elseif(NOT MPS_SANITIZE)
  # CI: a short run of every target (clang with libFuzzer required; MPS_SKIP_FUZZ=1 skips). Not
  # in the sanitizer build: the targets carry ASan and UBSan themselves, and `make test` ran them.
  add_test(NAME fuzz.short COMMAND bash ${CMAKE_SOURCE_DIR}/tests/fuzz/run.sh 10)
  set_tests_properties(fuzz.short PROPERTIES
    ENVIRONMENT "MPS_FUZZ_BUILD=${CMAKE_BINARY_DIR}/fuzz;MPS_FUZZ_JOBS=2"
    SKIP_RETURN_CODE 77 TIMEOUT 900 RUN_SERIAL FALSE)
endif()
