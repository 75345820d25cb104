/* keyx-bench: key exchange throughput of keyx beside the OpenSSL default provider and beside raw
 * backend calls, measured in one process.
 *
 * Method. Every "cell" is one (implementation, algorithm, operation). Each libctx is separate:
 * the default provider in one, keyx with its software backend in another, keyx with its pkcs11
 * backend in a third, each keyx libctx loaded from its own openssl.cnf (OSSL_LIB_CTX_load_config).
 * The raw Cryptoki cells call the PKCS#11 module directly (dlopen by path, the same library
 * instance keyx uses). Rounds are interleaved: round 1 runs every cell for --seconds, then round
 * 2, and so on, so that a slow phase of the machine hits every cell alike. A cell's figure is the
 * median of its rounds' operations per second (wall clock), with the min-max spread; ratios are
 * medians divided by medians, from this same run. Before it is timed, every cell derives one
 * secret that is cross-checked against the default provider (peer's private key with the cell's
 * public key): a cell that computes a wrong secret stops the program.
 *
 * Operations (all per TLS handshake, as libssl 3.0 performs them):
 *   derive         own key generated once in the implementation; per operation: the peer's
 *                  encoded public key (from a pool made by the default provider) imported into
 *                  a fresh key (paramgen with the group + EVP_PKEY_set1_encoded_public_key), new
 *                  EVP_PKEY_CTX, set peer, size query, derive; free.
 *   keygen+derive  EVP_PKEY_keygen in the implementation, read of the encoded public key (what
 *                  libssl sends), then the derive above, then free of the key.
 *   static-derive  the derive above with a token key loaded by URI through OSSL_STORE.
 *   X(ready)       X with the peer's key imported once beforehand (what raw Cryptoki, which
 *                  takes the peer's bytes, is compared with); the libssl pattern imports a
 *                  peer per handshake, which is OpenSSL's work whatever provider serves it.
 * Raw Cryptoki: derive = C_DeriveKey (CKM_ECDH1_DERIVE / CKM_DH_PKCS_DERIVE) into a generic
 * secret session object + read + destroy, with a session key generated once (derive) or the token
 * key (static-derive); keygen+derive = C_GenerateKeyPair (session objects) + read of the public
 * value + the derive + destroys.
 *
 * Cryptoki calls: after the timed rounds, the calls every pkcs11 cell makes per operation,
 * counted by wrappers swapped into the module's function list (shared by keyx and the raw rows)
 * for --count-ops untimed operations, then removed.
 *
 * TPM commands (--count-tpm, tpm_count.c): a run that times nothing and counts, for every TPM
 * cell, the TPM commands per operation on the wire, through a loopback proxy in front of swtpm
 * that keyx, tpm2-openssl and the raw ESYS contexts of the process are all pointed at.
 *
 * Remote token (--pkcs11-remote-config, --pkcs11-remote-module; P11_KIT_SERVER_ADDRESS in the
 * environment): the same token exported by `p11-kit server` on a unix socket and reached through
 * p11-kit's RPC client module (p11-kit-client.so; ECDH needs p11-kit >= 0.25 on both sides).
 * keyx-pkcs11-remote: keyx loaded from a configuration that differs from --pkcs11-config only in
 * pkcs11-module (the client module), the same operations as keyx-pkcs11 (P-256). raw-pkcs11-remote:
 * the raw Cryptoki rows above on their own instance of the client module (each C_GetFunctionList
 * of it is a new connection, served by its own p11-kit-remote process and module instance). Ratios:
 * keyx-remote / raw-remote (the same goal as the local rows), and remote / local for keyx and for
 * raw, in the same run. keyx's client instance is not the one this program can wrap, so its
 * calls per operation are counted on the wire instead: the thread's write(2)s
 * (/proc/thread-self/io) during the counted operations, divided by the writes per call of the raw
 * remote rows, whose calls are counted in their function list; one operation must write to the
 * socket before a keyx-pkcs11-remote cell is timed.
 *
 * Threads (--threads N): in every round, right after its single-threaded run, each cell runs
 * again on N threads at once (each thread its own peer sequence; the raw Cryptoki rows each
 * thread its own session; the raw ESYS rows share their one ESYS context, calls serialized, as
 * the TPM serves one command at a time anyway); the figure is the sum of the threads' rates,
 * "scaling" its ratio to one thread.
 *
 * Memory: after the timed rounds, resident set growth (/proc/self/statm) over --mem-ops more
 * operations of every cell of --mem-alg.
 *
 * TPM (--tpm-config, --tpm-tcti, --tpm-handle; esys.c): keyx-tpm cells as above, static-derive
 * with the persistent key loaded as keyx:tpm:handle=0x81...; keyx-tpm's derive and derive(ready)
 * share one generated key (swtpm has three transient slots: keyx's parent, that key, and one for
 * the key a keygen+derive makes, keyx's or raw ESYS's). Raw ESYS, on its own ESYS context (the
 * swtpm TCTI connects per command, so keyx's context and it take turns on swtpm's one connection):
 * derive = one Esys_ECDH_ZGen of the persistent key with the peer's point (also the denominator of
 * static-derive, the same TPM operation); keygen+derive = Esys_CreateLoaded of an ECDH key in the
 * NULL hierarchy + ZGen + FlushContext. Two raw rows each: raw-esys-sess with a salted HMAC
 * session encrypting ZGen's response (the bus protection keyx uses by default: the like-for-like
 * comparison, which the target applies to) and raw-esys with a password authorization (the bus in
 * clear; the floor of the TPM itself). Raw ESYS takes the peer's bytes: its plain figure is the
 * denominator of the "(ready)" ratios. Memory figures of TPM cells run at most --tpm-mem-ops.
 *
 * RSA-OAEP (op oaep-decrypt, alg RSA-2048; OAEP with SHA-256 and MGF1-SHA-256, no label): one
 * EVP_PKEY_decrypt per operation as an application makes it (new EVP_PKEY_CTX from the key, OAEP
 * parameters, decrypt of a 256-byte ciphertext into a 32-byte key). Keys: default and
 * keyx-software generate their own RSA-2048 key (EVP_PKEY_keygen in their libctx); keyx-pkcs11
 * loads the token key labelled --pkcs11-rsa-key by URI, raw-pkcs11 uses the same token object;
 * keyx-tpm loads the persistent key --tpm-rsa-handle by URI, raw ESYS uses the same handle. Each
 * cell's ciphertexts (a pool of --peers, random 32-byte keys) are made once by the default
 * provider with that cell's public key, and one is decrypted and compared before timing. Raw
 * Cryptoki: SoftHSM does CKM_RSA_PKCS_OAEP with SHA-1 only, so the SHA-256 row is C_DecryptInit
 * (CKM_RSA_X_509) + C_Decrypt + OAEP decoding in software (cryptoki.c), the work keyx does with
 * pkcs11-raw-rsa = 1; oaep-sha1-decrypt is native CKM_RSA_PKCS_OAEP (SHA-1, no label), for
 * reference, beside keyx-pkcs11 doing the same. Raw ESYS: one Esys_RSA_Decrypt (OAEP, SHA-256),
 * with the salted session (response encrypted, like keyx) and with a password.
 *
 * HPKE open (op hpke-open, alg P-256; OpenSSL >= 3.2 only): suite DHKEM(P-256, HKDF-SHA256),
 * HKDF-SHA256, AES-128-GCM, base mode. Per operation, what an application does to open one
 * message: OSSL_HPKE_CTX_new (receiver, the cell's libctx), OSSL_HPKE_decap (enc, the cell's
 * private key, info), OSSL_HPKE_open of a 48-byte ciphertext (a 32-byte message), free. Keys:
 * default and keyx-software generate their own P-256 key; keyx-pkcs11 loads the static-derive
 * token key by URI, keyx-tpm the persistent key of --tpm-handle. Each cell has a pool of --peers
 * messages sealed once by the default provider to its public key; one is opened and compared
 * with its plaintext before timing. Ratios: against default's hpke-open, and for keyx-pkcs11 and
 * keyx-tpm against the raw static derive of the same key (raw-pkcs11 static-derive, raw ESYS
 * derive: one C_DeriveKey / ECDH_ZGen), the device's DH that an open costs: its floor.
 *
 * Adding a backend: one impl_id, its libctx or raw state in setup(), its operations in
 * run_once(), its rows in PLAN and its ratios in RATIOS. */
#include <getopt.h>
#include <pthread.h>
#include <regex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/provider.h>
#include <openssl/rand.h>
#include <openssl/store.h>

#include "bench.h"

#define MAX_ROUNDS 101

typedef enum {
    IMPL_DEFAULT,
    IMPL_SOFTWARE,
    IMPL_PKCS11,
    IMPL_RAW_PKCS11,
    IMPL_TPM,
    IMPL_RAW_ESYS_SESS,
    IMPL_RAW_ESYS,
    IMPL_TPM2_OPENSSL, /* tpm2-openssl's provider in its own libctx (--tpm2-openssl-config) */
    /* the same token behind p11-kit's RPC (--pkcs11-remote-config): keyx, and raw Cryptoki on
     * its own instance of the client module */
    IMPL_PKCS11_REMOTE,
    IMPL_RAW_PKCS11_REMOTE,
    N_IMPL
} impl_id;
static const char *const impl_names[N_IMPL] = {
    "default",       "keyx-software", "keyx-pkcs11",  "raw-pkcs11",         "keyx-tpm",
    "raw-esys-sess", "raw-esys",      "tpm2-openssl", "keyx-pkcs11-remote", "raw-pkcs11-remote"};

static int is_raw_esys(impl_id i)
{
    return i == IMPL_RAW_ESYS_SESS || i == IMPL_RAW_ESYS;
}

static int is_tpm(impl_id i)
{
    return i == IMPL_TPM || is_raw_esys(i) || i == IMPL_TPM2_OPENSSL;
}

static int is_remote(impl_id i)
{
    return i == IMPL_PKCS11_REMOTE || i == IMPL_RAW_PKCS11_REMOTE;
}

/* keyx's pkcs11 backend, on the local module or on p11-kit's RPC client */
static int is_keyx_p11(impl_id i)
{
    return i == IMPL_PKCS11 || i == IMPL_PKCS11_REMOTE;
}

static int is_raw_p11(impl_id i)
{
    return i == IMPL_RAW_PKCS11 || i == IMPL_RAW_PKCS11_REMOTE;
}

typedef enum {
    OP_DERIVE,
    OP_KEYGEN_DERIVE,
    OP_STATIC_DERIVE,
    OP_DERIVE_READY,
    OP_KEYGEN_DERIVE_READY,
    OP_STATIC_DERIVE_READY,
    OP_OAEP_DECRYPT,      /* RSA-OAEP SHA-256 decrypt */
    OP_OAEP_SHA1_DECRYPT, /* the same with SHA-1: what SoftHSM does natively */
    OP_ECDSA_SIGN,        /* ECDSA P-256 of a SHA-256 digest (a certificate key's work) */
    OP_PSS_SIGN,          /* RSA-PSS, SHA-256, MGF1-SHA-256, salt 32 */
    OP_HPKE_OPEN,         /* HPKE decap + open of one message (OpenSSL >= 3.2) */
    N_OP
} op_id;
static const char *const op_names[N_OP] = {"derive",
                                           "keygen+derive",
                                           "static-derive",
                                           "derive(ready)",
                                           "keygen+derive(ready)",
                                           "static-derive(ready)",
                                           "oaep-decrypt",
                                           "oaep-sha1-decrypt",
                                           "ecdsa-sign",
                                           "pss-sign",
                                           "hpke-open"};

static int is_sign(op_id op)
{
    return op == OP_ECDSA_SIGN || op == OP_PSS_SIGN;
}

/* The "(ready)" operations: the same with the peer's key already imported (the pool's keys made
 * once in the cell's libctx), the comparison with raw Cryptoki, which takes the peer's bytes. */
static op_id base_op(op_id op)
{
    return op >= OP_DERIVE_READY && op <= OP_STATIC_DERIVE_READY ? (op_id)(op - OP_DERIVE_READY)
                                                                 : op;
}

enum { ALG_P256, ALG_X25519, ALG_FFDHE2048, ALG_RSA2048, N_ALG };
static const bench_alg algs[N_ALG] = {
    {"P-256", "EC", "prime256v1", 32},
    {"X25519", "X25519", "X25519", 32},
    {"ffdhe2048", "DH", "ffdhe2048", 256},
    /* not a key exchange: RSA-OAEP decrypt cells, no peers (a ciphertext pool per cell) */
    {"RSA-2048", "RSA", NULL, BENCH_WRAPPED_LEN},
};

static int is_rsa(const bench_alg *alg)
{
    return alg == &algs[ALG_RSA2048];
}

/* What is measured, in table order. */
static const struct {
    impl_id impl;
    int alg;
    op_id op;
} PLAN[] = {
    {IMPL_DEFAULT, ALG_P256, OP_DERIVE},
    {IMPL_DEFAULT, ALG_P256, OP_KEYGEN_DERIVE},
    {IMPL_DEFAULT, ALG_X25519, OP_DERIVE},
    {IMPL_DEFAULT, ALG_X25519, OP_KEYGEN_DERIVE},
    {IMPL_DEFAULT, ALG_FFDHE2048, OP_DERIVE},
    {IMPL_DEFAULT, ALG_FFDHE2048, OP_KEYGEN_DERIVE},
    {IMPL_SOFTWARE, ALG_P256, OP_DERIVE},
    {IMPL_SOFTWARE, ALG_P256, OP_KEYGEN_DERIVE},
    {IMPL_SOFTWARE, ALG_X25519, OP_DERIVE},
    {IMPL_SOFTWARE, ALG_X25519, OP_KEYGEN_DERIVE},
    {IMPL_SOFTWARE, ALG_FFDHE2048, OP_DERIVE},
    {IMPL_SOFTWARE, ALG_FFDHE2048, OP_KEYGEN_DERIVE},
    {IMPL_PKCS11, ALG_P256, OP_DERIVE},
    {IMPL_PKCS11, ALG_P256, OP_KEYGEN_DERIVE},
    {IMPL_PKCS11, ALG_P256, OP_STATIC_DERIVE},
    {IMPL_PKCS11, ALG_P256, OP_DERIVE_READY},
    {IMPL_PKCS11, ALG_P256, OP_KEYGEN_DERIVE_READY},
    {IMPL_PKCS11, ALG_P256, OP_STATIC_DERIVE_READY},
    {IMPL_PKCS11, ALG_FFDHE2048, OP_DERIVE},
    {IMPL_PKCS11, ALG_FFDHE2048, OP_KEYGEN_DERIVE},
    {IMPL_RAW_PKCS11, ALG_P256, OP_DERIVE},
    {IMPL_RAW_PKCS11, ALG_P256, OP_KEYGEN_DERIVE},
    {IMPL_RAW_PKCS11, ALG_P256, OP_STATIC_DERIVE},
    {IMPL_RAW_PKCS11, ALG_FFDHE2048, OP_DERIVE},
    {IMPL_RAW_PKCS11, ALG_FFDHE2048, OP_KEYGEN_DERIVE},
    /* the same token through p11-kit's RPC (unix socket): P-256 key exchange */
    {IMPL_PKCS11_REMOTE, ALG_P256, OP_DERIVE},
    {IMPL_PKCS11_REMOTE, ALG_P256, OP_KEYGEN_DERIVE},
    {IMPL_PKCS11_REMOTE, ALG_P256, OP_STATIC_DERIVE},
    {IMPL_PKCS11_REMOTE, ALG_P256, OP_DERIVE_READY},
    {IMPL_PKCS11_REMOTE, ALG_P256, OP_KEYGEN_DERIVE_READY},
    {IMPL_PKCS11_REMOTE, ALG_P256, OP_STATIC_DERIVE_READY},
    {IMPL_RAW_PKCS11_REMOTE, ALG_P256, OP_DERIVE},
    {IMPL_RAW_PKCS11_REMOTE, ALG_P256, OP_KEYGEN_DERIVE},
    {IMPL_RAW_PKCS11_REMOTE, ALG_P256, OP_STATIC_DERIVE},
    {IMPL_TPM, ALG_P256, OP_DERIVE},
    {IMPL_TPM, ALG_P256, OP_KEYGEN_DERIVE},
    {IMPL_TPM, ALG_P256, OP_STATIC_DERIVE},
    {IMPL_TPM, ALG_P256, OP_DERIVE_READY},
    {IMPL_TPM, ALG_P256, OP_KEYGEN_DERIVE_READY},
    {IMPL_TPM, ALG_P256, OP_STATIC_DERIVE_READY},
    {IMPL_RAW_ESYS_SESS, ALG_P256, OP_DERIVE},
    {IMPL_RAW_ESYS_SESS, ALG_P256, OP_KEYGEN_DERIVE},
    {IMPL_RAW_ESYS, ALG_P256, OP_DERIVE},
    {IMPL_RAW_ESYS, ALG_P256, OP_KEYGEN_DERIVE},
    /* tpm2-openssl on the same TPM (the point of comparison for the TPM rows) */
    {IMPL_TPM2_OPENSSL, ALG_P256, OP_DERIVE},
    {IMPL_TPM2_OPENSSL, ALG_P256, OP_KEYGEN_DERIVE},
    /* RSA-OAEP decrypt (pkcs11 rows with --pkcs11-rsa-key, TPM rows with --tpm-rsa-handle) */
    {IMPL_DEFAULT, ALG_RSA2048, OP_OAEP_DECRYPT},
    {IMPL_SOFTWARE, ALG_RSA2048, OP_OAEP_DECRYPT},
    {IMPL_PKCS11, ALG_RSA2048, OP_OAEP_DECRYPT},
    {IMPL_PKCS11, ALG_RSA2048, OP_OAEP_SHA1_DECRYPT},
    {IMPL_RAW_PKCS11, ALG_RSA2048, OP_OAEP_DECRYPT},
    {IMPL_RAW_PKCS11, ALG_RSA2048, OP_OAEP_SHA1_DECRYPT},
    {IMPL_TPM, ALG_RSA2048, OP_OAEP_DECRYPT},
    {IMPL_RAW_ESYS_SESS, ALG_RSA2048, OP_OAEP_DECRYPT},
    {IMPL_RAW_ESYS, ALG_RSA2048, OP_OAEP_DECRYPT},
    /* signatures with a certificate key (pkcs11 rows with --pkcs11-sign-key and
     * --pkcs11-sign-rsa-key) */
    {IMPL_DEFAULT, ALG_P256, OP_ECDSA_SIGN},
    {IMPL_SOFTWARE, ALG_P256, OP_ECDSA_SIGN},
    {IMPL_PKCS11, ALG_P256, OP_ECDSA_SIGN},
    {IMPL_RAW_PKCS11, ALG_P256, OP_ECDSA_SIGN},
    {IMPL_TPM, ALG_P256, OP_ECDSA_SIGN},
    {IMPL_RAW_ESYS_SESS, ALG_P256, OP_ECDSA_SIGN},
    {IMPL_RAW_ESYS, ALG_P256, OP_ECDSA_SIGN},
    {IMPL_DEFAULT, ALG_RSA2048, OP_PSS_SIGN},
    {IMPL_SOFTWARE, ALG_RSA2048, OP_PSS_SIGN},
    {IMPL_PKCS11, ALG_RSA2048, OP_PSS_SIGN},
    {IMPL_RAW_PKCS11, ALG_RSA2048, OP_PSS_SIGN},
#if OPENSSL_VERSION_NUMBER >= 0x30200000L
    /* HPKE open; the raw rows of the ratios are the static derives above */
    {IMPL_DEFAULT, ALG_P256, OP_HPKE_OPEN},
    {IMPL_SOFTWARE, ALG_P256, OP_HPKE_OPEN},
    {IMPL_PKCS11, ALG_P256, OP_HPKE_OPEN},
    {IMPL_TPM, ALG_P256, OP_HPKE_OPEN},
#endif
};

/* Ratios reported: num / den for the same algorithm; target 0 = none stated. */
static const struct {
    impl_id num, den;
    op_id op;
    double target;
} RATIOS[] = {
    {IMPL_SOFTWARE, IMPL_DEFAULT, OP_DERIVE, 0},
    {IMPL_SOFTWARE, IMPL_DEFAULT, OP_KEYGEN_DERIVE, 0.95},
    {IMPL_PKCS11, IMPL_RAW_PKCS11, OP_DERIVE, 0},
    {IMPL_PKCS11, IMPL_RAW_PKCS11, OP_KEYGEN_DERIVE, 0},
    {IMPL_PKCS11, IMPL_RAW_PKCS11, OP_STATIC_DERIVE, 0},
    {IMPL_PKCS11, IMPL_RAW_PKCS11, OP_DERIVE_READY, 0.85},
    {IMPL_PKCS11, IMPL_RAW_PKCS11, OP_KEYGEN_DERIVE_READY, 0.85},
    {IMPL_PKCS11, IMPL_RAW_PKCS11, OP_STATIC_DERIVE_READY, 0.85},
    {IMPL_PKCS11, IMPL_DEFAULT, OP_DERIVE, 0},
    {IMPL_PKCS11, IMPL_DEFAULT, OP_KEYGEN_DERIVE, 0},
    /* remote token: keyx against raw Cryptoki over the same RPC (the goal of the local rows),
     * then each against its local twin, what the RPC costs */
    {IMPL_PKCS11_REMOTE, IMPL_RAW_PKCS11_REMOTE, OP_DERIVE, 0},
    {IMPL_PKCS11_REMOTE, IMPL_RAW_PKCS11_REMOTE, OP_KEYGEN_DERIVE, 0},
    {IMPL_PKCS11_REMOTE, IMPL_RAW_PKCS11_REMOTE, OP_STATIC_DERIVE, 0},
    {IMPL_PKCS11_REMOTE, IMPL_RAW_PKCS11_REMOTE, OP_DERIVE_READY, 0.85},
    {IMPL_PKCS11_REMOTE, IMPL_RAW_PKCS11_REMOTE, OP_KEYGEN_DERIVE_READY, 0.85},
    {IMPL_PKCS11_REMOTE, IMPL_RAW_PKCS11_REMOTE, OP_STATIC_DERIVE_READY, 0.85},
    {IMPL_PKCS11_REMOTE, IMPL_PKCS11, OP_DERIVE, 0},
    {IMPL_PKCS11_REMOTE, IMPL_PKCS11, OP_KEYGEN_DERIVE, 0},
    {IMPL_PKCS11_REMOTE, IMPL_PKCS11, OP_STATIC_DERIVE, 0},
    {IMPL_PKCS11_REMOTE, IMPL_PKCS11, OP_KEYGEN_DERIVE_READY, 0},
    {IMPL_RAW_PKCS11_REMOTE, IMPL_RAW_PKCS11, OP_DERIVE, 0},
    {IMPL_RAW_PKCS11_REMOTE, IMPL_RAW_PKCS11, OP_KEYGEN_DERIVE, 0},
    {IMPL_RAW_PKCS11_REMOTE, IMPL_RAW_PKCS11, OP_STATIC_DERIVE, 0},
    /* TPM: like-for-like (both with a session encrypting ZGen's response), then against the bus
     * in clear */
    {IMPL_TPM, IMPL_RAW_ESYS_SESS, OP_DERIVE, 0},
    {IMPL_TPM, IMPL_RAW_ESYS_SESS, OP_KEYGEN_DERIVE, 0},
    {IMPL_TPM, IMPL_RAW_ESYS_SESS, OP_STATIC_DERIVE, 0},
    {IMPL_TPM, IMPL_RAW_ESYS_SESS, OP_DERIVE_READY, 0.9},
    {IMPL_TPM, IMPL_RAW_ESYS_SESS, OP_KEYGEN_DERIVE_READY, 0},
    {IMPL_TPM, IMPL_RAW_ESYS_SESS, OP_STATIC_DERIVE_READY, 0.9},
    {IMPL_TPM, IMPL_RAW_ESYS, OP_DERIVE, 0},
    {IMPL_TPM, IMPL_RAW_ESYS, OP_KEYGEN_DERIVE, 0},
    {IMPL_TPM, IMPL_RAW_ESYS, OP_STATIC_DERIVE, 0},
    {IMPL_TPM, IMPL_RAW_ESYS, OP_DERIVE_READY, 0},
    {IMPL_TPM, IMPL_RAW_ESYS, OP_KEYGEN_DERIVE_READY, 0},
    {IMPL_TPM, IMPL_RAW_ESYS, OP_STATIC_DERIVE_READY, 0},
    {IMPL_RAW_ESYS_SESS, IMPL_RAW_ESYS, OP_DERIVE, 0},
    {IMPL_RAW_ESYS_SESS, IMPL_RAW_ESYS, OP_KEYGEN_DERIVE, 0},
    /* target: ephemeral keygen+derive in the TPM at least 2x tpm2-openssl's, same run */
    {IMPL_TPM, IMPL_TPM2_OPENSSL, OP_KEYGEN_DERIVE, 2.0},
    {IMPL_TPM, IMPL_TPM2_OPENSSL, OP_DERIVE, 0},
    {IMPL_TPM2_OPENSSL, IMPL_RAW_ESYS, OP_KEYGEN_DERIVE, 0},
    /* RSA-OAEP decrypt: no targets, ratios only */
    {IMPL_SOFTWARE, IMPL_DEFAULT, OP_OAEP_DECRYPT, 0},
    {IMPL_PKCS11, IMPL_RAW_PKCS11, OP_OAEP_DECRYPT, 0},
    {IMPL_PKCS11, IMPL_RAW_PKCS11, OP_OAEP_SHA1_DECRYPT, 0},
    {IMPL_PKCS11, IMPL_DEFAULT, OP_OAEP_DECRYPT, 0},
    {IMPL_TPM, IMPL_RAW_ESYS_SESS, OP_OAEP_DECRYPT, 0},
    {IMPL_TPM, IMPL_RAW_ESYS, OP_OAEP_DECRYPT, 0},
    {IMPL_TPM, IMPL_DEFAULT, OP_OAEP_DECRYPT, 0},
    {IMPL_RAW_ESYS_SESS, IMPL_RAW_ESYS, OP_OAEP_DECRYPT, 0},
    /* signatures: no targets stated */
    {IMPL_SOFTWARE, IMPL_DEFAULT, OP_ECDSA_SIGN, 0},
    {IMPL_PKCS11, IMPL_RAW_PKCS11, OP_ECDSA_SIGN, 0},
    {IMPL_PKCS11, IMPL_DEFAULT, OP_ECDSA_SIGN, 0},
    {IMPL_TPM, IMPL_RAW_ESYS_SESS, OP_ECDSA_SIGN, 0},
    {IMPL_TPM, IMPL_RAW_ESYS, OP_ECDSA_SIGN, 0},
    {IMPL_SOFTWARE, IMPL_DEFAULT, OP_PSS_SIGN, 0},
    {IMPL_PKCS11, IMPL_RAW_PKCS11, OP_PSS_SIGN, 0},
    {IMPL_PKCS11, IMPL_DEFAULT, OP_PSS_SIGN, 0},
    /* HPKE open: against the default provider's open; against raw the denominator is the raw
     * static derive of the same key (find_cell), the device's DH inside an open */
    {IMPL_SOFTWARE, IMPL_DEFAULT, OP_HPKE_OPEN, 0},
    {IMPL_PKCS11, IMPL_DEFAULT, OP_HPKE_OPEN, 0},
    {IMPL_TPM, IMPL_DEFAULT, OP_HPKE_OPEN, 0},
    {IMPL_PKCS11, IMPL_RAW_PKCS11, OP_HPKE_OPEN, 0},
    {IMPL_TPM, IMPL_RAW_ESYS_SESS, OP_HPKE_OPEN, 0},
    {IMPL_TPM, IMPL_RAW_ESYS, OP_HPKE_OPEN, 0},
};

/* Absolute targets (ops/s), stated against an anchor measured on this machine. */
static const struct {
    impl_id impl;
    int alg;
    op_id op;
    double target;
    const char *anchor;
} ABSOLUTE[] = {
    {IMPL_TPM, ALG_P256, OP_KEYGEN_DERIVE, 518, "2x tpm2-openssl's 259/s"},
    {IMPL_TPM, ALG_P256, OP_KEYGEN_DERIVE_READY, 518, "2x tpm2-openssl's 259/s"},
};

#define TPM_CC_KINDS 8 /* distinct command codes kept per cell */

typedef struct cell {
    impl_id impl;
    const bench_alg *alg;
    op_id op;
    char name[64];
    OSSL_LIB_CTX *L;
    bench_peers *peers;
    EVP_PKEY *own;         /* derive, static-derive */
    EVP_PKEY **ready;      /* "(ready)" operations: the pool's peers imported into L */
    unsigned long rawkey;  /* raw derive: the session private key */
    unsigned long signkey; /* raw sign: the token's private key (not destroyed) */
    bench_ct_pool pool;    /* RSA-OAEP: the ciphertexts; HPKE: the sealed messages */
    const char *md;        /* RSA-OAEP: "SHA256" or "SHA1" (OAEP and MGF1) */
    int nrounds;
    double ops[MAX_ROUNDS], cpu_us[MAX_ROUNDS];
    double median, min, max, cpu_median;
    long mem_ops;
    long mem_growth_kb;
    int mem_done;
    double calls[RAW_P11_NCOUNTED]; /* Cryptoki calls per operation */
    long calls_ops;
    /* remote cells: write(2)s on p11-kit's socket per operation (p11-kit 0.25 writes a request
     * in 3: header, options, body), the call count of keyx's own client instance, which this
     * program cannot wrap */
    double rpc_writes;
    long rpc_ops;
    /* --count-tpm: TPM commands per operation, by command code (tpm_count.c) */
    unsigned tpm_cc[TPM_CC_KINDS];
    double tpm_per_op[TPM_CC_KINDS], tpm_total;
    int tpm_kinds;
    long tpm_ops;
    size_t next; /* peer index of single-threaded runs */
    /* with --threads N > 1: the same cell run by N threads at once, in the same rounds */
    double mt_ops[MAX_ROUNDS], mt_median;
    /* CPU time the threads got, as a share of their wall time (1.0: each thread always ran);
     * with a lock held by the other thread or a busy machine it drops */
    double mt_busy[MAX_ROUNDS], mt_busy_median;
} cell;

static struct {
    int rounds;
    double seconds;
    int json;
    const char *only;
    long mem_ops;
    long count_ops;
    int count_tpm;
    int threads;
    const char *mem_alg;
    int npeers;
    const char *sw_config, *p11_config;
    const char *p11_module, *p11_token, *p11_pin_file, *p11_key, *p11_uri;
    const char *p11_remote_config, *p11_remote_module;
    const char *tpm_config, *tpm_tcti, *tpm_handle, *tpm2_openssl_config;
    unsigned long tpm_handle_num;
    const char *p11_rsa_key, *p11_rsa_uri, *tpm_rsa_handle;
    const char *p11_sign_key, *p11_sign_uri, *p11_sign_rsa_key, *p11_sign_rsa_uri;
    const char *tpm_sign_handle;
    unsigned long tpm_sign_handle_num;
    unsigned long tpm_rsa_handle_num;
    long tpm_mem_ops;
} opt = {
    .rounds = 5,
    .seconds = 1.0,
    .mem_ops = 10000,
    .count_ops = 100,
    .threads = 1,
    .mem_alg = "P-256",
    .npeers = 64,
    .p11_module = "/usr/lib/softhsm/libsofthsm2.so",
    .p11_remote_module = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so",
    .p11_key = "bench-ecdh",
    .tpm_mem_ops = 2000,
};

static OSSL_LIB_CTX *libctx[N_IMPL];
static OSSL_PROVIDER *default_prov;
static raw_p11 *raw;
/* raw Cryptoki over p11-kit's RPC: every C_GetFunctionList of the client module is a new
 * instance with its own connection (and its own login), so keyx's calls never pass through it */
static raw_p11 *raw_remote;

static raw_p11 *raw_of(impl_id i)
{
    return is_remote(i) ? raw_remote : raw;
}
static raw_esys *esys[2]; /* [0]: with the salted session (raw-esys-sess), [1]: without */
static EVP_PKEY *tpm_own; /* keyx-tpm's derive key, shared by derive and derive(ready) */
static char tpm_uri[64], tpm_rsa_uri[64], tpm_sign_uri[64];
static EVP_MD *sha256; /* the raw Cryptoki rows' OAEP decoding digest (default provider) */
static unsigned char sign_dgst[32]; /* what the signature cells sign: a random "SHA-256 digest" */

static raw_esys *esys_of(impl_id i)
{
    return esys[i == IMPL_RAW_ESYS];
}
static EVP_PKEY *dh_domain; /* ffdhe2048 parameters for the raw DH cells */
static bench_peers peers[N_ALG];
static cell *cells;
static size_t ncells;

static double clock_s(clockid_t id)
{
    struct timespec ts;

    clock_gettime(id, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static long rss_kb(void)
{
    long size = 0, resident = 0;
    FILE *fp = fopen("/proc/self/statm", "r");

    if (fp == NULL)
        return -1;
    if (fscanf(fp, "%ld %ld", &size, &resident) != 2)
        resident = -1;
    fclose(fp);
    return resident < 0 ? -1 : resident * (sysconf(_SC_PAGESIZE) / 1024);
}

/* The machine's CPU time so far (/proc/stat, all CPUs, clock ticks) and the part of it the
 * hypervisor gave to other guests ("steal"): on a shared VM host that part slows every cell of a
 * run at once, so absolute rates drop while the ratios of interleaved cells hold. */
static int cpu_ticks(unsigned long long *total, unsigned long long *steal)
{
    unsigned long long v[8] = {0};
    FILE *fp = fopen("/proc/stat", "r");
    int n = fp != NULL ? fscanf(fp, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1],
                                &v[2], &v[3], &v[4], &v[5], &v[6], &v[7])
                       : 0;

    if (fp != NULL)
        fclose(fp);
    *total = *steal = 0;
    for (int i = 0; i < n; i++)
        *total += v[i];
    *steal = n == 8 ? v[7] : 0;
    return n == 8;
}

/* write(2) calls this thread has made so far (/proc/thread-self/io); -1 if unknown. p11-kit's
 * RPC client writes each request to its socket from the calling thread. */
static long long thread_writes(void)
{
    char line[128];
    long long n = -1;
    FILE *fp = fopen("/proc/thread-self/io", "r");

    if (fp == NULL)
        return -1;
    while (fgets(line, sizeof(line), fp) != NULL)
        if (sscanf(line, "syscw: %lld", &n) == 1)
            break;
    fclose(fp);
    return n;
}

static double steal_pct = -1; /* share of the machine's CPU time stolen during the rounds */

static void die(const char *what)
{
    bench_print_errors(what);
    exit(1);
}

/* ---- setup ---------------------------------------------------------------------------- */

static OSSL_LIB_CTX *provider_libctx(const char *config, const char *provider)
{
    OSSL_LIB_CTX *L = OSSL_LIB_CTX_new();

    if (L == NULL || !OSSL_LIB_CTX_load_config(L, config)) {
        fprintf(stderr, "keyx-bench: cannot load %s into a library context\n", config);
        die("OSSL_LIB_CTX_load_config");
    }
    if (!OSSL_PROVIDER_available(L, provider)) {
        fprintf(stderr, "keyx-bench: %s does not load and activate %s\n", config, provider);
        exit(1);
    }
    return L;
}

static OSSL_LIB_CTX *keyx_libctx(const char *config)
{
    return provider_libctx(config, "keyx");
}

static EVP_PKEY *store_load(OSSL_LIB_CTX *L, const char *uri)
{
    OSSL_STORE_CTX *sc = OSSL_STORE_open_ex(uri, L, NULL, NULL, NULL, NULL, NULL, NULL);
    EVP_PKEY *k = NULL;

    if (sc == NULL)
        return NULL;
    while (k == NULL && !OSSL_STORE_eof(sc)) {
        OSSL_STORE_INFO *info = OSSL_STORE_load(sc);

        if (info == NULL)
            break;
        if (OSSL_STORE_INFO_get_type(info) == OSSL_STORE_INFO_PKEY)
            k = OSSL_STORE_INFO_get1_PKEY(info);
        OSSL_STORE_INFO_free(info);
    }
    OSSL_STORE_close(sc);
    return k;
}

static void expect_provider(const cell *c, const EVP_PKEY *k)
{
    const char *want = c->impl == IMPL_DEFAULT        ? "default"
                       : c->impl == IMPL_TPM2_OPENSSL ? "tpm2"
                                                      : "keyx";
    const char *got = bench_provider_of(k);

    if (strcmp(got, want) != 0) {
        fprintf(stderr,
                "keyx-bench: %s: the key is served by provider '%s', not '%s' (check the "
                "configuration: default_properties = ?provider=keyx)\n",
                c->name, got, want);
        exit(1);
    }
}

static int run_once(cell *c, size_t *next);

/* A keyx-pkcs11-remote cell must reach the remote token: keyx's instance of the client module is
 * its own (nothing here can wrap its function list), so one operation must write requests to
 * p11-kit's socket (a configuration that routed to software would write nothing). */
static void expect_remote(cell *c)
{
    size_t next = 0;
    long long w0 = thread_writes(), w1;
    int ok = run_once(c, &next);

    w1 = thread_writes();
    if (!ok)
        die(c->name);
    if (w0 >= 0 && w1 >= 0 && w1 - w0 < 2) {
        fprintf(stderr,
                "keyx-bench: %s: one operation wrote %lld times, no request to p11-kit's socket "
                "(check backends = pkcs11 and pkcs11-module in %s, and P11_KIT_SERVER_ADDRESS)\n",
                c->name, w1 - w0, opt.p11_remote_config);
        exit(1);
    }
}

/* A keyx-pkcs11 cell must reach the token: one operation, counted, makes one C_DeriveKey (one
 * C_Decrypt for RSA-OAEP; a configuration that routed to software would make none). */
static void expect_token(cell *c)
{
    unsigned long n[RAW_P11_NCOUNTED];
    size_t next = 0;
    int ok, derives = -1;
    const char *call = is_sign(c->op) ? "C_Sign" : is_rsa(c->alg) ? "C_Decrypt" : "C_DeriveKey";

    if (c->impl == IMPL_PKCS11_REMOTE) {
        expect_remote(c);
        return;
    }
    if (raw == NULL || !raw_p11_count_begin(raw))
        return;
    ok = run_once(c, &next);
    raw_p11_count_end(raw, n);
    for (int i = 0; i < RAW_P11_NCOUNTED; i++)
        if (strcmp(raw_p11_count_name(i), call) == 0)
            derives = (int)n[i];
    if (!ok)
        die(c->name);
    if (derives != 1) {
        fprintf(stderr,
                "keyx-bench: %s: one operation made %d %s calls on the token, not 1 "
                "(check backends = pkcs11 in %s)\n",
                c->name, derives, call, opt.p11_config);
        exit(1);
    }
}

/* One RSA-OAEP decrypt of pool ciphertext i into out (*outlen in: size). */
static int rsa_decrypt(cell *c, size_t i, unsigned char *out, size_t *outlen)
{
    const unsigned char *ct = c->pool.ct[i % c->pool.n];

    if (c->impl == IMPL_RAW_PKCS11)
        return raw_p11_oaep_decrypt(raw, c->op == OP_OAEP_SHA1_DECRYPT ? NULL : sha256, ct,
                                    c->pool.ctlen, out, outlen);
    if (is_raw_esys(c->impl))
        return raw_esys_oaep_decrypt(esys_of(c->impl), ct, c->pool.ctlen, out, outlen);
    return bench_oaep_decrypt(c->L, c->own, c->md, ct, c->pool.ctlen, out, outlen);
}

/* RSA-OAEP cell: its key, its ciphertext pool (default provider, the cell's public key) and one
 * decrypt compared with the plaintext the default provider encrypted. */
static void setup_rsa(cell *c)
{
    OSSL_LIB_CTX *deflt = libctx[IMPL_DEFAULT];
    unsigned char n[1024], e[16], pt[1024];
    size_t nlen = sizeof(n), elen = sizeof(e), ptlen = sizeof(pt);
    EVP_PKEY *pub = NULL;
    int ok;

    c->L = libctx[c->impl];
    c->md = c->op == OP_OAEP_SHA1_DECRYPT ? "SHA1" : "SHA256";
    if (c->impl == IMPL_RAW_PKCS11) {
        if (!raw_p11_rsa_key(raw, opt.p11_rsa_key, n, &nlen, e, &elen))
            die(c->name);
        pub = bench_rsa_pub(deflt, n, nlen, e, elen);
    } else if (is_raw_esys(c->impl)) {
        if (!raw_esys_rsa_key(esys_of(c->impl), opt.tpm_rsa_handle_num, n, &nlen, e, &elen))
            die(c->name);
        pub = bench_rsa_pub(deflt, n, nlen, e, elen);
    } else {
        const char *uri = c->impl == IMPL_PKCS11 ? opt.p11_rsa_uri
                          : c->impl == IMPL_TPM  ? tpm_rsa_uri
                                                 : NULL;

        c->own = uri != NULL ? store_load(c->L, uri) : bench_rsa_keygen(c->L, 2048);
        if (c->own == NULL) {
            fprintf(stderr, "keyx-bench: %s: %s\n", c->name,
                    uri != NULL ? "cannot load the RSA key by URI" : "RSA key generation failed");
            die(c->name);
        }
        expect_provider(c, c->own);
        pub = bench_rsa_pub_of(deflt, c->own);
    }
    if (pub == NULL) {
        fprintf(stderr, "keyx-bench: %s: cannot read the RSA public key\n", c->name);
        die(c->name);
    }
    ok = bench_ct_pool_make(&c->pool, deflt, pub, c->md, (size_t)opt.npeers);
    EVP_PKEY_free(pub);
    if (!ok)
        die("encrypting the ciphertext pool");
    ok = rsa_decrypt(c, 0, pt, &ptlen) && bench_ct_pool_check(&c->pool, pt, ptlen);
    OPENSSL_cleanse(pt, sizeof(pt));
    if (!ok) {
        fprintf(stderr,
                "keyx-bench: %s: the decrypted key differs from the one the default provider "
                "encrypted (or the decrypt failed)\n",
                c->name);
        die(c->name);
    }
    if (c->impl == IMPL_PKCS11 && raw != NULL)
        expect_token(c);
    ERR_clear_error();
}

/* One signature of sign_dgst by the cell's key into sig. */
static int sign_once(cell *c, unsigned char *sig, size_t *siglen)
{
    int pss = c->op == OP_PSS_SIGN;

    if (is_raw_esys(c->impl)) {
        *siglen = 64;
        return raw_esys_sign(esys_of(c->impl), sign_dgst, sig);
    }
    if (c->impl == IMPL_RAW_PKCS11)
        return raw_p11_sign(raw, c->signkey, pss, sign_dgst, sizeof(sign_dgst), sig, siglen);
    return bench_sign(c->L, c->own, pss, sign_dgst, sizeof(sign_dgst), sig, siglen);
}

/* Signature cell: its key (generated, or the token key by URI / by label), its public key in the
 * default provider, and one signature verified by the default provider before timing. */
static void setup_sign(cell *c)
{
    OSSL_LIB_CTX *deflt = libctx[IMPL_DEFAULT];
    int rsa = c->op == OP_PSS_SIGN;
    unsigned char a[1024], b[16], sig[1024], *enc = NULL;
    size_t alen = sizeof(a), blen = sizeof(b), siglen = sizeof(sig), enclen;
    EVP_PKEY *pub = NULL;
    int ok;

    c->L = libctx[c->impl];
    if (c->impl == IMPL_RAW_PKCS11) {
        if (!raw_p11_sign_key(raw, rsa ? opt.p11_sign_rsa_key : opt.p11_sign_key, rsa, &c->signkey,
                              a, &alen, b, &blen))
            die(c->name);
        pub = rsa ? bench_rsa_pub(deflt, a, alen, b, blen)
                  : bench_pub_import(deflt, &algs[ALG_P256], a, alen);
    } else if (is_raw_esys(c->impl)) {
        if (!raw_esys_sign_key(esys_of(c->impl), opt.tpm_sign_handle_num, a))
            die(c->name);
        pub = bench_pub_import(deflt, &algs[ALG_P256], a, 65);
    } else {
        const char *uri = c->impl == IMPL_TPM      ? tpm_sign_uri
                          : c->impl != IMPL_PKCS11 ? NULL
                          : rsa                    ? opt.p11_sign_rsa_uri
                                                   : opt.p11_sign_uri;

        c->own = uri != NULL ? store_load(c->L, uri)
                 : rsa       ? bench_rsa_keygen(c->L, 2048)
                             : bench_keygen(c->L, &algs[ALG_P256]);
        if (c->own == NULL) {
            fprintf(stderr, "keyx-bench: %s: %s\n", c->name,
                    uri != NULL ? "cannot load the signature key by URI" : "key generation failed");
            die(c->name);
        }
        expect_provider(c, c->own);
        if (rsa)
            pub = bench_rsa_pub_of(deflt, c->own);
        else if ((enclen = EVP_PKEY_get1_encoded_public_key(c->own, &enc)) > 0)
            pub = bench_pub_import(deflt, &algs[ALG_P256], enc, enclen);
        OPENSSL_free(enc);
    }
    if (pub == NULL) {
        fprintf(stderr, "keyx-bench: %s: cannot read the public key\n", c->name);
        die(c->name);
    }
    ok = sign_once(c, sig, &siglen) &&
         bench_verify(deflt, pub, rsa, sign_dgst, sizeof(sign_dgst), sig, siglen,
                      (c->impl == IMPL_RAW_PKCS11 || is_raw_esys(c->impl)) && !rsa);
    EVP_PKEY_free(pub);
    if (!ok) {
        fprintf(stderr,
                "keyx-bench: %s: the signature does not verify with the default provider (or "
                "signing failed)\n",
                c->name);
        die(c->name);
    }
    if (c->impl == IMPL_PKCS11 && raw != NULL)
        expect_token(c);
    ERR_clear_error();
}

#if OPENSSL_VERSION_NUMBER >= 0x30200000L
/* One HPKE open of pool message i into out (*outlen in: size). */
static int hpke_open(cell *c, size_t i, unsigned char *out, size_t *outlen)
{
    return bench_hpke_open(c->L, c->own, c->pool.ct[i % c->pool.n], c->pool.ctlen, out, outlen);
}

/* HPKE cell: its key (generated, or the static-derive key of the token / TPM by URI), its pool
 * of messages sealed by the default provider to that key, and one open compared with the
 * message that was sealed. */
static void setup_hpke(cell *c)
{
    unsigned char *pub = NULL, pt[256];
    size_t publen, ptlen = sizeof(pt);
    const char *uri = c->impl == IMPL_PKCS11 ? opt.p11_uri : c->impl == IMPL_TPM ? tpm_uri : NULL;
    int ok;

    c->L = libctx[c->impl];
    c->own = uri != NULL ? store_load(c->L, uri) : bench_keygen(c->L, &algs[ALG_P256]);
    if (c->own == NULL) {
        fprintf(stderr, "keyx-bench: %s: %s\n", c->name,
                uri != NULL ? "cannot load the static key by URI" : "key generation failed");
        die(c->name);
    }
    expect_provider(c, c->own);
    if ((publen = EVP_PKEY_get1_encoded_public_key(c->own, &pub)) == 0)
        die(c->name);
    ok = bench_hpke_pool_make(&c->pool, libctx[IMPL_DEFAULT], pub, publen, (size_t)opt.npeers);
    OPENSSL_free(pub);
    if (!ok)
        die("sealing the HPKE message pool");
    ok = hpke_open(c, 0, pt, &ptlen) && bench_ct_pool_check(&c->pool, pt, ptlen);
    OPENSSL_cleanse(pt, sizeof(pt));
    if (!ok) {
        fprintf(stderr,
                "keyx-bench: %s: the opened message differs from the one the default provider "
                "sealed (or the open failed)\n",
                c->name);
        die(c->name);
    }
    if (c->impl == IMPL_PKCS11 && raw != NULL)
        expect_token(c);
    ERR_clear_error();
}
#endif

/* Prepares a cell and cross-checks one secret against the default provider. */
static void setup(cell *c)
{
    OSSL_LIB_CTX *deflt = libctx[IMPL_DEFAULT];
    unsigned char secret[1024], *pub = NULL;
    const unsigned char *tpub;
    size_t publen = 0;
    int ok = 0;

    if (is_sign(c->op)) {
        setup_sign(c);
        return;
    }
#if OPENSSL_VERSION_NUMBER >= 0x30200000L
    if (c->op == OP_HPKE_OPEN) {
        setup_hpke(c);
        return;
    }
#endif
    if (is_rsa(c->alg)) {
        setup_rsa(c);
        return;
    }
    c->L = libctx[c->impl];
    c->peers = &peers[c->alg - algs];
    if (is_raw_esys(c->impl)) {
        unsigned char epub[65];

        if (c->op == OP_DERIVE)
            ok = raw_esys_derive(esys_of(c->impl), c->peers->pub[0], c->peers->publen[0], secret) &&
                 bench_check_secret(deflt, c->peers, raw_esys_pub(esys_of(c->impl)), 65, secret,
                                    c->alg->secretlen);
        else
            ok = raw_esys_keygen_derive(esys_of(c->impl), c->peers->pub[0], c->peers->publen[0],
                                        secret, epub) &&
                 bench_check_secret(deflt, c->peers, epub, sizeof(epub), secret, c->alg->secretlen);
        OPENSSL_cleanse(secret, sizeof(secret));
    } else if (is_raw_p11(c->impl)) {
        raw_p11 *r = raw_of(c->impl);

        switch (c->op) {
        case OP_DERIVE:
            ok = raw_p11_keygen(r, c->alg, dh_domain, &c->rawkey, &pub, &publen) &&
                 raw_p11_derive(r, c->alg, c->rawkey, c->peers->pub[0], c->peers->publen[0],
                                secret) &&
                 bench_check_secret(deflt, c->peers, pub, publen, secret, c->alg->secretlen);
            OPENSSL_free(pub);
            break;
        case OP_STATIC_DERIVE:
            ok = raw_p11_token_pub(r, &tpub, &publen) &&
                 raw_p11_derive(r, c->alg, 0, c->peers->pub[0], c->peers->publen[0], secret) &&
                 bench_check_secret(deflt, c->peers, tpub, publen, secret, c->alg->secretlen);
            break;
        case OP_KEYGEN_DERIVE: {
            unsigned long k = 0;

            ok = raw_p11_keygen(r, c->alg, dh_domain, &k, &pub, &publen) &&
                 raw_p11_derive(r, c->alg, k, c->peers->pub[0], c->peers->publen[0], secret) &&
                 bench_check_secret(deflt, c->peers, pub, publen, secret, c->alg->secretlen);
            if (k != 0)
                raw_p11_destroy(r, k);
            OPENSSL_free(pub);
            break;
        }
        default:
            break;
        }
        OPENSSL_cleanse(secret, sizeof(secret));
    } else {
        op_id op = base_op(c->op);
        /* the remote token is the same token (same label): the same URI */
        const char *uri = c->impl == IMPL_TPM ? tpm_uri : opt.p11_uri;
        EVP_PKEY *k = NULL;

        if (op == OP_STATIC_DERIVE)
            k = store_load(c->L, uri);
        else if (c->impl == IMPL_TPM && op == OP_DERIVE && tpm_own != NULL &&
                 EVP_PKEY_up_ref(tpm_own))
            k = tpm_own;
        else
            k = bench_keygen(c->L, c->alg);

        if (k == NULL) {
            fprintf(stderr, "keyx-bench: %s: %s\n", c->name,
                    op == OP_STATIC_DERIVE ? "cannot load the static key by URI"
                                           : "key generation failed");
            die(c->name);
        }
        expect_provider(c, k);
        ok = bench_check_against_default(c->L, deflt, k, c->peers);
        if (op == OP_KEYGEN_DERIVE)
            EVP_PKEY_free(k);
        else
            c->own = k;
        if (c->impl == IMPL_TPM && op == OP_DERIVE)
            tpm_own = k;
        if (ok && op != c->op) {
            if ((c->ready = OPENSSL_zalloc(c->peers->n * sizeof(*c->ready))) == NULL)
                die(c->name);
            for (size_t i = 0; i < c->peers->n; i++)
                if ((c->ready[i] = bench_pub_import(c->L, c->alg, c->peers->pub[i],
                                                    c->peers->publen[i])) == NULL)
                    die(c->name);
        }
    }
    if (!ok) {
        fprintf(stderr,
                "keyx-bench: %s: the secret differs from the default provider's (or the "
                "cross-check failed)\n",
                c->name);
        die(c->name);
    }
    if (is_keyx_p11(c->impl))
        expect_token(c);
    ERR_clear_error();
}

/* ---- one operation ---------------------------------------------------------------------- */

/* A "(ready)" derive: own with pool peer i, already imported into the cell's libctx. */
static int derive_ready(cell *c, EVP_PKEY *own, size_t i)
{
    unsigned char secret[1024];
    size_t len = sizeof(secret);
    int ok = bench_derive(c->L, own, c->ready[i % c->peers->n], secret, &len);

    OPENSSL_cleanse(secret, len);
    return ok;
}

/* One operation; *next picks the peer (each thread has its own counter). */
static int run_once(cell *c, size_t *next)
{
    if (is_sign(c->op)) {
        unsigned char sig[1024];
        size_t len = sizeof(sig);

        (*next)++;
        return sign_once(c, sig, &len);
    }
#if OPENSSL_VERSION_NUMBER >= 0x30200000L
    if (c->op == OP_HPKE_OPEN) {
        unsigned char pt[256];
        size_t len = sizeof(pt);
        int ok = hpke_open(c, (*next)++, pt, &len);

        OPENSSL_cleanse(pt, sizeof(pt));
        return ok;
    }
#endif
    if (is_rsa(c->alg)) {
        unsigned char pt[1024];
        size_t len = sizeof(pt);
        int ok = rsa_decrypt(c, (*next)++, pt, &len);

        OPENSSL_cleanse(pt, len < sizeof(pt) ? len : sizeof(pt));
        return ok;
    }
    if (is_raw_esys(c->impl)) {
        bench_peers *pp = c->peers;
        size_t i = (*next)++ % pp->n;
        unsigned char secret[32], epub[65];
        int ok =
            base_op(c->op) == OP_KEYGEN_DERIVE
                ? raw_esys_keygen_derive(esys_of(c->impl), pp->pub[i], pp->publen[i], secret, epub)
                : raw_esys_derive(esys_of(c->impl), pp->pub[i], pp->publen[i], secret);

        OPENSSL_cleanse(secret, sizeof(secret));
        return ok;
    }
    if (is_raw_p11(c->impl)) {
        raw_p11 *r = raw_of(c->impl);
        bench_peers *pp = c->peers;
        size_t i = (*next)++ % pp->n;
        unsigned char secret[512];
        int ok;

        switch (base_op(c->op)) {
        case OP_DERIVE:
            ok = raw_p11_derive(r, c->alg, c->rawkey, pp->pub[i], pp->publen[i], secret);
            break;
        case OP_STATIC_DERIVE:
            ok = raw_p11_derive(r, c->alg, 0, pp->pub[i], pp->publen[i], secret);
            break;
        default:
            ok = raw_p11_keygen_derive(r, c->alg, dh_domain, pp->pub[i], pp->publen[i], secret);
            break;
        }
        OPENSSL_cleanse(secret, c->alg->secretlen);
        return ok;
    }
    if (base_op(c->op) == OP_KEYGEN_DERIVE) {
        EVP_PKEY *k = bench_keygen(c->L, c->alg);
        unsigned char *pub = NULL;
        int ok = k != NULL &&
                 (c->impl == IMPL_TPM2_OPENSSL ? bench_encoded_pub(k, &pub)
                                               : EVP_PKEY_get1_encoded_public_key(k, &pub)) != 0 &&
                 (c->ready != NULL ? derive_ready(c, k, (*next)++)
                                   : bench_derive_fresh_peer(c->L, k, c->peers, (*next)++));

        OPENSSL_free(pub);
        EVP_PKEY_free(k);
        return ok;
    }
    if (c->ready != NULL)
        return derive_ready(c, c->own, (*next)++);
    return bench_derive_fresh_peer(c->L, c->own, c->peers, (*next)++);
}

static void measure(cell *c)
{
    long n = 0;
    double t0 = clock_s(CLOCK_MONOTONIC), c0 = clock_s(CLOCK_PROCESS_CPUTIME_ID), t = t0;

    do {
        if (!run_once(c, &c->next))
            die(c->name);
        n++;
        t = clock_s(CLOCK_MONOTONIC);
    } while (t - t0 < opt.seconds);
    c->ops[c->nrounds] = (double)n / (t - t0);
    c->cpu_us[c->nrounds] = (clock_s(CLOCK_PROCESS_CPUTIME_ID) - c0) / (double)n * 1e6;
    c->nrounds++;
}

typedef struct worker {
    cell *c;
    pthread_barrier_t *start;
    size_t next;
    long n;
    double seconds, cpu;
    int ok;
} worker;

static void *worker_main(void *arg)
{
    worker *w = arg;
    double t0, t = 0, c0;

    w->ok = !is_raw_p11(w->c->impl) || raw_p11_thread_begin(raw_of(w->c->impl));
    pthread_barrier_wait(w->start);
    if (!w->ok)
        return NULL;
    t0 = clock_s(CLOCK_MONOTONIC);
    c0 = clock_s(CLOCK_THREAD_CPUTIME_ID);
    do {
        if (!run_once(w->c, &w->next)) {
            w->ok = 0;
            break;
        }
        w->n++;
        t = clock_s(CLOCK_MONOTONIC);
    } while (t - t0 < opt.seconds);
    w->seconds = t - t0;
    w->cpu = clock_s(CLOCK_THREAD_CPUTIME_ID) - c0;
    if (is_raw_p11(w->c->impl))
        raw_p11_thread_end(raw_of(w->c->impl));
    return NULL;
}

/* The cell run by opt.threads threads at once (own peer counters; own sessions for raw). */
static void measure_threads(cell *c, int round)
{
    pthread_t tid[64];
    worker w[64];
    pthread_barrier_t start;
    double rate = 0, cpu = 0, wall = 0;
    int nt = opt.threads, ok = 1;

    pthread_barrier_init(&start, NULL, (unsigned)nt);
    for (int i = 0; i < nt; i++) {
        w[i] = (worker){.c = c, .start = &start, .next = (size_t)i * 7919};
        if (pthread_create(&tid[i], NULL, worker_main, &w[i]) != 0) {
            fprintf(stderr, "keyx-bench: cannot start a thread\n");
            exit(1);
        }
    }
    for (int i = 0; i < nt; i++) {
        pthread_join(tid[i], NULL);
        ok &= w[i].ok;
        if (w[i].ok) {
            rate += (double)w[i].n / w[i].seconds;
            cpu += w[i].cpu;
            wall += w[i].seconds;
        }
    }
    pthread_barrier_destroy(&start);
    if (!ok)
        die(c->name);
    c->mt_ops[round] = rate;
    c->mt_busy[round] = wall > 0 ? cpu / wall : 0;
}

/* Cryptoki calls per operation of a pkcs11 cell, counted over opt.count_ops untimed ones; for
 * the remote cells also the writes to p11-kit's socket (keyx-pkcs11-remote: those only). */
static void count_calls(cell *c)
{
    unsigned long n[RAW_P11_NCOUNTED];
    raw_p11 *r = c->impl == IMPL_PKCS11_REMOTE ? NULL : raw_of(c->impl);
    long long w0, w1;

    if (r != NULL && !raw_p11_count_begin(r))
        return;
    w0 = thread_writes();
    for (long i = 0; i < opt.count_ops; i++)
        if (!run_once(c, &c->next)) {
            if (r != NULL)
                raw_p11_count_end(r, n);
            die(c->name);
        }
    w1 = thread_writes();
    if (is_remote(c->impl) && w0 >= 0 && w1 >= w0) {
        c->rpc_writes = (double)(w1 - w0) / (double)opt.count_ops;
        c->rpc_ops = opt.count_ops;
    }
    if (r == NULL)
        return;
    raw_p11_count_end(r, n);
    for (int i = 0; i < RAW_P11_NCOUNTED; i++)
        c->calls[i] = (double)n[i] / (double)opt.count_ops;
    c->calls_ops = opt.count_ops;
}

/* --count-tpm: the TPM commands of a TPM cell per operation, counted by the proxy over
 * opt.count_ops untimed operations after one that is not counted (a first use may connect,
 * load a key or start a session). */
static void count_tpm(cell *c)
{
    unsigned long n[TPM_COUNT_SLOTS];
    long ops = opt.count_ops > 0 ? opt.count_ops : 1;

    if (!run_once(c, &c->next))
        die(c->name);
    tpm_count_read(n, 1);
    for (long i = 0; i < ops; i++)
        if (!run_once(c, &c->next))
            die(c->name);
    tpm_count_read(n, 1);
    c->tpm_ops = ops;
    for (unsigned k = 0; k < TPM_COUNT_SLOTS; k++) {
        if (n[k] == 0)
            continue;
        c->tpm_total += (double)n[k] / (double)ops;
        if (c->tpm_kinds < TPM_CC_KINDS) {
            c->tpm_cc[c->tpm_kinds] = tpm_count_cc(k);
            c->tpm_per_op[c->tpm_kinds++] = (double)n[k] / (double)ops;
        }
    }
}

static void print_tpm_counts(void)
{
    char buf[16];

    if (!opt.json) {
        printf("TPM commands per operation (counted on the wire between this process and swtpm, "
               "over %ld untimed operations per cell)\n",
               opt.count_ops > 0 ? opt.count_ops : 1);
        printf("%-18s %-10s %-20s %6s  %s\n", "impl", "alg", "op", "total", "commands");
    } else {
        printf("{\"tpm_commands\": [");
    }
    for (size_t i = 0, first = 1; i < ncells; i++) {
        const cell *c = &cells[i];

        if (c->tpm_ops == 0)
            continue;
        if (opt.json)
            printf("%s\n  {\"impl\": \"%s\", \"alg\": \"%s\", \"op\": \"%s\", \"ops\": %ld, "
                   "\"total\": %.4f, \"commands\": {",
                   first ? "" : ",", impl_names[c->impl], c->alg->name, op_names[c->op], c->tpm_ops,
                   c->tpm_total);
        else
            printf("%-18s %-10s %-20s %6.2f ", impl_names[c->impl], c->alg->name, op_names[c->op],
                   c->tpm_total);
        for (int k = 0; k < c->tpm_kinds; k++) {
            const char *name =
                c->tpm_cc[k] != 0 ? tpm_count_name(c->tpm_cc[k], buf, sizeof(buf)) : "other";

            if (opt.json)
                printf("%s\"%s\": %.4f", k ? ", " : "", name, c->tpm_per_op[k]);
            else
                printf(" %s %.2f", name, c->tpm_per_op[k]);
        }
        printf(opt.json ? "}}" : "\n");
        first = 0;
    }
    if (opt.json)
        printf("\n]}\n");
}

static double calls_total(const cell *c)
{
    double t = 0;

    for (int i = 0; i < RAW_P11_NCOUNTED; i++)
        t += c->calls[i];
    return t;
}

static void measure_memory(cell *c)
{
    long before, after;

    /* The first operations after the timed rounds must not count allocator warm-up: a few
     * hundred untimed ones first. */
    for (int i = 0; i < 200; i++)
        if (!run_once(c, &c->next))
            die(c->name);
    long n = is_tpm(c->impl) && opt.tpm_mem_ops < opt.mem_ops ? opt.tpm_mem_ops : opt.mem_ops;

    before = rss_kb();
    for (long i = 0; i < n; i++)
        if (!run_once(c, &c->next))
            die(c->name);
    after = rss_kb();
    c->mem_ops = n;
    c->mem_growth_kb = after - before;
    c->mem_done = before >= 0 && after >= 0;
}

/* ---- statistics and output --------------------------------------------------------------- */

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;

    return x < y ? -1 : x > y;
}

static double median_of(const double *v, int n)
{
    double s[MAX_ROUNDS];

    memcpy(s, v, (size_t)n * sizeof(*v));
    qsort(s, (size_t)n, sizeof(*s), cmp_double);
    return n % 2 ? s[n / 2] : (s[n / 2 - 1] + s[n / 2]) / 2;
}

static void summarize(cell *c)
{
    c->median = median_of(c->ops, c->nrounds);
    c->cpu_median = median_of(c->cpu_us, c->nrounds);
    if (opt.threads > 1) {
        c->mt_median = median_of(c->mt_ops, c->nrounds);
        c->mt_busy_median = median_of(c->mt_busy, c->nrounds);
    }
    c->min = c->max = c->ops[0];
    for (int i = 1; i < c->nrounds; i++) {
        if (c->ops[i] < c->min)
            c->min = c->ops[i];
        if (c->ops[i] > c->max)
            c->max = c->ops[i];
    }
}

static const cell *find_cell(impl_id impl, const bench_alg *alg, op_id op)
{
    /* raw Cryptoki and ESYS take the peer's bytes: their "(ready)" figure is their plain one */
    if (is_raw_p11(impl) || is_raw_esys(impl))
        op = base_op(op);
    /* raw: an HPKE open's floor is the static derive of the same key (the DH in the device) */
    if ((impl == IMPL_RAW_PKCS11 || is_raw_esys(impl)) && op == OP_HPKE_OPEN)
        op = OP_STATIC_DERIVE;
    /* raw ESYS: static-derive is its derive (one ZGen of the persistent key) */
    if (is_raw_esys(impl) && op == OP_STATIC_DERIVE)
        op = OP_DERIVE;
    for (size_t i = 0; i < ncells; i++)
        if (cells[i].impl == impl && cells[i].alg == alg && cells[i].op == op)
            return &cells[i];
    return NULL;
}

/* Writes to p11-kit's socket per call, from the raw remote rows (whose calls are counted in their
 * own function list); 0 when there is none. */
static double rpc_writes_per_call(void)
{
    double w = 0, calls = 0;

    for (size_t i = 0; i < ncells; i++)
        if (cells[i].impl == IMPL_RAW_PKCS11_REMOTE && cells[i].rpc_ops > 0 &&
            cells[i].calls_ops > 0) {
            w += cells[i].rpc_writes;
            calls += calls_total(&cells[i]);
        }
    return calls > 0 ? w / calls : 0;
}

/* The remote cells' requests to p11-kit's server per operation: keyx's, whose client instance is
 * its own, are its socket writes divided by the writes per call of the raw remote rows. */
static void print_rpc_table(void)
{
    double wpc = rpc_writes_per_call();
    int head = 0;

    for (size_t i = 0; i < ncells; i++) {
        const cell *c = &cells[i];

        if (c->rpc_ops == 0)
            continue;
        if (!head++) {
            printf("\np11-kit RPC per operation (write(2) calls of the thread over %ld untimed "
                   "operations; raw rows: calls counted in their function list)\n",
                   c->rpc_ops);
            printf("%-18s %-10s %-20s %9s %9s\n", "impl", "alg", "op", "writes", "calls");
        }
        if (c->calls_ops > 0)
            printf("%-18s %-10s %-20s %9.2f %9.2f\n", impl_names[c->impl], c->alg->name,
                   op_names[c->op], c->rpc_writes, calls_total(c));
        else if (wpc > 0)
            printf("%-18s %-10s %-20s %9.2f %9.2f  (writes / %.2f writes per call)\n",
                   impl_names[c->impl], c->alg->name, op_names[c->op], c->rpc_writes,
                   c->rpc_writes / wpc, wpc);
        else
            printf("%-18s %-10s %-20s %9.2f %9s\n", impl_names[c->impl], c->alg->name,
                   op_names[c->op], c->rpc_writes, "-");
    }
}

static void print_table(void)
{
    printf("keyx-bench: %d rounds x %.2f s per cell, interleaved; ops/s = median of rounds "
           "(wall clock), min-max over rounds; cpu = median CPU us per op\n",
           opt.rounds, opt.seconds);
    if (steal_pct >= 0)
        printf("host steal during the rounds: %.1f %% of this VM's CPU time went to other guests "
               "(it lowers every rate of the run alike; ratios hold)\n",
               steal_pct);
    if (!bench_validate_peer)
        printf("DIAGNOSTIC RUN: peers set without validation (--no-peer-validation); libssl "
               "validates\n");
    printf("\n");
    printf("%-18s %-10s %-20s %10s %21s %9s  %s\n", "impl", "alg", "op", "ops/s", "min-max",
           "cpu us/op", "secret");
    for (size_t i = 0; i < ncells; i++) {
        const cell *c = &cells[i];
        char spread[48];

        snprintf(spread, sizeof(spread), "%.0f-%.0f", c->min, c->max);
        printf("%-18s %-10s %-20s %10.0f %21s %9.1f  %s\n", impl_names[c->impl], c->alg->name,
               op_names[c->op], c->median, spread, c->cpu_median, "ok");
    }
    printf("\nratios (median / median, same run)\n");
    printf("%-37s %-10s %-20s %7s %7s\n", "ratio", "alg", "op", "value", "target");
    for (size_t r = 0; r < sizeof(RATIOS) / sizeof(RATIOS[0]); r++)
        for (int a = 0; a < N_ALG; a++) {
            const cell *n = find_cell(RATIOS[r].num, &algs[a], RATIOS[r].op);
            const cell *d = find_cell(RATIOS[r].den, &algs[a], RATIOS[r].op);
            char name[64], target[16] = "-";

            if (n == NULL || d == NULL)
                continue;
            snprintf(name, sizeof(name), "%s/%s", impl_names[RATIOS[r].num],
                     impl_names[RATIOS[r].den]);
            if (RATIOS[r].target > 0)
                snprintf(target, sizeof(target), ">=%.2f", RATIOS[r].target);
            printf("%-37s %-10s %-20s %7.3f %7s%s", name, algs[a].name, op_names[RATIOS[r].op],
                   n->median / d->median, target,
                   RATIOS[r].target > 0 && n->median / d->median < RATIOS[r].target
                       ? "  BELOW TARGET"
                       : "");
            /* a denominator of another operation is named (the floor of an HPKE open) */
            if (RATIOS[r].op == OP_HPKE_OPEN && d->op != OP_HPKE_OPEN)
                printf("  floor: %s %s (the device's DH of an open)", impl_names[d->impl],
                       op_names[d->op]);
            printf("\n");
        }
    /* --only can leave out the raw rows an open's floor ratio needs: say which to select */
    if ((find_cell(IMPL_PKCS11, &algs[ALG_P256], OP_HPKE_OPEN) != NULL &&
         find_cell(IMPL_RAW_PKCS11, &algs[ALG_P256], OP_HPKE_OPEN) == NULL) ||
        (find_cell(IMPL_TPM, &algs[ALG_P256], OP_HPKE_OPEN) != NULL &&
         find_cell(IMPL_RAW_ESYS_SESS, &algs[ALG_P256], OP_HPKE_OPEN) == NULL))
        printf("(hpke-open floors: select the raw rows too, e.g. --only "
               "'hpke-open|^raw-pkcs11/P-256/static-derive$|^raw-esys(-sess)?/P-256/derive$')\n");
    for (size_t r = 0, head = 0; r < sizeof(ABSOLUTE) / sizeof(ABSOLUTE[0]); r++) {
        const cell *c = find_cell(ABSOLUTE[r].impl, &algs[ABSOLUTE[r].alg], ABSOLUTE[r].op);
        char target[16];

        if (c == NULL)
            continue;
        if (!head++) {
            printf("\nabsolute targets (median ops/s)\n");
            printf("%-37s %-10s %-20s %7s %7s  %s\n", "impl", "alg", "op", "ops/s", "target",
                   "anchor");
        }
        snprintf(target, sizeof(target), ">=%.0f", ABSOLUTE[r].target);
        printf("%-37s %-10s %-20s %7.0f %7s  %s%s\n", impl_names[c->impl], c->alg->name,
               op_names[c->op], c->median, target, ABSOLUTE[r].anchor,
               c->median < ABSOLUTE[r].target ? "  BELOW TARGET" : "");
    }
    if (opt.threads > 1) {
        printf("\n%d threads (same rounds; each thread its own peers%s)\n", opt.threads,
               raw != NULL ? ", raw rows their own sessions" : "");
        printf("%-18s %-10s %-20s %10s %10s %8s %9s\n", "impl", "alg", "op", "1 thread", "threads",
               "scaling", "cpu/wall");
        for (size_t i = 0; i < ncells; i++) {
            const cell *c = &cells[i];

            printf("%-18s %-10s %-20s %10.0f %10.0f %8.3f %9.2f\n", impl_names[c->impl],
                   c->alg->name, op_names[c->op], c->median, c->mt_median, c->mt_median / c->median,
                   c->mt_busy_median);
        }
    }
    if ((raw != NULL || raw_remote != NULL) && opt.count_ops > 0) {
        printf("\nCryptoki calls per operation (counted over %ld untimed operations per cell)\n",
               opt.count_ops);
        printf("%-18s %-10s %-20s %6s  %s\n", "impl", "alg", "op", "total", "calls");
        for (size_t i = 0; i < ncells; i++) {
            const cell *c = &cells[i];

            if (c->calls_ops == 0)
                continue;
            printf("%-18s %-10s %-20s %6.2f ", impl_names[c->impl], c->alg->name, op_names[c->op],
                   calls_total(c));
            for (int k = 0; k < RAW_P11_NCOUNTED; k++)
                if (c->calls[k] > 0)
                    printf(" %s %.2f", raw_p11_count_name(k) + 2, c->calls[k]);
            printf("\n");
        }
    }
    print_rpc_table();
    if (opt.mem_ops > 0) {
        printf("\nmemory (resident set growth over N more operations after the rounds)\n");
        printf("%-18s %-10s %-20s %9s %12s %10s\n", "impl", "alg", "op", "N", "growth kB",
               "bytes/op");
        for (size_t i = 0; i < ncells; i++) {
            const cell *c = &cells[i];

            if (c->mem_done)
                printf("%-18s %-10s %-20s %9ld %12ld %10.1f\n", impl_names[c->impl], c->alg->name,
                       op_names[c->op], c->mem_ops, c->mem_growth_kb,
                       (double)c->mem_growth_kb * 1024.0 / (double)c->mem_ops);
        }
    }
}

static void print_json(void)
{
    int first = 1;

    printf("{\"rounds\": %d, \"seconds\": %g, \"peer_validation\": %s, \"threads\": %d, "
           "\"steal_pct\": %.2f, \"cells\": [",
           opt.rounds, opt.seconds, bench_validate_peer ? "true" : "false", opt.threads, steal_pct);
    for (size_t i = 0; i < ncells; i++) {
        const cell *c = &cells[i];

        printf("%s\n  {\"impl\": \"%s\", \"alg\": \"%s\", \"op\": \"%s\", \"ops_per_s\": %.4f, "
               "\"min\": %.4f, \"max\": %.4f, \"cpu_us_per_op\": %.4f, \"secret_check\": true, "
               "\"rounds\": [",
               i ? "," : "", impl_names[c->impl], c->alg->name, op_names[c->op], c->median, c->min,
               c->max, c->cpu_median);
        for (int r = 0; r < c->nrounds; r++)
            printf("%s%.4f", r ? ", " : "", c->ops[r]);
        printf("]");
        if (opt.threads > 1) {
            printf(", \"threads_ops_per_s\": %.4f, \"scaling\": %.6f, \"threads_cpu_per_wall\": "
                   "%.4f, \"threads_rounds\": [",
                   c->mt_median, c->mt_median / c->median, c->mt_busy_median);
            for (int r = 0; r < c->nrounds; r++)
                printf("%s%.4f", r ? ", " : "", c->mt_ops[r]);
            printf("]");
        }
        if (c->mem_done)
            printf(", \"memory\": {\"ops\": %ld, \"rss_growth_kb\": %ld}", c->mem_ops,
                   c->mem_growth_kb);
        if (c->calls_ops > 0) {
            printf(", \"cryptoki_calls_per_op\": {\"ops\": %ld, \"total\": %.4f", c->calls_ops,
                   calls_total(c));
            for (int k = 0; k < RAW_P11_NCOUNTED; k++)
                if (c->calls[k] > 0)
                    printf(", \"%s\": %.4f", raw_p11_count_name(k), c->calls[k]);
            printf("}");
        }
        if (c->rpc_ops > 0) {
            double wpc = rpc_writes_per_call();

            printf(", \"rpc_writes_per_op\": %.4f", c->rpc_writes);
            if (c->calls_ops == 0 && wpc > 0)
                printf(", \"rpc_calls_per_op_estimated\": %.4f", c->rpc_writes / wpc);
        }
        printf("}");
    }
    printf("\n], \"ratios\": [");
    for (size_t r = 0; r < sizeof(RATIOS) / sizeof(RATIOS[0]); r++)
        for (int a = 0; a < N_ALG; a++) {
            const cell *n = find_cell(RATIOS[r].num, &algs[a], RATIOS[r].op);
            const cell *d = find_cell(RATIOS[r].den, &algs[a], RATIOS[r].op);

            if (n == NULL || d == NULL)
                continue;
            printf("%s\n  {\"num\": \"%s\", \"den\": \"%s\", \"alg\": \"%s\", \"op\": \"%s\", "
                   "\"den_op\": \"%s\", \"ratio\": %.6f",
                   first ? "" : ",", impl_names[RATIOS[r].num], impl_names[RATIOS[r].den],
                   algs[a].name, op_names[RATIOS[r].op], op_names[d->op], n->median / d->median);
            if (RATIOS[r].target > 0)
                printf(", \"target\": %.2f, \"meets_target\": %s", RATIOS[r].target,
                       n->median / d->median >= RATIOS[r].target ? "true" : "false");
            printf("}");
            first = 0;
        }
    printf("\n], \"absolute\": [");
    first = 1;
    for (size_t r = 0; r < sizeof(ABSOLUTE) / sizeof(ABSOLUTE[0]); r++) {
        const cell *c = find_cell(ABSOLUTE[r].impl, &algs[ABSOLUTE[r].alg], ABSOLUTE[r].op);

        if (c == NULL)
            continue;
        printf("%s\n  {\"impl\": \"%s\", \"alg\": \"%s\", \"op\": \"%s\", \"ops_per_s\": %.4f, "
               "\"target\": %.2f, \"anchor\": \"%s\", \"meets_target\": %s}",
               first ? "" : ",", impl_names[c->impl], c->alg->name, op_names[c->op], c->median,
               ABSOLUTE[r].target, ABSOLUTE[r].anchor,
               c->median >= ABSOLUTE[r].target ? "true" : "false");
        first = 0;
    }
    printf("\n]}\n");
}

/* ---- main ------------------------------------------------------------------------------- */

static void usage(FILE *fp)
{
    fprintf(
        fp,
        "usage: keyx-bench [options]\n"
        "  --software-config FILE  openssl.cnf loading keyx with backends = software\n"
        "  --pkcs11-config FILE    openssl.cnf loading keyx with backends = pkcs11\n"
        "  --pkcs11-module PATH    module for the raw Cryptoki rows (default %s)\n"
        "  --pkcs11-token LABEL    token label (raw rows; and the key URI)\n"
        "  --pkcs11-pin-file PATH  file holding the user PIN (raw rows)\n"
        "  --pkcs11-key LABEL      label of the token's P-256 key (default %s)\n"
        "  --pkcs11-key-uri URI    URI keyx loads it by (default pkcs11:token=..;object=..;"
        "type=private)\n"
        "  --pkcs11-remote-config FILE  openssl.cnf loading keyx with backends = pkcs11 on "
        "p11-kit's RPC client module serving the same token (address: P11_KIT_SERVER_ADDRESS): "
        "the keyx-pkcs11-remote and raw-pkcs11-remote rows\n"
        "  --pkcs11-remote-module PATH  p11-kit's client module for the raw remote rows (default "
        "%s)\n"
        "  --tpm-config FILE       openssl.cnf loading keyx with backends = tpm\n"
        "  --tpm-tcti TCTI         TCTI of the same TPM for the raw ESYS rows (e.g. "
        "swtpm:host=127.0.0.1,port=2321)\n"
        "  --tpm-handle 0x81...    persistent ECC P-256 decrypt key (static-derive; raw "
        "derive)\n"
        "  --pkcs11-rsa-key LABEL  token RSA-2048 key for the oaep-decrypt rows (none: no "
        "pkcs11 RSA rows; keyx loads it by pkcs11:token=..;object=LABEL;type=private)\n"
        "  --tpm-rsa-handle 0x81.. persistent RSA-2048 decrypt key for the oaep-decrypt rows "
        "(none: no TPM RSA rows)\n"
        "  --tpm2-openssl-config FILE  openssl.cnf loading tpm2-openssl's provider (\"tpm2\") "
        "preferred, on the TPM of --tpm-tcti (its TCTI: TPM2OPENSSL_TCTI): the tpm2-openssl rows\n"
        "  --tpm-sign-handle 0x81.. persistent P-256 sign key for the TPM ecdsa-sign rows (none: "
        "no TPM sign rows)\n"
        "  --pkcs11-sign-key LABEL token P-256 sign key for the ecdsa-sign rows (none: no pkcs11 "
        "ECDSA rows)\n"
        "  --pkcs11-sign-rsa-key LABEL  token RSA-2048 sign key for the pss-sign rows (none: no "
        "pkcs11 PSS rows)\n"
        "  --tpm-mem-ops N         at most N operations for TPM memory figures (default %ld)\n"
        "  --rounds N              interleaved rounds (default %d)\n"
        "  --seconds S             seconds per cell per round (default %.1f)\n"
        "  --peers N               peer public keys (RSA ciphertexts, HPKE messages) per pool "
        "(default %d)\n"
        "  --mem-ops N             operations for the memory figure, 0 = off (default %ld)\n"
        "  --mem-alg NAME          algorithm whose cells get a memory figure (default %s)\n"
        "  --threads N             also run every cell with N threads at once (default 1: "
        "off)\n"
        "  --count-ops N           operations over which Cryptoki calls are counted, 0 = off "
        "(default %ld)\n"
        "  --count-tpm             count the TPM commands of every TPM cell on the wire, through "
        "a loopback proxy in front of swtpm, over --count-ops untimed operations each; nothing is "
        "timed in such a run (the proxy adds a hop per command)\n"
        "  --only REGEX            cells whose impl/alg/op matches (POSIX extended)\n"
        "  --json                  JSON on stdout instead of the table\n"
        "  --no-peer-validation    diagnostic: set the peer without EVP's public-key check "
        "(libssl always checks)\n"
        "Without --software-config, --pkcs11-config or --tpm-config those rows are left "
        "out.\n",
        opt.p11_module, opt.p11_key, opt.p11_remote_module, opt.tpm_mem_ops, opt.rounds,
        opt.seconds, opt.npeers, opt.mem_ops, opt.mem_alg, opt.count_ops);
}

static void parse_args(int argc, char **argv)
{
    static const struct option lopts[] = {
        {"software-config", required_argument, NULL, 'S'},
        {"pkcs11-config", required_argument, NULL, 'P'},
        {"pkcs11-module", required_argument, NULL, 'm'},
        {"pkcs11-token", required_argument, NULL, 't'},
        {"pkcs11-pin-file", required_argument, NULL, 'p'},
        {"pkcs11-key", required_argument, NULL, 'k'},
        {"pkcs11-key-uri", required_argument, NULL, 'u'},
        {"pkcs11-remote-config", required_argument, NULL, 'x'},
        {"pkcs11-remote-module", required_argument, NULL, 'y'},
        {"tpm-config", required_argument, NULL, 'X'},
        {"tpm-tcti", required_argument, NULL, 'Y'},
        {"tpm-handle", required_argument, NULL, 'H'},
        {"tpm-mem-ops", required_argument, NULL, 'Z'},
        {"pkcs11-rsa-key", required_argument, NULL, 'R'},
        {"tpm-rsa-handle", required_argument, NULL, 'W'},
        {"tpm2-openssl-config", required_argument, NULL, 'O'},
        {"tpm-sign-handle", required_argument, NULL, 'K'},
        {"pkcs11-sign-key", required_argument, NULL, 'g'},
        {"pkcs11-sign-rsa-key", required_argument, NULL, 'G'},
        {"rounds", required_argument, NULL, 'r'},
        {"seconds", required_argument, NULL, 's'},
        {"peers", required_argument, NULL, 'n'},
        {"mem-ops", required_argument, NULL, 'M'},
        {"mem-alg", required_argument, NULL, 'A'},
        {"count-ops", required_argument, NULL, 'C'},
        {"count-tpm", no_argument, NULL, 'c'},
        {"threads", required_argument, NULL, 'T'},
        {"only", required_argument, NULL, 'o'},
        {"json", no_argument, NULL, 'j'},
        {"no-peer-validation", no_argument, NULL, 'V'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    int ch, li = 0;
    char *end;

    while ((ch = getopt_long(argc, argv, "h", lopts, &li)) != -1) {
        switch (ch) {
        case 'S':
            opt.sw_config = optarg;
            break;
        case 'P':
            opt.p11_config = optarg;
            break;
        case 'm':
            opt.p11_module = optarg;
            break;
        case 't':
            opt.p11_token = optarg;
            break;
        case 'p':
            opt.p11_pin_file = optarg;
            break;
        case 'k':
            opt.p11_key = optarg;
            break;
        case 'u':
            opt.p11_uri = optarg;
            break;
        case 'x':
            opt.p11_remote_config = optarg;
            break;
        case 'y':
            opt.p11_remote_module = optarg;
            break;
        case 'X':
            opt.tpm_config = optarg;
            break;
        case 'Y':
            opt.tpm_tcti = optarg;
            break;
        case 'H':
            opt.tpm_handle = optarg;
            opt.tpm_handle_num = strtoul(optarg, &end, 0);
            if (*end != '\0' || (opt.tpm_handle_num >> 24) != 0x81)
                goto bad;
            break;
        case 'R':
            opt.p11_rsa_key = optarg;
            break;
        case 'g':
            opt.p11_sign_key = optarg;
            break;
        case 'O':
            opt.tpm2_openssl_config = optarg;
            break;
        case 'K':
            opt.tpm_sign_handle = optarg;
            opt.tpm_sign_handle_num = strtoul(optarg, &end, 0);
            if (*end != '\0' || (opt.tpm_sign_handle_num >> 24) != 0x81)
                goto bad;
            break;
        case 'G':
            opt.p11_sign_rsa_key = optarg;
            break;
        case 'W':
            opt.tpm_rsa_handle = optarg;
            opt.tpm_rsa_handle_num = strtoul(optarg, &end, 0);
            if (*end != '\0' || (opt.tpm_rsa_handle_num >> 24) != 0x81)
                goto bad;
            break;
        case 'Z':
            opt.tpm_mem_ops = strtol(optarg, &end, 10);
            if (*end != '\0' || opt.tpm_mem_ops < 0)
                goto bad;
            break;
        case 'r':
            opt.rounds = (int)strtol(optarg, &end, 10);
            if (*end != '\0' || opt.rounds < 1 || opt.rounds > MAX_ROUNDS)
                goto bad;
            break;
        case 's':
            opt.seconds = strtod(optarg, &end);
            if (*end != '\0' || !(opt.seconds > 0 && opt.seconds <= 3600))
                goto bad;
            break;
        case 'n':
            opt.npeers = (int)strtol(optarg, &end, 10);
            if (*end != '\0' || opt.npeers < 1 || opt.npeers > 100000)
                goto bad;
            break;
        case 'M':
            opt.mem_ops = strtol(optarg, &end, 10);
            if (*end != '\0' || opt.mem_ops < 0)
                goto bad;
            break;
        case 'A':
            opt.mem_alg = optarg;
            break;
        case 'T':
            opt.threads = (int)strtol(optarg, &end, 10);
            if (*end != '\0' || opt.threads < 1 || opt.threads > 64)
                goto bad;
            break;
        case 'C':
            opt.count_ops = strtol(optarg, &end, 10);
            if (*end != '\0' || opt.count_ops < 0)
                goto bad;
            break;
        case 'c':
            opt.count_tpm = 1;
            break;
        case 'o':
            opt.only = optarg;
            break;
        case 'j':
            opt.json = 1;
            break;
        case 'V':
            bench_validate_peer = 0;
            break;
        case 'h':
            usage(stdout);
            exit(0);
        default:
            usage(stderr);
            exit(2);
        }
    }
    if (optind != argc) {
        usage(stderr);
        exit(2);
    }
    if (opt.p11_config != NULL && (opt.p11_token == NULL || opt.p11_pin_file == NULL)) {
        fprintf(stderr, "keyx-bench: --pkcs11-config needs --pkcs11-token and --pkcs11-pin-file "
                        "(the raw Cryptoki rows log in to the same token)\n");
        exit(2);
    }
    if (opt.p11_remote_config != NULL && (opt.p11_token == NULL || opt.p11_pin_file == NULL)) {
        fprintf(stderr, "keyx-bench: --pkcs11-remote-config needs --pkcs11-token and "
                        "--pkcs11-pin-file (the token it serves, for the raw remote rows)\n");
        exit(2);
    }
    /* p11-kit's client module reads the server's address in C_GetFunctionList */
    if (opt.p11_remote_config != NULL && getenv("P11_KIT_SERVER_ADDRESS") == NULL) {
        fprintf(stderr, "keyx-bench: --pkcs11-remote-config needs P11_KIT_SERVER_ADDRESS in the "
                        "environment (e.g. unix:path=SOCKET of `p11-kit server`)\n");
        exit(2);
    }
    if (opt.tpm_config != NULL && (opt.tpm_tcti == NULL || opt.tpm_handle == NULL)) {
        fprintf(stderr, "keyx-bench: --tpm-config needs --tpm-tcti and --tpm-handle (the raw ESYS "
                        "rows use the same TPM and its persistent key)\n");
        exit(2);
    }
    if (opt.tpm_sign_handle != NULL && opt.tpm_config == NULL) {
        fprintf(stderr, "keyx-bench: --tpm-sign-handle needs --tpm-config\n");
        exit(2);
    }
    if (opt.tpm_rsa_handle != NULL && opt.tpm_config == NULL) {
        fprintf(stderr, "keyx-bench: --tpm-rsa-handle needs --tpm-config\n");
        exit(2);
    }
    if (opt.count_tpm && opt.tpm_config == NULL && opt.tpm2_openssl_config == NULL) {
        fprintf(stderr, "keyx-bench: --count-tpm needs --tpm-config or --tpm2-openssl-config\n");
        exit(2);
    }
    if ((opt.p11_sign_key != NULL || opt.p11_sign_rsa_key != NULL) && opt.p11_config == NULL) {
        fprintf(stderr, "keyx-bench: --pkcs11-sign-key and --pkcs11-sign-rsa-key need "
                        "--pkcs11-config\n");
        exit(2);
    }
    if (opt.p11_rsa_key != NULL && opt.p11_config == NULL) {
        fprintf(stderr, "keyx-bench: --pkcs11-rsa-key needs --pkcs11-config\n");
        exit(2);
    }
    return;
bad:
    fprintf(stderr, "keyx-bench: bad value '%s' for --%s\n", optarg, lopts[li].name);
    exit(2);
}

int main(int argc, char **argv)
{
    regex_t only;
    char uri[512], rsa_uri[512], sign_uri[512], sign_rsa_uri[512], proxied[128];
    int need[N_IMPL] = {0}, rc = 0, started;

    parse_args(argc, argv);
    if (opt.only != NULL && regcomp(&only, opt.only, REG_EXTENDED | REG_NOSUB) != 0) {
        fprintf(stderr, "keyx-bench: --only: invalid regular expression '%s'\n", opt.only);
        return 2;
    }
    if (opt.tpm_handle != NULL)
        snprintf(tpm_uri, sizeof(tpm_uri), "keyx:tpm:handle=0x%08lX", opt.tpm_handle_num);
    if (opt.p11_uri == NULL && opt.p11_token != NULL) {
        snprintf(uri, sizeof(uri), "pkcs11:token=%s;object=%s;type=private", opt.p11_token,
                 opt.p11_key);
        opt.p11_uri = uri;
    }
    if (opt.tpm_sign_handle != NULL)
        snprintf(tpm_sign_uri, sizeof(tpm_sign_uri), "keyx:tpm:handle=0x%08lX",
                 opt.tpm_sign_handle_num);
    if (opt.tpm_rsa_handle != NULL)
        snprintf(tpm_rsa_uri, sizeof(tpm_rsa_uri), "keyx:tpm:handle=0x%08lX",
                 opt.tpm_rsa_handle_num);
    if (opt.p11_rsa_key != NULL && opt.p11_token != NULL) {
        snprintf(rsa_uri, sizeof(rsa_uri), "pkcs11:token=%s;object=%s;type=private", opt.p11_token,
                 opt.p11_rsa_key);
        opt.p11_rsa_uri = rsa_uri;
    }

    if (opt.p11_sign_key != NULL && opt.p11_token != NULL) {
        snprintf(sign_uri, sizeof(sign_uri), "pkcs11:token=%s;object=%s;type=private",
                 opt.p11_token, opt.p11_sign_key);
        opt.p11_sign_uri = sign_uri;
    }
    if (opt.p11_sign_rsa_key != NULL && opt.p11_token != NULL) {
        snprintf(sign_rsa_uri, sizeof(sign_rsa_uri), "pkcs11:token=%s;object=%s;type=private",
                 opt.p11_token, opt.p11_sign_rsa_key);
        opt.p11_sign_rsa_uri = sign_rsa_uri;
    }
    if (RAND_bytes(sign_dgst, sizeof(sign_dgst)) != 1)
        die("RAND_bytes");

    /* The cells: the plan, less what is not configured or not selected. */
    cells = calloc(sizeof(PLAN) / sizeof(PLAN[0]), sizeof(*cells));
    if (cells == NULL)
        return 1;
    for (size_t i = 0; i < sizeof(PLAN) / sizeof(PLAN[0]); i++) {
        cell *c = &cells[ncells];

        if ((PLAN[i].impl == IMPL_SOFTWARE && opt.sw_config == NULL) ||
            ((PLAN[i].impl == IMPL_PKCS11 || PLAN[i].impl == IMPL_RAW_PKCS11) &&
             opt.p11_config == NULL) ||
            (is_remote(PLAN[i].impl) && opt.p11_remote_config == NULL) ||
            (is_tpm(PLAN[i].impl) && PLAN[i].impl != IMPL_TPM2_OPENSSL && opt.tpm_config == NULL) ||
            (PLAN[i].impl == IMPL_TPM2_OPENSSL && opt.tpm2_openssl_config == NULL) ||
            (is_sign(PLAN[i].op) &&
             (PLAN[i].impl == IMPL_PKCS11 || PLAN[i].impl == IMPL_RAW_PKCS11) &&
             (PLAN[i].op == OP_ECDSA_SIGN ? opt.p11_sign_key : opt.p11_sign_rsa_key) == NULL) ||
            (is_sign(PLAN[i].op) && is_tpm(PLAN[i].impl) && opt.tpm_sign_handle == NULL) ||
            (PLAN[i].alg == ALG_RSA2048 && !is_sign(PLAN[i].op) &&
             (((PLAN[i].impl == IMPL_PKCS11 || PLAN[i].impl == IMPL_RAW_PKCS11) &&
               opt.p11_rsa_key == NULL) ||
              (is_tpm(PLAN[i].impl) && opt.tpm_rsa_handle == NULL))))
            continue;
        c->impl = PLAN[i].impl;
        c->alg = &algs[PLAN[i].alg];
        c->op = PLAN[i].op;
        snprintf(c->name, sizeof(c->name), "%s/%s/%s", impl_names[c->impl], c->alg->name,
                 op_names[c->op]);
        if (opt.only != NULL && regexec(&only, c->name, 0, NULL, 0) != 0)
            continue;
        need[c->impl] = 1;
        ncells++;
    }
#if OPENSSL_VERSION_NUMBER < 0x30200000L
    /* HPKE cells do not exist here: say so when the selection names them */
    for (int i = 0, said = 0; opt.only != NULL && i <= IMPL_TPM && !said; i++) {
        char name[64];

        snprintf(name, sizeof(name), "%s/P-256/hpke-open", impl_names[i]);
        if (!is_raw_esys((impl_id)i) && i != IMPL_RAW_PKCS11 &&
            regexec(&only, name, 0, NULL, 0) == 0 && (said = 1))
            fprintf(stderr,
                    "keyx-bench: no hpke-open cells: HPKE needs OpenSSL >= 3.2 (built "
                    "with %s)\n",
                    OPENSSL_VERSION_TEXT);
    }
#endif
    if (opt.only != NULL)
        regfree(&only);
    if (ncells == 0) {
        fprintf(stderr, "keyx-bench: no cell selected\n");
        return 2;
    }

    /* The default provider always: peers and cross-checks come from it. */
    if ((libctx[IMPL_DEFAULT] = OSSL_LIB_CTX_new()) == NULL ||
        (default_prov = OSSL_PROVIDER_load(libctx[IMPL_DEFAULT], "default")) == NULL)
        die("loading the default provider");
    if (need[IMPL_SOFTWARE])
        libctx[IMPL_SOFTWARE] = keyx_libctx(opt.sw_config);
    if (need[IMPL_PKCS11])
        libctx[IMPL_PKCS11] = keyx_libctx(opt.p11_config);
    /* keyx-pkcs11 cells use it too: to count their Cryptoki calls and prove they reach it */
    if ((need[IMPL_PKCS11] || need[IMPL_RAW_PKCS11]) &&
        (raw = raw_p11_open(opt.p11_module, opt.p11_token, opt.p11_pin_file, opt.p11_key)) == NULL)
        return 1;
    if (need[IMPL_PKCS11_REMOTE])
        libctx[IMPL_PKCS11_REMOTE] = keyx_libctx(opt.p11_remote_config);
    if (need[IMPL_RAW_PKCS11_REMOTE] &&
        (raw_remote = raw_p11_open(opt.p11_remote_module, opt.p11_token, opt.p11_pin_file,
                                   opt.p11_key)) == NULL)
        return 1;
    if (opt.count_tpm) {
        /* Every TPM user of this process goes through the counting proxy: keyx (its TCTI from
         * KEYX_TPM_TCTI, which overrides the configuration file), tpm2-openssl (its TCTI is
         * TPM2OPENSSL_TCTI) and the raw ESYS contexts. */
        if (opt.tpm_tcti == NULL) {
            fprintf(stderr, "keyx-bench: --count-tpm needs --tpm-tcti (swtpm's address)\n");
            return 2;
        }
        if ((started = tpm_count_start(opt.tpm_tcti, proxied, sizeof(proxied))) != 1)
            return started < 0 ? 2 : 1;
        setenv("KEYX_TPM_TCTI", proxied, 1);
        setenv("TPM2OPENSSL_TCTI", proxied, 1);
        opt.tpm_tcti = proxied;
    }
    if (need[IMPL_TPM])
        libctx[IMPL_TPM] = keyx_libctx(opt.tpm_config);
    if (need[IMPL_TPM2_OPENSSL])
        bench_peer_in_default = libctx[IMPL_TPM2_OPENSSL] =
            provider_libctx(opt.tpm2_openssl_config, "tpm2");
    for (int i = 0; i < 2; i++)
        if (need[i ? IMPL_RAW_ESYS : IMPL_RAW_ESYS_SESS] &&
            (esys[i] = raw_esys_open(opt.tpm_tcti, opt.tpm_handle_num, !i)) == NULL)
            return 1;
    for (int a = 0; a < N_ALG; a++) {
        int used = 0;

        for (size_t i = 0; i < ncells; i++)
            used |= cells[i].alg == &algs[a];
        if (used && !is_rsa(&algs[a]) &&
            !bench_peers_make(&peers[a], libctx[IMPL_DEFAULT], &algs[a], (size_t)opt.npeers))
            die("generating the peer keys");
    }
    if (need[IMPL_RAW_PKCS11] &&
        (sha256 = EVP_MD_fetch(libctx[IMPL_DEFAULT], "SHA256", NULL)) == NULL)
        die("fetching SHA-256");
    if (need[IMPL_RAW_PKCS11] &&
        (dh_domain = bench_keygen(libctx[IMPL_DEFAULT], &algs[ALG_FFDHE2048])) == NULL)
        die("ffdhe2048 parameters");

    for (size_t i = 0; i < ncells; i++)
        setup(&cells[i]);
    if (opt.count_tpm) {
        for (size_t i = 0; i < ncells; i++)
            if (is_tpm(cells[i].impl))
                count_tpm(&cells[i]);
        print_tpm_counts();
        goto teardown;
    }
    unsigned long long total0, steal0, total1, steal1;
    int have_ticks = cpu_ticks(&total0, &steal0);

    for (int r = 0; r < opt.rounds; r++)
        for (size_t i = 0; i < ncells; i++) {
            measure(&cells[i]);
            if (opt.threads > 1)
                measure_threads(&cells[i], r);
        }
    if (have_ticks && cpu_ticks(&total1, &steal1) && total1 > total0)
        steal_pct = 100.0 * (double)(steal1 - steal0) / (double)(total1 - total0);
    for (size_t i = 0; i < ncells; i++)
        summarize(&cells[i]);
    if (opt.count_ops > 0)
        for (size_t i = 0; i < ncells; i++)
            if ((raw != NULL &&
                 (cells[i].impl == IMPL_PKCS11 || cells[i].impl == IMPL_RAW_PKCS11)) ||
                is_remote(cells[i].impl))
                count_calls(&cells[i]);
    if (opt.mem_ops > 0)
        for (size_t i = 0; i < ncells; i++)
            if (strcmp(cells[i].alg->name, opt.mem_alg) == 0)
                measure_memory(&cells[i]);

    if (opt.json)
        print_json();
    else
        print_table();
teardown:
    if (fflush(stdout) != 0)
        rc = 1;

    /* Teardown in an order that suits a shared module: the raw session goes first, then keyx
     * (which finalizes the module if it initialized it), then the raw module if it was ours.
     * Freeing the library contexts here, not at exit, also keeps keyx's teardown ahead of the
     * module's own exit-time destructors. */
    for (size_t i = 0; i < ncells; i++) {
        if (cells[i].rawkey != 0)
            raw_p11_destroy(raw_of(cells[i].impl), cells[i].rawkey);
        EVP_PKEY_free(cells[i].own);
        if (cells[i].ready != NULL)
            for (size_t j = 0; j < cells[i].peers->n; j++)
                EVP_PKEY_free(cells[i].ready[j]);
        OPENSSL_free(cells[i].ready);
        bench_ct_pool_free(&cells[i].pool);
    }
    EVP_MD_free(sha256);
    for (int a = 0; a < N_ALG; a++)
        bench_peers_free(&peers[a]);
    EVP_PKEY_free(dh_domain);
    raw_p11_end_session(raw);
    raw_p11_end_session(raw_remote);
    raw_esys_close(esys[0]);
    raw_esys_close(esys[1]);
    OSSL_PROVIDER_unload(default_prov);
    for (int i = N_IMPL - 1; i >= 0; i--)
        OSSL_LIB_CTX_free(libctx[i]);
    raw_p11_close(raw);
    raw_p11_close(raw_remote);
    free(cells);
    return rc;
}
