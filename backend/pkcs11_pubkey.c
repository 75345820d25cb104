#include <string.h>

#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>

#include "backend/pkcs11_pubkey.h"

static const struct curve {
    const char *group, *openssl;
    size_t field;
    unsigned char der[10];
    size_t derlen;
} curves[] = {
    {"P-256", "prime256v1", 32, {0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07}, 10},
    {"P-384", "secp384r1", 48, {0x06, 0x05, 0x2B, 0x81, 0x04, 0x00, 0x22}, 7},
    {"P-521", "secp521r1", 66, {0x06, 0x05, 0x2B, 0x81, 0x04, 0x00, 0x23}, 7},
};

static const struct curve *curve_by_group(const char *group)
{
    for (size_t i = 0; group != NULL && i < sizeof(curves) / sizeof(curves[0]); i++)
        if (strcmp(group, curves[i].group) == 0)
            return &curves[i];
    return NULL;
}

const unsigned char *p11_ec_params(const char *group, size_t *len)
{
    const struct curve *c = curve_by_group(group);

    if (c == NULL)
        return NULL;
    *len = c->derlen;
    return c->der;
}

const char *p11_ec_group(const unsigned char *der, size_t len)
{
    for (size_t i = 0; i < sizeof(curves) / sizeof(curves[0]); i++)
        if (len == curves[i].derlen && memcmp(der, curves[i].der, len) == 0)
            return curves[i].group;
    return NULL;
}

size_t p11_ec_field_bytes(const char *group)
{
    const struct curve *c = curve_by_group(group);

    return c != NULL ? c->field : 0;
}

/* PKCS#11 says CKA_EC_POINT is a DER OCTET STRING; some modules give the raw point. The raw
 * uncompressed size tells them apart (a raw point may also start with 0x04). */
static int unwrap_point(const struct curve *c, const unsigned char **pt, size_t *len)
{
    const unsigned char *p = *pt;
    size_t n = *len, body;

    if (n == 1 + 2 * c->field && p[0] == 0x04)
        return 1;
    if (n < 2 || p[0] != 0x04)
        return 0;
    if (p[1] < 0x80) {
        body = p[1];
        p += 2;
        n -= 2;
    } else if (p[1] == 0x81 && n >= 3) {
        body = p[2];
        p += 3;
        n -= 3;
    } else {
        return 0;
    }
    if (body != n)
        return 0;
    *pt = p;
    *len = n;
    return 1;
}

static EVP_PKEY *from_params(OSSL_LIB_CTX *libctx, const char *alg, OSSL_PARAM_BLD *bld)
{
    OSSL_PARAM *params = OSSL_PARAM_BLD_to_param(bld);
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_name(libctx, alg, NULL);
    EVP_PKEY *pk = NULL;

    if (params == NULL || ctx == NULL || EVP_PKEY_fromdata_init(ctx) != 1 ||
        EVP_PKEY_fromdata(ctx, &pk, EVP_PKEY_PUBLIC_KEY, params) != 1)
        pk = NULL;
    EVP_PKEY_CTX_free(ctx);
    OSSL_PARAM_free(params);
    return pk;
}

size_t p11_ec_point(const char *group, const unsigned char *value, size_t len, unsigned char *out)
{
    const struct curve *c = curve_by_group(group);

    if (c == NULL || !unwrap_point(c, &value, &len) || len != 1 + 2 * c->field || value[0] != 0x04)
        return 0;
    memcpy(out, value, len);
    return len;
}

EVP_PKEY *p11_ec_public(OSSL_LIB_CTX *libctx, const char *group, const EVP_PKEY *domain,
                        const unsigned char *point, size_t len)
{
    const struct curve *c = curve_by_group(group);
    OSSL_PARAM_BLD *bld;
    EVP_PKEY *pk = NULL;

    if (c == NULL || !unwrap_point(c, &point, &len))
        return NULL;
    if (domain != NULL) {
        /* a copy of the group keyx already has is far cheaper than a new one from its name */
        if ((pk = EVP_PKEY_dup((EVP_PKEY *)domain)) != NULL &&
            EVP_PKEY_set1_encoded_public_key(pk, point, len) != 1) {
            EVP_PKEY_free(pk);
            pk = NULL;
        }
        return pk;
    }
    if ((bld = OSSL_PARAM_BLD_new()) == NULL)
        return NULL;
    if (OSSL_PARAM_BLD_push_utf8_string(bld, OSSL_PKEY_PARAM_GROUP_NAME, c->openssl, 0) &&
        OSSL_PARAM_BLD_push_octet_string(bld, OSSL_PKEY_PARAM_PUB_KEY, point, len))
        pk = from_params(libctx, "EC", bld);
    OSSL_PARAM_BLD_free(bld);
    return pk;
}

EVP_PKEY *p11_dh_public(OSSL_LIB_CTX *libctx, const EVP_PKEY *dom, const unsigned char *y,
                        size_t len)
{
    OSSL_PARAM *domain = NULL, *params = NULL, *merged = NULL;
    OSSL_PARAM_BLD *bld = OSSL_PARAM_BLD_new();
    /* X9.42 domains (q known) stay X9.42: the key keeps the type it was asked for. */
    EVP_PKEY_CTX *ctx =
        EVP_PKEY_CTX_new_from_name(libctx, EVP_PKEY_is_a(dom, "DHX") ? "DHX" : "DH", NULL);
    BIGNUM *ybn = BN_bin2bn(y, (int)len, NULL);
    EVP_PKEY *pk = NULL;

    /* The domain as the default provider exports it (group name or p, g, q), plus y. */
    if (bld != NULL && ctx != NULL && ybn != NULL &&
        EVP_PKEY_todata(dom, EVP_PKEY_KEY_PARAMETERS, &domain) == 1 &&
        OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_PUB_KEY, ybn) &&
        (params = OSSL_PARAM_BLD_to_param(bld)) != NULL &&
        (merged = OSSL_PARAM_merge(domain, params)) != NULL && EVP_PKEY_fromdata_init(ctx) == 1 &&
        EVP_PKEY_fromdata(ctx, &pk, EVP_PKEY_PUBLIC_KEY, merged) != 1)
        pk = NULL;
    OSSL_PARAM_free(merged);
    OSSL_PARAM_free(params);
    OSSL_PARAM_free(domain);
    OSSL_PARAM_BLD_free(bld);
    EVP_PKEY_CTX_free(ctx);
    BN_free(ybn);
    return pk;
}

EVP_PKEY *p11_dh_public_pg(OSSL_LIB_CTX *libctx, const unsigned char *p, size_t plen,
                           const unsigned char *g, size_t glen, const unsigned char *y, size_t ylen)
{
    OSSL_PARAM_BLD *bld = OSSL_PARAM_BLD_new();
    BIGNUM *pb = BN_bin2bn(p, (int)plen, NULL), *gb = BN_bin2bn(g, (int)glen, NULL);
    BIGNUM *yb = BN_bin2bn(y, (int)ylen, NULL);
    EVP_PKEY *pk = NULL;

    if (bld != NULL && pb != NULL && gb != NULL && yb != NULL &&
        OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_FFC_P, pb) &&
        OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_FFC_G, gb) &&
        OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_PUB_KEY, yb))
        pk = from_params(libctx, "DH", bld);
    OSSL_PARAM_BLD_free(bld);
    BN_free(pb);
    BN_free(gb);
    BN_free(yb);
    return pk;
}
