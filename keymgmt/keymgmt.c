/* Key management: parameters and checks are answered by the default provider's implementation
 * on the key's public view in keyx's context; private parts go through the backend contract. */
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/params.h>

#include "backend/call.h"
#include "backend/router.h"
#include "keymgmt/algtab.h"
#include "keymgmt/dh_check.h"
#include "keymgmt/key.h"
#include "keymgmt/keymgmt.h"
#include "provider/errors.h"
#include "provider/fail_closed.h"

void *keyx_km_new(keyx_provctx *p, keyx_alg alg)
{
    if (keyx_refused(p) || !keyx_check_not_reentered(p, "a key object"))
        return NULL;
    return keyx_key_new(p, alg);
}

void keyx_km_free(void *keydata)
{
    keyx_key_free(keydata);
}

int keyx_km_has(const void *keydata, int selection)
{
    const keyx_key *k = keydata;
    int ok = 1;

    if (k == NULL)
        return 0;
    if (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY)
        ok = ok && keyx_key_has_private(k);
    if (selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY)
        ok = ok && k->has_public;
    if ((selection & OSSL_KEYMGMT_SELECT_DOMAIN_PARAMETERS) && keyx_alg_has_domain(k->alg))
        ok = ok && k->has_params;
    return ok;
}

int keyx_km_validate(const void *keydata, int selection, int checktype)
{
    keyx_key *k = (keyx_key *)keydata;
    int quick = checktype == OSSL_KEYMGMT_VALIDATE_QUICK_CHECK;
    int software = keyx_key_exports_private(k);
    const char *failed = "key is empty";
    EVP_PKEY_CTX *ctx;
    int ok = 1;

    if (keyx_key_is_empty(k)) {
        ok = (selection & OSSL_KEYMGMT_SELECT_KEYPAIR) == 0 && !keyx_alg_has_domain(k->alg);
        goto end;
    }
    if ((selection & OSSL_KEYMGMT_SELECT_ALL) == OSSL_KEYMGMT_SELECT_PUBLIC_KEY &&
        __atomic_load_n(&k->public_checked, __ATOMIC_ACQUIRE))
        return 1; /* libssl checks each peer key once per derive context */
    if ((k->alg == KEYX_ALG_X25519 || k->alg == KEYX_ALG_X448) &&
        (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) == 0) {
        /* The default provider's verdict on an X25519/X448 public key is that it has one of the
         * right length (any 32 or 56 bytes are a u-coordinate): the view says so without a
         * context. Small-order points are refused when the key meets a peer. */
        failed = "public key is missing";
        ok = (selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY) == 0 || k->has_public;
        goto end;
    }
    if ((ctx = EVP_PKEY_CTX_new_from_pkey(k->prov->libctx, keyx_key_pub(k), NULL)) == NULL)
        return 0;
    if ((selection & OSSL_KEYMGMT_SELECT_DOMAIN_PARAMETERS) && keyx_alg_has_domain(k->alg)) {
        failed = "domain parameters are invalid";
        ok = (quick ? EVP_PKEY_param_check_quick(ctx) : EVP_PKEY_param_check(ctx)) == 1;
    }
    if (ok && (selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY) &&
        /* a view never changes: a key that passed the full check once passes it again */
        !__atomic_load_n(&k->public_checked, __ATOMIC_ACQUIRE)) {
        int prime_order = k->alg == KEYX_ALG_EC && keyx_group_prime_order(k->group);

        failed = keyx_alg_is_dh(k->alg) ? "public value is outside [2, p-2] or the subgroup"
                                        : "public key is malformed or not on the curve";
        if (keyx_alg_is_dh(k->alg) && !quick)
            ok = keyx_dh_public_ok(k->view); /* DH_check_pub_key's verdict, far cheaper */
        else if (prime_order)
            /* Every point of a prime-order curve (cofactor 1) has order n: the full check's
             * n*Q == O adds nothing to the quick one (on the curve, not at infinity). */
            ok = EVP_PKEY_public_check_quick(ctx) == 1;
        else
            ok = (quick ? EVP_PKEY_public_check_quick(ctx) : EVP_PKEY_public_check(ctx)) == 1;
        if (ok && (!quick || prime_order))
            __atomic_store_n(&k->public_checked, 1, __ATOMIC_RELEASE);
    }
    /* A hardware backend vouches for its own private part; it cannot be read to check it. */
    if (ok && (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY)) {
        failed = "private key is missing or invalid";
        ok = keyx_key_has_private(k) && (!software || EVP_PKEY_private_check(ctx) == 1);
    }
    if (ok && (selection & OSSL_KEYMGMT_SELECT_KEYPAIR) == OSSL_KEYMGMT_SELECT_KEYPAIR &&
        software) {
        failed = "private and public key do not match";
        ok = EVP_PKEY_pairwise_check(ctx) == 1;
    }
    EVP_PKEY_CTX_free(ctx);
end:
    if (!ok)
        KEYX_ERR(k->prov, KEYX_R_INVALID_PEER_KEY, "%s key check failed: %s", keyx_alg_name(k->alg),
                 failed);
    return ok;
}

int keyx_km_match(const void *keydata1, const void *keydata2, int selection)
{
    const keyx_key *a = keydata1, *b = keydata2;
    int ok = 1;

    if (a->alg != b->alg || keyx_key_is_empty(a) || keyx_key_is_empty(b))
        return 0;
    /* named curves: the same name is the same parameters */
    if ((selection & OSSL_KEYMGMT_SELECT_DOMAIN_PARAMETERS) && keyx_alg_has_domain(a->alg))
        ok = a->alg == KEYX_ALG_EC && a->group[0] != '\0' && b->group[0] != '\0'
                 ? strcmp(a->group, b->group) == 0
                 : EVP_PKEY_parameters_eq(keyx_key_pub(a), keyx_key_pub(b)) == 1;
    if (ok && (selection & OSSL_KEYMGMT_SELECT_KEYPAIR)) {
        /* raw public keys and uncompressed points (on the same named curve) compare as bytes */
        if (a->has_public && b->has_public && a->ecx_publen != 0)
            ok = a->ecx_publen == b->ecx_publen &&
                 memcmp(a->ecx_pub, b->ecx_pub, a->ecx_publen) == 0;
        else if (a->has_public && b->has_public && a->ec_pointlen != 0 && b->ec_pointlen != 0 &&
                 a->group[0] != '\0')
            ok = strcmp(a->group, b->group) == 0 && a->ec_pointlen == b->ec_pointlen &&
                 memcmp(a->ec_point, b->ec_point, a->ec_pointlen) == 0;
        else if (a->has_public && b->has_public)
            ok = EVP_PKEY_eq(keyx_key_pub(a), keyx_key_pub(b)) == 1;
        else
            ok = a->priv != NULL && a->priv == b->priv;
    }
    return ok;
}

/* The private key parameter of each algorithm, to tell a private import from a public one. */
static const char *private_param(keyx_alg alg)
{
    return alg == KEYX_ALG_RSA ? OSSL_PKEY_PARAM_RSA_D : OSSL_PKEY_PARAM_PRIV_KEY;
}

/* The backend named by the import's KEYX_PARAM_BACKEND, else the software holder of imports. */
static keyx_backend *import_backend(keyx_provctx *p, const OSSL_PARAM params[])
{
    const OSSL_PARAM *bp = OSSL_PARAM_locate_const(params, KEYX_PARAM_BACKEND);
    const char *name = NULL;
    keyx_backend *be;

    if (bp == NULL)
        return keyx_router_software(p->router);
    if (OSSL_PARAM_get_utf8_string_ptr(bp, &name))
        for (int kind = 0; kind < KEYX_BACKEND_KINDS; kind++) {
            if (strcmp(name, keyx_backend_kind_name((keyx_backend_kind)kind)) != 0)
                continue;
            if ((be = keyx_router_backend(p->router, (keyx_backend_kind)kind)) == NULL)
                return NULL;
            if (be->ops->import == NULL) {
                KEYX_ERR(p, KEYX_R_UNSUPPORTED, "the %s backend cannot import private keys", name);
                return NULL;
            }
            return be;
        }
    KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT, "%s = \"%s\": expected software, tpm or pkcs11",
             KEYX_PARAM_BACKEND, name != NULL ? name : "(not a string)");
    return NULL;
}

int keyx_km_import(void *keydata, int selection, const OSSL_PARAM params[])
{
    keyx_key *k = keydata;
    keyx_provctx *p = k->prov;
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_name(p->libctx, keyx_alg_name(k->alg), NULL);
    EVP_PKEY *key = NULL, *pub = NULL;
    void *handle = NULL;
    keyx_backend *be;

    if (ctx == NULL || EVP_PKEY_fromdata_init(ctx) != 1 ||
        EVP_PKEY_fromdata(ctx, &key, selection, (OSSL_PARAM *)params) != 1) {
        EVP_PKEY_CTX_free(ctx);
        KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT,
                 "%s key import rejected (malformed, inconsistent or unsupported parameters)",
                 keyx_alg_name(k->alg));
        return 0;
    }
    EVP_PKEY_CTX_free(ctx);
    if (!(selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) ||
        OSSL_PARAM_locate_const(params, private_param(k->alg)) == NULL)
        return keyx_key_set_pub(k, key);

    /* The application handed over private material in memory: the software backend holds it,
     * unless the import names a backend to move it into (KEYX_PARAM_BACKEND). */
    if ((be = import_backend(p, params)) == NULL ||
        keyx_backend_import(be, key, &handle, &pub) != 1) {
        EVP_PKEY_free(key);
        if (be != NULL)
            KEYX_ERR(p, KEYX_R_BACKEND_FAILURE, "%s backend could not take the %s key",
                     be->ops->name, keyx_alg_name(k->alg));
        return 0;
    }
    EVP_PKEY_free(key);
    if (!keyx_key_set_pub(k, pub) || !keyx_key_attach(k, be, handle, 0))
        return 0;
    keyx_key_event(k, "load", 1, NULL);
    return 1;
}

int keyx_km_export(void *keydata, int selection, OSSL_CALLBACK *cb, void *cbarg)
{
    keyx_key *k = keydata;
    EVP_PKEY *view;

    if ((selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) && !keyx_key_exports_private(k)) {
        KEYX_ERR(k->prov, KEYX_R_EXPORT_REFUSED,
                 "the %s private key stays in the %s backend; export only its public key",
                 keyx_alg_name(k->alg), keyx_key_backend_name(k));
        return 0;
    }
    if (keyx_key_is_empty(k)) {
        KEYX_ERR(k->prov, KEYX_R_MISSING_KEY, "empty %s key", keyx_alg_name(k->alg));
        return 0;
    }
    view = keyx_key_pub(k);
    return view != NULL && EVP_PKEY_export(view, selection, cb, cbarg);
}

/* X25519/X448 without a view: the sizes are fixed (the default provider reports them even for
 * a key with no material yet, and libssl caches what an empty peer key answers before setting
 * its value) and the public key is the raw key. 0 when a key that has material is asked for
 * more: its view answers that. */
static int ecx_params_without_view(const keyx_key *k, OSSL_PARAM params[], int *ok)
{
    int x448 = k->alg == KEYX_ALG_X448;
    int bits = x448 ? 448 : 253, secbits = x448 ? 224 : 128, size = x448 ? 56 : 32;

    for (OSSL_PARAM *p = params; !keyx_key_is_empty(k) && p->key != NULL; p++)
        if (strcmp(p->key, OSSL_PKEY_PARAM_BITS) != 0 &&
            strcmp(p->key, OSSL_PKEY_PARAM_SECURITY_BITS) != 0 &&
            strcmp(p->key, OSSL_PKEY_PARAM_MAX_SIZE) != 0 &&
            strcmp(p->key, OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY) != 0 &&
            strcmp(p->key, OSSL_PKEY_PARAM_PUB_KEY) != 0)
            return 0;
    *ok = 1;
    for (OSSL_PARAM *p = params; *ok && p->key != NULL; p++) {
        if (strcmp(p->key, OSSL_PKEY_PARAM_BITS) == 0)
            *ok = OSSL_PARAM_set_int(p, bits);
        else if (strcmp(p->key, OSSL_PKEY_PARAM_SECURITY_BITS) == 0)
            *ok = OSSL_PARAM_set_int(p, secbits);
        else if (strcmp(p->key, OSSL_PKEY_PARAM_MAX_SIZE) == 0)
            *ok = OSSL_PARAM_set_int(p, size);
        else if (k->has_public && (strcmp(p->key, OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY) == 0 ||
                                   strcmp(p->key, OSSL_PKEY_PARAM_PUB_KEY) == 0))
            *ok = OSSL_PARAM_set_octet_string(p, k->ecx_pub, k->ecx_publen);
    }
    return 1;
}

/* EC without a view: the group's sizes and name from its shared parameters, the public key
 * from the point. 0 when something else is asked: the view answers that. */
static int ec_params_without_view(const keyx_key *k, OSSL_PARAM params[], int *ok)
{
    static const char *const from_group[] = {OSSL_PKEY_PARAM_BITS, OSSL_PKEY_PARAM_SECURITY_BITS,
                                             OSSL_PKEY_PARAM_MAX_SIZE, OSSL_PKEY_PARAM_GROUP_NAME};
    OSSL_PARAM group[5];
    size_t n = 0, i, at[4];

    for (size_t j = 0; params[j].key != NULL; j++) {
        for (i = 0; i < 4 && strcmp(params[j].key, from_group[i]) != 0; i++)
            ;
        if (i < 4 && n < 4) {
            at[n] = j;
            group[n++] = params[j];
        } else if (strcmp(params[j].key, OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY) != 0 &&
                   strcmp(params[j].key, OSSL_PKEY_PARAM_PUB_KEY) != 0) {
            return 0;
        }
    }
    group[n] = OSSL_PARAM_construct_end();
    *ok = n == 0 || EVP_PKEY_get_params(k->domain, group) == 1;
    for (i = 0; i < n; i++)
        params[at[i]].return_size = group[i].return_size;
    for (OSSL_PARAM *p = params; *ok && p->key != NULL; p++)
        if (strcmp(p->key, OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY) == 0 ||
            strcmp(p->key, OSSL_PKEY_PARAM_PUB_KEY) == 0)
            *ok = OSSL_PARAM_set_octet_string(p, k->ec_point, k->ec_pointlen);
    return 1;
}

int keyx_km_get_params(void *keydata, OSSL_PARAM params[])
{
    keyx_key *k = keydata;
    EVP_PKEY *view = __atomic_load_n(&k->view, __ATOMIC_ACQUIRE);
    int ok = 1;

    if (view == NULL && (k->alg == KEYX_ALG_X25519 || k->alg == KEYX_ALG_X448) &&
        ecx_params_without_view(k, params, &ok))
        return ok;
    if (view == NULL && k->domain != NULL && ec_params_without_view(k, params, &ok))
        return ok;
    if (view == NULL && !keyx_key_is_empty(k) && (view = keyx_key_pub(k)) == NULL)
        return 0;
    return view == NULL || EVP_PKEY_get_params(view, params) == 1;
}

const OSSL_PARAM *keyx_km_gettable_params(keyx_provctx *p, keyx_alg alg)
{
    return EVP_KEYMGMT_gettable_params(p->algs->km[alg]);
}

const OSSL_PARAM *keyx_km_settable_params(keyx_provctx *p, keyx_alg alg)
{
    return EVP_KEYMGMT_settable_params(p->algs->km[alg]);
}

int keyx_km_set_params(void *keydata, const OSSL_PARAM params[])
{
    keyx_key *k = keydata;
    const OSSL_PARAM *enc = OSSL_PARAM_locate_const(params, OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY);
    EVP_PKEY *pub, *view;
    const void *data = NULL;
    size_t len = 0;

    if (enc == NULL) {
        /* Views are shared (duplicates, the named-group cache): a changed one is a copy. */
        if (keyx_key_is_empty(k))
            return 1;
        pub = (view = keyx_key_pub(k)) != NULL ? EVP_PKEY_dup(view) : NULL;
        if (pub == NULL || EVP_PKEY_set_params(pub, (OSSL_PARAM *)params) != 1) {
            EVP_PKEY_free(pub);
            return 0;
        }
        return keyx_key_set_pub(k, pub);
    }
    if (keyx_key_has_private(k)) {
        KEYX_ERR(k->prov, KEYX_R_INVALID_ARGUMENT,
                 "cannot replace the public key of a %s private key", keyx_alg_name(k->alg));
        return 0;
    }
    /* X25519/X448: the key is its raw public key, the view made only when needed (libssl sets
     * each peer's key share this way) */
    if ((k->alg == KEYX_ALG_X25519 || k->alg == KEYX_ALG_X448) &&
        OSSL_PARAM_get_octet_string_ptr(enc, &data, &len))
        return keyx_key_set_raw(k, NULL, NULL, data, len);
    /* A new public view rather than an edit: views may be shared with duplicates. */
    pub = (view = keyx_key_pub(k)) != NULL ? EVP_PKEY_dup(view) : NULL;
    if (pub == NULL || EVP_PKEY_set_params(pub, (OSSL_PARAM *)params) != 1) {
        EVP_PKEY_free(pub);
        KEYX_ERR(k->prov, KEYX_R_INVALID_PEER_KEY,
                 "%s encoded public key rejected (wrong length, format or not on the curve)",
                 keyx_alg_name(k->alg));
        return 0;
    }
    if (!keyx_key_set_pub(k, pub))
        return 0;
    /* The view accepted the encoding, so it is the view's point: kept for the backends. */
    if (k->alg == KEYX_ALG_EC && OSSL_PARAM_get_octet_string_ptr(enc, &data, &len) && len > 1 &&
        len <= sizeof(k->ec_point) && ((const unsigned char *)data)[0] == 0x04) {
        memcpy(k->ec_point, data, len);
        k->ec_pointlen = len;
    }
    return 1;
}

void *keyx_km_dup(const void *keydata, int selection)
{
    return keyx_key_dup(keydata, selection);
}

/* Keys passed by reference from keyx's own store: the reference is the key object itself. */
void *keyx_km_load(const void *reference, size_t reference_sz)
{
    keyx_key *k = NULL;

    if (reference == NULL || reference_sz != sizeof(k))
        return NULL;
    k = *(keyx_key *const *)reference;
    *(keyx_key **)reference = NULL;
    return k;
}
