/* The TPM connection, storage parent, session and object slots (see tpm2_device.h). */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <tss2/tss2_mu.h>
#include <tss2/tss2_rc.h>
#include <tss2/tss2_sys.h>
#include <tss2/tss2_tctildr.h>

#include "backend/backend.h"
#include "backend/tpm2_device.h"
#include "backend/tpm2_pubkey.h"
#include "backend/tpm2_session.h"
#include "backend/tpm2_tcti.h"
#include "provider/audit.h"
#include "provider/errors.h"
#include "provider/provctx.h"

#define MAX_CURVES 16
#define MAX_ALGS 128
/* First handles of transient objects and of HMAC sessions (the TSS header's macros shift a
 * signed int into the sign bit). */
#define TRANSIENT_FIRST ((TPM2_HANDLE)0x80000000u)
#define HMAC_SESSION_FIRST ((TPM2_HANDLE)0x02000000u)

#define MAX_PERSISTENT 32 /* persistent-key ESYS_TRs tracked; more are never closed (bounded) */

struct tpm_dev {
    keyx_provctx *p;
    pthread_mutex_t lock;
    const char *tcti; /* configuration string; NULL: the TCTI loader's default */
    TSS2_TCTI_CONTEXT *tcti_ctx;
    ESYS_CONTEXT *ctx; /* NULL while not connected */
    pid_t pid;         /* process that opened ctx */
    uint64_t gen;      /* connection generation: bumps on every connect and disconnect */
    int no_probe;      /* capability queries never connect (a tabrmd TCTI, see probe_caps) */
    int tabrmd;        /* the TCTI is tpm2-abrmd's, by name (not the loader's default) */
    ESYS_TR parent;
    int parent_owned; /* the cached primary keyx created (flushed at close); 0: tpm-parent */
    tpm_fsess fast;   /* keyx's salted session for ECDH_ZGen (tpm2_session.c); handle 0: none */
    int fast_ok;      /* its algorithms could be fetched */
    ESYS_TR session;  /* ESYS's salted session: imports, and ZGen when fast cannot be used */
    int caps_known;
    TPM2_ECC_CURVE curves[MAX_CURVES];
    size_t ncurves;
    TPM2_ALG_ID algs[MAX_ALGS]; /* TPM2_CAP_ALGS, read with the curves (signature checks) */
    size_t nalgs;
    unsigned rsa_known, rsa_ok; /* TestParms results, bit i: RSA 2048, 3072, 4096 */
    tpm_obj *head, *tail;       /* loaded transient objects, most recently used first */
    uint64_t clock;
    int reclaimed;            /* foreign objects flushed during the current operation */
    int ready;                /* connected with parent and session: tpm_begin() has succeeded */
    int forked;               /* fork() since the last check, without resource manager: a child
                                 may have flushed this process's objects (check_after_fork) */
    long probe_failed;        /* monotonic second of the last failed capability probe; 0: none */
    OSSL_LIB_CTX *app_libctx; /* the thread's default library context while the lock is held */
    /* ESYS hands out one ESYS_TR per persistent handle: keys loaded twice by the same handle
     * share it, so it is closed only when the last of them is freed. */
    struct {
        ESYS_TR tr;
        uint64_t gen;
        int refs;
    } pers[MAX_PERSISTENT];
    tpm_dev *reg_next;
    tpm_tcti_watch watch; /* commands the bounded TCTI gave up on (tpm2_tcti.h) */
    /* The connection as tpm_dev_describe tells it, readable without the lock (which a command
     * holds for as long as the TPM takes): one of LINK_*. */
    atomic_int link;
};

enum {
    LINK_NONE,   /* no connection yet in this process (keyx connects at first use) */
    LINK_UP,     /* connected, with storage parent and session */
    LINK_FAILED, /* the last attempt to connect failed */
    LINK_LOST    /* a working connection was lost or given up on */
};

/* ---- fork ------------------------------------------------------------------------------ */

/* The last process that opened a TCTI that is or may be tpm2-abrmd's (by name, or the loader's
 * default), through any device: the D-Bus connection behind it is the process's, so a child
 * forked from that process cannot open tpm2-abrmd's TCTI again (connect_once). 0: none. */
static atomic_int dbus_tcti_opened_by;

static int forked_after_dbus_tcti(void)
{
    int by = atomic_load(&dbus_tcti_opened_by);

    return by != 0 && by != (int)getpid();
}

/* Every device of the process, so that fork() finds them: the parent's connection belongs to
 * the parent, the child opens its own on first use. The prepare handler takes every device
 * lock, so no thread is inside an ESYS call at the moment of the fork. */
static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static tpm_dev *registry;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void fork_prepare(void)
{
    pthread_mutex_lock(&registry_lock);
    for (tpm_dev *d = registry; d != NULL; d = d->reg_next)
        pthread_mutex_lock(&d->lock);
    tpm_tcti_fork_lock();
}

static int no_resource_manager(const tpm_dev *d);

static void fork_parent(void)
{
    tpm_tcti_fork_unlock();
    for (tpm_dev *d = registry; d != NULL; d = d->reg_next) {
        if (d->ctx != NULL && no_resource_manager(d))
            d->forked = 1;
        pthread_mutex_unlock(&d->lock);
    }
    pthread_mutex_unlock(&registry_lock);
}

static void fork_child(void)
{
    tpm_tcti_fork_unlock();
    for (tpm_dev *d = registry; d != NULL; d = d->reg_next) {
        pthread_mutex_unlock(&d->lock);
        /* The parent's workers (and the answers they wait for) are not in the child. */
        tpm_tcti_watch_forked(&d->watch);
        if (d->ctx != NULL) {
            /* Not Esys_Finalize: a TCTI may say goodbye on the shared connection and end the
             * parent's. The parent's ESYS and TCTI state is left alone in the child (one small
             * leak per fork); the child opens its own connection on first use. */
            d->ctx = NULL;
            d->tcti_ctx = NULL;
            d->head = d->tail = NULL;
            d->ready = 0;
            tpm_fsess_forget(&d->fast);
            d->gen++;
        }
        d->forked = 0;
        atomic_store(&d->link, LINK_NONE);
    }
    pthread_mutex_unlock(&registry_lock);
}

static void register_atfork(void)
{
    pthread_atfork(fork_prepare, fork_parent, fork_child);
}

/* ---- errors ------------------------------------------------------------------------------ */

/* The device whose working connection this thread's last failed command found broken (see
 * tpm_dev_take_reset). Per thread, not per device: another thread (the pool's refill) that
 * reconnects between this thread's failure and its retry check must not take its retry away. */
static _Thread_local const tpm_dev *reset_seen;

static const char *tcti_name(const tpm_dev *d)
{
    return d->tcti != NULL ? d->tcti : "(TCTI loader default: tabrmd, device:/dev/tpmrm0, ...)";
}

int tpm_rc_is(TSS2_RC rc, TSS2_RC fmt1)
{
    /* Format one: bit 7 set; bits 8-11 name the handle, session or parameter, bit 6 says which. */
    return (rc & TSS2_RC_LAYER_MASK) == 0 && (rc & TPM2_RC_FMT1) && (rc & ~0xF40u) == fmt1;
}

/* The connection or the TSS state is broken (not the request): reconnect. */
static int rc_is_down(TSS2_RC rc)
{
    TSS2_RC layer = rc & TSS2_RC_LAYER_MASK, base = rc & 0xFFFF;

    if (layer == TSS2_TPM_RC_LAYER)
        return rc == TPM2_RC_INITIALIZE || rc == TPM2_RC_FAILURE;
    if (layer == TSS2_TCTI_RC_LAYER)
        return 1;
    switch (base) {
    case TSS2_BASE_RC_IO_ERROR:
    case TSS2_BASE_RC_NO_CONNECTION:
    case TSS2_BASE_RC_MALFORMED_RESPONSE:
    case TSS2_BASE_RC_INSUFFICIENT_RESPONSE:
    case TSS2_BASE_RC_BAD_SEQUENCE:
    case TSS2_BASE_RC_TRY_AGAIN:
    case TSS2_BASE_RC_GENERAL_FAILURE:
    case TSS2_BASE_RC_RSP_AUTH_FAILED: /* the session is out of step or the bus was tampered */
        return 1;
    default:
        return 0;
    }
}

/* The TPM no longer knows this connection's objects: it was restarted or reset between two
 * commands. swtpm's TCTI opens a new socket for every command, so no I/O error shows it; the
 * TPM answers that our parent, session or key handle references nothing. */
static int rc_is_reset(TSS2_RC rc)
{
    if ((rc & TSS2_RC_LAYER_MASK) != TSS2_TPM_RC_LAYER)
        return 0;
    if (rc == TPM2_RC_INITIALIZE || (rc >= TPM2_RC_REFERENCE_H0 && rc <= TPM2_RC_REFERENCE_S6))
        return 1;
    /* Format one TPM_RC_HANDLE naming a handle (not a parameter, not a session). */
    return (rc & TPM2_RC_FMT1) && (rc & 0x3F) == (TPM2_RC_HANDLE & 0x3F) && !(rc & TPM2_RC_P) &&
           !(rc & TPM2_RC_S) && (rc & 0x700);
}

/* 1 while a command given up on still has no answer. */
static int stalled(tpm_dev *d)
{
    return tpm_tcti_unanswered(&d->watch);
}

static void disconnect(tpm_dev *d)
{
    int up = LINK_UP;

    atomic_compare_exchange_strong(&d->link, &up, LINK_LOST);
    if (d->ctx != NULL)
        Esys_Finalize(&d->ctx);
    tpm_tcti_free(&d->tcti_ctx);
    d->ctx = NULL;
    d->tcti_ctx = NULL;
    d->head = d->tail = NULL;
    d->parent = d->session = ESYS_TR_NONE;
    d->parent_owned = 0;
    d->ready = 0;
    tpm_fsess_forget(&d->fast);
    d->gen++;
}

/* The TPM's object or session memory is full, or a resource manager's share of it for this
 * process (tpm2-abrmd answers with its own layer and the TPM's code). */
static int memory_full(TSS2_RC rc)
{
    TSS2_RC layer = rc & TSS2_RC_LAYER_MASK, code = rc & ~TSS2_RC_LAYER_MASK;

    return (layer == 0 || layer == TSS2_RESMGR_TPM_RC_LAYER || layer == TSS2_RESMGR_RC_LAYER) &&
           (code == TPM2_RC_OBJECT_MEMORY || code == TPM2_RC_SESSION_MEMORY);
}

int tpm_fail(tpm_dev *d, TSS2_RC rc, const char *what)
{
    const char *txt = Tss2_RC_Decode(rc);

    if (d->watch.timed_out != 0) {
        /* The bounded TCTI gave the command up: the TPM is stalled, not reset (no retry). */
        KEYX_ERR(d->p, KEYX_R_BACKEND_UNAVAILABLE,
                 "tpm: %s failed: the TPM at TCTI '%s' did not answer within %u ms (keyx "
                 "reconnects once it answers again; set tpm-timeout to wait longer)",
                 what, tcti_name(d), d->watch.timed_out);
        d->watch.timed_out = 0;
        reset_seen = NULL;
        disconnect(d);
        return KEYX_BACKEND_DOWN;
    }
    if (rc_is_down(rc) || rc_is_reset(rc)) {
        /* A connection that worked until now: retrying on a new one may succeed at once. */
        reset_seen = d->ready ? d : NULL;
        KEYX_ERR(d->p, KEYX_R_BACKEND_UNAVAILABLE,
                 "tpm: %s failed: %s: the TPM at TCTI '%s' is unreachable or was reset (keyx "
                 "reconnects on the next operation; keys it generated before are gone)",
                 what, txt, tcti_name(d));
        disconnect(d);
        return KEYX_BACKEND_DOWN;
    }
    if (memory_full(rc) && (rc & TSS2_RC_LAYER_MASK) != 0)
        KEYX_ERR(d->p, KEYX_R_TPM_OBJECT_MEMORY,
                 "tpm: %s failed: %s: the resource manager at TCTI '%s' allows this process no "
                 "more loaded objects or sessions (raise tpm2-abrmd --max-transients, or have "
                 "fewer keys in use at once)",
                 what, txt, tcti_name(d));
    else if (memory_full(rc))
        KEYX_ERR(d->p, KEYX_R_TPM_OBJECT_MEMORY,
                 "tpm: %s failed: %s: the TPM's object or session slots are full; with several "
                 "processes on one TPM use a resource manager (TCTI device:/dev/tpmrm0 or tabrmd)",
                 what, txt);
    else
        KEYX_ERR(d->p, KEYX_R_BACKEND_FAILURE, "tpm: %s failed: %s", what, txt);
    return 0;
}

/* ---- slots ------------------------------------------------------------------------------- */

static void list_unlink(tpm_dev *d, tpm_obj *o)
{
    if (!o->listed)
        return;
    if (o->prev != NULL)
        o->prev->next = o->next;
    else
        d->head = o->next;
    if (o->next != NULL)
        o->next->prev = o->prev;
    else
        d->tail = o->prev;
    o->prev = o->next = NULL;
    o->listed = 0;
}

static void list_front(tpm_dev *d, tpm_obj *o)
{
    list_unlink(d, o);
    o->next = d->head;
    if (d->head != NULL)
        d->head->prev = o;
    d->head = o;
    if (d->tail == NULL)
        d->tail = o;
    o->listed = 1;
    o->stamp = ++d->clock;
}

/* 1 if TPM handle h is one of this connection's objects or its session. */
static int is_ours(tpm_dev *d, TPM2_HANDLE h)
{
    TPM2_HANDLE t;

    if (d->parent_owned && Esys_TR_GetTpmHandle(d->ctx, d->parent, &t) == TSS2_RC_SUCCESS && t == h)
        return 1;
    if (d->session != ESYS_TR_NONE &&
        Esys_TR_GetTpmHandle(d->ctx, d->session, &t) == TSS2_RC_SUCCESS && t == h)
        return 1;
    if (d->fast.handle != 0 && d->fast.handle == h)
        return 1;
    for (tpm_obj *o = d->head; o != NULL; o = o->next)
        if (o->tr != ESYS_TR_NONE && Esys_TR_GetTpmHandle(d->ctx, o->tr, &t) == TSS2_RC_SUCCESS &&
            t == h)
            return 1;
    return 0;
}

/* Transient objects (or sessions) in the TPM that are not this connection's: without a
 * resource manager nothing else flushes them, so they were left by a process that died
 * without flushing them (kill -9). Flushed once per operation when keyx needs the slot. */
static int reclaim_foreign(tpm_dev *d, TPM2_HANDLE first)
{
    int bit = first == TRANSIENT_FIRST ? 1 : 2, n = 0;
    TPMS_CAPABILITY_DATA *cap = NULL;
    TPMI_YES_NO more = 0;

    if (d->reclaimed & bit)
        return 0;
    d->reclaimed |= bit;
    if (Esys_GetCapability(d->ctx, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, TPM2_CAP_HANDLES,
                           first, 64, &more, &cap) != TSS2_RC_SUCCESS)
        return 0;
    for (UINT32 i = 0; i < cap->data.handles.count; i++) {
        TPM2_HANDLE h = cap->data.handles.handle[i];
        ESYS_TR tr = ESYS_TR_NONE;

        if (is_ours(d, h))
            continue;
        if (Esys_TR_FromTPMPublic(d->ctx, h, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &tr) ==
                TSS2_RC_SUCCESS &&
            Esys_FlushContext(d->ctx, tr) == TSS2_RC_SUCCESS)
            n++;
    }
    Esys_Free(cap);
    return n > 0;
}

int tpm_make_room(tpm_dev *d, TSS2_RC rc, const tpm_obj *keep)
{
    if (rc != TPM2_RC_OBJECT_MEMORY || d->ctx == NULL)
        return 0;
    for (tpm_obj *o = d->tail; o != NULL; o = o->prev) {
        TPMS_CONTEXT *saved = NULL;

        if (o == keep || o->tr == ESYS_TR_NONE)
            continue;
        if (Esys_ContextSave(d->ctx, o->tr, &saved) != TSS2_RC_SUCCESS)
            return 0;
        if (Esys_FlushContext(d->ctx, o->tr) != TSS2_RC_SUCCESS) {
            Esys_Free(saved);
            return 0;
        }
        o->tr = ESYS_TR_NONE;
        o->saved = saved;
        list_unlink(d, o);
        return 1;
    }
    return reclaim_foreign(d, TRANSIENT_FIRST);
}

/* One more key on persistent ESYS_TR tr (lock held). */
static void pers_ref(tpm_dev *d, ESYS_TR tr)
{
    int free_slot = -1;

    for (int i = 0; i < MAX_PERSISTENT; i++) {
        if (d->pers[i].refs > 0 && d->pers[i].gen == d->gen && d->pers[i].tr == tr) {
            d->pers[i].refs++;
            return;
        }
        if (free_slot < 0 && (d->pers[i].refs == 0 || d->pers[i].gen != d->gen))
            free_slot = i;
    }
    if (free_slot >= 0) {
        d->pers[free_slot].tr = tr;
        d->pers[free_slot].gen = d->gen;
        d->pers[free_slot].refs = 1;
    }
}

/* One key fewer on tr; 1 when it was the last (the ESYS_TR may be closed). */
static int pers_unref(tpm_dev *d, ESYS_TR tr)
{
    for (int i = 0; i < MAX_PERSISTENT; i++)
        if (d->pers[i].refs > 0 && d->pers[i].gen == d->gen && d->pers[i].tr == tr)
            return --d->pers[i].refs == 0;
    return 0; /* untracked (table full): left open, one entry per handle at most */
}

int tpm_obj_ready(tpm_dev *d, tpm_obj *o, ESYS_TR *tr)
{
    TSS2_RC rc;

    if (o->gen != d->gen) {
        if (o->persistent == 0) {
            KEYX_ERR(d->p, KEYX_R_MISSING_KEY,
                     "tpm: this key no longer exists: the TPM connection was reset since it was "
                     "made (TPM restarted, connection lost or fork()); generate a new key");
            return 0;
        }
        TPM_CALL(d, NULL, rc,
                 Esys_TR_FromTPMPublic(d->ctx, o->persistent, ESYS_TR_NONE, ESYS_TR_NONE,
                                       ESYS_TR_NONE, &o->tr));
        if (rc != TSS2_RC_SUCCESS && (rc & TSS2_RC_LAYER_MASK) == TSS2_TPM_RC_LAYER &&
            rc != TPM2_RC_INITIALIZE) {
            o->tr = ESYS_TR_NONE;
            KEYX_ERR(d->p, KEYX_R_MISSING_KEY,
                     "tpm: the persistent key 0x%08X is no longer in the TPM (%s)",
                     (unsigned)o->persistent, Tss2_RC_Decode(rc));
            return 0;
        }
        if (rc != TSS2_RC_SUCCESS)
            return tpm_fail(d, rc, "finding the persistent key again");
        o->gen = d->gen;
        pers_ref(d, o->tr);
    }
    if (o->persistent == 0 && o->lost) {
        KEYX_ERR(d->p, KEYX_R_TPM_NOT_SHAREABLE,
                 "tpm: this key is gone: a process forked from this one used the TPM at TCTI "
                 "'%s', which has no resource manager, and flushed this process's objects; a TPM "
                 "without a resource manager cannot be shared between forked processes: use "
                 "tpm2-abrmd (tpm-tcti = tabrmd) or the kernel's resource manager (tpm-tcti = "
                 "device:/dev/tpmrm0)",
                 tcti_name(d));
        return 0;
    }
    if (o->persistent == 0 && o->tr == ESYS_TR_NONE) {
        if (o->saved == NULL) {
            KEYX_ERR(d->p, KEYX_R_MISSING_KEY, "tpm: the key has been freed");
            return 0;
        }
        TPM_CALL(d, o, rc, Esys_ContextLoad(d->ctx, o->saved, &o->tr));
        if (rc != TSS2_RC_SUCCESS)
            return tpm_fail(d, rc, "loading the key back into the TPM (ContextLoad)");
        Esys_Free(o->saved);
        o->saved = NULL;
    }
    if (o->persistent == 0)
        list_front(d, o);
    *tr = o->tr;
    return 1;
}

int tpm_obj_current(tpm_dev *d, const tpm_obj *o)
{
    return d->ctx != NULL && o->gen == d->gen && (o->tr != ESYS_TR_NONE || o->saved != NULL);
}

void tpm_obj_loaded(tpm_dev *d, tpm_obj *o, ESYS_TR tr)
{
    o->lost = 0;
    o->tr = tr;
    o->gen = d->gen;
    o->persistent = 0;
    list_front(d, o);
}

void tpm_obj_public(tpm_dev *d, tpm_obj *o, const TPMT_PUBLIC *pub)
{
    if (d->fast_ok)
        tpm_fsess_name(&d->fast, pub, &o->name);
}

void tpm_persistent_close_unused(tpm_dev *d, ESYS_TR *tr)
{
    for (int i = 0; i < MAX_PERSISTENT; i++)
        if (d->pers[i].refs > 0 && d->pers[i].gen == d->gen && d->pers[i].tr == *tr)
            return;
    Esys_TR_Close(d->ctx, tr);
}

void tpm_obj_persistent(tpm_dev *d, tpm_obj *o, TPM2_HANDLE h, ESYS_TR tr)
{
    o->tr = tr;
    o->gen = d->gen;
    o->persistent = h;
    pers_ref(d, tr);
}

void tpm_obj_drop(tpm_dev *d, tpm_obj *o)
{
    if (d->ctx != NULL && o->gen == d->gen) {
        if (o->persistent != 0) {
            if (pers_unref(d, o->tr))
                Esys_TR_Close(d->ctx, &o->tr); /* keyx's reference only: the key stays */
        } else if (o->tr != ESYS_TR_NONE)
            Esys_FlushContext(d->ctx, o->tr);
        list_unlink(d, o);
    } else {
        /* The connection it belonged to is gone, and its list with it (a key from a file is
         * loaded again on the new one). */
        o->prev = o->next = NULL;
        o->listed = 0;
    }
    Esys_Free(o->saved);
    o->saved = NULL;
    o->tr = ESYS_TR_NONE;
}

/* ---- connection -------------------------------------------------------------------------- */

static TSS2_RC read_curves(tpm_dev *d)
{
    TPMS_CAPABILITY_DATA *cap = NULL;
    TPMI_YES_NO more = 0;
    TSS2_RC rc = Esys_GetCapability(d->ctx, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                                    TPM2_CAP_ECC_CURVES, 0, TPM2_MAX_ECC_CURVES, &more, &cap);

    if (rc != TSS2_RC_SUCCESS)
        return rc;
    d->ncurves = 0;
    for (UINT32 i = 0; i < cap->data.eccCurves.count && d->ncurves < MAX_CURVES; i++)
        d->curves[d->ncurves++] = cap->data.eccCurves.eccCurves[i];
    Esys_Free(cap);
    cap = NULL;
    /* The algorithms (hashes, signature schemes): what sign_check decides from, once per
     * connection, never per signature. */
    rc = Esys_GetCapability(d->ctx, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, TPM2_CAP_ALGS, 0,
                            TPM2_MAX_CAP_ALGS, &more, &cap);
    if (rc != TSS2_RC_SUCCESS)
        return rc;
    d->nalgs = 0;
    for (UINT32 i = 0; i < cap->data.algorithms.count && d->nalgs < MAX_ALGS; i++)
        d->algs[d->nalgs++] = cap->data.algorithms.algProperties[i].alg;
    d->caps_known = 1;
    Esys_Free(cap);
    return rc;
}

static int make_parent(tpm_dev *d)
{
    TPM2B_SENSITIVE_CREATE sens = {0};
    TPM2B_PUBLIC tmpl = {0};
    TPM2B_DATA outside = {0};
    TPML_PCR_SELECTION pcrs = {0};
    TSS2_RC rc;

    if (d->p->cfg.tpm_parent != 0) {
        rc = Esys_TR_FromTPMPublic(d->ctx, d->p->cfg.tpm_parent, ESYS_TR_NONE, ESYS_TR_NONE,
                                   ESYS_TR_NONE, &d->parent);
        if (rc != TSS2_RC_SUCCESS) {
            if (rc_is_down(rc))
                return tpm_fail(d, rc, "reading the storage parent");
            KEYX_ERR(d->p, KEYX_R_CONFIG_INVALID,
                     "tpm: tpm-parent 0x%08X is not usable: %s (make one with tpm2_createprimary "
                     "and tpm2_evictcontrol, or remove tpm-parent)",
                     (unsigned)d->p->cfg.tpm_parent, Tss2_RC_Decode(rc));
            return 0;
        }
        return 1;
    }
    tpm_storage_template(&tmpl.publicArea);
    TPM_CALL(d, NULL, rc,
             Esys_CreatePrimary(d->ctx, ESYS_TR_RH_OWNER, ESYS_TR_PASSWORD, ESYS_TR_NONE,
                                ESYS_TR_NONE, &sens, &tmpl, &outside, &pcrs, &d->parent, NULL, NULL,
                                NULL, NULL));
    if (rc != TSS2_RC_SUCCESS)
        return tpm_fail(d, rc, "creating the storage primary key (CreatePrimary, owner)");
    d->parent_owned = 1;
    return 1;
}

/* ESYS's salted session (with the storage parent as salt key). */
static int start_esys_session(tpm_dev *d)
{
    TPMT_SYM_DEF sym = {.algorithm = TPM2_ALG_AES, .keyBits.aes = 128, .mode.aes = TPM2_ALG_CFB};
    TSS2_RC rc;

    for (int tries = 0;; tries++) {
        rc = Esys_StartAuthSession(d->ctx, d->parent, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                                   ESYS_TR_NONE, NULL, TPM2_SE_HMAC, &sym, TPM2_ALG_SHA256,
                                   &d->session);
        if (rc == TPM2_RC_SESSION_MEMORY && tries == 0 && reclaim_foreign(d, HMAC_SESSION_FIRST))
            continue;
        if (rc == TPM2_RC_OBJECT_MEMORY && tpm_make_room(d, rc, NULL))
            continue;
        break;
    }
    if (rc != TSS2_RC_SUCCESS) {
        d->session = ESYS_TR_NONE;
        return tpm_fail(d, rc, "starting the encrypted session (StartAuthSession)");
    }
    return 1;
}

/* The session that protects ECDH_ZGen: keyx's own when the parent is an ECC P-256 key (always,
 * unless tpm-parent names another kind), else ESYS's. Salted with the storage parent: only this
 * TPM can derive the session key, so someone listening on the bus reads no Z point. */
static int start_session(tpm_dev *d)
{
    TSS2_RC rc = TSS2_RC_SUCCESS;

    d->session = ESYS_TR_NONE;
    if (!d->p->cfg.tpm_encrypt_sessions)
        return 1;
    for (int tries = 0; d->fast_ok && tries < 3; tries++) {
        if (tpm_fsess_start(&d->fast, d->ctx, d->parent, &rc))
            return 1;
        if (rc == TPM2_RC_SESSION_MEMORY && reclaim_foreign(d, HMAC_SESSION_FIRST))
            continue;
        if (rc == TPM2_RC_OBJECT_MEMORY && tpm_make_room(d, rc, NULL))
            continue;
        break;
    }
    if (rc != TSS2_RC_SUCCESS)
        return tpm_fail(d, rc, "starting the encrypted session (StartAuthSession)");
    return start_esys_session(d);
}

/* 1 when the TCTI talks to the TPM itself, with no resource manager in between: swtpm,
 * mssim, or a raw device (not /dev/tpmrm*). tpm2-abrmd and the kernel's resource manager flush
 * what a closed connection left; the TCTI loader's default may be either, so it counts as one. */
static int no_resource_manager(const tpm_dev *d)
{
    const char *t = d->tcti;

    if (t == NULL)
        return 0;
    if (strncmp(t, "swtpm", 5) == 0 || strncmp(t, "mssim", 5) == 0 ||
        strstr(t, "tcti-swtpm") != NULL || strstr(t, "tcti-mssim") != NULL)
        return 1;
    return (strncmp(t, "device", 6) == 0 || strstr(t, "tcti-device") != NULL) &&
           strstr(t, "tpmrm") == NULL;
}

/* After a command was given up on, the TPM may have run it (and those queued behind it) once it
 * woke up: a key nobody will flush, a session nobody will close. The first connection after the
 * stalled commands were answered (connect_tpm waits for that) owns nothing in the TPM yet, and
 * without a resource manager every transient object and session there is such a leftover (keyx
 * already treats them so when it needs a slot, reclaim_foreign): all are flushed. With a resource
 * manager nothing is flushed: it dropped them when the given-up connection closed. */
static void flush_stale(tpm_dev *d)
{
    static const TPM2_HANDLE ranges[] = {TRANSIENT_FIRST, HMAC_SESSION_FIRST,
                                         (TPM2_HANDLE)0x03000000u /* policy sessions */};
    TSS2_SYS_CONTEXT *sys = NULL;

    d->watch.flush_stale = 0;
    if (!no_resource_manager(d) || Esys_GetSysContext(d->ctx, &sys) != TSS2_RC_SUCCESS)
        return;
    for (size_t r = 0; r < sizeof(ranges) / sizeof(ranges[0]); r++) {
        TPMS_CAPABILITY_DATA cap = {0};
        TPMI_YES_NO more = 0;

        if (Tss2_Sys_GetCapability(sys, NULL, TPM2_CAP_HANDLES, ranges[r], 64, &more, &cap, NULL) !=
            TSS2_RC_SUCCESS)
            continue;
        for (UINT32 i = 0; i < cap.data.handles.count; i++)
            if ((cap.data.handles.handle[i] >> 24) == (ranges[r] >> 24))
                Tss2_Sys_FlushContext(sys, cap.data.handles.handle[i]);
    }
}

/* 1 if the transient object at tr is still the one this process made: the TPM has an object at
 * its handle, and that object's name (which covers its public key) is the one ESYS recorded.
 * Asked through SAPI with the bare handle: ReadPublic sends no authorization and changes
 * nothing. 0 when it is gone or another object sits at the handle, -1 (rc set) when the TPM did
 * not answer. */
static int still_ours(tpm_dev *d, ESYS_TR tr, const TPM2B_NAME *known, TSS2_RC *rc)
{
    TSS2_SYS_CONTEXT *sys = NULL;
    TPM2B_PUBLIC pub = {0};
    TPM2B_NAME name = {0}, qualified = {0}, *expect = NULL;
    TPM2_HANDLE h;
    int same;

    if ((*rc = Esys_GetSysContext(d->ctx, &sys)) != TSS2_RC_SUCCESS ||
        (*rc = Esys_TR_GetTpmHandle(d->ctx, tr, &h)) != TSS2_RC_SUCCESS)
        return -1;
    if (known == NULL || known->size == 0) {
        if ((*rc = Esys_TR_GetName(d->ctx, tr, &expect)) != TSS2_RC_SUCCESS)
            return -1;
        known = expect;
    }
    *rc = Tss2_Sys_ReadPublic(sys, h, NULL, &pub, &name, &qualified, NULL);
    same = *rc == TSS2_RC_SUCCESS && name.size == known->size &&
           memcmp(name.name, known->name, name.size) == 0;
    Esys_Free(expect);
    if (*rc != TSS2_RC_SUCCESS &&
        ((*rc & TSS2_RC_LAYER_MASK) != TSS2_TPM_RC_LAYER || rc_is_down(*rc)))
        return -1;
    *rc = TSS2_RC_SUCCESS;
    return same;
}

/* After fork() on a TPM without resource manager (swtpm, mssim, /dev/tpm0) a child that used
 * the TPM shared its slots with this process: when they ran out it flushed this process's
 * objects and sessions as a dead process's leftovers (reclaim_foreign), and at exit it flushed
 * its own, whose handles may be those this process holds. A handle is therefore used again
 * only once the object there is shown to be this process's (still_ours); nothing is flushed
 * (it may be another process's now). The sessions cannot be told apart that way: they are
 * forgotten and started again (a session still this process's is left in the TPM, where
 * reclaim_foreign finds it once slots run out). The cached primary, if lost, is made again;
 * a lost key is marked so: its use fails with KEYX_R_TPM_NOT_SHAREABLE (tpm_obj_ready), and a
 * key from a file or a persistent handle is loaded again. Lock held, connected. 1, or the
 * tpm_fail result. */
static int check_after_fork(tpm_dev *d)
{
    TSS2_RC rc = TSS2_RC_SUCCESS;
    tpm_obj *next;
    int mine;

    d->forked = 0;
    tpm_fsess_forget(&d->fast);
    if (d->session != ESYS_TR_NONE)
        Esys_TR_Close(d->ctx, &d->session);
    d->session = ESYS_TR_NONE;
    if (d->parent_owned) {
        if ((mine = still_ours(d, d->parent, NULL, &rc)) < 0)
            return tpm_fail(d, rc, "checking the storage primary key after fork()");
        if (!mine) {
            keyx_debug(d->p, "tpm: after fork(): the storage primary key was flushed by another "
                             "process (no resource manager); making it again");
            Esys_TR_Close(d->ctx, &d->parent);
            d->parent = ESYS_TR_NONE;
            d->parent_owned = 0;
        }
    }
    for (tpm_obj *o = d->head; o != NULL; o = next) {
        next = o->next;
        if (o->tr == ESYS_TR_NONE)
            continue;
        if ((mine = still_ours(d, o->tr, &o->name, &rc)) < 0)
            return tpm_fail(d, rc, "checking the TPM objects after fork()");
        if (!mine) {
            Esys_TR_Close(d->ctx, &o->tr);
            o->tr = ESYS_TR_NONE;
            o->lost = 1;
            list_unlink(d, o);
        }
    }
    return 1;
}

/* Inside the lock, connected: the check above, then the primary and session made again. */
static int recover_after_fork(tpm_dev *d)
{
    int r;

    if ((r = check_after_fork(d)) != 1)
        return r;
    if (d->parent == ESYS_TR_NONE && (r = make_parent(d)) != 1)
        return r;
    return start_session(d);
}

static int connect_once(tpm_dev *d)
{
    TSS2_RC rc;
    int r, timed_out = 0;

    if (stalled(d)) {
        /* A command given up on has had no answer yet: one more would only queue behind it. */
        KEYX_ERR(d->p, KEYX_R_BACKEND_UNAVAILABLE,
                 "tpm: the TPM at TCTI '%s' did not answer within %u ms and has not answered "
                 "since (keyx reconnects once it does; set tpm-timeout to wait longer)",
                 tcti_name(d), d->p->cfg.tpm_timeout_ms);
        return KEYX_BACKEND_DOWN;
    }
    /* tpm2-abrmd's TCTI talks D-Bus through GLib's connection, one per process, made once and
     * kept: in a child forked from a process that opened the TCTI (even if it closed it since),
     * that connection has no thread to run it, and opening the TCTI would only wait out
     * tpm-timeout. Said at once, with the way out. */
    if (d->tabrmd && forked_after_dbus_tcti()) {
        KEYX_ERR(d->p, KEYX_R_TPM_AFTER_FORK,
                 "tpm: cannot connect through tpm2-abrmd (TCTI '%s') in a process forked from one "
                 "that had connected through it: its D-Bus connection does not survive fork(); "
                 "let the parent use the TPM only after it has forked (keyx does not connect to "
                 "read key files), or use the kernel's resource manager (tpm-tcti = "
                 "device:/dev/tpmrm0)",
                 tcti_name(d));
        return KEYX_BACKEND_DOWN;
    }
    rc = tpm_tcti_open(d->tcti, d->p->cfg.tpm_timeout_ms, &d->watch, &d->tcti_ctx, &timed_out);
    if (rc != TSS2_RC_SUCCESS && timed_out) {
        d->tcti_ctx = NULL;
        KEYX_ERR(d->p, KEYX_R_BACKEND_UNAVAILABLE,
                 "tpm: the TPM at TCTI '%s' did not answer within %u ms while keyx connected to "
                 "it: check that the TPM or its resource manager is running and not stopped (set "
                 "tpm-timeout to wait longer)%s",
                 tcti_name(d), d->p->cfg.tpm_timeout_ms,
                 forked_after_dbus_tcti() && (d->tcti == NULL || d->tcti[0] == '\0')
                     ? "; this process was forked from one connected to the TPM: if the TCTI "
                       "loader's default picked tpm2-abrmd there, it cannot be opened again after "
                       "fork() (name the TCTI: tpm-tcti = device:/dev/tpmrm0)"
                     : "");
        return KEYX_BACKEND_DOWN;
    }
    if (rc == TSS2_RC_SUCCESS && d->no_probe)
        atomic_store(&dbus_tcti_opened_by, (int)getpid());
    if (rc != TSS2_RC_SUCCESS) {
        d->tcti_ctx = NULL;
        KEYX_ERR(d->p, KEYX_R_BACKEND_UNAVAILABLE,
                 "tpm: cannot open the TPM through TCTI '%s': %s: check tpm-tcti (or "
                 "KEYX_TPM_TCTI) and that the TPM, swtpm or resource manager is running",
                 tcti_name(d), Tss2_RC_Decode(rc));
        return KEYX_BACKEND_DOWN;
    }
    if ((rc = Esys_Initialize(&d->ctx, d->tcti_ctx, NULL)) != TSS2_RC_SUCCESS) {
        d->ctx = NULL;
        tpm_tcti_free(&d->tcti_ctx);
        KEYX_ERR(d->p, KEYX_R_BACKEND_UNAVAILABLE, "tpm: ESYS initialization on TCTI '%s': %s",
                 tcti_name(d), Tss2_RC_Decode(rc));
        return KEYX_BACKEND_DOWN;
    }
    d->pid = getpid();
    d->gen++;
    d->parent = d->session = ESYS_TR_NONE;
    d->parent_owned = 0;
    d->reclaimed = 0;
    rc = read_curves(d);
    if (rc == TPM2_RC_INITIALIZE) { /* a TPM nobody started (a bare simulator) */
        if ((rc = Esys_Startup(d->ctx, TPM2_SU_CLEAR)) == TSS2_RC_SUCCESS)
            rc = read_curves(d);
    }
    if (rc != TSS2_RC_SUCCESS && d->watch.timed_out != 0) {
        KEYX_ERR(d->p, KEYX_R_BACKEND_UNAVAILABLE,
                 "tpm: the TPM at TCTI '%s' did not answer within %u ms (keyx reconnects once it "
                 "answers again; set tpm-timeout to wait longer)",
                 tcti_name(d), d->watch.timed_out);
        d->watch.timed_out = 0;
        disconnect(d);
        return KEYX_BACKEND_DOWN;
    }
    if (rc != TSS2_RC_SUCCESS) {
        /* Every failure here is about reaching the TPM at all. */
        KEYX_ERR(d->p, KEYX_R_BACKEND_UNAVAILABLE,
                 "tpm: no answer from the TPM through TCTI '%s': %s: check tpm-tcti (or "
                 "KEYX_TPM_TCTI) and that the TPM or swtpm is running",
                 tcti_name(d), Tss2_RC_Decode(rc));
        disconnect(d);
        return KEYX_BACKEND_DOWN;
    }
    if (d->watch.flush_stale)
        flush_stale(d);
    if ((r = make_parent(d)) != 1 || (r = start_session(d)) != 1) {
        if (d->ctx != NULL) {
            if (d->parent_owned)
                Esys_FlushContext(d->ctx, d->parent);
            disconnect(d);
        }
        return r;
    }
    d->ready = 1;
    return 1;
}

/* Connects, and records the outcome for tpm_dev_describe. */
static int connect_tpm(tpm_dev *d)
{
    int r = connect_once(d);

    atomic_store(&d->link, r == 1 ? LINK_UP : LINK_FAILED);
    return r;
}

/* While the lock is held, libcrypto calls that the TSS makes on its own (the ECDH that salts
 * the session, HMACs, parameter encryption) run in keyx's library context: in the
 * application's, with keyx preferred, they would come back into keyx and this backend. */
static void locked(tpm_dev *d)
{
    d->reclaimed = 0;
    d->app_libctx = OSSL_LIB_CTX_set0_default(d->p->libctx);
}

static void lock_dev(tpm_dev *d)
{
    pthread_mutex_lock(&d->lock);
    locked(d);
}

/* As lock_dev, waiting at most tpm-timeout for a thread whose command the TPM has not answered
 * (that command is bounded by as much): 0 when the wait ran out (nothing locked). */
static int lock_dev_bounded(tpm_dev *d)
{
    struct timespec dl;

    /* pthread_mutex_timedlock takes a CLOCK_REALTIME deadline (a clock step shortens or
     * stretches this one wait); pthread_mutex_clocklock would take a monotonic one, but
     * ThreadSanitizer (gcc 12) does not know it and then reports every unlock. */
    tpm_deadline_in(CLOCK_REALTIME, &dl, d->p->cfg.tpm_timeout_ms);
    if (pthread_mutex_timedlock(&d->lock, &dl) != 0)
        return 0;
    locked(d);
    return 1;
}

static void unlock_dev(tpm_dev *d)
{
    OSSL_LIB_CTX_set0_default(d->app_libctx);
    d->app_libctx = NULL;
    pthread_mutex_unlock(&d->lock);
}

int tpm_begin(tpm_dev *d, ESYS_CONTEXT **ctx)
{
    int r;

    reset_seen = NULL; /* a retry answers a failure of this operation only */
    if (!lock_dev_bounded(d)) {
        KEYX_ERR(d->p, KEYX_R_BACKEND_UNAVAILABLE,
                 "tpm: the TPM at TCTI '%s' is busy: another thread's command has had no answer "
                 "for %u ms (set tpm-timeout to wait longer)",
                 tcti_name(d), d->p->cfg.tpm_timeout_ms);
        return KEYX_BACKEND_DOWN;
    }
    if (d->ctx == NULL && (r = connect_tpm(d)) != 1) {
        unlock_dev(d);
        return r;
    }
    if (d->forked && (r = recover_after_fork(d)) != 1) {
        /* Not without its primary and session: tried again at the next operation. */
        d->forked = d->ctx != NULL;
        unlock_dev(d);
        return r;
    }
    *ctx = d->ctx;
    return 1;
}

int tpm_begin_quiet(tpm_dev *d, ESYS_CONTEXT **ctx)
{
    lock_dev(d);
    if (d->ctx != NULL && d->forked) { /* never flush a handle that may be another process's */
        ERR_set_mark();
        check_after_fork(d);
        ERR_pop_to_mark();
    }
    *ctx = d->ctx;
    return d->ctx != NULL;
}

void tpm_end(tpm_dev *d)
{
    unlock_dev(d);
}

ESYS_TR tpm_parent(tpm_dev *d)
{
    return d->parent;
}

int tpm_persistent_in_use(tpm_dev *d, TPM2_HANDLE h, int *used)
{
    TPMS_CAPABILITY_DATA *cap = NULL;
    TPMI_YES_NO more = 0;
    TSS2_RC rc = Esys_GetCapability(d->ctx, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                                    TPM2_CAP_HANDLES, h, 1, &more, &cap);

    *used = 0;
    if (rc != TSS2_RC_SUCCESS)
        return tpm_fail(d, rc, "reading the persistent handles (GetCapability)");
    *used = cap->data.handles.count > 0 && cap->data.handles.handle[0] == h;
    Esys_Free(cap);
    return 1;
}

#define RELEASE_FLUSH 1 /* a primary made for this load */
#define RELEASE_CLOSE 2 /* a persistent handle opened for this load */

int tpm_open_parent(tpm_dev *d, TPM2_HANDLE h, ESYS_TR *tr, int *release)
{
    TPM2B_SENSITIVE_CREATE sens = {0};
    TPM2B_PUBLIC tmpl = {0};
    TPM2B_DATA outside = {0};
    TPML_PCR_SELECTION pcrs = {0};
    TSS2_RC rc;
    int r, used = 0;

    *tr = ESYS_TR_NONE;
    *release = 0;
    if (h == TPM2_RH_OWNER) {
        if (d->parent_owned) { /* keyx's own primary is made from the same template */
            *tr = d->parent;
            return 1;
        }
        tpm_storage_template(&tmpl.publicArea);
        TPM_CALL(d, NULL, rc,
                 Esys_CreatePrimary(d->ctx, ESYS_TR_RH_OWNER, ESYS_TR_PASSWORD, ESYS_TR_NONE,
                                    ESYS_TR_NONE, &sens, &tmpl, &outside, &pcrs, tr, NULL, NULL,
                                    NULL, NULL));
        if (rc != TSS2_RC_SUCCESS) {
            *tr = ESYS_TR_NONE;
            return tpm_fail(d, rc, "creating the owner storage primary key (CreatePrimary)");
        }
        *release = RELEASE_FLUSH;
        return 1;
    }
    if ((h >> 24) != TPM2_HT_PERSISTENT) {
        KEYX_ERR(d->p, KEYX_R_UNSUPPORTED,
                 "tpm: the key file's parent 0x%08X is neither the owner hierarchy (0x40000001) "
                 "nor a persistent key (0x81xxxxxx): keyx cannot load keys under it",
                 (unsigned)h);
        return 0;
    }
    if (d->p->cfg.tpm_parent == h && !d->parent_owned) {
        *tr = d->parent;
        return 1;
    }
    if ((r = tpm_persistent_in_use(d, h, &used)) != 1)
        return r;
    if (!used) {
        KEYX_ERR(d->p, KEYX_R_MISSING_KEY,
                 "tpm: the key file's parent, persistent key 0x%08X, is not in this TPM: the "
                 "file can only be loaded on the TPM that made it, with its parent in place",
                 (unsigned)h);
        return 0;
    }
    rc = Esys_TR_FromTPMPublic(d->ctx, h, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, tr);
    if (rc != TSS2_RC_SUCCESS) {
        *tr = ESYS_TR_NONE;
        if (rc_is_down(rc))
            return tpm_fail(d, rc, "opening the key file's parent");
        KEYX_ERR(d->p, KEYX_R_MISSING_KEY,
                 "tpm: the key file's parent, persistent key 0x%08X, is not in this TPM (%s): the "
                 "file can only be loaded on the TPM that made it, with its parent in place",
                 (unsigned)h, Tss2_RC_Decode(rc));
        return 0;
    }
    *release = RELEASE_CLOSE;
    return 1;
}

void tpm_release_parent(tpm_dev *d, ESYS_TR tr, int release)
{
    if (d->ctx == NULL || tr == ESYS_TR_NONE)
        return;
    if (release == RELEASE_FLUSH)
        Esys_FlushContext(d->ctx, tr);
    else if (release == RELEASE_CLOSE)
        tpm_persistent_close_unused(d, &tr);
}

int tpm_session(tpm_dev *d, TPMA_SESSION crypt, int auth, ESYS_TR *out)
{
    int r;

    *out = auth ? ESYS_TR_PASSWORD : ESYS_TR_NONE;
    if (!d->p->cfg.tpm_encrypt_sessions)
        return 1;
    if (d->session == ESYS_TR_NONE && (r = start_esys_session(d)) != 1)
        return r;
    Esys_TRSess_SetAttributes(d->ctx, d->session, TPMA_SESSION_CONTINUESESSION | crypt, 0xFF);
    *out = d->session;
    return 1;
}

/* TPM 2.0 Part 2, 6.6.3: TPM_RC_RETRY, _YIELDED and _TESTING (a self-test of the algorithm
 * running, as on a TPM's first ECDH) ask the caller to send the command again. ESYS does so for
 * its own commands; keyx's session sends through SAPI and retries itself, a few times with a
 * growing pause. */
static int rc_is_retry(TSS2_RC rc)
{
    return rc == TPM2_RC_RETRY || rc == TPM2_RC_YIELDED || rc == TPM2_RC_TESTING;
}

static void retry_pause(int attempt)
{
    struct timespec ts = {0, 1000000L << attempt}; /* 1, 2, 4, 8, 16 ms */

    nanosleep(&ts, NULL);
}

#define FAST_RETRIES 5
/* 1 when a command that answered rc is to be sent again (attempt: how many times it was). */
static int again(TSS2_RC rc, int attempt)
{
    if (!rc_is_retry(rc) || attempt == FAST_RETRIES)
        return 0;
    retry_pause(attempt);
    return 1;
}

/* The key's name for keyx's session: known since it was made, or asked of ESYS once. */
static TSS2_RC obj_name(tpm_dev *d, tpm_obj *o, ESYS_TR key)
{
    TPM2B_NAME *name = NULL;
    TSS2_RC rc;

    if (o->name.size != 0)
        return TSS2_RC_SUCCESS;
    if ((rc = Esys_TR_GetName(d->ctx, key, &name)) != TSS2_RC_SUCCESS)
        return rc;
    o->name = *name;
    Esys_Free(name);
    return rc;
}

/* Without keyx's session: ESYS's (a non-ECC tpm-parent) with attrs, or the password. */
static ESYS_TR esys_session(tpm_dev *d, TPMA_SESSION attrs)
{
    if (d->session == ESYS_TR_NONE)
        return ESYS_TR_PASSWORD;
    Esys_TRSess_SetAttributes(d->ctx, d->session, attrs, 0xFF);
    return d->session;
}

static TSS2_RC ecdh_zgen(tpm_dev *d, tpm_obj *o, ESYS_TR key, const TPM2B_ECC_POINT *in,
                         TPM2B_ECC_POINT *out)
{
    TPM2B_ECC_POINT *res = NULL;
    ESYS_TR sess;
    TSS2_RC rc;

    if (d->fast.handle != 0) {
        if ((rc = obj_name(d, o, key)) != TSS2_RC_SUCCESS)
            return rc;
        for (int i = 0;; i++)
            if (!again(rc = tpm_fsess_zgen(&d->fast, d->ctx, key, &o->name, in, out), i))
                return rc;
    }
    sess = esys_session(d, TPMA_SESSION_CONTINUESESSION | TPMA_SESSION_ENCRYPT);
    rc = Esys_ECDH_ZGen(d->ctx, key, sess, ESYS_TR_NONE, ESYS_TR_NONE, in, &res);
    if (rc == TSS2_RC_SUCCESS) {
        *out = *res;
        OPENSSL_cleanse(res, sizeof(*res));
        Esys_Free(res);
    }
    return rc;
}

static TSS2_RC rsa_decrypt(tpm_dev *d, tpm_obj *o, ESYS_TR key, const TPM2B_PUBLIC_KEY_RSA *in,
                           const TPMT_RSA_DECRYPT *scheme, const TPM2B_DATA *label,
                           TPM2B_PUBLIC_KEY_RSA *out)
{
    TPM2B_PUBLIC_KEY_RSA *res = NULL;
    ESYS_TR sess;
    TSS2_RC rc;

    if (d->fast.handle != 0) {
        if ((rc = obj_name(d, o, key)) != TSS2_RC_SUCCESS)
            return rc;
        for (int i = 0;; i++)
            if (!again(rc = tpm_fsess_rsa_decrypt(&d->fast, d->ctx, key, &o->name, in, scheme,
                                                  label, out),
                       i))
                return rc;
    }
    sess = esys_session(d, TPMA_SESSION_CONTINUESESSION | TPMA_SESSION_ENCRYPT);
    rc = Esys_RSA_Decrypt(d->ctx, key, sess, ESYS_TR_NONE, ESYS_TR_NONE, in, scheme, label, &res);
    if (rc == TSS2_RC_SUCCESS) {
        *out = *res;
        OPENSSL_cleanse(res, sizeof(*res));
        Esys_Free(res);
    }
    return rc;
}

/* The TSS keeps the last response in its SYS context's buffer, decrypted in place (or in the
 * clear without sessions), until the next command overwrites it or the context is freed
 * without wiping: the Z point of a ZGen, the plaintext of an RSA_Decrypt. Wiped as soon as the
 * result is copied out. */
static void wipe_response(tpm_dev *d)
{
    TSS2_SYS_CONTEXT *sys = NULL;
    const uint8_t *rp = NULL;
    size_t n = 0;

    if (Esys_GetSysContext(d->ctx, &sys) == TSS2_RC_SUCCESS && sys != NULL &&
        Tss2_Sys_GetRpBuffer(sys, &n, &rp) == TSS2_RC_SUCCESS && rp != NULL && n > 0)
        OPENSSL_cleanse((void *)rp, n);
}

TSS2_RC tpm_ecdh_zgen(tpm_dev *d, tpm_obj *o, ESYS_TR key, const TPM2B_ECC_POINT *in,
                      TPM2B_ECC_POINT *out)
{
    TSS2_RC rc = ecdh_zgen(d, o, key, in, out);

    wipe_response(d);
    return rc;
}

TSS2_RC tpm_rsa_decrypt(tpm_dev *d, tpm_obj *o, ESYS_TR key, const TPM2B_PUBLIC_KEY_RSA *in,
                        const TPMT_RSA_DECRYPT *scheme, const TPM2B_DATA *label,
                        TPM2B_PUBLIC_KEY_RSA *out)
{
    TSS2_RC rc = rsa_decrypt(d, o, key, in, scheme, label, out);

    wipe_response(d);
    return rc;
}

TSS2_RC tpm_sign(tpm_dev *d, tpm_obj *o, ESYS_TR key, const TPM2B_DIGEST *digest,
                 const TPMT_SIG_SCHEME *scheme, TPMT_SIGNATURE *out)
{
    TPMT_TK_HASHCHECK ticket = {.tag = TPM2_ST_HASHCHECK, .hierarchy = TPM2_RH_NULL};
    TPMT_SIGNATURE *res = NULL;
    ESYS_TR sess;
    TSS2_RC rc;

    if (d->fast.handle != 0) {
        if ((rc = obj_name(d, o, key)) != TSS2_RC_SUCCESS)
            return rc;
        for (int i = 0;; i++)
            if (!again(rc = tpm_fsess_sign(&d->fast, d->ctx, key, &o->name, digest, scheme, out),
                       i))
                return rc;
    }
    sess = esys_session(d, TPMA_SESSION_CONTINUESESSION);
    rc = Esys_Sign(d->ctx, key, sess, ESYS_TR_NONE, ESYS_TR_NONE, digest, scheme, &ticket, &res);
    if (rc == TSS2_RC_SUCCESS) {
        *out = *res;
        Esys_Free(res);
    }
    return rc;
}

TSS2_RC tpm_create_null_primary(tpm_dev *d, const TPM2B_PUBLIC *inpub, ESYS_TR *tr,
                                TPM2B_PUBLIC *outpub, TPM2B_NAME *name)
{
    TSS2_SYS_CONTEXT *sys = NULL;
    TPM2B_NAME check;
    TPM2_HANDLE h = 0;
    uint8_t meta[4 + sizeof(TPM2B_NAME) + 4 + sizeof(TPM2B_PUBLIC)];
    size_t off = 0;
    TSS2_RC rc;

    *tr = ESYS_TR_NONE;
    memset(outpub, 0, sizeof(*outpub));
    memset(name, 0, sizeof(*name));
    if ((rc = Esys_GetSysContext(d->ctx, &sys)) != TSS2_RC_SUCCESS)
        return rc;
    if (d->fast.handle == 0 && d->session != ESYS_TR_NONE) {
        /* ESYS's session (a non-ECC tpm-parent): ESYS makes the key. */
        TPM2B_SENSITIVE_CREATE sens = {0};
        TPM2B_DATA outside = {0};
        TPML_PCR_SELECTION pcrs = {0};
        TPM2B_PUBLIC *pub = NULL;
        TPM2B_NAME *n = NULL;

        Esys_TRSess_SetAttributes(d->ctx, d->session, TPMA_SESSION_CONTINUESESSION, 0xFF);
        rc = Esys_CreatePrimary(d->ctx, ESYS_TR_RH_NULL, d->session, ESYS_TR_NONE, ESYS_TR_NONE,
                                &sens, inpub, &outside, &pcrs, tr, &pub, NULL, NULL, NULL);
        if (rc == TSS2_RC_SUCCESS && (rc = Esys_TR_GetName(d->ctx, *tr, &n)) == TSS2_RC_SUCCESS) {
            *outpub = *pub;
            *name = *n;
        } else if (rc == TSS2_RC_SUCCESS) {
            Esys_FlushContext(d->ctx, *tr);
            *tr = ESYS_TR_NONE;
        }
        Esys_Free(pub);
        Esys_Free(n);
        return rc;
    }
    if (d->fast.handle != 0) {
        /* Authorized by keyx's session: after a TPM reset the session is gone and the TPM says
         * so here, and the key is made again on a new connection (tpm_dev_take_reset). */
        for (int i = 0;; i++)
            if (!again(rc = tpm_fsess_create_primary(&d->fast, d->ctx, TPM2_RH_NULL, inpub, &h,
                                                     outpub, name),
                       i))
                break;
    } else {
        TSS2L_SYS_AUTH_COMMAND cmd = {.count = 1};
        TSS2L_SYS_AUTH_RESPONSE rsp = {0};
        TPM2B_SENSITIVE_CREATE sens = {0};
        TPM2B_DATA outside = {0};
        TPML_PCR_SELECTION pcrs = {0};
        TPM2B_CREATION_DATA cdata = {0};
        TPM2B_DIGEST chash = {0};
        TPMT_TK_CREATION ticket = {0};

        /* Sessions off: the NULL hierarchy's empty password. */
        cmd.auths[0].sessionHandle = TPM2_RS_PW;
        rc = Tss2_Sys_CreatePrimary(sys, TPM2_RH_NULL, &cmd, &sens, inpub, &outside, &pcrs, &h,
                                    outpub, &cdata, &chash, &ticket, name, &rsp);
    }
    if (rc != TSS2_RC_SUCCESS)
        return rc;
    /* The name the TPM returned must be that of the public key it returned (as ESYS checks). */
    if (d->fast_ok &&
        (!tpm_fsess_name(&d->fast, &outpub->publicArea, &check) || check.size != name->size ||
         memcmp(check.name, name->name, name->size) != 0)) {
        Tss2_Sys_FlushContext(sys, h);
        return TSS2_ESYS_RC_MALFORMED_RESPONSE;
    }
    /* ESYS learns of the object from its metadata (what Esys_TR_Serialize writes: handle, name,
     * IESYSC_KEY_RSRC, public area): no command, and no name computed in a new library context
     * as Esys_CreatePrimary does. */
    if ((rc = Tss2_MU_UINT32_Marshal(h, meta, sizeof(meta), &off)) != TSS2_RC_SUCCESS ||
        (rc = Tss2_MU_TPM2B_NAME_Marshal(name, meta, sizeof(meta), &off)) != TSS2_RC_SUCCESS ||
        (rc = Tss2_MU_UINT32_Marshal(1 /* IESYSC_KEY_RSRC */, meta, sizeof(meta), &off)) !=
            TSS2_RC_SUCCESS ||
        (rc = Tss2_MU_TPM2B_PUBLIC_Marshal(outpub, meta, sizeof(meta), &off)) != TSS2_RC_SUCCESS ||
        (rc = Esys_TR_Deserialize(d->ctx, meta, off, tr)) != TSS2_RC_SUCCESS) {
        *tr = ESYS_TR_NONE;
        Tss2_Sys_FlushContext(sys, h);
    }
    return rc;
}

static long now_seconds(void)
{
    struct timespec ts;

    return clock_gettime(CLOCK_MONOTONIC, &ts) == 0 ? (long)ts.tv_sec : 0;
}

int tpm_dev_take_reset(tpm_dev *d)
{
    int r = reset_seen == d;

    reset_seen = NULL;
    return r;
}

/* Capabilities are read at connect time. A query (TLS-GROUP lists every group, a signature
 * init asks for its scheme) connects if need be; an unreachable TPM is probed at most every two
 * seconds, and its error comes with the operation that needs the TPM. Under the device lock.
 * Except through tpm2-abrmd (a tabrmd TCTI, or the TCTI loader's default, which may pick it):
 * its TCTI (GLib D-Bus) cannot be opened again in a child forked from a process that opened it
 * (nginx's master lists the TLS groups before forking its workers), so a query never
 * connects there; until an operation connected (a key generation probes first: tpm_dev_probe),
 * the answers are the defaults below (P-256 and P-384), afterwards the TPM's own lists. */
static void probe_caps_now(tpm_dev *d)
{
    if (!d->caps_known && d->ctx == NULL &&
        (d->probe_failed == 0 || now_seconds() - d->probe_failed >= 2)) {
        ERR_set_mark();
        if (connect_tpm(d) != 1)
            d->probe_failed = now_seconds();
        ERR_pop_to_mark();
    }
}

static void probe_caps(tpm_dev *d)
{
    if (!d->no_probe)
        probe_caps_now(d);
}

void tpm_dev_probe(tpm_dev *d)
{
    lock_dev(d);
    probe_caps_now(d);
    unlock_dev(d);
}

int tpm_dev_has_curve(tpm_dev *d, TPM2_ECC_CURVE curve)
{
    int known, found = 0;

    lock_dev(d);
    probe_caps(d);
    known = d->caps_known;
    for (size_t i = 0; i < d->ncurves; i++)
        found |= d->curves[i] == curve;
    unlock_dev(d);
    if (!known)
        return curve == TPM2_ECC_NIST_P256 || curve == TPM2_ECC_NIST_P384;
    return found;
}

int tpm_dev_has_alg(tpm_dev *d, TPM2_ALG_ID alg)
{
    int known, found = 0;

    lock_dev(d);
    probe_caps(d);
    known = d->caps_known;
    for (size_t i = 0; i < d->nalgs; i++)
        found |= d->algs[i] == alg;
    unlock_dev(d);
    if (!known) /* unreachable TPM: the signature meets the real error (the TPM's absence) */
        return alg == TPM2_ALG_SHA1 || alg == TPM2_ALG_SHA256 || alg == TPM2_ALG_SHA384 ||
               alg == TPM2_ALG_SHA512 || alg == TPM2_ALG_ECDSA || alg == TPM2_ALG_RSASSA ||
               alg == TPM2_ALG_RSAPSS;
    return found;
}

static int rsa_index(size_t bits)
{
    return bits == 2048 ? 0 : bits == 3072 ? 1 : bits == 4096 ? 2 : -1;
}

int tpm_dev_has_rsa(tpm_dev *d, size_t bits)
{
    int i = rsa_index(bits), ok;

    if (i < 0)
        return 0;
    lock_dev(d);
    if (!(d->rsa_known & (1u << i)) && d->ctx == NULL &&
        (d->probe_failed == 0 || now_seconds() - d->probe_failed >= 2)) {
        ERR_set_mark();
        if (connect_tpm(d) != 1)
            d->probe_failed = now_seconds();
        ERR_pop_to_mark();
    }
    if (!(d->rsa_known & (1u << i)) && d->ctx != NULL) {
        /* TPM2_TestParms: the TPM says whether it takes keys of this size (swtpm 0.7: 2048 and
         * 3072; 4096 is rare in TPMs). */
        TPMT_PUBLIC_PARMS parms = {.type = TPM2_ALG_RSA};
        TSS2_RC rc;

        parms.parameters.rsaDetail.symmetric.algorithm = TPM2_ALG_NULL;
        parms.parameters.rsaDetail.scheme.scheme = TPM2_ALG_NULL;
        parms.parameters.rsaDetail.keyBits = (TPM2_KEY_BITS)bits;
        rc = Esys_TestParms(d->ctx, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &parms);
        if ((rc & TSS2_RC_LAYER_MASK) == TSS2_TPM_RC_LAYER && !rc_is_down(rc)) {
            d->rsa_known |= 1u << i;
            if (rc == TSS2_RC_SUCCESS)
                d->rsa_ok |= 1u << i;
        }
    }
    ok = (d->rsa_known & (1u << i)) ? (d->rsa_ok >> i) & 1 : bits == 2048;
    unlock_dev(d);
    return ok;
}

/* ---- lifetime ---------------------------------------------------------------------------- */

int tpm_dev_new(keyx_provctx *p, tpm_dev **out)
{
    tpm_dev *d = OPENSSL_zalloc(sizeof(*d));

    *out = d;
    if (d == NULL) {
        KEYX_ERR(p, KEYX_R_INTERNAL, "out of memory");
        return 0;
    }
    d->p = p;
    d->tcti = p->cfg.tpm_tcti;
    d->tabrmd = d->tcti != NULL &&
                (strncmp(d->tcti, "tabrmd", 6) == 0 || strstr(d->tcti, "tcti-tabrmd") != NULL);
    d->no_probe = d->tabrmd || d->tcti == NULL || d->tcti[0] == '\0';
    d->parent = d->session = ESYS_TR_NONE;
    if (!tpm_tcti_watch_init(&d->watch)) {
        OPENSSL_free(d);
        *out = NULL;
        KEYX_ERR(p, KEYX_R_INTERNAL, "out of memory");
        return 0;
    }
    pthread_mutex_init(&d->lock, NULL);
    d->fast_ok = tpm_fsess_init(&d->fast, p->libctx);
    pthread_once(&atfork_once, register_atfork);
    pthread_mutex_lock(&registry_lock);
    d->reg_next = registry;
    registry = d;
    pthread_mutex_unlock(&registry_lock);
    return 1;
}

void tpm_dev_free(tpm_dev *d)
{
    if (d == NULL)
        return;
    pthread_mutex_lock(&registry_lock);
    for (tpm_dev **pp = &registry; *pp != NULL; pp = &(*pp)->reg_next)
        if (*pp == d) {
            *pp = d->reg_next;
            break;
        }
    pthread_mutex_unlock(&registry_lock);
    lock_dev(d);
    if (d->ctx != NULL && d->pid == getpid() && d->forked && !stalled(d)) {
        ERR_set_mark();
        check_after_fork(d);
        ERR_pop_to_mark();
    }
    if (d->ctx != NULL && d->pid == getpid() && !stalled(d)) {
        /* Without a resource manager nothing flushes what a process leaves in the TPM. */
        for (tpm_obj *o = d->head; o != NULL; o = o->next)
            if (o->tr != ESYS_TR_NONE)
                Esys_FlushContext(d->ctx, o->tr);
        if (d->session != ESYS_TR_NONE)
            Esys_FlushContext(d->ctx, d->session);
        tpm_fsess_flush(&d->fast, d->ctx);
        if (d->parent_owned)
            Esys_FlushContext(d->ctx, d->parent);
    }
    if (d->ctx != NULL && d->pid == getpid())
        disconnect(d); /* a stalled TPM: nothing is flushed, no command waits for an answer */
    unlock_dev(d);
    tpm_tcti_watch_cleanup(&d->watch);
    pthread_mutex_destroy(&d->lock);
    tpm_fsess_cleanup(&d->fast);
    OPENSSL_free(d);
}

struct keyx_provctx *tpm_dev_prov(const tpm_dev *d)
{
    return d->p;
}

void tpm_dev_describe(tpm_dev *d, char *buf, size_t len)
{
    static const char *const what[] = {
        [LINK_NONE] = "not connected yet (keyx connects at its first TPM operation)",
        [LINK_UP] = "connected",
        [LINK_FAILED] = "not connected: the last attempt to connect failed (keyx tries again at "
                        "the next operation)",
        [LINK_LOST] = "not connected: the connection was lost (keyx reconnects at the next "
                      "operation)",
    };
    int link = atomic_load(&d->link);

    snprintf(buf, len, "%s; TCTI '%s'", what[link >= LINK_NONE && link <= LINK_LOST ? link : 0],
             tcti_name(d));
}
