/* Dispatch tables the provider entry point registers. */
#ifndef KEYX_PROVIDER_DISPATCH_H
#define KEYX_PROVIDER_DISPATCH_H

#include <openssl/core.h>

extern const OSSL_DISPATCH keyx_ec_keymgmt_functions[];
extern const OSSL_DISPATCH keyx_x25519_keymgmt_functions[];
extern const OSSL_DISPATCH keyx_x448_keymgmt_functions[];
extern const OSSL_DISPATCH keyx_dh_keymgmt_functions[];
extern const OSSL_DISPATCH keyx_rsa_keymgmt_functions[];

extern const OSSL_DISPATCH keyx_ecdh_exchange_functions[];
extern const OSSL_DISPATCH keyx_x25519_exchange_functions[];
extern const OSSL_DISPATCH keyx_x448_exchange_functions[];
extern const OSSL_DISPATCH keyx_dh_exchange_functions[];

extern const OSSL_DISPATCH keyx_rsa_asym_cipher_functions[];
extern const OSSL_DISPATCH keyx_rsa_kem_functions[];

extern const OSSL_DISPATCH keyx_store_functions[];

int keyx_get_capabilities(void *provctx, const char *capability, OSSL_CALLBACK *cb, void *arg);

#endif
