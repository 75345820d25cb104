/* Key management operations shared by every algorithm keyx registers; keymgmt/dispatch.c binds
 * them to one table per algorithm. */
#ifndef KEYX_KEYMGMT_KEYMGMT_H
#define KEYX_KEYMGMT_KEYMGMT_H

#include <openssl/core.h>

#include "backend/backend.h"
#include "provider/provctx.h"

void *keyx_km_new(keyx_provctx *p, keyx_alg alg);
void keyx_km_free(void *keydata);
int keyx_km_has(const void *keydata, int selection);
int keyx_km_validate(const void *keydata, int selection, int checktype);
int keyx_km_match(const void *keydata1, const void *keydata2, int selection);
int keyx_km_import(void *keydata, int selection, const OSSL_PARAM params[]);
int keyx_km_export(void *keydata, int selection, OSSL_CALLBACK *cb, void *cbarg);
int keyx_km_get_params(void *keydata, OSSL_PARAM params[]);
const OSSL_PARAM *keyx_km_gettable_params(keyx_provctx *p, keyx_alg alg);
int keyx_km_set_params(void *keydata, const OSSL_PARAM params[]);
const OSSL_PARAM *keyx_km_settable_params(keyx_provctx *p, keyx_alg alg);
void *keyx_km_dup(const void *keydata, int selection);
void *keyx_km_load(const void *reference, size_t reference_sz);

void *keyx_km_gen_init(keyx_provctx *p, keyx_alg alg, int selection, const OSSL_PARAM params[]);
int keyx_km_gen_set_template(void *genctx, void *templ);
int keyx_km_gen_set_params(void *genctx, const OSSL_PARAM params[]);
const OSSL_PARAM *keyx_km_gen_settable_params(keyx_provctx *p, keyx_alg alg);
void *keyx_km_gen(void *genctx, OSSL_CALLBACK *cb, void *cbarg);
void keyx_km_gen_cleanup(void *genctx);

/* Import/export parameter tables (OpenSSL 3.0 gives these functions no provider context). */
const OSSL_PARAM *keyx_km_imexport_types(keyx_alg alg);

#endif
