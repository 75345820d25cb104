#include <string.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/params.h>

#include "backend/pkcs11_attr.h"
#include "backend/pkcs11_rsa.h"
#include "provider/errors.h"
#include "provider/provctx.h"
#include "backend/rsa_oaep_decode.h"

int p11_rsa_supports(const p11_caps *caps, size_t bits)
{
    if (bits != 2048 && bits != 3072 && bits != 4096)
        return 0;
    return caps->rsa && bits >= caps->rsa_min && (caps->rsa_max == 0 || bits <= caps->rsa_max);
}

/* An RSA public key (n, e big-endian) in libctx. */
static EVP_PKEY *rsa_public(OSSL_LIB_CTX *libctx, const unsigned char *n, size_t nlen,
                            const unsigned char *e, size_t elen)
{
    OSSL_PARAM_BLD *bld = OSSL_PARAM_BLD_new();
    BIGNUM *bn = BN_bin2bn(n, (int)nlen, NULL), *be = BN_bin2bn(e, (int)elen, NULL);
    OSSL_PARAM *params = NULL;
    EVP_PKEY_CTX *ctx = NULL;
    EVP_PKEY *pub = NULL;

    if (bld != NULL && bn != NULL && be != NULL &&
        OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_N, bn) &&
        OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_E, be) &&
        (params = OSSL_PARAM_BLD_to_param(bld)) != NULL &&
        (ctx = EVP_PKEY_CTX_new_from_name(libctx, "RSA", NULL)) != NULL &&
        EVP_PKEY_fromdata_init(ctx) == 1)
        EVP_PKEY_fromdata(ctx, &pub, EVP_PKEY_PUBLIC_KEY, params);
    EVP_PKEY_CTX_free(ctx);
    OSSL_PARAM_free(params);
    OSSL_PARAM_BLD_free(bld);
    BN_free(bn);
    BN_free(be);
    return pub;
}

CK_RV p11_rsa_public(p11_sess *s, CK_OBJECT_HANDLE priv, OSSL_LIB_CTX *libctx, EVP_PKEY **pub,
                     size_t *nlen)
{
    unsigned char *n = NULL, *e = NULL;
    size_t nl = 0, el = 0;
    CK_RV rv;

    if ((rv = p11_get_attr(s, priv, CKA_MODULUS, 0, &n, &nl)) == CKR_OK &&
        (rv = p11_get_attr(s, priv, CKA_PUBLIC_EXPONENT, 0, &e, &el)) == CKR_OK &&
        (nl == 0 || el == 0))
        rv = CKR_ATTRIBUTE_TYPE_INVALID;
    if (rv == CKR_OK && (*pub = rsa_public(libctx, n, nl, e, el)) == NULL)
        rv = CKR_ATTRIBUTE_VALUE_INVALID;
    if (rv == CKR_OK)
        *nlen = (size_t)EVP_PKEY_get_size(*pub);
    OPENSSL_free(n);
    OPENSSL_free(e);
    return rv;
}

/* ---- generate ---------------------------------------------------------------------------- */

/* The public exponent the application asked for ("e"), big-endian; 65537 by default. */
static unsigned char *public_exponent(const keyx_keyspec *spec, size_t *len)
{
    const OSSL_PARAM *pe =
        spec->params != NULL ? OSSL_PARAM_locate_const(spec->params, OSSL_PKEY_PARAM_RSA_E) : NULL;
    BIGNUM *e = NULL;
    unsigned char *out = NULL;

    if (pe == NULL || !OSSL_PARAM_get_BN(pe, &e)) {
        static const unsigned char f4[] = {0x01, 0x00, 0x01};

        *len = sizeof(f4);
        return OPENSSL_memdup(f4, sizeof(f4));
    }
    if (!BN_is_odd(e) || BN_is_one(e) || (out = OPENSSL_malloc((size_t)BN_num_bytes(e))) == NULL) {
        BN_free(e);
        return NULL;
    }
    *len = (size_t)BN_bn2bin(e, out);
    BN_free(e);
    return out;
}

int p11_rsa_generate(p11_sess *s, const keyx_keyspec *spec, const p11_name *name,
                     CK_OBJECT_HANDLE *priv, EVP_PKEY **pub)
{
    keyx_provctx *p = p11_dev_prov(s->dev);
    CK_ULONG bits = spec->bits;
    size_t elen = 0, nl = 0;
    unsigned char *e = public_exponent(spec, &elen);
    CK_MECHANISM mech = {CKM_RSA_PKCS_KEY_PAIR_GEN, NULL, 0};
    CK_OBJECT_HANDLE pubobj = CK_INVALID_HANDLE;
    p11_tmpl pubt, privt;
    CK_RV rv;

    if (e == NULL) {
        p11_session_put(s, CKR_OK);
        KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT,
                 "pkcs11: the RSA public exponent must be an odd number greater than 1");
        return 0;
    }
    /* Ephemeral: session objects, the private one usable only for decryption, never readable
     * or extractable. Named (keyx-label/keyx-id): token objects, for decryption and signing. */
    p11_tmpl_pair(&pubt, &privt, name, CKA_ENCRYPT, CKA_DECRYPT, 1);
    p11_tmpl_add(&pubt, CKA_MODULUS_BITS, &bits, sizeof(bits));
    p11_tmpl_add(&pubt, CKA_PUBLIC_EXPONENT, e, elen);
    rv = s->f->C_GenerateKeyPair(s->h, &mech, pubt.a, pubt.n, privt.a, privt.n, &pubobj, priv);
    OPENSSL_free(e);
    if (rv != CKR_OK) {
        p11_session_put(s, rv);
        return p11_fail(s, rv, "RSA key generation (C_GenerateKeyPair)");
    }
    /* n and e are read from the public object once and kept in keyx; an ephemeral key's public
     * object goes now, a token key's stays beside its private key. */
    rv = p11_rsa_public(s, pubobj, p->libctx, pub, &nl);
    if (name == NULL || rv != CKR_OK)
        s->f->C_DestroyObject(s->h, pubobj);
    if (rv != CKR_OK) {
        s->f->C_DestroyObject(s->h, *priv);
        p11_session_put(s, rv);
        return p11_fail(s, rv, "reading the generated RSA public key");
    }
    p11_session_put(s, CKR_OK);
    return 1;
}

/* ---- import ------------------------------------------------------------------------------ */

int p11_rsa_import(p11_sess *s, EVP_PKEY *key, CK_OBJECT_HANDLE *obj, EVP_PKEY **pub)
{
    static const char *const names[] = {
        OSSL_PKEY_PARAM_RSA_N,         OSSL_PKEY_PARAM_RSA_E,
        OSSL_PKEY_PARAM_RSA_D,         OSSL_PKEY_PARAM_RSA_FACTOR1,
        OSSL_PKEY_PARAM_RSA_FACTOR2,   OSSL_PKEY_PARAM_RSA_EXPONENT1,
        OSSL_PKEY_PARAM_RSA_EXPONENT2, OSSL_PKEY_PARAM_RSA_COEFFICIENT1,
    };
    static const CK_ATTRIBUTE_TYPE types[] = {
        CKA_MODULUS, CKA_PUBLIC_EXPONENT, CKA_PRIVATE_EXPONENT, CKA_PRIME_1,
        CKA_PRIME_2, CKA_EXPONENT_1,      CKA_EXPONENT_2,       CKA_COEFFICIENT,
    };
    keyx_provctx *p = p11_dev_prov(s->dev);
    CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
    CK_KEY_TYPE kt = CKK_RSA;
    CK_ATTRIBUTE t[16] = {
        ATTR(CKA_CLASS, &cls, sizeof(cls)),
        ATTR(CKA_KEY_TYPE, &kt, sizeof(kt)),
        P11_SESSION_PRIVATE(CKA_DECRYPT),
    };
    unsigned char *v[8] = {NULL};
    size_t len[8] = {0};
    CK_ULONG nt = 7;
    CK_RV rv = CKR_OK;
    int ok = 1;

    for (size_t i = 0; i < 8 && ok; i++) {
        BIGNUM *bn = NULL;

        /* all CRT parts: a token that gets only n and d may refuse the key or go slow */
        ok = EVP_PKEY_get_bn_param(key, names[i], &bn) == 1 &&
             (v[i] = OPENSSL_malloc((size_t)BN_num_bytes(bn) + 1)) != NULL;
        if (ok) {
            len[i] = (size_t)BN_bn2bin(bn, v[i]);
            t[nt++] = (CK_ATTRIBUTE)ATTR(types[i], v[i], len[i]);
        }
        BN_clear_free(bn);
    }
    if (ok && (*pub = rsa_public(p->libctx, v[0], len[0], v[1], len[1])) == NULL)
        ok = 0;
    if (ok)
        rv = s->f->C_CreateObject(s->h, t, nt, obj);
    for (size_t i = 0; i < 8; i++)
        OPENSSL_clear_free(v[i], len[i]);
    p11_session_put(s, ok ? rv : CKR_OK);
    if (!ok) {
        KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT,
                 "pkcs11: the RSA private key lacks its CRT parts (p, q, dp, dq, qinv)");
        return 0;
    }
    if (rv != CKR_OK) {
        EVP_PKEY_free(*pub);
        *pub = NULL;
        return p11_fail(s, rv, "importing the RSA private key (C_CreateObject)");
    }
    return 1;
}

/* ---- decrypt ----------------------------------------------------------------------------- */

/* Device and session failures; anything else once C_DecryptInit has succeeded is the
 * ciphertext's fault (SoftHSM answers bad padding with CKR_GENERAL_ERROR). */
static int decrypt_rv_is_down(CK_RV rv)
{
    switch (rv) {
    case CKR_DEVICE_ERROR:
    case CKR_DEVICE_MEMORY:
    case CKR_DEVICE_REMOVED:
    case CKR_TOKEN_NOT_PRESENT:
    case CKR_SESSION_CLOSED:
    case CKR_SESSION_HANDLE_INVALID:
    case CKR_CRYPTOKI_NOT_INITIALIZED:
        return 1;
    default:
        return 0;
    }
}

/* The parameters, not the ciphertext, were refused: the same answer for every ciphertext. */
static int params_refused(CK_RV rv)
{
    return rv == CKR_MECHANISM_INVALID || rv == CKR_MECHANISM_PARAM_INVALID ||
           rv == CKR_ARGUMENTS_BAD;
}

/* C_Decrypt after a successful C_DecryptInit; does not give the session back. */
static int run_decrypt(p11_sess *s, const unsigned char *ct, size_t ctlen, size_t nlen,
                       unsigned char *out, size_t *outlen, int fixed, CK_RV *rvp)
{
    CK_ULONG len = *outlen;
    CK_RV rv = s->f->C_Decrypt(s->h, (unsigned char *)ct, ctlen, out, &len);

    *rvp = CKR_OK;
    if (rv != CKR_OK) {
        OPENSSL_cleanse(out, *outlen);
        if (decrypt_rv_is_down(rv)) {
            *rvp = rv;
            return p11_fail(s, rv, "RSA decryption (C_Decrypt)");
        }
        return KEYX_RSA_DECRYPT_ERROR;
    }
    if (fixed && len < nlen) { /* raw: keep the leading zeros of the modulus-size value */
        memmove(out + nlen - len, out, len);
        memset(out, 0, nlen - len);
        len = nlen;
    }
    *outlen = len;
    return 1;
}

static int raw_decrypt(p11_sess *s, CK_OBJECT_HANDLE obj, const unsigned char *ct, size_t ctlen,
                       size_t nlen, unsigned char *out, size_t *outlen, CK_RV *rvp)
{
    CK_MECHANISM mech = {CKM_RSA_X_509, NULL, 0};
    CK_RV rv = s->f->C_DecryptInit(s->h, &mech, obj);

    if (rv != CKR_OK) {
        *rvp = rv;
        return p11_fail(s, rv, "raw RSA decryption (C_DecryptInit CKM_RSA_X_509)");
    }
    return run_decrypt(s, ct, ctlen, nlen, out, outlen, 1, rvp);
}

static CK_MECHANISM_TYPE hash_mech(const char *md)
{
    static const struct {
        const char *name;
        CK_MECHANISM_TYPE mech;
    } map[] = {{"SHA1", CKM_SHA_1},
               {"SHA224", CKM_SHA224},
               {"SHA256", CKM_SHA256},
               {"SHA384", CKM_SHA384},
               {"SHA512", CKM_SHA512}};

    for (size_t i = 0; i < sizeof(map) / sizeof(map[0]); i++)
        if (strcmp(md, map[i].name) == 0)
            return map[i].mech;
    return CK_UNAVAILABLE_INFORMATION;
}

static CK_RSA_PKCS_MGF_TYPE mgf_type(const char *md)
{
    static const struct {
        const char *name;
        CK_RSA_PKCS_MGF_TYPE mgf;
    } map[] = {{"SHA1", CKG_MGF1_SHA1},
               {"SHA224", CKG_MGF1_SHA224},
               {"SHA256", CKG_MGF1_SHA256},
               {"SHA384", CKG_MGF1_SHA384},
               {"SHA512", CKG_MGF1_SHA512}};

    for (size_t i = 0; i < sizeof(map) / sizeof(map[0]); i++)
        if (strcmp(md, map[i].name) == 0)
            return map[i].mgf;
    return 0;
}

/* Bit of a (digest, MGF1 digest) pair among SHA-1..SHA-512 squared; -1 for others. */
static int oaep_pair_bit(const char *md, const char *mgf1)
{
    static const char *const names[] = {"SHA1", "SHA224", "SHA256", "SHA384", "SHA512"};
    int a = -1, b = -1;

    for (int i = 0; i < 5; i++) {
        if (strcmp(md, names[i]) == 0)
            a = i;
        if (strcmp(mgf1, names[i]) == 0)
            b = i;
    }
    return a < 0 || b < 0 ? -1 : a * 5 + b;
}

/* OAEP: natively when the token takes the parameters, else (pkcs11-raw-rsa) raw + keyx. */
static int oaep_decrypt(p11_sess *s, CK_OBJECT_HANDLE obj, const keyx_rsa_op *op,
                        const unsigned char *ct, size_t ctlen, size_t nlen, unsigned char *out,
                        size_t *outlen, CK_RV *rvp)
{
    keyx_provctx *p = p11_dev_prov(s->dev);
    const char *mgf1 = op->mgf1_md != NULL ? op->mgf1_md : op->md;
    CK_RSA_PKCS_OAEP_PARAMS prm = {hash_mech(op->md), mgf_type(mgf1), CKZ_DATA_SPECIFIED,
                                   op->labellen > 0 ? (void *)op->label : NULL, op->labellen};
    CK_MECHANISM mech = {CKM_RSA_PKCS_OAEP, &prm, sizeof(prm)};
    CK_RV rv = CKR_MECHANISM_PARAM_INVALID;
    unsigned char *em;
    size_t emlen = nlen;
    int rc;

    /* A label is never handed to the token: SoftHSM 2.6 accepts one in C_DecryptInit and
     * ignores it, so a ciphertext made under another label (or none) would decrypt. Labelled
     * OAEP runs as raw RSA on the token and OAEP decoding in keyx (pkcs11-raw-rsa = 1). */
    /* The token's refusal of a parameter set is remembered: asking again on every decrypt
     * would cost a round trip per decryption on a network HSM. */
    int bit = oaep_pair_bit(op->md, mgf1);

    if (op->labellen > 0)
        rv = CKR_MECHANISM_PARAM_INVALID;
    else if (bit >= 0 && p11_dev_oaep_refused(s->dev, s->tok, bit))
        rv = CKR_MECHANISM_PARAM_INVALID;
    else if (prm.hashAlg != CK_UNAVAILABLE_INFORMATION && prm.mgf != 0) {
        rv = s->f->C_DecryptInit(s->h, &mech, obj);
        if (rv == CKR_OK)
            return run_decrypt(s, ct, ctlen, nlen, out, outlen, 0, rvp);
        if (!params_refused(rv)) {
            *rvp = rv;
            return p11_fail(s, rv, "RSA-OAEP decryption (C_DecryptInit CKM_RSA_PKCS_OAEP)");
        }
        if (bit >= 0)
            p11_dev_oaep_refuse(s->dev, s->tok, bit);
    }
    if (!p->cfg.pkcs11_raw_rsa) {
        KEYX_ERR(p, KEYX_R_UNSUPPORTED,
                 "pkcs11: token '%s' cannot decrypt RSA-OAEP with %s, MGF1-%s%s (%s); keyx "
                 "hands tokens OAEP without a label only, and SoftHSM 2 takes SHA-1 only. Set "
                 "pkcs11-raw-rsa = 1 to have keyx decode OAEP itself, in constant time, after a "
                 "raw CKM_RSA_X_509 decryption on the token",
                 p11_dev_token_label(s->dev, s->tok), op->md, mgf1,
                 op->labellen > 0 ? " and a label" : "",
                 op->labellen > 0 ? "labels are not handed to tokens"
                                  : "the token refused these parameters");
        return 0;
    }
    if ((em = OPENSSL_malloc(nlen)) == NULL)
        return 0;
    rc = raw_decrypt(s, obj, ct, ctlen, nlen, em, &emlen, rvp);
    if (rc == 1) {
        rc = keyx_oaep_decode(p->libctx, em, nlen, op->md, mgf1, op->label, op->labellen, out,
                              outlen);
        if (rc == -1)
            KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT, "pkcs11: unknown OAEP digest %s or %s", op->md,
                     mgf1);
        rc = rc == 1 ? 1 : rc == 0 ? KEYX_RSA_DECRYPT_ERROR : 0;
    }
    OPENSSL_clear_free(em, nlen);
    return rc;
}

int p11_rsa_decrypt(p11_sess *s, CK_OBJECT_HANDLE obj, size_t nlen, const keyx_rsa_op *op,
                    const unsigned char *in, size_t inlen, unsigned char *out, size_t *outlen)
{
    keyx_provctx *p = p11_dev_prov(s->dev);
    unsigned char *ct = NULL;
    CK_RV rv = CKR_OK;
    int rc;

    if (op->pad == KEYX_RSA_PAD_TLS) {
        p11_session_put(s, CKR_OK);
        KEYX_ERR(p, KEYX_R_UNSUPPORTED, "pkcs11: TLS RSA key exchange padding is not offered");
        return 0;
    }
    if (*outlen < nlen) {
        p11_session_put(s, CKR_OK);
        KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT, "pkcs11: RSA output buffer smaller than the modulus");
        return 0;
    }
    /* A shorter ciphertext is the same number without its leading zeros, as OpenSSL reads it.
     * A longer one decrypts nowhere, but still goes to the token (which refuses its length):
     * parameters the token refuses must be reported first, whatever the ciphertext. */
    if ((ct = OPENSSL_zalloc(inlen > nlen ? inlen : nlen)) == NULL) {
        p11_session_put(s, CKR_OK);
        return 0;
    }
    memcpy(inlen > nlen ? ct : ct + nlen - inlen, in, inlen);
    rc = op->pad == KEYX_RSA_PAD_OAEP
             ? oaep_decrypt(s, obj, op, ct, inlen > nlen ? inlen : nlen, nlen, out, outlen, &rv)
             : raw_decrypt(s, obj, ct, inlen > nlen ? inlen : nlen, nlen, out, outlen, &rv);
    if (rc == 1 && inlen > nlen) { /* a token that took it anyway */
        OPENSSL_cleanse(out, *outlen);
        rc = KEYX_RSA_DECRYPT_ERROR;
    }
    p11_session_put(s, rv);
    OPENSSL_free(ct);
    return rc;
}
