/* Shared pieces of the command-line front end. */
#ifndef MPS_CLI_H
#define MPS_CLI_H

#include <stdint.h>

#include "err.h"
#include "reshard/reshard.h"

int cmd_shard(int argc, char **argv);
int cmd_export(int argc, char **argv);
int cmd_verify(int argc, char **argv);
int cmd_synth(int argc, char **argv);
int cmd_compare(int argc, char **argv);
int cmd_reshard(int argc, char **argv);
int cmd_split(int argc, char **argv);
int cmd_load(int argc, char **argv);
int cmd_init(int argc, char **argv);
int cmd_tokens(int argc, char **argv);
int cmd_train(int argc, char **argv);
int cmd_eval(int argc, char **argv);

/* Under mpirun: initialises MPI and fills procs (returns 1); otherwise returns 0; -1 on error. */
int cli_procs_init(int *argc, char ***argv, mps_procs *procs);
void cli_procs_finish(int multi);
int cmd_inspect(int argc, char **argv);

/* Prints "mpshard CMD: message" and returns the error's exit code. */
int cli_fail(const char *cmd, const mps_err *err);
/* Prints a usage error naming the option and returns MPS_EUSAGE. */
int cli_usage(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Parses a positive integer option value; returns -1 on error (after printing). */
int cli_int(const char *cmd, const char *opt, const char *value, int64_t lo, int64_t hi, int64_t *out);

#endif
