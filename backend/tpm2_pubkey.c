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

void tpm_ecdh_template(const tpm_curve *c, int internal, TPMT_PUBLIC *out)
{
    memset(out, 0, sizeof(*out));
    out->type = TPM2_ALG_ECC;
    out->nameAlg = TPM2_ALG_SHA256;
    out->objectAttributes = TPMA_OBJECT_DECRYPT | TPMA_OBJECT_USERWITHAUTH | TPMA_OBJECT_NODA;
    if (internal)
        out->objectAttributes |=
            TPMA_OBJECT_FIXEDTPM | TPMA_OBJECT_FIXEDPARENT | TPMA_OBJECT_SENSITIVEDATAORIGIN;
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

EVP_PKEY *tpm_ec_public(OSSL_LIB_CTX *libctx, const tpm_curve *c, const TPMS_ECC_POINT *pt)
{
    unsigned char enc[1 + 2 * 66];
    size_t len = 1 + 2 * c->field;
    OSSL_PARAM_BLD *bld = NULL;
    OSSL_PARAM *params = NULL;
    EVP_PKEY_CTX *ctx = NULL;
    EVP_PKEY *pk = NULL;

    enc[0] = 0x04;
    if (!put_coord(enc + 1, c->field, &pt->x) || !put_coord(enc + 1 + c->field, c->field, &pt->y))
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

static int get_coord(const EVP_PKEY *pk, const char *name, size_t field, TPM2B_ECC_PARAMETER *v)
{
    BIGNUM *bn = NULL;
    int ok = EVP_PKEY_get_bn_param(pk, name, &bn) == 1 && field <= sizeof(v->buffer) &&
             BN_bn2binpad(bn, v->buffer, (int)field) == (int)field;

    v->size = ok ? (UINT16)field : 0;
    BN_free(bn);
    return ok;
}

int tpm_ec_point(const EVP_PKEY *pk, const tpm_curve *c, TPMS_ECC_POINT *pt)
{
    return get_coord(pk, OSSL_PKEY_PARAM_EC_PUB_X, c->field, &pt->x) &&
           get_coord(pk, OSSL_PKEY_PARAM_EC_PUB_Y, c->field, &pt->y);
}
