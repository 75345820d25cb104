/* One key management dispatch table per algorithm, all on the shared operations of
 * keymgmt/keymgmt.c and keymgmt/gen.c. */
#include <openssl/core_dispatch.h>

#include "keymgmt/keymgmt.h"
#include "provider/dispatch.h"

#define FN(f) ((void (*)(void))(f))

#define KEYX_KEYMGMT(lower, ALG, KEYEXCH_NAME, SIGNATURE_NAME)                                     \
    static void *lower##_new(void *provctx)                                                        \
    {                                                                                              \
        return keyx_km_new(provctx, ALG);                                                          \
    }                                                                                              \
    static void *lower##_gen_init(void *provctx, int selection, const OSSL_PARAM params[])         \
    {                                                                                              \
        return keyx_km_gen_init(provctx, ALG, selection, params);                                  \
    }                                                                                              \
    static const OSSL_PARAM *lower##_gen_settable(void *genctx, void *provctx)                     \
    {                                                                                              \
        (void)genctx;                                                                              \
        return keyx_km_gen_settable_params(provctx, ALG);                                          \
    }                                                                                              \
    static const OSSL_PARAM *lower##_gettable(void *provctx)                                       \
    {                                                                                              \
        return keyx_km_gettable_params(provctx, ALG);                                              \
    }                                                                                              \
    static const OSSL_PARAM *lower##_settable(void *provctx)                                       \
    {                                                                                              \
        return keyx_km_settable_params(provctx, ALG);                                              \
    }                                                                                              \
    static const OSSL_PARAM *lower##_types(int selection)                                          \
    {                                                                                              \
        (void)selection;                                                                           \
        return keyx_km_imexport_types(ALG);                                                        \
    }                                                                                              \
    static const char *lower##_query_operation_name(int operation_id)                              \
    {                                                                                              \
        if (operation_id == OSSL_OP_KEYEXCH)                                                       \
            return KEYEXCH_NAME;                                                                   \
        return operation_id == OSSL_OP_SIGNATURE ? SIGNATURE_NAME : keyx_alg_name(ALG);            \
    }                                                                                              \
    const OSSL_DISPATCH keyx_##lower##_keymgmt_functions[] = {                                     \
        {OSSL_FUNC_KEYMGMT_NEW, FN(lower##_new)},                                                  \
        {OSSL_FUNC_KEYMGMT_FREE, FN(keyx_km_free)},                                                \
        {OSSL_FUNC_KEYMGMT_HAS, FN(keyx_km_has)},                                                  \
        {OSSL_FUNC_KEYMGMT_VALIDATE, FN(keyx_km_validate)},                                        \
        {OSSL_FUNC_KEYMGMT_MATCH, FN(keyx_km_match)},                                              \
        {OSSL_FUNC_KEYMGMT_IMPORT, FN(keyx_km_import)},                                            \
        {OSSL_FUNC_KEYMGMT_IMPORT_TYPES, FN(lower##_types)},                                       \
        {OSSL_FUNC_KEYMGMT_EXPORT, FN(keyx_km_export)},                                            \
        {OSSL_FUNC_KEYMGMT_EXPORT_TYPES, FN(lower##_types)},                                       \
        {OSSL_FUNC_KEYMGMT_GET_PARAMS, FN(keyx_km_get_params)},                                    \
        {OSSL_FUNC_KEYMGMT_GETTABLE_PARAMS, FN(lower##_gettable)},                                 \
        {OSSL_FUNC_KEYMGMT_SET_PARAMS, FN(keyx_km_set_params)},                                    \
        {OSSL_FUNC_KEYMGMT_SETTABLE_PARAMS, FN(lower##_settable)},                                 \
        {OSSL_FUNC_KEYMGMT_GEN_INIT, FN(lower##_gen_init)},                                        \
        {OSSL_FUNC_KEYMGMT_GEN_SET_TEMPLATE, FN(keyx_km_gen_set_template)},                        \
        {OSSL_FUNC_KEYMGMT_GEN_SET_PARAMS, FN(keyx_km_gen_set_params)},                            \
        {OSSL_FUNC_KEYMGMT_GEN_SETTABLE_PARAMS, FN(lower##_gen_settable)},                         \
        {OSSL_FUNC_KEYMGMT_GEN, FN(keyx_km_gen)},                                                  \
        {OSSL_FUNC_KEYMGMT_GEN_CLEANUP, FN(keyx_km_gen_cleanup)},                                  \
        {OSSL_FUNC_KEYMGMT_LOAD, FN(keyx_km_load)},                                                \
        {OSSL_FUNC_KEYMGMT_DUP, FN(keyx_km_dup)},                                                  \
        {OSSL_FUNC_KEYMGMT_QUERY_OPERATION_NAME, FN(lower##_query_operation_name)},                \
        {0, NULL},                                                                                 \
    };

/* Operation names as the default provider answers them: signing an EC key is ECDSA. */
KEYX_KEYMGMT(ec, KEYX_ALG_EC, "ECDH", "ECDSA")
KEYX_KEYMGMT(x25519, KEYX_ALG_X25519, "X25519", "X25519")
KEYX_KEYMGMT(x448, KEYX_ALG_X448, "X448", "X448")
KEYX_KEYMGMT(dh, KEYX_ALG_DH, "DH", "DH")
KEYX_KEYMGMT(dhx, KEYX_ALG_DHX, "DH", "DH")
KEYX_KEYMGMT(rsa, KEYX_ALG_RSA, "RSA", "RSA")
