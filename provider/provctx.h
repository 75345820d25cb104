/* The provider context: one per load of keyx into a library context. */
#ifndef KEYX_PROVIDER_PROVCTX_H
#define KEYX_PROVIDER_PROVCTX_H

#include <openssl/core.h>
#include <openssl/core_dispatch.h>
#include <openssl/types.h>

#include "provider/config.h"

struct keyx_audit;
struct keyx_router;
struct keyx_algtab;
struct keyx_domain_cache;

typedef struct keyx_provctx {
    const OSSL_CORE_HANDLE *handle;
    int initialized; /* init finished: the core knows keyx's reason strings from now on */
    /* keyx's own library context with only the default provider in it: software crypto runs here
     * and never re-enters the application's context (which may prefer keyx). */
    OSSL_LIB_CTX *libctx;
    OSSL_PROVIDER *dflt;
    keyx_config cfg;
    int config_read; /* cfg holds the whole configuration (else keyx refuses, cfg is partial) */
    struct keyx_audit *audit;          /* NULL when audit-log is off */
    struct keyx_router *router;        /* the configured backends, in order */
    struct keyx_algtab *algs;          /* default provider's keymgmt tables, fetched once */
    struct keyx_domain_cache *domains; /* named groups' parameters, made once */
    /* Non-empty when keyx cannot serve as configured: why, and every operation is refused with
     * it (fail_closed.h); the router is NULL then. */
    char refusal[400];
    /* Core error functions: keyx errors carry keyx's own library code and reason strings. */
    OSSL_FUNC_core_new_error_fn *core_new_error;
    OSSL_FUNC_core_set_error_debug_fn *core_set_error_debug;
    OSSL_FUNC_core_vset_error_fn *core_vset_error;
    /* Core BIO functions: encoders and decoders read and write the application's BIOs. */
    OSSL_FUNC_BIO_read_ex_fn *core_bio_read_ex;
    OSSL_FUNC_BIO_write_ex_fn *core_bio_write_ex;
    OSSL_FUNC_BIO_gets_fn *core_bio_gets;
} keyx_provctx;

#endif
