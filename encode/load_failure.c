/* The failure of the last key file load in this thread and its cause (see load_failure.h). */
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/core_object.h>
#include <openssl/err.h>
#include <openssl/params.h>

#include "encode/load_failure.h"

static _Thread_local struct {
    unsigned long since; /* keyx_error_count() at keyx_load_failure_begin() */
    int handing_on;      /* keyx_load_failure_hand_on() calls under way */
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

int keyx_load_failure_hand_on(const struct keyx_provctx *p, const unsigned char *der, size_t len,
                              const char *structure, OSSL_CALLBACK *data_cb, void *data_cbarg)
{
    OSSL_PARAM params[3];
    int ok;

    params[0] = OSSL_PARAM_construct_octet_string(OSSL_OBJECT_PARAM_DATA, (void *)der, len);
    params[1] =
        OSSL_PARAM_construct_utf8_string(OSSL_OBJECT_PARAM_DATA_STRUCTURE, (char *)structure, 0);
    params[2] = OSSL_PARAM_construct_end();
    /* Only the outermost keyx layer raises again: an inner one may run inside the store's mark
     * (the decoders the store runs on what the outer layer handed on), where it would be lost. */
    if (lf.handing_on > 0) {
        lf.handing_on++;
        ok = data_cb(params, data_cbarg);
        lf.handing_on--;
        return ok;
    }
    lf.handing_on = 1;
    keyx_load_failure_begin();
    ERR_set_mark();
    ok = data_cb(params, data_cbarg);
    if (!ok && keyx_load_failure_noted()) {
        ERR_pop_to_mark(); /* the same errors, or only the store's "unsupported" */
        keyx_load_failure_raise_again(p);
    } else {
        ERR_clear_last_mark();
    }
    lf.handing_on = 0;
    return ok;
}
