/* Domain parameters of named groups, made once per provider instance and shared.
 * libssl builds every peer key share from "paramgen with group X": without the cache each one
 * costs a new EC_GROUP (Montgomery setup, inversions) or DH parameter set. */
#ifndef KEYX_KEYMGMT_DOMAIN_CACHE_H
#define KEYX_KEYMGMT_DOMAIN_CACHE_H

#include <openssl/types.h>

#include "backend/backend.h"

typedef struct keyx_domain_cache keyx_domain_cache;

keyx_domain_cache *keyx_domain_cache_new(void);
void keyx_domain_cache_free(keyx_domain_cache *c);
/* The domain parameters of named group `name` of alg (EC or DH) in libctx, with a reference
 * for the caller; NULL (no error raised) when the group is unknown or the cache is full. The
 * EVP_PKEY is shared: callers never modify it (keyx treats public views as immutable). */
EVP_PKEY *keyx_domain_cache_get(keyx_domain_cache *c, OSSL_LIB_CTX *libctx, keyx_alg alg,
                                const char *name);

#endif
