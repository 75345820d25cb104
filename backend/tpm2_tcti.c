/* The bounded TCTI (see tpm2_tcti.h), a transport concern kept apart from the device logic in
 * tpm2_device.c (reconnects, flushing what a stalled TPM left behind, slots).
 *
 * Why: tpm2-tss 3.2 cannot bound a command's answer: the synchronous ESYS calls resubmit while the
 * TCTI says TRY_AGAIN (so Esys_SetTimeout bounds nothing there), the swtpm TCTI ignores its
 * timeout argument and has no poll handles, and SAPI's Tss2_Sys_Execute (keyx's session) always
 * blocks. So keyx puts its own TCTI in front of the loader's: each command is carried to the
 * TPM by a worker thread of the connection, and the caller waits for the answer at most
 * tpm-timeout (RSA key creation ten times as long). A command that gets no answer in time is
 * given up: the caller gets TSS2_TCTI_RC_IO_ERROR (the connection is closed and reopened like a
 * lost one), and the worker, left alone with the connection, closes it once the TPM answers or
 * the connection breaks. Until then the device is "stalled": operations fail at once instead of
 * stacking one more unanswered command (and one more thread) per call. For swtpm the same bound
 * holds without a thread (socket mode below). */

#include <dlfcn.h>
#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <tss2/tss2_tctildr.h>
#include <tss2/tss2_tpm2_types.h>

#include "backend/tpm2_tcti.h"

/* Shared by a device's watch and the connections it gave up on (refs), under stall_lock. */
struct tpm_stall_mark {
    int refs;
    int waiting; /* given-up commands still without an answer */
};

/* Guards the stall marks. */
static pthread_mutex_t stall_lock = PTHREAD_MUTEX_INITIALIZER;

#define GUARD_MAGIC 0x6b6579782d746d70ull /* "keyx-tmp" */
#define RSA_BOUND_FACTOR 10

enum { G_IDLE, G_JOB, G_DONE };

typedef struct guard_io {
    pthread_mutex_t m;
    pthread_cond_t cv; /* CLOCK_MONOTONIC; job posted, job done, quit */
    TSS2_TCTI_CONTEXT *inner;
    int state, quit, abandoned;
    struct tpm_stall_mark *mark; /* set when abandoned */
    TSS2_RC rc;
    size_t cmdlen, rsplen;
    uint8_t cmd[TPM2_MAX_COMMAND_SIZE];
    uint8_t rsp[TPM2_MAX_RESPONSE_SIZE];
} guard_io;

typedef struct guard_tcti {
    TSS2_TCTI_CONTEXT_COMMON_V1 v1;
    guard_io *io; /* worker mode; NULL once given up */
    pthread_t thread;
    tpm_tcti_watch *w; /* the device's */
    unsigned bound;    /* tpm-timeout, ms */
    int pending;       /* a command was sent, its answer not yet handed out */
    int have_rsp;      /* the answer is in io->rsp (socket mode: in rsp) */
    unsigned bound_ms; /* for the pending command */
    /* Socket mode (swtpm): no thread, keyx's own socket with a deadline. */
    int sock;
    int dead; /* a command was given up on: the connection serves no more */
    int fd;   /* the pending command's connection; -1 */
    struct timespec dl;
    struct sockaddr_storage addr;
    socklen_t addrlen;
    size_t rsplen;
    uint8_t rsp[TPM2_MAX_RESPONSE_SIZE];
} guard_tcti;

static void stall_unref(struct tpm_stall_mark *m)
{
    int last;

    pthread_mutex_lock(&stall_lock);
    last = --m->refs == 0;
    pthread_mutex_unlock(&stall_lock);
    if (last)
        OPENSSL_free(m);
}

static void *guard_main(void *arg)
{
    guard_io *io = arg;

    pthread_mutex_lock(&io->m);
    for (;;) {
        while (io->state != G_JOB && !io->quit && !io->abandoned)
            pthread_cond_wait(&io->cv, &io->m);
        if (io->state != G_JOB)
            break;
        pthread_mutex_unlock(&io->m);
        TSS2_RC rc = Tss2_Tcti_Transmit(io->inner, io->cmdlen, io->cmd);
        size_t len = sizeof(io->rsp);

        if (rc == TSS2_RC_SUCCESS)
            rc = Tss2_Tcti_Receive(io->inner, &len, io->rsp, TSS2_TCTI_TIMEOUT_BLOCK);
        pthread_mutex_lock(&io->m);
        io->rc = rc;
        io->rsplen = rc == TSS2_RC_SUCCESS ? len : 0;
        io->state = G_DONE;
        pthread_cond_broadcast(&io->cv);
        if (io->abandoned)
            break;
    }
    pthread_mutex_unlock(&io->m);
    /* Quit or given up: the connection is the worker's to close (a late answer is dropped). */
    Tss2_TctiLdr_Finalize(&io->inner);
    if (io->mark != NULL) {
        pthread_mutex_lock(&stall_lock);
        io->mark->waiting--;
        pthread_mutex_unlock(&stall_lock);
        stall_unref(io->mark);
    }
    pthread_cond_destroy(&io->cv);
    pthread_mutex_destroy(&io->m);
    OPENSSL_cleanse(io->rsp, sizeof(io->rsp)); /* may hold a session's encrypted secret */
    OPENSSL_free(io);
    return NULL;
}

static guard_tcti *guard_cast(TSS2_TCTI_CONTEXT *c)
{
    guard_tcti *g = (guard_tcti *)c;

    return g != NULL && g->v1.magic == GUARD_MAGIC ? g : NULL;
}

/* TPM2_CreatePrimary, TPM2_Create and TPM2_CreateLoaded of an RSA key (one handle, then the
 * authorization area, inSensitive and the public template, whose first field is the type). */
static int cmd_is_rsa_create(const uint8_t *c, size_t n)
{
    uint32_t cc, auth;
    size_t off;

    if (n < 18 || c[0] != 0x80 || c[1] != 0x02) /* TPM2_ST_SESSIONS */
        return 0;
    cc = (uint32_t)c[6] << 24 | (uint32_t)c[7] << 16 | (uint32_t)c[8] << 8 | c[9];
    if (cc != TPM2_CC_CreatePrimary && cc != TPM2_CC_Create && cc != TPM2_CC_CreateLoaded)
        return 0;
    auth = (uint32_t)c[14] << 24 | (uint32_t)c[15] << 16 | (uint32_t)c[16] << 8 | c[17];
    off = 18 + (size_t)auth;
    if (off + 2 > n)
        return 0;
    off += 2 + ((size_t)c[off] << 8 | c[off + 1]); /* inSensitive */
    if (off + 4 > n)
        return 0;
    off += 2; /* the public template's size */
    return ((unsigned)c[off] << 8 | c[off + 1]) == TPM2_ALG_RSA;
}

/* ---- socket mode: swtpm's TPM port (TCP or a unix socket) -------------------------------- */

/* swtpm speaks plain TPM commands on its server socket. The swtpm TCTI opens a connection per
 * command and has no poll handle, so keyx does the same on its own non-blocking socket, every
 * step bounded by the command's deadline: no thread, no hand-over per command. */

void tpm_deadline_in(clockid_t clock, struct timespec *ts, unsigned ms)
{
    clock_gettime(clock, ts);
    ts->tv_sec += ms / 1000;
    ts->tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

static int remaining_ms(const struct timespec *dl)
{
    struct timespec now;
    long ms;

    clock_gettime(CLOCK_MONOTONIC, &now);
    ms = (long)(dl->tv_sec - now.tv_sec) * 1000 + (dl->tv_nsec - now.tv_nsec) / 1000000;
    return ms < 0 ? 0 : ms > 0x7fffffff ? 0x7fffffff : (int)ms;
}

/* 1: fd is ready for events; 0: the deadline passed; -1: error. */
static int wait_fd(int fd, short events, const struct timespec *dl)
{
    for (;;) {
        struct pollfd p = {.fd = fd, .events = events};
        int n = poll(&p, 1, remaining_ms(dl));

        if (n > 0)
            return 1;
        if (n == 0 && remaining_ms(dl) == 0)
            return 0;
        if (n == 0) /* woke a little early (millisecond rounding) */
            continue;
        if (errno != EINTR)
            return -1;
    }
}

/* The command timed out: its connection is kept (w->stale_fd) until the TPM answers it, so that
 * keyx knows when the TPM is back (tpm_tcti_unanswered()), and the guard serves no more. */
static TSS2_RC sock_give_up(guard_tcti *g)
{
    tpm_tcti_watch *w = g->w;

    if (w->stale_fd >= 0)
        close(w->stale_fd);
    w->stale_fd = g->fd;
    g->fd = -1;
    g->dead = 1;
    g->pending = 0;
    w->timed_out = g->bound_ms;
    w->flush_stale = 1;
    return TSS2_TCTI_RC_IO_ERROR;
}

static TSS2_RC sock_fail(guard_tcti *g)
{
    if (g->fd >= 0)
        close(g->fd);
    g->fd = -1;
    g->pending = 0;
    return TSS2_TCTI_RC_IO_ERROR;
}

static TSS2_RC sock_transmit(guard_tcti *g, size_t size, const uint8_t *cmd)
{
    size_t off = 0;
    int err = 0, r;
    socklen_t len = sizeof(err);

    tpm_deadline_in(CLOCK_MONOTONIC, &g->dl, g->bound_ms);
    g->fd = socket(g->addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (g->fd < 0)
        return TSS2_TCTI_RC_IO_ERROR;
    if (connect(g->fd, (struct sockaddr *)&g->addr, g->addrlen) != 0) {
        if (errno != EINPROGRESS && errno != EAGAIN)
            return sock_fail(g);
        if ((r = wait_fd(g->fd, POLLOUT, &g->dl)) == 0)
            return sock_give_up(g);
        if (r < 0 || getsockopt(g->fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err != 0)
            return sock_fail(g);
    }
    while (off < size) {
        ssize_t n = send(g->fd, cmd + off, size - off, MSG_NOSIGNAL);

        if (n > 0) {
            off += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if ((r = wait_fd(g->fd, POLLOUT, &g->dl)) == 0)
                return sock_give_up(g);
            if (r > 0)
                continue;
        }
        return sock_fail(g);
    }
    g->pending = 1;
    g->have_rsp = 0;
    return TSS2_RC_SUCCESS;
}

/* Reads exactly n bytes before the deadline: 1, 0 (deadline), -1 (error or connection closed). */
static int read_full(guard_tcti *g, uint8_t *buf, size_t n)
{
    size_t off = 0;
    int r;

    while (off < n) {
        ssize_t got = recv(g->fd, buf + off, n - off, 0);

        if (got > 0) {
            off += (size_t)got;
            continue;
        }
        if (got == 0)
            return -1;
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK)
            return -1;
        if ((r = wait_fd(g->fd, POLLIN, &g->dl)) <= 0)
            return r;
    }
    return 1;
}

static TSS2_RC sock_receive(guard_tcti *g, size_t *size, uint8_t *rsp)
{
    if (!g->have_rsp) {
        uint32_t len;
        int r = read_full(g, g->rsp, 10);

        if (r == 0)
            return sock_give_up(g);
        if (r < 0)
            return sock_fail(g);
        len = (uint32_t)g->rsp[2] << 24 | (uint32_t)g->rsp[3] << 16 | (uint32_t)g->rsp[4] << 8 |
              g->rsp[5];
        if (len < 10 || len > sizeof(g->rsp))
            return sock_fail(g);
        if ((r = read_full(g, g->rsp + 10, len - 10)) == 0)
            return sock_give_up(g);
        if (r < 0)
            return sock_fail(g);
        close(g->fd);
        g->fd = -1;
        g->rsplen = len;
        g->have_rsp = 1;
    }
    if (rsp == NULL) {
        *size = g->rsplen;
        return TSS2_RC_SUCCESS;
    }
    if (*size < g->rsplen) {
        *size = g->rsplen;
        return TSS2_TCTI_RC_INSUFFICIENT_BUFFER;
    }
    memcpy(rsp, g->rsp, g->rsplen);
    OPENSSL_cleanse(g->rsp,
                    g->rsplen); /* a ZGen point or RSA plaintext in clear without sessions */
    *size = g->rsplen;
    g->pending = g->have_rsp = 0;
    return TSS2_RC_SUCCESS;
}

/* The swtpm TCTI's configuration ("swtpm", "swtpm:host=H,port=P", "swtpm:path=SOCKET") as an
 * address: 1, or 0 for anything else (other TCTIs, a module path, an unknown key). */
static int swtpm_address(const char *conf, struct sockaddr_storage *addr, socklen_t *addrlen)
{
    char host[256] = "localhost", port[8] = "2321",
         path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    const char *p;
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *ai = NULL;
    int ok;

    path[0] = '\0';
    if (conf == NULL || strncmp(conf, "swtpm", 5) != 0 || (conf[5] != '\0' && conf[5] != ':'))
        return 0;
    for (p = conf[5] == ':' ? conf + 6 : conf + 5; *p != '\0';) {
        const char *eq = strchr(p, '='), *end = strchr(p, ',');
        size_t klen, vlen;
        char *dst;
        size_t cap;

        if (end == NULL)
            end = p + strlen(p);
        if (eq == NULL || eq > end)
            return 0;
        klen = (size_t)(eq - p);
        vlen = (size_t)(end - eq - 1);
        if (klen == 4 && strncmp(p, "host", 4) == 0)
            dst = host, cap = sizeof(host);
        else if (klen == 4 && strncmp(p, "port", 4) == 0)
            dst = port, cap = sizeof(port);
        else if (klen == 4 && strncmp(p, "path", 4) == 0)
            dst = path, cap = sizeof(path);
        else
            return 0;
        if (vlen == 0 || vlen >= cap)
            return 0;
        memcpy(dst, eq + 1, vlen);
        dst[vlen] = '\0';
        p = *end == ',' ? end + 1 : end;
    }
    memset(addr, 0, sizeof(*addr));
    if (path[0] != '\0') {
        struct sockaddr_un *un = (struct sockaddr_un *)addr;

        un->sun_family = AF_UNIX;
        memcpy(un->sun_path, path, strlen(path) + 1);
        *addrlen = (socklen_t)sizeof(*un);
        return 1;
    }
    if (getaddrinfo(host, port, &hints, &ai) != 0 || ai == NULL)
        return 0;
    ok = ai->ai_addrlen <= sizeof(*addr);
    if (ok) {
        memcpy(addr, ai->ai_addr, ai->ai_addrlen);
        *addrlen = ai->ai_addrlen;
    }
    freeaddrinfo(ai);
    return ok;
}

static TSS2_RC guard_transmit(TSS2_TCTI_CONTEXT *c, size_t size, const uint8_t *cmd)
{
    guard_tcti *g = guard_cast(c);
    guard_io *io;

    if (g == NULL)
        return TSS2_TCTI_RC_BAD_CONTEXT;
    if (g->sock ? g->dead : g->io == NULL)
        return TSS2_TCTI_RC_IO_ERROR;
    if (g->pending)
        return TSS2_TCTI_RC_BAD_SEQUENCE;
    if (cmd == NULL || size < 10 || size > TPM2_MAX_COMMAND_SIZE)
        return TSS2_TCTI_RC_BAD_VALUE;
    g->bound_ms = g->bound;
    if (cmd_is_rsa_create(cmd, size))
        g->bound_ms *= RSA_BOUND_FACTOR;
    if (g->sock)
        return sock_transmit(g, size, cmd);
    io = g->io;
    pthread_mutex_lock(&io->m);
    memcpy(io->cmd, cmd, size);
    io->cmdlen = size;
    io->state = G_JOB;
    pthread_cond_broadcast(&io->cv);
    pthread_mutex_unlock(&io->m);
    g->pending = 1;
    g->have_rsp = 0;
    return TSS2_RC_SUCCESS;
}

/* Gives the connection up to its worker (lock held by nobody; the worker may be mid-command). */
static void guard_abandon(guard_tcti *g, int stalled)
{
    guard_io *io = g->io;
    tpm_tcti_watch *w = g->w;

    g->io = NULL;
    g->pending = g->have_rsp = 0;
    pthread_mutex_lock(&io->m);
    if (stalled) {
        pthread_mutex_lock(&stall_lock);
        w->mark->refs++;
        w->mark->waiting++;
        pthread_mutex_unlock(&stall_lock);
        io->mark = w->mark;
    }
    io->abandoned = 1;
    pthread_cond_broadcast(&io->cv);
    pthread_mutex_unlock(&io->m);
    pthread_detach(g->thread);
}

static TSS2_RC guard_receive(TSS2_TCTI_CONTEXT *c, size_t *size, uint8_t *rsp, int32_t timeout)
{
    guard_tcti *g = guard_cast(c);
    guard_io *io = NULL;
    struct timespec dl;
    TSS2_RC rc;

    (void)timeout; /* keyx's bound, whatever the caller asks (ESYS and SAPI: block) */
    if (g == NULL || size == NULL)
        return g == NULL ? TSS2_TCTI_RC_BAD_CONTEXT : TSS2_TCTI_RC_BAD_REFERENCE;
    if (g->sock ? g->dead : g->io == NULL)
        return TSS2_TCTI_RC_IO_ERROR;
    if (!g->pending)
        return TSS2_TCTI_RC_BAD_SEQUENCE;
    if (g->sock)
        return sock_receive(g, size, rsp);
    io = g->io;
    if (!g->have_rsp) {
        tpm_deadline_in(CLOCK_MONOTONIC, &dl, g->bound_ms);
        pthread_mutex_lock(&io->m);
        while (io->state != G_DONE)
            if (pthread_cond_timedwait(&io->cv, &io->m, &dl) == ETIMEDOUT)
                break;
        if (io->state != G_DONE) {
            pthread_mutex_unlock(&io->m);
            g->w->timed_out = g->bound_ms;
            g->w->flush_stale = 1;
            guard_abandon(g, 1);
            return TSS2_TCTI_RC_IO_ERROR;
        }
        io->state = G_IDLE;
        rc = io->rc;
        pthread_mutex_unlock(&io->m);
        if (rc != TSS2_RC_SUCCESS) {
            g->pending = 0;
            return rc;
        }
        g->have_rsp = 1;
    }
    if (rsp == NULL) {
        *size = io->rsplen;
        return TSS2_RC_SUCCESS;
    }
    if (*size < io->rsplen) {
        *size = io->rsplen;
        return TSS2_TCTI_RC_INSUFFICIENT_BUFFER;
    }
    memcpy(rsp, io->rsp, io->rsplen);
    OPENSSL_cleanse(io->rsp, io->rsplen); /* as in sock_receive */
    *size = io->rsplen;
    g->pending = g->have_rsp = 0;
    return TSS2_RC_SUCCESS;
}

static void guard_finalize(TSS2_TCTI_CONTEXT *c)
{
    guard_tcti *g = guard_cast(c);
    guard_io *io;
    int busy;

    if (g == NULL)
        return;
    if (g->sock && g->fd >= 0)
        close(g->fd);
    if (!g->sock && (io = g->io) != NULL) {
        pthread_mutex_lock(&io->m);
        busy = io->state == G_JOB;
        if (!busy) {
            io->quit = 1;
            pthread_cond_broadcast(&io->cv);
        }
        pthread_mutex_unlock(&io->m);
        if (busy) /* a command still out (an error path left it): never wait for it */
            guard_abandon(g, 1);
        else
            pthread_join(g->thread, NULL); /* idle: it closes the connection and ends now */
    }
    g->v1.magic = 0;
}

static TSS2_RC guard_cancel(TSS2_TCTI_CONTEXT *c)
{
    (void)c;
    return TSS2_TCTI_RC_NOT_IMPLEMENTED;
}

static TSS2_RC guard_poll_handles(TSS2_TCTI_CONTEXT *c, TSS2_TCTI_POLL_HANDLE *h, size_t *n)
{
    (void)c;
    (void)h;
    (void)n;
    return TSS2_TCTI_RC_NOT_IMPLEMENTED;
}

static TSS2_RC guard_set_locality(TSS2_TCTI_CONTEXT *c, uint8_t locality)
{
    (void)c;
    (void)locality;
    return TSS2_TCTI_RC_NOT_IMPLEMENTED;
}

/* keyx.so must stay mapped while a worker it gave up on may still run its code (an application
 * that unloads the provider while the TPM is stalled). */
static void pin_module(void)
{
    Dl_info info;

    if (dladdr((void *)guard_main, &info) != 0 && info.dli_fname != NULL)
        (void)dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
}

static pthread_once_t pin_once = PTHREAD_ONCE_INIT;

/* The bounded TCTI in front of inner (a loader context; NULL for swtpm, which keyx reaches
 * through its own socket). inner is owned by the result from now on, also on failure. */
static TSS2_RC tcti_new(TSS2_TCTI_CONTEXT *inner, const char *conf, unsigned bound_ms,
                        tpm_tcti_watch *w, TSS2_TCTI_CONTEXT **out)
{
    guard_tcti *g = OPENSSL_zalloc(sizeof(*g));
    guard_io *io = OPENSSL_zalloc(sizeof(*io));
    pthread_condattr_t ca;
    sigset_t all, old;
    int ok;

    *out = NULL;
    if (g != NULL && swtpm_address(conf, &g->addr, &g->addrlen)) {
        /* swtpm: keyx's socket; the loader's context only checked the configuration. */
        OPENSSL_free(io);
        if (inner != NULL)
            Tss2_TctiLdr_Finalize(&inner);
        g->sock = 1;
        g->fd = -1;
        io = NULL;
        goto fill;
    }
    if (g == NULL || io == NULL || inner == NULL) {
        OPENSSL_free(g);
        OPENSSL_free(io);
        if (inner != NULL)
            Tss2_TctiLdr_Finalize(&inner);
        return inner == NULL ? TSS2_TCTI_RC_BAD_CONTEXT : TSS2_TCTI_RC_MEMORY;
    }
    pthread_once(&pin_once, pin_module);
    io->inner = inner;
    pthread_mutex_init(&io->m, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&io->cv, &ca);
    pthread_condattr_destroy(&ca);
    /* The worker takes no signals: they stay with the application's threads. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    ok = pthread_create(&g->thread, NULL, guard_main, io) == 0;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (!ok) {
        pthread_cond_destroy(&io->cv);
        pthread_mutex_destroy(&io->m);
        OPENSSL_free(io);
        OPENSSL_free(g);
        Tss2_TctiLdr_Finalize(&inner);
        return TSS2_TCTI_RC_GENERAL_FAILURE;
    }
fill:
    g->io = io;
    g->w = w;
    g->bound = bound_ms;
    g->v1.magic = GUARD_MAGIC;
    g->v1.version = 1;
    g->v1.transmit = guard_transmit;
    g->v1.receive = guard_receive;
    g->v1.finalize = guard_finalize;
    g->v1.cancel = guard_cancel;
    g->v1.getPollHandles = guard_poll_handles;
    g->v1.setLocality = guard_set_locality;
    *out = (TSS2_TCTI_CONTEXT *)g;
    return TSS2_RC_SUCCESS;
}

/* ---- bounded opening ----------------------------------------------------------------------
 * A TCTI's initialization may talk to the TPM (the swtpm and mssim TCTIs do, over sockets with no
 * timeout): a stopped TPM would hang a new process in it for as long as the TPM stays stopped.
 * The loader runs in a thread of its own; the caller waits bound_ms. A thread given up on is
 * left to finish: it finalizes what it opened and frees the job (refs). */

typedef struct open_job {
    pthread_mutex_t m;
    pthread_cond_t cv; /* CLOCK_MONOTONIC: done */
    int refs, done, abandoned, has_conf;
    TSS2_RC rc;
    TSS2_TCTI_CONTEXT *ctx;
    char conf[];
} open_job;

static void open_job_unref(open_job *j)
{
    int last;

    pthread_mutex_lock(&j->m);
    last = --j->refs == 0;
    pthread_mutex_unlock(&j->m);
    if (last) {
        pthread_cond_destroy(&j->cv);
        pthread_mutex_destroy(&j->m);
        free(j); /* plain malloc: the thread may outlive the provider's use of libcrypto */
    }
}

static void *open_main(void *arg)
{
    open_job *j = arg;
    TSS2_TCTI_CONTEXT *ctx = NULL;
    TSS2_RC rc = Tss2_TctiLdr_Initialize(j->has_conf ? j->conf : NULL, &ctx);

    pthread_mutex_lock(&j->m);
    j->done = 1;
    j->rc = rc;
    if (j->abandoned) {
        if (rc == TSS2_RC_SUCCESS)
            Tss2_TctiLdr_Finalize(&ctx);
    } else {
        j->ctx = ctx;
    }
    pthread_cond_signal(&j->cv);
    pthread_mutex_unlock(&j->m);
    open_job_unref(j);
    return NULL;
}

static TSS2_RC loader_open(const char *conf, unsigned bound_ms, TSS2_TCTI_CONTEXT **out,
                           int *timed_out)
{
    size_t len = conf != NULL ? strlen(conf) : 0;
    open_job *j = calloc(1, sizeof(*j) + len + 1);
    pthread_condattr_t ca;
    pthread_attr_t ta;
    pthread_t t;
    sigset_t all, old;
    struct timespec dl;
    TSS2_RC rc;
    int ok, err = 0;

    *out = NULL;
    if (j == NULL)
        return TSS2_TCTI_RC_MEMORY;
    pthread_once(&pin_once, pin_module);
    j->refs = 2;
    j->has_conf = conf != NULL;
    if (conf != NULL)
        memcpy(j->conf, conf, len + 1);
    pthread_mutex_init(&j->m, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&j->cv, &ca);
    pthread_condattr_destroy(&ca);
    pthread_attr_init(&ta);
    pthread_attr_setdetachstate(&ta, PTHREAD_CREATE_DETACHED);
    /* The thread takes no signals: they stay with the application's threads. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    ok = pthread_create(&t, &ta, open_main, j) == 0;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&ta);
    if (!ok) {
        j->refs = 1;
        open_job_unref(j);
        return TSS2_TCTI_RC_GENERAL_FAILURE;
    }
    tpm_deadline_in(CLOCK_MONOTONIC, &dl, bound_ms);
    pthread_mutex_lock(&j->m);
    while (!j->done && err != ETIMEDOUT)
        err = pthread_cond_timedwait(&j->cv, &j->m, &dl);
    if (j->done) {
        rc = j->rc;
        *out = j->ctx;
    } else {
        j->abandoned = 1;
        *timed_out = 1;
        rc = TSS2_TCTI_RC_IO_ERROR;
    }
    pthread_mutex_unlock(&j->m);
    open_job_unref(j);
    return rc;
}

TSS2_RC tpm_tcti_open(const char *conf, unsigned bound_ms, tpm_tcti_watch *w,
                      TSS2_TCTI_CONTEXT **out, int *timed_out)
{
    struct sockaddr_storage addr;
    socklen_t addrlen;
    TSS2_TCTI_CONTEXT *inner = NULL;
    TSS2_RC rc;

    *out = NULL;
    *timed_out = 0;
    /* swtpm: keyx's own socket, which connects within the bound at each command. */
    if (swtpm_address(conf, &addr, &addrlen))
        return tcti_new(NULL, conf, bound_ms, w, out);
    if ((rc = loader_open(conf, bound_ms, &inner, timed_out)) != TSS2_RC_SUCCESS)
        return rc;
    return tcti_new(inner, conf, bound_ms, w, out);
}

void tpm_tcti_free(TSS2_TCTI_CONTEXT **c)
{
    if (*c != NULL) {
        guard_finalize(*c);
        OPENSSL_free(*c);
        *c = NULL;
    }
}

/* ---- the device's watch ------------------------------------------------------------------ */

int tpm_tcti_watch_init(tpm_tcti_watch *w)
{
    w->timed_out = 0;
    w->flush_stale = 0;
    w->stale_fd = -1;
    if ((w->mark = OPENSSL_zalloc(sizeof(*w->mark))) == NULL)
        return 0;
    w->mark->refs = 1;
    return 1;
}

void tpm_tcti_watch_cleanup(tpm_tcti_watch *w)
{
    if (w->stale_fd >= 0)
        close(w->stale_fd);
    w->stale_fd = -1;
    if (w->mark != NULL)
        stall_unref(w->mark);
    w->mark = NULL;
}

int tpm_tcti_unanswered(tpm_tcti_watch *w)
{
    int n;

    pthread_mutex_lock(&stall_lock);
    n = w->mark != NULL && w->mark->waiting > 0;
    pthread_mutex_unlock(&stall_lock);
    if (!n && w->stale_fd >= 0) {
        struct pollfd p = {.fd = w->stale_fd, .events = POLLIN};

        if (poll(&p, 1, 0) == 0)
            return 1;       /* still no answer */
        close(w->stale_fd); /* answered, or the connection broke: the TPM is back or gone */
        w->stale_fd = -1;
    }
    return n;
}

void tpm_tcti_fork_lock(void)
{
    pthread_mutex_lock(&stall_lock);
}

void tpm_tcti_fork_unlock(void)
{
    pthread_mutex_unlock(&stall_lock);
}

void tpm_tcti_watch_forked(tpm_tcti_watch *w)
{
    w->mark->waiting = 0;
    w->mark->refs = 1;
    if (w->stale_fd >= 0) /* the parent's: it closes its own copy when the TPM answers */
        close(w->stale_fd);
    w->stale_fd = -1;
}
