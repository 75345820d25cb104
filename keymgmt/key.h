/* keyx key objects: the keydata behind every keyx EVP_PKEY. */
#ifndef KEYX_KEYMGMT_KEY_H
#define KEYX_KEYMGMT_KEY_H

#include <stddef.h>

#include <openssl/core.h>
#include <openssl/types.h>

#include "backend/backend.h"
#include "provider/provctx.h"

/* The private part held by a backend; shared (refcounted) between duplicates of a key. */
typedef struct keyx_priv keyx_priv;

typedef struct keyx_key {
    keyx_provctx *prov;
    keyx_alg alg;
    /* Public view in keyx's libctx: domain parameters and public key (for software keys, the
     * complete key). NULL for an empty key, and for a key a backend generated without one (an
     * X25519/X448 key known by ecx_pub, an EC key by domain and ec_point) until something needs
     * the view: read it with keyx_key_pub(). */
    EVP_PKEY *view;
    /* EC keys without a view yet: the named group's shared parameters (a reference), which
     * answer the group's sizes; NULL otherwise */
    EVP_PKEY *domain;
    keyx_priv *priv; /* NULL for public keys and domain parameters */
    int has_params;
    int has_public;
    int public_checked; /* a full public-key check has passed: set_peer need not repeat it */
    char group[64];     /* canonical group name, "" when none or explicit */
    /* X25519/X448: the raw public key (has_public), as the view holds it or, before the view
     * is made, the key itself: the peer check, derives and parameters need no view */
    unsigned char ecx_pub[56];
    size_t ecx_publen;
    /* EC: the uncompressed point the application set (keyx_km_set_params: libssl's peer key
     * shares) or the backend generated, which backends that take the point's bytes use instead
     * of exporting it from the view; 0: not known */
    unsigned char ec_point[1 + 2 * 66];
    size_t ec_pointlen;
    char id[17]; /* audit key id, set with the private part when audit or debug is on */
} keyx_key;

keyx_key *keyx_key_new(keyx_provctx *p, keyx_alg alg);
void keyx_key_free(keyx_key *k);
/* Replaces the public view (takes ownership of pub) and refreshes the derived fields. */
int keyx_key_set_pub(keyx_key *k, EVP_PKEY *pub);
/* A key known by its raw public key, its view made when first needed: X25519/X448 (domain NULL,
 * 32/56 bytes), or EC on named group `group` (keyx's name) whose parameters are domain (a
 * reference is taken), pub its uncompressed point. 0 with an error for another length. */
int keyx_key_set_raw(keyx_key *k, const char *group, EVP_PKEY *domain, const unsigned char *pub,
                     size_t len);
/* The public view, made now if the key has none yet; NULL for an empty key (or with an error
 * when it cannot be made). The view is made once and then never changes. */
EVP_PKEY *keyx_key_pub(const keyx_key *k);
/* 1 for a key with neither parameters nor a public key (nothing set or generated yet). */
int keyx_key_is_empty(const keyx_key *k);
/* Attaches a private part produced by backend be (ownership of handle moves to the key). */
int keyx_key_attach(keyx_key *k, keyx_backend *be, void *handle, int ephemeral);
/* A static key a backend loaded (by locator or from an encoded form): takes over handle and pub
 * (freed on failure), writes the load event. NULL + error when keyx does not serve its type. */
keyx_key *keyx_key_adopt(keyx_provctx *p, keyx_backend *be, void *handle, EVP_PKEY *pub);
/* Hands k to OpenSSL by reference through a STORE or DECODER object callback (keyx's keymgmt
 * load() takes it over); k is freed if OpenSSL did not take it. The callback's result. */
int keyx_key_pass(keyx_key *k, OSSL_CALLBACK *cb, void *cbarg);

/* For a decoder whose file is keyx's but whose key cannot be had (the reason already raised):
 * hands OpenSSL a reference that keyx's load() refuses. OpenSSL counts a failed load as a hard
 * error, so OSSL_STORE (openssl -in/-key, SSL_CTX_use_PrivateKey_file) keeps keyx's errors
 * instead of trying other decoders and printing only "unsupported". Returns 0 for the decoder. */
int keyx_key_pass_refused(keyx_alg alg, OSSL_CALLBACK *cb, void *cbarg);
int keyx_key_has_private(const keyx_key *k);
/* 0 for hardware keys: their private part must never be exported. */
int keyx_key_exports_private(const keyx_key *k);
/* Duplicate with the same private part (shared) and a copy of the public view. */
keyx_key *keyx_key_dup(const keyx_key *k, int selection);

/* keyx's name for an OpenSSL group name: "prime256v1" -> "P-256"; others unchanged. */
const char *keyx_group_canonical(const char *name);
/* 1 for keyx's named curves P-256/384/521: prime order, cofactor 1. */
int keyx_group_prime_order(const char *group);
/* Audit/debug event about this key (keygen, load, ...); no-op when both are off. */
void keyx_key_event(keyx_key *k, const char *event, int ok, const char *error);
const char *keyx_key_backend_name(const keyx_key *k);
/* Where k's private part lives, as its backend's load() takes it back (key reference files):
 * *out OPENSSL_malloc'ed. 0 with an error for keys no locator names (ephemeral, software). */
int keyx_key_locator(keyx_key *k, char **out);
/* Bytes of a shared secret with this key's group (EC: field size, X25519 32, X448 56, DH |p|). */
size_t keyx_key_secret_size(const keyx_key *k);
/* Peer has our group and a valid public key; raises KEYX_R_KEY_MISMATCH / INVALID_PEER_KEY. */
int keyx_key_check_peer(keyx_key *k, keyx_key *peer);
/* Full-size shared secret (outlen == keyx_key_secret_size) computed in k's backend; counts the
 * use against ephemeral-max-uses and writes the derive event. */
int keyx_key_derive(keyx_key *k, keyx_key *peer, unsigned char *out, size_t outlen);
/* The same, for a DH that is part of another operation: event names its audit event
 * (encapsulate, decapsulate). */
int keyx_key_derive_as(keyx_key *k, keyx_key *peer, const char *event, unsigned char *out,
                       size_t outlen);

/* RSA private-key operation in k's backend (asym cipher decrypt, KEM decapsulate; event names
 * the audit event). Counts the use against ephemeral-max-uses. 1 done; 0 with an error raised.
 * A ciphertext that does not decrypt raises one and the same error whatever the cause. */
int keyx_key_decrypt(keyx_key *k, const char *event, const keyx_rsa_op *op, const unsigned char *in,
                     size_t inlen, unsigned char *out, size_t *outlen);

/* Signing with k's private part in its backend (signature/): sign_check before any data (no
 * audit event), sign per signature (counted, `sign` audit event). 1, or 0 with an error. */
int keyx_key_sign_check(keyx_key *k, const keyx_sign_op *op);
int keyx_key_sign(keyx_key *k, const keyx_sign_op *op, const unsigned char *dgst, size_t dlen,
                  unsigned char *sig, size_t *siglen);

#endif
