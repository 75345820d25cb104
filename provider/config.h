/* keyx configuration: keys of the provider's openssl.cnf section, each overridden by its KEYX_*
 * variable. */
#ifndef KEYX_PROVIDER_CONFIG_H
#define KEYX_PROVIDER_CONFIG_H

#include <stddef.h>
#include <stdint.h>

#include <openssl/core.h>
#include <openssl/core_dispatch.h>

struct keyx_provctx;

typedef enum keyx_backend_kind {
    KEYX_BACKEND_SOFTWARE,
    KEYX_BACKEND_TPM,
    KEYX_BACKEND_PKCS11,
    KEYX_BACKEND_KINDS
} keyx_backend_kind;

typedef struct keyx_config {
    keyx_backend_kind backends[KEYX_BACKEND_KINDS]; /* `backends`, in order, no repeats */
    size_t nbackends;
    char *tpm_tcti;      /* `tpm-tcti`; NULL: the TCTI loader's default */
    uint32_t tpm_parent; /* `tpm-parent`; 0: transient primary created once and cached */
    char *pkcs11_module; /* `pkcs11-module`; NULL: the p11-kit proxy */
    char *pkcs11_token;  /* `pkcs11-token`: space-separated RFC 7512 URIs; NULL: first token */
    char *pkcs11_pin;    /* `pkcs11-pin`: "file:PATH", "env:NAME" or a literal; never printed */
    int pkcs11_raw_rsa;  /* `pkcs11-raw-rsa`: 0 or 1 */
    int tpm_encrypt_sessions;    /* `tpm-encrypt-sessions`: 0 or 1, default 1 */
    unsigned int tpm_timeout_ms; /* `tpm-timeout`: bound on a TPM answer, 100..600000, 5000 */
    unsigned int tpm_pool;       /* `tpm-pool`: pre-generated keys per group, 0 = off */
    unsigned int pkcs11_pool;    /* `pkcs11-pool` */
    /* `pkcs11-timeout`: bound on one call into the token, 100..600000, 30000 */
    unsigned int pkcs11_timeout_ms;
    char *audit_log;             /* `audit-log`; NULL: off */
    uint64_t ephemeral_max_uses; /* `ephemeral-max-uses`; 0: unlimited */
    int debug;                   /* `debug`: 0 or 1 */
} keyx_config;

/* Fills cfg with defaults, then the provider's config section (read through core_get_params),
 * then the environment. Warns on stderr about unknown keys in keyx's section. On an invalid
 * value returns 0 with a KEYX_R_CONFIG_INVALID error naming the key and what it accepts. */
int keyx_config_load(keyx_config *cfg, struct keyx_provctx *p,
                     OSSL_FUNC_core_get_params_fn *core_get_params);
void keyx_config_free(keyx_config *cfg);

const char *keyx_backend_kind_name(keyx_backend_kind kind);

#endif
