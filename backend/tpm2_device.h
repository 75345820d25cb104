/* The TPM device layer of the tpm backend: one ESYS context per process behind a lock, opened
 * lazily through the TCTI loader (`tpm-tcti` / KEYX_TPM_TCTI), reopened after fork() and after
 * a lost connection; the storage parent (a cached ECC P-256 primary, or `tpm-parent`); the
 * salted HMAC session that encrypts the secrets the TPM returns; and the TPM's object slots,
 * shared out among keyx's transient objects without a resource manager (swtpm has three). Key
 * operations (backend/tpm2.c) run between tpm_begin() and tpm_end(). */
#ifndef KEYX_BACKEND_TPM2_DEVICE_H
#define KEYX_BACKEND_TPM2_DEVICE_H

#include <stddef.h>
#include <stdint.h>

#include <tss2/tss2_esys.h>

struct keyx_provctx;

typedef struct tpm_dev tpm_dev;

/* A TPM object keyx uses. Transient objects keyx made are flushed when dropped, and may be
 * context-saved out of the TPM while idle to free a slot; persistent ones are only referenced. */
typedef struct tpm_obj {
    ESYS_TR tr;                  /* ESYS_TR_NONE while saved out */
    TPMS_CONTEXT *saved;         /* context-saved blob while evicted from the TPM */
    uint64_t gen;                /* connection generation the object belongs to */
    TPM2_HANDLE persistent;      /* 0x81xxxxxx for persistent keys; 0 for transient objects */
    TPM2B_NAME name;             /* the object's TPM name once known (size 0: not yet) */
    uint64_t stamp;              /* last use, for least-recently-used eviction */
    struct tpm_obj *prev, *next; /* list of transient objects loaded in the TPM */
    int listed;
    int lost; /* flushed by a forked process (a TPM without resource manager): never usable */
} tpm_obj;

/* Reads the configuration; touches no device. */
int tpm_dev_new(struct keyx_provctx *p, tpm_dev **out);
void tpm_dev_free(tpm_dev *d);
struct keyx_provctx *tpm_dev_prov(const tpm_dev *d);
/* The connection's state as last seen, without the lock and without the TPM (backend.h's
 * describe): "connected; TCTI '...'", "not connected yet; ...". */
void tpm_dev_describe(tpm_dev *d, char *buf, size_t len);

/* 1 if the TPM lists curve (TPM2_CAP_ECC_CURVES). When the TPM cannot be reached, answers for
 * P-256 and P-384 (every PC-client TPM has them) so that generation meets the real error. These
 * queries connect if need be, except through tpm2-abrmd (a tabrmd TCTI or the loader's default):
 * there they never connect (its TCTI cannot be opened again in a process forked from one that
 * opened it, such as a forking server's workers) and answer the same defaults until an operation
 * connected. */
int tpm_dev_has_curve(tpm_dev *d, TPM2_ECC_CURVE curve);
/* Connects now if the capabilities are not known yet, whatever the TCTI (an operation is about to
 * use the TPM: a key generation asking which curves it has). Errors are dropped. */
void tpm_dev_probe(tpm_dev *d);

/* 1 if the TPM takes RSA keys of bits (2048, 3072, 4096; TPM2_TestParms, asked once), connecting
 * if need be (only generation and import ask: TLS-GROUP has no RSA). When the TPM cannot be
 * reached, answers for 2048 only. */
int tpm_dev_has_rsa(tpm_dev *d, size_t bits);

/* 1 if the TPM lists alg (TPM2_CAP_ALGS, read once per connection): hashes and signature
 * schemes. When the TPM cannot be reached, answers for SHA1/256/384/512, ECDSA, RSASSA and RSAPSS
 * so that the operation meets the real error. */
int tpm_dev_has_alg(tpm_dev *d, TPM2_ALG_ID alg);

/* 1 (once) if this thread's last KEYX_BACKEND_DOWN from d, in its current operation, broke a
 * connection that had been working (the TPM was restarted or reset, or went away mid-command),
 * not a failure to connect: an operation that creates its object from scratch may retry once,
 * on a new connection (which another thread may have opened meanwhile). */
int tpm_dev_take_reset(tpm_dev *d);

/* Locks the device and connects if needed. 1: *ctx usable until tpm_end(); 0 or
 * KEYX_BACKEND_DOWN with an error raised and the lock released. Every TPM command sent through
 * *ctx (ESYS or its SAPI) gets its answer within tpm-timeout (RSA key creation: ten times as
 * long) or fails with a TCTI I/O error that tpm_fail reports as the TPM not answering, closing
 * the connection; until the TPM answers the command given up on, connecting fails at once. The
 * wait for the lock is bounded by tpm-timeout too (KEYX_BACKEND_DOWN: "busy"). */
int tpm_begin(tpm_dev *d, ESYS_CONTEXT **ctx);
/* Locks the device without connecting: 1 if connected (for freeing objects). Always tpm_end().
 * The wait is not bounded by a clock, but whoever holds the lock is: its commands are. */
int tpm_begin_quiet(tpm_dev *d, ESYS_CONTEXT **ctx);
void tpm_end(tpm_dev *d);

/* Inside begin/end. The storage parent; ESYS's session for an auth or non-auth slot (started on
 * first use), with the given parameter-encryption attributes (TPMA_SESSION_ENCRYPT: response,
 * _DECRYPT: command) when encrypted sessions are on, else ESYS_TR_PASSWORD (auth) /
 * ESYS_TR_NONE (non-auth): 1, or 0/KEYX_BACKEND_DOWN with an error raised. */
ESYS_TR tpm_parent(tpm_dev *d);
/* Inside begin/end: the parent a TSS2 key file names, opened for TPM2_Load. TPM2_RH_OWNER
 * (0x40000001): the owner-hierarchy primary made from tpm_storage_template, which is also the
 * primary tpm2-openssl and the TSS2 key file convention use (keyx's cached storage parent when it
 * is that primary, else one made now); a persistent handle 0x81xxxxxx: that key. 1 with *tr
 * (release it with tpm_release_parent), else 0/KEYX_BACKEND_DOWN with an error raised. */
/* Inside begin/end: *used = 1 if a persistent object lives at h (asked of the handle list:
 * ReadPublic on a free handle makes ESYS print errors of its own). 1, or the tpm_fail result. */
int tpm_persistent_in_use(tpm_dev *d, TPM2_HANDLE h, int *used);
int tpm_open_parent(tpm_dev *d, TPM2_HANDLE h, ESYS_TR *tr, int *release);
void tpm_release_parent(tpm_dev *d, ESYS_TR tr, int release);
int tpm_session(tpm_dev *d, TPMA_SESSION crypt, int auth, ESYS_TR *out);
/* Inside begin/end: TPM2_ECDH_ZGen with key, the result encrypted in the session (keyx's own,
 * see tpm2_session.h; ESYS's when the parent cannot salt keyx's) unless sessions are off. */
TSS2_RC tpm_ecdh_zgen(tpm_dev *d, tpm_obj *o, ESYS_TR key, const TPM2B_ECC_POINT *in,
                      TPM2B_ECC_POINT *out);

/* Inside begin/end: TPM2_RSA_Decrypt with key, the message encrypted in the session as for
 * ECDH_ZGen unless sessions are off. */
TSS2_RC tpm_rsa_decrypt(tpm_dev *d, tpm_obj *o, ESYS_TR key, const TPM2B_PUBLIC_KEY_RSA *in,
                        const TPMT_RSA_DECRYPT *scheme, const TPM2B_DATA *label,
                        TPM2B_PUBLIC_KEY_RSA *out);

/* Inside begin/end: TPM2_Sign of digest with key (an unrestricted signing key: NULL ticket) under
 * scheme, authorized by keyx's session (no parameter encryption) unless sessions are off. */
TSS2_RC tpm_sign(tpm_dev *d, tpm_obj *o, ESYS_TR key, const TPM2B_DIGEST *digest,
                 const TPMT_SIG_SCHEME *scheme, TPMT_SIGNATURE *out);

/* Inside begin/end: TPM2_CreatePrimary in the NULL hierarchy from inpub (sent through ESYS's
 * SAPI), the new object registered in ESYS as *tr; *outpub and *name as the TPM returned them. */
TSS2_RC tpm_create_null_primary(tpm_dev *d, const TPM2B_PUBLIC *inpub, ESYS_TR *tr,
                                TPM2B_PUBLIC *outpub, TPM2B_NAME *name);

/* Inside begin/end. Makes o usable now (loads it back if it was saved out, finds a persistent
 * key again after a reconnect): 1 with *tr, else 0/KEYX_BACKEND_DOWN with an error raised. */
int tpm_obj_ready(tpm_dev *d, tpm_obj *o, ESYS_TR *tr);
/* Inside begin/end: 1 if o belongs to the current connection (a transient object the TPM
 * still holds, loaded or saved out); 0 once a reconnect or fork() took it. */
int tpm_obj_current(tpm_dev *d, const tpm_obj *o);
/* Records a transient object just created or loaded as tr. */
void tpm_obj_loaded(tpm_dev *d, tpm_obj *o, ESYS_TR tr);
/* Records the public area of o (after tpm_obj_loaded): its name is computed once, here. */
void tpm_obj_public(tpm_dev *d, tpm_obj *o, const TPMT_PUBLIC *pub);
/* Records a persistent object resolved as tr. */
/* Closes a persistent ESYS_TR opened by a load that failed, unless a loaded key shares it. */
void tpm_persistent_close_unused(tpm_dev *d, ESYS_TR *tr);
void tpm_obj_persistent(tpm_dev *d, tpm_obj *o, TPM2_HANDLE h, ESYS_TR tr);
/* Flushes a transient object (if still in this connection), releases a persistent one. */
void tpm_obj_drop(tpm_dev *d, tpm_obj *o);

/* Inside begin/end: when rc says the TPM's object memory is full (TPM_RC_OBJECT_MEMORY),
 * saves out and flushes the least recently used idle object other than keep; 1 if it freed a
 * slot (retry the command), 0 if nothing could be freed. */
int tpm_make_room(tpm_dev *d, TSS2_RC rc, const tpm_obj *keep);

/* Runs a TPM command, retrying it while the TPM's object memory is full and keyx can free a
 * slot. */
#define TPM_CALL(d, keep, rc, call)                                                                \
    do {                                                                                           \
        (rc) = (call);                                                                             \
    } while (tpm_make_room((d), (rc), (keep)))

/* Inside begin/end: rc != success. Raises "tpm: WHAT failed: <decoded rc> ..." and returns
 * KEYX_BACKEND_DOWN (connection lost: closed, reopened on next use) or 0 (the TPM refused). */
int tpm_fail(tpm_dev *d, TSS2_RC rc, const char *what);
/* 1 if rc is a TPM format-one error with the given error number (e.g. TPM2_RC_ECC_POINT). */
int tpm_rc_is(TSS2_RC rc, TSS2_RC fmt1);

#endif
