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

/* The directory a writer of DIR commits to: DIR without trailing slashes. A symbolic link is
 * resolved, so that the checkpoint, its lock and its staging directory are where the link points
 * and the link itself is left as it is (an exchange would swap the link itself, and the old
 * checkpoint would then be removed through it); a link to nothing is refused. */
static int final_name(const char *dir, char *out, size_t size, mps_err *err)
{
    size_t n = strlen(dir);
    while (n > 1 && dir[n - 1] == '/')
        n--;
    if (n == 0 || n >= size)
        return mps_fail(err, MPS_EUSAGE, "output directory name is empty or too long");
    memcpy(out, dir, n);
    out[n] = '\0';
    struct stat st;
    if (lstat(out, &st) == 0 && S_ISLNK(st.st_mode)) {
        char *real = realpath(out, NULL);
        if (!real)
            return mps_fail(err, MPS_EUSAGE, "%s is a symbolic link to nothing (%s): give the directory to write",
                            out, strerror(errno));
        int fits = strlen(real) < size;
        if (fits)
            snprintf(out, size, "%s", real);
        free(real);
        if (!fits)
            return mps_fail(err, MPS_EUSAGE, "%s: the directory it links to has too long a name", dir);
    }
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

/* DIR.lock is held (flock) by the writer of DIR, and its text says what is this program's: the
 * first line marks it as an mpshard lock, then "staging DEV INO" names the staging directory the
 * writer created and "replacing DEV INO" the committed checkpoint it replaces (--force: the
 * exchange moves that one into DIR.partial before it is removed). A writer killed on the way
 * leaves both files; the next writer of DIR removes a DIR.partial only when the lock records it,
 * or when it is empty. Anything else there is not this program's to remove. */
#define LOCK_MARK "mpshard lock\n"

typedef struct {
    unsigned long long id[2][2]; /* (dev, ino) of the recorded staging and replaced directories */
    int n[2];
} lock_record;

static int record_names(const lock_record *r, const struct stat *s)
{
    for (int i = 0; i < 2; i++)
        if (r->n[i] && r->id[i][0] == (unsigned long long)s->st_dev && r->id[i][1] == (unsigned long long)s->st_ino)
            return 1;
    return 0;
}

/* Takes DIR.lock: creates it (*created = 1) or opens the one there, which must be a regular file
 * that is empty or an mpshard lock (*rec: what it records); refuses a link or anything else. */
static int take_lock(mps_stage *st, int *created, lock_record *rec, mps_err *err)
{
    memset(rec, 0, sizeof *rec);
    for (int attempt = 0; attempt < 100; attempt++) {
        int made = 1;
        int fd = open(st->lock_path, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
        if (fd < 0 && errno == EEXIST) {
            made = 0; /* O_NONBLOCK: a FIFO there must not block the open; it is refused below */
            fd = open(st->lock_path, O_RDWR | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
            if (fd < 0 && errno == ENOENT)
                continue; /* unlinked by a finishing writer meanwhile */
        }
        if (fd < 0 && errno == ELOOP)
            return mps_fail(err, MPS_EUSAGE, "%s is a symbolic link: refusing to use it as the lock of %s",
                            st->lock_path, st->final_dir);
        if (fd < 0)
            return mps_fail(err, MPS_EIO, "%s: cannot create lock file: %s", st->lock_path, strerror(errno));
        struct stat a, b;
        if (fstat(fd, &a) != 0 || !S_ISREG(a.st_mode)) {
            close(fd);
            return mps_fail(err, MPS_EUSAGE, "%s is not a regular file: refusing to use it as the lock of %s",
                            st->lock_path, st->final_dir);
        }
        if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
            close(fd);
            return mps_fail(err, MPS_EIO, "%s: another mpshard process is writing this checkpoint (lock %s held)",
                            st->final_dir, st->lock_path);
        }
        if (stat(st->lock_path, &b) != 0 || a.st_ino != b.st_ino || a.st_dev != b.st_dev) {
            close(fd);
            continue;
        }
        /* an empty one is what a writer killed right after creating it leaves */
        char text[512];
        ssize_t n = made ? 0 : pread(fd, text, sizeof text - 1, 0);
        if (n > 0 && ((size_t)n < strlen(LOCK_MARK) || memcmp(text, LOCK_MARK, strlen(LOCK_MARK)) != 0)) {
            close(fd);
            return mps_fail(err, MPS_EUSAGE, "%s exists and is not an mpshard lock file: refusing to touch it",
                            st->lock_path);
        }
        if (n > 0) {
            text[n] = '\0';
            static const char *const keys[2] = { "staging", "replacing" };
            for (char *line = text; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL)
                for (int i = 0; i < 2; i++) {
                    char fmt[48];
                    snprintf(fmt, sizeof fmt, "%s %%llu %%llu", keys[i]);
                    if (sscanf(line, fmt, &rec->id[i][0], &rec->id[i][1]) == 2)
                        rec->n[i] = 1;
                }
        }
        if ((made && pwrite(fd, LOCK_MARK, strlen(LOCK_MARK), 0) != (ssize_t)strlen(LOCK_MARK)) || n < 0) {
            mps_fail(err, MPS_EIO, "%s: cannot %s the lock file: %s", st->lock_path, made ? "write" : "read",
                     strerror(errno));
            if (made)
                unlink(st->lock_path);
            close(fd);
            return -1;
        }
        *created = made;
        st->lock_fd = fd;
        return 0;
    }
    return mps_fail(err, MPS_EIO, "%s: cannot take the lock", st->lock_path);
}

/* Records the staging directory (and the checkpoint being replaced) in the lock, on disk before
 * anything is written into the staging directory. */
static int record_staging(mps_stage *st, const struct stat *staging, const struct stat *replaced, mps_err *err)
{
    char text[256];
    int n = snprintf(text, sizeof text, LOCK_MARK "staging %llu %llu\n", (unsigned long long)staging->st_dev,
                     (unsigned long long)staging->st_ino);
    if (replaced)
        n += snprintf(text + n, sizeof text - (size_t)n, "replacing %llu %llu\n", (unsigned long long)replaced->st_dev,
                      (unsigned long long)replaced->st_ino);
    if (pwrite(st->lock_fd, text, (size_t)n, 0) != n || ftruncate(st->lock_fd, n) != 0 || fsync(st->lock_fd) != 0)
        return mps_fail(err, MPS_EIO, "%s: cannot write the lock file: %s", st->lock_path, strerror(errno));
    return 0;
}

/* path (which exists) is dir or inside it, both resolved. */
static int path_within(const char *path, const char *dir)
{
    char *p = realpath(path, NULL), *d = realpath(dir, NULL);
    size_t n = d ? strlen(d) : 0;
    int in = p && d && strncmp(p, d, n) == 0 && (p[n] == '\0' || p[n] == '/' || (n == 1 && d[0] == '/'));
    free(p);
    free(d);
    return in;
}

/* An input of the command inside dir, which this writer would remove: refused. */
static int input_inside(const char *const *inputs, const char *dir, const char *why, mps_err *err)
{
    for (int i = 0; inputs && inputs[i]; i++)
        if (path_within(inputs[i], dir))
            return mps_fail(err, MPS_EUSAGE, "%s: the input %s lies in this directory, which %s; move or rename it "
                            "first", dir, inputs[i], why);
    return 0;
}

int mps_stage_begin(const char *dir, int force, const char *const *inputs, mps_stage *st, mps_err *err)
{
    memset(st, 0, sizeof *st);
    st->lock_fd = -1;
    if (final_name(dir, st->final_dir, sizeof st->final_dir - 16, err) != 0 ||
        mps_stage_dir_name(dir, st->stage_dir, sizeof st->stage_dir, err) != 0)
        return -1;
    snprintf(st->lock_path, sizeof st->lock_path, "%s.lock", st->final_dir);
    int created = 0;
    lock_record rec;
    if (take_lock(st, &created, &rec, err) != 0)
        return -1;
    struct stat s, replaced;
    if (lstat(st->final_dir, &s) == 0) {
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
            if (input_inside(inputs, st->final_dir, "--force would replace", err) != 0)
                goto fail;
            st->replace = 1;
            replaced = s;
        } else if (!dir_is_empty(st->final_dir)) {
            mps_fail(err, MPS_EUSAGE, "%s exists, is not empty and is not an mpshard checkpoint; refusing to touch it",
                     st->final_dir);
            goto fail;
        }
    }
    if (lstat(st->stage_dir, &s) == 0) { /* left by a killed writer, or not ours at all */
        if (input_inside(inputs, st->stage_dir, "is the staging directory of this output", err) != 0)
            goto fail;
        if (!S_ISDIR(s.st_mode) || !(record_names(&rec, &s) || dir_is_empty(st->stage_dir))) {
            mps_fail(err, MPS_EUSAGE, "%s exists and is not a staging directory this program left (%s does not "
                     "record it): refusing to remove it; move it away first", st->stage_dir, st->lock_path);
            goto fail;
        }
        if (mps_remove_tree(st->stage_dir) != 0) { /* we hold the lock */
            mps_fail(err, MPS_EIO, "%s: cannot remove stale staging directory: %s", st->stage_dir, strerror(errno));
            goto fail;
        }
    }
    if (mkdir(st->stage_dir, 0755) != 0 || lstat(st->stage_dir, &s) != 0) {
        mps_fail(err, MPS_EIO, "%s: cannot create: %s", st->stage_dir, strerror(errno));
        goto fail;
    }
    if (record_staging(st, &s, st->replace ? &replaced : NULL, err) != 0) {
        rmdir(st->stage_dir);
        goto fail;
    }
    return 0;
fail:
    if (created) /* a refused writer leaves nothing behind; a lock it found stays as it was */
        unlink(st->lock_path);
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
