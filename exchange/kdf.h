/* The KDF a key exchange may apply to its shared secret Z, as the default provider's exchanges
 * offer it: X9.63 (ECDH, "X963KDF") and X9.42 ASN.1 (DH, "X942KDF-ASN1"), used by CMS and
 * S/MIME key agreement. Z comes from the key's backend; the KDF runs in keyx's library context. */
#ifndef KEYX_EXCHANGE_KDF_H
#define KEYX_EXCHANGE_KDF_H

#include <stddef.h>

#include <openssl/core.h>
#include <openssl/types.h>

#include "provider/provctx.h"

typedef enum keyx_kdf_type {
    KEYX_KDF_NONE = 0,
    KEYX_KDF_X963,     /* ECDH */
    KEYX_KDF_X942_ASN1 /* DH */
} keyx_kdf_type;

typedef struct keyx_kdf {
    keyx_kdf_type type;
    EVP_MD *md; /* fetched in keyx's libctx with the application's kdf-digest-props */
    size_t outlen;
    unsigned char *ukm;
    size_t ukmlen;
    char *cekalg; /* X9.42: the key-encryption algorithm the output is for */
} keyx_kdf;

/* Takes kdf-type, kdf-digest (+ kdf-digest-props), kdf-outlen, kdf-ukm and, for X9.42, cekalg
 * from params; `offered` is the one KDF this exchange has (KEYX_KDF_NONE: none). */
int keyx_kdf_set_params(keyx_provctx *p, keyx_kdf *k, keyx_kdf_type offered,
                        const OSSL_PARAM params[]);
/* Answers the same parameters (cekalg only when the exchange offers X9.42). */
int keyx_kdf_get_params(const keyx_kdf *k, keyx_kdf_type offered, OSSL_PARAM params[]);

/* Deep copy for dupctx; on failure dst is left cleared. */
int keyx_kdf_copy(keyx_kdf *dst, const keyx_kdf *src);
void keyx_kdf_clear(keyx_kdf *k);

/* Whether k has what its KDF needs (digest, outlen, cekalg); raises the error naming what is
 * missing. */
int keyx_kdf_check(keyx_provctx *p, const keyx_kdf *k);

/* Writes k->outlen bytes of KDF(Z) to out. The caller wipes Z. */
int keyx_kdf_derive(keyx_provctx *p, const keyx_kdf *k, const unsigned char *z, size_t zlen,
                    unsigned char *out);

#endif
