# The CUDA backend against the CPU backend (tests/gpu/test_backend_cuda.c). Without a GPU the test
# exits 77 and CTest reports it skipped.
add_executable(test_backend_cuda ${CMAKE_SOURCE_DIR}/tests/gpu/test_backend_cuda.c)
target_link_libraries(test_backend_cuda PRIVATE mpscore CUDA::cudart)
add_test(NAME gpu.test_backend_cuda COMMAND test_backend_cuda)
set_tests_properties(gpu.test_backend_cuda PROPERTIES SKIP_RETURN_CODE 77)
