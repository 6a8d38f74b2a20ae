/* A run directory's old checkpoints removed, keeping the newest (save_async.h mps_run_prune). */
#include <dirent.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ckpt.h"
#include "save_async.h"

/* the step of a name "step-" followed by digits only (a committed checkpoint's; not ".partial") */
static int64_t step_of(const char *name)
{
    if (strncmp(name, "step-", 5) != 0 || !name[5])
        return -1;
    int64_t step = 0;
    for (const char *c = name + 5; *c; c++) {
        if (*c < '0' || *c > '9' || step > INT64_MAX / 10 - 10)
            return -1;
        step = step * 10 + (*c - '0');
    }
    return step;
}

static int newest_first(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? 1 : x > y ? -1 : 0;
}

int mps_run_prune(const char *rundir, int keep, int *removed, mps_err *err)
{
    *removed = 0;
    if (keep <= 0)
        return 0;
    char latest[256] = "", path[4400];
    snprintf(path, sizeof path, "%s/latest", rundir);
    FILE *f = fopen(path, "r");
    if (f) {
        if (!fgets(latest, sizeof latest, f))
            latest[0] = '\0';
        fclose(f);
        latest[strcspn(latest, "\n")] = '\0';
    }
    DIR *d = opendir(rundir);
    if (!d)
        return mps_fail(err, MPS_EIO, "%s: cannot list the run directory: %s", rundir, strerror(errno));
    int64_t *steps = NULL;
    int n = 0, cap = 0, rc = 0;
    for (struct dirent *e; (e = readdir(d)) != NULL;) {
        int64_t step = step_of(e->d_name);
        if (step < 0)
            continue;
        if (n == cap) {
            cap = cap ? 2 * cap : 64;
            int64_t *grown = realloc(steps, sizeof *steps * (size_t)cap);
            if (!grown) {
                rc = mps_fail(err, MPS_ENOMEM, "out of memory listing %s", rundir);
                break;
            }
            steps = grown;
        }
        steps[n++] = step;
    }
    closedir(d);
    if (rc == 0 && n > keep) {
        qsort(steps, (size_t)n, sizeof *steps, newest_first);
        for (int i = keep; i < n && rc == 0; i++) {
            char name[64];
            snprintf(name, sizeof name, "step-%08lld", (long long)steps[i]);
            if (strcmp(name, latest) == 0)
                continue; /* never the one a resume would take */
            /* the manifest first: a half-removed checkpoint is never taken for a whole one */
            snprintf(path, sizeof path, "%s/%s/" MPS_MANIFEST_NAME, rundir, name);
            if (unlink(path) != 0 && errno != ENOENT)
                rc = mps_fail(err, MPS_EIO, "%s: cannot remove: %s", path, strerror(errno));
            snprintf(path, sizeof path, "%s/%s", rundir, name);
            if (rc == 0 && mps_remove_tree(path) != 0)
                rc = mps_fail(err, MPS_EIO, "%s: cannot remove: %s", path, strerror(errno));
            if (rc == 0)
                (*removed)++;
        }
    }
    free(steps);
    return rc;
}
