/* keyx's own salted HMAC session for TPM2_ECDH_ZGen, TPM2_RSA_Decrypt and TPM2_Sign. ESYS
 * (tpm2-tss 3.2) computes session HMACs and parameter encryption by creating a new OpenSSL library
 * context for every hash, which costs milliseconds per command; keyx computes the same values
 * (TPM 2.0 Part 1, 19.6 and 21) in its own library context with algorithms fetched once, and sends
 * the command through the ESYS context's SAPI. The session is salted with the storage parent (ECC),
 * so only this TPM knows the session key, and the Z point comes back encrypted (AES-128-CFB) with
 * an HMAC that keyx verifies before using it. */
#ifndef KEYX_BACKEND_TPM2_SESSION_H
#define KEYX_BACKEND_TPM2_SESSION_H

#include <openssl/types.h>
#include <tss2/tss2_esys.h>

typedef struct tpm_fsess {
    TPM2_HANDLE handle; /* 0: no session */
    unsigned char key[32];
    TPM2B_NONCE nonce_tpm;
    OSSL_LIB_CTX *libctx;
    EVP_MD *sha256;
    EVP_MAC *hmac;
    EVP_CIPHER *aes;
    /* HMAC-SHA256 keyed with key, made when the session starts and duplicated for each of a
     * command's HMACs: no digest fetch and no key schedule per HMAC. NULL: no session. */
    EVP_MAC_CTX *keyed;
} tpm_fsess;

/* Fetches the algorithms (once). 0 if libctx lacks them. */
int tpm_fsess_init(tpm_fsess *s, OSSL_LIB_CTX *libctx);
void tpm_fsess_cleanup(tpm_fsess *s);

/* Starts the session salted with parent (an ECC P-256 decrypt key with SHA-256 name). Returns
 * 1; 0 with *rc = TSS2_RC_SUCCESS when the parent cannot salt it this way (use ESYS instead);
 * 0 with *rc set on a TPM or TSS error. */
int tpm_fsess_start(tpm_fsess *s, ESYS_CONTEXT *ectx, ESYS_TR parent, TSS2_RC *rc);
/* Forgets the session (after a reconnect it no longer exists). */
void tpm_fsess_forget(tpm_fsess *s);
/* Flushes it from the TPM. */
void tpm_fsess_flush(tpm_fsess *s, ESYS_CONTEXT *ectx);

/* The TPM name of an object with a SHA-256 name algorithm (computed in keyx's library context:
 * ESYS computes names with a new library context each time). 0 for other name algorithms. */
int tpm_fsess_name(tpm_fsess *s, const TPMT_PUBLIC *pub, TPM2B_NAME *name);

/* ECDH_ZGen with key (whose TPM name is name) authorized by the session and outPoint encrypted.
 * Returns the TPM/TSS result; TSS2_ESYS_RC_RSP_AUTH_FAILED when the response HMAC does not
 * verify. */
TSS2_RC tpm_fsess_zgen(tpm_fsess *s, ESYS_CONTEXT *ectx, ESYS_TR key, const TPM2B_NAME *name,
                       const TPM2B_ECC_POINT *in, TPM2B_ECC_POINT *out);
/* TPM2_RSA_Decrypt the same way: message comes back encrypted in the session. */
TSS2_RC tpm_fsess_rsa_decrypt(tpm_fsess *s, ESYS_CONTEXT *ectx, ESYS_TR key, const TPM2B_NAME *name,
                              const TPM2B_PUBLIC_KEY_RSA *in, const TPMT_RSA_DECRYPT *scheme,
                              const TPM2B_DATA *label, TPM2B_PUBLIC_KEY_RSA *out);

/* TPM2_Sign of digest with key under scheme, validation ticket TPM2_ST_HASHCHECK/TPM2_RH_NULL,
 * authorized by the session (no parameter encryption: the signature is no secret). */
TSS2_RC tpm_fsess_sign(tpm_fsess *s, ESYS_CONTEXT *ectx, ESYS_TR key, const TPM2B_NAME *name,
                       const TPM2B_DIGEST *digest, const TPMT_SIG_SCHEME *scheme,
                       TPMT_SIGNATURE *out);

/* TPM2_CreatePrimary in hierarchy (empty authorization), authorized by the session: a TPM that
 * was reset since the session started refuses it (the session is gone) instead of making a key
 * the next command cannot use. */
TSS2_RC tpm_fsess_create_primary(tpm_fsess *s, ESYS_CONTEXT *ectx, TPM2_HANDLE hierarchy,
                                 const TPM2B_PUBLIC *inpub, TPM2_HANDLE *handle,
                                 TPM2B_PUBLIC *outpub, TPM2B_NAME *name);

#endif
