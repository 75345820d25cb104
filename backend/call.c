#include "backend/call.h"
#include "backend/router.h"
#include "provider/errors.h"
#include "provider/provctx.h"

static _Thread_local int inside_backend;

/* A device failure is remembered for the provider's state parameters (router.h). */
static int noted(keyx_backend *be, int rc)
{
    if (rc == KEYX_BACKEND_DOWN && be->prov != NULL)
        keyx_router_note_down(be->prov->router, be);
    return rc;
}

int keyx_check_not_reentered(const struct keyx_provctx *p, const char *what)
{
    if (!inside_backend)
        return 1;
    KEYX_ERR(p, KEYX_R_RECURSION,
             "%s was requested from inside a keyx backend call (a backend library uses "
             "libcrypto with keyx preferred); keyx does not serve its own backends",
             what);
    return 0;
}

int keyx_backend_generate(keyx_backend *be, const keyx_keyspec *spec, void **handle, EVP_PKEY **pub)
{
    int ok;

    inside_backend++;
    ok = be->ops->generate(be->state, spec, handle, pub);
    inside_backend--;
    return noted(be, ok);
}

int keyx_backend_import(keyx_backend *be, EVP_PKEY *key, void **handle, EVP_PKEY **pub)
{
    int ok;

    inside_backend++;
    ok = be->ops->import(be->state, key, handle, pub);
    inside_backend--;
    return noted(be, ok);
}

int keyx_backend_load(keyx_backend *be, const char *locator, void **handle, EVP_PKEY **pub)
{
    int ok;

    inside_backend++;
    ok = be->ops->load(be->state, locator, handle, pub);
    inside_backend--;
    return noted(be, ok);
}

int keyx_backend_load_deferred(keyx_backend *be, const char *locator, EVP_PKEY *recorded,
                               void **handle, EVP_PKEY **pub)
{
    int ok;

    inside_backend++;
    ok = be->ops->load_deferred(be->state, locator, recorded, handle, pub);
    inside_backend--;
    return noted(be, ok);
}

int keyx_backend_derive(keyx_backend *be, void *handle, const keyx_peer *peer,
                        unsigned char *secret, size_t secretlen)
{
    int ok;

    inside_backend++;
    ok = be->ops->derive(be->state, handle, peer, secret, secretlen);
    inside_backend--;
    return noted(be, ok);
}

int keyx_backend_rsa_decrypt(keyx_backend *be, void *handle, const keyx_rsa_op *op,
                             const unsigned char *in, size_t inlen, unsigned char *out,
                             size_t *outlen)
{
    int ok;

    if (be->ops->rsa_decrypt == NULL) {
        KEYX_ERR(be->prov, KEYX_R_UNSUPPORTED, "the %s backend holds no RSA keys", be->ops->name);
        return 0;
    }
    inside_backend++;
    ok = be->ops->rsa_decrypt(be->state, handle, op, in, inlen, out, outlen);
    inside_backend--;
    return noted(be, ok);
}

void keyx_backend_free(keyx_backend *be, void *handle)
{
    inside_backend++;
    be->ops->free(be->state, handle);
    inside_backend--;
}

int keyx_backend_locator(keyx_backend *be, void *handle, char **out)
{
    int ok;

    if (be->ops->locator == NULL) {
        KEYX_ERR(be->prov, KEYX_R_KEY_NOT_WRITABLE,
                 "the %s backend has no static keys: its keys cannot be referred to",
                 be->ops->name);
        return 0;
    }
    inside_backend++;
    ok = be->ops->locator(be->state, handle, out);
    inside_backend--;
    return noted(be, ok);
}

int keyx_backend_load_encoded(keyx_backend *be, const char *format, const unsigned char *der,
                              size_t len, void **handle, EVP_PKEY **pub)
{
    int ok;

    if (be->ops->load_encoded == NULL) {
        KEYX_ERR(be->prov, KEYX_R_UNSUPPORTED, "the %s backend cannot load a %s", be->ops->name,
                 format);
        return 0;
    }
    inside_backend++;
    ok = be->ops->load_encoded(be->state, format, der, len, handle, pub);
    inside_backend--;
    return noted(be, ok);
}

int keyx_backend_objects(keyx_backend *be, const char *locator, int kinds, keyx_object **out,
                         size_t *n)
{
    int ok;

    *out = NULL;
    *n = 0;
    if (be->ops->objects == NULL) {
        KEYX_ERR(be->prov, KEYX_R_UNSUPPORTED, "the %s backend cannot list its objects",
                 be->ops->name);
        return 0;
    }
    inside_backend++;
    ok = be->ops->objects(be->state, locator, kinds, out, n);
    inside_backend--;
    return noted(be, ok);
}

void keyx_objects_free(keyx_object *objs, size_t n)
{
    for (size_t i = 0; objs != NULL && i < n; i++) {
        OPENSSL_free(objs[i].locator);
        OPENSSL_free(objs[i].der);
        OPENSSL_free(objs[i].subject);
    }
    OPENSSL_free(objs);
}

int keyx_backend_sign_check(keyx_backend *be, void *handle, const keyx_sign_op *op)
{
    int ok;

    if (be->ops->sign_check == NULL || be->ops->sign == NULL) {
        KEYX_ERR(be->prov, KEYX_R_UNSUPPORTED, "the %s backend cannot sign", be->ops->name);
        return 0;
    }
    inside_backend++;
    ok = be->ops->sign_check(be->state, handle, op);
    inside_backend--;
    return noted(be, ok);
}

int keyx_backend_sign(keyx_backend *be, void *handle, const keyx_sign_op *op,
                      const unsigned char *dgst, size_t dlen, unsigned char *sig, size_t *siglen)
{
    int ok;

    if (be->ops->sign == NULL) {
        KEYX_ERR(be->prov, KEYX_R_UNSUPPORTED, "the %s backend cannot sign", be->ops->name);
        return 0;
    }
    inside_backend++;
    ok = be->ops->sign(be->state, handle, op, dgst, dlen, sig, siglen);
    inside_backend--;
    return noted(be, ok);
}
