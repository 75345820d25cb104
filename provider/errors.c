/* keyx's reason strings and the one function every error path goes through. */
#include <stdarg.h>
#include <stdio.h>

#include <openssl/err.h>
#include <openssl/proverr.h>

#include "provider/errors.h"
#include "provider/provctx.h"

static const OSSL_ITEM reason_strings[] = {
    {KEYX_R_CONFIG_INVALID, "invalid keyx configuration"},
    {KEYX_R_UNSUPPORTED, "not supported by any configured keyx backend"},
    {KEYX_R_INVALID_PEER_KEY, "invalid peer public key"},
    {KEYX_R_KEY_MISMATCH, "peer key does not match the key's group"},
    {KEYX_R_KEY_USED_UP, "key used up (ephemeral-max-uses reached)"},
    {KEYX_R_EXPORT_REFUSED, "private key cannot leave its hardware backend"},
    {KEYX_R_BACKEND_FAILURE, "backend operation failed"},
    {KEYX_R_BACKEND_UNAVAILABLE, "backend unavailable"},
    {KEYX_R_MISSING_KEY, "missing key"},
    {KEYX_R_INVALID_ARGUMENT, "invalid argument"},
    {KEYX_R_RECURSION, "re-entry into keyx from a backend refused"},
    {KEYX_R_INTERNAL, "internal error"},
    {KEYX_R_AUDIT, "audit log error"},
    {KEYX_R_NOT_CONFIGURED, "keyx is not configured correctly and refuses to serve"},
    {KEYX_R_KDF, "key exchange KDF error"},
    {KEYX_R_PIN_LOCKOUT, "token login not tried: the token shows failed logins"},
    {KEYX_R_PARAM_BUFFER, "provider parameter buffer too small or of the wrong type"},
    {KEYX_R_PKCS1_DECRYPT_REFUSED, "PKCS#1 v1.5 decryption refused (padding oracle)"},
    {KEYX_R_KEY_NOT_WRITABLE, "key cannot be written: an ephemeral hardware key has no reference"},
    {KEYX_R_DIGEST_UNSUPPORTED, "digest not supported for this key"},
    {KEYX_R_MODULE_LOAD, "PKCS#11 module cannot be loaded"},
    {KEYX_R_LOGIN_FAILED, "token login failed"},
    {KEYX_R_TPM_OBJECT_MEMORY, "TPM out of object memory"},
    {KEYX_R_KEY_USAGE, "the key does not allow this operation"},
    {KEYX_R_SEEDED_KEY, "a key derived from a seed is made in software only"},
    {KEYX_R_TPM_NOT_SHAREABLE,
     "TPM without a resource manager shared between forked processes: key lost"},
    {KEYX_R_DEVICE_TIMEOUT, "the device did not answer in time"},
    {KEYX_R_TPM_AFTER_FORK, "tpm2-abrmd unreachable after fork() from a process that used it"},
    {0, NULL},
};

const OSSL_ITEM *keyx_reason_strings(void)
{
    return reason_strings;
}

void keyx_errors_init(keyx_provctx *p, const OSSL_DISPATCH *in)
{
    for (; in->function_id != 0; in++) {
        switch (in->function_id) {
        case OSSL_FUNC_CORE_NEW_ERROR:
            p->core_new_error = OSSL_FUNC_core_new_error(in);
            break;
        case OSSL_FUNC_CORE_SET_ERROR_DEBUG:
            p->core_set_error_debug = OSSL_FUNC_core_set_error_debug(in);
            break;
        case OSSL_FUNC_CORE_VSET_ERROR:
            p->core_vset_error = OSSL_FUNC_core_vset_error(in);
            break;
        default:
            break;
        }
    }
}

static _Thread_local unsigned long raised;
static _Thread_local keyx_error_copy last;

unsigned long keyx_error_count(void)
{
    return raised;
}

void keyx_error_last(keyx_error_copy *out)
{
    *out = last;
}

void keyx_error_raise_copy(const keyx_provctx *p, const keyx_error_copy *e)
{
    keyx_raise(p, e->file, e->line, e->func, e->reason, "%s", e->detail);
}

void keyx_raise(const keyx_provctx *p, const char *file, int line, const char *func, int reason,
                const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    raised++;
    last.reason = reason;
    last.file = file;
    last.line = line;
    last.func = func;
    {
        va_list copy;

        va_copy(copy, ap);
        vsnprintf(last.detail, sizeof(last.detail), fmt, copy);
        va_end(copy);
    }
    if (p != NULL && p->initialized && p->core_new_error != NULL && p->core_vset_error != NULL) {
        /* Through the core, so the error carries keyx's library code and reason strings. */
        p->core_new_error(p->handle);
        if (p->core_set_error_debug != NULL)
            p->core_set_error_debug(p->handle, file, line, func);
        p->core_vset_error(p->handle, (uint32_t)reason, fmt, ap);
    } else {
        /* Before init completes the core has not registered keyx's reason strings: raise a
         * generic provider error whose detail starts with keyx's own reason. */
        char detail[512];
        const char *what = "keyx error";

        for (const OSSL_ITEM *it = reason_strings; it->ptr != NULL; it++)
            if ((int)it->id == reason)
                what = it->ptr;
        vsnprintf(detail, sizeof(detail), fmt, ap);
        /* Init keeps this detail as the reason it refuses every operation (fail_closed.h). */
        ERR_new();
        ERR_set_debug(file, line, func);
        ERR_set_error(ERR_LIB_PROV,
                      reason == KEYX_R_CONFIG_INVALID ? PROV_R_INVALID_CONFIG_DATA
                                                      : ERR_R_INIT_FAIL,
                      "keyx: %s: %s", what, detail);
    }
    va_end(ap);
}
