/* The key reference file: where a hardware key lives and its public key, never private material.
 *
 *   KeyxKeyReference ::= SEQUENCE {
 *       version    INTEGER (1),
 *       backend    UTF8String,            -- "tpm" or "pkcs11"
 *       locator    UTF8String,            -- what the backend's load() takes: "handle=0x81000010",
 *                                         -- "pkcs11:token=...;id=%01;type=private"
 *       publicKey  SubjectPublicKeyInfo } -- checked against the key found at load time
 *
 * PEM name "KEYX KEY". */
#ifndef KEYX_ENCODE_KEYREF_H
#define KEYX_ENCODE_KEYREF_H

#include <stddef.h>

#define KEYX_KEYREF_PEM_NAME "KEYX KEY"
/* The decoder structure name of its DER */
#define KEYX_KEYREF_STRUCTURE "keyx"

typedef struct keyx_keyref {
    char *backend;
    char *locator;
    unsigned char *spki; /* DER SubjectPublicKeyInfo */
    size_t spkilen;
} keyx_keyref;

/* DER of r in *der (OPENSSL_malloc'ed); 0 on allocation failure. */
int keyx_keyref_to_der(const keyx_keyref *r, unsigned char **der, size_t *len);
/* 1 and r filled when der is exactly one KeyxKeyReference; 0 otherwise (nothing raised: the
 * input may be some other key format). */
int keyx_keyref_from_der(const unsigned char *der, size_t len, keyx_keyref *r);
void keyx_keyref_clear(keyx_keyref *r);
/* 1 when der is exactly one KeyxKeyReference; 0 otherwise, with nothing raised (a decoder asking
 * this of other key formats). */
int keyx_keyref_is_reference(const unsigned char *der, size_t len);

#endif
