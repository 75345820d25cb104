/* Routing: keys keyx generates go to the first configured backend that supports them. */
#ifndef KEYX_BACKEND_ROUTER_H
#define KEYX_BACKEND_ROUTER_H

#include "backend/backend.h"

typedef struct keyx_router keyx_router;

/* Opens every backend named in p->cfg.backends, in order. 0 with an error raised on failure. */
int keyx_router_new(struct keyx_provctx *p, keyx_router **out);
void keyx_router_free(keyx_router *r);

/* First configured backend that supports spec; NULL with KEYX_R_UNSUPPORTED raised if none. */
keyx_backend *keyx_router_pick(keyx_router *r, const keyx_keyspec *spec);
/* 1 if some configured backend supports spec (no error raised): drives TLS-GROUP. */
int keyx_router_offers(keyx_router *r, const keyx_keyspec *spec);
/* Holder of keys whose private part the application handed over in memory (imports):
 * that material is already in software, so keeping it there is no fallback. */
keyx_backend *keyx_router_software(keyx_router *r);

#endif
