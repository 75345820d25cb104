/* Signatures in the pkcs11 backend (certificate keys on a token): keyx computes the digest in
 * software and the token signs it: CKM_ECDSA (r || s), CKM_RSA_PKCS over DigestInfo || digest,
 * CKM_RSA_PKCS_PSS with CK_RSA_PKCS_PSS_PARAMS. backend/pkcs11.c calls these for keys that carry
 * CKA_SIGN; sessions come from and go back to backend/pkcs11_device.c. */
#ifndef KEYX_BACKEND_PKCS11_SIGN_H
#define KEYX_BACKEND_PKCS11_SIGN_H

#include "backend/backend.h"
#include "backend/pkcs11_device.h"

struct p11_md;

/* One signature request, resolved against what the key's token can do. */
typedef struct p11_sig {
    keyx_sig_scheme scheme;
    CK_MECHANISM_TYPE mech;
    CK_RSA_PKCS_PSS_PARAMS pss;
    const struct p11_md *md; /* RSA: the digest; ECDSA: NULL (any digest goes) */
    const char *md_name;     /* as the caller named it, for messages */
    const char *mgf1_name;
    size_t size; /* ECDSA: group order bytes; RSA: modulus bytes */
    int pair;    /* PSS: the (digest, MGF1 digest) parameter set's bit; else -1 */
    int tok;
} p11_sig;

/* p11_sig_prepare's answer when all is known but whether the token takes this PSS parameter
 * set: one trial (p11_sig_probe) settles it for the token, for good. */
#define P11_SIG_PROBE 2

/* Checks op for a key of alg on token tok (size: order bytes for EC, modulus bytes for RSA;
 * bits: modulus bits for RSA) against the token's cached capabilities only (no Cryptoki call)
 * and fills *out. 1, 0 with an error naming what is refused and what would work, or
 * P11_SIG_PROBE. */
int p11_sig_prepare(p11_dev *d, int tok, keyx_alg alg, size_t size, size_t bits,
                    const keyx_sign_op *op, p11_sig *out);

/* One C_SignInit (and a C_Sign of a zero digest to end it) with the PSS parameters of g on
 * key obj; the token's answer is remembered. Gives the session back; 1, 0 (refused, error
 * raised) or KEYX_BACKEND_DOWN. */
int p11_sig_probe(p11_sess *s, CK_OBJECT_HANDLE obj, const p11_sig *g);

/* The contract's sign() for the private key obj after p11_sig_prepare filled g. Gives the
 * session back; 1, 0 or KEYX_BACKEND_DOWN with an error raised. */
int p11_sig_sign(p11_sess *s, CK_OBJECT_HANDLE obj, const p11_sig *g, const unsigned char *dgst,
                 size_t dlen, unsigned char *sig, size_t *siglen);

#endif
