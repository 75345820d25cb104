/* The default provider's key management in keyx's library context, fetched once: keyx answers
 * parameter tables and parameter values exactly as the default provider does. */
#ifndef KEYX_KEYMGMT_ALGTAB_H
#define KEYX_KEYMGMT_ALGTAB_H

#include <openssl/evp.h>

#include "backend/backend.h"

struct keyx_provctx;

typedef struct keyx_algtab {
    EVP_KEYMGMT *km[KEYX_ALG_COUNT];
    /* The default provider's generation parameters plus keyx's own (keymgmt/gen_target.h) */
    OSSL_PARAM *gen_settable[KEYX_ALG_COUNT];
    /* X25519/X448: contexts ready for EVP_PKEY_fromdata, shared by all threads (fromdata only
     * reads the context), so that a peer's public key costs no method fetch */
    EVP_PKEY_CTX *fromdata[KEYX_ALG_COUNT];
    EVP_MD *sha256; /* audit key ids */
    /* The default provider's signatures: keyx answers their parameter tables (signature/) */
    EVP_SIGNATURE *ecdsa, *rsa_sig;
    EVP_KDF *hkdf; /* DHKEM's labelled HKDF (kem/): two derivations per encapsulation */
} keyx_algtab;

int keyx_algtab_new(struct keyx_provctx *p);
void keyx_algtab_free(keyx_algtab *t);

#endif
