/* DHKEM (RFC 9180 section 4.1) for EC P-256/384/521, X25519 and X448: the KEMs that OSSL_HPKE_*
 * and EVP_PKEY_encapsulate/decapsulate reach with keyx's keys (OpenSSL >= 3.2). Every DH with a
 * private key runs in the backend that holds that key: the recipient's in decapsulation, the
 * sender's in authenticated encapsulation, and that of the ephemeral key, which encapsulation
 * generates as keyx generates every key (the first configured backend that serves the group).
 * ExtractAndExpand runs in keyx's library context on the DH outputs. */
#include <openssl/opensslv.h>

#if OPENSSL_VERSION_NUMBER >= 0x30200000L

#include <string.h>
#include <strings.h>

#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>

#include "backend/call.h" /* keyx_check_not_reentered */
#include "kem/dhkem_suite.h"
#include "keymgmt/domain_cache.h"
#include "keymgmt/key.h"
#include "keymgmt/keymgmt.h"
#include "provider/dispatch.h"
#include "provider/errors.h"
#include "provider/fail_closed.h"

/* The longest ikmE keyx takes: RFC 9180 asks for at least Nsk bytes; OpenSSL's own limit. */
#define MAX_IKME 512

enum { DHKEM_NONE, DHKEM_ENCAP, DHKEM_DECAP };

typedef struct keyx_dhkem_ctx {
    keyx_provctx *p;
    keyx_alg alg;
    const keyx_dhkem_suite *suite;
    keyx_key *recip; /* encapsulation: the recipient's public key; decapsulation: its private key */
    keyx_key *sender; /* authenticated modes: encapsulation: the sender's private key;
                         decapsulation: its public key; else NULL */
    int op;
    unsigned char ikme[MAX_IKME]; /* a deterministic ephemeral key's seed; ikmelen 0: none */
    size_t ikmelen;
} keyx_dhkem_ctx;

static void *dhkem_newctx(keyx_provctx *p, keyx_alg alg)
{
    keyx_dhkem_ctx *c;

    if (keyx_refused(p) || !keyx_check_not_reentered(p, "a DHKEM operation"))
        return NULL;
    if ((c = OPENSSL_zalloc(sizeof(*c))) != NULL) {
        c->p = p;
        c->alg = alg;
    }
    return c;
}

static void dhkem_freectx(void *vctx)
{
    OPENSSL_clear_free(vctx, sizeof(keyx_dhkem_ctx));
}

static int dhkem_set_ctx_params(void *vctx, const OSSL_PARAM params[])
{
    keyx_dhkem_ctx *c = vctx;
    const OSSL_PARAM *p;
    const char *op = NULL;
    void *buf;
    size_t len = 0;

    if (params == NULL)
        return 1;
    if ((p = OSSL_PARAM_locate_const(params, OSSL_KEM_PARAM_OPERATION)) != NULL &&
        (!OSSL_PARAM_get_utf8_string_ptr(p, &op) ||
         strcasecmp(op, OSSL_KEM_PARAM_OPERATION_DHKEM) != 0)) {
        KEYX_ERR(c->p, KEYX_R_UNSUPPORTED, "%s KEM operation '%s': keyx offers DHKEM only",
                 keyx_alg_name(c->alg), op != NULL ? op : "(not a string)");
        return 0;
    }
    if ((p = OSSL_PARAM_locate_const(params, OSSL_KEM_PARAM_IKME)) != NULL) {
        OPENSSL_cleanse(c->ikme, sizeof(c->ikme));
        c->ikmelen = 0;
        buf = c->ikme;
        if (p->data_type != OSSL_PARAM_OCTET_STRING || p->data_size > sizeof(c->ikme) ||
            !OSSL_PARAM_get_octet_string(p, &buf, sizeof(c->ikme), &len)) {
            KEYX_ERR(c->p, KEYX_R_INVALID_ARGUMENT,
                     "ikme must be an octet string of at most %d "
                     "bytes",
                     MAX_IKME);
            return 0;
        }
        c->ikmelen = len;
    }
    return 1;
}

static const OSSL_PARAM *dhkem_settable_ctx_params(void *vctx, void *provctx)
{
    static const OSSL_PARAM settable[] = {
        OSSL_PARAM_utf8_string(OSSL_KEM_PARAM_OPERATION, NULL, 0),
        OSSL_PARAM_octet_string(OSSL_KEM_PARAM_IKME, NULL, 0),
        OSSL_PARAM_END,
    };

    (void)vctx;
    (void)provctx;
    return settable;
}

/* Binds the keys: recip (always with its public key) and, for the authenticated modes, sender;
 * the private parts that the operation will use must be there. */
static int dhkem_init(keyx_dhkem_ctx *c, int op, keyx_key *recip, keyx_key *sender,
                      const OSSL_PARAM params[])
{
    const char *name = keyx_alg_name(c->alg);

    c->op = DHKEM_NONE;
    if (recip == NULL || recip->alg != c->alg || !recip->has_public ||
        (sender != NULL && (sender->alg != c->alg || !sender->has_public))) {
        KEYX_ERR(c->p, KEYX_R_KEY_MISMATCH, "the %s DHKEM needs %s keys with their public key",
                 name, name);
        return 0;
    }
    if ((c->suite = keyx_dhkem_suite_of(c->alg, recip->group)) == NULL) {
        KEYX_ERR(c->p, KEYX_R_UNSUPPORTED,
                 "DHKEM (RFC 9180) has no KEM for %s keys on %s: it is defined for P-256, "
                 "P-384, P-521, X25519 and X448",
                 name, recip->group[0] ? recip->group : "explicit parameters");
        return 0;
    }
    if (op == DHKEM_DECAP && !keyx_key_has_private(recip)) {
        KEYX_ERR(c->p, KEYX_R_MISSING_KEY, "DHKEM decapsulation needs the recipient's private key");
        return 0;
    }
    if (op == DHKEM_ENCAP && sender != NULL && !keyx_key_has_private(sender)) {
        KEYX_ERR(c->p, KEYX_R_MISSING_KEY,
                 "authenticated DHKEM encapsulation needs the sender's private key");
        return 0;
    }
    /* The sender's key must be on the recipient's group (and valid, for the one we did not
     * make or check ourselves). */
    if (sender != NULL && !keyx_key_check_peer(recip, sender))
        return 0;
    c->recip = recip;
    c->sender = sender;
    c->op = op;
    OPENSSL_cleanse(c->ikme, sizeof(c->ikme));
    c->ikmelen = 0;
    return dhkem_set_ctx_params(c, params);
}

static int dhkem_encapsulate_init(void *vctx, void *recip, const OSSL_PARAM params[])
{
    return dhkem_init(vctx, DHKEM_ENCAP, recip, NULL, params);
}

static int dhkem_auth_encapsulate_init(void *vctx, void *recip, void *sender,
                                       const OSSL_PARAM params[])
{
    return dhkem_init(vctx, DHKEM_ENCAP, recip, sender, params);
}

static int dhkem_decapsulate_init(void *vctx, void *recip, const OSSL_PARAM params[])
{
    return dhkem_init(vctx, DHKEM_DECAP, recip, NULL, params);
}

static int dhkem_auth_decapsulate_init(void *vctx, void *recip, void *sender,
                                       const OSSL_PARAM params[])
{
    return dhkem_init(vctx, DHKEM_DECAP, recip, sender, params);
}

static int dhkem_ready(keyx_dhkem_ctx *c, int op)
{
    if (c->op != op) {
        KEYX_ERR(c->p, KEYX_R_MISSING_KEY, "initialize the context for DHKEM %s first",
                 op == DHKEM_DECAP ? "decapsulation" : "encapsulation");
        return 0;
    }
    return 1;
}

/* The key's encoded public key as DHKEM serializes it (SerializePublicKey): the uncompressed
 * point, or the raw X25519/X448 key; exactly n bytes. */
static int public_bytes(keyx_dhkem_ctx *c, const keyx_key *k, unsigned char *out, size_t n)
{
    EVP_PKEY *pub = NULL;
    size_t len = 0;
    int ok;

    if (c->alg != KEYX_ALG_EC) {
        ok = k->ecx_publen == n;
        if (ok)
            memcpy(out, k->ecx_pub, n);
    } else if (k->ec_pointlen == n) {
        memcpy(out, k->ec_point, n);
        ok = 1;
    } else {
        /* A key decoded from a compressed point answers in that form: ask a copy for the
         * uncompressed one. */
        ok = (pub = EVP_PKEY_dup(keyx_key_pub(k))) != NULL &&
             EVP_PKEY_set_utf8_string_param(pub, OSSL_PKEY_PARAM_EC_POINT_CONVERSION_FORMAT,
                                            "uncompressed") == 1 &&
             EVP_PKEY_get_octet_string_param(pub, OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, out, n,
                                             &len) == 1 &&
             len == n && out[0] == 0x04;
        EVP_PKEY_free(pub);
    }
    if (!ok)
        KEYX_ERR(c->p, KEYX_R_MISSING_KEY, "%s: the key's public key cannot be serialized",
                 c->suite->group);
    return ok;
}

/* kem_context = enc || pkRm (|| pkSm in the authenticated modes). */
static size_t kem_context(keyx_dhkem_ctx *c, const unsigned char *enc, unsigned char *out)
{
    size_t n = c->suite->npk;

    memcpy(out, enc, n);
    if (!public_bytes(c, c->recip, out + n, n))
        return 0;
    if (c->sender != NULL && !public_bytes(c, c->sender, out + 2 * n, n))
        return 0;
    return c->sender != NULL ? 3 * n : 2 * n;
}

/* The ephemeral key pair, made as keyx makes every key (routing, audit `keygen`); with ikme,
 * DeriveKeyPair(ikmE), which keyx's key generation allows in software only. */
static keyx_key *ephemeral_key(keyx_dhkem_ctx *c)
{
    OSSL_PARAM params[3], *q = params;
    keyx_key *k = NULL;
    void *gen;

    *q++ = OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, (char *)c->suite->group, 0);
    if (c->ikmelen > 0)
        *q++ = OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_DHKEM_IKM, c->ikme, c->ikmelen);
    *q = OSSL_PARAM_construct_end();
    if ((gen = keyx_km_gen_init(c->p, c->alg, OSSL_KEYMGMT_SELECT_KEYPAIR, params)) != NULL)
        k = keyx_km_gen(gen, NULL, NULL);
    keyx_km_gen_cleanup(gen);
    return k;
}

static int dhkem_encapsulate(void *vctx, unsigned char *enc, size_t *enclen, unsigned char *secret,
                             size_t *secretlen)
{
    keyx_dhkem_ctx *c = vctx;
    unsigned char dh[2 * KEYX_DHKEM_MAX_NDH], ctx[3 * KEYX_DHKEM_MAX_NPK];
    size_t ndh, ctxlen;
    keyx_key *eph = NULL;
    int ok = 0;

    if (!dhkem_ready(c, DHKEM_ENCAP))
        return 0;
    if (enc == NULL || secret == NULL) { /* a length query: no key is made */
        if (enclen != NULL)
            *enclen = c->suite->npk;
        if (secretlen != NULL)
            *secretlen = c->suite->nsecret;
        return 1;
    }
    if (enclen == NULL || secretlen == NULL || *enclen < c->suite->npk ||
        *secretlen < c->suite->nsecret) {
        KEYX_ERR(c->p, KEYX_R_INVALID_ARGUMENT,
                 "DHKEM %s encapsulation needs %zu bytes for enc and %zu for the secret",
                 c->suite->group, c->suite->npk, c->suite->nsecret);
        return 0;
    }
    ndh = c->suite->ndh;
    /* DH(skE, pkR) in the ephemeral key's backend, DH(skS, pkR) in the sender's. */
    ok = (eph = ephemeral_key(c)) != NULL && keyx_key_check_peer(eph, c->recip) &&
         keyx_key_derive_as(eph, c->recip, "encapsulate", dh, ndh) &&
         (c->sender == NULL ||
          keyx_key_derive_as(c->sender, c->recip, "encapsulate", dh + ndh, ndh)) &&
         public_bytes(c, eph, enc, c->suite->npk) && (ctxlen = kem_context(c, enc, ctx)) != 0 &&
         keyx_dhkem_extract_and_expand(c->p, c->suite, dh, c->sender != NULL ? 2 * ndh : ndh, ctx,
                                       ctxlen, secret);
    OPENSSL_cleanse(dh, sizeof(dh));
    keyx_key_free(eph);
    if (ok) {
        *enclen = c->suite->npk;
        *secretlen = c->suite->nsecret;
    }
    return ok;
}

/* pkE = DeserializePublicKey(enc), a public key in keyx's library context. */
static keyx_key *enc_key(keyx_dhkem_ctx *c, const unsigned char *enc, size_t len)
{
    keyx_key *k = keyx_key_new(c->p, c->alg);
    OSSL_PARAM params[2];
    EVP_PKEY *dom;

    if (k == NULL)
        return NULL;
    if (c->alg == KEYX_ALG_EC && ((dom = keyx_domain_cache_get(c->p->domains, c->p->libctx, c->alg,
                                                               c->suite->group)) == NULL ||
                                  !keyx_key_set_pub(k, dom))) {
        keyx_key_free(k);
        return NULL;
    }
    params[0] =
        OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, (void *)enc, len);
    params[1] = OSSL_PARAM_construct_end();
    if (!keyx_km_set_params(k, params)) {
        keyx_key_free(k);
        return NULL;
    }
    return k;
}

static int dhkem_decapsulate(void *vctx, unsigned char *secret, size_t *secretlen,
                             const unsigned char *enc, size_t enclen)
{
    keyx_dhkem_ctx *c = vctx;
    unsigned char dh[2 * KEYX_DHKEM_MAX_NDH], ctx[3 * KEYX_DHKEM_MAX_NPK];
    size_t ndh, ctxlen;
    keyx_key *pke;
    int ok;

    if (!dhkem_ready(c, DHKEM_DECAP))
        return 0;
    if (secret == NULL) { /* a length query: no DH */
        if (secretlen != NULL)
            *secretlen = c->suite->nsecret;
        return 1;
    }
    if (secretlen == NULL || *secretlen < c->suite->nsecret) {
        KEYX_ERR(c->p, KEYX_R_INVALID_ARGUMENT,
                 "DHKEM %s decapsulation needs %zu bytes for the secret", c->suite->group,
                 c->suite->nsecret);
        return 0;
    }
    if (enc == NULL || enclen != c->suite->npk || (c->alg == KEYX_ALG_EC && enc[0] != 0x04)) {
        KEYX_ERR(c->p, KEYX_R_INVALID_PEER_KEY,
                 "DHKEM %s: enc must be the sender's %zu-byte %s public key, not %zu bytes",
                 c->suite->group, c->suite->npk, c->alg == KEYX_ALG_EC ? "uncompressed" : "raw",
                 enclen);
        keyx_key_event(c->recip, "decapsulate", 0, "invalid enc");
        return 0;
    }
    ndh = c->suite->ndh;
    /* pkE is checked as every peer key (on the curve, not the identity, not of small order). */
    if ((pke = enc_key(c, enc, enclen)) == NULL || !keyx_key_check_peer(c->recip, pke)) {
        keyx_key_event(c->recip, "decapsulate", 0, "invalid enc: not a valid public key");
        keyx_key_free(pke);
        return 0;
    }
    /* DH(skR, pkE) and DH(skR, pkS), both in the recipient key's backend. */
    ok = keyx_key_derive_as(c->recip, pke, "decapsulate", dh, ndh) &&
         (c->sender == NULL ||
          keyx_key_derive_as(c->recip, c->sender, "decapsulate", dh + ndh, ndh)) &&
         (ctxlen = kem_context(c, enc, ctx)) != 0 &&
         keyx_dhkem_extract_and_expand(c->p, c->suite, dh, c->sender != NULL ? 2 * ndh : ndh, ctx,
                                       ctxlen, secret);
    OPENSSL_cleanse(dh, sizeof(dh));
    keyx_key_free(pke);
    if (ok)
        *secretlen = c->suite->nsecret;
    return ok;
}

#define FN(f) ((void (*)(void))(f))

#define KEYX_DHKEM(lower, ALG)                                                                     \
    static void *lower##_dhkem_newctx(void *provctx)                                               \
    {                                                                                              \
        return dhkem_newctx(provctx, ALG);                                                         \
    }                                                                                              \
    const OSSL_DISPATCH keyx_##lower##_dhkem_functions[] = {                                       \
        {OSSL_FUNC_KEM_NEWCTX, FN(lower##_dhkem_newctx)},                                          \
        {OSSL_FUNC_KEM_FREECTX, FN(dhkem_freectx)},                                                \
        {OSSL_FUNC_KEM_ENCAPSULATE_INIT, FN(dhkem_encapsulate_init)},                              \
        {OSSL_FUNC_KEM_AUTH_ENCAPSULATE_INIT, FN(dhkem_auth_encapsulate_init)},                    \
        {OSSL_FUNC_KEM_ENCAPSULATE, FN(dhkem_encapsulate)},                                        \
        {OSSL_FUNC_KEM_DECAPSULATE_INIT, FN(dhkem_decapsulate_init)},                              \
        {OSSL_FUNC_KEM_AUTH_DECAPSULATE_INIT, FN(dhkem_auth_decapsulate_init)},                    \
        {OSSL_FUNC_KEM_DECAPSULATE, FN(dhkem_decapsulate)},                                        \
        {OSSL_FUNC_KEM_SET_CTX_PARAMS, FN(dhkem_set_ctx_params)},                                  \
        {OSSL_FUNC_KEM_SETTABLE_CTX_PARAMS, FN(dhkem_settable_ctx_params)},                        \
        {0, NULL},                                                                                 \
    };

KEYX_DHKEM(ec, KEYX_ALG_EC)
KEYX_DHKEM(x25519, KEYX_ALG_X25519)
KEYX_DHKEM(x448, KEYX_ALG_X448)

#else
typedef int keyx_dhkem_needs_openssl_3_2; /* OpenSSL 3.0/3.1: no DHKEM, nothing registered */
#endif
