/* X25519 and X448 in the software backend, through the default provider's own key management
 * and key exchange functions (OSSL_PROVIDER_query_operation) instead of EVP objects. An
 * X25519 key pair and derive cost about 1.2 million instructions; every EVP_PKEY or
 * EVP_PKEY_CTX keyx would make for them in its library context costs a method fetch and a scan
 * of OpenSSL's name map (~10,000 instructions each), which the application's own EVP layer
 * already paid once. Keys here are the default provider's key objects. */
#ifndef KEYX_BACKEND_SOFTWARE_ECX_H
#define KEYX_BACKEND_SOFTWARE_ECX_H

#include <stddef.h>

#include <openssl/core.h>
#include <openssl/types.h>

#include "backend/backend.h"

typedef struct keyx_ecx_impl keyx_ecx_impl;

/* The X25519 or X448 functions of dflt, the default provider in libctx (keyx's library
 * context); NULL when that provider does not have them. */
keyx_ecx_impl *keyx_ecx_impl_new(OSSL_LIB_CTX *libctx, OSSL_PROVIDER *dflt, keyx_alg alg);
void keyx_ecx_impl_free(keyx_ecx_impl *impl);

/* A new key pair (the default provider's key object). */
void *keyx_ecx_generate(const keyx_ecx_impl *impl);
/* The key object holding priv (raw, 32 or 56 bytes) and its public key. */
void *keyx_ecx_from_private(const keyx_ecx_impl *impl, const unsigned char *priv, size_t len);
/* Its raw public key into pub (at least 56 bytes); the length, 0 on failure. */
size_t keyx_ecx_public(const keyx_ecx_impl *impl, void *key, unsigned char *pub);
/* The shared secret with a raw peer public key (outlen: 32 or 56); 0 for a small-order peer. */
int keyx_ecx_derive(const keyx_ecx_impl *impl, void *key, const unsigned char *peer, size_t peerlen,
                    unsigned char *out, size_t outlen);
/* The complete key (private and public) as an EVP_PKEY in libctx, for what needs one (export,
 * encoders, key checks): made from the key object's parameters by fromdata. */
EVP_PKEY *keyx_ecx_pkey(const keyx_ecx_impl *impl, void *key);
void keyx_ecx_free(const keyx_ecx_impl *impl, void *key);

#endif
