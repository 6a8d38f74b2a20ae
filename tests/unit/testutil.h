/* Minimal test helpers: CHECK prints the failing expression and counts; main returns the count. */
#ifndef MPS_TESTUTIL_H
#define MPS_TESTUTIL_H
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int test_failures;
static int test_checks;
#define CHECK(cond) do { test_checks++; if (!(cond)) { test_failures++; \
    fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); } } while (0)
#define CHECK_MSG(cond, ...) do { test_checks++; if (!(cond)) { test_failures++; \
    fprintf(stderr, "%s:%d: CHECK failed: %s: ", __FILE__, __LINE__, #cond); \
    fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); } } while (0)
#define TEST_DONE() do { printf("%d checks, %d failed\n", test_checks, test_failures); \
    return test_failures ? 1 : 0; } while (0)

/* A fresh scratch directory under $MPS_TEST_TMP (or /tmp) for this test. */
static inline const char *test_tmpdir(const char *name)
{
    static char path[1024];
    const char *base = getenv("MPS_TEST_TMP");
    if (!base) base = "/tmp";
    mkdir(base, 0755);
    snprintf(path, sizeof path, "%s/%s.%d", base, name, (int)getpid());
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", path);
    if (system(cmd) != 0) return NULL;
    mkdir(path, 0755);
    return path;
}
#endif
