/* Key exchange (ECDH, X25519, X448, DH): the secret is computed in the backend that holds the
 * private key; keyx checks the peer first and shapes the result as the default provider does,
 * applying the exchange's KDF (exchange/kdf.c) when the application asked for one. */
#include <string.h>

#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/params.h>

#include "backend/call.h"
#include "exchange/kdf.h"
#include "keymgmt/key.h"
#include "provider/dispatch.h"
#include "provider/errors.h"
#include "provider/fail_closed.h"

/* Largest secret: ffdhe8192. */
#define MAX_SECRET 1024

typedef struct keyx_exch {
    keyx_provctx *p;
    keyx_alg alg;
    keyx_key *key;  /* owned by the application's EVP_PKEY, which the EVP_PKEY_CTX holds */
    keyx_key *peer; /* likewise */
    int pad;        /* DH: keep leading zero bytes (TLS 1.3 sets it) */
    int cofactor_mode;
    keyx_kdf kdf;
} keyx_exch;

/* The KDF each exchange offers, as in the default provider: X9.63 for ECDH (CMS ECDH), X9.42
 * ASN.1 for DH (CMS DH); X25519 and X448 have none. */
static keyx_kdf_type kdf_offered(keyx_alg alg)
{
    return alg == KEYX_ALG_EC   ? KEYX_KDF_X963
           : alg == KEYX_ALG_DH ? KEYX_KDF_X942_ASN1
                                : KEYX_KDF_NONE;
}

static void *exch_new(keyx_provctx *p, keyx_alg alg)
{
    keyx_exch *x;

    if (keyx_refused(p) || !keyx_check_not_reentered(p, "a key exchange"))
        return NULL;
    if ((x = OPENSSL_zalloc(sizeof(*x))) == NULL)
        return NULL;
    x->p = p;
    x->alg = alg;
    x->cofactor_mode = -1;
    return x;
}

static void exch_free(void *vctx)
{
    keyx_exch *x = vctx;

    if (x == NULL)
        return;
    keyx_kdf_clear(&x->kdf);
    OPENSSL_free(x);
}

static void *exch_dup(void *vctx)
{
    const keyx_exch *src = vctx;
    keyx_exch *x = OPENSSL_malloc(sizeof(*x));

    if (x == NULL)
        return NULL;
    memcpy(x, src, sizeof(*x));
    if (!keyx_kdf_copy(&x->kdf, &src->kdf)) {
        OPENSSL_free(x);
        return NULL;
    }
    return x;
}

static int exch_set_ctx_params(void *vctx, const OSSL_PARAM params[])
{
    keyx_exch *x = vctx;
    const OSSL_PARAM *p;

    if (params == NULL)
        return 1;
    if (x->alg == KEYX_ALG_DH && (p = OSSL_PARAM_locate_const(params, OSSL_EXCHANGE_PARAM_PAD)))
        if (!OSSL_PARAM_get_int(p, &x->pad))
            return 0;
    p = OSSL_PARAM_locate_const(params, OSSL_EXCHANGE_PARAM_EC_ECDH_COFACTOR_MODE);
    if (x->alg == KEYX_ALG_EC && p != NULL) {
        if (!OSSL_PARAM_get_int(p, &x->cofactor_mode) || x->cofactor_mode < -1 ||
            x->cofactor_mode > 1) {
            KEYX_ERR(x->p, KEYX_R_INVALID_ARGUMENT, "ecdh-cofactor-mode must be -1, 0 or 1");
            return 0;
        }
    }
    return keyx_kdf_set_params(x->p, &x->kdf, kdf_offered(x->alg), params);
}

static int exch_init(void *vctx, void *vkey, const OSSL_PARAM params[])
{
    keyx_exch *x = vctx;
    keyx_key *k = vkey;

    /* The DH exchange serves PKCS#3 and X9.42 (CMS) keys alike. */
    if (k == NULL || (k->alg != x->alg && !(keyx_alg_is_dh(k->alg) && keyx_alg_is_dh(x->alg)))) {
        KEYX_ERR(x->p, KEYX_R_KEY_MISMATCH, "%s key exchange needs a %s key", keyx_alg_name(x->alg),
                 keyx_alg_name(x->alg));
        return 0;
    }
    if (!keyx_key_has_private(k)) {
        KEYX_ERR(x->p, KEYX_R_MISSING_KEY, "%s key exchange needs a private key",
                 keyx_alg_name(x->alg));
        return 0;
    }
    x->key = k;
    x->pad = 0;
    x->cofactor_mode = -1;
    /* As the default provider: a new init turns the KDF off but keeps its other settings. */
    x->kdf.type = KEYX_KDF_NONE;
    return exch_set_ctx_params(x, params);
}

static int exch_set_peer(void *vctx, void *vpeer)
{
    keyx_exch *x = vctx;

    if (x->key == NULL) {
        KEYX_ERR(x->p, KEYX_R_MISSING_KEY, "initialize the exchange with a key first");
        return 0;
    }
    if (!keyx_key_check_peer(x->key, vpeer)) {
        /* Invalid-curve and small-subgroup attempts belong in the audit trail. */
        keyx_key_event(x->key, "error", 0, "peer public key rejected");
        return 0;
    }
    x->peer = vpeer;
    return 1;
}

/* Z in full (for DH padded to the size of p, as X9.42 and the default provider take it), then
 * kdf-outlen bytes of KDF(Z); Z never leaves this function. */
static int derive_kdf(keyx_exch *x, unsigned char *secret, size_t *secretlen, size_t outlen,
                      size_t size)
{
    unsigned char z[MAX_SECRET];
    int ok;

    if (secret == NULL) {
        *secretlen = x->kdf.outlen;
        return 1;
    }
    if (outlen < x->kdf.outlen) {
        KEYX_ERR(x->p, KEYX_R_INVALID_ARGUMENT,
                 "output buffer of %zu bytes is too small for kdf-outlen %zu", outlen,
                 x->kdf.outlen);
        return 0;
    }
    /* Before the backend is asked: a derive event stands for a secret that was used. */
    if (!keyx_kdf_check(x->p, &x->kdf))
        return 0;
    ok = keyx_key_derive(x->key, x->peer, z, size) &&
         keyx_kdf_derive(x->p, &x->kdf, z, size, secret);
    /* Also after a failed derive: a backend may have written part of Z. */
    OPENSSL_cleanse(z, size);
    if (ok)
        *secretlen = x->kdf.outlen;
    return ok;
}

static int exch_derive(void *vctx, unsigned char *secret, size_t *secretlen, size_t outlen)
{
    keyx_exch *x = vctx;
    unsigned char tmp[MAX_SECRET];
    size_t size, zeros = 0;

    if (x->key == NULL || x->peer == NULL) {
        KEYX_ERR(x->p, KEYX_R_MISSING_KEY, "set both the key and the peer key before derive");
        return 0;
    }
    size = keyx_key_secret_size(x->key);
    if (size == 0 || size > MAX_SECRET) {
        KEYX_ERR(x->p, KEYX_R_UNSUPPORTED, "%s secret size %zu is out of range",
                 keyx_alg_name(x->alg), size);
        return 0;
    }
    if (x->kdf.type != KEYX_KDF_NONE)
        return derive_kdf(x, secret, secretlen, outlen, size);
    /* Size query: answered without touching the backend. */
    if (secret == NULL) {
        *secretlen = size;
        return 1;
    }
    if (outlen < size) {
        /* ECDH may be truncated (as the default provider allows); the others may not. */
        if (x->alg != KEYX_ALG_EC) {
            KEYX_ERR(x->p, KEYX_R_INVALID_ARGUMENT,
                     "output buffer of %zu bytes is too small: %s "
                     "needs %zu",
                     outlen, keyx_alg_name(x->alg), size);
            return 0;
        }
        if (!keyx_key_derive(x->key, x->peer, tmp, size))
            return 0;
        memcpy(secret, tmp, outlen);
        OPENSSL_cleanse(tmp, size);
        *secretlen = outlen;
        return 1;
    }
    if (!keyx_key_derive(x->key, x->peer, secret, size))
        return 0;
    if (x->alg == KEYX_ALG_DH && !x->pad) {
        /* Unpadded DH secret, as DH_compute_key returns it. */
        while (zeros < size && secret[zeros] == 0)
            zeros++;
        memmove(secret, secret + zeros, size - zeros);
        OPENSSL_cleanse(secret + size - zeros, zeros);
    }
    *secretlen = size - zeros;
    return 1;
}

static int exch_get_ctx_params(void *vctx, OSSL_PARAM params[])
{
    keyx_exch *x = vctx;
    OSSL_PARAM *p;

    p = OSSL_PARAM_locate(params, OSSL_EXCHANGE_PARAM_EC_ECDH_COFACTOR_MODE);
    if (p != NULL && x->alg == KEYX_ALG_EC &&
        !OSSL_PARAM_set_int(p, x->cofactor_mode < 0 ? 0 : x->cofactor_mode))
        return 0;
    return keyx_kdf_get_params(&x->kdf, kdf_offered(x->alg), params);
}

/* The default provider's lists, parameter for parameter. */
static const OSSL_PARAM ecdh_settable_params[] = {
    OSSL_PARAM_int(OSSL_EXCHANGE_PARAM_EC_ECDH_COFACTOR_MODE, NULL),
    OSSL_PARAM_utf8_string(OSSL_EXCHANGE_PARAM_KDF_TYPE, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_EXCHANGE_PARAM_KDF_DIGEST, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_EXCHANGE_PARAM_KDF_DIGEST_PROPS, NULL, 0),
    OSSL_PARAM_size_t(OSSL_EXCHANGE_PARAM_KDF_OUTLEN, NULL),
    OSSL_PARAM_octet_string(OSSL_EXCHANGE_PARAM_KDF_UKM, NULL, 0),
    OSSL_PARAM_END,
};
static const OSSL_PARAM dh_settable_params[] = {
    OSSL_PARAM_int(OSSL_EXCHANGE_PARAM_PAD, NULL),
    OSSL_PARAM_utf8_string(OSSL_EXCHANGE_PARAM_KDF_TYPE, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_EXCHANGE_PARAM_KDF_DIGEST, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_EXCHANGE_PARAM_KDF_DIGEST_PROPS, NULL, 0),
    OSSL_PARAM_size_t(OSSL_EXCHANGE_PARAM_KDF_OUTLEN, NULL),
    OSSL_PARAM_octet_string(OSSL_EXCHANGE_PARAM_KDF_UKM, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_KDF_PARAM_CEK_ALG, NULL, 0),
    OSSL_PARAM_END,
};
static const OSSL_PARAM ecx_settable_params[] = {OSSL_PARAM_END};
static const OSSL_PARAM ecdh_gettable_params[] = {
    OSSL_PARAM_int(OSSL_EXCHANGE_PARAM_EC_ECDH_COFACTOR_MODE, NULL),
    OSSL_PARAM_utf8_string(OSSL_EXCHANGE_PARAM_KDF_TYPE, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_EXCHANGE_PARAM_KDF_DIGEST, NULL, 0),
    OSSL_PARAM_size_t(OSSL_EXCHANGE_PARAM_KDF_OUTLEN, NULL),
    OSSL_PARAM_DEFN(OSSL_EXCHANGE_PARAM_KDF_UKM, OSSL_PARAM_OCTET_PTR, NULL, 0),
    OSSL_PARAM_END,
};
static const OSSL_PARAM dh_gettable_params[] = {
    OSSL_PARAM_utf8_string(OSSL_EXCHANGE_PARAM_KDF_TYPE, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_EXCHANGE_PARAM_KDF_DIGEST, NULL, 0),
    OSSL_PARAM_size_t(OSSL_EXCHANGE_PARAM_KDF_OUTLEN, NULL),
    OSSL_PARAM_DEFN(OSSL_EXCHANGE_PARAM_KDF_UKM, OSSL_PARAM_OCTET_PTR, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_KDF_PARAM_CEK_ALG, NULL, 0),
    OSSL_PARAM_END,
};
/* The default provider's X25519/X448 have none; keyx answers kdf-type (always ""). */
static const OSSL_PARAM ecx_gettable_params[] = {
    OSSL_PARAM_utf8_string(OSSL_EXCHANGE_PARAM_KDF_TYPE, NULL, 0),
    OSSL_PARAM_END,
};

#define FN(f) ((void (*)(void))(f))

#define KEYX_EXCHANGE(lower, ALG, SETTABLE, GETTABLE)                                              \
    static void *lower##_newctx(void *provctx)                                                     \
    {                                                                                              \
        return exch_new(provctx, ALG);                                                             \
    }                                                                                              \
    static const OSSL_PARAM *lower##_settable(void *vctx, void *provctx)                           \
    {                                                                                              \
        (void)vctx;                                                                                \
        (void)provctx;                                                                             \
        return SETTABLE;                                                                           \
    }                                                                                              \
    static const OSSL_PARAM *lower##_gettable(void *vctx, void *provctx)                           \
    {                                                                                              \
        (void)vctx;                                                                                \
        (void)provctx;                                                                             \
        return GETTABLE;                                                                           \
    }                                                                                              \
    const OSSL_DISPATCH keyx_##lower##_exchange_functions[] = {                                    \
        {OSSL_FUNC_KEYEXCH_NEWCTX, FN(lower##_newctx)},                                            \
        {OSSL_FUNC_KEYEXCH_INIT, FN(exch_init)},                                                   \
        {OSSL_FUNC_KEYEXCH_SET_PEER, FN(exch_set_peer)},                                           \
        {OSSL_FUNC_KEYEXCH_DERIVE, FN(exch_derive)},                                               \
        {OSSL_FUNC_KEYEXCH_FREECTX, FN(exch_free)},                                                \
        {OSSL_FUNC_KEYEXCH_DUPCTX, FN(exch_dup)},                                                  \
        {OSSL_FUNC_KEYEXCH_SET_CTX_PARAMS, FN(exch_set_ctx_params)},                               \
        {OSSL_FUNC_KEYEXCH_SETTABLE_CTX_PARAMS, FN(lower##_settable)},                             \
        {OSSL_FUNC_KEYEXCH_GET_CTX_PARAMS, FN(exch_get_ctx_params)},                               \
        {OSSL_FUNC_KEYEXCH_GETTABLE_CTX_PARAMS, FN(lower##_gettable)},                             \
        {0, NULL},                                                                                 \
    };

KEYX_EXCHANGE(ecdh, KEYX_ALG_EC, ecdh_settable_params, ecdh_gettable_params)
KEYX_EXCHANGE(x25519, KEYX_ALG_X25519, ecx_settable_params, ecx_gettable_params)
KEYX_EXCHANGE(x448, KEYX_ALG_X448, ecx_settable_params, ecx_gettable_params)
KEYX_EXCHANGE(dh, KEYX_ALG_DH, dh_settable_params, dh_gettable_params)
