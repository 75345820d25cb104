/* Key reference files in (DER; PEM "KEYX KEY" arrives as DER through pem_decoder.c), from
 * PEM_read_bio_PrivateKey, SSL_CTX_use_PrivateKey_file, `-inkey file` and every other OpenSSL key
 * reader. The key is loaded from the backend the file names and handed over by reference, after its
 * public key has been checked against the one the file recorded. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include "backend/call.h"
#include "backend/router.h"
#include "encode/core_bio.h"
#include "encode/encode.h"
#include "encode/keyref.h"
#include "encode/load_failure.h"
#include "keymgmt/key.h"
#include "provider/audit.h"
#include "provider/errors.h"
#include "provider/fail_closed.h"

/* The reference in the input: 1 found, 0 not a reference file (passed over). */
static int read_reference(keyx_codec *c, OSSL_CORE_BIO *in, keyx_keyref *r)
{
    BIO *mem = keyx_core_bio_read_der_element(c->p, in);
    unsigned char *data = NULL;
    long len;
    int found;

    if (mem == NULL)
        return 0;
    len = BIO_get_mem_data(mem, &data);
    ERR_set_mark(); /* other formats fail to parse here: not an error of ours */
    found = len > 0 && keyx_keyref_from_der(data, (size_t)len, r);
    ERR_pop_to_mark();
    BIO_free(mem);
    return found;
}

/* Raises why the reference cannot be used (noted for the PEM decoder: OpenSSL 3.0's file: store
 * drops a decoder's errors, see load_failure.h), and writes it with its cause to the load event:
 * the one place that keeps it where the store drops both (DER files read by OpenSSL 3.0). */
static void load_failed(keyx_codec *c, const char *backend, int reason, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void load_failed(keyx_codec *c, const char *backend, int reason, const char *fmt, ...)
{
    char msg[512], logged[1100];
    keyx_error_copy cause;
    va_list ap;
    keyx_event ev = {
        .event = "load",
        .backend = backend,
        .alg = keyx_alg_name(c->alg),
        .ephemeral = 0,
        .ok = 0,
        .error = logged,
    };

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (keyx_load_failure_cause(&cause))
        snprintf(logged, sizeof(logged), "%s; cause: %s", msg, cause.detail);
    else
        snprintf(logged, sizeof(logged), "%s", msg);
    KEYX_LOAD_FAILURE(c->p, reason, msg);
    keyx_event_emit(c->p, &ev);
}

static keyx_backend *backend_named(keyx_codec *c, const char *name)
{
    for (int kind = 0; kind < KEYX_BACKEND_KINDS; kind++)
        if (kind != KEYX_BACKEND_SOFTWARE &&
            strcmp(name, keyx_backend_kind_name((keyx_backend_kind)kind)) == 0)
            return keyx_router_backend(c->p->router, (keyx_backend_kind)kind);
    load_failed(c, NULL, KEYX_R_INVALID_ARGUMENT,
                "key reference file names backend \"%s\": expected tpm or pkcs11", name);
    return NULL;
}

/* 1 when a token's PKCS#3 DH key (p, g, y: what a token keeps) is the recorded X9.42 key: the
 * token has no place for q, so the recorded key, q included, becomes the key's view. */
static int dh_is_recorded_dhx(const EVP_PKEY *pub, const EVP_PKEY *recorded)
{
    static const char *const parts[] = {OSSL_PKEY_PARAM_FFC_P, OSSL_PKEY_PARAM_FFC_G,
                                        OSSL_PKEY_PARAM_PUB_KEY};
    int same = EVP_PKEY_is_a(pub, "DH") && EVP_PKEY_is_a(recorded, "DHX");

    for (size_t i = 0; same && i < sizeof(parts) / sizeof(parts[0]); i++) {
        BIGNUM *a = NULL, *b = NULL;

        same = EVP_PKEY_get_bn_param(pub, parts[i], &a) == 1 &&
               EVP_PKEY_get_bn_param(recorded, parts[i], &b) == 1 && BN_cmp(a, b) == 0;
        BN_free(a);
        BN_free(b);
    }
    return same;
}

/* The key the reference names, checked against the recorded public key; NULL + error. */
static keyx_key *load_reference(keyx_codec *c, const keyx_keyref *r, EVP_PKEY *recorded)
{
    keyx_backend *be;
    void *handle = NULL;
    EVP_PKEY *pub = NULL;

    keyx_load_failure_begin(); /* the backend's errors from here on are the cause */
    if ((be = backend_named(c, r->backend)) == NULL)
        return NULL;
    /* The tpm backend finds and checks the key at its first use (after nginx's fork). */
    if (be->ops->load_deferred != NULL) {
        if (keyx_backend_load_deferred(be, r->locator, recorded, &handle, &pub) != 1) {
            load_failed(c, be->ops->name, keyx_load_failure_cause_reason(KEYX_R_MISSING_KEY),
                        "key reference file: the %s key \"%s\" could not be loaded", r->backend,
                        r->locator);
            return NULL;
        }
        return keyx_key_adopt(c->p, be, handle, pub);
    }
    if (be->ops->load == NULL || keyx_backend_load(be, r->locator, &handle, &pub) != 1) {
        load_failed(c, be->ops->name, keyx_load_failure_cause_reason(KEYX_R_MISSING_KEY),
                    "key reference file: the %s key \"%s\" could not be loaded (the error "
                    "before this one says why)",
                    r->backend, r->locator);
        return NULL;
    }
    if (dh_is_recorded_dhx(pub, recorded)) {
        EVP_PKEY_free(pub);
        if ((pub = EVP_PKEY_dup(recorded)) == NULL) {
            keyx_backend_free(be, handle);
            return NULL;
        }
    } else if (EVP_PKEY_eq(pub, recorded) != 1) {
        keyx_backend_free(be, handle);
        EVP_PKEY_free(pub);
        load_failed(c, be->ops->name, KEYX_R_KEY_MISMATCH,
                    "key reference file: the %s key \"%s\" is not the key this file was "
                    "written for (its public key differs): the key there was replaced",
                    r->backend, r->locator);
        return NULL;
    }
    return keyx_key_adopt(c->p, be, handle, pub);
}

int keyx_keyref_decode(void *ctx, OSSL_CORE_BIO *in, int selection, OSSL_CALLBACK *data_cb,
                       void *data_cbarg, OSSL_PASSPHRASE_CALLBACK *cb, void *cbarg)
{
    keyx_codec *c = ctx;
    keyx_keyref r;
    EVP_PKEY *recorded = NULL;
    const unsigned char *p;
    keyx_key *k;
    int found, ok = 1;

    (void)selection;
    (void)cb; /* a reference file is not encrypted; PINs come from the configuration */
    (void)cbarg;
    if (!keyx_check_not_reentered(c->p, "a key reference file"))
        return 0;
    if ((found = read_reference(c, in, &r)) <= 0)
        return found == 0; /* not ours: the next decoder tries */
    /* Refused only now: other key files still load in software while keyx refuses to serve. */
    if (keyx_refused(c->p)) {
        keyx_keyref_clear(&r);
        return 0;
    }
    p = r.spki;
    recorded = d2i_PUBKEY_ex(NULL, &p, (long)r.spkilen, c->p->libctx, NULL);
    if (recorded == NULL || p != r.spki + r.spkilen) {
        KEYX_ERR(c->p, KEYX_R_INVALID_ARGUMENT,
                 "malformed " KEYX_KEYREF_PEM_NAME " file: its public key does not parse");
        ok = 0;
    } else if (EVP_PKEY_is_a(recorded, keyx_alg_name(c->alg))) {
        /* Decoders of the other algorithms pass it over. */
        if ((k = load_reference(c, &r, recorded)) == NULL)
            ok = keyx_key_pass_refused(c->alg, data_cb, data_cbarg);
        else
            ok = keyx_key_pass(k, data_cb, data_cbarg);
    }
    EVP_PKEY_free(recorded);
    keyx_keyref_clear(&r);
    return ok;
}
