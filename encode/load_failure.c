/* The failure of the last key file load in this thread and its cause (see load_failure.h). */
#include <string.h>

#include "encode/load_failure.h"

static _Thread_local struct {
    unsigned long since; /* keyx_error_count() at keyx_load_failure_begin() */
    int noted, has_cause;
    keyx_error_copy cause, failure;
} lf;

void keyx_load_failure_begin(void)
{
    lf.noted = 0;
    lf.since = keyx_error_count();
}

void keyx_load_failure_raise(const struct keyx_provctx *p, const char *file, int line,
                             const char *func, int reason, const char *msg)
{
    lf.has_cause = keyx_error_count() != lf.since;
    if (lf.has_cause)
        keyx_error_last(&lf.cause);
    lf.failure.reason = reason;
    lf.failure.file = file;
    lf.failure.line = line;
    lf.failure.func = func;
    strncpy(lf.failure.detail, msg, sizeof(lf.failure.detail) - 1);
    lf.failure.detail[sizeof(lf.failure.detail) - 1] = '\0';
    keyx_raise(p, file, line, func, reason, "%s", msg);
    lf.noted = 1;
}

int keyx_load_failure_cause(keyx_error_copy *out)
{
    if (keyx_error_count() == lf.since)
        return 0;
    keyx_error_last(out);
    return 1;
}

int keyx_load_failure_cause_reason(int fallback)
{
    keyx_error_copy e;

    return keyx_load_failure_cause(&e) ? e.reason : fallback;
}

int keyx_load_failure_noted(void)
{
    return lf.noted;
}

void keyx_load_failure_raise_again(const struct keyx_provctx *p)
{
    if (!lf.noted)
        return;
    lf.noted = 0;
    if (lf.has_cause)
        keyx_error_raise_copy(p, &lf.cause);
    keyx_error_raise_copy(p, &lf.failure);
}
