/* TPM ECC public areas <-> OpenSSL EC keys (see tpm2_pubkey.h). */
#include <string.h>

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>

#include "backend/tpm2_pubkey.h"

static const tpm_curve curves[] = {
    {"P-256", "prime256v1", TPM2_ECC_NIST_P256, 32},
    {"P-384", "secp384r1", TPM2_ECC_NIST_P384, 48},
    {"P-521", "secp521r1", TPM2_ECC_NIST_P521, 66},
};

#define NCURVES (sizeof(curves) / sizeof(curves[0]))

const tpm_curve *tpm_curve_by_group(const char *group)
{
    for (size_t i = 0; group != NULL && i < NCURVES; i++)
        if (strcmp(group, curves[i].group) == 0 || strcmp(group, curves[i].openssl) == 0)
            return &curves[i];
    return NULL;
}

const tpm_curve *tpm_curve_by_id(TPM2_ECC_CURVE id)
{
    for (size_t i = 0; i < NCURVES; i++)
        if (curves[i].id == id)
            return &curves[i];
    return NULL;
}

const tpm_curve *tpm_curve_of(const EVP_PKEY *pk)
{
    char name[64];

    if (!EVP_PKEY_is_a(pk, "EC") || EVP_PKEY_get_utf8_string_param(pk, OSSL_PKEY_PARAM_GROUP_NAME,
                                                                   name, sizeof(name), NULL) != 1)
        return NULL;
    /* "P-256" is an alias the default provider may report as well as "prime256v1". */
    return tpm_curve_by_group(name);
}

/* What every key keyx makes or imports shares: a decrypt key without a symmetric algorithm or
 * scheme of its own, SHA-256 names, password auth, no dictionary-attack lockout; internal keys
 * (made in the TPM) also never leave it. */
static void decrypt_key(TPMI_ALG_PUBLIC type, int internal, TPMT_PUBLIC *out)
{
    memset(out, 0, sizeof(*out));
    out->type = type;
    out->nameAlg = TPM2_ALG_SHA256;
    out->objectAttributes = TPMA_OBJECT_DECRYPT | TPMA_OBJECT_USERWITHAUTH | TPMA_OBJECT_NODA;
    if (internal)
        out->objectAttributes |=
            TPMA_OBJECT_FIXEDTPM | TPMA_OBJECT_FIXEDPARENT | TPMA_OBJECT_SENSITIVEDATAORIGIN;
}

void tpm_ecdh_template(const tpm_curve *c, int internal, TPMT_PUBLIC *out)
{
    decrypt_key(TPM2_ALG_ECC, internal, out);
    out->parameters.eccDetail.symmetric.algorithm = TPM2_ALG_NULL;
    out->parameters.eccDetail.scheme.scheme = TPM2_ALG_NULL;
    out->parameters.eccDetail.curveID = c->id;
    out->parameters.eccDetail.kdf.scheme = TPM2_ALG_NULL;
}

void tpm_storage_template(TPMT_PUBLIC *out)
{
    memset(out, 0, sizeof(*out));
    out->type = TPM2_ALG_ECC;
    out->nameAlg = TPM2_ALG_SHA256;
    out->objectAttributes = TPMA_OBJECT_RESTRICTED | TPMA_OBJECT_DECRYPT | TPMA_OBJECT_FIXEDTPM |
                            TPMA_OBJECT_FIXEDPARENT | TPMA_OBJECT_SENSITIVEDATAORIGIN |
                            TPMA_OBJECT_USERWITHAUTH | TPMA_OBJECT_NODA;
    out->parameters.eccDetail.symmetric.algorithm = TPM2_ALG_AES;
    out->parameters.eccDetail.symmetric.keyBits.aes = 128;
    out->parameters.eccDetail.symmetric.mode.aes = TPM2_ALG_CFB;
    out->parameters.eccDetail.scheme.scheme = TPM2_ALG_NULL;
    out->parameters.eccDetail.curveID = TPM2_ECC_NIST_P256;
    out->parameters.eccDetail.kdf.scheme = TPM2_ALG_NULL;
}

/* A coordinate as field-size big-endian bytes (a TPM may strip leading zeros). */
static int put_coord(unsigned char *dst, size_t field, const TPM2B_ECC_PARAMETER *v)
{
    if (v->size == 0 || v->size > field || v->size > sizeof(v->buffer))
        return 0;
    memset(dst, 0, field - v->size);
    memcpy(dst + field - v->size, v->buffer, v->size);
    return 1;
}

/* The uncompressed encoding 0x04 || x || y of pt into enc (1 + 2 * 66 bytes); its length, 0 if
 * a coordinate does not fit c. */
static size_t encode_point(const tpm_curve *c, const TPMS_ECC_POINT *pt, unsigned char *enc)
{
    enc[0] = 0x04;
    return put_coord(enc + 1, c->field, &pt->x) && put_coord(enc + 1 + c->field, c->field, &pt->y)
               ? 1 + 2 * c->field
               : 0;
}

EVP_PKEY *tpm_ec_public(OSSL_LIB_CTX *libctx, const tpm_curve *c, const TPMS_ECC_POINT *pt)
{
    unsigned char enc[1 + 2 * 66];
    size_t len = encode_point(c, pt, enc);
    OSSL_PARAM_BLD *bld = NULL;
    OSSL_PARAM *params = NULL;
    EVP_PKEY_CTX *ctx = NULL;
    EVP_PKEY *pk = NULL;

    if (len == 0)
        return NULL;
    if ((bld = OSSL_PARAM_BLD_new()) != NULL &&
        OSSL_PARAM_BLD_push_utf8_string(bld, OSSL_PKEY_PARAM_GROUP_NAME, c->openssl, 0) &&
        OSSL_PARAM_BLD_push_octet_string(bld, OSSL_PKEY_PARAM_PUB_KEY, enc, len) &&
        (params = OSSL_PARAM_BLD_to_param(bld)) != NULL &&
        (ctx = EVP_PKEY_CTX_new_from_name(libctx, "EC", NULL)) != NULL &&
        EVP_PKEY_fromdata_init(ctx) == 1 &&
        EVP_PKEY_fromdata(ctx, &pk, EVP_PKEY_PUBLIC_KEY, params) != 1)
        pk = NULL;
    EVP_PKEY_CTX_free(ctx);
    OSSL_PARAM_free(params);
    OSSL_PARAM_BLD_free(bld);
    return pk;
}

EVP_PKEY *tpm_ec_public_from(const EVP_PKEY *domain, OSSL_LIB_CTX *libctx, const tpm_curve *c,
                             const TPMS_ECC_POINT *pt)
{
    unsigned char enc[1 + 2 * 66];
    size_t len;
    EVP_PKEY *pk;

    if (domain == NULL)
        return tpm_ec_public(libctx, c, pt);
    if ((len = encode_point(c, pt, enc)) == 0)
        return NULL;
    if ((pk = EVP_PKEY_dup((EVP_PKEY *)domain)) != NULL &&
        EVP_PKEY_set1_encoded_public_key(pk, enc, len) != 1) {
        EVP_PKEY_free(pk);
        pk = NULL;
    }
    return pk;
}

static int get_coord(const EVP_PKEY *pk, const char *name, size_t field, TPM2B_ECC_PARAMETER *v)
{
    BIGNUM *bn = NULL;
    int ok = EVP_PKEY_get_bn_param(pk, name, &bn) == 1 && field <= sizeof(v->buffer) &&
             BN_bn2binpad(bn, v->buffer, (int)field) == (int)field;

    v->size = ok ? (UINT16)field : 0;
    BN_free(bn);
    return ok;
}

int tpm_ec_point_decode(const unsigned char *enc, size_t len, const tpm_curve *c,
                        TPMS_ECC_POINT *pt)
{
    if (c->field > sizeof(pt->x.buffer) || len != 1 + 2 * c->field || enc[0] != 0x04)
        return 0;
    memcpy(pt->x.buffer, enc + 1, c->field);
    memcpy(pt->y.buffer, enc + 1 + c->field, c->field);
    pt->x.size = pt->y.size = (UINT16)c->field;
    return 1;
}

/* The point from the key's encoding (one parameter read) when it is uncompressed, as every TLS
 * peer's is; else from its coordinates. The encoding is much the cheaper: each coordinate read
 * is a conversion to affine and a BIGNUM padded into OpenSSL's 2048-byte parameter buffer, about
 * 100,000 instructions each, which was most of keyx's own work per TPM derive. */
int tpm_ec_point(const EVP_PKEY *pk, const tpm_curve *c, TPMS_ECC_POINT *pt)
{
    unsigned char enc[1 + 2 * 66];
    size_t len = 0;

    if (EVP_PKEY_get_octet_string_param(pk, OSSL_PKEY_PARAM_PUB_KEY, enc, sizeof(enc), &len) == 1 &&
        tpm_ec_point_decode(enc, len, c, pt))
        return 1;
    return get_coord(pk, OSSL_PKEY_PARAM_EC_PUB_X, c->field, &pt->x) &&
           get_coord(pk, OSSL_PKEY_PARAM_EC_PUB_Y, c->field, &pt->y);
}

/* ---- RSA --------------------------------------------------------------------------------- */

void tpm_rsa_template(size_t bits, uint32_t exponent, int internal, TPMT_PUBLIC *out)
{
    decrypt_key(TPM2_ALG_RSA, internal, out);
    out->parameters.rsaDetail.symmetric.algorithm = TPM2_ALG_NULL;
    /* No scheme in the key: each TPM2_RSA_Decrypt names its own (OAEP with a hash, or none). */
    out->parameters.rsaDetail.scheme.scheme = TPM2_ALG_NULL;
    out->parameters.rsaDetail.keyBits = (TPM2_KEY_BITS)bits;
    out->parameters.rsaDetail.exponent = exponent == 65537 ? 0 : exponent;
}

EVP_PKEY *tpm_rsa_public(OSSL_LIB_CTX *libctx, const TPMT_PUBLIC *area)
{
    const TPM2B_PUBLIC_KEY_RSA *n = &area->unique.rsa;
    uint32_t e =
        area->parameters.rsaDetail.exponent != 0 ? area->parameters.rsaDetail.exponent : 65537;
    OSSL_PARAM_BLD *bld = NULL;
    OSSL_PARAM *params = NULL;
    EVP_PKEY_CTX *ctx = NULL;
    EVP_PKEY *pk = NULL;
    BIGNUM *bn = NULL, *be = NULL;

    if (area->type != TPM2_ALG_RSA || n->size == 0 || n->size > sizeof(n->buffer))
        return NULL;
    if ((bn = BN_bin2bn(n->buffer, n->size, NULL)) != NULL && (be = BN_new()) != NULL &&
        BN_set_word(be, e) && (bld = OSSL_PARAM_BLD_new()) != NULL &&
        OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_N, bn) &&
        OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_E, be) &&
        (params = OSSL_PARAM_BLD_to_param(bld)) != NULL &&
        (ctx = EVP_PKEY_CTX_new_from_name(libctx, "RSA", NULL)) != NULL &&
        EVP_PKEY_fromdata_init(ctx) == 1 &&
        EVP_PKEY_fromdata(ctx, &pk, EVP_PKEY_PUBLIC_KEY, params) != 1)
        pk = NULL;
    EVP_PKEY_CTX_free(ctx);
    OSSL_PARAM_free(params);
    OSSL_PARAM_BLD_free(bld);
    BN_free(bn);
    BN_free(be);
    return pk;
}

int tpm_rsa_area(const EVP_PKEY *pk, TPMT_PUBLIC *area, TPM2B_PRIVATE_KEY_RSA *prime)
{
    BIGNUM *n = NULL, *e = NULL, *p = NULL;
    int bits = EVP_PKEY_get_bits(pk), nlen = (bits + 7) / 8, ok;

    ok = EVP_PKEY_is_a(pk, "RSA") && (bits == 2048 || bits == 3072 || bits == 4096) &&
         EVP_PKEY_get_bn_param(pk, OSSL_PKEY_PARAM_RSA_N, &n) == 1 &&
         EVP_PKEY_get_bn_param(pk, OSSL_PKEY_PARAM_RSA_E, &e) == 1 && BN_num_bits(e) <= 32 &&
         (prime == NULL || EVP_PKEY_get_bn_param(pk, OSSL_PKEY_PARAM_RSA_FACTOR1, &p) == 1);
    if (ok) {
        tpm_rsa_template((size_t)bits, (uint32_t)BN_get_word(e), 0, area);
        ok = BN_bn2binpad(n, area->unique.rsa.buffer, nlen) == nlen;
        area->unique.rsa.size = (UINT16)nlen;
    }
    if (ok && prime != NULL) {
        ok = BN_num_bytes(p) == nlen / 2 && BN_bn2binpad(p, prime->buffer, nlen / 2) == nlen / 2;
        prime->size = (UINT16)(nlen / 2);
    }
    BN_free(n);
    BN_free(e);
    BN_clear_free(p);
    return ok;
}
