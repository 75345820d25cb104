/* Signatures with keyx keys: ECDSA, RSA PKCS#1 v1.5 and RSA-PSS, so that a server certificate key
 * can live in the TPM or on a token. keyx hashes in its own library context and the key's backend
 * signs the digest (keyx_key_sign). Everything else is the default provider's, in keyx's context,
 * through a "shadow" operation on the key's public view: parameter names and values, the
 * AlgorithmIdentifier written into certificates and requests, and verification. A software key is
 * signed by the shadow itself, on the whole key, exactly as the default provider signs it.
 *
 * Once keyx registers these, an application preferring keyx has every ECDSA and RSA signature of
 * the process come here (certificate verification included), hence the faithful delegation. */
#include <string.h>

#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/rsa.h>

#include "backend/call.h"
#include "keymgmt/algtab.h"
#include "keymgmt/key.h"
#include "provider/dispatch.h"
#include "provider/errors.h"
#include "provider/fail_closed.h"

/* r || s of P-521 */
#define MAX_RAW_SIG (2 * 66)

typedef struct keyx_sig {
    keyx_provctx *p;
    keyx_alg alg;  /* EC (ECDSA) or RSA */
    keyx_key *key; /* owned by the application's EVP_PKEY, which the EVP_PKEY_CTX holds */
    int signing;
    int hardware;         /* the backend signs; the shadow only verifies and answers */
    EVP_PKEY_CTX *shadow; /* default provider in keyx's context on key->pub: sign-init for a
                             software key's signatures, verify-init otherwise */
    EVP_MD_CTX *md;       /* digest_sign / digest_verify */
} keyx_sig;

static void *sig_new(keyx_provctx *p, keyx_alg alg)
{
    keyx_sig *c;

    if (keyx_refused(p) || !keyx_check_not_reentered(p, "a signature"))
        return NULL;
    if ((c = OPENSSL_zalloc(sizeof(*c))) == NULL)
        return NULL;
    c->p = p;
    c->alg = alg;
    return c;
}

static void *ecdsa_newctx(void *provctx, const char *propq)
{
    (void)propq;
    return sig_new(provctx, KEYX_ALG_EC);
}

static void *rsa_newctx(void *provctx, const char *propq)
{
    (void)propq;
    return sig_new(provctx, KEYX_ALG_RSA);
}

static void sig_reset(keyx_sig *c)
{
    EVP_PKEY_CTX_free(c->shadow);
    EVP_MD_CTX_free(c->md);
    c->shadow = NULL;
    c->md = NULL;
}

static void sig_free(void *vctx)
{
    keyx_sig *c = vctx;

    if (c == NULL)
        return;
    sig_reset(c);
    OPENSSL_free(c);
}

static void *sig_dup(void *vctx)
{
    keyx_sig *c = vctx, *d = OPENSSL_memdup(c, sizeof(*c));

    if (d == NULL)
        return NULL;
    d->shadow = NULL;
    d->md = NULL;
    if ((c->shadow != NULL && (d->shadow = EVP_PKEY_CTX_dup(c->shadow)) == NULL) ||
        (c->md != NULL &&
         ((d->md = EVP_MD_CTX_new()) == NULL || !EVP_MD_CTX_copy_ex(d->md, c->md)))) {
        sig_free(d);
        return NULL;
    }
    return d;
}

/* ---- the signing parameters, as the shadow holds them ---------------------------------------- */

/* The digest, padding, MGF1 digest and salt length now set, resolved into a keyx_sign_op. md and
 * mgf1 are the op's string storage. checking: for sign_check, while parameters may still change.
 * 0 + error when a hardware key cannot be asked to sign so. */
static int current_op(keyx_sig *c, keyx_sign_op *op, char md[64], char mgf1[64], int checking)
{
    OSSL_PARAM q[2] = {OSSL_PARAM_construct_utf8_string(OSSL_SIGNATURE_PARAM_DIGEST, md, 64),
                       OSSL_PARAM_construct_end()};
    int pad = RSA_PKCS1_PADDING, salt = RSA_PSS_SALTLEN_AUTO, hlen, max;
    EVP_MD *m;

    memset(op, 0, sizeof(*op));
    md[0] = mgf1[0] = '\0';
    if (!EVP_PKEY_CTX_get_params(c->shadow, q) || md[0] == '\0') {
        KEYX_ERR(c->p, KEYX_R_INVALID_ARGUMENT,
                 "signing with a hardware key needs a digest (set one: -sha256, "
                 "EVP_PKEY_CTX_set_signature_md)");
        return 0;
    }
    op->md = md;
    if (c->alg == KEYX_ALG_EC) {
        op->scheme = KEYX_SIG_ECDSA;
        return 1;
    }
    q[0] = OSSL_PARAM_construct_int(OSSL_SIGNATURE_PARAM_PAD_MODE, &pad);
    if (!EVP_PKEY_CTX_get_params(c->shadow, q))
        return 0;
    if (pad == RSA_PKCS1_PADDING) {
        op->scheme = KEYX_SIG_RSA_PKCS1;
        return 1;
    }
    if (pad != RSA_PKCS1_PSS_PADDING) {
        KEYX_ERR(c->p, KEYX_R_UNSUPPORTED,
                 "a hardware RSA key signs with PKCS#1 v1.5 or PSS padding only (pad mode %d)",
                 pad);
        return 0;
    }
    op->scheme = KEYX_SIG_RSA_PSS;
    q[0] = OSSL_PARAM_construct_utf8_string(OSSL_SIGNATURE_PARAM_MGF1_DIGEST, mgf1, 64);
    if (!EVP_PKEY_CTX_get_params(c->shadow, q))
        return 0;
    op->mgf1_md = mgf1[0] != '\0' ? mgf1 : md;
    q[0] = OSSL_PARAM_construct_int(OSSL_SIGNATURE_PARAM_PSS_SALTLEN, &salt);
    if (!EVP_PKEY_CTX_get_params(c->shadow, q) ||
        (m = EVP_MD_fetch(c->p->libctx, md, NULL)) == NULL)
        return 0;
    hlen = EVP_MD_get_size(m);
    EVP_MD_free(m);
    max = (EVP_PKEY_get_bits(keyx_key_pub(c->key)) - 1 + 7) / 8 - hlen - 2;
    /* As the default provider signs: "digest" the hash length, "max" and "auto" the most that
     * fits, "auto-digestmax" (OpenSSL 3.1) the hash length or less. */
    if (salt == RSA_PSS_SALTLEN_DIGEST || (checking && salt == RSA_PSS_SALTLEN_AUTO))
        salt = hlen; /* "auto" is PSS's default, which libssl replaces right after choosing PSS:
                        decided at the signature */
    else if (salt == RSA_PSS_SALTLEN_MAX || salt == RSA_PSS_SALTLEN_AUTO)
        salt = max;
    else if (salt == -4)
        salt = hlen < max ? hlen : max;
    if (salt < 0 || salt > max) {
        KEYX_ERR(c->p, KEYX_R_INVALID_ARGUMENT, "PSS salt length %d does not fit this key", salt);
        return 0;
    }
    op->saltlen = salt;
    return 1;
}

/* A hardware key's backend is asked before any data whether it signs so. */
static int check_backend(keyx_sig *c)
{
    keyx_sign_op op;
    char md[64], mgf1[64];

    if (!c->hardware || !c->signing)
        return 1;
    return current_op(c, &op, md, mgf1, 1) && keyx_key_sign_check(c->key, &op);
}

static int sig_set_ctx_params(void *vctx, const OSSL_PARAM params[])
{
    keyx_sig *c = vctx;

    if (params == NULL || params[0].key == NULL)
        return 1;
    if (c->shadow == NULL) {
        KEYX_ERR(c->p, KEYX_R_INVALID_ARGUMENT, "signature parameters before the key is set");
        return 0;
    }
    return EVP_PKEY_CTX_set_params(c->shadow, params) == 1 && (c->md == NULL || check_backend(c));
}

static int sig_get_ctx_params(void *vctx, OSSL_PARAM params[])
{
    keyx_sig *c = vctx;

    if (c->shadow == NULL)
        return 0;
    return EVP_PKEY_CTX_get_params(c->shadow, params) == 1;
}

static EVP_SIGNATURE *default_signature(keyx_provctx *p, keyx_alg alg)
{
    return alg == KEYX_ALG_EC ? p->algs->ecdsa : p->algs->rsa_sig;
}

static const OSSL_PARAM *ecdsa_settable(void *vctx, void *provctx)
{
    (void)vctx;
    return EVP_SIGNATURE_settable_ctx_params(default_signature(provctx, KEYX_ALG_EC));
}

static const OSSL_PARAM *ecdsa_gettable(void *vctx, void *provctx)
{
    (void)vctx;
    return EVP_SIGNATURE_gettable_ctx_params(default_signature(provctx, KEYX_ALG_EC));
}

static const OSSL_PARAM *rsa_settable(void *vctx, void *provctx)
{
    (void)vctx;
    return EVP_SIGNATURE_settable_ctx_params(default_signature(provctx, KEYX_ALG_RSA));
}

static const OSSL_PARAM *rsa_gettable(void *vctx, void *provctx)
{
    (void)vctx;
    return EVP_SIGNATURE_gettable_ctx_params(default_signature(provctx, KEYX_ALG_RSA));
}

/* ---- init --------------------------------------------------------------------------------- */

static int sig_init(keyx_sig *c, void *keydata, int signing, const char *mdname,
                    const OSSL_PARAM params[])
{
    keyx_key *k = keydata;
    int ok;

    sig_reset(c);
    if (k == NULL || k->alg != c->alg || keyx_key_pub(k) == NULL || !k->has_public) {
        KEYX_ERR(c->p, KEYX_R_MISSING_KEY, "%s signature: no %s key",
                 c->alg == KEYX_ALG_EC ? "ECDSA" : "RSA", keyx_alg_name(c->alg));
        return 0;
    }
    if (signing && !keyx_key_has_private(k)) {
        KEYX_ERR(c->p, KEYX_R_MISSING_KEY, "signing needs a private key; this one is public");
        return 0;
    }
    c->key = k;
    c->signing = signing;
    c->hardware = keyx_key_has_private(k) && !keyx_key_exports_private(k);
    if ((c->shadow = EVP_PKEY_CTX_new_from_pkey(c->p->libctx, keyx_key_pub(k), NULL)) == NULL)
        return 0;
    ok = signing && !c->hardware ? EVP_PKEY_sign_init(c->shadow) : EVP_PKEY_verify_init(c->shadow);
    if (ok == 1 && mdname != NULL) {
        OSSL_PARAM md[2] = {
            OSSL_PARAM_construct_utf8_string(OSSL_SIGNATURE_PARAM_DIGEST, (char *)mdname, 0),
            OSSL_PARAM_construct_end()};
        EVP_MD *m = EVP_MD_fetch(c->p->libctx, mdname, NULL);

        ok = m != NULL && EVP_PKEY_CTX_set_params(c->shadow, md) == 1 &&
             (c->md = EVP_MD_CTX_new()) != NULL && EVP_DigestInit_ex2(c->md, m, NULL) == 1;
        EVP_MD_free(m);
        if (!ok) {
            KEYX_ERR(c->p, KEYX_R_DIGEST_UNSUPPORTED, "digest '%s' unknown or unusable with %s",
                     mdname, c->alg == KEYX_ALG_EC ? "ECDSA" : "RSA");
            return 0;
        }
    }
    if (ok != 1)
        return 0;
    if (params != NULL && params[0].key != NULL && EVP_PKEY_CTX_set_params(c->shadow, params) != 1)
        return 0;
    /* EVP_DigestSignInit (and libssl with it) fails here, before any data, on a digest or
     * padding the key's backend cannot use. A plain sign_init learns the digest later. */
    return mdname == NULL || check_backend(c);
}

static int sig_sign_init(void *vctx, void *keydata, const OSSL_PARAM params[])
{
    return sig_init(vctx, keydata, 1, NULL, params);
}

static int sig_verify_init(void *vctx, void *keydata, const OSSL_PARAM params[])
{
    return sig_init(vctx, keydata, 0, NULL, params);
}

static int sig_digest_sign_init(void *vctx, const char *mdname, void *keydata,
                                const OSSL_PARAM params[])
{
    /* no digest named: the key's default, as the default provider picks it */
    return sig_init(vctx, keydata, 1, mdname != NULL ? mdname : "SHA256", params);
}

static int sig_digest_verify_init(void *vctx, const char *mdname, void *keydata,
                                  const OSSL_PARAM params[])
{
    return sig_init(vctx, keydata, 0, mdname != NULL ? mdname : "SHA256", params);
}

/* ---- signing ------------------------------------------------------------------------------ */

/* DER ECDSA-Sig-Value of r || s. */
static int ecdsa_der(keyx_sig *c, const unsigned char *raw, size_t rawlen, unsigned char *sig,
                     size_t *siglen, size_t sigsize)
{
    ECDSA_SIG *es = ECDSA_SIG_new();
    BIGNUM *r = BN_bin2bn(raw, (int)(rawlen / 2), NULL),
           *s = BN_bin2bn(raw + rawlen / 2, (int)(rawlen / 2), NULL);
    int n = -1;

    if (es != NULL && r != NULL && s != NULL && ECDSA_SIG_set0(es, r, s)) {
        r = s = NULL;
        n = i2d_ECDSA_SIG(es, NULL);
        if (n > 0 && (size_t)n <= sigsize) {
            unsigned char *out = sig;

            n = i2d_ECDSA_SIG(es, &out);
        } else {
            n = -1;
        }
    }
    BN_free(r);
    BN_free(s);
    ECDSA_SIG_free(es);
    if (n <= 0) {
        KEYX_ERR(c->p, KEYX_R_INVALID_ARGUMENT, "ECDSA signature: output buffer too small");
        return 0;
    }
    *siglen = (size_t)n;
    return 1;
}

/* The shadow signs a software key whole; the backend signs a hardware key's digest. */
static int sign_digest(keyx_sig *c, unsigned char *sig, size_t *siglen, size_t sigsize,
                       const unsigned char *dgst, size_t dlen)
{
    unsigned char raw[MAX_RAW_SIG];
    size_t rawlen = sizeof(raw);
    keyx_sign_op op;
    char md[64], mgf1[64];
    int ok;

    if (!c->hardware) {
        *siglen = sigsize;
        ok = EVP_PKEY_sign(c->shadow, sig, siglen, dgst, dlen) == 1;
        keyx_key_event(c->key, "sign", ok, ok ? NULL : "signing failed");
        return ok;
    }
    if (!current_op(c, &op, md, mgf1, 0))
        return 0;
    if (c->md != NULL ? (size_t)EVP_MD_CTX_get_size(c->md) != dlen : dlen > EVP_MAX_MD_SIZE) {
        KEYX_ERR(c->p, KEYX_R_INVALID_ARGUMENT, "the data to sign is not a %s digest", md);
        return 0;
    }
    if (c->alg == KEYX_ALG_EC) /* the backend gives r || s, the caller wants DER */
        return keyx_key_sign(c->key, &op, dgst, dlen, raw, &rawlen) &&
               ecdsa_der(c, raw, rawlen, sig, siglen, sigsize);
    if (sigsize < (size_t)EVP_PKEY_get_size(keyx_key_pub(c->key))) {
        KEYX_ERR(c->p, KEYX_R_INVALID_ARGUMENT, "RSA signature: output buffer too small");
        return 0;
    }
    *siglen = sigsize;
    return keyx_key_sign(c->key, &op, dgst, dlen, sig, siglen);
}

static int sig_sign(void *vctx, unsigned char *sig, size_t *siglen, size_t sigsize,
                    const unsigned char *tbs, size_t tbslen)
{
    keyx_sig *c = vctx;

    if (c->shadow == NULL || !c->signing)
        return 0;
    if (sig == NULL) {
        *siglen = (size_t)EVP_PKEY_get_size(keyx_key_pub(c->key));
        return 1;
    }
    /* A plain sign: the digest was set by now (the data is the digest), so ask the backend. */
    if (c->md == NULL && !check_backend(c))
        return 0;
    return sign_digest(c, sig, siglen, sigsize, tbs, tbslen);
}

static int sig_verify(void *vctx, const unsigned char *sig, size_t siglen, const unsigned char *tbs,
                      size_t tbslen)
{
    keyx_sig *c = vctx;

    return c->shadow != NULL && !c->signing &&
           EVP_PKEY_verify(c->shadow, sig, siglen, tbs, tbslen) == 1;
}

static int sig_digest_update(void *vctx, const unsigned char *data, size_t datalen)
{
    keyx_sig *c = vctx;

    return c->md != NULL && EVP_DigestUpdate(c->md, data, datalen) == 1;
}

static int sig_digest_sign_final(void *vctx, unsigned char *sig, size_t *siglen, size_t sigsize)
{
    keyx_sig *c = vctx;
    unsigned char dgst[EVP_MAX_MD_SIZE];
    unsigned int dlen = 0;

    if (c->md == NULL || !c->signing)
        return 0;
    if (sig == NULL) { /* a size query: the digest stays open */
        *siglen = (size_t)EVP_PKEY_get_size(keyx_key_pub(c->key));
        return 1;
    }
    return EVP_DigestFinal_ex(c->md, dgst, &dlen) == 1 &&
           sign_digest(c, sig, siglen, sigsize, dgst, dlen);
}

static int sig_digest_verify_final(void *vctx, const unsigned char *sig, size_t siglen)
{
    keyx_sig *c = vctx;
    unsigned char dgst[EVP_MAX_MD_SIZE];
    unsigned int dlen = 0;

    return c->md != NULL && !c->signing && EVP_DigestFinal_ex(c->md, dgst, &dlen) == 1 &&
           EVP_PKEY_verify(c->shadow, sig, siglen, dgst, dlen) == 1;
}

#define FN(f) ((void (*)(void))(f))

#define KEYX_SIGNATURE(lower)                                                                      \
    const OSSL_DISPATCH keyx_##lower##_signature_functions[] = {                                   \
        {OSSL_FUNC_SIGNATURE_NEWCTX, FN(lower##_newctx)},                                          \
        {OSSL_FUNC_SIGNATURE_FREECTX, FN(sig_free)},                                               \
        {OSSL_FUNC_SIGNATURE_DUPCTX, FN(sig_dup)},                                                 \
        {OSSL_FUNC_SIGNATURE_SIGN_INIT, FN(sig_sign_init)},                                        \
        {OSSL_FUNC_SIGNATURE_SIGN, FN(sig_sign)},                                                  \
        {OSSL_FUNC_SIGNATURE_VERIFY_INIT, FN(sig_verify_init)},                                    \
        {OSSL_FUNC_SIGNATURE_VERIFY, FN(sig_verify)},                                              \
        {OSSL_FUNC_SIGNATURE_DIGEST_SIGN_INIT, FN(sig_digest_sign_init)},                          \
        {OSSL_FUNC_SIGNATURE_DIGEST_SIGN_UPDATE, FN(sig_digest_update)},                           \
        {OSSL_FUNC_SIGNATURE_DIGEST_SIGN_FINAL, FN(sig_digest_sign_final)},                        \
        {OSSL_FUNC_SIGNATURE_DIGEST_VERIFY_INIT, FN(sig_digest_verify_init)},                      \
        {OSSL_FUNC_SIGNATURE_DIGEST_VERIFY_UPDATE, FN(sig_digest_update)},                         \
        {OSSL_FUNC_SIGNATURE_DIGEST_VERIFY_FINAL, FN(sig_digest_verify_final)},                    \
        {OSSL_FUNC_SIGNATURE_GET_CTX_PARAMS, FN(sig_get_ctx_params)},                              \
        {OSSL_FUNC_SIGNATURE_GETTABLE_CTX_PARAMS, FN(lower##_gettable)},                           \
        {OSSL_FUNC_SIGNATURE_SET_CTX_PARAMS, FN(sig_set_ctx_params)},                              \
        {OSSL_FUNC_SIGNATURE_SETTABLE_CTX_PARAMS, FN(lower##_settable)},                           \
        {0, NULL},                                                                                 \
    }

KEYX_SIGNATURE(ecdsa);
KEYX_SIGNATURE(rsa);
