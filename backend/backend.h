/* The backend contract: the only thing keymgmt, exchange, wrap and store know about a backend.
 * A backend is one file that fills a keyx_backend_ops table. Keys cross the contract as a
 * backend-owned handle (the private part) plus an EVP_PKEY in keyx's own library context that
 * holds the public key and domain parameters. */
#ifndef KEYX_BACKEND_BACKEND_H
#define KEYX_BACKEND_BACKEND_H

#include <stddef.h>

#include <openssl/core.h>
#include <openssl/types.h>

struct keyx_provctx;

typedef enum keyx_alg {
    KEYX_ALG_EC,
    KEYX_ALG_X25519,
    KEYX_ALG_X448,
    KEYX_ALG_DH,
    KEYX_ALG_RSA,
    KEYX_ALG_DHX, /* X9.42 DH (dhpublicnumber: p, q, g), the DH of CMS and certificates */
    KEYX_ALG_COUNT
} keyx_alg;

/* "EC", "X25519", "X448", "DH", "RSA", "DHX": also the default provider's name for the
 * algorithm. */
const char *keyx_alg_name(keyx_alg alg);
/* EC and DH keys carry domain parameters (a curve, p and g); the others have none. */
int keyx_alg_has_domain(keyx_alg alg);
/* Finite-field DH, PKCS#3 (DH) or X9.42 (DHX): the same exchange and the same device keys; only
 * the encoding of the parameters differs. */
int keyx_alg_is_dh(keyx_alg alg);

/* Where a generated key must live on after the process (openssl genpkey -pkeyopt keyx-persist:,
 * keyx-label:, keyx-id:). Such keys are made for signing too (TLS certificate keys): EC keys
 * sign and derive, RSA keys sign and decrypt, DH keys derive. They are sensitive and never
 * extractable, like every hardware key. */
typedef struct keyx_persist {
    unsigned long tpm_handle; /* tpm: persistent handle 0x81000000..0x81FFFFFF, refused when in
                                 use; 0 for other backends */
    const char *label;        /* pkcs11: CKA_LABEL; NULL: none */
    const unsigned char *id;  /* pkcs11: CKA_ID; NULL: the backend picks a fresh random id */
    size_t idlen;
} keyx_persist;

/* What to generate, or what to ask a backend whether it can serve. */
typedef struct keyx_keyspec {
    keyx_alg alg;
    const char *group; /* "P-256", "P-384", "P-521", "X25519", "X448", "ffdhe2048".."ffdhe8192";
                          NULL for explicit DH parameters and for RSA */
    EVP_PKEY *domain;  /* EC and DH: domain parameters in keyx's libctx; else NULL */
    size_t bits;       /* RSA modulus bits; DH prime bits; else 0 */
    const OSSL_PARAM *params;    /* the application's further generation parameters (RSA e, ...) */
    const keyx_persist *persist; /* NULL: an ephemeral key (freed with its last reference) */
} keyx_keyspec;

/* Key import (EVP_PKEY_fromdata) and generation parameter naming the backend that must hold the
 * private key: "software", "tpm" or "pkcs11". Without it, imports stay in software. */
#define KEYX_PARAM_BACKEND "keyx-backend"
/* Generation parameters that make a persistent key (keyx_persist): a TPM handle ("0x81000010"),
 * a PKCS#11 label, a PKCS#11 id in hex ("01", "a1b2"). */
#define KEYX_PARAM_PERSIST "keyx-persist"
#define KEYX_PARAM_LABEL "keyx-label"
#define KEYX_PARAM_ID "keyx-id"

/* The longest raw public key public_raw writes: an uncompressed P-521 point. */
#define KEYX_PUBLIC_RAW_MAX (1 + 2 * 66)

/* Results of generate, import, load and derive: 1 done; 0 failed (an error is raised: bad input,
 * unsupported request, key gone...); KEYX_BACKEND_DOWN: the device itself is unreachable or broken
 * (TPM connection lost, token removed, session/device errors), error raised too. The router then
 * marks the backend down for a while and lets the next configured backend generate (failover). */
#define KEYX_BACKEND_DOWN (-1)

/* RSA private-key operations (wrap/: asym cipher and KEM). */
typedef enum keyx_rsa_pad {
    KEYX_RSA_PAD_OAEP, /* RSAES-OAEP: md, mgf1_md, label */
    KEYX_RSA_PAD_RAW,  /* no padding, output = modulus size, left-padded (RSASVE decapsulation) */
    KEYX_RSA_PAD_TLS   /* libssl's RSA_PKCS1_WITH_TLS_PADDING (constant time, random premaster on
                          failure, never fails on bad padding): software keys only */
} keyx_rsa_pad;

typedef struct keyx_rsa_op {
    keyx_rsa_pad pad;
    const char *md;      /* OAEP digest ("SHA256", ...); NULL: SHA-1 */
    const char *mgf1_md; /* MGF1 digest; NULL: same as md */
    const unsigned char *label;
    size_t labellen;
    unsigned int tls_client_version, tls_alt_version; /* TLS pad only */
} keyx_rsa_op;

/* rsa_decrypt's result when the ciphertext does not decrypt (bad padding, wrong label, value out
 * of range, ...): the backend raises nothing of its own (or the caller drops it) and the caller
 * raises one and the same error whatever the cause, so that failures are no padding oracle.
 * 0 stays for refusals that depend on the parameters only (unsupported digest or label on this
 * device, key gone), with the backend's error raised. */
#define KEYX_RSA_DECRYPT_ERROR (-2)

/* Signatures (signature/): keyx computes the digest in software and the backend signs it. */
typedef enum keyx_sig_scheme {
    KEYX_SIG_ECDSA,     /* signature out: r || s, each as long as the group order, big-endian */
    KEYX_SIG_RSA_PKCS1, /* RSASSA-PKCS1-v1_5: the backend wraps the digest in md's DigestInfo
                           (PKCS#11 CKM_RSA_PKCS) or names md to the device (TPM RSASSA) */
    KEYX_SIG_RSA_PSS    /* RSASSA-PSS with MGF1(mgf1_md) and a salt of saltlen bytes */
} keyx_sig_scheme;

typedef struct keyx_sign_op {
    keyx_sig_scheme scheme;
    const char *md;      /* the digest's algorithm: "SHA256", "SHA384", "SHA512", "SHA1", ... */
    const char *mgf1_md; /* PSS: MGF1 digest (never NULL for PSS: the caller resolves it) */
    int saltlen;         /* PSS: salt bytes (resolved by the caller, >= 0) */
} keyx_sign_op;

/* The peer of a derive: its public view (keyx libctx), and for an EC peer whose public key the
 * application set as an uncompressed point (libssl's key shares), that encoding, as the view
 * holds it (point: NULL when not known). Exporting it from the view costs an affine conversion
 * per derive (tens of thousands of instructions), which hardware backends that take the point's
 * bytes need not pay. For an X25519/X448 peer, point is its raw public key, always set, and the
 * view may be NULL (not made yet) when the deriving backend keeps keys in process memory. */
typedef struct keyx_peer {
    EVP_PKEY *view;
    const unsigned char *point;
    size_t pointlen;
} keyx_peer;

/* Objects a URI names (OSSL_STORE: openssl storeutl, pkey -pubin, x509 -in), as kinds in a
 * mask. */
#define KEYX_OBJ_PRIVATE 1 /* a private key, by reference: its locator */
#define KEYX_OBJ_PUBLIC 2  /* a public key: its DER SubjectPublicKeyInfo */
#define KEYX_OBJ_CERT 4    /* an X.509 certificate: its DER, and its subject name's DER */
#define KEYX_OBJ_ALL (KEYX_OBJ_PRIVATE | KEYX_OBJ_PUBLIC | KEYX_OBJ_CERT)

typedef struct keyx_object {
    int kind;           /* one KEYX_OBJ_* */
    char *locator;      /* KEYX_OBJ_PRIVATE */
    unsigned char *der; /* KEYX_OBJ_PUBLIC, KEYX_OBJ_CERT */
    size_t derlen;
    unsigned char *subject; /* KEYX_OBJ_CERT: DER X.509 Name (CKA_SUBJECT); NULL: unknown */
    size_t subjectlen;
} keyx_object;

/* Frees the n objects of objs and objs itself (backend/call.c). */
void keyx_objects_free(keyx_object *objs, size_t n);

typedef struct keyx_backend_ops {
    const char *name; /* "software", "tpm", "pkcs11": as in `backends` and the audit log */
    /* 1: private parts live in process memory (software): they may be exported, freeing a key
     * destroys it, and no call reaches a device. 0: a device holds them. */
    int exports_private;

    int (*open)(struct keyx_provctx *p, void **state);
    void (*close)(void *state);

    /* 1 if this backend can generate and use keys of spec (spec->domain may be NULL here). */
    int (*supports)(void *state, const keyx_keyspec *spec);
    /* New key pair: *handle is the backend's private part, *pub its public key (keyx libctx).
     * For X25519/X448 and EC on a named group (spec->group and spec->domain set), a backend
     * with public_raw may leave *pub NULL: keyx then takes the raw public key from public_raw
     * and makes the view only when something needs it (a TLS key share never does). */
    int (*generate)(void *state, const keyx_keyspec *spec, void **handle, EVP_PKEY **pub);
    /* Takes a complete key from keyx's libctx (used for imported software keys and tests). */
    int (*import)(void *state, EVP_PKEY *key, void **handle, EVP_PKEY **pub);
    /* Static key by locator, by reference (the private part stays where it is); NULL when the
     * backend has no static keys. Locators: pkcs11 gets the whole "pkcs11:..." URI, tpm gets
     * what follows "keyx:tpm:" ("handle=0x81000002"). Loaded keys are not ephemeral: free()
     * releases keyx's hold on them and never deletes them from the device. */
    int (*load)(void *state, const char *locator, void **handle, EVP_PKEY **pub);
    /* As load(), for a key reference file that recorded the key's public key (recorded, keyx
     * libctx): the backend may make the key without reaching the device, *pub being recorded
     * (up-referenced), and then finds the key and checks its public key against recorded at its
     * first use, refusing every use of a key that differs (tpm: nginx's master loads its
     * certificate key before forking). NULL: load() then a comparison by the caller. */
    int (*load_deferred)(void *state, const char *locator, EVP_PKEY *recorded, void **handle,
                         EVP_PKEY **pub);
    /* Shared secret with peer (already validated, keyx libctx). secretlen is the full size of
     * the secret for the group (DH: length of p); the backend fills exactly that many bytes,
     * left-padded with zeros. An all-zero X25519/X448 result must be refused. */
    int (*derive)(void *state, void *handle, const keyx_peer *peer, unsigned char *secret,
                  size_t secretlen);
    /* The locator of a loaded or persistent key, as load() takes it back and as a key
     * reference file records it: tpm "handle=0x81000010"; pkcs11 a URI naming the token (its
     * label and serial) and the key's id and label ("pkcs11:token=keyx;serial=...;id=%01;
     * object=srv;type=private"), never a PIN. *out is OPENSSL_malloc'ed. 0 with an error for
     * keys no locator can name again (ephemeral keys, keys loaded from a TSS2 file). NULL: the
     * backend has no static keys. */
    int (*locator)(void *state, void *handle, char **out);
    /* Static key from an encoded form other than a locator, by reference: format
     * "TSS2 PRIVATE KEY" (tpm: the DER of a TSS2 key file, loaded under the parent it names).
     * Same results as load(). NULL: the backend reads no such form. */
    int (*load_encoded)(void *state, const char *format, const unsigned char *der, size_t len,
                        void **handle, EVP_PKEY **pub);
    /* The objects locator names (pkcs11: every object an RFC 7512 URI matches, on every token it
     * matches; "pkcs11:token=keyx" is a collection), of the kinds in the mask kinds
     * (KEYX_OBJ_*), private keys first, then public keys, then certificates. Private keys come
     * as locators that load() takes, and only those keyx can use and a locator can name again;
     * public keys as their SubjectPublicKeyInfo, certificates as their DER: neither needs the
     * backend once read. A backend reads public objects and certificates without a login when
     * none is configured (the private keys are then not seen). *out is an OPENSSL_malloc'ed
     * array (keyx_objects_free), *n its length (0 is fine). 1, 0 or KEYX_BACKEND_DOWN with an
     * error raised. NULL: a locator names one key pair (tpm "handle=0x81000002"), whose public
     * key is the one load() gives. */
    int (*objects)(void *state, const char *locator, int kinds, keyx_object **out, size_t *n);
    /* 1 if the key can sign under op, decided before any data is seen (TLS and
     * EVP_DigestSignInit fail fast on digests or PSS settings the device cannot use); 0 with an
     * error naming what is refused and what would work. NULL: this backend signs nothing. */
    int (*sign_check)(void *state, void *handle, const keyx_sign_op *op);
    /* Signs the digest dgst (dlen: op->md's size) under op, after sign_check passed. *siglen
     * in: capacity of sig (at least 2 * order size for ECDSA, the modulus size for RSA); out:
     * the length written (ECDSA: exactly 2 * order size, r and s left-padded). 1, 0 (error
     * raised) or KEYX_BACKEND_DOWN. Audit and use counting are the caller's. */
    int (*sign)(void *state, void *handle, const keyx_sign_op *op, const unsigned char *dgst,
                size_t dlen, unsigned char *sig, size_t *siglen);
    /* What the backend knows of its device without asking it, for keyx's provider parameters
     * (provider/state.h): "not connected yet", "connected", "module failed to load: ...". Called
     * from OSSL_PROVIDER_get_params, so it never calls the device and never waits for a lock
     * held across device calls; never a PIN. NULL: the backend has no device (software). */
    void (*describe)(void *state, char *buf, size_t len);
    /* For a key generate returned without a view: its raw public key (X25519/X448: 32/56
     * bytes; EC: the uncompressed point) into buf (KEYX_PUBLIC_RAW_MAX bytes), and its length
     * (0: none). Answered from the handle, never from the device: called without call.c's
     * guards. NULL: generate always returns a view. */
    size_t (*public_raw)(void *state, void *handle, unsigned char *buf);
    /* Keys in process memory only (exports_private) whose generate may leave *pub NULL: the
     * complete key as an EVP_PKEY in keyx's libctx (a new reference), made when keyx needs the
     * key's view (export, encoders, private-key checks). Hardware keys' views are their public
     * keys, which keyx makes itself. */
    int (*view)(void *state, void *handle, EVP_PKEY **pub);
    /* Destroys the private part (flush, C_DestroyObject, wipe). */
    void (*free)(void *state, void *handle);
    /* RSA private-key decryption of in under op; in is the ciphertext as the application gave
     * it (shorter than the modulus: leading zeros left out; longer: KEYX_RSA_DECRYPT_ERROR).
     * *outlen is in: the capacity of out (at least the modulus size, except for
     * KEYX_RSA_PAD_TLS: 48), out: the plaintext length. Returns 1, 0 (parameters refused,
     * error raised), KEYX_RSA_DECRYPT_ERROR or KEYX_BACKEND_DOWN. NULL: the backend holds no
     * RSA keys (and its supports() says no for RSA). Parameter checks come before anything
     * that depends on the ciphertext. A TPM maps OAEP to TPM2_RSA_Decrypt with TPM2_ALG_OAEP,
     * the hash and the label where it can (MGF1 with the OAEP hash, a label ending in a zero
     * byte), otherwise, for keys without a scheme of their own, to TPM2_ALG_NULL and OAEP
     * decoding in keyx (keys with an OAEP scheme: a parameter refusal); RAW to TPM2_ALG_NULL. */
    int (*rsa_decrypt)(void *state, void *handle, const keyx_rsa_op *op, const unsigned char *in,
                       size_t inlen, unsigned char *out, size_t *outlen);
    /* The time limit of one call into the device, in milliseconds, enforced by cutting the
     * socket the call waits on (backend/watchdog.h); 0: none. NULL: the device is not behind a
     * socket keyx can cut, or bounds its waits itself (the TPM: tpm-timeout). */
    unsigned int (*call_limit_ms)(void *state);
} keyx_backend_ops;

extern const keyx_backend_ops keyx_software_backend;
#ifdef KEYX_HAVE_TPM
extern const keyx_backend_ops keyx_tpm_backend;
#endif
#ifdef KEYX_HAVE_PKCS11
extern const keyx_backend_ops keyx_pkcs11_backend;
#endif

/* A configured backend instance. */
typedef struct keyx_backend {
    const keyx_backend_ops *ops;
    void *state;
    struct keyx_provctx *prov;
} keyx_backend;

#endif
