/* X25519/X448 through the default provider's dispatch functions (see software_ecx.h). */
#include <string.h>
#include <strings.h>

#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/provider.h>

#include "backend/software_ecx.h"

struct keyx_ecx_impl {
    void *provctx;
    EVP_PKEY_CTX *fromdata; /* ready for EVP_PKEY_fromdata, which only reads it: shared */
    size_t len;             /* 32 or 56: keys, public keys and secrets */
    OSSL_FUNC_keymgmt_new_fn *km_new;
    OSSL_FUNC_keymgmt_free_fn *km_free;
    OSSL_FUNC_keymgmt_gen_init_fn *gen_init;
    OSSL_FUNC_keymgmt_gen_fn *gen;
    OSSL_FUNC_keymgmt_gen_cleanup_fn *gen_cleanup;
    OSSL_FUNC_keymgmt_import_fn *import;
    OSSL_FUNC_keymgmt_export_fn *export;
    OSSL_FUNC_keymgmt_get_params_fn *get_params;
    OSSL_FUNC_keyexch_newctx_fn *x_new;
    OSSL_FUNC_keyexch_init_fn *x_init;
    OSSL_FUNC_keyexch_set_peer_fn *x_set_peer;
    OSSL_FUNC_keyexch_derive_fn *x_derive;
    OSSL_FUNC_keyexch_freectx_fn *x_free;
};

/* The provider's implementation whose first name is name ("X25519:1.3.101.110"). */
static const OSSL_DISPATCH *find(OSSL_PROVIDER *prov, int op, const char *name)
{
    int no_cache = 0;
    const OSSL_ALGORITHM *algs = OSSL_PROVIDER_query_operation(prov, op, &no_cache);
    const OSSL_DISPATCH *found = NULL;
    size_t n = strlen(name);

    for (const OSSL_ALGORITHM *a = algs; a != NULL && a->algorithm_names != NULL; a++)
        if (strncasecmp(a->algorithm_names, name, n) == 0 &&
            (a->algorithm_names[n] == '\0' || a->algorithm_names[n] == ':')) {
            found = a->implementation;
            break;
        }
    if (algs != NULL)
        OSSL_PROVIDER_unquery_operation(prov, op, algs);
    return found;
}

keyx_ecx_impl *keyx_ecx_impl_new(OSSL_LIB_CTX *libctx, OSSL_PROVIDER *dflt, keyx_alg alg)
{
    const char *name = keyx_alg_name(alg);
    const OSSL_DISPATCH *km = find(dflt, OSSL_OP_KEYMGMT, name);
    const OSSL_DISPATCH *kx = find(dflt, OSSL_OP_KEYEXCH, name);
    keyx_ecx_impl *e;

    if (km == NULL || kx == NULL || (e = OPENSSL_zalloc(sizeof(*e))) == NULL)
        return NULL;
    e->provctx = OSSL_PROVIDER_get0_provider_ctx(dflt);
    e->fromdata = EVP_PKEY_CTX_new_from_name(libctx, name, "provider=default");
    e->len = alg == KEYX_ALG_X448 ? 56 : 32;
    for (; km->function_id != 0; km++)
        switch (km->function_id) {
        case OSSL_FUNC_KEYMGMT_NEW:
            e->km_new = OSSL_FUNC_keymgmt_new(km);
            break;
        case OSSL_FUNC_KEYMGMT_FREE:
            e->km_free = OSSL_FUNC_keymgmt_free(km);
            break;
        case OSSL_FUNC_KEYMGMT_GEN_INIT:
            e->gen_init = OSSL_FUNC_keymgmt_gen_init(km);
            break;
        case OSSL_FUNC_KEYMGMT_GEN:
            e->gen = OSSL_FUNC_keymgmt_gen(km);
            break;
        case OSSL_FUNC_KEYMGMT_GEN_CLEANUP:
            e->gen_cleanup = OSSL_FUNC_keymgmt_gen_cleanup(km);
            break;
        case OSSL_FUNC_KEYMGMT_IMPORT:
            e->import = OSSL_FUNC_keymgmt_import(km);
            break;
        case OSSL_FUNC_KEYMGMT_EXPORT:
            e->export = OSSL_FUNC_keymgmt_export(km);
            break;
        case OSSL_FUNC_KEYMGMT_GET_PARAMS:
            e->get_params = OSSL_FUNC_keymgmt_get_params(km);
            break;
        default:
            break;
        }
    for (; kx->function_id != 0; kx++)
        switch (kx->function_id) {
        case OSSL_FUNC_KEYEXCH_NEWCTX:
            e->x_new = OSSL_FUNC_keyexch_newctx(kx);
            break;
        case OSSL_FUNC_KEYEXCH_INIT:
            e->x_init = OSSL_FUNC_keyexch_init(kx);
            break;
        case OSSL_FUNC_KEYEXCH_SET_PEER:
            e->x_set_peer = OSSL_FUNC_keyexch_set_peer(kx);
            break;
        case OSSL_FUNC_KEYEXCH_DERIVE:
            e->x_derive = OSSL_FUNC_keyexch_derive(kx);
            break;
        case OSSL_FUNC_KEYEXCH_FREECTX:
            e->x_free = OSSL_FUNC_keyexch_freectx(kx);
            break;
        default:
            break;
        }
    if (e->km_new == NULL || e->km_free == NULL || e->gen_init == NULL || e->gen == NULL ||
        e->gen_cleanup == NULL || e->import == NULL || e->export == NULL || e->get_params == NULL ||
        e->x_new == NULL || e->x_init == NULL || e->x_set_peer == NULL || e->x_derive == NULL ||
        e->x_free == NULL || e->fromdata == NULL || EVP_PKEY_fromdata_init(e->fromdata) != 1) {
        keyx_ecx_impl_free(e);
        return NULL;
    }
    return e;
}

void keyx_ecx_impl_free(keyx_ecx_impl *impl)
{
    if (impl == NULL)
        return;
    EVP_PKEY_CTX_free(impl->fromdata);
    OPENSSL_free(impl);
}

void *keyx_ecx_generate(const keyx_ecx_impl *impl)
{
    void *gctx = impl->gen_init(impl->provctx, OSSL_KEYMGMT_SELECT_KEYPAIR, NULL);
    void *key = gctx != NULL ? impl->gen(gctx, NULL, NULL) : NULL;

    impl->gen_cleanup(gctx);
    return key;
}

/* A key object from one raw value (private or public). */
static void *from_raw(const keyx_ecx_impl *impl, const char *param, int selection,
                      const unsigned char *raw, size_t len)
{
    void *key;
    OSSL_PARAM one[2];

    if (len != impl->len || (key = impl->km_new(impl->provctx)) == NULL)
        return NULL;
    one[0] = OSSL_PARAM_construct_octet_string(param, (void *)raw, len);
    one[1] = OSSL_PARAM_construct_end();
    if (impl->import(key, selection, one) != 1) {
        impl->km_free(key);
        return NULL;
    }
    return key;
}

void *keyx_ecx_from_private(const keyx_ecx_impl *impl, const unsigned char *priv, size_t len)
{
    /* the default provider computes the public key of a private key imported alone */
    return from_raw(impl, OSSL_PKEY_PARAM_PRIV_KEY, OSSL_KEYMGMT_SELECT_KEYPAIR, priv, len);
}

size_t keyx_ecx_public(const keyx_ecx_impl *impl, void *key, unsigned char *pub)
{
    size_t len = 0;
    OSSL_PARAM one[2];

    one[0] = OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_PUB_KEY, pub, impl->len);
    one[1] = OSSL_PARAM_construct_end();
    if (impl->get_params(key, one) != 1 || !OSSL_PARAM_modified(one) ||
        (len = one[0].return_size) != impl->len)
        return 0;
    return len;
}

int keyx_ecx_derive(const keyx_ecx_impl *impl, void *key, const unsigned char *peer, size_t peerlen,
                    unsigned char *out, size_t outlen)
{
    void *pk =
        from_raw(impl, OSSL_PKEY_PARAM_PUB_KEY, OSSL_KEYMGMT_SELECT_PUBLIC_KEY, peer, peerlen);
    void *ctx = pk != NULL ? impl->x_new(impl->provctx) : NULL;
    size_t len = 0;
    int ok = ctx != NULL && impl->x_init(ctx, key, NULL) == 1 && impl->x_set_peer(ctx, pk) == 1 &&
             impl->x_derive(ctx, out, &len, outlen) == 1 && len == outlen;

    if (ctx != NULL)
        impl->x_free(ctx);
    if (pk != NULL)
        impl->km_free(pk);
    return ok;
}

typedef struct to_pkey {
    EVP_PKEY_CTX *fromdata;
    EVP_PKEY *pkey;
} to_pkey;

static int export_cb(const OSSL_PARAM params[], void *arg)
{
    to_pkey *t = arg;

    return EVP_PKEY_fromdata(t->fromdata, &t->pkey, EVP_PKEY_KEYPAIR, (OSSL_PARAM *)params) == 1;
}

EVP_PKEY *keyx_ecx_pkey(const keyx_ecx_impl *impl, void *key)
{
    to_pkey t = {impl->fromdata, NULL};

    if (impl->export(key, OSSL_KEYMGMT_SELECT_KEYPAIR, export_cb, &t) != 1) {
        EVP_PKEY_free(t.pkey);
        return NULL;
    }
    return t.pkey;
}

void keyx_ecx_free(const keyx_ecx_impl *impl, void *key)
{
    if (key != NULL)
        impl->km_free(key); /* the default provider wipes the private key */
}
