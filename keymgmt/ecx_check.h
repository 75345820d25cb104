/* X25519/X448 peer check: refuse the small-order points, whose shared secret is all zeros. */
#ifndef KEYX_KEYMGMT_ECX_CHECK_H
#define KEYX_KEYMGMT_ECX_CHECK_H

#include <openssl/types.h>

#include "backend/backend.h"

/* 1 when the raw public key (32 bytes for X25519, 56 for X448) is none of the small-order
 * encodings. */
int keyx_ecx_raw_ok(keyx_alg alg, const unsigned char *raw, size_t len);

#endif
