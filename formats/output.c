#include "output.h"

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

int mps_output_refuse_model_files(const char *dir, mps_file_format format, int64_t step, mps_err *err)
{
    char path[4400];
    if (format == MPS_FILE_SAFETENSORS) {
        snprintf(path, sizeof path, "%s/model.safetensors", dir);
        if (mps_output_refuse_existing(path, err) != 0)
            return -1;
        snprintf(path, sizeof path, "%s/config.json", dir);
        return mps_output_refuse_existing(path, err);
    }
    snprintf(path, sizeof path, "%s/model_%08lld.bin", dir, (long long)step);
    return mps_output_refuse_existing(path, err);
}
