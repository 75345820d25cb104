/* OAEP decoding in keyx, for devices that decrypt RSA raw but refuse the OAEP parameters the
 * application asked for: a PKCS#11 token's CKM_RSA_X_509 (`pkcs11-raw-rsa = 1`), a TPM's
 * TPM2_RSA_Decrypt with the null scheme (keys without a scheme of their own). */
#ifndef KEYX_BACKEND_RSA_OAEP_DECODE_H
#define KEYX_BACKEND_RSA_OAEP_DECODE_H

#include <stddef.h>

#include <openssl/types.h>

/* em: the raw RSA plaintext, exactly the modulus size (nlen bytes, leading zeros kept). md and
 * mgf1_md are digest names fetched in libctx. Writes the message to out (capacity *outlen,
 * at least nlen) and its length to *outlen. Constant time in em; 1 on success, 0 when em is
 * no valid OAEP encoding for these parameters (any cause alike), -1 for an unknown digest. */
int keyx_oaep_decode(OSSL_LIB_CTX *libctx, const unsigned char *em, size_t nlen, const char *md,
                     const char *mgf1_md, const unsigned char *label, size_t labellen,
                     unsigned char *out, size_t *outlen);

#endif
