/* STORE for keyx: and pkcs11: URIs. A URI names objects in a backend ("keyx:tpm:handle=0x81000002",
 * "pkcs11:token=keyx;object=srv", "keyx:pkcs11:..."): private keys go back to OpenSSL by
 * reference, so the private part never leaves the backend; public keys go as their
 * SubjectPublicKeyInfo and certificates as their DER, which OpenSSL's decoders parse. What is
 * returned is what both the URI (pkcs11 type=private, public or cert; without it every kind) and
 * the application (OSSL_STORE_expect, a subject search) ask for. */
#include <string.h>

#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/core_object.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/store.h>
#include <openssl/x509.h>

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
    int expect;         /* OSSL_STORE_INFO_* the application asked for; 0: anything */
    X509_NAME *subject; /* OSSL_STORE_PARAM_SUBJECT: certificates of this subject only */
    int started;
    int done;
    keyx_backend *be;
    int single; /* the URI itself is loaded as one private key, with that path's errors */
    /* what the URI names, one object per load() call */
    keyx_object *items;
    size_t nitems, next;
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
        OSSL_PARAM_octet_string(OSSL_STORE_PARAM_SUBJECT, NULL, 0),
        OSSL_PARAM_END,
    };

    (void)provctx;
    return settable;
}

static int store_set_ctx_params(void *loaderctx, const OSSL_PARAM params[])
{
    keyx_store *s = loaderctx;
    const OSSL_PARAM *e = OSSL_PARAM_locate_const(params, OSSL_STORE_PARAM_EXPECT);
    const OSSL_PARAM *sub = OSSL_PARAM_locate_const(params, OSSL_STORE_PARAM_SUBJECT);
    const unsigned char *der;
    const void *v = NULL;
    size_t len = 0;

    if (e != NULL && !OSSL_PARAM_get_int(e, &s->expect))
        return 0;
    if (sub != NULL) {
        X509_NAME_free(s->subject);
        s->subject = NULL;
        if (OSSL_PARAM_get_octet_string_ptr(sub, &v, &len) && len <= 65536) {
            der = v;
            s->subject = d2i_X509_NAME(NULL, &der, (long)len);
        }
        if (s->subject == NULL) {
            KEYX_ERR(s->p, KEYX_R_INVALID_ARGUMENT, "the subject to search for is not a DER name");
            return 0;
        }
    }
    return 1;
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

/* The kinds of object the application asks for (OSSL_STORE_expect). */
static int expected_kinds(int expect)
{
    switch (expect) {
    case 0:
        return KEYX_OBJ_ALL;
    case OSSL_STORE_INFO_PKEY:
        return KEYX_OBJ_PRIVATE;
    case OSSL_STORE_INFO_PUBKEY:
        return KEYX_OBJ_PUBLIC;
    case OSSL_STORE_INFO_CERT:
        return KEYX_OBJ_CERT;
    default:
        return 0; /* CRLs, parameters, names: keyx has none */
    }
}

static const char *kind_text(int kinds)
{
    switch (kinds) {
    case KEYX_OBJ_PRIVATE:
        return "a private key";
    case KEYX_OBJ_PUBLIC:
        return "a public key";
    case KEYX_OBJ_CERT:
        return "a certificate";
    case KEYX_OBJ_PRIVATE | KEYX_OBJ_PUBLIC:
        return "a key pair";
    default:
        return "an object";
    }
}

/* The part of a URI that can be printed: RFC 7512 puts pin-value in the query. */
static int printable_len(const char *uri)
{
    size_t n = strcspn(uri, "?");

    return n > 200 ? 200 : (int)n;
}

/* Nothing of what the URI names is what the application asks for. An error when it asked for
 * something keyx could give (a private or public key, a certificate) and the URI names another
 * kind: the user named the wrong object. CRLs and parameters: nothing, no error. */
static int refuse(keyx_store *s)
{
    int asked = expected_kinds(s->expect);

    if (s->uri.kinds == 0) {
        KEYX_ERR(s->p, KEYX_R_UNSUPPORTED,
                 "'%.*s' names neither keys nor certificates: keyx loads private keys "
                 "(type=private), public keys (type=public) and certificates (type=cert)",
                 printable_len(s->uri_text), s->uri_text);
        return 0;
    }
    if (asked == 0 || asked == KEYX_OBJ_ALL || (s->subject != NULL && asked != KEYX_OBJ_CERT))
        return 1;
    KEYX_ERR(s->p, KEYX_R_INVALID_ARGUMENT, "'%.*s' names %s object, and %s is asked for here: %s",
             printable_len(s->uri_text), s->uri_text, kind_text(s->uri.kinds), kind_text(asked),
             s->uri.backend != KEYX_BACKEND_PKCS11 ? "a TPM key URI names a key pair only"
             : asked == KEYX_OBJ_PRIVATE           ? "name the private key (type=private)"
             : asked == KEYX_OBJ_PUBLIC
                 ? "name the public key (type=public), or write the private key's public key "
                   "out with openssl pkey -in URI -pubout"
                 : "name the certificate (type=cert)");
    return 0;
}

/* A backend without a listing: the locator names one key pair, its private key by reference
 * and its public key as load() gives it. 1, or 0 with an error. */
static int key_pair_items(keyx_store *s, int want)
{
    keyx_object *items = OPENSSL_zalloc(2 * sizeof(*items));
    void *handle = NULL;
    EVP_PKEY *pub = NULL;
    unsigned char *der = NULL;
    size_t n = 0;
    int len;

    if (items == NULL) {
        KEYX_ERR(s->p, KEYX_R_INTERNAL, "out of memory");
        return 0;
    }
    if (want & KEYX_OBJ_PRIVATE) {
        items[n].kind = KEYX_OBJ_PRIVATE;
        if ((items[n++].locator = OPENSSL_strdup(s->uri.locator)) == NULL) {
            keyx_objects_free(items, n);
            KEYX_ERR(s->p, KEYX_R_INTERNAL, "out of memory");
            return 0;
        }
    }
    if (want & KEYX_OBJ_PUBLIC) {
        if (keyx_backend_load(s->be, s->uri.locator, &handle, &pub) != 1) {
            load_failed(s, s->be->ops->name);
            keyx_objects_free(items, n);
            return 0;
        }
        len = i2d_PUBKEY(pub, &der);
        keyx_backend_free(s->be, handle); /* a loaded key stays on its device */
        EVP_PKEY_free(pub);
        if (len <= 0) {
            keyx_objects_free(items, n);
            KEYX_ERR(s->p, KEYX_R_INTERNAL, "%s: cannot encode the key's public key",
                     s->be->ops->name);
            return 0;
        }
        items[n].kind = KEYX_OBJ_PUBLIC;
        items[n].der = der;
        items[n++].derlen = (size_t)len;
    }
    s->items = items;
    s->nitems = n;
    return 1;
}

/* A subject search: the certificates of that subject, nothing else (OSSL_STORE_SEARCH_by_name
 * looks for certificates by subject; keys have none). */
static void keep_subject(keyx_store *s)
{
    size_t kept = 0;

    for (size_t i = 0; i < s->nitems; i++) {
        keyx_object *o = &s->items[i];
        const unsigned char *p = o->subject;
        X509_NAME *name = o->kind == KEYX_OBJ_CERT && p != NULL
                              ? d2i_X509_NAME(NULL, &p, (long)o->subjectlen)
                              : NULL;
        int match = name != NULL && X509_NAME_cmp(name, s->subject) == 0;

        X509_NAME_free(name);
        if (match) {
            s->items[kept++] = *o;
        } else {
            OPENSSL_free(o->locator);
            OPENSSL_free(o->der);
            OPENSSL_free(o->subject);
        }
    }
    s->nitems = kept;
}

/* First load(): parses the URI and decides what it gives. A URI for private keys only, as
 * keyx has always loaded them: one that names an object (object=, id=, a TPM handle) is loaded
 * as one key, and matching several keys is an error (a key chosen by the order of a listing
 * could be the wrong one); a collection ("pkcs11:token=keyx") gives its keys, none without an
 * error, and a listing that fails gives the single-key errors (unknown token or key). Other
 * kinds: the backend lists the objects; none, on a URI naming an object, is an error. 1 or 0
 * with an error raised. */
static int start(keyx_store *s)
{
    int want, rc, named;

    s->started = 1;
    if (!keyx_store_uri_parse(s->p, s->uri_text, &s->uri) ||
        (s->be = keyx_router_backend(s->p->router, s->uri.backend)) == NULL)
        return 0;
    want = expected_kinds(s->expect) & s->uri.kinds;
    if (s->subject != NULL)
        want &= KEYX_OBJ_CERT;
    if (want == 0)
        return refuse(s);
    named = keyx_store_uri_names_object(&s->uri);
    if (s->be->ops->objects == NULL && want != KEYX_OBJ_PRIVATE)
        return key_pair_items(s, want);
    if (want == KEYX_OBJ_PRIVATE && (named || s->be->ops->objects == NULL)) {
        s->single = 1;
        return 1;
    }
    ERR_set_mark();
    rc = keyx_backend_objects(s->be, s->uri.locator, want, &s->items, &s->nitems);
    if (rc != 1 && want == KEYX_OBJ_PRIVATE) {
        ERR_pop_to_mark(); /* the single-key load says what is wrong */
        s->single = 1;
        return 1;
    }
    ERR_clear_last_mark();
    if (rc != 1)
        return 0;
    if (s->nitems == 0 && named) {
        if (want & KEYX_OBJ_PRIVATE) {
            s->single = 1; /* its error: no such key, or a login it needs */
            return 1;
        }
        KEYX_ERR(s->p, KEYX_R_MISSING_KEY,
                 "%s: nothing matches '%.*s' (looked for %s): check token=, object=, id= and "
                 "type= in the URI",
                 s->be->ops->name, printable_len(s->uri_text), s->uri_text,
                 want == KEYX_OBJ_CERT     ? "certificates"
                 : want == KEYX_OBJ_PUBLIC ? "public keys"
                                           : "public keys and certificates");
        return 0;
    }
    if (s->subject != NULL)
        keep_subject(s);
    return 1;
}

/* A public key or certificate by value: OpenSSL's decoders parse it in the application's
 * library context. */
static int pass_data(const keyx_object *o, OSSL_CALLBACK *cb, void *cbarg)
{
    int type = o->kind == KEYX_OBJ_CERT ? OSSL_OBJECT_CERT : OSSL_OBJECT_PKEY;
    OSSL_PARAM params[5], *q = params;

    *q++ = OSSL_PARAM_construct_int(OSSL_OBJECT_PARAM_TYPE, &type);
    if (o->kind == KEYX_OBJ_CERT)
        *q++ = OSSL_PARAM_construct_utf8_string(OSSL_OBJECT_PARAM_DATA_TYPE, "X509", 0);
    *q++ = OSSL_PARAM_construct_utf8_string(
        OSSL_OBJECT_PARAM_DATA_STRUCTURE,
        o->kind == KEYX_OBJ_CERT ? "Certificate" : "SubjectPublicKeyInfo", 0);
    *q++ = OSSL_PARAM_construct_octet_string(OSSL_OBJECT_PARAM_DATA, o->der, o->derlen);
    *q = OSSL_PARAM_construct_end();
    return cb(params, cbarg);
}

static int store_load(void *loaderctx, OSSL_CALLBACK *object_cb, void *object_cbarg,
                      OSSL_PASSPHRASE_CALLBACK *pw_cb, void *pw_cbarg)
{
    keyx_store *s = loaderctx;
    const keyx_object *o;
    keyx_key *k;

    (void)pw_cb; /* PINs come from the configuration (pkcs11-pin), never from a prompt */
    (void)pw_cbarg;
    if (s->done)
        return 0;
    if (!s->started && !start(s)) {
        s->done = 1;
        return 0;
    }
    if (s->single) {
        s->done = 1;
        if ((k = load_locator(s, s->be, s->uri.locator)) == NULL)
            return 0;
        return keyx_key_pass(k, object_cb, object_cbarg);
    }
    if (s->next >= s->nitems) {
        s->done = 1; /* nothing (an empty token): no error */
        return 1;
    }
    o = &s->items[s->next++];
    s->done = s->next == s->nitems;
    if (o->kind != KEYX_OBJ_PRIVATE)
        return pass_data(o, object_cb, object_cbarg);
    if ((k = load_locator(s, s->be, o->locator)) == NULL)
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
        keyx_objects_free(s->items, s->nitems);
        X509_NAME_free(s->subject);
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
