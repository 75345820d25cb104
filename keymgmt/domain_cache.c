#include <string.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/params.h>

#include "keymgmt/domain_cache.h"

#define MAX_ENTRIES 16 /* 3 curves, 5 ffdhe groups, their aliases */

struct keyx_domain_cache {
    CRYPTO_RWLOCK *lock;
    int n;
    struct {
        keyx_alg alg;
        char name[32];
        EVP_PKEY *dom;
    } e[MAX_ENTRIES];
};

keyx_domain_cache *keyx_domain_cache_new(void)
{
    keyx_domain_cache *c = OPENSSL_zalloc(sizeof(*c));

    if (c != NULL && (c->lock = CRYPTO_THREAD_lock_new()) == NULL) {
        OPENSSL_free(c);
        c = NULL;
    }
    return c;
}

void keyx_domain_cache_free(keyx_domain_cache *c)
{
    if (c == NULL)
        return;
    for (int i = 0; i < c->n; i++)
        EVP_PKEY_free(c->e[i].dom);
    CRYPTO_THREAD_lock_free(c->lock);
    OPENSSL_free(c);
}

static EVP_PKEY *lookup(keyx_domain_cache *c, keyx_alg alg, const char *name)
{
    for (int i = 0; i < c->n; i++)
        if (c->e[i].alg == alg && strcmp(c->e[i].name, name) == 0)
            return EVP_PKEY_up_ref(c->e[i].dom) ? c->e[i].dom : NULL;
    return NULL;
}

static EVP_PKEY *make(OSSL_LIB_CTX *libctx, keyx_alg alg, const char *name)
{
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_name(libctx, keyx_alg_name(alg), NULL);
    OSSL_PARAM params[] = {
        OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, (char *)name, 0),
        OSSL_PARAM_END,
    };
    EVP_PKEY *dom = NULL;

    ERR_set_mark(); /* an unknown name is the caller's to report */
    if (ctx == NULL || EVP_PKEY_paramgen_init(ctx) != 1 ||
        EVP_PKEY_CTX_set_params(ctx, params) != 1 || EVP_PKEY_generate(ctx, &dom) != 1) {
        EVP_PKEY_free(dom);
        dom = NULL;
    }
    ERR_pop_to_mark();
    EVP_PKEY_CTX_free(ctx);
    return dom;
}

EVP_PKEY *keyx_domain_cache_get(keyx_domain_cache *c, OSSL_LIB_CTX *libctx, keyx_alg alg,
                                const char *name)
{
    EVP_PKEY *dom = NULL;

    if (c == NULL || !keyx_alg_has_domain(alg) || strlen(name) >= 32)
        return NULL;
    if (!CRYPTO_THREAD_read_lock(c->lock))
        return NULL;
    dom = lookup(c, alg, name);
    CRYPTO_THREAD_unlock(c->lock);
    if (dom != NULL)
        return dom;
    if ((dom = make(libctx, alg, name)) == NULL)
        return NULL;
    if (!CRYPTO_THREAD_write_lock(c->lock))
        return dom;
    {
        EVP_PKEY *raced = lookup(c, alg, name);

        if (raced != NULL) {
            EVP_PKEY_free(dom);
            dom = raced;
        } else if (c->n < MAX_ENTRIES && EVP_PKEY_up_ref(dom)) {
            c->e[c->n].alg = alg;
            strcpy(c->e[c->n].name, name);
            c->e[c->n].dom = dom;
            c->n++;
        }
    }
    CRYPTO_THREAD_unlock(c->lock);
    return dom;
}
