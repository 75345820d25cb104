/* The configured backends, in order, and the choice of one for each new key. */
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/err.h>

#include "backend/call.h"
#include "backend/router.h"
#include "provider/audit.h"
#include "provider/dispatch.h"
#include "provider/errors.h"
#include "provider/provctx.h"

/* How long a backend that reported its device down is passed over when generating keys. */
#define DOWN_SECONDS 5

struct keyx_router {
    keyx_backend backends[KEYX_BACKEND_KINDS];
    size_t n;
    keyx_backend *software; /* holder of imported keys: the listed one, or a private instance */
    keyx_backend own_software;
    /* Backends not in `backends`, opened on first use for keys loaded by URI or imported into
     * a named backend: those keys stay in their own backend whatever routing says. */
    keyx_backend extra[KEYX_BACKEND_KINDS];
    CRYPTO_RWLOCK *extra_lock;
    _Atomic long down_until[KEYX_BACKEND_KINDS]; /* by backend kind; 0: up */
    char names[64];                              /* "tpm, pkcs11, software": for error messages */
    /* The last device failure of each backend kind, for the provider parameters (state.h);
     * the lock is held only to copy the text in or out, never across a backend call. */
    CRYPTO_RWLOCK *failure_lock;
    struct {
        time_t at; /* wall clock; 0: none */
        char text[400];
    } failure[KEYX_BACKEND_KINDS];
};

const char *keyx_alg_name(keyx_alg alg)
{
    static const char *const names[KEYX_ALG_COUNT] = {"EC", "X25519", "X448", "DH", "RSA", "DHX"};

    return (unsigned)alg < KEYX_ALG_COUNT ? names[alg] : "?";
}

int keyx_alg_has_domain(keyx_alg alg)
{
    return alg == KEYX_ALG_EC || keyx_alg_is_dh(alg);
}

int keyx_alg_is_dh(keyx_alg alg)
{
    return alg == KEYX_ALG_DH || alg == KEYX_ALG_DHX;
}

/* Backends built into this keyx; NULL: not available in this build. */
static const keyx_backend_ops *backend_ops(keyx_backend_kind kind)
{
    switch (kind) {
    case KEYX_BACKEND_SOFTWARE:
        return &keyx_software_backend;
#ifdef KEYX_HAVE_TPM
    case KEYX_BACKEND_TPM:
        return &keyx_tpm_backend;
#endif
#ifdef KEYX_HAVE_PKCS11
    case KEYX_BACKEND_PKCS11:
        return &keyx_pkcs11_backend;
#endif
    default:
        return NULL;
    }
}

static const char *built_backends(void)
{
    return "software"
#ifdef KEYX_HAVE_TPM
           ", tpm"
#endif
#ifdef KEYX_HAVE_PKCS11
           ", pkcs11"
#endif
        ;
}

static keyx_backend_kind kind_of(const keyx_backend *be)
{
    for (int k = 0; k < KEYX_BACKEND_KINDS; k++)
        if (backend_ops((keyx_backend_kind)k) == be->ops)
            return (keyx_backend_kind)k;
    return KEYX_BACKEND_SOFTWARE;
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
    if (r == NULL || (r->extra_lock = CRYPTO_THREAD_lock_new()) == NULL ||
        (r->failure_lock = CRYPTO_THREAD_lock_new()) == NULL)
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
                     "(available: %s)",
                     keyx_backend_kind_name(kind), built_backends());
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
    for (size_t i = 0; i < KEYX_BACKEND_KINDS; i++)
        if (r->extra[i].ops != NULL)
            r->extra[i].ops->close(r->extra[i].state);
    CRYPTO_THREAD_lock_free(r->extra_lock);
    CRYPTO_THREAD_lock_free(r->failure_lock);
    OPENSSL_free(r);
}

int keyx_router_first_for(keyx_router *r, const keyx_keyspec *spec)
{
    for (size_t i = 0; i < r->n; i++)
        if (r->backends[i].ops->supports(r->backends[i].state, spec))
            return (int)kind_of(&r->backends[i]);
    return -1;
}

int keyx_router_offers(keyx_router *r, const keyx_keyspec *spec)
{
    return keyx_router_first_for(r, spec) >= 0;
}

static long now_seconds(void)
{
    struct timespec ts;

    return clock_gettime(CLOCK_MONOTONIC, &ts) == 0 ? (long)ts.tv_sec : 0;
}

static int is_down(keyx_router *r, const keyx_backend *be)
{
    long until = atomic_load(&r->down_until[kind_of(be)]);

    return until != 0 && now_seconds() < until;
}

static atomic_int warned_software; /* the failover-to-software warning, once per process */

static void failover_event(keyx_router *r, const keyx_backend *from, const keyx_backend *to,
                           const keyx_keyspec *spec)
{
    /* The failed backend's own reason (e.g. the TCTI it could not open) is still on the error
     * stack, above the mark: the log says why, not only that. */
    const char *data = NULL;
    int flags = 0;
    char why[400];

    if (ERR_peek_last_error_data(&data, &flags) == 0 || !(flags & ERR_TXT_STRING) || data == NULL)
        data = "";
    snprintf(why, sizeof(why),
             "device unreachable or failing: passed over for new keys for a few seconds%s%s",
             *data ? ": " : "", data);
    keyx_event ev = {
        .event = "failover",
        .backend = from->ops->name,
        .alg = keyx_alg_name(spec->alg),
        .group = spec->group,
        .ephemeral = -1,
        .ok = 0,
        .error = why,
        .next = to->ops->name,
    };

    keyx_event_emit(r->software->prov, &ev);
    if (kind_of(to) == KEYX_BACKEND_SOFTWARE && !atomic_exchange(&warned_software, 1)) {
        /* A failover to software that the operator configured, but never a silent one: once per
         * process on stderr (every one is in the audit log). */
        char line[600];
        int n = snprintf(line, sizeof(line),
                         "keyx: warning: the %s backend failed (%s); new %s keys are made in "
                         "software, as 'backends = %s' allows\n",
                         from->ops->name, *data ? data : "no detail", keyx_alg_name(spec->alg),
                         r->names);

        if (n > 0 &&
            write(STDERR_FILENO, line, (size_t)n < sizeof(line) ? (size_t)n : sizeof(line) - 1) < 0)
            return;
    }
}

/* Tries be; on KEYX_BACKEND_DOWN marks it down. Returns the backend's result. */
static int try_generate(keyx_router *r, keyx_backend *be, const keyx_keyspec *spec, void **handle,
                        EVP_PKEY **pub)
{
    int rc = keyx_backend_generate(be, spec, handle, pub);

    if (rc == KEYX_BACKEND_DOWN)
        atomic_store(&r->down_until[kind_of(be)], now_seconds() + DOWN_SECONDS);
    else if (rc == 1)
        atomic_store(&r->down_until[kind_of(be)], 0);
    return rc;
}

/* Names what cannot be made and what to do. A TLS server or client whose group list offers a group
 * no backend serves lands here at its first handshake (OpenSSL 3.5 negotiates every provider's
 * groups): the message gives the `Groups` line for these backends, so the server's own log says
 * how to fix it. */
static void unsupported_error(keyx_router *r, const keyx_keyspec *spec)
{
    char groups[256];
    int tls = spec->alg != KEYX_ALG_RSA && keyx_tls_groups_line(r, groups, sizeof(groups));
    /* "X25519", not "X25519 X25519" */
    const char *group = spec->group != NULL && strcmp(spec->group, keyx_alg_name(spec->alg)) != 0
                            ? spec->group
                            : NULL;

    KEYX_ERR(r->software->prov, KEYX_R_UNSUPPORTED,
             "%s%s%s: no backend in 'backends = %s' can generate it; add one that can "
             "(e.g. software) or use another group%s%s%s",
             keyx_alg_name(spec->alg), group ? " " : "", group ? group : "", r->names,
             tls ? ". For TLS, offer only the groups these backends serve: 'Groups = " : "",
             tls ? groups : "",
             tls ? "' in openssl.cnf's system_default section (docs/tls-servers.md, "
                   "\"Choosing the TLS groups\")"
                 : "");
}

int keyx_router_generate(keyx_router *r, const keyx_keyspec *spec, keyx_backend **used,
                         void **handle, EVP_PKEY **pub)
{
    keyx_backend *cand[KEYX_BACKEND_KINDS], *failed = NULL;
    size_t n = 0;
    int rc = 0;

    /* Backends up first, in configured order; those marked down last, so that a recovered
     * device serves again as soon as nothing else can. */
    for (int pass = 0; pass < 2; pass++)
        for (size_t i = 0; i < r->n; i++)
            if (is_down(r, &r->backends[i]) == pass &&
                r->backends[i].ops->supports(r->backends[i].state, spec))
                cand[n++] = &r->backends[i];
    *used = NULL;
    if (n == 0) {
        unsupported_error(r, spec);
        return 0;
    }
    ERR_set_mark();
    for (size_t i = 0; i < n; i++) {
        if (failed != NULL)
            failover_event(r, failed, cand[i], spec);
        *used = cand[i];
        rc = try_generate(r, cand[i], spec, handle, pub);
        if (rc != KEYX_BACKEND_DOWN)
            break;
        failed = cand[i];
    }
    if (rc == 1 && failed != NULL)
        ERR_pop_to_mark(); /* served by the next backend: the failure is in the audit log */
    else
        ERR_clear_last_mark();
    return rc == 1;
}

keyx_backend *keyx_router_backend(keyx_router *r, keyx_backend_kind kind)
{
    const keyx_backend_ops *ops = backend_ops(kind);
    keyx_backend *be = NULL;
    keyx_provctx *p = r->software->prov;

    for (size_t i = 0; i < r->n; i++)
        if (r->backends[i].ops == ops)
            return &r->backends[i];
    if (kind == KEYX_BACKEND_SOFTWARE)
        return r->software;
    if (ops == NULL) {
        KEYX_ERR(p, KEYX_R_BACKEND_UNAVAILABLE,
                 "backend '%s' is not built into this keyx (available: %s)",
                 keyx_backend_kind_name(kind), built_backends());
        return NULL;
    }
    if (!CRYPTO_THREAD_write_lock(r->extra_lock))
        return NULL;
    if (r->extra[kind].ops != NULL) {
        be = &r->extra[kind];
    } else if (backend_open(p, &r->extra[kind], ops)) {
        be = &r->extra[kind];
    } else {
        r->extra[kind].ops = NULL;
    }
    CRYPTO_THREAD_unlock(r->extra_lock);
    return be;
}

keyx_backend *keyx_router_software(keyx_router *r)
{
    return r->software;
}

void keyx_router_note_down(keyx_router *r, const keyx_backend *be)
{
    const char *data = NULL;
    int flags = 0;
    keyx_backend_kind kind;

    if (r == NULL || !CRYPTO_THREAD_write_lock(r->failure_lock))
        return;
    kind = kind_of(be);
    if (ERR_peek_last_error_data(&data, &flags) == 0 || !(flags & ERR_TXT_STRING) || data == NULL ||
        data[0] == '\0')
        data = "the device is unreachable or failing (no detail)";
    r->failure[kind].at = time(NULL);
    snprintf(r->failure[kind].text, sizeof(r->failure[kind].text), "%s",
             strncmp(data, "keyx: ", 6) == 0 ? data + 6 : data);
    CRYPTO_THREAD_unlock(r->failure_lock);
}

/* "12:14:05 UTC" */
static void utc_time(time_t t, char *buf, size_t len)
{
    struct tm tm;

    if (gmtime_r(&t, &tm) == NULL || strftime(buf, len, "%H:%M:%S UTC", &tm) == 0)
        snprintf(buf, len, "?");
}

int keyx_router_describe(keyx_router *r, keyx_backend_kind kind, char *buf, size_t len)
{
    const keyx_backend *be = NULL;
    long until, now = now_seconds();
    size_t used;
    char when[32];

    if ((unsigned)kind >= KEYX_BACKEND_KINDS)
        return 0;
    for (size_t i = 0; i < r->n; i++)
        if (kind_of(&r->backends[i]) == kind)
            be = &r->backends[i];
    if (be == NULL) {
        /* Not listed, perhaps opened for a key loaded by URI: r->extra, set under its lock. */
        if (!CRYPTO_THREAD_read_lock(r->extra_lock))
            return 0;
        if (r->extra[kind].ops != NULL && r->extra[kind].ops->describe != NULL)
            r->extra[kind].ops->describe(r->extra[kind].state, buf, len);
        else if (r->extra[kind].ops != NULL)
            snprintf(buf, len, "ready");
        else
            buf[0] = '\0';
        CRYPTO_THREAD_unlock(r->extra_lock);
        if (buf[0] == '\0')
            return 0;
    } else if (be->ops->describe != NULL) {
        be->ops->describe(be->state, buf, len);
    } else {
        snprintf(buf, len, "ready");
    }
    until = atomic_load(&r->down_until[kind]);
    if (until != 0 && now < until) {
        utc_time(time(NULL) + (until - now), when, sizeof(when));
        used = strlen(buf);
        snprintf(buf + used, len - used, "; down until %s (passed over for new keys)", when);
    }
    if (CRYPTO_THREAD_read_lock(r->failure_lock)) {
        if (r->failure[kind].at != 0) {
            utc_time(r->failure[kind].at, when, sizeof(when));
            used = strlen(buf);
            snprintf(buf + used, len - used, "; last error at %s: %s", when, r->failure[kind].text);
        }
        CRYPTO_THREAD_unlock(r->failure_lock);
    }
    return 1;
}
