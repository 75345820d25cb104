/* Key generation: domain parameters are made in keyx's context (they are public), key pairs in
 * the first configured backend that supports the group. */
#include <stdio.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/params.h>

#include "backend/call.h"
#include "backend/router.h"
#include "keymgmt/algtab.h"
#include "keymgmt/domain_cache.h"
#include "keymgmt/gen_target.h"
#include "keymgmt/key.h"
#include "keymgmt/keymgmt.h"
#include "provider/audit.h"
#include "provider/errors.h"
#include "provider/fail_closed.h"

#define MAX_PARAM_SETS 16

typedef struct keyx_genctx {
    keyx_provctx *p;
    keyx_alg alg;
    int selection;
    EVP_PKEY *templ; /* domain parameters from gen_set_template */
    /* Copies of each gen_set_params array, applied in order at generation time. */
    OSSL_PARAM *sets[MAX_PARAM_SETS];
    size_t nsets;
} keyx_genctx;

void *keyx_km_gen_init(keyx_provctx *p, keyx_alg alg, int selection, const OSSL_PARAM params[])
{
    keyx_genctx *g;

    if (keyx_refused(p) || !keyx_check_not_reentered(p, "key generation"))
        return NULL;
    if ((g = OPENSSL_zalloc(sizeof(*g))) == NULL)
        return NULL;
    g->p = p;
    g->alg = alg;
    g->selection = selection;
    if (!keyx_km_gen_set_params(g, params)) {
        keyx_km_gen_cleanup(g);
        return NULL;
    }
    return g;
}

int keyx_km_gen_set_template(void *genctx, void *templ)
{
    keyx_genctx *g = genctx;
    keyx_key *t = templ;
    EVP_PKEY *dom = t != NULL ? keyx_key_pub(t) : NULL;

    if (dom == NULL || t->alg != g->alg || !EVP_PKEY_up_ref(dom)) {
        KEYX_ERR(g->p, KEYX_R_INVALID_ARGUMENT, "template is not a %s key with parameters",
                 keyx_alg_name(g->alg));
        return 0;
    }
    EVP_PKEY_free(g->templ);
    g->templ = dom;
    return 1;
}

/* OSSL_PARAM_dup copies data_size bytes, but callers may leave a string's size 0 (the
 * OSSL_PARAM_utf8_string macro does) and the default provider then reads up to the NUL: size
 * such strings first so the copy keeps them. */
static OSSL_PARAM *copy_params(const OSSL_PARAM params[])
{
    size_t n = 0;
    OSSL_PARAM *sized, *copy;

    while (params[n].key != NULL)
        n++;
    if ((sized = OPENSSL_memdup(params, (n + 1) * sizeof(*params))) == NULL)
        return NULL;
    for (size_t i = 0; i < n; i++)
        if (sized[i].data_type == OSSL_PARAM_UTF8_STRING && sized[i].data_size == 0 &&
            sized[i].data != NULL)
            sized[i].data_size = strlen(sized[i].data);
    copy = OSSL_PARAM_dup(sized);
    OPENSSL_free(sized);
    return copy;
}

int keyx_km_gen_set_params(void *genctx, const OSSL_PARAM params[])
{
    keyx_genctx *g = genctx;

    if (params == NULL || params[0].key == NULL)
        return 1;
    if (g->nsets == MAX_PARAM_SETS || (g->sets[g->nsets] = copy_params(params)) == NULL) {
        KEYX_ERR(g->p, KEYX_R_INVALID_ARGUMENT, "too many generation parameter sets");
        return 0;
    }
    g->nsets++;
    return 1;
}

const OSSL_PARAM *keyx_km_gen_settable_params(keyx_provctx *p, keyx_alg alg)
{
    return p->algs->gen_settable[alg];
}

void keyx_km_gen_cleanup(void *genctx)
{
    keyx_genctx *g = genctx;

    if (g == NULL)
        return;
    for (size_t i = 0; i < g->nsets; i++)
        OSSL_PARAM_free(g->sets[i]);
    EVP_PKEY_free(g->templ);
    OPENSSL_free(g);
}

/* All parameter sets as one array, later sets winning; *owned must be freed by the caller. */
static const OSSL_PARAM *merged_params(keyx_genctx *g, OSSL_PARAM **owned)
{
    OSSL_PARAM *m = NULL;

    *owned = NULL;
    if (g->nsets == 0)
        return NULL;
    if (g->nsets == 1)
        return g->sets[0];
    for (size_t i = 0; i < g->nsets; i++) {
        OSSL_PARAM *next = OSSL_PARAM_merge(m, g->sets[i]);

        OSSL_PARAM_free(m);
        if ((m = next) == NULL)
            return NULL;
    }
    *owned = m;
    return m;
}

/* Domain parameters (EC group, DH p/g) in keyx's context: from the template, else generated. */
static EVP_PKEY *domain_params(keyx_genctx *g, const OSSL_PARAM *params)
{
    EVP_PKEY_CTX *ctx;
    EVP_PKEY *dom = NULL;

    if (g->templ != NULL)
        return EVP_PKEY_up_ref(g->templ) ? g->templ : NULL;
    /* A named group and nothing else (libssl's key shares): the shared parameters */
    if (params != NULL && params[0].key != NULL && params[1].key == NULL &&
        strcmp(params[0].key, OSSL_PKEY_PARAM_GROUP_NAME) == 0 &&
        params[0].data_type == OSSL_PARAM_UTF8_STRING &&
        (dom = keyx_domain_cache_get(g->p->domains, g->p->libctx, g->alg, params[0].data)) != NULL)
        return dom;
    ctx = EVP_PKEY_CTX_new_from_name(g->p->libctx, keyx_alg_name(g->alg), NULL);
    if (ctx == NULL || EVP_PKEY_paramgen_init(ctx) != 1 ||
        (params != NULL && EVP_PKEY_CTX_set_params(ctx, params) != 1) ||
        EVP_PKEY_generate(ctx, &dom) != 1) {
        EVP_PKEY_free(dom);
        dom = NULL;
        KEYX_ERR(g->p, KEYX_R_INVALID_ARGUMENT,
                 "%s parameters: unknown or missing group (EC: P-256, P-384, P-521; DH: "
                 "ffdhe2048..ffdhe8192 or explicit p/g)",
                 keyx_alg_name(g->alg));
    }
    EVP_PKEY_CTX_free(ctx);
    return dom;
}

/* The curve name of an EC key-pair request without a template, else NULL. */
static const char *named_curve(keyx_genctx *g, const OSSL_PARAM *params)
{
    const OSSL_PARAM *p = OSSL_PARAM_locate_const(params, OSSL_PKEY_PARAM_GROUP_NAME);
    const char *name = NULL;

    if (g->templ != NULL || (g->selection & OSSL_KEYMGMT_SELECT_KEYPAIR) == 0 || p == NULL ||
        !OSSL_PARAM_get_utf8_string_ptr(p, &name) || name[0] == '\0')
        return NULL;
    return name;
}

/* The failure event carries the cause the backend raised (wrong PIN, module missing, TPM
 * down), still on the error queue, not only that generation failed. */
static void keygen_failed(keyx_genctx *g, const keyx_key *k, const keyx_backend *be, int ephemeral)
{
    const char *data = NULL;
    int flags = 0;

    if (ERR_peek_last_error_data(&data, &flags) == 0 || !(flags & ERR_TXT_STRING) || data == NULL ||
        data[0] == '\0')
        data = NULL;
    keyx_event ev = {
        .event = "keygen",
        .backend = be != NULL ? be->ops->name : NULL,
        .alg = keyx_alg_name(g->alg),
        .group = k->group[0] ? k->group : NULL,
        .ephemeral = ephemeral,
        .ok = 0,
        .error = data != NULL ? data
                 : be != NULL ? "backend failed to generate the key"
                              : "no configured backend supports this algorithm or group",
    };

    keyx_event_emit(g->p, &ev);
}

/* Generation in the backend the application named (keyx-backend, or implied by keyx-persist,
 * keyx-label, keyx-id): no routing and no failover, the key is wanted there or nowhere. */
static int generate_in(keyx_genctx *g, const keyx_gen_target *t, const keyx_keyspec *spec,
                       keyx_backend **be, void **handle, EVP_PKEY **pub)
{
    if ((*be = keyx_router_backend(g->p->router, t->kind)) == NULL)
        return 0;
    if (!(*be)->ops->supports((*be)->state, spec)) {
        /* "EC P-256", "X25519" (whose group is its name) */
        const char *group =
            spec->group != NULL && strcmp(spec->group, keyx_alg_name(spec->alg)) != 0 ? spec->group
                                                                                      : NULL;

        KEYX_ERR(g->p, KEYX_R_UNSUPPORTED, "the %s backend cannot generate %s%s%s keys",
                 (*be)->ops->name, keyx_alg_name(spec->alg), group ? " " : "", group ? group : "");
        return 0;
    }
    return keyx_backend_generate(*be, spec, handle, pub) == 1;
}

/* OpenSSL >= 3.2's seed for a key derived with RFC 9180 DeriveKeyPair (OSSL_HPKE_keygen with an
 * ikm, DHKEM's ikmE). */
#define PARAM_DHKEM_IKM "dhkem-ikm"

/* A key derived from a seed is computed from it by the default provider: only software can make
 * it, so it goes there or nowhere (a hardware backend would ignore the seed). */
static int seeded_in_software(keyx_genctx *g, keyx_gen_target *t, const keyx_keyspec *spec)
{
    int kind = t->named ? (int)t->kind : keyx_router_first_for(g->p->router, spec);

    if (kind == KEYX_BACKEND_SOFTWARE) {
        t->named = 1;
        t->kind = KEYX_BACKEND_SOFTWARE;
        return 1;
    }
    KEYX_ERR(g->p, KEYX_R_SEEDED_KEY,
             "a %s key derived from a seed (dhkem-ikm, an HPKE ikm or ikmE) is made in software "
             "only, and %s%s would make this one: leave out the seed, or list software first in "
             "backends for this group",
             keyx_alg_name(g->alg), kind < 0 ? "no configured backend" : "the backend ",
             kind < 0 ? "" : keyx_backend_kind_name((keyx_backend_kind)kind));
    return 0;
}

/* A key the backend made without a view: known by its raw public key until a view is needed. */
static int public_raw(keyx_key *k, const keyx_keyspec *spec, keyx_backend *be, void *handle)
{
    unsigned char raw[KEYX_PUBLIC_RAW_MAX];
    size_t len = be->ops->public_raw != NULL ? be->ops->public_raw(be->state, handle, raw) : 0;

    if (len == 0 || !keyx_key_set_raw(k, spec->group, spec->domain, raw, len)) {
        keyx_backend_free(be, handle);
        KEYX_ERR(k->prov, KEYX_R_BACKEND_FAILURE, "the %s backend gave no %s public key",
                 be->ops->name, keyx_alg_name(k->alg));
        return 0;
    }
    return 1;
}

void *keyx_km_gen(void *genctx, OSSL_CALLBACK *cb, void *cbarg)
{
    keyx_genctx *g = genctx;
    OSSL_PARAM *owned = NULL;
    const OSSL_PARAM *params = merged_params(g, &owned);
    keyx_key *k = keyx_key_new(g->p, g->alg);
    EVP_PKEY *dom = NULL, *pub = NULL, *named = NULL;
    keyx_backend *be = NULL;
    void *handle = NULL;
    keyx_keyspec spec = {.alg = g->alg, .params = params};
    const OSSL_PARAM *bits;
    const char *name;
    keyx_gen_target target;

    (void)cb;
    (void)cbarg;
    if (k == NULL || (g->nsets > 1 && params == NULL) ||
        !keyx_gen_target_parse(g->p, params, &target))
        goto err;
    spec.persist = target.persistent ? &target.persist : NULL;
    if (g->alg == KEYX_ALG_EC && (name = named_curve(g, params)) != NULL) {
        /* A key pair on a named curve: the name is enough; the shared parameters come along
         * so that a backend builds the public key from them instead of a new EC_GROUP. */
        spec.group = keyx_group_canonical(name);
        snprintf(k->group, sizeof(k->group), "%s", spec.group);
        spec.domain = named = keyx_domain_cache_get(g->p->domains, g->p->libctx, g->alg, name);
    } else if (keyx_alg_has_domain(g->alg)) {
        if ((dom = domain_params(g, params)) == NULL || !keyx_key_set_pub(k, dom))
            goto err;
        spec.domain = dom;
        spec.group = k->group[0] ? k->group : NULL;
        spec.bits = (size_t)EVP_PKEY_get_bits(dom);
    } else if (g->alg == KEYX_ALG_RSA) {
        size_t b = 2048;

        bits = OSSL_PARAM_locate_const(params, OSSL_PKEY_PARAM_RSA_BITS);
        if (bits != NULL && !OSSL_PARAM_get_size_t(bits, &b))
            goto err;
        spec.bits = b;
    } else {
        spec.group = keyx_alg_name(g->alg);
        snprintf(k->group, sizeof(k->group), "%s", spec.group);
    }
    if ((g->selection & OSSL_KEYMGMT_SELECT_KEYPAIR) == 0) {
        /* Parameters only: nothing is created in any backend. */
        EVP_PKEY_free(named);
        OSSL_PARAM_free(owned);
        return k;
    }
    if (OSSL_PARAM_locate_const(params, PARAM_DHKEM_IKM) != NULL &&
        !seeded_in_software(g, &target, &spec))
        goto fail;
    if (target.named ? !generate_in(g, &target, &spec, &be, &handle, &pub)
                     : !keyx_router_generate(g->p->router, &spec, &be, &handle, &pub))
        goto fail;
    if (pub == NULL && !public_raw(k, &spec, be, handle))
        goto err;
    /* A persistent key is no ephemeral one: freeing it never deletes it from the device. */
    if ((pub != NULL && !keyx_key_set_pub(k, pub)) ||
        !keyx_key_attach(k, be, handle, !target.persistent))
        goto err;
    keyx_key_event(k, "keygen", 1, NULL);
    EVP_PKEY_free(named);
    OSSL_PARAM_free(owned);
    return k;

fail:
    keygen_failed(g, k, be, !target.persistent);
err:
    EVP_PKEY_free(named);
    OSSL_PARAM_free(owned);
    keyx_key_free(k);
    return NULL;
}
