#include "output.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

int mps_output_refuse_existing(const char *path, mps_err *err)
{
    struct stat st;
    if (lstat(path, &st) == 0)
        return mps_fail(err, MPS_EUSAGE, "%s: already exists; pass --force to replace it", path);
    if (errno != ENOENT && errno != ENOTDIR)
        return mps_fail(err, MPS_EIO, "%s: cannot check for an existing file: %s", path, strerror(errno));
    return 0;
}

/* model-00001-of-00003.safetensors: a part of a sharded model */
static int is_part_name(const char *name)
{
    int a, b, n = 0;
    return sscanf(name, "model-%5d-of-%5d.safetensors%n", &a, &b, &n) == 2 && name[n] == '\0';
}

int mps_output_refuse_model_files(const char *dir, mps_file_format format, int64_t step, mps_err *err)
{
    char path[4400];
    if (format == MPS_FILE_SAFETENSORS) {
        /* one file, or parts and their index (--max-shard-size): any of them, and config.json */
        static const char *const names[] = { "model.safetensors", "model.safetensors.index.json", "config.json" };
        for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
            snprintf(path, sizeof path, "%s/%s", dir, names[i]);
            if (mps_output_refuse_existing(path, err) != 0)
                return -1;
        }
        DIR *d = opendir(dir);
        struct dirent *e;
        int rc = 0;
        while (rc == 0 && d && (e = readdir(d)) != NULL)
            if (is_part_name(e->d_name)) {
                snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
                rc = mps_output_refuse_existing(path, err);
            }
        if (d)
            closedir(d);
        return rc;
    }
    snprintf(path, sizeof path, "%s/model_%08lld.bin", dir, (long long)step);
    return mps_output_refuse_existing(path, err);
}
