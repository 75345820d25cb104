/* Pools of pre-generated ephemeral keys (`tpm-pool`, `pkcs11-pool`): per backend and named group a
 * bounded queue of ready key pairs, refilled by one thread per backend off the handshake path.
 * Backend-independent: a backend hands its own generate/check/free functions in. The thread is
 * started at the first ephemeral generation of a pooled group, never at provider load (a forking
 * server's master owns no thread and no keys before it forks); a forked child starts empty. */
#ifndef KEYX_BACKEND_POOL_H
#define KEYX_BACKEND_POOL_H

#include "backend/backend.h"

struct keyx_provctx;
typedef struct keyx_pool keyx_pool;

typedef struct keyx_pool_ops {
    /* Makes one ephemeral key of spec (spec->persist is NULL), as generate() does: 1, 0 or
     * KEYX_BACKEND_DOWN (errors raised; the refill thread drops them). One device-lock
     * acquisition per call: a handshake waits behind one key at most. */
    int (*make)(void *state, const keyx_keyspec *spec, void **handle, EVP_PKEY **pub);
    /* 1 if a pooled key may still be handed out: made on the device's current connection or
     * module generation (not before a TPM restart, token removal or re-initialization). Called
     * once per key leaving the pool, without the pool's lock held: it may reach the device (tpm
     * loads the key back into the TPM here). */
    int (*usable)(void *state, void *handle);
    /* Destroys a key that is never handed out (backend free(): flush, C_DestroyObject). */
    void (*destroy)(void *state, void *handle);
} keyx_pool_ops;

/* A pool of size keys per group for the backend instance state (name: "tpm", "pkcs11", for the
 * debug trace). size 0: NULL (no pool). Starts nothing. */
keyx_pool *keyx_pool_new(struct keyx_provctx *p, const char *name, unsigned int size,
                         const keyx_pool_ops *ops, void *state);
/* The pool of backend instance state; NULL: none. */
keyx_pool *keyx_pool_of(const void *state);
/* An ephemeral key of spec from the pool: 1 with *handle and *pub (removed from the pool under
 * its lock: never handed out twice), and the refill thread is woken; 0 when the pool has no
 * usable key of that group (or spec is not poolable: persistent, explicit DH parameters, RSA):
 * the caller generates inline, never waiting for the thread, then calls keyx_pool_kick. Keys
 * made before a reconnect (usable() says no) or before a fork are destroyed, never handed out.
 * Raises no error. */
int keyx_pool_take(keyx_pool *pl, const keyx_keyspec *spec, void **handle, EVP_PKEY **pub);
/* After an inline generation of a pooled group succeeded (the device is loaded and up): starts
 * the refill thread if it is not running in this process, and wakes it. */
void keyx_pool_kick(keyx_pool *pl);
/* Stops and joins the refill thread, then destroys every pooled key. NULL is fine. */
void keyx_pool_free(keyx_pool *pl);

#endif
