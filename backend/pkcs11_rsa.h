/* RSA in the pkcs11 backend: key pairs and imports as session objects, the public part of a
 * token key, and decryption (CKM_RSA_PKCS_OAEP; CKM_RSA_X_509 for RSASVE and, with
 * `pkcs11-raw-rsa = 1`, for OAEP parameters the token refuses). backend/pkcs11.c calls these
 * for CKK_RSA keys; sessions come from and go back to backend/pkcs11_device.c. */
#ifndef KEYX_BACKEND_PKCS11_RSA_H
#define KEYX_BACKEND_PKCS11_RSA_H

#include "backend/backend.h"
#include "backend/pkcs11_attr.h"
#include "backend/pkcs11_device.h"

/* RSA key pairs of bits (2048, 3072, 4096) within what the token generates. */
int p11_rsa_supports(const p11_caps *caps, size_t bits);

/* The next three give the session back (p11_session_put) and return 1, 0 or
 * KEYX_BACKEND_DOWN with an error raised, as the backend contract's generate/import do. */
/* name: NULL for an ephemeral key (session objects), else the token key's label and id. */
int p11_rsa_generate(p11_sess *s, const keyx_keyspec *spec, const p11_name *name,
                     CK_OBJECT_HANDLE *priv, EVP_PKEY **pub);
/* key: a complete RSA private key in keyx's libctx; *pub: its public part only. */
int p11_rsa_import(p11_sess *s, EVP_PKEY *key, CK_OBJECT_HANDLE *obj, EVP_PKEY **pub);
/* rsa_decrypt of the contract for the private key obj of nlen modulus bytes. */
int p11_rsa_decrypt(p11_sess *s, CK_OBJECT_HANDLE obj, size_t nlen, const keyx_rsa_op *op,
                    const unsigned char *in, size_t inlen, unsigned char *out, size_t *outlen);

/* Public key of a token's RSA private key from its CKA_MODULUS and CKA_PUBLIC_EXPONENT; keeps
 * the session. *nlen: the modulus size in bytes. */
CK_RV p11_rsa_public(p11_sess *s, CK_OBJECT_HANDLE priv, OSSL_LIB_CTX *libctx, EVP_PKEY **pub,
                     size_t *nlen);

#endif
