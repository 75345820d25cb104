/* The software backend: keys live in process memory, crypto runs in keyx's own library context
 * on the default provider. The default provider wipes private keys when they are freed. */
#include <string.h>
#include <strings.h>

#include <openssl/core_names.h>
#include <openssl/dh.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/rsa.h>

#include "backend/backend.h"
#include "provider/errors.h"
#include "provider/provctx.h"

/* Key generation contexts kept for reuse, per algorithm, for the requests that need nothing but
 * the algorithm (X25519 and X448: no domain, no parameters). A new EVP_PKEY_CTX costs a method
 * fetch and a scan of the name map, a large share of an X25519 key pair. A thread takes a context
 * out of a slot (atomic exchange), generates, and puts it back; when the slots are empty it makes
 * a new one, so threads never share a context and never wait. */
#define GEN_SLOTS 4

typedef struct sw_state {
    keyx_provctx *p;
    EVP_PKEY_CTX *gen[KEYX_ALG_COUNT][GEN_SLOTS];
} sw_state;

static int sw_open(keyx_provctx *p, void **state)
{
    sw_state *s = OPENSSL_zalloc(sizeof(*s));

    if (s == NULL)
        return 0;
    s->p = p;
    *state = s;
    return 1;
}

static void sw_close(void *state)
{
    sw_state *s = state;

    if (s == NULL)
        return;
    for (int a = 0; a < KEYX_ALG_COUNT; a++)
        for (int i = 0; i < GEN_SLOTS; i++)
            EVP_PKEY_CTX_free(s->gen[a][i]);
    OPENSSL_free(s);
}

/* X25519 and X448 with no parameters but their own name as the group, which libssl and
 * EVP_PKEY_CTX_set_group_name always send: the same key generation as none at all. */
static int reusable(const keyx_keyspec *spec)
{
    const char *name = keyx_alg_name(spec->alg);
    size_t len = strlen(name);

    if ((spec->alg != KEYX_ALG_X25519 && spec->alg != KEYX_ALG_X448) || spec->domain != NULL)
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

static EVP_PKEY_CTX *gen_take(sw_state *s, keyx_alg alg)
{
    for (int i = 0; i < GEN_SLOTS; i++) {
        EVP_PKEY_CTX *ctx = __atomic_exchange_n(&s->gen[alg][i], NULL, __ATOMIC_ACQ_REL);

        if (ctx != NULL)
            return ctx;
    }
    return NULL;
}

static void gen_put(sw_state *s, keyx_alg alg, EVP_PKEY_CTX *ctx)
{
    for (int i = 0; i < GEN_SLOTS; i++) {
        EVP_PKEY_CTX *none = NULL;

        if (__atomic_compare_exchange_n(&s->gen[alg][i], &none, ctx, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE))
            return;
    }
    EVP_PKEY_CTX_free(ctx);
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
    int reuse = reusable(spec);
    EVP_PKEY_CTX *ctx = reuse ? gen_take(s, spec->alg) : NULL;

    if (ctx == NULL) {
        ctx = spec->domain != NULL
                  ? EVP_PKEY_CTX_new_from_pkey(p->libctx, spec->domain, NULL)
                  : EVP_PKEY_CTX_new_from_name(p->libctx, keyx_alg_name(spec->alg), NULL);
        if (ctx != NULL && EVP_PKEY_keygen_init(ctx) != 1) {
            EVP_PKEY_CTX_free(ctx);
            ctx = NULL;
        }
    }
    if (ctx == NULL ||
        (!reuse && spec->params != NULL && EVP_PKEY_CTX_set_params(ctx, spec->params) != 1) ||
        EVP_PKEY_generate(ctx, &key) != 1 || !EVP_PKEY_up_ref(key)) {
        EVP_PKEY_CTX_free(ctx);
        EVP_PKEY_free(key);
        KEYX_ERR(p, KEYX_R_BACKEND_FAILURE, "software: %s key generation failed",
                 keyx_alg_name(spec->alg));
        return 0;
    }
    if (reuse)
        gen_put(s, spec->alg, ctx);
    else
        EVP_PKEY_CTX_free(ctx);
    *handle = key;
    *pub = key; /* the same object: software keys carry their private part in the public view */
    return 1;
}

static int sw_import(void *state, EVP_PKEY *key, void **handle, EVP_PKEY **pub)
{
    (void)state;
    if (!EVP_PKEY_up_ref(key))
        return 0;
    if (!EVP_PKEY_up_ref(key)) {
        EVP_PKEY_free(key);
        return 0;
    }
    *handle = key;
    *pub = key;
    return 1;
}

static int sw_derive(void *state, void *handle, const keyx_peer *from, unsigned char *secret,
                     size_t secretlen)
{
    EVP_PKEY *peer = from->view;
    keyx_provctx *p = ((sw_state *)state)->p;
    EVP_PKEY *key = handle;
    size_t len = secretlen;
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_pkey(p->libctx, key, NULL);
    int ok = ctx != NULL && EVP_PKEY_derive_init(ctx) == 1 &&
             (EVP_PKEY_get_base_id(key) != EVP_PKEY_DH || EVP_PKEY_CTX_set_dh_pad(ctx, 1) == 1) &&
             /* keyx validated the peer already (keyx_key_check_peer) */
             EVP_PKEY_derive_set_peer_ex(ctx, peer, 0) == 1 &&
             EVP_PKEY_derive(ctx, secret, &len) == 1 && len == secretlen;

    EVP_PKEY_CTX_free(ctx);
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
    EVP_PKEY *key = handle;
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
    (void)state;
    EVP_PKEY_free(handle);
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
    .free = sw_free,
    .rsa_decrypt = sw_rsa_decrypt,
};
