/* Routing: keys keyx generates go to the first configured backend that supports them. */
#ifndef KEYX_BACKEND_ROUTER_H
#define KEYX_BACKEND_ROUTER_H

#include "backend/backend.h"
#include "provider/config.h"

typedef struct keyx_router keyx_router;

/* Opens every backend named in p->cfg.backends, in order. 0 with an error raised on failure. */
int keyx_router_new(struct keyx_provctx *p, keyx_router **out);
void keyx_router_free(keyx_router *r);

/* Generates a key pair in the first configured backend that supports spec and is not marked
 * down. A backend whose device is down (KEYX_BACKEND_DOWN) is marked down for a few seconds and
 * the next one serves (a `failover` audit event). *used: the backend that made the key, or the
 * last one tried (NULL if none supports spec). 0 with an error raised on failure. */
int keyx_router_generate(keyx_router *r, const keyx_keyspec *spec, keyx_backend **used,
                         void **handle, EVP_PKEY **pub);
/* The instance of backend kind: the configured one, else one opened now for static keys (a key
 * loaded by URI stays in its own backend even when routing does not list it). NULL + error. */
keyx_backend *keyx_router_backend(keyx_router *r, keyx_backend_kind kind);
/* 1 if some configured backend supports spec (no error raised): drives TLS-GROUP. */
int keyx_router_offers(keyx_router *r, const keyx_keyspec *spec);
/* The keyx_backend_kind of the first configured backend that supports spec, where its new keys go
 * while every backend answers; -1 if none (no error raised). */
int keyx_router_first_for(keyx_router *r, const keyx_keyspec *spec);
/* Holder of keys whose private part the application handed over in memory (imports):
 * that material is already in software, so keeping it there is no fallback. */
keyx_backend *keyx_router_software(keyx_router *r);

/* Records the error on top of the queue as be's last device failure (after a backend call
 * returned KEYX_BACKEND_DOWN). r may be NULL (keyx is still opening its backends). */
void keyx_router_note_down(keyx_router *r, const keyx_backend *be);
/* The state of backend kind as keyx knows it without asking the device, for a person to read:
 * the backend's own description (connected, module loaded, ...), whether routing passes it over
 * for new keys and until when, its last device failure. 0 when no instance of kind is open
 * (buf untouched). Never waits for a lock held across a device call. */
int keyx_router_describe(keyx_router *r, keyx_backend_kind kind, char *buf, size_t len);

#endif
