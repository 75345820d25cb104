/* Pools of pre-generated ephemeral keys: see pool.h. One lock per pool guards its queues; the
 * refill thread never holds it while it calls the backend, so a handshake taking a key waits for
 * a push or a pop at most, and for the device lock (held for one key generation) only in the
 * backend's own usable() check. Lock order: pool lock, then device lock. */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>

#include "backend/pool.h"
#include "provider/audit.h"
#include "provider/provctx.h"

#define POOL_GROUPS 12     /* P-256..P-521, X25519, X448, ffdhe2048..8192 and room to spare */
#define POOL_RETRY_MS 1000 /* after a failed refill (backend down): wait before the next one */

typedef struct pool_entry {
    void *handle;
    EVP_PKEY *pub;
} pool_entry;

typedef struct pool_group {
    keyx_alg alg;
    char group[24];
    EVP_PKEY *domain; /* up-referenced from the first request: the refill thread's spec */
    size_t bits;
    pool_entry *ring; /* size entries, count of them from head on */
    unsigned int head, count;
} pool_group;

struct keyx_pool {
    keyx_provctx *p;
    const char *name;
    unsigned int size;
    const keyx_pool_ops *ops;
    void *state;
    pthread_mutex_t lock;
    pthread_cond_t wake; /* the refill thread waits here for work */
    pthread_cond_t idle; /* fork preparation waits here for the thread to leave the backend */
    pool_group groups[POOL_GROUPS];
    int ngroups;
    int started, stop, busy, paused;
    int orphaned; /* in a forked child: every queued key is the parent's, never handed out */
    pthread_t thread;
    pid_t thread_pid;
    uint64_t retry_ms; /* no refill before this (monotonic ms) */
    uint64_t refills, failures;
    struct keyx_pool *reg_next;
};

/* ---- registry: fork and exit find every pool -------------------------------------------- */

static pthread_mutex_t reg_lock = PTHREAD_MUTEX_INITIALIZER;
static keyx_pool *registry;
static pthread_once_t hooks_once = PTHREAD_ONCE_INIT;
static int exiting; /* under reg_lock: exit() has begun, no thread is started any more */

static uint64_t now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static void init_conds(keyx_pool *pl)
{
    pthread_condattr_t a;

    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(&pl->wake, &a);
    pthread_condattr_destroy(&a);
    pthread_cond_init(&pl->idle, NULL);
}

/* Before fork(): every refill thread out of its backend and parked, every pool lock held, so
 * that the child inherits no lock held by a thread it does not have. Registered after the
 * devices' own handlers (a pool starts after its device opened), so this one runs first and
 * the devices' handlers then find no refill thread inside a device lock. */
static void fork_prepare(void)
{
    pthread_mutex_lock(&reg_lock);
    for (keyx_pool *pl = registry; pl != NULL; pl = pl->reg_next) {
        pthread_mutex_lock(&pl->lock);
        pl->paused = 1;
        while (pl->busy)
            pthread_cond_wait(&pl->idle, &pl->lock);
    }
}

static void fork_parent(void)
{
    for (keyx_pool *pl = registry; pl != NULL; pl = pl->reg_next) {
        pl->paused = 0;
        pthread_cond_broadcast(&pl->wake);
        pthread_mutex_unlock(&pl->lock);
    }
    pthread_mutex_unlock(&reg_lock);
}

/* The child has no refill thread, and the queued keys are the parent's (TPM handles are global
 * to the TPM without a resource manager; PKCS#11 session objects belong to the parent's
 * sessions): never handed out nor flushed here, dropped at the next use (the backends' free()
 * touches no object of another process). The pool refills lazily in the child. */
static void fork_child(void)
{
    for (keyx_pool *pl = registry; pl != NULL; pl = pl->reg_next) {
        init_conds(pl); /* the parent's thread may have been waiting on wake */
        pl->started = pl->busy = pl->paused = 0;
        pl->orphaned = 1;
        pl->retry_ms = 0;
        pthread_mutex_unlock(&pl->lock);
    }
    pthread_mutex_unlock(&reg_lock);
}

static void stop_thread(keyx_pool *pl);

/* At exit(), before the destructors of modules loaded before the thread started (SoftHSM's C++
 * statics): no refill thread may still be inside one. The keys stay until the provider's own
 * teardown. */
static void at_exit(void *unused)
{
    (void)unused;
    pthread_mutex_lock(&reg_lock);
    exiting = 1;
    for (keyx_pool *pl = registry; pl != NULL; pl = pl->reg_next)
        stop_thread(pl);
    pthread_mutex_unlock(&reg_lock);
}

/* As in pkcs11_device.c: the exit handler belongs to keyx.so, even where a sanitizer's atexit
 * interceptor would register it for the main program (and run it after keyx.so is unloaded). */
extern void *__dso_handle;
extern int __cxa_atexit(void (*fn)(void *), void *arg, void *dso);

static void install_hooks(void)
{
    pthread_atfork(fork_prepare, fork_parent, fork_child);
    __cxa_atexit(at_exit, NULL, &__dso_handle);
}

/* ---- queues ------------------------------------------------------------------------------ */

static pool_group *find_group(keyx_pool *pl, const keyx_keyspec *spec)
{
    pool_group *g;

    for (int i = 0; i < pl->ngroups; i++)
        if (pl->groups[i].alg == spec->alg && strcmp(pl->groups[i].group, spec->group) == 0)
            return &pl->groups[i];
    if (pl->ngroups == POOL_GROUPS || strlen(spec->group) >= sizeof(g->group))
        return NULL;
    g = &pl->groups[pl->ngroups];
    memset(g, 0, sizeof(*g));
    if ((g->ring = OPENSSL_zalloc(sizeof(*g->ring) * pl->size)) == NULL)
        return NULL;
    if (spec->domain != NULL && !EVP_PKEY_up_ref(spec->domain)) {
        OPENSSL_free(g->ring);
        return NULL;
    }
    g->alg = spec->alg;
    strcpy(g->group, spec->group);
    g->domain = spec->domain;
    g->bits = spec->bits;
    pl->ngroups++;
    return g;
}

static pool_entry pop(pool_group *g, unsigned int size)
{
    pool_entry e = g->ring[g->head];

    g->ring[g->head].handle = NULL;
    g->ring[g->head].pub = NULL;
    g->head = (g->head + 1) % size;
    g->count--;
    return e;
}

static void destroy_entry(keyx_pool *pl, pool_entry *e)
{
    pl->ops->destroy(pl->state, e->handle);
    EVP_PKEY_free(e->pub);
    e->handle = NULL;
    e->pub = NULL;
}

/* Moves every queued key out (under the lock) into *out (count *n); the caller destroys them
 * after unlocking. */
static void drain(keyx_pool *pl, pool_entry **out, size_t *n)
{
    size_t total = 0, k = 0;

    *out = NULL;
    *n = 0;
    for (int i = 0; i < pl->ngroups; i++)
        total += pl->groups[i].count;
    if (total == 0 || (*out = OPENSSL_malloc(sizeof(**out) * total)) == NULL)
        return; /* out of memory: the keys stay queued (freed with the pool) */
    for (int i = 0; i < pl->ngroups; i++)
        while (pl->groups[i].count > 0)
            (*out)[k++] = pop(&pl->groups[i], pl->size);
    *n = k;
}

static void destroy_all(keyx_pool *pl, pool_entry *list, size_t n)
{
    for (size_t i = 0; i < n; i++)
        destroy_entry(pl, &list[i]);
    OPENSSL_free(list);
}

/* ---- refill thread ----------------------------------------------------------------------- */

/* The group with the fewest ready keys, if one is not full. */
static pool_group *neediest(keyx_pool *pl)
{
    pool_group *best = NULL;

    for (int i = 0; i < pl->ngroups; i++)
        if (pl->groups[i].count < pl->size && (best == NULL || pl->groups[i].count < best->count))
            best = &pl->groups[i];
    return best;
}

static void wait_until(keyx_pool *pl, uint64_t ms)
{
    struct timespec ts = {.tv_sec = (time_t)(ms / 1000), .tv_nsec = (long)(ms % 1000) * 1000000};

    pthread_cond_timedwait(&pl->wake, &pl->lock, &ts);
}

static void *refill(void *arg)
{
    keyx_pool *pl = arg;

    pthread_mutex_lock(&pl->lock);
    while (!pl->stop) {
        keyx_keyspec spec = {0};
        pool_entry e = {0};
        pool_group *g;
        uint64_t now = now_ms();
        int r;

        if (pl->paused) {
            pthread_cond_wait(&pl->wake, &pl->lock);
            continue;
        }
        /* The backend is down (or refused): no refill for a while; handshakes generate
         * inline meanwhile and meet the real error there. */
        if (pl->retry_ms > now) {
            wait_until(pl, pl->retry_ms);
            continue;
        }
        if ((g = neediest(pl)) == NULL) {
            pthread_cond_wait(&pl->wake, &pl->lock);
            continue;
        }
        spec.alg = g->alg;
        spec.group = g->group; /* groups stay until the pool is freed, after this thread */
        spec.domain = g->domain;
        spec.bits = g->bits;
        pl->busy = 1;
        pthread_mutex_unlock(&pl->lock);

        r = pl->ops->make(pl->state, &spec, &e.handle, &e.pub);
        ERR_clear_error(); /* this thread's queue: nobody reads it */

        pthread_mutex_lock(&pl->lock);
        pl->busy = 0;
        pthread_cond_broadcast(&pl->idle);
        if (r != 1) {
            pl->failures++;
            pl->retry_ms = now_ms() + POOL_RETRY_MS;
            keyx_debug(pl->p, "%s pool: refilling %s failed (%s); next try in %d ms", pl->name,
                       g->group, r == KEYX_BACKEND_DOWN ? "backend down" : "refused",
                       POOL_RETRY_MS);
            continue;
        }
        if (pl->stop || pl->orphaned || g->count >= pl->size) {
            pthread_mutex_unlock(&pl->lock);
            destroy_entry(pl, &e);
            pthread_mutex_lock(&pl->lock);
            continue;
        }
        g->ring[(g->head + g->count) % pl->size] = e;
        g->count++;
        pl->refills++;
    }
    pthread_mutex_unlock(&pl->lock);
    OPENSSL_thread_stop();
    return NULL;
}

/* Under pl->lock. */
static void start_thread(keyx_pool *pl)
{
    pthread_attr_t a;
    int err;

    if (pl->started || pl->stop)
        return;
    pthread_attr_init(&a);
    pthread_attr_setstacksize(&a, 256 * 1024);
    err = pthread_create(&pl->thread, &a, refill, pl);
    pthread_attr_destroy(&a);
    if (err != 0) {
        keyx_debug(pl->p, "%s pool: cannot start the refill thread (%s); keys are made inline",
                   pl->name, strerror(err));
        pl->stop = 1; /* do not try on every handshake */
        return;
    }
    pl->started = 1;
    pl->thread_pid = getpid();
    keyx_debug(pl->p, "%s pool: refill thread started (%u keys per group)", pl->name, pl->size);
}

/* Stops and joins the refill thread of this process (bounded: it finishes the one key it may
 * be making). */
static void stop_thread(keyx_pool *pl)
{
    int join;

    pthread_mutex_lock(&pl->lock);
    pl->stop = 1;
    join = pl->started && pl->thread_pid == getpid();
    pl->started = 0;
    pthread_cond_broadcast(&pl->wake);
    pthread_mutex_unlock(&pl->lock);
    if (join)
        pthread_join(pl->thread, NULL);
}

/* ---- public ------------------------------------------------------------------------------ */

keyx_pool *keyx_pool_new(keyx_provctx *p, const char *name, unsigned int size,
                         const keyx_pool_ops *ops, void *state)
{
    keyx_pool *pl;

    if (size == 0 || (pl = OPENSSL_zalloc(sizeof(*pl))) == NULL)
        return NULL;
    pl->p = p;
    pl->name = name;
    pl->size = size;
    pl->ops = ops;
    pl->state = state;
    pthread_mutex_init(&pl->lock, NULL);
    init_conds(pl);
    pthread_mutex_lock(&reg_lock);
    pl->reg_next = registry;
    registry = pl;
    pthread_mutex_unlock(&reg_lock);
    return pl;
}

int keyx_pool_take(keyx_pool *pl, const keyx_keyspec *spec, void **handle, EVP_PKEY **pub)
{
    pool_entry *orphans = NULL;
    size_t norphans = 0, nstale = 0;
    pool_group *g;

    if (pl == NULL || spec->persist != NULL || spec->group == NULL ||
        (spec->alg != KEYX_ALG_EC && spec->alg != KEYX_ALG_X25519 && spec->alg != KEYX_ALG_X448 &&
         spec->alg != KEYX_ALG_DH))
        return 0;
    pthread_mutex_lock(&pl->lock);
    if (pl->orphaned) {
        drain(pl, &orphans, &norphans);
        pl->orphaned = 0;
    }
    g = find_group(pl, spec);
    pthread_mutex_unlock(&pl->lock);
    if (norphans > 0)
        keyx_debug(pl->p, "%s pool: dropped %zu keys made before fork(), none handed out", pl->name,
                   norphans);
    destroy_all(pl, orphans, norphans);
    if (g == NULL)
        return 0;

    for (;;) {
        pool_entry e;

        /* Removed under the lock: no other caller can get this key. Checked outside it (the
         * check may reach the device). */
        pthread_mutex_lock(&pl->lock);
        if (g->count == 0) {
            pthread_mutex_unlock(&pl->lock);
            break;
        }
        e = pop(g, pl->size);
        pthread_cond_signal(&pl->wake);
        pthread_mutex_unlock(&pl->lock);
        if (pl->ops->usable(pl->state, e.handle)) {
            if (nstale > 0)
                keyx_debug(pl->p, "%s pool: dropped %zu keys the device no longer holds", pl->name,
                           nstale);
            keyx_debug(pl->p, "%s pool: handed out a pooled %s key", pl->name, g->group);
            *handle = e.handle;
            *pub = e.pub;
            return 1;
        }
        /* made before a TPM restart, a token removal or a re-initialization */
        destroy_entry(pl, &e);
        nstale++;
    }
    if (nstale > 0)
        keyx_debug(pl->p, "%s pool: dropped %zu keys the device no longer holds", pl->name, nstale);
    return 0;
}

keyx_pool *keyx_pool_of(const void *state)
{
    keyx_pool *pl;

    pthread_mutex_lock(&reg_lock);
    for (pl = registry; pl != NULL && pl->state != state; pl = pl->reg_next)
        ;
    pthread_mutex_unlock(&reg_lock);
    return pl;
}

void keyx_pool_kick(keyx_pool *pl)
{
    int can_start;

    if (pl == NULL)
        return;
    /* Installed now, not at load: after the devices' own fork handlers (ours must run first,
     * see fork_prepare) and after the PKCS#11 module was loaded (our exit handler must run
     * before its destructors). */
    pthread_once(&hooks_once, install_hooks);
    pthread_mutex_lock(&reg_lock);
    can_start = !exiting;
    pthread_mutex_unlock(&reg_lock);
    pthread_mutex_lock(&pl->lock);
    if (can_start)
        start_thread(pl);
    pthread_cond_signal(&pl->wake);
    pthread_mutex_unlock(&pl->lock);
}

void keyx_pool_free(keyx_pool *pl)
{
    pool_entry *rest = NULL;
    size_t nrest = 0;

    if (pl == NULL)
        return;
    pthread_mutex_lock(&reg_lock);
    for (keyx_pool **pp = &registry; *pp != NULL; pp = &(*pp)->reg_next)
        if (*pp == pl) {
            *pp = pl->reg_next;
            break;
        }
    pthread_mutex_unlock(&reg_lock);
    stop_thread(pl);
    keyx_debug(pl->p, "%s pool: closed (%llu keys made by the refill thread, %llu failed tries)",
               pl->name, (unsigned long long)pl->refills, (unsigned long long)pl->failures);
    pthread_mutex_lock(&pl->lock);
    drain(pl, &rest, &nrest);
    pthread_mutex_unlock(&pl->lock);
    destroy_all(pl, rest, nrest);
    for (int i = 0; i < pl->ngroups; i++) {
        pool_group *g = &pl->groups[i];

        while (g->count > 0) { /* only if drain had no memory */
            pool_entry e = pop(g, pl->size);

            destroy_entry(pl, &e);
        }
        EVP_PKEY_free(g->domain);
        OPENSSL_free(g->ring);
    }
    pthread_cond_destroy(&pl->wake);
    pthread_cond_destroy(&pl->idle);
    pthread_mutex_destroy(&pl->lock);
    OPENSSL_free(pl);
}
