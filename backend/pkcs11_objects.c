/* Public keys and certificates on a token, read by value (see pkcs11_objects.h). A public key
 * is built from its attributes in keyx's library context and encoded there; nothing of it needs
 * the token afterwards. */
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/x509.h>

#include "backend/pkcs11_attr.h"
#include "backend/pkcs11_objects.h"
#include "backend/pkcs11_pubkey.h"
#include "backend/pkcs11_rsa.h"

/* EC: CKA_EC_PARAMS and CKA_EC_POINT of the public object itself. */
static CK_RV ec_public(p11_sess *s, CK_OBJECT_HANDLE obj, OSSL_LIB_CTX *libctx, EVP_PKEY **pub)
{
    unsigned char *params = NULL, *point = NULL;
    size_t plen = 0, ptlen = 0;
    const char *group = NULL;
    CK_RV rv;

    if ((rv = p11_get_attr(s, obj, CKA_EC_PARAMS, 0, &params, &plen)) == CKR_OK &&
        (group = p11_ec_group(params, plen)) == NULL)
        rv = CKR_KEY_TYPE_INCONSISTENT; /* a curve keyx does not serve */
    if (rv == CKR_OK && (rv = p11_get_attr(s, obj, CKA_EC_POINT, 0, &point, &ptlen)) == CKR_OK &&
        (*pub = p11_ec_public(libctx, group, NULL, point, ptlen)) == NULL)
        rv = CKR_ATTRIBUTE_VALUE_INVALID;
    OPENSSL_free(params);
    OPENSSL_free(point);
    return rv;
}

/* DH: a public DH object carries p, g and y (CKA_PRIME, CKA_BASE, CKA_VALUE). */
static CK_RV dh_public(p11_sess *s, CK_OBJECT_HANDLE obj, OSSL_LIB_CTX *libctx, EVP_PKEY **pub)
{
    unsigned char *prime = NULL, *base = NULL, *y = NULL;
    size_t plen = 0, glen = 0, ylen = 0;
    CK_RV rv;

    if ((rv = p11_get_attr(s, obj, CKA_PRIME, 0, &prime, &plen)) == CKR_OK &&
        (rv = p11_get_attr(s, obj, CKA_BASE, 0, &base, &glen)) == CKR_OK &&
        (rv = p11_get_attr(s, obj, CKA_VALUE, 0, &y, &ylen)) == CKR_OK &&
        (*pub = p11_dh_public_pg(libctx, prime, plen, base, glen, y, ylen)) == NULL)
        rv = CKR_ATTRIBUTE_VALUE_INVALID;
    OPENSSL_free(prime);
    OPENSSL_free(base);
    OPENSSL_free(y);
    return rv;
}

CK_RV p11_public_spki(p11_sess *s, CK_OBJECT_HANDLE obj, OSSL_LIB_CTX *libctx, unsigned char **der,
                      size_t *len)
{
    CK_KEY_TYPE kt = 0;
    CK_ATTRIBUTE kta = {CKA_KEY_TYPE, &kt, sizeof(kt)};
    EVP_PKEY *pub = NULL;
    size_t nlen = 0;
    unsigned char *buf = NULL;
    int n;
    CK_RV rv;

    *der = NULL;
    *len = 0;
    if ((rv = s->f->C_GetAttributeValue(s->h, obj, &kta, 1)) != CKR_OK)
        return rv;
    switch (kt) {
    case CKK_EC:
        rv = ec_public(s, obj, libctx, &pub);
        break;
    case CKK_RSA:
        rv = p11_rsa_public(s, obj, libctx, &pub, &nlen);
        break;
    case CKK_DH:
        rv = dh_public(s, obj, libctx, &pub);
        break;
    default:
        return CKR_KEY_TYPE_INCONSISTENT;
    }
    if (rv != CKR_OK)
        return rv;
    if ((n = i2d_PUBKEY(pub, &buf)) <= 0)
        rv = CKR_ATTRIBUTE_VALUE_INVALID;
    EVP_PKEY_free(pub);
    if (rv == CKR_OK) {
        *der = buf;
        *len = (size_t)n;
    }
    return rv;
}

CK_RV p11_cert_read(p11_sess *s, CK_OBJECT_HANDLE obj, unsigned char **der, size_t *len,
                    unsigned char **subject, size_t *subjectlen)
{
    CK_CERTIFICATE_TYPE ct = 0;
    CK_ATTRIBUTE cta = {CKA_CERTIFICATE_TYPE, &ct, sizeof(ct)};
    CK_RV rv;

    *der = *subject = NULL;
    *len = *subjectlen = 0;
    if ((rv = s->f->C_GetAttributeValue(s->h, obj, &cta, 1)) != CKR_OK)
        return rv;
    if (ct != CKC_X_509)
        return CKR_KEY_TYPE_INCONSISTENT;
    if ((rv = p11_get_attr(s, obj, CKA_VALUE, 0, der, len)) != CKR_OK)
        return rv;
    if (*len == 0) {
        OPENSSL_free(*der);
        *der = NULL;
        return CKR_KEY_TYPE_INCONSISTENT;
    }
    /* CKA_SUBJECT is required of X.509 certificate objects; a token without it has its
     * certificates found by anything but a subject search */
    if (p11_get_attr(s, obj, CKA_SUBJECT, 0, subject, subjectlen) != CKR_OK || *subjectlen == 0) {
        OPENSSL_free(*subject);
        *subject = NULL;
        *subjectlen = 0;
    }
    return CKR_OK;
}
