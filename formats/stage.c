/* Staging directory, lock and atomic commit of a checkpoint directory. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ckpt.h"
#include "trace.h"

static int unlink_cb(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb; (void)flag; (void)ftw;
    return remove(path);
}

int mps_remove_tree(const char *path)
{
    struct stat st;
    if (lstat(path, &st) != 0)
        return errno == ENOENT ? 0 : -1;
    return nftw(path, unlink_cb, 16, FTW_DEPTH | FTW_PHYS);
}

int mps_fsync_path(const char *path, mps_err *err)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return mps_fail(err, MPS_EIO, "%s: cannot open for fsync: %s", path, strerror(errno));
    int rc = fsync(fd);
    int e = errno;
    close(fd);
    if (rc != 0 && e != EINVAL) /* some file systems refuse fsync on directories */
        return mps_fail(err, MPS_EIO, "%s: fsync failed: %s", path, strerror(e));
    return 0;
}

static void parent_of(const char *path, char *out, size_t size)
{
    snprintf(out, size, "%s", path);
    char *slash = strrchr(out, '/');
    if (!slash)
        snprintf(out, size, ".");
    else if (slash == out)
        out[1] = '\0';
    else
        *slash = '\0';
}

static int dir_is_empty(const char *path)
{
    DIR *d = opendir(path);
    if (!d)
        return 0;
    struct dirent *e;
    int empty = 1;
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
            empty = 0;
    closedir(d);
    return empty;
}

static int final_name(const char *dir, char *out, size_t size, mps_err *err)
{
    size_t n = strlen(dir);
    while (n > 1 && dir[n - 1] == '/')
        n--;
    if (n == 0 || n >= size)
        return mps_fail(err, MPS_EUSAGE, "output directory name is empty or too long");
    memcpy(out, dir, n);
    out[n] = '\0';
    return 0;
}

int mps_stage_dir_name(const char *dir, char *out, size_t size, mps_err *err)
{
    char final[4096];
    if (final_name(dir, final, sizeof final, err) != 0)
        return -1;
    if ((size_t)snprintf(out, size, "%s.partial", final) >= size)
        return mps_fail(err, MPS_EUSAGE, "output directory name too long");
    return 0;
}

int mps_stage_begin(const char *dir, int force, mps_stage *st, mps_err *err)
{
    memset(st, 0, sizeof *st);
    st->lock_fd = -1;
    if (final_name(dir, st->final_dir, sizeof st->final_dir - 16, err) != 0 ||
        mps_stage_dir_name(dir, st->stage_dir, sizeof st->stage_dir, err) != 0)
        return -1;
    snprintf(st->lock_path, sizeof st->lock_path, "%s.lock", st->final_dir);
    /* the lock: flock on DIR.lock; retry if the file we locked was unlinked by a finishing writer */
    for (int attempt = 0; attempt < 100; attempt++) {
        int fd = open(st->lock_path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
        if (fd < 0)
            return mps_fail(err, MPS_EIO, "%s: cannot create lock file: %s", st->lock_path, strerror(errno));
        if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
            close(fd);
            return mps_fail(err, MPS_EIO, "%s: another mpshard process is writing this checkpoint (lock %s held)",
                            st->final_dir, st->lock_path);
        }
        struct stat a, b;
        if (fstat(fd, &a) == 0 && stat(st->lock_path, &b) == 0 && a.st_ino == b.st_ino && a.st_dev == b.st_dev) {
            st->lock_fd = fd;
            break;
        }
        close(fd);
    }
    if (st->lock_fd < 0)
        return mps_fail(err, MPS_EIO, "%s: cannot take the lock", st->lock_path);
    struct stat s;
    if (stat(st->final_dir, &s) == 0) {
        char manifest[4300];
        snprintf(manifest, sizeof manifest, "%s/" MPS_MANIFEST_NAME, st->final_dir);
        if (!S_ISDIR(s.st_mode)) {
            mps_fail(err, MPS_EUSAGE, "%s exists and is not a directory", st->final_dir);
            goto fail;
        }
        if (access(manifest, F_OK) == 0) {
            if (!force) {
                mps_fail(err, MPS_EUSAGE, "%s: a committed checkpoint is already there; pass --force to replace it",
                         st->final_dir);
                goto fail;
            }
            st->replace = 1;
        } else if (!dir_is_empty(st->final_dir)) {
            mps_fail(err, MPS_EUSAGE, "%s exists, is not empty and is not an mpshard checkpoint; refusing to touch it",
                     st->final_dir);
            goto fail;
        }
    }
    if (mps_remove_tree(st->stage_dir) != 0) { /* left by a crashed run: we hold the lock */
        mps_fail(err, MPS_EIO, "%s: cannot remove stale staging directory: %s", st->stage_dir, strerror(errno));
        goto fail;
    }
    if (mkdir(st->stage_dir, 0755) != 0) {
        mps_fail(err, MPS_EIO, "%s: cannot create: %s", st->stage_dir, strerror(errno));
        goto fail;
    }
    return 0;
fail:
    close(st->lock_fd);
    st->lock_fd = -1;
    return -1;
}

static void release_lock(mps_stage *st)
{
    if (st->lock_fd >= 0) {
        unlink(st->lock_path);
        close(st->lock_fd);
        st->lock_fd = -1;
    }
}

void mps_stage_abort(mps_stage *st)
{
    if (st->stage_dir[0])
        mps_remove_tree(st->stage_dir);
    release_lock(st);
}

static int cmp_entry(const void *a, const void *b)
{
    return ((const mps_file_entry *)a)->rank - ((const mps_file_entry *)b)->rank;
}

int mps_stage_commit(mps_stage *st, mps_manifest *m, mps_err *err)
{
    DIR *d = opendir(st->stage_dir);
    if (!d)
        return mps_fail(err, MPS_EIO, "%s: cannot list: %s", st->stage_dir, strerror(errno));
    int world = mps_layout_world(&m->layout), cap = 16, count = 0;
    mps_file_entry *files = malloc(sizeof *files * (size_t)cap);
    struct dirent *e;
    while (files && (e = readdir(d))) {
        int rank, len = 0;
        if (sscanf(e->d_name, "rank-%d.h5%n", &rank, &len) != 1 || e->d_name[len] != '\0')
            continue;
        if (rank < 0 || rank >= world)
            continue;
        if (count == cap) {
            cap *= 2;
            mps_file_entry *grown = realloc(files, sizeof *files * (size_t)cap);
            if (!grown) { free(files); files = NULL; break; }
            files = grown;
        }
        char path[4600];
        snprintf(path, sizeof path, "%s/%s", st->stage_dir, e->d_name);
        struct stat s;
        if (stat(path, &s) != 0) {
            closedir(d);
            free(files);
            return mps_fail(err, MPS_EIO, "%s: %s", path, strerror(errno));
        }
        files[count].rank = rank;
        mps_shard_file_name(rank, files[count].name, sizeof files[count].name);
        files[count].bytes = s.st_size;
        count++;
    }
    closedir(d);
    if (!files)
        return mps_fail(err, MPS_ENOMEM, "out of memory");
    qsort(files, (size_t)count, sizeof *files, cmp_entry);
    free(m->files);
    m->files = files;
    m->nfiles = count;
    char manifest[4400], parent[4200];
    snprintf(manifest, sizeof manifest, "%s/" MPS_MANIFEST_NAME, st->stage_dir);
    if (mps_manifest_write(manifest, m, err) != 0)
        return -1;
    mps_trace_event(st->trace, MPS_EV_MANIFEST_WRITTEN);
    mps_trace_event(st->trace, MPS_EV_DIR_FSYNC_BEGIN);
    if (mps_fsync_path(st->stage_dir, err) != 0)
        return -1;
    mps_trace_event(st->trace, MPS_EV_DIR_FSYNC_END);
    char old[4300] = "";
    if (st->replace) {
        /* One atomic exchange: at every instant DIR is a whole checkpoint, the old one or the new
         * one; the old one is then in DIR.partial, removed below or by the next writer. */
        if (renameat2(AT_FDCWD, st->stage_dir, AT_FDCWD, st->final_dir, RENAME_EXCHANGE) == 0) {
            snprintf(old, sizeof old, "%s", st->stage_dir);
        } else if (errno == EINVAL || errno == ENOSYS || errno == ENOTSUP) {
            /* a file system without RENAME_EXCHANGE: two renames; a crash between them leaves the
             * old checkpoint in DIR.old-PID and the new one, complete, in DIR.partial */
            snprintf(old, sizeof old, "%s.old-%d", st->final_dir, (int)getpid());
            if (rename(st->final_dir, old) != 0)
                return mps_fail(err, MPS_EIO, "%s: cannot move the old checkpoint aside: %s", st->final_dir,
                                strerror(errno));
            if (rename(st->stage_dir, st->final_dir) != 0) {
                int e = errno;
                rename(old, st->final_dir); /* put the old one back */
                return mps_fail(err, MPS_EIO, "%s: cannot rename %s into place: %s", st->final_dir, st->stage_dir,
                                strerror(e));
            }
        } else {
            return mps_fail(err, MPS_EIO, "%s: cannot exchange it with %s: %s", st->final_dir, st->stage_dir,
                            strerror(errno));
        }
    } else {
        rmdir(st->final_dir); /* an empty directory given as output */
        if (rename(st->stage_dir, st->final_dir) != 0)
            return mps_fail(err, MPS_EIO, "%s: cannot rename %s into place: %s", st->final_dir, st->stage_dir,
                            strerror(errno));
    }
    mps_trace_event(st->trace, MPS_EV_RENAMED);
    parent_of(st->final_dir, parent, sizeof parent);
    if (mps_fsync_path(parent, err) != 0)
        return -1;
    if (old[0]) {
        /* the manifest first: a half-removed old checkpoint is never mistaken for a whole one */
        char old_manifest[4400];
        snprintf(old_manifest, sizeof old_manifest, "%s/" MPS_MANIFEST_NAME, old);
        unlink(old_manifest);
        mps_remove_tree(old);
    }
    st->stage_dir[0] = '\0';
    release_lock(st);
    mps_trace_event(st->trace, MPS_EV_COMMITTED);
    return 0;
}
