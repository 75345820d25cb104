/* The configured backends, in order, and the choice of one for each new key. */
#include <stdio.h>
#include <string.h>

#include <openssl/crypto.h>

#include "backend/router.h"
#include "provider/errors.h"
#include "provider/provctx.h"

struct keyx_router {
    keyx_backend backends[KEYX_BACKEND_KINDS];
    size_t n;
    keyx_backend *software; /* holder of imported keys: the listed one, or a private instance */
    keyx_backend own_software;
    char names[64]; /* "tpm, pkcs11, software": for error messages */
};

const char *keyx_alg_name(keyx_alg alg)
{
    static const char *const names[KEYX_ALG_COUNT] = {"EC", "X25519", "X448", "DH", "RSA"};

    return (unsigned)alg < KEYX_ALG_COUNT ? names[alg] : "?";
}

int keyx_alg_has_domain(keyx_alg alg)
{
    return alg == KEYX_ALG_EC || alg == KEYX_ALG_DH;
}

/* Backends built into this keyx; NULL: not available in this build. */
static const keyx_backend_ops *backend_ops(keyx_backend_kind kind)
{
    switch (kind) {
    case KEYX_BACKEND_SOFTWARE:
        return &keyx_software_backend;
    default:
        return NULL;
    }
}

static int backend_open(keyx_provctx *p, keyx_backend *be, const keyx_backend_ops *ops)
{
    be->ops = ops;
    be->prov = p;
    return ops->open(p, &be->state);
}

int keyx_router_new(keyx_provctx *p, keyx_router **out)
{
    keyx_router *r = OPENSSL_zalloc(sizeof(*r));

    *out = r;
    if (r == NULL)
        return 0;
    for (size_t i = 0; i < p->cfg.nbackends; i++) {
        keyx_backend_kind kind = p->cfg.backends[i];
        const keyx_backend_ops *ops = backend_ops(kind);
        size_t used = strlen(r->names);

        snprintf(r->names + used, sizeof(r->names) - used, "%s%s", used ? ", " : "",
                 keyx_backend_kind_name(kind));
        /* A listed backend that cannot work is an error, never a silent skip to the next. */
        if (ops == NULL) {
            KEYX_ERR(p, KEYX_R_BACKEND_UNAVAILABLE,
                     "backend '%s' is listed in backends but is not built into this keyx "
                     "(available: software)",
                     keyx_backend_kind_name(kind));
            return 0;
        }
        if (!backend_open(p, &r->backends[r->n], ops))
            return 0;
        if (kind == KEYX_BACKEND_SOFTWARE)
            r->software = &r->backends[r->n];
        r->n++;
    }
    if (r->software == NULL) {
        if (!backend_open(p, &r->own_software, &keyx_software_backend))
            return 0;
        r->software = &r->own_software;
    }
    return 1;
}

void keyx_router_free(keyx_router *r)
{
    if (r == NULL)
        return;
    for (size_t i = 0; i < r->n; i++)
        r->backends[i].ops->close(r->backends[i].state);
    if (r->software == &r->own_software)
        r->own_software.ops->close(r->own_software.state);
    OPENSSL_free(r);
}

int keyx_router_offers(keyx_router *r, const keyx_keyspec *spec)
{
    for (size_t i = 0; i < r->n; i++)
        if (r->backends[i].ops->supports(r->backends[i].state, spec))
            return 1;
    return 0;
}

keyx_backend *keyx_router_pick(keyx_router *r, const keyx_keyspec *spec)
{
    for (size_t i = 0; i < r->n; i++)
        if (r->backends[i].ops->supports(r->backends[i].state, spec))
            return &r->backends[i];
    KEYX_ERR(r->software->prov, KEYX_R_UNSUPPORTED,
             "%s%s%s: no backend in 'backends = %s' can generate it; add one that can "
             "(e.g. software) or use another group",
             keyx_alg_name(spec->alg), spec->group ? " " : "", spec->group ? spec->group : "",
             r->names);
    return NULL;
}

keyx_backend *keyx_router_software(keyx_router *r)
{
    return r->software;
}
