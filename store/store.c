/* STORE for keyx: and pkcs11: URIs. A URI names a key in a backend ("keyx:tpm:handle=0x81000002",
 * "pkcs11:token=keyx;object=srv", "keyx:pkcs11:..."); the backend loads it and the key goes back to
 * OpenSSL by reference, so the private part never leaves the backend. */
#include <string.h>

#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/core_object.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/store.h>

#include "backend/call.h"
#include "backend/router.h"
#include "keymgmt/key.h"
#include "provider/audit.h"
#include "provider/dispatch.h"
#include "provider/errors.h"
#include "store/uri.h"
#include "provider/fail_closed.h"

typedef struct keyx_store {
    keyx_provctx *p;
    char *uri_text;
    keyx_store_uri uri;
    int expect; /* OSSL_STORE_INFO_* the application asked for; 0: anything */
    int started;
    int done;
    /* A URI naming several keys (a token, "pkcs11:token=keyx"): their locators, one key per
     * load() call */
    keyx_backend *be;
    char **items;
    size_t nitems, next;
    int empty; /* the URI names a collection without keys */
} keyx_store;

static void *store_open(void *provctx, const char *uri)
{
    keyx_provctx *p = provctx;
    keyx_store *s;

    if (keyx_refused(p) || !keyx_check_not_reentered(p, "a keyx URI") || uri == NULL)
        return NULL;
    if ((s = OPENSSL_zalloc(sizeof(*s))) == NULL) {
        KEYX_ERR(p, KEYX_R_INTERNAL, "out of memory");
        return NULL;
    }
    s->p = p;
    /* A malformed URI is reported by load(): OpenSSL drops errors raised here when it retries
     * the URI as a file name, and the user would only read "No such file". */
    if ((s->uri_text = OPENSSL_strdup(uri)) == NULL) {
        OPENSSL_free(s);
        KEYX_ERR(p, KEYX_R_INTERNAL, "out of memory");
        return NULL;
    }
    return s;
}

static const OSSL_PARAM *store_settable_ctx_params(void *provctx)
{
    static const OSSL_PARAM settable[] = {
        OSSL_PARAM_int(OSSL_STORE_PARAM_EXPECT, NULL),
        OSSL_PARAM_END,
    };

    (void)provctx;
    return settable;
}

static int store_set_ctx_params(void *loaderctx, const OSSL_PARAM params[])
{
    keyx_store *s = loaderctx;
    const OSSL_PARAM *e = OSSL_PARAM_locate_const(params, OSSL_STORE_PARAM_EXPECT);

    return e == NULL || OSSL_PARAM_get_int(e, &s->expect);
}

static void load_failed(keyx_store *s, const char *backend)
{
    keyx_event ev = {
        .event = "load",
        .backend = backend,
        .ephemeral = 0,
        .ok = 0,
        .error = "the key named by the URI could not be loaded",
    };

    keyx_event_emit(s->p, &ev);
}

/* The key locator names in be, with its private part attached by reference; NULL + error. */
static keyx_key *load_locator(keyx_store *s, keyx_backend *be, const char *locator)
{
    void *handle = NULL;
    EVP_PKEY *pub = NULL;

    if (be->ops->load == NULL) {
        KEYX_ERR(s->p, KEYX_R_UNSUPPORTED, "the %s backend has no keys to load by URI",
                 be->ops->name);
        return NULL;
    }
    if (keyx_backend_load(be, locator, &handle, &pub) != 1) {
        load_failed(s, be->ops->name);
        return NULL;
    }
    return keyx_key_adopt(s->p, be, handle, pub);
}

static void free_items(keyx_store *s)
{
    for (size_t i = 0; i < s->nitems; i++)
        OPENSSL_free(s->items[i]);
    OPENSSL_free(s->items);
    s->items = NULL;
    s->nitems = s->next = 0;
}

/* First load(): parses the URI and, when it names no object (a token: "pkcs11:token=keyx") and
 * the backend lists keys, asks which keys it names. Several: they are returned one per call. A
 * URI that names an object (object=, id=) and matches several keys stays an error: a key chosen
 * by the order of a listing could be the wrong one. None, on a URI naming no object (an empty
 * token): nothing, no error. One, or none on a URI naming an object, or a listing that failed: the
 * URI is loaded as one key, with the errors that has always given (unknown token or key). 1 or 0
 * with an error raised. */
static int start(keyx_store *s)
{
    char **items = NULL;
    size_t n = 0;

    s->started = 1;
    if (!keyx_store_uri_parse(s->p, s->uri_text, &s->uri) ||
        (s->be = keyx_router_backend(s->p->router, s->uri.backend)) == NULL)
        return 0;
    if (s->be->ops->enumerate == NULL || keyx_store_uri_names_object(&s->uri))
        return 1;
    ERR_set_mark();
    if (keyx_backend_enumerate(s->be, s->uri.locator, &items, &n) != 1) {
        ERR_pop_to_mark(); /* the single-key load below says what is wrong */
        return 1;
    }
    ERR_clear_last_mark();
    s->items = items;
    s->nitems = n;
    if (n > 1)
        return 1;
    s->empty = n == 0;
    free_items(s); /* the single-key path serves */
    return 1;
}

static int store_load(void *loaderctx, OSSL_CALLBACK *object_cb, void *object_cbarg,
                      OSSL_PASSPHRASE_CALLBACK *pw_cb, void *pw_cbarg)
{
    keyx_store *s = loaderctx;
    keyx_key *k;

    (void)pw_cb; /* PINs come from the configuration (pkcs11-pin), never from a prompt */
    (void)pw_cbarg;
    if (s->done)
        return 0;
    /* Keys only: an application looking for certificates or CRLs here finds nothing. */
    if (s->expect != 0 && s->expect != OSSL_STORE_INFO_PKEY &&
        s->expect != OSSL_STORE_INFO_PUBKEY) {
        s->done = 1;
        return 1;
    }
    if (!s->started && !start(s)) {
        s->done = 1;
        return 0;
    }
    if (s->nitems > 0) {
        /* a listing: the next key by its locator */
        const char *loc = s->items[s->next++];

        s->done = s->next == s->nitems;
        if ((k = load_locator(s, s->be, loc)) == NULL)
            return 0;
        return keyx_key_pass(k, object_cb, object_cbarg);
    }
    s->done = 1;
    if (s->empty)
        return 1;
    if ((k = load_locator(s, s->be, s->uri.locator)) == NULL)
        return 0;
    return keyx_key_pass(k, object_cb, object_cbarg);
}

static int store_eof(void *loaderctx)
{
    return ((keyx_store *)loaderctx)->done;
}

static int store_close(void *loaderctx)
{
    keyx_store *s = loaderctx;

    if (s != NULL) {
        free_items(s);
        keyx_store_uri_clear(&s->uri);
        OPENSSL_free(s->uri_text);
    }
    OPENSSL_free(s);
    return 1;
}

#define FN(f) ((void (*)(void))(f))

const OSSL_DISPATCH keyx_store_functions[] = {
    {OSSL_FUNC_STORE_OPEN, FN(store_open)},
    {OSSL_FUNC_STORE_SETTABLE_CTX_PARAMS, FN(store_settable_ctx_params)},
    {OSSL_FUNC_STORE_SET_CTX_PARAMS, FN(store_set_ctx_params)},
    {OSSL_FUNC_STORE_LOAD, FN(store_load)},
    {OSSL_FUNC_STORE_EOF, FN(store_eof)},
    {OSSL_FUNC_STORE_CLOSE, FN(store_close)},
    {0, NULL},
};
