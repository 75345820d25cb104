/* RSA KEM, operation RSASVE (NIST SP 800-56B): encapsulation is a public-key operation run by
 * the default provider in keyx's context on the key's public view; decapsulation is a raw RSA
 * decryption in the key's backend (KEYX_RSA_PAD_RAW), whose output is the modulus-size secret. */
#include <string.h>
#include <strings.h>

#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>

#include "backend/call.h" /* keyx_check_not_reentered */
#include "keymgmt/key.h"
#include "provider/dispatch.h"
#include "provider/errors.h"
#include "provider/fail_closed.h"

typedef struct keyx_kem_ctx {
    keyx_provctx *p;
    keyx_key *key; /* owned by the application's EVP_PKEY */
    int decap;
    int rsasve; /* the operation was set (OpenSSL 3.0 has no default) */
} keyx_kem_ctx;

static void *kem_newctx(void *provctx)
{
    keyx_kem_ctx *c;

    if (keyx_refused(provctx) || !keyx_check_not_reentered(provctx, "an RSA KEM operation"))
        return NULL;
    if ((c = OPENSSL_zalloc(sizeof(*c))) != NULL)
        c->p = provctx;
    return c;
}

static void kem_freectx(void *vctx)
{
    OPENSSL_free(vctx);
}

static void *kem_dupctx(void *vctx)
{
    keyx_kem_ctx *d = OPENSSL_malloc(sizeof(*d));

    if (d != NULL)
        memcpy(d, vctx, sizeof(*d));
    return d;
}

static int kem_set_ctx_params(void *vctx, const OSSL_PARAM params[])
{
    keyx_kem_ctx *c = vctx;
    const OSSL_PARAM *p;
    const char *op = NULL;

    if (params == NULL || (p = OSSL_PARAM_locate_const(params, OSSL_KEM_PARAM_OPERATION)) == NULL)
        return 1;
    if (!OSSL_PARAM_get_utf8_string_ptr(p, &op) ||
        strcasecmp(op, OSSL_KEM_PARAM_OPERATION_RSASVE) != 0) {
        KEYX_ERR(c->p, KEYX_R_UNSUPPORTED, "RSA KEM operation '%s': keyx offers RSASVE only",
                 op != NULL ? op : "(not a string)");
        return 0;
    }
    c->rsasve = 1;
    return 1;
}

static int kem_init(keyx_kem_ctx *c, void *vkey, int decap, const OSSL_PARAM params[])
{
    keyx_key *k = vkey;

    if (k == NULL || k->alg != KEYX_ALG_RSA || !k->has_public) {
        KEYX_ERR(c->p, KEYX_R_KEY_MISMATCH, "the RSA KEM needs an RSA key");
        return 0;
    }
    if (decap && !keyx_key_has_private(k)) {
        KEYX_ERR(c->p, KEYX_R_MISSING_KEY, "RSA decapsulation needs a private key");
        return 0;
    }
    c->key = k;
    c->decap = decap;
    c->rsasve = 0;
    return kem_set_ctx_params(c, params);
}

static int kem_encapsulate_init(void *vctx, void *vkey, const OSSL_PARAM params[])
{
    return kem_init(vctx, vkey, 0, params);
}

static int kem_decapsulate_init(void *vctx, void *vkey, const OSSL_PARAM params[])
{
    return kem_init(vctx, vkey, 1, params);
}

static int kem_ready(keyx_kem_ctx *c, int decap)
{
    if (c->key == NULL || c->decap != decap) {
        KEYX_ERR(c->p, KEYX_R_MISSING_KEY, "initialize the context for %s first",
                 decap ? "decapsulation" : "encapsulation");
        return 0;
    }
    if (!c->rsasve) {
        KEYX_ERR(c->p, KEYX_R_INVALID_ARGUMENT,
                 "set the KEM operation to RSASVE (EVP_PKEY_CTX_set_kem_op) first");
        return 0;
    }
    return 1;
}

static int kem_encapsulate(void *vctx, unsigned char *out, size_t *outlen, unsigned char *secret,
                           size_t *secretlen)
{
    keyx_kem_ctx *c = vctx;
    EVP_PKEY_CTX *ctx;
    int ok;

    if (!kem_ready(c, 0))
        return 0;
    if (out == NULL) {
        size_t nlen = (size_t)EVP_PKEY_get_size(keyx_key_pub(c->key));

        if (outlen != NULL)
            *outlen = nlen;
        if (secretlen != NULL)
            *secretlen = nlen;
        return 1;
    }
    ctx = EVP_PKEY_CTX_new_from_pkey(c->p->libctx, keyx_key_pub(c->key), NULL);
    ok = ctx != NULL && EVP_PKEY_encapsulate_init(ctx, NULL) == 1 &&
         EVP_PKEY_CTX_set_kem_op(ctx, OSSL_KEM_PARAM_OPERATION_RSASVE) == 1 &&
         EVP_PKEY_encapsulate(ctx, out, outlen, secret, secretlen) == 1;
    EVP_PKEY_CTX_free(ctx);
    if (!ok)
        KEYX_ERR(c->p, KEYX_R_INVALID_ARGUMENT,
                 "RSASVE encapsulation failed (output buffers smaller than the modulus?)");
    keyx_key_event(c->key, "encapsulate", ok, ok ? NULL : "RSASVE encapsulation failed");
    return ok;
}

static int kem_decapsulate(void *vctx, unsigned char *out, size_t *outlen, const unsigned char *in,
                           size_t inlen)
{
    keyx_kem_ctx *c = vctx;
    keyx_rsa_op op = {.pad = KEYX_RSA_PAD_RAW};
    size_t nlen, len;

    if (!kem_ready(c, 1))
        return 0;
    nlen = (size_t)EVP_PKEY_get_size(keyx_key_pub(c->key));
    if (out == NULL) {
        *outlen = nlen;
        return 1;
    }
    if (inlen != nlen || *outlen < nlen) {
        KEYX_ERR(c->p, KEYX_R_INVALID_ARGUMENT,
                 "RSASVE: the ciphertext must be %zu bytes (it is %zu) and the output buffer "
                 "at least as large (it is %zu)",
                 nlen, inlen, *outlen);
        return 0;
    }
    len = nlen;
    if (!keyx_key_decrypt(c->key, "decapsulate", &op, in, inlen, out, &len))
        return 0;
    if (len < nlen) { /* a backend that strips leading zeros: the secret is modulus-size */
        memmove(out + nlen - len, out, len);
        memset(out, 0, nlen - len);
    }
    *outlen = nlen;
    return 1;
}

static const OSSL_PARAM settable[] = {
    OSSL_PARAM_utf8_string(OSSL_KEM_PARAM_OPERATION, NULL, 0),
    OSSL_PARAM_END,
};

static const OSSL_PARAM *kem_settable(void *vctx, void *provctx)
{
    (void)vctx;
    (void)provctx;
    return settable;
}

static int kem_get_ctx_params(void *vctx, OSSL_PARAM params[])
{
    (void)vctx;
    (void)params;
    return 1;
}

static const OSSL_PARAM *kem_gettable(void *vctx, void *provctx)
{
    static const OSSL_PARAM none[] = {OSSL_PARAM_END};

    (void)vctx;
    (void)provctx;
    return none;
}

#define FN(f) ((void (*)(void))(f))

const OSSL_DISPATCH keyx_rsa_kem_functions[] = {
    {OSSL_FUNC_KEM_NEWCTX, FN(kem_newctx)},
    {OSSL_FUNC_KEM_ENCAPSULATE_INIT, FN(kem_encapsulate_init)},
    {OSSL_FUNC_KEM_ENCAPSULATE, FN(kem_encapsulate)},
    {OSSL_FUNC_KEM_DECAPSULATE_INIT, FN(kem_decapsulate_init)},
    {OSSL_FUNC_KEM_DECAPSULATE, FN(kem_decapsulate)},
    {OSSL_FUNC_KEM_FREECTX, FN(kem_freectx)},
    {OSSL_FUNC_KEM_DUPCTX, FN(kem_dupctx)},
    {OSSL_FUNC_KEM_GET_CTX_PARAMS, FN(kem_get_ctx_params)},
    {OSSL_FUNC_KEM_GETTABLE_CTX_PARAMS, FN(kem_gettable)},
    {OSSL_FUNC_KEM_SET_CTX_PARAMS, FN(kem_set_ctx_params)},
    {OSSL_FUNC_KEM_SETTABLE_CTX_PARAMS, FN(kem_settable)},
    {0, NULL},
};
