/* keyx errors: every failure raises one OpenSSL error with a keyx reason and a detail saying what
 * to do. */
#ifndef KEYX_PROVIDER_ERRORS_H
#define KEYX_PROVIDER_ERRORS_H

#include <openssl/core.h>
#include <openssl/crypto.h>

struct keyx_provctx;

enum keyx_reason {
    KEYX_R_CONFIG_INVALID = 1, /* a configuration key has a value keyx does not accept */
    KEYX_R_UNSUPPORTED,        /* algorithm, group or size no configured backend serves */
    KEYX_R_INVALID_PEER_KEY,   /* peer public key rejected (not on curve, small order, out of range)
                                */
    KEYX_R_KEY_MISMATCH,       /* peer and own key use different groups or parameters */
    KEYX_R_KEY_USED_UP,        /* ephemeral-max-uses reached: the key has been destroyed */
    KEYX_R_EXPORT_REFUSED,     /* private key of a hardware key cannot leave its backend */
    KEYX_R_BACKEND_FAILURE,    /* the backend failed the operation */
    KEYX_R_BACKEND_UNAVAILABLE, /* the backend could not be reached or is not built in */
    KEYX_R_MISSING_KEY,         /* the operation needs a key (or part of one) that is not there */
    KEYX_R_INVALID_ARGUMENT,    /* a parameter or buffer given by the caller is wrong */
    KEYX_R_RECURSION,           /* a backend's own libcrypto use re-entered keyx */
    KEYX_R_INTERNAL,            /* allocation or internal failure */
    KEYX_R_AUDIT,               /* the audit log could not be opened or written */
    KEYX_R_NOT_CONFIGURED,      /* keyx could not start as configured and refuses to serve */
    KEYX_R_KDF,
    KEYX_R_PIN_LOCKOUT,
    KEYX_R_PARAM_BUFFER, /* a provider parameter's buffer is not a large enough UTF-8 string */
    /* a token shows failed logins: keyx does not try the PIN (no lockout) */ /* a key exchange's
                                                                                 KDF parameters are
                                                                                 wrong or its KDF
                                                                                 failed */
    KEYX_R_TPM_NOT_SHAREABLE, /* a forked process flushed this one's objects on a TPM without a
                                 resource manager */
};

/* Reason strings for OSSL_FUNC_PROVIDER_GET_REASON_STRINGS. */
const OSSL_ITEM *keyx_reason_strings(void);

/* Raises an error through the core, with a printf-style detail. p may be NULL (before init). */
void keyx_raise(const struct keyx_provctx *p, const char *file, int line, const char *func,
                int reason, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 6, 7)))
#endif
    ;

#define KEYX_ERR(p, reason, ...)                                                                   \
    keyx_raise((p), OPENSSL_FILE, OPENSSL_LINE, OPENSSL_FUNC, (reason), __VA_ARGS__)

/* Core error functions, taken from the core's dispatch table at init. */
void keyx_errors_init(struct keyx_provctx *p, const OSSL_DISPATCH *in);

#endif
