/* SIGINT and SIGTERM: a clean stop. The handler only records the signal; the commands look at the
 * flag where stopping is safe (the writers between chunks, the trainer at a step boundary). */
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#include "cli.h"

volatile sig_atomic_t cli_stop_signal;
/* Set by the first signal. The process has several threads and two pending signals may be handled
 * by two of them at once, so "first" is decided by a lock-free test-and-set (safe in a handler). */
static atomic_flag stop_seen = ATOMIC_FLAG_INIT;

static void on_stop_signal(int sig)
{
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    if (atomic_flag_test_and_set(&stop_seen)) {
        /* the second signal ends the process at once: its default action, raised again (it is
         * delivered when this handler returns) */
        sigaction(sig, &dfl, NULL);
        raise(sig);
        return;
    }
    cli_stop_signal = sig;
    /* later signals (either one) get the default action directly */
    sigaction(SIGINT, &dfl, NULL);
    sigaction(SIGTERM, &dfl, NULL);
}

void cli_stop_on_signals(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop_signal;
    sa.sa_flags = SA_RESTART; /* the commands do not expect EINTR from their I/O */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

const char *cli_signal_name(int sig)
{
    return sig == SIGINT ? "SIGINT" : sig == SIGTERM ? "SIGTERM" : "a signal";
}

int cli_fail_or_stopped(const char *cmd, const char *out, const mps_err *err)
{
    if (err->code <= MPS_ESTOPPED)
        return cli_fail(cmd, err);
    fprintf(stderr, "mpshard %s: stopped by %s: %s not written (its temporary files are removed)\n", cmd,
            cli_signal_name(err->code - MPS_ESTOPPED), out);
    return err->code;
}
