/* keyx-bench: shared declarations of the benchmark program (see keyx-bench.c for the method).
 * evp.c holds the EVP operations (the libssl pattern, keygen+derive, peers); cryptoki.c holds the
 * raw Cryptoki calls the PKCS#11 figures are compared with; esys.c the raw ESYS calls the TPM
 * figures are compared with. */
#ifndef KEYX_BENCH_H
#define KEYX_BENCH_H

#include <stddef.h>

#include <openssl/evp.h>
#include <openssl/opensslv.h>

/* One key-exchange algorithm as libssl names it (TLS-GROUP internal name). */
typedef struct bench_alg {
    const char *name;    /* row label: P-256, X25519, ffdhe2048 */
    const char *keytype; /* EVP key type: EC, X25519, DH */
    const char *group;   /* group name libssl sets: prime256v1, X25519, ffdhe2048 */
    size_t secretlen;    /* shared secret bytes */
} bench_alg;

/* Peers: key pairs made once by the default provider; their encoded public keys are what a TLS
 * peer sends, imported afresh for every operation as libssl does. */
typedef struct bench_peers {
    const bench_alg *alg;
    size_t n;
    EVP_PKEY **priv;     /* in the default provider's libctx, for cross-checks */
    unsigned char **pub; /* encoded public keys (EC point, X25519 u, DH y padded to |p|) */
    size_t *publen;
} bench_peers;

/* RSA-OAEP decrypt: a pool of ciphertexts, each a random BENCH_WRAPPED_LEN-byte key encrypted
 * once by the default provider with the cell's public key; the plaintext of the first is kept
 * for the cross-check. */
#define BENCH_WRAPPED_LEN 32
typedef struct bench_ct_pool {
    size_t n;
    unsigned char **ct;
    size_t ctlen;
    unsigned char pt0[BENCH_WRAPPED_LEN];
} bench_ct_pool;

/* ---- evp.c ---- */
int bench_peers_make(bench_peers *pp, OSSL_LIB_CTX *deflt, const bench_alg *alg, size_t n);
void bench_peers_free(bench_peers *pp);
/* Key with the group's parameters and the given encoded public key, made in libctx L the way
 * libssl makes a peer's key share (paramgen with the group, then the encoded public key). */
/* Peers imported into this library context are made by its default provider (tpm2-openssl's
 * EC paramgen would make a TPM object per peer: out of object slots at once). */
extern OSSL_LIB_CTX *bench_peer_in_default;
EVP_PKEY *bench_pub_import(OSSL_LIB_CTX *L, const bench_alg *alg, const unsigned char *pub,
                           size_t publen);
/* EVP_PKEY_keygen in L for the group (libssl's ssl_generate_pkey_group). */
EVP_PKEY *bench_keygen(OSSL_LIB_CTX *L, const bench_alg *alg);
/* 1 (libssl's behaviour): EVP_PKEY_derive_set_peer validates the peer (EVP_PKEY_public_check);
 * 0: --no-peer-validation, a diagnostic that shows what validation costs. */
extern int bench_validate_peer;
/* libssl's ssl_derive: new context from own, set peer, size query, derive into out (secretlen). */
int bench_derive(OSSL_LIB_CTX *L, EVP_PKEY *own, EVP_PKEY *peer, unsigned char *out,
                 size_t *outlen);
/* One libssl-pattern derive of own (in L) with peer i of the pool: import it, derive, free. */
int bench_derive_fresh_peer(OSSL_LIB_CTX *L, EVP_PKEY *own, bench_peers *pp, size_t i);
/* Cross-check: own (any libctx) derives with pool peer 0 the same secret as the default
 * provider derives from that peer's private key and own's public key. 1 equal, 0 not/error. */
int bench_check_against_default(OSSL_LIB_CTX *L, OSSL_LIB_CTX *deflt, EVP_PKEY *own,
                                bench_peers *pp);
/* Same, for a secret computed elsewhere (raw Cryptoki) from pool peer 0 by a key whose encoded
 * public key is pub. */
int bench_check_secret(OSSL_LIB_CTX *deflt, bench_peers *pp, const unsigned char *pub,
                       size_t publen, const unsigned char *secret, size_t secretlen);
/* The name of the provider serving key k ("keyx", "default", ...). */
const char *bench_provider_of(const EVP_PKEY *k);
/* EVP_PKEY_get1_encoded_public_key (what libssl sends), with a fallback for providers that answer
 * only with a buffer (tpm2-openssl). 0 on failure. */
size_t bench_encoded_pub(EVP_PKEY *k, unsigned char **pub);
void bench_print_errors(const char *what);

/* RSA-OAEP (evp.c). md names both the OAEP and the MGF1 digest; no label. */
EVP_PKEY *bench_rsa_keygen(OSSL_LIB_CTX *L, unsigned int bits);
/* One signature of a SHA-256 digest as an application makes it: new EVP_PKEY_CTX from the key,
 * EVP_PKEY_sign_init, digest SHA-256 (and for pss: PSS padding, salt = digest length), sign. */
int bench_sign(OSSL_LIB_CTX *L, EVP_PKEY *k, int pss, const unsigned char *dgst, size_t dlen,
               unsigned char *sig, size_t *siglen);
/* The default provider's verdict on sig (DER for ECDSA); rs_len > 0: sig is r || s of rs_len
 * bytes (raw Cryptoki's ECDSA) and is converted to DER first. */
int bench_verify(OSSL_LIB_CTX *deflt, EVP_PKEY *pub, int pss, const unsigned char *dgst,
                 size_t dlen, const unsigned char *sig, size_t siglen, int raw_rs);
/* Public key in the default provider from big-endian n and e. */
EVP_PKEY *bench_rsa_pub(OSSL_LIB_CTX *deflt, const unsigned char *n, size_t nlen,
                        const unsigned char *e, size_t elen);
/* The default provider's copy of k's public key (n and e read through k's provider). */
EVP_PKEY *bench_rsa_pub_of(OSSL_LIB_CTX *deflt, const EVP_PKEY *k);
/* One decrypt as an application makes it: new EVP_PKEY_CTX in L, OAEP parameters, decrypt. */
int bench_oaep_decrypt(OSSL_LIB_CTX *L, EVP_PKEY *k, const char *md, const unsigned char *ct,
                       size_t ctlen, unsigned char *out, size_t *outlen);
int bench_ct_pool_make(bench_ct_pool *p, OSSL_LIB_CTX *deflt, EVP_PKEY *pub, const char *md,
                       size_t n);
/* 1 when pt is the plaintext of the pool's first ciphertext. */
int bench_ct_pool_check(const bench_ct_pool *p, const unsigned char *pt, size_t ptlen);
void bench_ct_pool_free(bench_ct_pool *p);

/* HPKE open (OpenSSL >= 3.2): suite DHKEM(P-256, HKDF-SHA256), HKDF-SHA256, AES-128-GCM, base
 * mode, info "keyx-bench", no AAD. The pool's entries are enc || ciphertext of a random
 * BENCH_WRAPPED_LEN-byte message, each sealed once by the default provider to the encoded public
 * key pub (pt0: the first message). */
#if OPENSSL_VERSION_NUMBER >= 0x30200000L
int bench_hpke_pool_make(bench_ct_pool *p, OSSL_LIB_CTX *deflt, const unsigned char *pub,
                         size_t publen, size_t n);
/* One open as an application makes it: OSSL_HPKE_CTX_new (receiver, in L), OSSL_HPKE_decap with
 * the private key k, OSSL_HPKE_open, free. */
int bench_hpke_open(OSSL_LIB_CTX *L, EVP_PKEY *k, const unsigned char *sealed, size_t len,
                    unsigned char *out, size_t *outlen);
#endif

/* ---- cryptoki.c ---- */
typedef struct raw_p11 raw_p11;
/* Loads the module (dlopen), C_Initialize (sharing an already initialized module), finds the
 * token by label, opens a session, logs in with the PIN from pin_file, finds the private key
 * labelled key_label. NULL with a message on stderr. */
raw_p11 *raw_p11_open(const char *module, const char *token, const char *pin_file,
                      const char *key_label);
/* Closes the session (call before freeing keyx's libctx, which may finalize the module). */
void raw_p11_end_session(raw_p11 *r);
/* Closes the session if still open; finalizes the module only if raw_p11_open initialized it. */
void raw_p11_close(raw_p11 *r);
/* A worker thread's own session (the login is the application's, shared by all sessions). */
int raw_p11_thread_begin(raw_p11 *r);
void raw_p11_thread_end(raw_p11 *r);
/* Encoded public key (EC point) of the token key. */
int raw_p11_token_pub(raw_p11 *r, const unsigned char **pub, size_t *publen);
/* Generates a session key pair for alg (EC P-256 or DH with the default provider's p, g from
 * dom), reads its public key into pub (malloc'd); the private handle goes to *priv. */
int raw_p11_keygen(raw_p11 *r, const bench_alg *alg, const EVP_PKEY *dom, unsigned long *priv,
                   unsigned char **pub, size_t *publen);
/* Derive with private key priv (0 = the token key) and an encoded peer public key into a generic
 * secret session object, read it into out (secretlen bytes) and destroy the object. */
int raw_p11_derive(raw_p11 *r, const bench_alg *alg, unsigned long priv, const unsigned char *peer,
                   size_t peerlen, unsigned char *out);
int raw_p11_destroy(raw_p11 *r, unsigned long obj);
/* keygen + read public + derive + read + destroy everything, as one ephemeral exchange. */
int raw_p11_keygen_derive(raw_p11 *r, const bench_alg *alg, const EVP_PKEY *dom,
                          const unsigned char *peer, size_t peerlen, unsigned char *out);

/* RSA: finds the token's private key labelled label (kept for raw_p11_oaep_decrypt), reads its
 * modulus and public exponent (big-endian, *nlen and *elen in: sizes). */
int raw_p11_rsa_key(raw_p11 *r, const char *label, unsigned char *n, size_t *nlen, unsigned char *e,
                    size_t *elen);
/* One OAEP decrypt with that key. md == NULL: CKM_RSA_PKCS_OAEP with SHA-1/MGF1-SHA-1, no label
 * (what SoftHSM does natively); else CKM_RSA_X_509 (C_DecryptInit + C_Decrypt) and OAEP decoding
 * with md (OAEP and MGF1) in software, what a caller must do for SHA-256 on SoftHSM. */
int raw_p11_oaep_decrypt(raw_p11 *r, const EVP_MD *md, const unsigned char *ct, size_t ctlen,
                         unsigned char *out, size_t *outlen);

/* Call counting: swaps the entries of the module's function list (shared with keyx in this
 * process) for counting wrappers until raw_p11_count_end. 1 ok, 0 not possible. */
/* Signature keys: the private key labelled label (*obj) and its public part for verification:
 * rsa: modulus into a, exponent into b; EC: the uncompressed point into a (b unused). */
int raw_p11_sign_key(raw_p11 *r, const char *label, int rsa, unsigned long *obj, unsigned char *a,
                     size_t *alen, unsigned char *b, size_t *blen);
/* C_SignInit + C_Sign of a SHA-256 digest: CKM_ECDSA (r || s) or CKM_RSA_PKCS_PSS (SHA-256,
 * MGF1-SHA-256, 32-byte salt). */
int raw_p11_sign(raw_p11 *r, unsigned long obj, int pss, const unsigned char *dgst, size_t dlen,
                 unsigned char *sig, size_t *siglen);
#define RAW_P11_NCOUNTED 22
int raw_p11_count_begin(raw_p11 *r);
void raw_p11_count_end(raw_p11 *r, unsigned long out[RAW_P11_NCOUNTED]);
const char *raw_p11_count_name(int i);

/* ---- esys.c ---- */
typedef struct raw_esys raw_esys;
/* ESYS context on TCTI tcti (tpm2-tss TCTI loader), the persistent ECC P-256 key at handle, and
 * with session != 0 a salted HMAC session (response encryption) authorizing every ZGen, as keyx
 * protects ZGen by default. NULL with a message on stderr. */
raw_esys *raw_esys_open(const char *tcti, unsigned long handle, int session);
void raw_esys_close(raw_esys *r);
/* Encoded public key (uncompressed point, 65 bytes) of the persistent key. */
const unsigned char *raw_esys_pub(const raw_esys *r);
/* One ECDH_ZGen of the persistent key with an encoded peer point; x of Z into out (32 bytes). */
int raw_esys_derive(raw_esys *r, const unsigned char *peer, size_t peerlen, unsigned char *out);
/* CreateLoaded of an ECDH key in the NULL hierarchy + ZGen + FlushContext; the new key's encoded
 * public key into pub (65 bytes) unless NULL. */
int raw_esys_keygen_derive(raw_esys *r, const unsigned char *peer, size_t peerlen,
                           unsigned char *out, unsigned char *pub);

/* RSA: the persistent RSA decrypt key at handle (kept for raw_esys_oaep_decrypt); its modulus
 * and exponent into n, e (*nlen, *elen in: sizes). */
int raw_esys_rsa_key(raw_esys *r, unsigned long handle, unsigned char *n, size_t *nlen,
                     unsigned char *e, size_t *elen);
/* One Esys_RSA_Decrypt with the OAEP scheme, SHA-256, empty label; authorized by the salted
 * session (response encrypted) when the context has one, else by password. */
/* The persistent P-256 sign key at handle: its public point (65 bytes) into pub. */
int raw_esys_sign_key(raw_esys *r, unsigned long handle, unsigned char *pub);
/* One Esys_Sign (ECDSA, SHA-256) of a 32-byte digest; sig = r || s (64 bytes). */
int raw_esys_sign(raw_esys *r, const unsigned char *dgst, unsigned char *sig);
int raw_esys_oaep_decrypt(raw_esys *r, const unsigned char *ct, size_t ctlen, unsigned char *out,
                          size_t *outlen);

/* ---- tpm_count.c ---- */
/* TPM commands counted on the wire: a loopback proxy in front of swtpm (tcti: swtpm:host=H,port=P)
 * that every TPM user of the process is pointed at (its TCTI into proxied). 1 ok; 0 (cannot
 * start) or -1 (tcti is not swtpm's) with a message on stderr. */
int tpm_count_start(const char *tcti, char *proxied, size_t n);
/* Commands seen since the last reset, by slot (tpm_count_cc: the command code; 0: codes outside
 * the table); reset: start again from zero. */
#define TPM_COUNT_SLOTS 257
void tpm_count_read(unsigned long out[TPM_COUNT_SLOTS], int reset);
unsigned tpm_count_cc(unsigned slot);
/* "CreatePrimary", or "0x1NN" in buf for a code without a name here. */
const char *tpm_count_name(unsigned cc, char *buf, size_t n);

#endif
