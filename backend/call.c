#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <time.h>

#include "backend/call.h"
#include "backend/router.h"
#include "backend/watchdog.h"
#include "provider/errors.h"
#include "provider/provctx.h"

static _Thread_local int inside_backend;

/* A device behind a socket (p11-kit's RPC client, swtpm) whose peer died makes the call's write
 * raise SIGPIPE, which kills a process that does not ignore it. keyx changes no process-wide
 * disposition: around a hardware backend's call it blocks SIGPIPE in the calling thread, and
 * takes back a SIGPIPE the call raised (directed at this thread, so pending here); the call
 * itself then fails with the device's error (EPIPE). Threads a call starts (key pool refills)
 * inherit the blocked mask. A backend whose keys live in process memory pays nothing. */
typedef struct call_guard {
    int watched; /* keyx_watchdog_begin was called: the call has a time limit (call_limit_ms) */
    int watch;   /* its ticket */
    sigset_t old;
    int blocked; /* this guard blocked SIGPIPE: take back what the call raised, restore the mask */
} call_guard;

static void enter(const keyx_backend *be, call_guard *g)
{
    sigset_t pipe;

    inside_backend++;
    g->blocked = 0;
    g->watched = 0;
    if (be->ops->exports_private) /* in process memory: no device, no socket */
        return;
    if (be->ops->call_limit_ms != NULL) {
        g->watch = keyx_watchdog_begin(be->ops->call_limit_ms(be->state));
        g->watched = 1;
    }
    sigemptyset(&pipe);
    sigaddset(&pipe, SIGPIPE);
    /* A thread that blocks SIGPIPE itself handles what is pending: keyx leaves it alone. */
    g->blocked = pthread_sigmask(SIG_BLOCK, &pipe, &g->old) == 0 && !sigismember(&g->old, SIGPIPE);
}

static void leave(call_guard *g)
{
    static const struct timespec now = {0, 0};
    sigset_t pipe, pending;

    inside_backend--;
    if (g->watched)
        keyx_watchdog_end(g->watch);
    if (!g->blocked)
        return;
    sigemptyset(&pipe);
    sigaddset(&pipe, SIGPIPE);
    /* Unblocked before the call, so a pending SIGPIPE is the call's. */
    if (sigpending(&pending) == 0 && sigismember(&pending, SIGPIPE))
        while (sigtimedwait(&pipe, NULL, &now) < 0 && errno == EINTR)
            ;
    pthread_sigmask(SIG_SETMASK, &g->old, NULL);
}

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
    call_guard g;
    int ok;

    enter(be, &g);
    ok = be->ops->generate(be->state, spec, handle, pub);
    leave(&g);
    return noted(be, ok);
}

int keyx_backend_import(keyx_backend *be, EVP_PKEY *key, void **handle, EVP_PKEY **pub)
{
    call_guard g;
    int ok;

    enter(be, &g);
    ok = be->ops->import(be->state, key, handle, pub);
    leave(&g);
    return noted(be, ok);
}

int keyx_backend_load(keyx_backend *be, const char *locator, void **handle, EVP_PKEY **pub)
{
    call_guard g;
    int ok;

    enter(be, &g);
    ok = be->ops->load(be->state, locator, handle, pub);
    leave(&g);
    return noted(be, ok);
}

int keyx_backend_load_deferred(keyx_backend *be, const char *locator, EVP_PKEY *recorded,
                               void **handle, EVP_PKEY **pub)
{
    call_guard g;
    int ok;

    enter(be, &g);
    ok = be->ops->load_deferred(be->state, locator, recorded, handle, pub);
    leave(&g);
    return noted(be, ok);
}

int keyx_backend_derive(keyx_backend *be, void *handle, const keyx_peer *peer,
                        unsigned char *secret, size_t secretlen)
{
    call_guard g;
    int ok;

    enter(be, &g);
    ok = be->ops->derive(be->state, handle, peer, secret, secretlen);
    leave(&g);
    return noted(be, ok);
}

int keyx_backend_rsa_decrypt(keyx_backend *be, void *handle, const keyx_rsa_op *op,
                             const unsigned char *in, size_t inlen, unsigned char *out,
                             size_t *outlen)
{
    call_guard g;
    int ok;

    if (be->ops->rsa_decrypt == NULL) {
        KEYX_ERR(be->prov, KEYX_R_UNSUPPORTED, "the %s backend holds no RSA keys", be->ops->name);
        return 0;
    }
    enter(be, &g);
    ok = be->ops->rsa_decrypt(be->state, handle, op, in, inlen, out, outlen);
    leave(&g);
    return noted(be, ok);
}

void keyx_backend_free(keyx_backend *be, void *handle)
{
    call_guard g;

    enter(be, &g);
    be->ops->free(be->state, handle);
    leave(&g);
}

int keyx_backend_locator(keyx_backend *be, void *handle, char **out)
{
    call_guard g;
    int ok;

    if (be->ops->locator == NULL) {
        KEYX_ERR(be->prov, KEYX_R_KEY_NOT_WRITABLE,
                 "the %s backend has no static keys: its keys cannot be referred to",
                 be->ops->name);
        return 0;
    }
    enter(be, &g);
    ok = be->ops->locator(be->state, handle, out);
    leave(&g);
    return noted(be, ok);
}

int keyx_backend_load_encoded(keyx_backend *be, const char *format, const unsigned char *der,
                              size_t len, void **handle, EVP_PKEY **pub)
{
    call_guard g;
    int ok;

    if (be->ops->load_encoded == NULL) {
        KEYX_ERR(be->prov, KEYX_R_UNSUPPORTED, "the %s backend cannot load a %s", be->ops->name,
                 format);
        return 0;
    }
    enter(be, &g);
    ok = be->ops->load_encoded(be->state, format, der, len, handle, pub);
    leave(&g);
    return noted(be, ok);
}

int keyx_backend_objects(keyx_backend *be, const char *locator, int kinds, keyx_object **out,
                         size_t *n)
{
    call_guard g;
    int ok;

    *out = NULL;
    *n = 0;
    if (be->ops->objects == NULL) {
        KEYX_ERR(be->prov, KEYX_R_UNSUPPORTED, "the %s backend cannot list its objects",
                 be->ops->name);
        return 0;
    }
    enter(be, &g);
    ok = be->ops->objects(be->state, locator, kinds, out, n);
    leave(&g);
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
    call_guard g;
    int ok;

    if (be->ops->sign_check == NULL || be->ops->sign == NULL) {
        KEYX_ERR(be->prov, KEYX_R_UNSUPPORTED, "the %s backend cannot sign", be->ops->name);
        return 0;
    }
    enter(be, &g);
    ok = be->ops->sign_check(be->state, handle, op);
    leave(&g);
    return noted(be, ok);
}

int keyx_backend_sign(keyx_backend *be, void *handle, const keyx_sign_op *op,
                      const unsigned char *dgst, size_t dlen, unsigned char *sig, size_t *siglen)
{
    call_guard g;
    int ok;

    if (be->ops->sign == NULL) {
        KEYX_ERR(be->prov, KEYX_R_UNSUPPORTED, "the %s backend cannot sign", be->ops->name);
        return 0;
    }
    enter(be, &g);
    ok = be->ops->sign(be->state, handle, op, dgst, dlen, sig, siglen);
    leave(&g);
    return noted(be, ok);
}
