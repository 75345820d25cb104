/* Token objects read by value for keyx's STORE: public keys as SubjectPublicKeyInfo, X.509
 * certificates as their DER. */
#ifndef KEYX_BACKEND_PKCS11_OBJECTS_H
#define KEYX_BACKEND_PKCS11_OBJECTS_H

#include <stddef.h>

#include <openssl/types.h>

#include "backend/pkcs11_device.h"

/* The public key object obj (EC on P-256/P-384/P-521, RSA, DH) as DER SubjectPublicKeyInfo in a
 * new buffer (OPENSSL_free). CKR_KEY_TYPE_INCONSISTENT for a key keyx cannot read (another key
 * type or curve): the caller passes it over. */
CK_RV p11_public_spki(p11_sess *s, CK_OBJECT_HANDLE obj, OSSL_LIB_CTX *libctx, unsigned char **der,
                      size_t *len);

/* The certificate object obj: its CKA_VALUE and CKA_SUBJECT (NULL, 0 when the token has none),
 * new buffers. CKR_KEY_TYPE_INCONSISTENT for a certificate that is not X.509 or has no value. */
CK_RV p11_cert_read(p11_sess *s, CK_OBJECT_HANDLE obj, unsigned char **der, size_t *len,
                    unsigned char **subject, size_t *subjectlen);

#endif
