/* A TCTI that bounds every answer: keyx's TPM connections go through it so that a TPM that stops
 * answering fails within `tpm-timeout` instead of hanging the caller (see tpm2_tcti.c for why
 * tpm2-tss cannot do this itself). The device (tpm2_device.c) puts one in front of each TCTI
 * loader context it opens, and asks it whether a command it gave up on is still unanswered
 * before it opens the next one. */
#ifndef KEYX_BACKEND_TPM2_TCTI_H
#define KEYX_BACKEND_TPM2_TCTI_H

#include <time.h>

#include <tss2/tss2_tcti.h>

struct tpm_stall_mark;

/* What the bounded TCTIs of one device tell it about the commands they gave up on. It belongs to
 * the device and outlives its TCTI contexts (a worker left alone with a given-up command holds a
 * reference to the mark only). timed_out and flush_stale are set by the TCTI when it gives a
 * command up; the device reads and clears them. mark and stale_fd are the TCTI's. */
typedef struct tpm_tcti_watch {
    unsigned timed_out; /* ms: the bound the last command missed, until reported; 0: none */
    int flush_stale;    /* a command was given up on: clear the TPM on the next connect */
    struct tpm_stall_mark *mark; /* worker mode: commands given up on, shared with their workers */
    int stale_fd; /* swtpm: the connection of a command given up on, until it answers; -1 */
} tpm_tcti_watch;

/* 1, or 0 when out of memory (nothing to clean up then). */
int tpm_tcti_watch_init(tpm_tcti_watch *w);
void tpm_tcti_watch_cleanup(tpm_tcti_watch *w);
/* 1 while a command given up on still has no answer (the TPM is stalled). */
int tpm_tcti_unanswered(tpm_tcti_watch *w);

/* fork(): the device's prepare handler calls lock after taking its own locks, the parent and
 * child handlers unlock first; the child then calls forked() for each watch (the parent's workers,
 * and the answers they wait for, are not in the child). */
void tpm_tcti_fork_lock(void);
void tpm_tcti_fork_unlock(void);
void tpm_tcti_watch_forked(tpm_tcti_watch *w);

/* Opens the TPM at the TCTI configuration conf (NULL: the loader's default) behind the bounded
 * TCTI. Opening is bounded too: swtpm through keyx's own socket (no loader), any other TCTI
 * through the loader in a thread that keyx stops waiting for after bound_ms (*timed_out = 1 then,
 * and the thread closes what it opens once the TPM answers). Each command gets bound_ms to be
 * answered (RSA key creation ten times as long); a command given up on makes the TCTI return
 * TSS2_TCTI_RC_IO_ERROR from then on and is reported in w. */
TSS2_RC tpm_tcti_open(const char *conf, unsigned bound_ms, tpm_tcti_watch *w,
                      TSS2_TCTI_CONTEXT **out, int *timed_out);
/* Finalizes and frees *c (NULL is fine) and sets it to NULL. Never waits for the answer to a
 * command still out: its worker is left to close the connection. */
void tpm_tcti_free(TSS2_TCTI_CONTEXT **c);

/* *ts = now + ms on clock. */
void tpm_deadline_in(clockid_t clock, struct timespec *ts, unsigned ms);

#endif
