/* Dispatch tables the provider entry point registers. */
#ifndef KEYX_PROVIDER_DISPATCH_H
#define KEYX_PROVIDER_DISPATCH_H

#include <openssl/core.h>

extern const OSSL_DISPATCH keyx_ec_keymgmt_functions[];
extern const OSSL_DISPATCH keyx_x25519_keymgmt_functions[];
extern const OSSL_DISPATCH keyx_x448_keymgmt_functions[];
extern const OSSL_DISPATCH keyx_dh_keymgmt_functions[];
extern const OSSL_DISPATCH keyx_dhx_keymgmt_functions[];
extern const OSSL_DISPATCH keyx_rsa_keymgmt_functions[];

extern const OSSL_DISPATCH keyx_ecdh_exchange_functions[];
extern const OSSL_DISPATCH keyx_x25519_exchange_functions[];
extern const OSSL_DISPATCH keyx_x448_exchange_functions[];
extern const OSSL_DISPATCH keyx_dh_exchange_functions[];

extern const OSSL_DISPATCH keyx_rsa_asym_cipher_functions[];
extern const OSSL_DISPATCH keyx_rsa_kem_functions[];
/* kem/dhkem.c (OpenSSL >= 3.2) */
extern const OSSL_DISPATCH keyx_ec_dhkem_functions[];
extern const OSSL_DISPATCH keyx_x25519_dhkem_functions[];
extern const OSSL_DISPATCH keyx_x448_dhkem_functions[];

extern const OSSL_DISPATCH keyx_store_functions[];

extern const OSSL_DISPATCH keyx_ecdsa_signature_functions[];
extern const OSSL_DISPATCH keyx_rsa_signature_functions[];

/* encode/dispatch.c: key reference files, public keys, text */
extern const OSSL_DISPATCH keyx_pem_to_der_decoder[];
/* keyx's key files as DER, handed on with their load's errors (encode/der_decoder.c) */
extern const OSSL_DISPATCH keyx_der_to_der_decoder[];
extern const OSSL_DISPATCH keyx_ec_to_keyref_der_encoder[];
extern const OSSL_DISPATCH keyx_ec_to_keyref_pem_encoder[];
extern const OSSL_DISPATCH keyx_ec_to_spki_der_encoder[];
extern const OSSL_DISPATCH keyx_ec_to_spki_pem_encoder[];
extern const OSSL_DISPATCH keyx_ec_to_text_encoder[];
extern const OSSL_DISPATCH keyx_keyref_der_to_ec_decoder[];
extern const OSSL_DISPATCH keyx_x25519_to_keyref_der_encoder[];
extern const OSSL_DISPATCH keyx_x25519_to_keyref_pem_encoder[];
extern const OSSL_DISPATCH keyx_x25519_to_spki_der_encoder[];
extern const OSSL_DISPATCH keyx_x25519_to_spki_pem_encoder[];
extern const OSSL_DISPATCH keyx_x25519_to_text_encoder[];
extern const OSSL_DISPATCH keyx_keyref_der_to_x25519_decoder[];
extern const OSSL_DISPATCH keyx_x448_to_keyref_der_encoder[];
extern const OSSL_DISPATCH keyx_x448_to_keyref_pem_encoder[];
extern const OSSL_DISPATCH keyx_x448_to_spki_der_encoder[];
extern const OSSL_DISPATCH keyx_x448_to_spki_pem_encoder[];
extern const OSSL_DISPATCH keyx_x448_to_text_encoder[];
extern const OSSL_DISPATCH keyx_keyref_der_to_x448_decoder[];
extern const OSSL_DISPATCH keyx_dh_to_keyref_der_encoder[];
extern const OSSL_DISPATCH keyx_dh_to_keyref_pem_encoder[];
extern const OSSL_DISPATCH keyx_dh_to_spki_der_encoder[];
extern const OSSL_DISPATCH keyx_dh_to_spki_pem_encoder[];
extern const OSSL_DISPATCH keyx_dh_to_text_encoder[];
extern const OSSL_DISPATCH keyx_keyref_der_to_dh_decoder[];
extern const OSSL_DISPATCH keyx_dhx_to_keyref_der_encoder[];
extern const OSSL_DISPATCH keyx_dhx_to_keyref_pem_encoder[];
extern const OSSL_DISPATCH keyx_dhx_to_spki_der_encoder[];
extern const OSSL_DISPATCH keyx_dhx_to_spki_pem_encoder[];
extern const OSSL_DISPATCH keyx_dhx_to_text_encoder[];
extern const OSSL_DISPATCH keyx_keyref_der_to_dhx_decoder[];
extern const OSSL_DISPATCH keyx_rsa_to_keyref_der_encoder[];
extern const OSSL_DISPATCH keyx_rsa_to_keyref_pem_encoder[];
extern const OSSL_DISPATCH keyx_rsa_to_spki_der_encoder[];
extern const OSSL_DISPATCH keyx_rsa_to_spki_pem_encoder[];
extern const OSSL_DISPATCH keyx_rsa_to_text_encoder[];
extern const OSSL_DISPATCH keyx_keyref_der_to_rsa_decoder[];

/* encode/tss2_decoder.c: TSS2 PRIVATE KEY files (tpm backend) */
extern const OSSL_DISPATCH keyx_tss2_der_to_ec_decoder[];
extern const OSSL_DISPATCH keyx_tss2_der_to_rsa_decoder[];

int keyx_get_capabilities(void *provctx, const char *capability, OSSL_CALLBACK *cb, void *arg);
/* The openssl.cnf `Groups` value (system_default section) that lists exactly the TLS groups the
 * configured backends serve, for the running OpenSSL version; 0 if none or buf is too small. */
struct keyx_router;
int keyx_tls_groups_line(struct keyx_router *router, char *buf, size_t len);

#endif
