/* RFC 9180 DHKEM: the constants of each KEM and its ExtractAndExpand, which keyx runs on the DH
 * output its backends return (only that DH needs a private key). */
#ifndef KEYX_KEM_DHKEM_SUITE_H
#define KEYX_KEM_DHKEM_SUITE_H

#include <stddef.h>
#include <stdint.h>

#include "backend/backend.h"
#include "provider/provctx.h"

typedef struct keyx_dhkem_suite {
    const char *group;  /* keyx's group name: "P-256", ..., "X25519", "X448" */
    uint16_t kem_id;    /* RFC 9180 section 7.1 */
    const char *digest; /* of the KEM's HKDF */
    size_t nsecret;     /* shared secret */
    size_t npk;         /* encoded public key = enc (uncompressed point or raw key) */
    size_t ndh;         /* one DH output */
} keyx_dhkem_suite;

#define KEYX_DHKEM_MAX_NPK 133 /* P-521 */
#define KEYX_DHKEM_MAX_NDH 66
#define KEYX_DHKEM_MAX_SECRET 64

/* The suite of a key of alg on group; NULL when DHKEM has none (other curves, DH, RSA). */
const keyx_dhkem_suite *keyx_dhkem_suite_of(keyx_alg alg, const char *group);

/* shared_secret = LabeledExpand(LabeledExtract("", "eae_prk", dh), "shared_secret", kem_context,
 * Nsecret), HKDF in keyx's library context. out: s->nsecret bytes. 0 with an error raised. */
int keyx_dhkem_extract_and_expand(keyx_provctx *p, const keyx_dhkem_suite *s,
                                  const unsigned char *dh, size_t dhlen,
                                  const unsigned char *kem_context, size_t ctxlen,
                                  unsigned char *out);

#endif
