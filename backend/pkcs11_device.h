/* The PKCS#11 device layer of the pkcs11 backend: the module (loaded through p11-kit, initialized
 * lazily, re-initialized in a forked child and, at most once a second, when a token it needs is
 * not in the module's slot list), the tokens of the failover set (`pkcs11-token`),
 * login, a pool of sessions per token for concurrent threads, and what each token's mechanisms
 * allow. Key operations (backend/pkcs11.c) borrow a session, run their Cryptoki calls, give it
 * back. */
#ifndef KEYX_BACKEND_PKCS11_DEVICE_H
#define KEYX_BACKEND_PKCS11_DEVICE_H

#include <stddef.h>
#include <stdint.h>

#include <p11-kit/pkcs11.h>
#include <p11-kit/uri.h>

#include "backend/backend.h"

struct keyx_provctx;

typedef struct p11_dev p11_dev;

/* What a token can do, from C_GetMechanismList / C_GetMechanismInfo. */
typedef struct p11_caps {
    int ec;        /* CKM_EC_KEY_PAIR_GEN and CKM_ECDH1_DERIVE */
    size_t ec_max; /* largest EC key in bits the token generates (521 covers P-521) */
    size_t ec_min;
    int dh; /* CKM_DH_PKCS_KEY_PAIR_GEN and CKM_DH_PKCS_DERIVE */
    size_t dh_max;
    size_t dh_min;
    int montgomery; /* CKM_EC_MONTGOMERY_KEY_PAIR_GEN (X25519/X448) and ECDH1 */
    int rsa;        /* CKM_RSA_PKCS_KEY_PAIR_GEN and (CKM_RSA_PKCS_OAEP or CKM_RSA_X_509) */
    size_t rsa_max; /* modulus bits */
    size_t rsa_min;
    /* Signing, per keyx_sig_scheme (CKM_ECDSA, CKM_RSA_PKCS, CKM_RSA_PKCS_PSS with CKF_SIGN):
     * read once per token with the rest, so that sign_check costs no Cryptoki call. */
    struct {
        int ok;
        size_t min, max; /* key bits (EC: order bits), 0: no limit given */
    } sign[3];
} p11_caps;

/* A session borrowed from a token's pool. */
typedef struct p11_sess {
    p11_dev *dev;
    CK_FUNCTION_LIST *f;
    CK_SESSION_HANDLE h;
    int tok;      /* index of the token in the failover set */
    uint64_t gen; /* module generation (changes when the module is re-initialized) */
} p11_sess;

/* Reads the configuration; touches no device (the module is loaded on first use). */
int p11_dev_new(struct keyx_provctx *p, p11_dev **out);
void p11_dev_free(p11_dev *d);
struct keyx_provctx *p11_dev_prov(const p11_dev *d);
/* The module and the failover set's tokens as last seen, without a module call and without
 * waiting for the lock (backend.h's describe): "module '...' not loaded yet", "module '...'
 * loaded; token 'keyx': ready (logged in)". Never a PIN. */
void p11_dev_describe(p11_dev *d, char *buf, size_t len);

/* Capabilities of the token that serves new keys. 0 when no token can be reached (no error). */
int p11_dev_caps(p11_dev *d, p11_caps *caps);

/* A logged-in session on token tok, or on the first usable token of the failover set when
 * tok < 0 (failing over, with an audit event, past tokens that are down). Returns 1, 0 (error
 * raised: wrong PIN, unknown token, bad module) or KEYX_BACKEND_DOWN (no token reachable). */
int p11_session_get(p11_dev *d, int tok, p11_sess *s);
/* As p11_session_get, for reading public objects (public keys, certificates): logged in when
 * pkcs11-pin is set, so that private objects are seen too; else not logged in, and no error
 * for the missing PIN. */
int p11_session_get_public(p11_dev *d, int tok, p11_sess *s);
/* Gives the session back. rv: the last Cryptoki result of the operation; a session or device
 * error closes the session instead of pooling it, and marks the token down. */
void p11_session_put(p11_sess *s, CK_RV rv);

/* 1 if an object made under generation gen on token tok is still valid (no fork/re-init since). */
int p11_dev_current(p11_dev *d, uint64_t gen);
/* Counts the session objects keyx made (ephemeral and imported keys) under generation gen: +1
 * when one is made, -1 when it is freed. While any lives, a missing key token does not make the
 * module re-initialize (that would destroy them); a failover set with no token left still does. */
void p11_dev_objects(p11_dev *d, uint64_t gen, int delta);
/* OAEP parameter sets (a bit per digest pair, see pkcs11_rsa.c) token tok refused. */
int p11_dev_oaep_refused(p11_dev *d, int tok, int bit);
void p11_dev_oaep_refuse(p11_dev *d, int tok, int bit);
/* Capabilities of token tok (the token a key lives on). 0 when they were never read. */
int p11_dev_token_caps(p11_dev *d, int tok, p11_caps *caps);
/* RSA-PSS parameter sets (a bit per digest pair, see pkcs11_sign.c) token tok was seen to take
 * (1) or refuse (-1) in C_SignInit; 0: not tried yet. */
int p11_dev_pss_state(p11_dev *d, int tok, int bit);
void p11_dev_pss_note(p11_dev *d, int tok, int bit, int ok);
/* Number of tokens in the failover set (pkcs11-token; 1 when it is unset). */
int p11_dev_set_size(const p11_dev *d);
/* 1 once the module opened a stream socket in C_Initialize (p11-kit's RPC client, a network
 * HSM's module): its calls wait on a server, and pkcs11-timeout applies to them. */
int p11_dev_over_socket(p11_dev *d);

/* Token indexes whose token info matches uri, in failover-set order first and then any other
 * token of the module, into out (at most max). Returns how many; -1 with an error raised when
 * the module cannot be used; KEYX_BACKEND_DOWN if the device is down. */
int p11_dev_find_tokens(p11_dev *d, P11KitUri *uri, int *out, int max);
/* "keyx" (the token label) for messages. */
const char *p11_dev_token_label(p11_dev *d, int tok);

/* The label and serial number of token tok as its token info gives them (blanks trimmed), for
 * locators. 0 when the token was never found. */
int p11_dev_token_name(p11_dev *d, int tok, char label[33], char serial[17]);

/* 1 if rv means the device, token or session is gone or broken (not the request). */
int p11_rv_is_down(CK_RV rv);
/* "CKR_PIN_INCORRECT" or "CKR_0x000000A0". buf has at least 24 bytes. */
const char *p11_rv_name(CK_RV rv, char *buf, size_t len);
/* Raises KEYX_R_BACKEND_FAILURE (or UNAVAILABLE for device errors): "pkcs11: WHAT on token
 * 'LABEL' failed: CKR_..." and returns KEYX_BACKEND_DOWN for device errors, else 0. */
int p11_fail(p11_sess *s, CK_RV rv, const char *what);

#endif
