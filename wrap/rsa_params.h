/* The parameters of an RSA asym cipher context (as OpenSSL's RSA asym cipher names them) and
 * keyx's decryption policy over them. */
#ifndef KEYX_WRAP_RSA_PARAMS_H
#define KEYX_WRAP_RSA_PARAMS_H

#include <stddef.h>

#include <openssl/core.h>

#include "backend/backend.h"
#include "provider/provctx.h"

typedef struct keyx_rsa_params {
    int pad;          /* RSA_PKCS1_PADDING (the default), RSA_PKCS1_OAEP_PADDING, ... */
    char md[64];      /* OAEP digest, canonical ("SHA256"); "" = SHA-1 */
    char mgf1_md[64]; /* MGF1 digest; "" = the OAEP digest */
    unsigned char *label;
    size_t labellen;
    unsigned int tls_client, tls_alt;
} keyx_rsa_params;

void keyx_rsa_params_reset(keyx_rsa_params *rp);
/* Frees the label (wiped). */
void keyx_rsa_params_clear(keyx_rsa_params *rp);
int keyx_rsa_params_copy(keyx_rsa_params *dst, const keyx_rsa_params *src);
int keyx_rsa_params_set(keyx_provctx *p, keyx_rsa_params *rp, const OSSL_PARAM params[]);
int keyx_rsa_params_get(const keyx_rsa_params *rp, OSSL_PARAM params[]);
const OSSL_PARAM *keyx_rsa_params_settable(void);
const OSSL_PARAM *keyx_rsa_params_gettable(void);
/* The parameters for the default provider's encryption (out: at least 5 entries). */
void keyx_rsa_params_to_ossl(const keyx_rsa_params *rp, OSSL_PARAM out[5]);
/* The backend operation for a decryption, or 0 with a clear error when keyx refuses it:
 * PKCS#1 v1.5 always; no padding and TLS padding unless the key is a software key
 * (software: its private part lives in process memory; backend: its name, for the message). */
int keyx_rsa_params_op(keyx_provctx *p, const keyx_rsa_params *rp, int software,
                       const char *backend, keyx_rsa_op *op);

#endif
