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

/* The step of a name "step-" followed by digits and then `suffix` (a committed checkpoint's:
 * ""; one being removed: ".removing"), else -1. */
static int64_t step_of(const char *name, const char *suffix)
{
    if (strncmp(name, "step-", 5) != 0)
        return -1;
    int64_t step = 0;
    const char *c = name + 5;
    for (; *c >= '0' && *c <= '9'; c++) {
        if (step > INT64_MAX / 10 - 10)
            return -1;
        step = step * 10 + (*c - '0');
    }
    return c > name + 5 && strcmp(c, suffix) == 0 ? step : -1;
}

/* RUNDIR/NAME removed: renamed to NAME.removing first (one atomic step: from then on no step-*
 * directory is a half-removed checkpoint), then deleted; a leftover .removing from a removal cut
 * short is deleted by the next prune. */
static int remove_checkpoint(const char *rundir, const char *name, mps_err *err)
{
    char from[4400], to[4400];
    snprintf(from, sizeof from, "%s/%s", rundir, name);
    snprintf(to, sizeof to, "%s/%s.removing", rundir, name);
    if (rename(from, to) != 0)
        return mps_fail(err, MPS_EIO, "%s: cannot rename it for removal: %s", from, strerror(errno));
    if (mps_fsync_path(rundir, err) != 0)
        return -1;
    if (mps_remove_tree(to) != 0)
        return mps_fail(err, MPS_EIO, "%s: cannot remove: %s", to, strerror(errno));
    return 0;
}

typedef struct {
    int64_t step;
    char name[256];
} saved_step;

static int newest_first(const void *a, const void *b)
{
    int64_t x = ((const saved_step *)a)->step, y = ((const saved_step *)b)->step;
    return x < y ? 1 : x > y ? -1 : 0;
}

int mps_run_prune(const char *rundir, int keep, int *removed, mps_err *err)
{
    *removed = 0;
    if (keep <= 0)
        return 0;
    /* the checkpoint RUNDIR/latest names, read as every reader does (none if it names nothing) */
    char resolved[4400], path[4400];
    mps_err ignored;
    mps_err_clear(&ignored);
    const char *latest = mps_ckpt_resolve(rundir, resolved, sizeof resolved, &ignored) == 1
                             ? resolved + strlen(rundir) + 1 : "";
    DIR *d = opendir(rundir);
    if (!d)
        return mps_fail(err, MPS_EIO, "%s: cannot list the run directory: %s", rundir, strerror(errno));
    saved_step *steps = NULL;
    int n = 0, cap = 0, rc = 0;
    for (struct dirent *e; (e = readdir(d)) != NULL && rc == 0;) {
        if (step_of(e->d_name, ".removing") >= 0) { /* a removal cut short */
            snprintf(path, sizeof path, "%s/%s", rundir, e->d_name);
            if (mps_remove_tree(path) != 0)
                rc = mps_fail(err, MPS_EIO, "%s: cannot remove: %s", path, strerror(errno));
            continue;
        }
        int64_t step = step_of(e->d_name, "");
        if (step < 0 || strlen(e->d_name) >= sizeof steps->name)
            continue;
        /* committed checkpoints only: anything else by that name is not ours to count or remove */
        snprintf(path, sizeof path, "%s/%s/" MPS_MANIFEST_NAME, rundir, e->d_name);
        if (access(path, F_OK) != 0)
            continue;
        if (n == cap) {
            cap = cap ? 2 * cap : 64;
            saved_step *grown = realloc(steps, sizeof *steps * (size_t)cap);
            if (!grown) {
                rc = mps_fail(err, MPS_ENOMEM, "out of memory listing %s", rundir);
                break;
            }
            steps = grown;
        }
        steps[n].step = step;
        snprintf(steps[n++].name, sizeof steps->name, "%s", e->d_name);
    }
    closedir(d);
    if (rc == 0 && n > keep) {
        qsort(steps, (size_t)n, sizeof *steps, newest_first);
        for (int i = keep; i < n && rc == 0; i++) {
            if (strcmp(steps[i].name, latest) == 0)
                continue; /* never the one a resume would take */
            rc = remove_checkpoint(rundir, steps[i].name, err);
            if (rc == 0)
                (*removed)++;
        }
    }
    free(steps);
    return rc;
}
