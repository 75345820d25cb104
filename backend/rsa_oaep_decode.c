/* OpenSSL 3.0's constant-time OAEP decoder, RSA_padding_check_PKCS1_OAEP_mgf1, is deprecated
 * (the low-level RSA API) but has no replacement for a plaintext obtained elsewhere: the
 * provider-side decoder is not exported. It is used here only, for the backends' raw paths (the
 * pkcs11 backend with `pkcs11-raw-rsa = 1`, the tpm backend for keys without a scheme); keyx
 * writes no OAEP decoding of its own, since a home-made one risks exactly the timing oracle
 * (Manger's attack) this path must not have. */
#define OPENSSL_SUPPRESS_DEPRECATED

#include <limits.h>

#include <openssl/evp.h>
#include <openssl/rsa.h>

#include "backend/rsa_oaep_decode.h"

int keyx_oaep_decode(OSSL_LIB_CTX *libctx, const unsigned char *em, size_t nlen, const char *md,
                     const char *mgf1_md, const unsigned char *label, size_t labellen,
                     unsigned char *out, size_t *outlen)
{
    EVP_MD *h = EVP_MD_fetch(libctx, md, NULL);
    EVP_MD *m = EVP_MD_fetch(libctx, mgf1_md != NULL ? mgf1_md : md, NULL);
    int n = -1, rc;

    if (h == NULL || m == NULL || nlen > INT_MAX || labellen > INT_MAX || *outlen < nlen) {
        rc = -1;
    } else {
        /* flen = num = nlen: the whole encoded message, its leading zero byte included */
        n = RSA_padding_check_PKCS1_OAEP_mgf1(out, (int)nlen, em, (int)nlen, (int)nlen, label,
                                              (int)labellen, h, m);
        rc = n >= 0;
        if (rc)
            *outlen = (size_t)n;
    }
    EVP_MD_free(h);
    EVP_MD_free(m);
    return rc;
}
