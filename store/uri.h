/* keyx's URIs: which backend a URI names, and the locator that backend understands. */
#ifndef KEYX_STORE_URI_H
#define KEYX_STORE_URI_H

#include "provider/config.h"

typedef struct keyx_store_uri {
    keyx_backend_kind backend;
    char *locator; /* pkcs11: the whole "pkcs11:..." URI; tpm: what follows "keyx:tpm:" */
    /* The kinds of object (KEYX_OBJ_* of backend/backend.h) the URI can name: pkcs11's type=
     * (private, public, cert; 0 for secret-key and data), every kind without it; a tpm locator
     * names a key pair (private and public key). */
    int kinds;
} keyx_store_uri;

/* "pkcs11:...", "keyx:pkcs11:...", "keyx:tpm:LOCATOR". 0 with an error naming the accepted
 * forms when uri is none of them. */
int keyx_store_uri_parse(struct keyx_provctx *p, const char *uri, keyx_store_uri *out);
void keyx_store_uri_clear(keyx_store_uri *u);
/* 1 if a pkcs11 URI names an object (object= or id= in its path), so that finding no key is an
 * error; 0 for a collection ("pkcs11:token=keyx": every key of the token). tpm locators always
 * name one key. */
int keyx_store_uri_names_object(const keyx_store_uri *u);

#endif
