/* The software backend: keys live in process memory, crypto runs in keyx's own library context
 * on the default provider. The default provider wipes private keys when they are freed. A key is
 * an EVP_PKEY in keyx's context, or for X25519 and X448 the default provider's key object, used
 * through that provider's functions directly (software_ecx.h), with an EVP_PKEY made only when
 * something asks for the key's view. */
#include <string.h>
#include <strings.h>

#include <openssl/core_names.h>
#include <openssl/dh.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/rsa.h>

#include "backend/backend.h"
#include "backend/software_ecx.h"
#include "provider/errors.h"
#include "provider/provctx.h"

typedef struct sw_state {
    keyx_provctx *p;
    keyx_ecx_impl *ecx[KEYX_ALG_COUNT]; /* X25519, X448 */
} sw_state;

/* A software key: an EVP_PKEY in keyx's context (its view too), or for X25519/X448 the default
 * provider's key object (ecx), whose view keyx makes when something asks for it. */
typedef struct sw_key {
    EVP_PKEY *pkey;
    void *ecx;
    keyx_alg alg;
} sw_key;

static void sw_close(void *state)
{
    sw_state *s = state;

    if (s == NULL)
        return;
    for (int a = 0; a < KEYX_ALG_COUNT; a++)
        keyx_ecx_impl_free(s->ecx[a]);
    OPENSSL_free(s);
}

static int sw_open(keyx_provctx *p, void **state)
{
    sw_state *s = OPENSSL_zalloc(sizeof(*s));

    if (s == NULL)
        return 0;
    s->p = p;
    for (int a = KEYX_ALG_X25519; a <= KEYX_ALG_X448; a++)
        if ((s->ecx[a] = keyx_ecx_impl_new(p->libctx, p->dflt, (keyx_alg)a)) == NULL) {
            KEYX_ERR(p, KEYX_R_INTERNAL, "the default provider in keyx's context lacks %s",
                     keyx_alg_name((keyx_alg)a));
            sw_close(s);
            return 0;
        }
    *state = s;
    return 1;
}

static int is_ecx(keyx_alg alg)
{
    return alg == KEYX_ALG_X25519 || alg == KEYX_ALG_X448;
}

/* X25519 and X448 with no parameters but their own name as the group, which libssl and
 * EVP_PKEY_CTX_set_group_name always send: the same key generation as none at all. */
static int plain_ecx(const keyx_keyspec *spec)
{
    const char *name = keyx_alg_name(spec->alg);
    size_t len = strlen(name);

    if (!is_ecx(spec->alg) || spec->domain != NULL)
        return 0;
    for (const OSSL_PARAM *q = spec->params; q != NULL && q->key != NULL; q++) {
        const char *v = q->data;

        /* data_size counts the terminating zero byte or not, depending on who built it */
        if (strcmp(q->key, OSSL_PKEY_PARAM_GROUP_NAME) != 0 ||
            q->data_type != OSSL_PARAM_UTF8_STRING || v == NULL || q->data_size < len ||
            strncasecmp(v, name, len) != 0 || (q->data_size > len && v[len] != '\0'))
            return 0;
    }
    return 1;
}

static sw_key *key_new(keyx_alg alg, EVP_PKEY *pkey, void *ecx)
{
    sw_key *k = OPENSSL_zalloc(sizeof(*k));

    if (k != NULL) {
        k->alg = alg;
        k->pkey = pkey;
        k->ecx = ecx;
    }
    return k;
}

static void key_free(sw_state *s, sw_key *k)
{
    if (k == NULL)
        return;
    EVP_PKEY_free(k->pkey);
    if (k->ecx != NULL)
        keyx_ecx_free(s->ecx[k->alg], k->ecx);
    OPENSSL_free(k);
}

/* The key object of an X25519/X448 EVP_PKEY (imported, or generated from a seed), so that every
 * software X25519/X448 key derives the same way, from the peer's raw public key. */
static int ecx_of(sw_state *s, keyx_alg alg, EVP_PKEY *key, void **ecx)
{
    unsigned char raw[56];
    size_t len = sizeof(raw);

    *ecx = NULL;
    if (!is_ecx(alg))
        return 1;
    if (EVP_PKEY_get_raw_private_key(key, raw, &len) == 1)
        *ecx = keyx_ecx_from_private(s->ecx[alg], raw, len);
    OPENSSL_cleanse(raw, sizeof(raw));
    return *ecx != NULL;
}

static int sw_supports(void *state, const keyx_keyspec *spec)
{
    (void)state;
    return spec->alg < KEYX_ALG_COUNT;
}

static int sw_generate(void *state, const keyx_keyspec *spec, void **handle, EVP_PKEY **pub)
{
    sw_state *s = state;
    keyx_provctx *p = s->p;
    EVP_PKEY *key = NULL;
    EVP_PKEY_CTX *ctx = NULL;
    sw_key *k = NULL;
    void *ecx = NULL;

    if (plain_ecx(spec)) {
        /* no view yet: keyx asks sw_public_raw for the public key, sw_view for a view */
        ecx = keyx_ecx_generate(s->ecx[spec->alg]);
        if (ecx != NULL && (k = key_new(spec->alg, NULL, ecx)) == NULL)
            keyx_ecx_free(s->ecx[spec->alg], ecx);
        if (k == NULL)
            goto err;
        *handle = k;
        *pub = NULL;
        return 1;
    }
    ctx = spec->domain != NULL
              ? EVP_PKEY_CTX_new_from_pkey(p->libctx, spec->domain, NULL)
              : EVP_PKEY_CTX_new_from_name(p->libctx, keyx_alg_name(spec->alg), NULL);
    if (ctx == NULL || EVP_PKEY_keygen_init(ctx) != 1 ||
        (spec->params != NULL && EVP_PKEY_CTX_set_params(ctx, spec->params) != 1) ||
        EVP_PKEY_generate(ctx, &key) != 1) {
        EVP_PKEY_CTX_free(ctx);
        EVP_PKEY_free(key);
        goto err;
    }
    EVP_PKEY_CTX_free(ctx);
    if (!ecx_of(s, spec->alg, key, &ecx) || (k = key_new(spec->alg, NULL, ecx)) == NULL) {
        if (ecx != NULL)
            keyx_ecx_free(s->ecx[spec->alg], ecx);
        EVP_PKEY_free(key);
        goto err;
    }
    k->pkey = key;
    if (!EVP_PKEY_up_ref(key)) {
        key_free(s, k);
        goto err;
    }
    *handle = k;
    *pub = key; /* the same object: software keys carry their private part in the public view */
    return 1;

err:
    KEYX_ERR(p, KEYX_R_BACKEND_FAILURE, "software: %s key generation failed",
             keyx_alg_name(spec->alg));
    return 0;
}

static int sw_import(void *state, EVP_PKEY *key, void **handle, EVP_PKEY **pub)
{
    sw_state *s = state;
    keyx_alg alg = KEYX_ALG_COUNT;
    void *ecx;
    sw_key *k;

    for (int a = KEYX_ALG_X25519; a <= KEYX_ALG_X448; a++)
        if (EVP_PKEY_is_a(key, keyx_alg_name((keyx_alg)a)))
            alg = (keyx_alg)a;
    if (!ecx_of(s, alg, key, &ecx))
        return 0;
    if ((k = key_new(alg, NULL, ecx)) == NULL) {
        if (ecx != NULL)
            keyx_ecx_free(s->ecx[alg], ecx);
        return 0;
    }
    /* one reference for the handle, one for the view */
    if (!EVP_PKEY_up_ref(key)) {
        key_free(s, k);
        return 0;
    }
    k->pkey = key;
    if (!EVP_PKEY_up_ref(key)) {
        key_free(s, k);
        return 0;
    }
    *handle = k;
    *pub = key;
    return 1;
}

static size_t sw_public_raw(void *state, void *handle, unsigned char *buf)
{
    sw_state *s = state;
    sw_key *k = handle;

    return k->ecx != NULL ? keyx_ecx_public(s->ecx[k->alg], k->ecx, buf) : 0;
}

static int sw_view(void *state, void *handle, EVP_PKEY **pub)
{
    sw_state *s = state;
    sw_key *k = handle;

    if (k->pkey != NULL) {
        if (!EVP_PKEY_up_ref(k->pkey))
            return 0;
        *pub = k->pkey;
        return 1;
    }
    *pub = keyx_ecx_pkey(s->ecx[k->alg], k->ecx);
    return *pub != NULL;
}

static int sw_derive(void *state, void *handle, const keyx_peer *from, unsigned char *secret,
                     size_t secretlen)
{
    sw_state *s = state;
    keyx_provctx *p = s->p;
    sw_key *k = handle;
    EVP_PKEY *key = k->pkey;
    size_t len = secretlen;
    EVP_PKEY_CTX *ctx;
    int ok, base;

    if (k->ecx != NULL) {
        /* the peer's raw public key, which keyx checked (keyx_key_check_peer) */
        ok = from->point != NULL && keyx_ecx_derive(s->ecx[k->alg], k->ecx, from->point,
                                                    from->pointlen, secret, secretlen);
    } else {
        ctx = EVP_PKEY_CTX_new_from_pkey(p->libctx, key, NULL);
        base = EVP_PKEY_get_base_id(key); /* cached in the key: no name lookup per derive */
        ok = ctx != NULL && EVP_PKEY_derive_init(ctx) == 1 &&
             /* DH and X9.42 DH alike: Z keeps its leading zero bytes (keyx strips them itself
              * where a caller asked for the unpadded secret) */
             ((base != EVP_PKEY_DH && base != EVP_PKEY_DHX) ||
              EVP_PKEY_CTX_set_dh_pad(ctx, 1) == 1) &&
             /* keyx validated the peer already (keyx_key_check_peer) */
             EVP_PKEY_derive_set_peer_ex(ctx, from->view, 0) == 1 &&
             EVP_PKEY_derive(ctx, secret, &len) == 1 && len == secretlen;
        EVP_PKEY_CTX_free(ctx);
    }
    if (!ok) {
        OPENSSL_cleanse(secret, secretlen);
        KEYX_ERR(p, KEYX_R_BACKEND_FAILURE,
                 "software: key agreement failed (for X25519/X448, a small-order peer key)");
    }
    return ok;
}

/* The default provider in keyx's context decrypts: OAEP and RAW as EVP_PKEY_decrypt does, TLS
 * with the default provider's constant-time RSA_PKCS1_WITH_TLS_PADDING. */
static int sw_rsa_decrypt(void *state, void *handle, const keyx_rsa_op *op, const unsigned char *in,
                          size_t inlen, unsigned char *out, size_t *outlen)
{
    keyx_provctx *p = ((sw_state *)state)->p;
    EVP_PKEY *key = ((sw_key *)handle)->pkey;
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_pkey(p->libctx, key, NULL);
    OSSL_PARAM params[6], *q = params;
    int pad = op->pad == KEYX_RSA_PAD_OAEP  ? RSA_PKCS1_OAEP_PADDING
              : op->pad == KEYX_RSA_PAD_RAW ? RSA_NO_PADDING
                                            : RSA_PKCS1_WITH_TLS_PADDING;
    unsigned int client = op->tls_client_version, alt = op->tls_alt_version;
    int ok;

    *q++ = OSSL_PARAM_construct_int(OSSL_ASYM_CIPHER_PARAM_PAD_MODE, &pad);
    if (op->pad == KEYX_RSA_PAD_OAEP) {
        *q++ = OSSL_PARAM_construct_utf8_string(OSSL_ASYM_CIPHER_PARAM_OAEP_DIGEST,
                                                (char *)(op->md ? op->md : "SHA1"), 0);
        if (op->mgf1_md != NULL)
            *q++ = OSSL_PARAM_construct_utf8_string(OSSL_ASYM_CIPHER_PARAM_MGF1_DIGEST,
                                                    (char *)op->mgf1_md, 0);
        if (op->labellen > 0)
            *q++ = OSSL_PARAM_construct_octet_string(OSSL_ASYM_CIPHER_PARAM_OAEP_LABEL,
                                                     (void *)op->label, op->labellen);
    } else if (op->pad == KEYX_RSA_PAD_TLS) {
        *q++ = OSSL_PARAM_construct_uint(OSSL_ASYM_CIPHER_PARAM_TLS_CLIENT_VERSION, &client);
        *q++ = OSSL_PARAM_construct_uint(OSSL_ASYM_CIPHER_PARAM_TLS_NEGOTIATED_VERSION, &alt);
    }
    *q = OSSL_PARAM_construct_end();
    if (ctx == NULL || EVP_PKEY_decrypt_init(ctx) != 1 ||
        EVP_PKEY_CTX_set_params(ctx, params) != 1) {
        EVP_PKEY_CTX_free(ctx);
        KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT,
                 "software: RSA decryption parameters refused (unknown digest?)");
        return 0;
    }
    ok = EVP_PKEY_decrypt(ctx, out, outlen, in, inlen) == 1;
    EVP_PKEY_CTX_free(ctx);
    return ok ? 1 : KEYX_RSA_DECRYPT_ERROR;
}

static void sw_free(void *state, void *handle)
{
    key_free(state, handle);
}

const keyx_backend_ops keyx_software_backend = {
    .name = "software",
    .exports_private = 1,
    .open = sw_open,
    .close = sw_close,
    .supports = sw_supports,
    .generate = sw_generate,
    .import = sw_import,
    .load = NULL,
    .derive = sw_derive,
    .public_raw = sw_public_raw,
    .view = sw_view,
    .free = sw_free,
    .rsa_decrypt = sw_rsa_decrypt,
};
