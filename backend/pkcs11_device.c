/* The PKCS#11 module, its tokens, login and session pools (see pkcs11_device.h). */
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <p11-kit/p11-kit.h>

#include <openssl/crypto.h>
#include <openssl/err.h>

#include "backend/pkcs11_device.h"
#include "backend/watchdog.h"
#include "provider/audit.h"
#include "provider/errors.h"
#include "provider/provctx.h"

#define MAX_TOKENS 8   /* failover set plus tokens named only by key URIs */
#define POOL_MAX 32    /* idle sessions kept per token */
#define DOWN_SECONDS 5 /* a failed token is passed over this long before it is tried again */
/* Some modules keep serving a removed token from memory (SoftHSM answers everything but
 * C_GetTokenInfo once its token is deleted): its presence is checked this often. */
#define CHECK_SECONDS 1
/* A module whose slot list lacks a configured token is re-initialized at most this often (ms):
 * SoftHSM builds its slot list once, in C_Initialize, and misses a token whose file another
 * process is rewriting at that moment (every C_Login rewrites token.object). */
#define REINIT_MS 1000
/* SoftHSM 2.6 rewrites a token's file on every C_Login (it resets the failed-login flags): under
 * its file lock it truncates token.object, unlocks, and only then is the new content written (a
 * buffered stream flushed at close). A process reading the token in that instant sees it empty:
 * its C_Initialize leaves the token out of the slot list or keeps it without PINs (C_Login then
 * answers CKR_USER_PIN_NOT_INITIALIZED), C_GetTokenInfo answers CKR_GENERAL_ERROR. Forked workers
 * that log in at once hit it all the time. The file is whole again a moment later, so the module
 * is initialized again (or C_GetTokenInfo asked again) up to SETTLE_TRIES times with growing pauses
 * (62 ms in all) before such an answer counts; a token that is really gone costs that once. A lock
 * of keyx's own around C_Initialize and C_Login could not help: the writer may be any program using
 * the token, and SoftHSM's own lock does not cover the write. */
#define SETTLE_TRIES 5

#ifndef CKM_EC_MONTGOMERY_KEY_PAIR_GEN /* PKCS#11 3.0; p11-kit 0.24's header predates it */
#define CKM_EC_MONTGOMERY_KEY_PAIR_GEN 0x00001056UL
#endif

#ifndef KEYX_P11KIT_PROXY
#define KEYX_P11KIT_PROXY "p11-kit-proxy.so"
#endif

typedef struct p11_tok {
    P11KitUri *uri; /* NULL: the first initialized token of the module */
    int in_set;     /* listed in pkcs11-token (failover set); else found through a key URI */
    int found;      /* slot is known for the current generation */
    CK_SLOT_ID slot;
    char label[33];
    char serial[17]; /* token info serialNumber, blanks trimmed: names the token in locators */
    int logged_in;
    CK_RV pin_failed; /* CKR_PIN_INCORRECT/LOCKED seen: never log in again (no lockout loop) */
    long down_until;  /* monotonic seconds; 0: up */
    long checked_at;  /* last presence check (C_GetTokenInfo), monotonic seconds */
    int lost; /* failed with a device error (a server gone): back only after re-initialization */
    uint32_t oaep_refused;        /* OAEP parameter sets the token refused (pkcs11_rsa.c) */
    uint32_t pss_ok, pss_refused; /* PSS parameter sets tried in C_SignInit (pkcs11_sign.c) */
    int caps_known;
    p11_caps caps;
    CK_SESSION_HANDLE idle[POOL_MAX];
    size_t nidle;
} p11_tok;

struct p11_dev {
    keyx_provctx *p;
    pthread_mutex_t lock;
    const char *module_path; /* configured path, or the p11-kit proxy */
    int proxy;               /* module_path is p11-kit's proxy: loaded by dlopen (see proxy_load) */
    void *proxy_dl;          /* the proxy's dlopen handle while d->f is its function list */
    CK_FUNCTION_LIST *f;     /* NULL until first use */
    int we_initialized;      /* we called C_Initialize: we may finalize */
    CK_RV load_failed;       /* the module could not be loaded: not retried */
    char load_error[512];    /* why, repeated on every later use */
    uint64_t gen;            /* bumps when the module is re-initialized (fork, token lost) */
    unsigned int forks_seen;
    int busy;             /* sessions of this generation handed out and not yet given back */
    long objects;         /* live session objects keyx made in this generation (keys) */
    int need_init;        /* re-initialization finalized the module but C_Initialize failed */
    CK_RV init_rv;        /* what that C_Initialize answered; CKR_FUNCTION_FAILED: cut off */
    long long init_ms;    /* monotonic ms of the last C_Initialize (first or re-init) */
    unsigned int reinits; /* re-initializations after a token was missing */
    int settle;           /* quick re-initializations since the first C_Initialize (SETTLE_TRIES) */
    p11_tok tok[MAX_TOKENS];
    int ntok, nset;
    atomic_int over_socket; /* p11_dev_over_socket */
    /* The module as p11_dev_describe tells it, readable without the lock (which C_Initialize
     * and C_Login hold for as long as the module takes): one of MOD_*. load_error is final once
     * this says MOD_FAILED. */
    atomic_int mod;
};

enum {
    MOD_NONE,   /* not loaded yet (keyx loads it at first use) */
    MOD_READY,  /* loaded and initialized */
    MOD_FAILED, /* could not be loaded or initialized: load_error says why, never retried */
    MOD_REINIT  /* a re-initialization failed: retried at most once a second */
};

/* ---- fork ------------------------------------------------------------------------------ */

/* A forked child must re-initialize the module before its first call (PKCS#11 2.40 §6.7.7):
 * the parent's sessions, logins and session objects do not exist in the child. */
static atomic_uint forks;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void count_fork(void)
{
    atomic_fetch_add(&forks, 1);
}

static void register_atfork(void)
{
    pthread_atfork(NULL, NULL, count_fork);
}

/* ---- process exit ---------------------------------------------------------------------- */

/* At exit(), a module's own destructors (SoftHSM's C++ statics) run before libcrypto's
 * OPENSSL_cleanup tears the provider down: calling into the module then crashes. A handler
 * registered after the module was loaded runs before those destructors (reverse order) and
 * tells the teardown to leave the module alone; the process is ending anyway. */
static atomic_int exiting;
static pthread_once_t atexit_once = PTHREAD_ONCE_INIT;

static void note_exit(void *unused)
{
    (void)unused;
    atomic_store(&exiting, 1);
}

/* What atexit() does in a shared object, spelled out: the handler belongs to keyx.so
 * (__dso_handle), so a dlclose of keyx runs and removes it. A plain atexit() call can bind to a
 * sanitizer's interceptor (ThreadSanitizer exports one), which registers it for the main program:
 * after OSSL_LIB_CTX_free unloads keyx, exit() then jumps into unmapped code. */
extern void *__dso_handle;
extern int __cxa_atexit(void (*fn)(void *), void *arg, void *dso);

static void register_atexit(void)
{
    __cxa_atexit(note_exit, NULL, &__dso_handle);
}

/* ---- small helpers --------------------------------------------------------------------- */

static long now_seconds(void)
{
    struct timespec ts;

    return clock_gettime(CLOCK_MONOTONIC, &ts) == 0 ? (long)ts.tv_sec : 0;
}

static long long now_ms(void)
{
    struct timespec ts;

    if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
        return 0;
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* The pause before the attempt-th new try of an answer that may come from a token file being
 * rewritten (SETTLE_TRIES): 2, 4, 8, 16, 32 ms. */
static void settle_pause(int attempt)
{
    struct timespec ts = {0, 2000000L << attempt};

    nanosleep(&ts, NULL);
}

/* C_GetTokenInfo, asked again while it answers as for a token file being rewritten (SoftHSM
 * reads the token's flags from the file at every call). */
static CK_RV token_info(p11_dev *d, CK_SLOT_ID slot, CK_TOKEN_INFO *info)
{
    CK_RV rv;

    for (int i = 0;
         (rv = d->f->C_GetTokenInfo(slot, info)) == CKR_GENERAL_ERROR && i < SETTLE_TRIES; i++)
        settle_pause(i);
    return rv;
}

static void copy_label(char *dst, const CK_UTF8CHAR *src, size_t n)
{
    size_t len = n;

    while (len > 0 && src[len - 1] == ' ')
        len--;
    memcpy(dst, src, len);
    dst[len] = '\0';
}

/* A failover-set token's name before it was ever used: the label its URI asks for. */
static const char *set_token_name(const p11_tok *t, char name[33])
{
    CK_TOKEN_INFO *want;

    if (t->label[0] != '\0')
        return t->label;
    want = t->uri != NULL ? p11_kit_uri_get_token_info(t->uri) : NULL;
    if (want != NULL && want->label[0] != '\0' && want->label[0] != ' ') {
        copy_label(name, want->label, sizeof(want->label));
        return name;
    }
    return "the next token in pkcs11-token";
}

const char *p11_rv_name(CK_RV rv, char *buf, size_t len)
{
    static const struct {
        CK_RV rv;
        const char *name;
    } names[] = {
        {CKR_OK, "CKR_OK"},
        {CKR_HOST_MEMORY, "CKR_HOST_MEMORY"},
        {CKR_SLOT_ID_INVALID, "CKR_SLOT_ID_INVALID"},
        {CKR_GENERAL_ERROR, "CKR_GENERAL_ERROR"},
        {CKR_FUNCTION_FAILED, "CKR_FUNCTION_FAILED"},
        {CKR_ARGUMENTS_BAD, "CKR_ARGUMENTS_BAD"},
        {CKR_ATTRIBUTE_TYPE_INVALID, "CKR_ATTRIBUTE_TYPE_INVALID"},
        {CKR_ATTRIBUTE_VALUE_INVALID, "CKR_ATTRIBUTE_VALUE_INVALID"},
        {CKR_ATTRIBUTE_SENSITIVE, "CKR_ATTRIBUTE_SENSITIVE"},
        {CKR_DEVICE_ERROR, "CKR_DEVICE_ERROR"},
        {CKR_DEVICE_MEMORY, "CKR_DEVICE_MEMORY"},
        {CKR_DEVICE_REMOVED, "CKR_DEVICE_REMOVED"},
        {CKR_DOMAIN_PARAMS_INVALID, "CKR_DOMAIN_PARAMS_INVALID"},
        {CKR_KEY_HANDLE_INVALID, "CKR_KEY_HANDLE_INVALID"},
        {CKR_KEY_TYPE_INCONSISTENT, "CKR_KEY_TYPE_INCONSISTENT"},
        {CKR_KEY_FUNCTION_NOT_PERMITTED, "CKR_KEY_FUNCTION_NOT_PERMITTED"},
        {CKR_MECHANISM_INVALID, "CKR_MECHANISM_INVALID"},
        {CKR_MECHANISM_PARAM_INVALID, "CKR_MECHANISM_PARAM_INVALID"},
        {CKR_OBJECT_HANDLE_INVALID, "CKR_OBJECT_HANDLE_INVALID"},
        {CKR_OPERATION_ACTIVE, "CKR_OPERATION_ACTIVE"},
        {CKR_PIN_INCORRECT, "CKR_PIN_INCORRECT"},
        {CKR_PIN_LEN_RANGE, "CKR_PIN_LEN_RANGE"},
        {CKR_PIN_EXPIRED, "CKR_PIN_EXPIRED"},
        {CKR_PIN_LOCKED, "CKR_PIN_LOCKED"},
        {CKR_SESSION_CLOSED, "CKR_SESSION_CLOSED"},
        {CKR_SESSION_COUNT, "CKR_SESSION_COUNT"},
        {CKR_SESSION_HANDLE_INVALID, "CKR_SESSION_HANDLE_INVALID"},
        {CKR_TEMPLATE_INCOMPLETE, "CKR_TEMPLATE_INCOMPLETE"},
        {CKR_TEMPLATE_INCONSISTENT, "CKR_TEMPLATE_INCONSISTENT"},
        {CKR_TOKEN_NOT_PRESENT, "CKR_TOKEN_NOT_PRESENT"},
        {CKR_TOKEN_NOT_RECOGNIZED, "CKR_TOKEN_NOT_RECOGNIZED"},
        {CKR_TOKEN_WRITE_PROTECTED, "CKR_TOKEN_WRITE_PROTECTED"},
        {CKR_USER_NOT_LOGGED_IN, "CKR_USER_NOT_LOGGED_IN"},
        {CKR_BUFFER_TOO_SMALL, "CKR_BUFFER_TOO_SMALL"},
        {CKR_CRYPTOKI_NOT_INITIALIZED, "CKR_CRYPTOKI_NOT_INITIALIZED"},
        {CKR_CRYPTOKI_ALREADY_INITIALIZED, "CKR_CRYPTOKI_ALREADY_INITIALIZED"},
    };

    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (names[i].rv == rv)
            return names[i].name;
    snprintf(buf, len, "CKR_0x%08lX", (unsigned long)rv);
    return buf;
}

int p11_rv_is_down(CK_RV rv)
{
    switch (rv) {
    case CKR_DEVICE_ERROR:
    case CKR_DEVICE_MEMORY:
    case CKR_DEVICE_REMOVED:
    case CKR_TOKEN_NOT_PRESENT:
    case CKR_TOKEN_NOT_RECOGNIZED:
    case CKR_SLOT_ID_INVALID:
    case CKR_SESSION_CLOSED:
    case CKR_SESSION_HANDLE_INVALID:
    case CKR_CRYPTOKI_NOT_INITIALIZED:
    case CKR_GENERAL_ERROR:
        return 1;
    default:
        return 0;
    }
}

static const char *rv_hint(CK_RV rv)
{
    switch (rv) {
    case CKR_PIN_INCORRECT:
        return "PIN incorrect: fix pkcs11-pin (keyx does not retry, so the token is not locked)";
    case CKR_PIN_LOCKED:
        return "the token's user PIN is locked: unlock it with the SO PIN";
    case CKR_PIN_LEN_RANGE:
        return "PIN incorrect (wrong length): fix pkcs11-pin";
    case CKR_MECHANISM_INVALID:
    case CKR_MECHANISM_PARAM_INVALID:
        return "the token does not support this mechanism or its parameters";
    case CKR_DOMAIN_PARAMS_INVALID:
    case CKR_TEMPLATE_INCONSISTENT:
        return "the token does not support this curve or group";
    default:
        return p11_rv_is_down(rv) ? "token or device unreachable" : NULL;
    }
}

struct keyx_provctx *p11_dev_prov(const p11_dev *d)
{
    return d->p;
}

const char *p11_dev_token_label(p11_dev *d, int tok)
{
    return tok >= 0 && tok < d->ntok && d->tok[tok].label[0] ? d->tok[tok].label : "?";
}

int p11_dev_token_name(p11_dev *d, int tok, char label[33], char serial[17])
{
    int ok;

    pthread_mutex_lock(&d->lock);
    ok = tok >= 0 && tok < d->ntok && d->tok[tok].label[0] != '\0';
    if (ok) {
        memcpy(label, d->tok[tok].label, 33);
        memcpy(serial, d->tok[tok].serial, 17);
    }
    pthread_mutex_unlock(&d->lock);
    return ok;
}

int p11_fail(p11_sess *s, CK_RV rv, const char *what)
{
    char buf[24];
    const char *hint = rv_hint(rv);
    unsigned int limit;

    if (p11_rv_is_down(rv) && keyx_watchdog_cut(&limit) > 0) {
        KEYX_ERR(s->dev->p, KEYX_R_DEVICE_TIMEOUT,
                 "pkcs11: %s on token '%s': no answer within %u ms (pkcs11-timeout): keyx cut "
                 "the connection to the token's server and marked the token down; check the "
                 "server, or raise pkcs11-timeout",
                 what, p11_dev_token_label(s->dev, s->tok), limit);
        return KEYX_BACKEND_DOWN;
    }

    int reason = rv == CKR_PIN_INCORRECT || rv == CKR_PIN_LOCKED || rv == CKR_PIN_LEN_RANGE ||
                         rv == CKR_PIN_EXPIRED
                     ? KEYX_R_LOGIN_FAILED
                 : p11_rv_is_down(rv) ? KEYX_R_BACKEND_UNAVAILABLE
                                      : KEYX_R_BACKEND_FAILURE;

    KEYX_ERR(s->dev->p, reason, "pkcs11: %s on token '%s' failed: %s%s%s", what,
             p11_dev_token_label(s->dev, s->tok), p11_rv_name(rv, buf, sizeof(buf)),
             hint ? ": " : "", hint ? hint : "");
    return p11_rv_is_down(rv) ? KEYX_BACKEND_DOWN : 0;
}

/* ---- configuration --------------------------------------------------------------------- */

/* 1 if path names p11-kit's proxy module: the default, the same file as the proxy (on Debian
 * p11-kit-proxy.so is a link to libp11-kit.so.0), or a file of that name elsewhere. */
static int is_proxy_path(const char *path)
{
    const char *base = strrchr(path, '/');
    struct stat a, b;

    if (strcmp(base != NULL ? base + 1 : path, "p11-kit-proxy.so") == 0)
        return 1;
    return stat(path, &a) == 0 && stat(KEYX_P11KIT_PROXY, &b) == 0 && a.st_dev == b.st_dev &&
           a.st_ino == b.st_ino;
}

/* Parses one pkcs11-token URI. The text is only printed with pin attributes left out. */
static int add_set_token(p11_dev *d, const char *text)
{
    P11KitUri *uri = p11_kit_uri_new();
    int rc;

    if (uri == NULL)
        return 0;
    rc = p11_kit_uri_parse(
        text, P11_KIT_URI_FOR_TOKEN | P11_KIT_URI_FOR_MODULE_WITH_VERSION | P11_KIT_URI_FOR_SLOT,
        uri);
    if (rc != P11_KIT_URI_OK) {
        p11_kit_uri_free(uri);
        KEYX_ERR(d->p, KEYX_R_CONFIG_INVALID,
                 "pkcs11-token: invalid PKCS#11 URI (%s): expected e.g. pkcs11:token=keyx",
                 p11_kit_uri_message(rc));
        return 0;
    }
    if (d->ntok == MAX_TOKENS) {
        p11_kit_uri_free(uri);
        KEYX_ERR(d->p, KEYX_R_CONFIG_INVALID, "pkcs11-token: at most %d tokens", MAX_TOKENS);
        return 0;
    }
    d->tok[d->ntok].uri = uri;
    d->tok[d->ntok].in_set = 1;
    d->ntok++;
    d->nset++;
    return 1;
}

int p11_dev_new(struct keyx_provctx *p, p11_dev **out)
{
    p11_dev *d = OPENSSL_zalloc(sizeof(*d));
    char *list = NULL, *save = NULL;

    *out = NULL;
    if (d == NULL || pthread_mutex_init(&d->lock, NULL) != 0) {
        OPENSSL_free(d);
        KEYX_ERR(p, KEYX_R_INTERNAL, "out of memory");
        return 0;
    }
    d->p = p;
    d->module_path = p->cfg.pkcs11_module != NULL ? p->cfg.pkcs11_module : KEYX_P11KIT_PROXY;
    d->proxy = is_proxy_path(d->module_path);
    if (p->cfg.pkcs11_token != NULL) {
        if ((list = OPENSSL_strdup(p->cfg.pkcs11_token)) == NULL)
            goto err;
        for (char *t = strtok_r(list, " \t", &save); t != NULL; t = strtok_r(NULL, " \t", &save))
            if (!add_set_token(d, t))
                goto err;
        OPENSSL_free(list);
        list = NULL;
    }
    if (d->nset == 0) { /* no pkcs11-token: the first initialized token */
        d->tok[0].in_set = 1;
        d->ntok = d->nset = 1;
    }
    pthread_once(&atfork_once, register_atfork);
    d->forks_seen = atomic_load(&forks);
    *out = d;
    return 1;
err:
    OPENSSL_free(list);
    p11_dev_free(d);
    return 0;
}

/* ---- module ---------------------------------------------------------------------------- */

/* The p11-kit proxy: one function list whose slots are those of every module p11-kit registers
 * (pkcs11.conf(5): /etc/pkcs11/modules, /usr/share/p11-kit/modules, and for users other than
 * root ~/.config/pkcs11/modules), as pkcs11-provider gets it by default. It is dlopen'ed and its
 * C_GetFunctionList called, as any application uses it: p11_kit_module_load refuses to load the
 * proxy ("as a registered module"). Loading the registered modules one by one instead
 * (p11_kit_modules_load_and_initialize) would give several function lists, while the device
 * layer serves a failover set of tokens behind one. Each C_GetFunctionList call makes a proxy
 * instance of its own, so keyx initializes and finalizes its own instance: the modules behind
 * it are p11-kit's managed, reference-counted ones, and another user of them in the process
 * (pkcs11-provider, libp11 through the proxy) keeps its sessions. In a forked child the proxy's
 * C_Initialize sees the fork and initializes the modules again in the child (keyx's usual
 * C_Finalize + C_Initialize, module_ready). 0 with d->load_error set on failure. */
static int proxy_load(p11_dev *d)
{
    CK_C_GetFunctionList get_list = NULL;
    void *dl;
    CK_RV rv;
    char buf[24];

    if ((dl = dlopen(d->module_path, RTLD_NOW | RTLD_LOCAL)) == NULL) {
        const char *why = dlerror();

        snprintf(d->load_error, sizeof(d->load_error),
                 "p11-kit proxy: %s: install p11-kit's proxy (Debian: p11-kit-modules) or set "
                 "pkcs11-module to the path of a PKCS#11 module",
                 why != NULL ? why : "not found");
        return 0;
    }
    /* POSIX: dlsym's result converts to a function pointer */
    *(void **)&get_list = dlsym(dl, "C_GetFunctionList");
    if (get_list == NULL) {
        dlclose(dl);
        snprintf(d->load_error, sizeof(d->load_error),
                 "p11-kit proxy: it has no C_GetFunctionList: set pkcs11-module to the path of a "
                 "PKCS#11 module");
        return 0;
    }
    if ((rv = get_list(&d->f)) != CKR_OK || d->f == NULL) {
        d->f = NULL;
        dlclose(dl);
        snprintf(d->load_error, sizeof(d->load_error),
                 "p11-kit proxy: its C_GetFunctionList failed: %s: check the modules registered "
                 "with p11-kit (p11-kit list-modules)",
                 p11_rv_name(rv, buf, sizeof(buf)));
        return 0;
    }
    d->proxy_dl = dl;
    return 1;
}

/* Gives the module back to whoever loaded it (p11-kit, or the proxy's dlopen). */
static void module_release(p11_dev *d)
{
    if (d->f == NULL)
        return;
    if (d->proxy_dl != NULL)
        dlclose(d->proxy_dl);
    else
        p11_kit_module_release(d->f);
    d->proxy_dl = NULL;
    d->f = NULL;
}

static void forget_tokens(p11_dev *d, int close_sessions)
{
    for (int i = 0; i < d->ntok; i++) {
        p11_tok *t = &d->tok[i];

        if (close_sessions && d->f != NULL)
            for (size_t j = 0; j < t->nidle; j++)
                d->f->C_CloseSession(t->idle[j]);
        t->nidle = 0;
        t->found = 0;
        t->logged_in = 0;
    }
}

void p11_dev_free(p11_dev *d)
{
    if (d == NULL)
        return;
    if (atomic_load(&exiting)) {
        d->f = NULL; /* see note_exit() */
    } else if (d->f != NULL && d->forks_seen == atomic_load(&forks)) {
        forget_tokens(d, 1);
        /* Finalizing would also end the sessions of another user of the module in this process
         * (libp11, pkcs11-provider): only the one who initialized it finalizes it. */
        if (d->we_initialized)
            d->f->C_Finalize(NULL);
    }
    module_release(d);
    for (int i = 0; i < d->ntok; i++)
        if (d->tok[i].uri != NULL)
            p11_kit_uri_free(d->tok[i].uri);
    pthread_mutex_destroy(&d->lock);
    OPENSSL_free(d);
}

/* The process's open stream sockets (unix, TCP, vsock). */
static int stream_sockets(void)
{
    DIR *dir = opendir("/proc/self/fd");
    struct dirent *e;
    int n = 0;

    if (dir == NULL)
        return 0;
    while ((e = readdir(dir)) != NULL) {
        int fd = atoi(e->d_name), type;
        socklen_t len = sizeof(type);

        if (e->d_name[0] != '.' && fd != dirfd(dir) &&
            getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) == 0 && type == SOCK_STREAM)
            n++;
    }
    closedir(dir);
    return n;
}

static CK_RV module_initialize(p11_dev *d)
{
    CK_C_INITIALIZE_ARGS args;
    CK_RV rv;
    int before = stream_sockets();

    memset(&args, 0, sizeof(args));
    args.flags = CKF_OS_LOCKING_OK; /* sessions are used from several threads */
    /* SoftHSM leaves errors of its own libcrypto setup (the rdrand engine) in our queue. */
    ERR_set_mark();
    rv = d->f->C_Initialize(&args);
    ERR_pop_to_mark();
    /* A module that connected to a server: its calls can hang, the watchdog guards them
     * (pkcs11-timeout). A module working in the process never starts the watchdog's thread. */
    if (stream_sockets() > before)
        atomic_store(&d->over_socket, 1);
    d->we_initialized = rv == CKR_OK;
    d->init_ms = now_ms();
    return rv == CKR_CRYPTOKI_ALREADY_INITIALIZED ? CKR_OK : rv;
}

/* Loads and initializes the module on first use; re-initializes it in a forked child.
 * Called with the lock held. 1, or 0 with an error raised. */
static int module_ready(p11_dev *d)
{
    char buf[24];
    unsigned int f = atomic_load(&forks);
    CK_RV rv;

    if (d->f != NULL && d->forks_seen == f && !d->need_init)
        return 1;
    if (d->f != NULL && d->forks_seen == f) {
        /* A re-initialization (module_reinit) finalized the module; C_Initialize failed then. */
        unsigned int limit;

        if (now_ms() - d->init_ms >= REINIT_MS && keyx_watchdog_cut(NULL) == 0) {
            if ((rv = module_initialize(d)) == CKR_OK) {
                d->need_init = 0;
                atomic_store(&d->mod, MOD_READY);
                return 1;
            }
            d->init_rv = rv;
        }
        if (keyx_watchdog_cut(&limit) > 0)
            KEYX_ERR(d->p, KEYX_R_DEVICE_TIMEOUT,
                     "pkcs11: re-initializing module '%s': no answer within %u ms "
                     "(pkcs11-timeout); its server does not answer: retried at most once a second",
                     d->module_path, limit);
        else
            KEYX_ERR(d->p, KEYX_R_BACKEND_UNAVAILABLE,
                     "pkcs11: re-initializing module '%s' failed: %s (retried at most once a "
                     "second; a module reached over a socket: is its server up? SoftHSM: is its "
                     "tokendir readable?)",
                     d->module_path, p11_rv_name(d->init_rv, buf, sizeof(buf)));
        return 0;
    }
    if (d->f != NULL) {
        /* In a forked child: nothing of the parent's module state is usable here. */
        forget_tokens(d, 0);
        d->f->C_Finalize(NULL);
        d->forks_seen = f;
        d->gen++;
        d->busy = 0; /* the parent's borrowed sessions are given back to nobody here */
        d->objects = 0;
        d->need_init = 0;
        d->settle = 0;
        if ((rv = module_initialize(d)) != CKR_OK) {
            atomic_store(&d->mod, MOD_REINIT);
            KEYX_ERR(d->p, KEYX_R_BACKEND_UNAVAILABLE,
                     "pkcs11: re-initializing module '%s' after fork failed: %s", d->module_path,
                     p11_rv_name(rv, buf, sizeof(buf)));
            return 0;
        }
        atomic_store(&d->mod, MOD_READY);
        return 1;
    }
    if (d->load_failed) {
        KEYX_ERR(d->p, KEYX_R_MODULE_LOAD, "pkcs11: cannot load PKCS#11 module '%s': %s",
                 d->module_path, d->load_error);
        return 0;
    }
    if (d->proxy) {
        if (!proxy_load(d)) {
            d->load_failed = CKR_GENERAL_ERROR;
            /* the same text as every later use repeats (above) */
            KEYX_ERR(d->p, KEYX_R_MODULE_LOAD, "pkcs11: cannot load PKCS#11 module '%s': %s",
                     d->module_path, d->load_error);
            return 0;
        }
    } else {
        /* Unmanaged: keyx calls the module's own function list, with no p11-kit layer per call. */
        d->f = p11_kit_module_load(d->module_path, P11_KIT_MODULE_UNMANAGED);
    }
    if (d->f == NULL) {
        const char *msg = p11_kit_message();

        d->load_failed = CKR_GENERAL_ERROR;
        /* The hint first: p11-kit's message names the path twice and could push it out. */
        snprintf(d->load_error, sizeof(d->load_error), "check pkcs11-module: %s",
                 msg != NULL ? msg : "not found or not a PKCS#11 module");
        atomic_store(&d->mod, MOD_FAILED);
        KEYX_ERR(d->p, KEYX_R_MODULE_LOAD, "pkcs11: cannot load PKCS#11 module '%s': %s",
                 d->module_path, d->load_error);
        return 0;
    }
    pthread_once(&atexit_once, register_atexit);
    d->forks_seen = f;
    if ((rv = module_initialize(d)) != CKR_OK) {
        module_release(d);
        d->load_failed = rv;
        snprintf(d->load_error, sizeof(d->load_error),
                 "C_Initialize failed: %s (for SoftHSM: is SOFTHSM2_CONF set and its tokendir "
                 "readable?)",
                 p11_rv_name(rv, buf, sizeof(buf)));
        atomic_store(&d->mod, MOD_FAILED);
        KEYX_ERR(d->p, KEYX_R_MODULE_LOAD, "pkcs11: cannot load PKCS#11 module '%s': %s",
                 d->module_path, d->load_error);
        return 0;
    }
    atomic_store(&d->mod, MOD_READY);
    return 1;
}

int p11_dev_oaep_refused(p11_dev *d, int tok, int bit)
{
    int r;

    pthread_mutex_lock(&d->lock);
    r = tok >= 0 && tok < d->ntok && (d->tok[tok].oaep_refused >> bit & 1u);
    pthread_mutex_unlock(&d->lock);
    return r;
}

void p11_dev_oaep_refuse(p11_dev *d, int tok, int bit)
{
    pthread_mutex_lock(&d->lock);
    if (tok >= 0 && tok < d->ntok)
        d->tok[tok].oaep_refused |= 1u << bit;
    pthread_mutex_unlock(&d->lock);
}

void p11_dev_objects(p11_dev *d, uint64_t gen, int delta)
{
    pthread_mutex_lock(&d->lock);
    if (p11_dev_current(d, gen) && d->objects + delta >= 0)
        d->objects += delta;
    pthread_mutex_unlock(&d->lock);
}

int p11_dev_over_socket(p11_dev *d)
{
    return atomic_load(&d->over_socket);
}

int p11_dev_set_size(const p11_dev *d)
{
    return d->nset > 0 ? d->nset : 1;
}

int p11_dev_current(p11_dev *d, uint64_t gen)
{
    if (atomic_load(&exiting))
        return 0;
    return gen == d->gen && d->forks_seen == atomic_load(&forks);
}

/* ---- tokens ---------------------------------------------------------------------------- */

static int token_matches(const p11_tok *t, CK_FUNCTION_LIST *f, CK_SLOT_ID slot,
                         CK_TOKEN_INFO *info)
{
    CK_SLOT_INFO si;
    CK_INFO mi;

    if (t->uri == NULL)
        return (info->flags & CKF_TOKEN_INITIALIZED) != 0;
    if (!p11_kit_uri_match_token_info(t->uri, info))
        return 0;
    if (f->C_GetSlotInfo(slot, &si) == CKR_OK && !p11_kit_uri_match_slot_info(t->uri, &si))
        return 0;
    return f->C_GetInfo(&mi) != CKR_OK || p11_kit_uri_match_module_info(t->uri, &mi);
}

static void read_caps(p11_dev *d, p11_tok *t)
{
    CK_MECHANISM_INFO ec_gen, ecdh, dh_gen, dh_der, mont, rsa_gen, rsa_dec;
    CK_FUNCTION_LIST *f = d->f;
    int has_ecdh;

    memset(&t->caps, 0, sizeof(t->caps));
    has_ecdh = f->C_GetMechanismInfo(t->slot, CKM_ECDH1_DERIVE, &ecdh) == CKR_OK &&
               (ecdh.flags & CKF_DERIVE);
    if (has_ecdh && f->C_GetMechanismInfo(t->slot, CKM_EC_KEY_PAIR_GEN, &ec_gen) == CKR_OK &&
        (ec_gen.flags & CKF_GENERATE_KEY_PAIR)) {
        t->caps.ec = 1;
        t->caps.ec_min = ec_gen.ulMinKeySize;
        t->caps.ec_max = ec_gen.ulMaxKeySize;
    }
    if (has_ecdh &&
        f->C_GetMechanismInfo(t->slot, CKM_EC_MONTGOMERY_KEY_PAIR_GEN, &mont) == CKR_OK &&
        (mont.flags & CKF_GENERATE_KEY_PAIR))
        t->caps.montgomery = 1;
    if (f->C_GetMechanismInfo(t->slot, CKM_DH_PKCS_KEY_PAIR_GEN, &dh_gen) == CKR_OK &&
        (dh_gen.flags & CKF_GENERATE_KEY_PAIR) &&
        f->C_GetMechanismInfo(t->slot, CKM_DH_PKCS_DERIVE, &dh_der) == CKR_OK &&
        (dh_der.flags & CKF_DERIVE)) {
        t->caps.dh = 1;
        t->caps.dh_min = dh_gen.ulMinKeySize;
        t->caps.dh_max = dh_gen.ulMaxKeySize;
    }
    if (f->C_GetMechanismInfo(t->slot, CKM_RSA_PKCS_KEY_PAIR_GEN, &rsa_gen) == CKR_OK &&
        (rsa_gen.flags & CKF_GENERATE_KEY_PAIR) &&
        ((f->C_GetMechanismInfo(t->slot, CKM_RSA_PKCS_OAEP, &rsa_dec) == CKR_OK &&
          (rsa_dec.flags & CKF_DECRYPT)) ||
         (f->C_GetMechanismInfo(t->slot, CKM_RSA_X_509, &rsa_dec) == CKR_OK &&
          (rsa_dec.flags & CKF_DECRYPT)))) {
        t->caps.rsa = 1;
        t->caps.rsa_min = rsa_gen.ulMinKeySize;
        t->caps.rsa_max = rsa_gen.ulMaxKeySize;
    }
    {
        static const CK_MECHANISM_TYPE sign_mechs[3] = {CKM_ECDSA, CKM_RSA_PKCS, CKM_RSA_PKCS_PSS};
        CK_MECHANISM_INFO mi;

        for (size_t i = 0; i < 3; i++)
            if (f->C_GetMechanismInfo(t->slot, sign_mechs[i], &mi) == CKR_OK &&
                (mi.flags & CKF_SIGN)) {
                t->caps.sign[i].ok = 1;
                t->caps.sign[i].min = mi.ulMinKeySize;
                t->caps.sign[i].max = mi.ulMaxKeySize;
            }
    }
    t->caps_known = 1;
}

/* Finds the slot of token t. Lock held. 1, or KEYX_BACKEND_DOWN with an error raised. */
static int token_find(p11_dev *d, int idx)
{
    p11_tok *t = &d->tok[idx];
    CK_SLOT_ID slots[64];
    CK_ULONG n = 64;
    CK_TOKEN_INFO info;
    char present[256] = "", buf[24], wanted[33];
    CK_RV rv;

    if (t->found)
        return 1;
    if ((rv = d->f->C_GetSlotList(CK_TRUE, slots, &n)) != CKR_OK) {
        KEYX_ERR(d->p, KEYX_R_BACKEND_UNAVAILABLE, "pkcs11: listing the slots of '%s' failed: %s",
                 d->module_path, p11_rv_name(rv, buf, sizeof(buf)));
        return KEYX_BACKEND_DOWN;
    }
    for (CK_ULONG i = 0; i < n; i++) {
        if (token_info(d, slots[i], &info) != CKR_OK)
            continue;
        if (token_matches(t, d->f, slots[i], &info)) {
            t->slot = slots[i];
            t->found = 1;
            copy_label(t->label, info.label, sizeof(info.label));
            copy_label(t->serial, info.serialNumber, sizeof(info.serialNumber));
            if (!t->caps_known)
                read_caps(d, t);
            return 1;
        }
        if ((info.flags & CKF_TOKEN_INITIALIZED) && strlen(present) < sizeof(present) - 40) {
            char label[33];

            copy_label(label, info.label, sizeof(info.label));
            snprintf(present + strlen(present), sizeof(present) - strlen(present), "%s'%s'",
                     present[0] ? ", " : "", label);
        }
    }
    /* Through the proxy the tokens come from every registered module: say where they would be
     * registered, since an unregistered module is the likely cause. */
    if (t->uri == NULL && d->proxy)
        KEYX_ERR(d->p, KEYX_R_BACKEND_UNAVAILABLE,
                 "pkcs11: no initialized token in the modules registered with p11-kit (%s; see "
                 "p11-kit list-modules): initialize one (softhsm2-util --init-token), register "
                 "its module (a .module file in /etc/pkcs11/modules/) or set pkcs11-module",
                 d->module_path);
    else if (t->uri == NULL)
        KEYX_ERR(d->p, KEYX_R_BACKEND_UNAVAILABLE,
                 "pkcs11: no initialized token in module '%s': initialize one (softhsm2-util "
                 "--init-token) or set pkcs11-token",
                 d->module_path);
    else if (d->proxy)
        KEYX_ERR(d->p, KEYX_R_BACKEND_UNAVAILABLE,
                 "pkcs11: no token matches pkcs11-token entry %d (%s; tokens present in the "
                 "modules registered with p11-kit: %s): check pkcs11-token, or register the "
                 "token's module with p11-kit (p11-kit list-modules) or set pkcs11-module",
                 idx + 1, set_token_name(t, wanted), present[0] ? present : "none");
    else
        KEYX_ERR(d->p, KEYX_R_BACKEND_UNAVAILABLE,
                 "pkcs11: no token matches pkcs11-token entry %d (%s; tokens present: %s): check "
                 "pkcs11-token",
                 idx + 1, set_token_name(t, wanted), present[0] ? present : "none");
    return KEYX_BACKEND_DOWN;
}

/* The user PIN from pkcs11-pin into buf (NUL-terminated). 1, or 0 with an error raised. */
static int read_pin(p11_dev *d, p11_tok *t, char *buf, size_t len)
{
    const char *spec = d->p->cfg.pkcs11_pin, *v = NULL;
    FILE *fp;

    if (spec == NULL) {
        KEYX_ERR(d->p, KEYX_R_CONFIG_INVALID,
                 "pkcs11: token '%s' needs a login: set pkcs11-pin = file:PATH or env:NAME",
                 t->label);
        return 0;
    }
    if (strncmp(spec, "env:", 4) == 0) {
        if ((v = getenv(spec + 4)) == NULL) {
            KEYX_ERR(d->p, KEYX_R_CONFIG_INVALID,
                     "pkcs11-pin = %s: the environment variable %s is not set", spec, spec + 4);
            return 0;
        }
    } else if (strncmp(spec, "file:", 5) == 0) {
        if ((fp = fopen(spec + 5, "re")) == NULL) {
            KEYX_ERR(d->p, KEYX_R_CONFIG_INVALID, "pkcs11-pin = %s: cannot read the file: %s", spec,
                     strerror(errno));
            return 0;
        }
        if (fgets(buf, (int)len, fp) == NULL)
            buf[0] = '\0';
        fclose(fp);
        buf[strcspn(buf, "\r\n")] = '\0';
        return 1;
    } else {
        v = spec; /* a literal PIN (the configuration warned about it) */
    }
    if (strlen(v) >= len) {
        KEYX_ERR(d->p, KEYX_R_CONFIG_INVALID, "pkcs11-pin: the PIN is too long");
        return 0;
    }
    memcpy(buf, v, strlen(v) + 1);
    return 1;
}

/* Logs in once per token and module generation. Lock held. 1, 0 or KEYX_BACKEND_DOWN. */
static int token_login(p11_dev *d, int idx, CK_SESSION_HANDLE h)
{
    p11_tok *t = &d->tok[idx];
    CK_TOKEN_INFO info;
    char pin[256], buf[24];
    CK_RV rv;

    if (t->logged_in)
        return 1;
    if (t->pin_failed) {
        KEYX_ERR(d->p, KEYX_R_LOGIN_FAILED,
                 "pkcs11: login to token '%s' failed earlier in this process (%s): PIN incorrect; "
                 "fix pkcs11-pin (not retried, so the token is not locked)",
                 t->label, p11_rv_name(t->pin_failed, buf, sizeof(buf)));
        return 0;
    }
    if ((rv = token_info(d, t->slot, &info)) != CKR_OK) {
        p11_sess s = {.dev = d, .tok = idx};

        return p11_fail(&s, rv, "C_GetTokenInfo");
    }
    if (!(info.flags & CKF_LOGIN_REQUIRED)) {
        t->logged_in = 1;
        return 1;
    }
    /* A wrong PIN is tried once per process, but N workers and each restart would each use up
     * one of the token's tries (a smart card locks at 3). The token's flags show an earlier
     * failure of any process: then keyx does not try at all. One successful login resets them. */
    if (info.flags & (CKF_USER_PIN_LOCKED | CKF_USER_PIN_FINAL_TRY | CKF_USER_PIN_COUNT_LOW)) {
        KEYX_ERR(d->p, KEYX_R_PIN_LOCKOUT,
                 "pkcs11: token '%s' %s; keyx does not try its PIN, so that the token does not "
                 "lock: %s",
                 t->label,
                 info.flags & CKF_USER_PIN_LOCKED ? "has its user PIN locked"
                 : info.flags & CKF_USER_PIN_FINAL_TRY
                     ? "allows one more user PIN try (CKF_USER_PIN_FINAL_TRY)"
                     : "reports an earlier failed login (CKF_USER_PIN_COUNT_LOW)",
                 info.flags & CKF_USER_PIN_LOCKED
                     ? "unlock it with the SO PIN (pkcs11-tool --init-pin --login --login-type so)"
                     : "check pkcs11-pin, then log in once with the right PIN (e.g. pkcs11-tool "
                       "--login --test), which resets the count");
        return 0;
    }
    if (!read_pin(d, t, pin, sizeof(pin)))
        return 0;
    rv = d->f->C_Login(h, CKU_USER, (CK_UTF8CHAR *)pin, strlen(pin));
    OPENSSL_cleanse(pin, sizeof(pin));
    if (rv == CKR_OK || rv == CKR_USER_ALREADY_LOGGED_IN) {
        t->logged_in = 1;
        return 1;
    }
    if (rv == CKR_USER_PIN_NOT_INITIALIZED) {
        /* SoftHSM reads a token's PINs once, in C_Initialize: a token read while another
         * process rewrote its file (SETTLE_TRIES) stays without them in this process. As for a
         * missing token, the module is initialized again (module_reinit): no PIN is tried. */
        KEYX_ERR(d->p, KEYX_R_BACKEND_UNAVAILABLE,
                 "pkcs11: login (C_Login) on token '%s' failed: %s: the token has no user PIN "
                 "(set one: pkcs11-tool --init-pin), or the module read the token while another "
                 "process rewrote it",
                 t->label, p11_rv_name(rv, buf, sizeof(buf)));
        return KEYX_BACKEND_DOWN;
    }
    if (rv == CKR_PIN_INCORRECT || rv == CKR_PIN_LOCKED || rv == CKR_PIN_LEN_RANGE ||
        rv == CKR_PIN_EXPIRED)
        t->pin_failed = rv;
    {
        p11_sess s = {.dev = d, .tok = idx};

        return p11_fail(&s, rv, "login (C_Login)");
    }
}

/* Marks token idx down and closes its pooled sessions. Lock held. */
static void token_down(p11_dev *d, int idx, CK_RV rv)
{
    p11_tok *t = &d->tok[idx];
    const char *next = NULL;
    char buf[24], why[160], next_name[33], name[33];
    unsigned int limit;

    if (rv == CKR_DEVICE_ERROR || rv == CKR_DEVICE_REMOVED)
        t->lost = 1; /* the module's connection to it is gone: module_reconnect */
    if (t->down_until > now_seconds())
        return;
    t->down_until = now_seconds() + DOWN_SECONDS;
    for (size_t j = 0; j < t->nidle; j++)
        d->f->C_CloseSession(t->idle[j]);
    t->nidle = 0;
    t->found = 0;
    t->logged_in = 0;
    if (!t->in_set)
        return;
    for (int i = 0; i < d->nset && next == NULL; i++)
        if (i != idx && d->tok[i].down_until <= now_seconds())
            next = set_token_name(&d->tok[i], next_name);
    if (keyx_watchdog_cut(&limit) > 0)
        snprintf(why, sizeof(why), "token '%s' failed: no answer within %u ms (pkcs11-timeout)",
                 set_token_name(t, name), limit);
    else
        snprintf(why, sizeof(why), "token '%s' failed: %s", set_token_name(t, name),
                 p11_rv_name(rv, buf, sizeof(buf)));
    {
        keyx_event ev = {
            .event = "failover",
            .backend = "pkcs11",
            .ephemeral = -1,
            .ok = 0,
            .error = why,
            .next = next,
        };

        keyx_event_emit(d->p, &ev);
    }
    keyx_debug(d->p, "pkcs11: %s; %s serves", why, next != NULL ? next : "no other token");
}

/* A session on token idx, logged in unless login is 0 (no login is then attempted; the session
 * sees the token's public objects). Lock held. 1, 0 or KEYX_BACKEND_DOWN (error raised). */
static int token_session(p11_dev *d, int idx, int login, CK_SESSION_HANDLE *h)
{
    p11_tok *t = &d->tok[idx];
    int rc;
    CK_RV rv;

    if ((rc = token_find(d, idx)) != 1)
        return rc;
    if (t->checked_at != now_seconds()) {
        CK_TOKEN_INFO info;

        if ((rv = token_info(d, t->slot, &info)) != CKR_OK) {
            p11_sess s = {.dev = d, .tok = idx};

            /* whatever the code: a token that cannot describe itself is gone for us */
            p11_fail(&s, rv, "checking that the token is present (C_GetTokenInfo)");
            token_down(d, idx, rv);
            return KEYX_BACKEND_DOWN;
        }
        t->checked_at = now_seconds();
    }
    if (t->nidle > 0) {
        *h = t->idle[--t->nidle];
        /* a pooled session may come from a request that did not log in; a login covers every
         * session of the token, and token_login returns at once when there was one */
        if (login && (rc = token_login(d, idx, *h)) != 1) {
            d->f->C_CloseSession(*h);
            return rc;
        }
        return 1;
    }
    rv = d->f->C_OpenSession(t->slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, h);
    if (rv == CKR_TOKEN_WRITE_PROTECTED)
        rv = d->f->C_OpenSession(t->slot, CKF_SERIAL_SESSION, NULL, NULL, h);
    if (rv != CKR_OK) {
        p11_sess s = {.dev = d, .tok = idx};

        rc = p11_fail(&s, rv, "C_OpenSession");
        if (rc == KEYX_BACKEND_DOWN)
            token_down(d, idx, rv);
        return rc;
    }
    if (login && (rc = token_login(d, idx, *h)) != 1) {
        d->f->C_CloseSession(*h);
        return rc;
    }
    t->down_until = 0;
    t->lost = 0;
    return 1;
}

/* The module's view of its tokens may be stale: SoftHSM lists the tokens it found in
 * C_Initialize and never learns of one that was missing then (another process was rewriting its
 * file) or that came back. When a token keyx needs is not there, the module is finalized and
 * initialized again (sessions and logins of all tokens are redone on next use), at most once per
 * REINIT_MS, and only when no session of the current generation is borrowed: no thread is inside
 * a Cryptoki call or holds a session handle. Objects of the old generation (ephemeral keys) are
 * gone with it; static keys are found again by URI (p11_dev_current). keep_objects: not while
 * such objects live (a key's token is missing but other tokens may serve them); a failover set
 * with no token left re-initializes anyway. Never when someone else initialized the module
 * (finalizing would end their sessions). Lock held. 1 if the module was re-initialized (the
 * caller looks again, once). */
static int module_reinit(p11_dev *d, const char *why, int keep_objects)
{
    char buf[24];
    CK_RV rv;

    int quick = now_ms() - d->init_ms < REINIT_MS;

    /* A call that already waited pkcs11-timeout for a hung server (keyx cut it off) does not wait
     * again for C_Initialize, which would talk to the same server: a later call reconnects. */
    if (!d->we_initialized || d->busy > 0 || (keep_objects && d->objects > 0) || d->need_init ||
        (quick && d->settle >= SETTLE_TRIES) || atomic_load(&exiting) ||
        keyx_watchdog_cut(NULL) > 0)
        return 0;
    /* Soon after the module's first C_Initialize in this process (at start or after fork()) the
     * token was likely missed as its file was being rewritten (SETTLE_TRIES): looked for again
     * after a short pause. A token still missing then is looked for once a second. */
    if (quick)
        settle_pause(d->settle++);
    else
        d->settle = SETTLE_TRIES;
    forget_tokens(d, 1);
    d->f->C_Finalize(NULL);
    d->gen++;
    d->reinits++;
    d->objects = 0;
    rv = module_initialize(d);
    keyx_debug(d->p, "pkcs11: %s: re-initialized module '%s' (%u): %s", why, d->module_path,
               d->reinits, p11_rv_name(rv, buf, sizeof(buf)));
    if (rv != CKR_OK) {
        d->need_init = 1; /* module_ready retries, at most once per REINIT_MS */
        d->init_rv = rv;
        atomic_store(&d->mod, MOD_REINIT);
        return 0;
    }
    return 1;
}

/* A token lost with a device error (its server died or was cut off: pkcs11-timeout) stays
 * unreachable through the module until the module is initialized again: p11-kit's RPC client
 * never reconnects by itself. Once such a token is due to be tried again (DOWN_SECONDS), the
 * module is re-initialized, but only while nothing of the current generation is in use (no
 * borrowed session, no session key), so that no operation in flight loses its key; the other
 * tokens' sessions and logins are redone at their next use. A server still gone leaves the
 * token lost, and it is tried again DOWN_SECONDS later. Lock held. */
static void module_reconnect(p11_dev *d)
{
    long now = now_seconds();

    for (int i = 0; i < d->ntok; i++)
        if (d->tok[i].lost && d->tok[i].down_until <= now) {
            if (module_reinit(d, "a token lost its connection", 1))
                d->tok[i].down_until = 0;
            return;
        }
}

static int session_get(p11_dev *d, int tok, int login, p11_sess *s);

static int session_get_locked(p11_dev *d, int tok, int login, p11_sess *s)
{
    int rc;

    pthread_mutex_lock(&d->lock);
    ERR_set_mark();
    if (d->f != NULL && !d->need_init)
        module_reconnect(d);
    rc = session_get(d, tok, login, s);
    /* Looked for again after each re-initialization (module_reinit: up to SETTLE_TRIES quick
     * ones right after the first C_Initialize, else at most one a second); only the last look's
     * error stays. */
    while (rc == KEYX_BACKEND_DOWN &&
           module_reinit(d,
                         tok >= 0 ? "the key's token is missing" : "no token of pkcs11-token found",
                         tok >= 0)) {
        ERR_pop_to_mark();
        ERR_set_mark();
        rc = session_get(d, tok, login, s);
    }
    ERR_clear_last_mark();
    if (rc == 1)
        d->busy++;
    pthread_mutex_unlock(&d->lock);
    return rc;
}

int p11_session_get(p11_dev *d, int tok, p11_sess *s)
{
    return session_get_locked(d, tok, 1, s);
}

int p11_session_get_public(p11_dev *d, int tok, p11_sess *s)
{
    return session_get_locked(d, tok, d->p->cfg.pkcs11_pin != NULL, s);
}

/* p11_session_get with the lock held. */
static int session_get(p11_dev *d, int tok, int login, p11_sess *s)
{
    int rc = KEYX_BACKEND_DOWN;
    long now = now_seconds();

    memset(s, 0, sizeof(*s));
    s->dev = d;
    if (!module_ready(d))
        return 0;
    s->f = d->f;
    s->gen = d->gen;
    if (tok >= 0) {
        s->tok = tok;
        return tok < d->ntok ? token_session(d, tok, login, &s->h) : 0;
    }
    /* The failover set: tokens up first, in order; those marked down last (they may be back). */
    {
        int order[MAX_TOKENS], n = 0;

        for (int pass = 0; pass < 2; pass++)
            for (int i = 0; i < d->nset; i++)
                if ((d->tok[i].down_until > now) == pass)
                    order[n++] = i;
        ERR_set_mark();
        for (int k = 0; k < n && rc == KEYX_BACKEND_DOWN; k++) {
            if (k > 0)
                keyx_watchdog_renew(); /* pkcs11-timeout is per token */
            s->tok = order[k];
            if ((rc = token_session(d, order[k], login, &s->h)) == KEYX_BACKEND_DOWN)
                token_down(d, order[k], CKR_TOKEN_NOT_PRESENT);
        }
    }
    if (rc == 1)
        ERR_pop_to_mark(); /* an earlier token's failure is in the audit log */
    else
        ERR_clear_last_mark();
    return rc;
}

void p11_session_put(p11_sess *s, CK_RV rv)
{
    p11_dev *d = s->dev;
    p11_tok *t;

    pthread_mutex_lock(&d->lock);
    if (!p11_dev_current(d, s->gen) || s->tok >= d->ntok) {
        pthread_mutex_unlock(&d->lock); /* from before a fork: not ours to close */
        return;
    }
    t = &d->tok[s->tok];
    if (d->busy > 0)
        d->busy--;
    if (p11_rv_is_down(rv)) {
        d->f->C_CloseSession(s->h);
        token_down(d, s->tok, rv);
    } else if (t->nidle < POOL_MAX && t->found) {
        t->idle[t->nidle++] = s->h;
    } else {
        d->f->C_CloseSession(s->h);
    }
    pthread_mutex_unlock(&d->lock);
}

int p11_dev_caps(p11_dev *d, p11_caps *caps)
{
    long now = now_seconds();
    p11_sess s;
    int rc;

    pthread_mutex_lock(&d->lock);
    for (int i = 0; i < d->nset; i++)
        if (d->tok[i].caps_known && d->tok[i].down_until <= now) {
            *caps = d->tok[i].caps;
            pthread_mutex_unlock(&d->lock);
            return 1;
        }
    pthread_mutex_unlock(&d->lock);
    /* Nothing known yet: connect once (errors are not the caller's: it only asks). */
    ERR_set_mark();
    rc = p11_session_get(d, -1, &s);
    ERR_pop_to_mark();
    if (rc != 1)
        return 0;
    p11_session_put(&s, CKR_OK);
    pthread_mutex_lock(&d->lock);
    *caps = d->tok[s.tok].caps;
    pthread_mutex_unlock(&d->lock);
    return 1;
}

int p11_dev_token_caps(p11_dev *d, int tok, p11_caps *caps)
{
    int ok;

    pthread_mutex_lock(&d->lock);
    ok = tok >= 0 && tok < d->ntok && d->tok[tok].caps_known;
    if (ok)
        *caps = d->tok[tok].caps;
    pthread_mutex_unlock(&d->lock);
    return ok;
}

int p11_dev_pss_state(p11_dev *d, int tok, int bit)
{
    int state = 0;

    if (bit < 0 || bit >= 32)
        return 0;
    pthread_mutex_lock(&d->lock);
    if (tok >= 0 && tok < d->ntok)
        state = (d->tok[tok].pss_refused >> bit) & 1 ? -1 : (d->tok[tok].pss_ok >> bit) & 1 ? 1 : 0;
    pthread_mutex_unlock(&d->lock);
    return state;
}

void p11_dev_pss_note(p11_dev *d, int tok, int bit, int ok)
{
    if (bit < 0 || bit >= 32)
        return;
    pthread_mutex_lock(&d->lock);
    if (tok >= 0 && tok < d->ntok) {
        if (ok)
            d->tok[tok].pss_ok |= 1u << bit;
        else
            d->tok[tok].pss_refused |= 1u << bit;
    }
    pthread_mutex_unlock(&d->lock);
}

/* p11_dev_find_tokens with the lock held. */
static int find_tokens(p11_dev *d, P11KitUri *uri, int *out, int max)
{
    CK_SLOT_ID slots[64];
    CK_ULONG n = 64;
    CK_TOKEN_INFO info;
    int count = 0;
    char buf[24];
    CK_RV rv;

    if (!module_ready(d))
        return -1;
    /* Failover-set tokens first, so that a key URI without token attributes finds the key
     * on the token that serves. */
    ERR_set_mark();
    for (int i = 0; i < d->nset && count < max; i++) {
        if (d->tok[i].down_until > now_seconds() || token_find(d, i) != 1)
            continue;
        if (d->f->C_GetTokenInfo(d->tok[i].slot, &info) == CKR_OK &&
            p11_kit_uri_match_token_info(uri, &info))
            out[count++] = i;
    }
    ERR_pop_to_mark(); /* a missing set token is not this lookup's error */
    if ((rv = d->f->C_GetSlotList(CK_TRUE, slots, &n)) != CKR_OK) {
        KEYX_ERR(d->p, KEYX_R_BACKEND_UNAVAILABLE, "pkcs11: listing the slots of '%s' failed: %s",
                 d->module_path, p11_rv_name(rv, buf, sizeof(buf)));
        return count > 0 ? count : KEYX_BACKEND_DOWN;
    }
    for (CK_ULONG j = 0; j < n && count < max; j++) {
        int known = -1;

        if (d->f->C_GetTokenInfo(slots[j], &info) != CKR_OK ||
            !(info.flags & CKF_TOKEN_INITIALIZED) || !p11_kit_uri_match_token_info(uri, &info))
            continue;
        for (int i = 0; i < d->ntok; i++)
            if (d->tok[i].found && d->tok[i].slot == slots[j])
                known = i;
        if (known >= 0 && known < d->nset)
            continue; /* already listed above */
        if (known < 0 && d->ntok < MAX_TOKENS) {
            p11_tok *t = &d->tok[d->ntok];

            memset(t, 0, sizeof(*t));
            t->slot = slots[j];
            t->found = 1;
            copy_label(t->label, info.label, sizeof(info.label));
            copy_label(t->serial, info.serialNumber, sizeof(info.serialNumber));
            /* Found again by label after a re-initialization. */
            if ((t->uri = p11_kit_uri_new()) != NULL) {
                CK_TOKEN_INFO *ti = p11_kit_uri_get_token_info(t->uri);

                memcpy(ti->label, info.label, sizeof(info.label));
                memcpy(ti->serialNumber, info.serialNumber, sizeof(info.serialNumber));
            }
            read_caps(d, t);
            known = d->ntok++;
        }
        if (known >= 0)
            out[count++] = known;
    }
    return count;
}

int p11_dev_find_tokens(p11_dev *d, P11KitUri *uri, int *out, int max)
{
    int count;

    pthread_mutex_lock(&d->lock);
    ERR_set_mark();
    count = find_tokens(d, uri, out, max);
    /* No token matches: the module may have missed it in C_Initialize (see module_reinit), also
     * again right after (SETTLE_TRIES). */
    while ((count == 0 || count == KEYX_BACKEND_DOWN) &&
           module_reinit(d, "no token matches a key URI", 1)) {
        ERR_pop_to_mark();
        ERR_set_mark();
        count = find_tokens(d, uri, out, max);
    }
    ERR_clear_last_mark();
    pthread_mutex_unlock(&d->lock);
    return count;
}

/* One token of the failover set, as keyx last saw it. Lock held. */
static void describe_token(p11_dev *d, int idx, long now, char *out, size_t len)
{
    p11_tok *t = &d->tok[idx];
    char name[33], buf[24];
    const char *n = set_token_name(t, name);

    if (t->pin_failed)
        snprintf(out, len, "token '%s': login refused (%s): fix pkcs11-pin", n,
                 p11_rv_name(t->pin_failed, buf, sizeof(buf)));
    else if (t->down_until > now)
        snprintf(out, len, "token '%s': down, passed over for %ld s more", n, t->down_until - now);
    else if (t->logged_in)
        snprintf(out, len, "token '%s': ready (logged in)", n);
    else if (t->found)
        snprintf(out, len, "token '%s': found (not logged in yet)", n);
    else
        snprintf(out, len, "token '%s': not found yet", n);
}

void p11_dev_describe(p11_dev *d, char *buf, size_t len)
{
    int mod = atomic_load(&d->mod);
    size_t used;

    switch (mod) {
    case MOD_FAILED:
        snprintf(buf, len, "module '%s' could not be loaded: %s", d->module_path, d->load_error);
        return;
    case MOD_REINIT:
        snprintf(buf, len,
                 "module '%s': re-initializing it failed (keyx retries at most once a second)",
                 d->module_path);
        return;
    case MOD_NONE:
        /* A path that names no file is worth saying now: the load will fail at first use. A
         * name without '/' is looked up by p11-kit in its own directory. */
        if (strchr(d->module_path, '/') != NULL && access(d->module_path, F_OK) != 0)
            snprintf(buf, len,
                     "module '%s' not loaded yet, and there is no such file: check pkcs11-module",
                     d->module_path);
        else
            snprintf(buf, len,
                     "module '%s' not loaded yet (keyx loads it at its first PKCS#11 "
                     "operation)",
                     d->module_path);
        return;
    default:
        break;
    }
    snprintf(buf, len, "module '%s' loaded", d->module_path);
    /* The tokens' state is kept under the lock, which a slow C_Login or C_Initialize may hold:
     * never waited for here. */
    if (pthread_mutex_trylock(&d->lock) != 0) {
        used = strlen(buf);
        snprintf(buf + used, len - used, "; tokens: not shown (a module call is in progress)");
        return;
    }
    for (int i = 0; i < d->nset; i++) {
        char tok[160];

        describe_token(d, i, now_seconds(), tok, sizeof(tok));
        used = strlen(buf);
        snprintf(buf + used, len - used, "; %s", tok);
    }
    pthread_mutex_unlock(&d->lock);
}
