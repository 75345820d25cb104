/* keyx's state as provider parameters (OSSL_PROVIDER_get_params): the configured backends and
 * what keyx knows of each without asking its device, the audit sink, and why keyx refuses to
 * serve when it does. UTF-8 strings for a person to read; never a PIN or a secret. Reading them
 * never calls a device and never waits for a lock held across a device call. */
#ifndef KEYX_PROVIDER_STATE_H
#define KEYX_PROVIDER_STATE_H

#include <openssl/core.h>

struct keyx_provctx;

#define KEYX_STATE_BACKENDS "keyx-backends"         /* "tpm, pkcs11, software" */
#define KEYX_STATE_SOFTWARE "keyx-backend-software" /* "ready", "not in backends", ... */
#define KEYX_STATE_TPM "keyx-backend-tpm"           /* "connected; TCTI '...'", ... */
#define KEYX_STATE_PKCS11 "keyx-backend-pkcs11"     /* "module '...' loaded; token ...", ... */
#define KEYX_STATE_AUDIT "keyx-audit"               /* the log's path, "syslog at ...", "off" */
#define KEYX_STATE_REFUSAL "keyx-refusal"           /* "none", or why keyx refuses to serve */

/* The gettable entries of the parameters above, for the provider's table. */
#define KEYX_STATE_PARAM_TYPES                                                                     \
    OSSL_PARAM_DEFN(KEYX_STATE_BACKENDS, OSSL_PARAM_UTF8_STRING, NULL, 0),                         \
        OSSL_PARAM_DEFN(KEYX_STATE_SOFTWARE, OSSL_PARAM_UTF8_STRING, NULL, 0),                     \
        OSSL_PARAM_DEFN(KEYX_STATE_TPM, OSSL_PARAM_UTF8_STRING, NULL, 0),                          \
        OSSL_PARAM_DEFN(KEYX_STATE_PKCS11, OSSL_PARAM_UTF8_STRING, NULL, 0),                       \
        OSSL_PARAM_DEFN(KEYX_STATE_AUDIT, OSSL_PARAM_UTF8_STRING, NULL, 0),                        \
        OSSL_PARAM_DEFN(KEYX_STATE_REFUSAL, OSSL_PARAM_UTF8_STRING, NULL, 0)

/* Fills those of the parameters above that params asks for. 0 with KEYX_R_PARAM_BUFFER raised
 * when one is not a UTF-8 string buffer large enough (a NULL buffer gets the size needed). */
int keyx_state_get_params(struct keyx_provctx *p, OSSL_PARAM params[]);

#endif
