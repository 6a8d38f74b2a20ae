/* Shared pieces of the command-line front end. */
#ifndef MPS_CLI_H
#define MPS_CLI_H

#include <signal.h>
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
int cmd_ls(int argc, char **argv);
int cmd_extract(int argc, char **argv);
int cmd_models(int argc, char **argv);


/* Under mpirun: initialises MPI and fills procs (returns 1); otherwise returns 0; -1 on error. */
int cli_procs_init(int *argc, char ***argv, mps_procs *procs);
void cli_procs_finish(int multi);
/* 0 in every process but the first of an mpirun job (its rank from OMPI_COMM_WORLD_RANK; usable
 * before MPI is initialised): all parse the same arguments, only the first reports usage errors. */
int cli_procs_is_first(void);
/* The number of processes of the job on this host (1 without mpirun). */
int cli_procs_local_size(int multi);
/* Under mpirun, after this process failed: 1 when it is the process to print the error (the lowest
 * rank whose error is its own, primary, rather than that another process failed), and
 * *all_failed = 1 when every process of the job failed too (all reached this call within 3 s):
 * then none is inside a collective and MPI may be finalised; otherwise the caller aborts the job. */
int cli_procs_failed(int primary, int *all_failed);
/* 1 when err only says that another process failed ("... on another rank"): not primary. */
int cli_error_is_secondary(const mps_err *err);
int cmd_inspect(int argc, char **argv);

/* The signal (SIGINT or SIGTERM) that asked this process to stop, 0 until one came. Set by the
 * handler of cli_stop_on_signals (a handler can do no more than set a flag), read where stopping
 * is safe: the one piece of global state of the front end. */
extern volatile sig_atomic_t cli_stop_signal;
/* Installs that handler. After the first signal both go back to their default action, so that a
 * second one ends the process at once (as a kill would: only its staging can be left). */
void cli_stop_on_signals(void);
const char *cli_signal_name(int sig);
/* A writer's failure: cli_fail's line and code, or for one stopped by a signal (MPS_ESTOPPED + N,
 * its stop flag set by the handler) one line saying OUT was not written, and that code. */
int cli_fail_or_stopped(const char *cmd, const char *out, const mps_err *err);

/* Prints "mpshard CMD: message" and returns the error's exit code. */
int cli_fail(const char *cmd, const mps_err *err);
/* Prints a usage error naming the option and returns MPS_EUSAGE (under mpirun: in the first
 * process only, cli_procs_is_first). */
int cli_usage(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* getopt_long returned '?' (opterr is 0: getopt prints nothing): the usage error for the option
 * at argv[optind - 1] or optopt, in the form of every other one. optstring and opts: the short
 * and long options given to getopt_long. */
struct option;
int cli_bad_option(const char *cmd, const char *optstring, const struct option *opts, int argc, char **argv);
/* Parses a positive integer option value; returns -1 on error (after printing). */
int cli_int(const char *cmd, const char *opt, const char *value, int64_t lo, int64_t hi, int64_t *out);
/* Parses --schedule (train's, and what inspect and split plan for): *gpipe = 1 for gpipe, 0 for
 * 1f1b; returns -1 on anything else (after printing). */
int cli_schedule(const char *cmd, const char *value, int *gpipe);

#endif
