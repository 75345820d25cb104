/* keyx's own key generation parameters: the backend that must make the key (keyx-backend) and
 * where a persistent key lives (keyx-persist, keyx-label, keyx-id). */
#ifndef KEYX_KEYMGMT_GEN_TARGET_H
#define KEYX_KEYMGMT_GEN_TARGET_H

#include <openssl/core.h>

#include "backend/backend.h"
#include "provider/config.h"

typedef struct keyx_gen_target {
    int named; /* 1: kind names the backend that must generate (no routing) */
    keyx_backend_kind kind;
    int persistent; /* 1: persist is filled in */
    keyx_persist persist;
    unsigned char id[64]; /* storage of persist.id */
} keyx_gen_target;

/* The keyx parameters that gen_settable_params adds to the default provider's. */
const OSSL_PARAM *keyx_gen_target_settable(void);
/* Reads them from params (absent: t->named = t->persistent = 0). keyx-persist implies the tpm,
 * keyx-label/keyx-id imply pkcs11; a contradiction with keyx-backend, a bad handle or a bad id is
 * an error (0, raised). persist.label points into params. */
int keyx_gen_target_parse(struct keyx_provctx *p, const OSSL_PARAM params[], keyx_gen_target *t);

#endif
