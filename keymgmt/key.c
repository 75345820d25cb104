/* keyx key objects: a public view in keyx's library context plus, for private keys, a handle
 * in the backend that holds the private part. */
#include <stdio.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/core_object.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/x509.h>

#include "backend/call.h"
#include "keymgmt/algtab.h"
#include "keymgmt/dh_check.h"
#include "keymgmt/ecx_check.h"
#include "keymgmt/key.h"
#include "provider/audit.h"
#include "provider/errors.h"

static int events_wanted(const keyx_provctx *p)
{
    return p->audit != NULL || p->cfg.debug;
}

struct keyx_priv {
    keyx_backend *be;
    void *handle;        /* NULL once destroyed (ephemeral-max-uses) */
    CRYPTO_RWLOCK *lock; /* derives read-lock the handle; destruction write-locks it */
    int refs;            /* keys sharing this private part (dup) */
    uint64_t uses;
    int ephemeral;
};

/* OpenSSL's group names for the curves keyx routes, and keyx's canonical names. */
const char *keyx_group_canonical(const char *name)
{
    static const struct {
        const char *openssl, *keyx;
    } map[] = {
        {"prime256v1", "P-256"}, {"secp256r1", "P-256"}, {"P-256", "P-256"}, {"secp384r1", "P-384"},
        {"P-384", "P-384"},      {"secp521r1", "P-521"}, {"P-521", "P-521"},
    };

    for (size_t i = 0; i < sizeof(map) / sizeof(map[0]); i++)
        if (strcmp(name, map[i].openssl) == 0)
            return map[i].keyx;
    return name;
}

int keyx_group_prime_order(const char *group)
{
    return strcmp(group, "P-256") == 0 || strcmp(group, "P-384") == 0 ||
           strcmp(group, "P-521") == 0;
}

keyx_key *keyx_key_new(keyx_provctx *p, keyx_alg alg)
{
    keyx_key *k = OPENSSL_zalloc(sizeof(*k));

    if (k == NULL) {
        KEYX_ERR(p, KEYX_R_INTERNAL, "out of memory");
        return NULL;
    }
    k->prov = p;
    k->alg = alg;
    return k;
}

void keyx_key_event(keyx_key *k, const char *event, int ok, const char *error)
{
    if (!events_wanted(k->prov))
        return;
    keyx_event ev = {
        .event = event,
        .backend = keyx_key_backend_name(k),
        .alg = keyx_alg_name(k->alg),
        .group = k->group[0] ? k->group : NULL,
        .key = k->id[0] ? k->id : NULL,
        .ephemeral = k->priv != NULL ? k->priv->ephemeral : -1,
        .ok = ok,
        .error = error,
    };

    keyx_event_emit(k->prov, &ev);
}

/* Destroys the private part in its backend (caller holds the write lock or the last ref). */
static void priv_destroy(keyx_key *k)
{
    keyx_priv *pv = k->priv;

    if (pv->handle == NULL)
        return;
    keyx_backend_free(pv->be, pv->handle);
    pv->handle = NULL;
    /* "free": the private part is gone (an ephemeral key, or software memory wiped); "release":
     * keyx let go of a key that stays in its device (persistent, loaded by URI or file). */
    keyx_key_event(k, pv->ephemeral || pv->be->ops->exports_private ? "free" : "release", 1, NULL);
}

static void priv_release(keyx_key *k)
{
    keyx_priv *pv = k->priv;
    int refs = 0;

    if (pv == NULL)
        return;
    CRYPTO_atomic_add(&pv->refs, -1, &refs, pv->lock);
    if (refs == 0) {
        priv_destroy(k);
        CRYPTO_THREAD_lock_free(pv->lock);
        OPENSSL_free(pv);
    }
    k->priv = NULL;
}

void keyx_key_free(keyx_key *k)
{
    if (k == NULL)
        return;
    priv_release(k);
    EVP_PKEY_free(k->view);
    EVP_PKEY_free(k->domain);
    OPENSSL_free(k);
}

static void compute_id(keyx_key *k)
{
    unsigned char *enc = NULL, md[32];
    const unsigned char *data;
    unsigned int mdlen = 0;
    int enclen;
    size_t len = 0;

    k->id[0] = '\0';
    if (!k->has_public)
        return;
    if (k->ecx_publen != 0) { /* X25519/X448: the encoded public key is the raw key */
        data = k->ecx_pub;
        len = k->ecx_publen;
    } else if (k->view == NULL && k->ec_pointlen != 0) { /* EC: the uncompressed point */
        data = k->ec_point;
        len = k->ec_pointlen;
    } else if (k->alg == KEYX_ALG_RSA) {
        enclen = i2d_PUBKEY(k->view, &enc);
        len = enclen > 0 ? (size_t)enclen : 0;
        data = enc;
    } else {
        len = EVP_PKEY_get1_encoded_public_key(k->view, &enc);
        data = enc;
    }
    if (len > 0 && EVP_Digest(data, len, md, &mdlen, k->prov->algs->sha256, NULL) == 1)
        for (int i = 0; i < 8; i++)
            snprintf(k->id + 2 * i, 3, "%02x", md[i]);
    OPENSSL_free(enc);
}

int keyx_key_set_pub(keyx_key *k, EVP_PKEY *pub)
{
    char name[64];
    size_t len = 0;

    EVP_PKEY_free(k->view);
    EVP_PKEY_free(k->domain);
    k->view = pub;
    k->domain = NULL;
    k->group[0] = '\0';
    k->id[0] = '\0';
    k->public_checked = 0;
    k->has_params = 0;
    k->has_public = 0;
    k->ecx_publen = 0;
    k->ec_pointlen = 0;
    if (pub == NULL)
        return 1;
    /* Probing for parts the key may lack must not leave errors behind. */
    ERR_set_mark();
    switch (k->alg) {
    case KEYX_ALG_X25519:
    case KEYX_ALG_X448:
        snprintf(k->group, sizeof(k->group), "%s", keyx_alg_name(k->alg));
        k->has_public = EVP_PKEY_get_octet_string_param(pub, OSSL_PKEY_PARAM_PUB_KEY, k->ecx_pub,
                                                        sizeof(k->ecx_pub), &len) == 1 &&
                        len == (k->alg == KEYX_ALG_X448 ? 56 : 32);
        k->ecx_publen = k->has_public ? len : 0;
        break;
    case KEYX_ALG_RSA:
        k->has_public = EVP_PKEY_get_bits(pub) > 0;
        break;
    case KEYX_ALG_EC:
    case KEYX_ALG_DH:
    case KEYX_ALG_DHX:
        if (EVP_PKEY_get_utf8_string_param(pub, OSSL_PKEY_PARAM_GROUP_NAME, name, sizeof(name),
                                           NULL) == 1)
            snprintf(k->group, sizeof(k->group), "%s", keyx_group_canonical(name));
        /* Explicit parameters have no group name but do have a size. */
        k->has_params = k->group[0] != '\0' || EVP_PKEY_get_bits(pub) > 0;
        k->has_public = EVP_PKEY_get_octet_string_param(pub, OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY,
                                                        NULL, 0, &len) == 1 &&
                        len > 0;
        break;
    default:
        break;
    }
    ERR_pop_to_mark();
    return 1;
}

int keyx_key_set_raw(keyx_key *k, const char *group, EVP_PKEY *domain, const unsigned char *pub,
                     size_t len)
{
    int ecx = k->alg == KEYX_ALG_X25519 || k->alg == KEYX_ALG_X448;
    size_t want = k->alg == KEYX_ALG_X448 ? 56 : 32;
    char name[sizeof(k->group)];

    /* group may be k->group itself, which set_pub clears */
    snprintf(name, sizeof(name), "%s", ecx ? keyx_alg_name(k->alg) : group != NULL ? group : "");
    keyx_key_set_pub(k, NULL);
    if (ecx ? len != want
            : k->alg != KEYX_ALG_EC || domain == NULL || name[0] == '\0' || len < 3 ||
                  len > sizeof(k->ec_point) || pub[0] != 0x04) {
        KEYX_ERR(k->prov, KEYX_R_INVALID_PEER_KEY,
                 "%s public key of %zu bytes is not one keyx takes", keyx_alg_name(k->alg), len);
        return 0;
    }
    if (ecx) {
        memcpy(k->ecx_pub, pub, len);
        k->ecx_publen = len;
    } else {
        if (!EVP_PKEY_up_ref(domain))
            return 0;
        k->domain = domain;
        memcpy(k->ec_point, pub, len);
        k->ec_pointlen = len;
        k->has_params = 1;
    }
    memcpy(k->group, name, sizeof(name));
    k->has_public = 1;
    return 1;
}

int keyx_key_is_empty(const keyx_key *k)
{
    return __atomic_load_n(&k->view, __ATOMIC_ACQUIRE) == NULL && !k->has_public && !k->has_params;
}

/* The view of a key known by its raw public key: a software private part makes the complete key
 * (its view must carry the private key, as every software key's does), else the public key
 * alone (an EC point on a copy of the group's shared parameters). */
static EVP_PKEY *make_view(const keyx_key *k)
{
    keyx_priv *pv = k->priv;
    EVP_PKEY *v = NULL;
    int made = 0;
    OSSL_PARAM one[2];

    if (pv != NULL && pv->be->ops->view != NULL && CRYPTO_THREAD_read_lock(pv->lock)) {
        if (pv->handle != NULL)
            made = pv->be->ops->view(pv->be->state, pv->handle, &v) == 1 ? 1 : -1;
        CRYPTO_THREAD_unlock(pv->lock);
        if (made == 1)
            return v;
        if (made == -1) {
            KEYX_ERR(k->prov, KEYX_R_INTERNAL, "cannot make the view of a %s key",
                     keyx_alg_name(k->alg));
            return NULL;
        }
    }
    if (k->domain != NULL) {
        if ((v = EVP_PKEY_dup(k->domain)) == NULL ||
            EVP_PKEY_set1_encoded_public_key(v, k->ec_point, k->ec_pointlen) != 1) {
            EVP_PKEY_free(v);
            KEYX_ERR(k->prov, KEYX_R_INVALID_PEER_KEY, "the %s point the backend made is not on %s",
                     keyx_alg_name(k->alg), k->group);
            return NULL;
        }
        return v;
    }
    one[0] = OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_PUB_KEY, (void *)k->ecx_pub,
                                               k->ecx_publen);
    one[1] = OSSL_PARAM_construct_end();
    if (EVP_PKEY_fromdata(k->prov->algs->fromdata[k->alg], &v, EVP_PKEY_PUBLIC_KEY, one) != 1) {
        KEYX_ERR(k->prov, KEYX_R_INTERNAL, "cannot make the view of a %s public key",
                 keyx_alg_name(k->alg));
        return NULL;
    }
    return v;
}

EVP_PKEY *keyx_key_pub(const keyx_key *k)
{
    /* the view is a cache: made at most once per key (the loser of a race frees its copy) */
    EVP_PKEY **slot = (EVP_PKEY **)&k->view;
    EVP_PKEY *v = __atomic_load_n(slot, __ATOMIC_ACQUIRE), *none = NULL;

    if (v != NULL || !k->has_public || (v = make_view(k)) == NULL)
        return v;
    if (!__atomic_compare_exchange_n(slot, &none, v, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        EVP_PKEY_free(v);
        v = none;
    }
    return v;
}

int keyx_key_attach(keyx_key *k, keyx_backend *be, void *handle, int ephemeral)
{
    keyx_priv *pv = OPENSSL_zalloc(sizeof(*pv));

    if (pv == NULL || (pv->lock = CRYPTO_THREAD_lock_new()) == NULL) {
        OPENSSL_free(pv);
        keyx_backend_free(be, handle);
        KEYX_ERR(k->prov, KEYX_R_INTERNAL, "out of memory");
        return 0;
    }
    priv_release(k);
    pv->be = be;
    pv->handle = handle;
    pv->refs = 1;
    pv->ephemeral = ephemeral;
    k->priv = pv;
    if (events_wanted(k->prov))
        compute_id(k);
    return 1;
}

/* keyx's algorithm for a key a backend loaded, from its public view. */
static int alg_of(const EVP_PKEY *pub, keyx_alg *alg)
{
    for (int a = 0; a < KEYX_ALG_COUNT; a++)
        if (EVP_PKEY_is_a(pub, keyx_alg_name((keyx_alg)a))) {
            *alg = (keyx_alg)a;
            return 1;
        }
    return 0;
}

keyx_key *keyx_key_adopt(keyx_provctx *p, keyx_backend *be, void *handle, EVP_PKEY *pub)
{
    keyx_key *k = NULL;
    keyx_alg alg;

    if (!alg_of(pub, &alg)) {
        KEYX_ERR(p, KEYX_R_UNSUPPORTED, "%s: the key is of a type keyx does not serve",
                 be->ops->name);
    } else if ((k = keyx_key_new(p, alg)) != NULL) {
        if (!keyx_key_set_pub(k, pub)) {
            keyx_key_free(k);
            keyx_backend_free(be, handle);
            return NULL;
        }
        if (!keyx_key_attach(k, be, handle, 0)) {
            keyx_key_free(k);
            return NULL;
        }
        keyx_key_event(k, "load", 1, NULL);
        return k;
    }
    keyx_backend_free(be, handle);
    EVP_PKEY_free(pub);
    return NULL;
}

int keyx_key_pass(keyx_key *k, OSSL_CALLBACK *cb, void *cbarg)
{
    int type = OSSL_OBJECT_PKEY, ok;
    OSSL_PARAM params[4];

    params[0] = OSSL_PARAM_construct_int(OSSL_OBJECT_PARAM_TYPE, &type);
    params[1] = OSSL_PARAM_construct_utf8_string(OSSL_OBJECT_PARAM_DATA_TYPE,
                                                 (char *)keyx_alg_name(k->alg), 0);
    /* keyx's keymgmt load() takes the key over and clears the pointer. */
    params[2] = OSSL_PARAM_construct_octet_string(OSSL_OBJECT_PARAM_REFERENCE, &k, sizeof(k));
    params[3] = OSSL_PARAM_construct_end();
    ok = cb(params, cbarg);
    keyx_key_free(k); /* NULL when OpenSSL took it */
    return ok;
}

int keyx_key_pass_refused(keyx_alg alg, OSSL_CALLBACK *cb, void *cbarg)
{
    int type = OSSL_OBJECT_PKEY;
    keyx_key *none = NULL; /* keyx_km_load() gives NULL for it */
    OSSL_PARAM params[4];

    params[0] = OSSL_PARAM_construct_int(OSSL_OBJECT_PARAM_TYPE, &type);
    params[1] = OSSL_PARAM_construct_utf8_string(OSSL_OBJECT_PARAM_DATA_TYPE,
                                                 (char *)keyx_alg_name(alg), 0);
    params[2] = OSSL_PARAM_construct_octet_string(OSSL_OBJECT_PARAM_REFERENCE, &none, sizeof(none));
    params[3] = OSSL_PARAM_construct_end();
    (void)cb(params, cbarg);
    return 0;
}

int keyx_key_has_private(const keyx_key *k)
{
    return k->priv != NULL;
}

const char *keyx_key_backend_name(const keyx_key *k)
{
    return k->priv != NULL ? k->priv->be->ops->name : NULL;
}

int keyx_key_locator(keyx_key *k, char **out)
{
    keyx_priv *pv = k->priv;
    int ok = 0;

    *out = NULL;
    if (pv == NULL) {
        KEYX_ERR(k->prov, KEYX_R_MISSING_KEY,
                 "a public key has no location: only keys with "
                 "their private part in a backend have one");
        return 0;
    }
    if (!CRYPTO_THREAD_read_lock(pv->lock))
        return 0;
    if (pv->handle == NULL)
        KEYX_ERR(k->prov, KEYX_R_KEY_USED_UP, "the key has been destroyed");
    else
        ok = keyx_backend_locator(pv->be, pv->handle, out) == 1;
    CRYPTO_THREAD_unlock(pv->lock);
    return ok;
}

int keyx_key_exports_private(const keyx_key *k)
{
    return k->priv == NULL || k->priv->be->ops->exports_private;
}

/* Copy of the public view limited to selection (domain parameters, public key). */
static EVP_PKEY *copy_pub(const keyx_key *k, int selection)
{
    EVP_PKEY_CTX *ctx = NULL;
    EVP_PKEY *out = NULL;
    OSSL_PARAM *params = NULL;
    int sel = selection & ~OSSL_KEYMGMT_SELECT_PRIVATE_KEY;

    if (keyx_alg_has_domain(k->alg))
        sel |= OSSL_KEYMGMT_SELECT_ALL_PARAMETERS; /* a public key needs its group */
    else if ((sel & OSSL_KEYMGMT_SELECT_PUBLIC_KEY) == 0 || !k->has_public)
        return NULL; /* X25519/X448/RSA have no parameters to copy: an empty key */
    if (EVP_PKEY_todata(keyx_key_pub(k), sel, &params) == 1 &&
        (ctx = EVP_PKEY_CTX_new_from_name(k->prov->libctx, keyx_alg_name(k->alg), NULL)) != NULL &&
        EVP_PKEY_fromdata_init(ctx) == 1)
        EVP_PKEY_fromdata(ctx, &out, sel, params);
    OSSL_PARAM_free(params);
    EVP_PKEY_CTX_free(ctx);
    return out;
}

keyx_key *keyx_key_dup(const keyx_key *k, int selection)
{
    keyx_key *d = keyx_key_new(k->prov, k->alg);
    EVP_PKEY *pub = NULL;
    int with_private = (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) && k->priv != NULL;

    if (d == NULL)
        return NULL;
    if (keyx_key_is_empty(k)) {
        /* nothing to copy */
    } else if (__atomic_load_n(&k->view, __ATOMIC_ACQUIRE) == NULL) {
        /* a key with no view yet: the copy makes its own when needed */
        int ecx = k->ecx_publen != 0;

        if (with_private || (selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY)) {
            if (!keyx_key_set_raw(d, k->group, k->domain, ecx ? k->ecx_pub : k->ec_point,
                                  ecx ? k->ecx_publen : k->ec_pointlen)) {
                keyx_key_free(d);
                return NULL;
            }
        } else if (k->domain != NULL && (selection & OSSL_KEYMGMT_SELECT_ALL_PARAMETERS) &&
                   EVP_PKEY_up_ref(k->domain)) {
            keyx_key_set_pub(d, k->domain); /* the group's parameters alone (shared) */
        }
    } else {
        pub = with_private ? EVP_PKEY_dup(keyx_key_pub(k)) : copy_pub(k, selection);
        if (pub == NULL && (with_private || keyx_alg_has_domain(k->alg) ||
                            (k->has_public && (selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY)))) {
            KEYX_ERR(k->prov, KEYX_R_INTERNAL, "cannot duplicate %s key", keyx_alg_name(k->alg));
            keyx_key_free(d);
            return NULL;
        }
        keyx_key_set_pub(d, pub);
    }
    if (with_private) {
        int refs;

        CRYPTO_atomic_add(&k->priv->refs, 1, &refs, k->priv->lock);
        d->priv = k->priv;
        memcpy(d->id, k->id, sizeof(d->id));
    }
    d->public_checked = k->public_checked;
    if (pub != NULL && d->has_public && k->ec_pointlen != 0) {
        memcpy(d->ec_point, k->ec_point, k->ec_pointlen);
        d->ec_pointlen = k->ec_pointlen;
    }
    return d;
}

size_t keyx_key_secret_size(const keyx_key *k)
{
    switch (k->alg) {
    case KEYX_ALG_X25519:
        return 32;
    case KEYX_ALG_X448:
        return 56;
    case KEYX_ALG_EC:
        /* a key without a view yet answers from its group (set once, before the key is shared) */
        return k->domain != NULL ? ((size_t)EVP_PKEY_get_bits(k->domain) + 7) / 8
               : k->view != NULL ? ((size_t)EVP_PKEY_get_bits(k->view) + 7) / 8
                                 : 0;
    case KEYX_ALG_DH:
    case KEYX_ALG_DHX:
        return k->view != NULL ? (size_t)EVP_PKEY_get_size(k->view) : 0;
    default:
        return 0;
    }
}

/* Explicit parameters lose what made them wrong (OpenSSL rebuilds a bad cofactor) before keyx
 * sees them, so they are refused as such. */
static int explicit_curve(const EVP_PKEY *pub)
{
    char enc[16] = "";
    int decoded = 0, r;

    ERR_set_mark();
    r = (EVP_PKEY_get_utf8_string_param(pub, OSSL_PKEY_PARAM_EC_ENCODING, enc, sizeof(enc), NULL) ==
             1 &&
         strcmp(enc, OSSL_PKEY_EC_ENCODING_EXPLICIT) == 0) ||
        (EVP_PKEY_get_int_param(pub, OSSL_PKEY_PARAM_EC_DECODED_FROM_EXPLICIT_PARAMS, &decoded) ==
             1 &&
         decoded);
    ERR_pop_to_mark();
    return r;
}

int keyx_key_check_peer(keyx_key *k, keyx_key *peer)
{
    EVP_PKEY_CTX *ctx;
    int ok;

    if (peer == NULL || peer->alg != k->alg) {
        KEYX_ERR(k->prov, KEYX_R_KEY_MISMATCH, "peer key is not a %s key", keyx_alg_name(k->alg));
        return 0;
    }
    if (!peer->has_public || keyx_key_is_empty(k)) {
        KEYX_ERR(k->prov, KEYX_R_MISSING_KEY, "peer %s key has no public key",
                 keyx_alg_name(k->alg));
        return 0;
    }
    /* A named curve must meet the same named curve: OpenSSL names explicit parameters only when
     * all of them (cofactor included) match a built-in curve, and EC_GROUP_cmp would let a
     * peer with a wrong cofactor pass. */
    if ((k->alg == KEYX_ALG_EC && k->group[0] != '\0' && strcmp(k->group, peer->group) != 0) ||
        /* named curves: the same name is the same parameters */
        (keyx_alg_has_domain(k->alg) && (k->alg != KEYX_ALG_EC || k->group[0] == '\0') &&
         EVP_PKEY_parameters_eq(keyx_key_pub(k), keyx_key_pub(peer)) != 1)) {
        KEYX_ERR(k->prov, KEYX_R_KEY_MISMATCH, "peer key is on %s, ours on %s",
                 peer->group[0] ? peer->group : "other parameters",
                 k->group[0] ? k->group : "explicit parameters");
        return 0;
    }
    if (k->alg == KEYX_ALG_EC && explicit_curve(keyx_key_pub(peer))) {
        KEYX_ERR(k->prov, KEYX_R_INVALID_PEER_KEY,
                 "peer key carries explicit curve parameters; keyx accepts named curves only "
                 "(RFC 5480), as TLS sends them");
        return 0;
    }
    if ((k->alg == KEYX_ALG_X25519 || k->alg == KEYX_ALG_X448) &&
        !keyx_ecx_raw_ok(k->alg, peer->ecx_pub, peer->ecx_publen)) {
        KEYX_ERR(k->prov, KEYX_R_INVALID_PEER_KEY,
                 "peer %s key is a small-order point: the shared secret would be zero",
                 keyx_alg_name(k->alg));
        return 0;
    }
    if (__atomic_load_n(&peer->public_checked, __ATOMIC_ACQUIRE))
        return 1;
    /* EC: on the curve and not at infinity (our curves have cofactor 1). DH: 2 <= y <= p-2
     * and, when q is known, y in the order-q subgroup. */
    if (keyx_alg_is_dh(k->alg)) {
        ok = keyx_dh_public_ok(keyx_key_pub(peer));
    } else if (k->alg == KEYX_ALG_EC) {
        ctx = EVP_PKEY_CTX_new_from_pkey(k->prov->libctx, keyx_key_pub(peer), NULL);
        ok = ctx != NULL && EVP_PKEY_public_check_quick(ctx) == 1;
        EVP_PKEY_CTX_free(ctx);
    } else {
        return 1;
    }
    if (!ok) {
        KEYX_ERR(k->prov, KEYX_R_INVALID_PEER_KEY,
                 k->alg == KEYX_ALG_EC
                     ? "peer point is not on %s or is the point at infinity"
                     : "peer DH public value is outside [2, p-2] or not in the subgroup of %s",
                 k->group[0] ? k->group : "the key's parameters");
        return 0;
    }
    return 1;
}

/* One use of k's private part: counts it against ephemeral-max-uses, runs op under the read
 * lock, writes the event and destroys the key after its last permitted use. op returns what the
 * backend returned; *done tells whether op ran (the key was not used up). */
typedef int (*priv_op)(keyx_priv *pv, void *arg);

static int key_use(keyx_key *k, const char *event, priv_op op, void *arg, int *done)
{
    keyx_priv *pv = k->priv;
    uint64_t max = k->prov->cfg.ephemeral_max_uses, n = 0;
    int ok = 0, gone;

    *done = 0;
    if (pv == NULL) {
        KEYX_ERR(k->prov, KEYX_R_MISSING_KEY, "%s key has no private part for %s",
                 keyx_alg_name(k->alg), event);
        return 0;
    }
    if (max != 0 && pv->ephemeral)
        n = __atomic_add_fetch(&pv->uses, 1, __ATOMIC_ACQ_REL);
    if (n > max || !CRYPTO_THREAD_read_lock(pv->lock))
        goto used_up;
    gone = pv->handle == NULL;
    if (!gone)
        ok = op(pv, arg);
    CRYPTO_THREAD_unlock(pv->lock);
    if (gone)
        goto used_up;
    *done = 1;
    /* The last permitted use destroys the key at once. */
    if (max != 0 && n == max && CRYPTO_THREAD_write_lock(pv->lock)) {
        priv_destroy(k);
        CRYPTO_THREAD_unlock(pv->lock);
    }
    return ok;

used_up:
    KEYX_ERR(k->prov, KEYX_R_KEY_USED_UP,
             "this ephemeral %s key reached ephemeral-max-uses = %llu and was destroyed; "
             "generate a new key",
             keyx_alg_name(k->alg), (unsigned long long)max);
    keyx_key_event(k, event, 0, "key used up (ephemeral-max-uses reached)");
    return 0;
}

typedef struct derive_args {
    keyx_peer peer;
    unsigned char *out;
    size_t outlen;
} derive_args;

static int derive_op(keyx_priv *pv, void *arg)
{
    derive_args *a = arg;

    return keyx_backend_derive(pv->be, pv->handle, &a->peer, a->out, a->outlen);
}

int keyx_key_derive_as(keyx_key *k, keyx_key *peer, const char *event, unsigned char *out,
                       size_t outlen)
{
    int ecx = peer->ecx_publen != 0;
    /* an X25519/X448 peer goes by its raw key to a backend in process memory, with no view */
    int raw = ecx && k->priv != NULL && k->priv->be->ops->exports_private;
    derive_args a = {{raw ? __atomic_load_n(&peer->view, __ATOMIC_ACQUIRE) : keyx_key_pub(peer),
                      ecx                      ? peer->ecx_pub
                      : peer->ec_pointlen != 0 ? peer->ec_point
                                               : NULL,
                      ecx ? peer->ecx_publen : peer->ec_pointlen},
                     out,
                     outlen};
    int done, ok = key_use(k, event, derive_op, &a, &done);

    if (done)
        keyx_key_event(k, event, ok == 1, ok == 1 ? NULL : "key agreement failed in the backend");
    return ok == 1;
}

int keyx_key_derive(keyx_key *k, keyx_key *peer, unsigned char *out, size_t outlen)
{
    return keyx_key_derive_as(k, peer, "derive", out, outlen);
}

typedef struct decrypt_args {
    const keyx_rsa_op *op;
    const unsigned char *in;
    size_t inlen;
    unsigned char *out;
    size_t *outlen;
} decrypt_args;

static int decrypt_op(keyx_priv *pv, void *arg)
{
    decrypt_args *a = arg;

    return keyx_backend_rsa_decrypt(pv->be, pv->handle, a->op, a->in, a->inlen, a->out, a->outlen);
}

int keyx_key_decrypt(keyx_key *k, const char *event, const keyx_rsa_op *op, const unsigned char *in,
                     size_t inlen, unsigned char *out, size_t *outlen)
{
    decrypt_args a = {op, in, inlen, out, outlen};
    size_t cap = *outlen;
    int done, ok;

    ERR_set_mark();
    ok = key_use(k, event, decrypt_op, &a, &done);
    if (ok == KEYX_RSA_DECRYPT_ERROR) {
        /* Whatever the backend said about the cause stays inside: one error for all. */
        ERR_pop_to_mark();
        OPENSSL_cleanse(out, cap);
        KEYX_ERR(k->prov, KEYX_R_BACKEND_FAILURE,
                 "RSA decryption failed: the ciphertext does not decrypt under this key with "
                 "these parameters");
    } else {
        ERR_clear_last_mark();
    }
    if (done)
        keyx_key_event(k, event, ok == 1,
                       ok == 1                        ? NULL
                       : ok == KEYX_RSA_DECRYPT_ERROR ? "decryption failed"
                                                      : "refused or failed in the backend");
    return ok == 1;
}

int keyx_key_sign_check(keyx_key *k, const keyx_sign_op *op)
{
    keyx_priv *pv = k->priv;
    int ok = 0;

    if (pv == NULL) {
        KEYX_ERR(k->prov, KEYX_R_MISSING_KEY, "%s key has no private part to sign with",
                 keyx_alg_name(k->alg));
        return 0;
    }
    if (!CRYPTO_THREAD_read_lock(pv->lock))
        return 0;
    if (pv->handle == NULL)
        KEYX_ERR(k->prov, KEYX_R_KEY_USED_UP, "the key has been destroyed");
    else
        ok = keyx_backend_sign_check(pv->be, pv->handle, op) == 1;
    CRYPTO_THREAD_unlock(pv->lock);
    return ok;
}

typedef struct sign_args {
    const keyx_sign_op *op;
    const unsigned char *dgst;
    size_t dlen;
    unsigned char *sig;
    size_t *siglen;
} sign_args;

static int sign_op(keyx_priv *pv, void *arg)
{
    sign_args *a = arg;

    return keyx_backend_sign(pv->be, pv->handle, a->op, a->dgst, a->dlen, a->sig, a->siglen);
}

int keyx_key_sign(keyx_key *k, const keyx_sign_op *op, const unsigned char *dgst, size_t dlen,
                  unsigned char *sig, size_t *siglen)
{
    sign_args a = {op, dgst, dlen, sig, siglen};
    int done, ok = key_use(k, "sign", sign_op, &a, &done);

    if (done)
        keyx_key_event(k, "sign", ok == 1, ok == 1 ? NULL : "refused or failed in the backend");
    return ok == 1;
}
