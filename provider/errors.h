/* keyx errors: every failure raises one OpenSSL error with a keyx reason and a detail saying what
 * to do. */
#ifndef KEYX_PROVIDER_ERRORS_H
#define KEYX_PROVIDER_ERRORS_H

#include <openssl/core.h>
#include <openssl/crypto.h>

struct keyx_provctx;

enum keyx_reason {
    /* Comments above the names: clang-format cannot move them to another entry. */
    /* a configuration key has a value keyx does not accept */
    KEYX_R_CONFIG_INVALID = 1,
    /* algorithm, group or size no configured backend serves */
    KEYX_R_UNSUPPORTED,
    /* peer public key rejected (not on curve, small order, out of range) */
    KEYX_R_INVALID_PEER_KEY,
    /* peer and own key use different groups or parameters */
    KEYX_R_KEY_MISMATCH,
    /* ephemeral-max-uses reached: the key has been destroyed */
    KEYX_R_KEY_USED_UP,
    /* private key of a hardware key cannot leave its backend */
    KEYX_R_EXPORT_REFUSED,
    /* the backend failed the operation */
    KEYX_R_BACKEND_FAILURE,
    /* the backend could not be reached or is not built in */
    KEYX_R_BACKEND_UNAVAILABLE,
    /* the operation needs a key (or part of one) that is not there */
    KEYX_R_MISSING_KEY,
    /* a parameter or buffer given by the caller is wrong */
    KEYX_R_INVALID_ARGUMENT,
    /* a backend's own libcrypto use re-entered keyx */
    KEYX_R_RECURSION,
    /* allocation or internal failure */
    KEYX_R_INTERNAL,
    /* the audit log could not be opened or written */
    KEYX_R_AUDIT,
    /* keyx could not start as configured and refuses to serve */
    KEYX_R_NOT_CONFIGURED,
    /* a key exchange's KDF parameters are wrong or its KDF failed */
    KEYX_R_KDF,
    /* a token shows failed logins: keyx does not try the PIN (no lockout) */
    KEYX_R_PIN_LOCKOUT,
    /* a provider parameter's buffer is not a large enough UTF-8 string */
    KEYX_R_PARAM_BUFFER,
    /* PKCS#1 v1.5 decryption: a padding oracle (Bleichenbacher) */
    KEYX_R_PKCS1_DECRYPT_REFUSED,
    /* an ephemeral hardware key has no reference to write out */
    KEYX_R_KEY_NOT_WRITABLE,
    /* the key (its TPM, its token, or OpenSSL) does not sign with this digest */
    KEYX_R_DIGEST_UNSUPPORTED,
    /* the PKCS#11 module cannot be loaded or initialized */
    KEYX_R_MODULE_LOAD,
    /* the token refused the PIN (C_Login) */
    KEYX_R_LOGIN_FAILED,
    /* the TPM's object or session slots are full */
    KEYX_R_TPM_OBJECT_MEMORY,
    /* the key's attributes or its own scheme do not allow the operation (a sign-only key) */
    KEYX_R_KEY_USAGE,
    /* a key derived from a seed can only be made in software */
    KEYX_R_SEEDED_KEY,
    /* a forked process flushed this one's objects on a TPM without a resource manager */
    KEYX_R_TPM_NOT_SHAREABLE,
    /* the device did not answer within its time limit (pkcs11-timeout) */
    KEYX_R_DEVICE_TIMEOUT,
    /* tpm2-abrmd cannot be reached from a process forked from one connected through it */
    KEYX_R_TPM_AFTER_FORK,
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

/* The last error keyx raised in this thread, and how many it raised: a decoder that sees a load
 * fail under it can raise that cause again where OpenSSL dropped it (encode/load_failure.h). */
typedef struct keyx_error_copy {
    int reason;
    const char *file, *func;
    int line;
    char detail[512];
} keyx_error_copy;

unsigned long keyx_error_count(void);
void keyx_error_last(keyx_error_copy *out);

/* Raises a copied error again, with its own reason, detail and place. */
void keyx_error_raise_copy(const struct keyx_provctx *p, const keyx_error_copy *e);

/* Core error functions, taken from the core's dispatch table at init. */
void keyx_errors_init(struct keyx_provctx *p, const OSSL_DISPATCH *in);

#endif
