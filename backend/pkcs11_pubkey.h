/* Public keys between PKCS#11 attributes and EVP_PKEYs in keyx's library context. */
#ifndef KEYX_BACKEND_PKCS11_PUBKEY_H
#define KEYX_BACKEND_PKCS11_PUBKEY_H

#include <stddef.h>

#include <openssl/types.h>

/* CKA_EC_PARAMS (DER OID) of "P-256", "P-384", "P-521"; NULL for other groups. */
const unsigned char *p11_ec_params(const char *group, size_t *len);
/* keyx's group name for a CKA_EC_PARAMS value; NULL if keyx does not serve that curve. */
const char *p11_ec_group(const unsigned char *der, size_t len);
/* Field size in bytes of "P-256"/"P-384"/"P-521" (the ECDH secret size); 0 otherwise. */
size_t p11_ec_field_bytes(const char *group);

/* The uncompressed point (04 X Y) of group in a CKA_EC_POINT value (DER OCTET STRING or the
 * raw point), copied into out (1 + 2 * 66 bytes); its length, 0 when the value is no such point. */
size_t p11_ec_point(const char *group, const unsigned char *value, size_t len, unsigned char *out);
/* The EC public key for group from a CKA_EC_POINT value (DER OCTET STRING or a raw point),
 * on a copy of domain (the group's parameters in libctx) when given, else on a new group. */
EVP_PKEY *p11_ec_public(OSSL_LIB_CTX *libctx, const char *group, const EVP_PKEY *domain,
                        const unsigned char *point, size_t len);
/* The DH public key y (big-endian) on the domain parameters of dom (a DH key in libctx). */
EVP_PKEY *p11_dh_public(OSSL_LIB_CTX *libctx, const EVP_PKEY *dom, const unsigned char *y,
                        size_t len);
/* The DH public key from CKA_PRIME, CKA_BASE and y (a static key on a token). */
EVP_PKEY *p11_dh_public_pg(OSSL_LIB_CTX *libctx, const unsigned char *p, size_t plen,
                           const unsigned char *g, size_t glen, const unsigned char *y,
                           size_t ylen);

#endif
