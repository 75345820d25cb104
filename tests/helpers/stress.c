/* keyx-test-stress: many threads (or forked children) doing mixed keyx operations at once.
 *
 * Loads keyx and the default provider into a fresh library context from an openssl.cnf (the
 * backends under test are what that file configures), loads a static EC key and optionally a
 * static RSA key by URI through OSSL_STORE (a PEM file for software, a pkcs11: URI, a
 * keyx:tpm:handle= reference), makes one shared ephemeral P-256 key, then runs THREADS x OPS
 * operations, every thread on the same static and shared keys:
 *   keygen  an ephemeral key of the next --groups entry through keyx, then a derive with a fresh
 *           default-provider peer
 *   derive  the static EC key with a fresh default-provider peer
 *   shared  the shared ephemeral key with a fresh default-provider peer
 *   decrypt RSA-OAEP (SHA-256) with the static RSA key of a message the default provider
 *           encrypted to its public key
 *   sign    ECDSA-SHA256 with the static EC key, verified by the default provider
 * Every secret (1 in --check-every) is compared with what the default provider derives from the
 * peer's side; every decryption and signature is checked. Keys must be held by keyx.
 *
 * usage: keyx-test-stress --config FILE --ec-key URI [--rsa-key URI] [--threads N] [--ops M]
 *                         [--groups G1,G2,...] [--check-every K] [--fork N]
 *   --fork N   the parent loads the keys and works (one pass of OPS), forks N children that each
 *              do OPS operations in one thread, waits for them, and works again
 *   --serial 1 children one after the other (a TPM without resource manager: one process at a
 *              time), else all at once
 *   --child-shared refused   the parent's shared ephemeral key is hardware: children must get
 *              a clean "missing key" for it (counted as "childN PID refused N")
 *   --after-shared REASON    after the children, the parent's uses of its shared ephemeral key
 *              must fail with keyx's reason string REASON (a TPM without resource manager: a
 *              child flushed it), counted as "parent-after refused N", the first error's text
 *              printed as "parent-after refused-text TEXT"; the parent uses the shared key once
 *              more right before the first fork, so that it is loaded in the TPM then
 * prints "<op> ok <n> fail <n>" per operation and "total ok <n> fail <n>"; exit 0 only when
 * every operation succeeded and was checked right.
 */
#define _POSIX_C_SOURCE 200809L

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/provider.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>
#include <openssl/store.h>
#include <openssl/x509.h>

#define KEYX_PQ "provider=keyx"
#define DEFAULT_PQ "provider=default"
#define MAX_GROUPS 8
#define MAX_REPORTS 5

enum { OP_KEYGEN, OP_DERIVE, OP_SHARED, OP_DECRYPT, OP_SIGN, OP_COUNT };
static const char *const op_names[OP_COUNT] = {"keygen", "derive", "shared", "decrypt", "sign"};

static OSSL_LIB_CTX *libctx;
static EVP_PKEY *ec_key, *ec_pub;   /* static EC key (keyx) and its public part (default) */
static EVP_PKEY *rsa_key, *rsa_pub; /* static RSA key (keyx) and its public part (default) */
static EVP_PKEY *shared_key, *shared_pub;
static const char *groups[MAX_GROUPS];
static int ngroups;
static int check_every = 1;
static long ops_per_worker = 100;

static atomic_long ok_count[OP_COUNT], fail_count[OP_COUNT];
static atomic_int reports;
/* --child-shared refused: in a forked child, a hardware ephemeral key of the parent (a session
 * object of the parent's PKCS#11 session, a TPM object of the parent's connection) is gone; its
 * use must then fail cleanly with keyx's "missing key", counted here. */
static int in_child, child_shared_refused;
static atomic_long refused_count;
/* --after-shared: the reason the parent's shared key is refused with after the children. */
static const char *after_shared;
static int after_children;
static char refused_text[512];

/* The first few failures are printed (stage and OpenSSL's errors), never any key material. */
static void fail(int op, const char *what)
{
    atomic_fetch_add(&fail_count[op], 1);
    if (atomic_fetch_add(&reports, 1) < MAX_REPORTS) {
        unsigned long e;
        char buf[256];

        fprintf(stderr, "stress: %s failed (%s) in pid %ld:", op_names[op], what, (long)getpid());
        const char *data = NULL;
        int flags = 0;

        while ((e = ERR_get_error_all(NULL, NULL, NULL, &data, &flags)) != 0) {
            ERR_error_string_n(e, buf, sizeof(buf));
            fprintf(stderr, " %s%s%s", buf, (flags & ERR_TXT_STRING) ? ": " : "",
                    (flags & ERR_TXT_STRING) ? data : "");
        }
        fprintf(stderr, "\n");
    }
    ERR_clear_error();
}

static int is_ecx(const char *group)
{
    return strcmp(group, "X25519") == 0 || strcmp(group, "X448") == 0;
}

static const char *alg_of(const char *group)
{
    if (is_ecx(group))
        return group;
    return strncmp(group, "ffdhe", 5) == 0 ? "DH" : "EC";
}

static EVP_PKEY *generate(const char *group, const char *pq)
{
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_name(libctx, alg_of(group), pq);
    EVP_PKEY *pk = NULL;

    if (ctx == NULL || EVP_PKEY_keygen_init(ctx) <= 0 ||
        (!is_ecx(group) && EVP_PKEY_CTX_set_group_name(ctx, group) <= 0) ||
        EVP_PKEY_generate(ctx, &pk) <= 0) {
        EVP_PKEY_free(pk);
        pk = NULL;
    }
    EVP_PKEY_CTX_free(ctx);
    return pk;
}

/* The key must be held by keyx, or the stress would not exercise it. */
static int held_by_keyx(const EVP_PKEY *pk)
{
    const OSSL_PROVIDER *p = EVP_PKEY_get0_provider(pk);

    return p != NULL && strcmp(OSSL_PROVIDER_get0_name(p), "keyx") == 0;
}

/* The public part of pk as a default-provider key (through its SubjectPublicKeyInfo). */
static EVP_PKEY *public_copy(EVP_PKEY *pk)
{
    unsigned char *der = NULL;
    const unsigned char *p;
    int len = i2d_PUBKEY(pk, &der);
    EVP_PKEY *pub = NULL;

    if (len > 0) {
        p = der;
        pub = d2i_PUBKEY_ex(NULL, &p, len, libctx, DEFAULT_PQ);
    }
    OPENSSL_free(der);
    return pub;
}

static unsigned char *derive(EVP_PKEY *priv, EVP_PKEY *peer, const char *pq, size_t *len)
{
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_pkey(libctx, priv, pq);
    unsigned char *out = NULL;

    *len = 0;
    if (ctx != NULL && EVP_PKEY_derive_init(ctx) > 0 &&
        (EVP_PKEY_get_base_id(priv) != EVP_PKEY_DH || EVP_PKEY_CTX_set_dh_pad(ctx, 1) > 0) &&
        EVP_PKEY_derive_set_peer(ctx, peer) > 0 && EVP_PKEY_derive(ctx, NULL, len) > 0 &&
        *len > 0 && *len <= 1024 && (out = OPENSSL_malloc(*len)) != NULL &&
        EVP_PKEY_derive(ctx, out, len) <= 0) {
        OPENSSL_clear_free(out, *len);
        out = NULL;
    }
    EVP_PKEY_CTX_free(ctx);
    return out;
}

/* A derive with key (held by keyx) and a fresh default-provider peer of group; when check, the
 * secret must equal the default provider's from the peer's side (peer private key, key_pub). */
static void derive_checked(int op, EVP_PKEY *key, EVP_PKEY *key_pub, const char *group, int check)
{
    EVP_PKEY *peer = generate(group, DEFAULT_PQ);
    unsigned char *mine = NULL, *theirs = NULL;
    size_t mlen = 0, tlen = 0;

    if (peer == NULL) {
        fail(op, "default-provider peer");
        return;
    }
    const char *expect = in_child && child_shared_refused ? "missing key"
                         : after_children                 ? after_shared
                                                          : NULL;

    if ((mine = derive(key, peer, NULL, &mlen)) == NULL && op == OP_SHARED && expect != NULL) {
        const char *data = NULL;
        unsigned long e = ERR_peek_last_error_data(&data, NULL);

        if (ERR_GET_REASON(e) != 0 && ERR_reason_error_string(e) != NULL &&
            strcmp(ERR_reason_error_string(e), expect) == 0) {
            if (atomic_fetch_add(&refused_count, 1) == 0 && data != NULL)
                snprintf(refused_text, sizeof(refused_text), "%s", data);
            atomic_fetch_add(&ok_count[op], 1);
            ERR_clear_error();
        } else {
            fail(op, in_child ? "inherited ephemeral key: not refused with 'missing key'"
                              : "shared key after the children: not refused as expected");
        }
    } else if (mine == NULL) {
        fail(op, "derive");
    } else if (check && (theirs = derive(peer, key_pub, DEFAULT_PQ, &tlen)) == NULL) {
        fail(op, "default-provider derive");
    } else if (check && (tlen != mlen || CRYPTO_memcmp(mine, theirs, mlen) != 0)) {
        fail(op, "WRONG SECRET: differs from the default provider's");
    } else {
        atomic_fetch_add(&ok_count[op], 1);
    }
    OPENSSL_clear_free(mine, mlen);
    OPENSSL_clear_free(theirs, tlen);
    EVP_PKEY_free(peer);
}

static void op_keygen(long i, int check)
{
    const char *group = groups[i % ngroups];
    EVP_PKEY *key = generate(group, KEYX_PQ), *pub = NULL;

    if (key == NULL || !held_by_keyx(key)) {
        fail(OP_KEYGEN, key == NULL ? "keygen" : "key not held by keyx");
    } else if ((pub = public_copy(key)) == NULL) {
        fail(OP_KEYGEN, "public export");
    } else {
        derive_checked(OP_KEYGEN, key, pub, group, check);
    }
    EVP_PKEY_free(pub);
    EVP_PKEY_free(key);
}

static int set_oaep(EVP_PKEY_CTX *ctx)
{
    return EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_OAEP_PADDING) > 0 &&
           EVP_PKEY_CTX_set_rsa_oaep_md_name(ctx, "SHA256", NULL) > 0 &&
           EVP_PKEY_CTX_set_rsa_mgf1_md_name(ctx, "SHA256", NULL) > 0;
}

static void op_decrypt(void)
{
    unsigned char msg[32], ct[512], pt[512];
    size_t ctlen = sizeof(ct), ptlen = sizeof(pt);
    EVP_PKEY_CTX *enc = EVP_PKEY_CTX_new_from_pkey(libctx, rsa_pub, DEFAULT_PQ);
    EVP_PKEY_CTX *dec = EVP_PKEY_CTX_new_from_pkey(libctx, rsa_key, NULL);

    if (RAND_bytes(msg, sizeof(msg)) <= 0 || enc == NULL || EVP_PKEY_encrypt_init(enc) <= 0 ||
        !set_oaep(enc) || EVP_PKEY_encrypt(enc, ct, &ctlen, msg, sizeof(msg)) <= 0)
        fail(OP_DECRYPT, "default-provider encrypt");
    else if (dec == NULL || EVP_PKEY_decrypt_init(dec) <= 0 || !set_oaep(dec) ||
             EVP_PKEY_decrypt(dec, pt, &ptlen, ct, ctlen) <= 0)
        fail(OP_DECRYPT, "decrypt");
    else if (ptlen != sizeof(msg) || CRYPTO_memcmp(pt, msg, sizeof(msg)) != 0)
        fail(OP_DECRYPT, "WRONG PLAINTEXT");
    else
        atomic_fetch_add(&ok_count[OP_DECRYPT], 1);
    OPENSSL_cleanse(pt, sizeof(pt));
    EVP_PKEY_CTX_free(enc);
    EVP_PKEY_CTX_free(dec);
}

static void op_sign(long i)
{
    unsigned char data[64], sig[512];
    size_t siglen = sizeof(sig);
    EVP_MD_CTX *s = EVP_MD_CTX_new(), *v = EVP_MD_CTX_new();

    memset(data, (int)(i & 0xff), sizeof(data));
    if (RAND_bytes(data, 16) <= 0 || s == NULL || v == NULL)
        fail(OP_SIGN, "setup");
    else if (EVP_DigestSignInit_ex(s, NULL, "SHA256", libctx, NULL, ec_key, NULL) <= 0 ||
             EVP_DigestSign(s, sig, &siglen, data, sizeof(data)) <= 0)
        fail(OP_SIGN, "sign");
    else if (EVP_DigestVerifyInit_ex(v, NULL, "SHA256", libctx, DEFAULT_PQ, ec_pub, NULL) <= 0 ||
             EVP_DigestVerify(v, sig, siglen, data, sizeof(data)) != 1)
        fail(OP_SIGN, "SIGNATURE DOES NOT VERIFY in the default provider");
    else
        atomic_fetch_add(&ok_count[OP_SIGN], 1);
    EVP_MD_CTX_free(s);
    EVP_MD_CTX_free(v);
}

static void *worker(void *arg)
{
    long id = (long)(intptr_t)arg;
    int nops = rsa_key != NULL ? OP_COUNT : OP_COUNT - 1; /* decrypt needs the RSA key */
    static const int order[OP_COUNT] = {OP_KEYGEN, OP_DERIVE, OP_SHARED, OP_SIGN, OP_DECRYPT};

    for (long i = 0; i < ops_per_worker; i++) {
        int op = order[(i + id) % nops];
        int check = (i / nops) % check_every == 0;

        switch (op) {
        case OP_KEYGEN:
            op_keygen(i / nops + id, check);
            break;
        case OP_DERIVE:
            derive_checked(OP_DERIVE, ec_key, ec_pub, "P-256", check);
            break;
        case OP_SHARED:
            derive_checked(OP_SHARED, shared_key, shared_pub, "P-256", check);
            break;
        case OP_DECRYPT:
            op_decrypt();
            break;
        default:
            op_sign(i);
            break;
        }
    }
    ERR_clear_error();
    return NULL;
}

static EVP_PKEY *store_load(const char *uri)
{
    OSSL_STORE_CTX *st = OSSL_STORE_open_ex(uri, libctx, NULL, NULL, NULL, NULL, NULL, NULL);
    EVP_PKEY *pk = NULL;

    while (st != NULL && pk == NULL && !OSSL_STORE_eof(st)) {
        OSSL_STORE_INFO *info = OSSL_STORE_load(st);

        if (info != NULL && OSSL_STORE_INFO_get_type(info) == OSSL_STORE_INFO_PKEY)
            pk = OSSL_STORE_INFO_get1_PKEY(info);
        OSSL_STORE_INFO_free(info);
    }
    OSSL_STORE_close(st);
    if (pk != NULL && !held_by_keyx(pk)) {
        /* A software key file is decoded by the default provider: hand it to keyx's keymgmt as
         * an application does with EVP_PKEY_fromdata (keyx's software backend then holds it). */
        OSSL_PARAM *params = NULL;
        EVP_PKEY_CTX *ctx = NULL;
        EVP_PKEY *mine = NULL;

        if (EVP_PKEY_todata(pk, EVP_PKEY_KEYPAIR, &params) > 0 &&
            (ctx = EVP_PKEY_CTX_new_from_name(libctx, EVP_PKEY_get0_type_name(pk), KEYX_PQ)) !=
                NULL &&
            EVP_PKEY_fromdata_init(ctx) > 0)
            EVP_PKEY_fromdata(ctx, &mine, EVP_PKEY_KEYPAIR, params);
        OSSL_PARAM_free(params);
        EVP_PKEY_CTX_free(ctx);
        EVP_PKEY_free(pk);
        pk = mine;
    }
    if (pk != NULL && !held_by_keyx(pk)) {
        fprintf(stderr, "stress: the key at %s is not held by keyx\n", uri);
        EVP_PKEY_free(pk);
        return NULL;
    }
    return pk;
}

static int run_threads(int nthreads)
{
    pthread_t tids[64];
    int started = 0;

    for (; started < nthreads; started++)
        if (pthread_create(&tids[started], NULL, worker, (void *)(intptr_t)started) != 0) {
            fprintf(stderr, "stress: pthread_create failed\n");
            break;
        }
    for (int t = 0; t < started; t++)
        pthread_join(tids[t], NULL);
    return started == nthreads;
}

static long total(atomic_long *counts)
{
    long n = 0;

    for (int op = 0; op < OP_COUNT; op++)
        n += atomic_load(&counts[op]);
    return n;
}

static void print_counts(const char *who)
{
    for (int op = 0; op < OP_COUNT; op++)
        printf("%s%s ok %ld fail %ld\n", who, op_names[op], atomic_load(&ok_count[op]),
               atomic_load(&fail_count[op]));
    printf("%stotal ok %ld fail %ld\n", who, total(ok_count), total(fail_count));
    fflush(stdout);
}

static void reset_counts(void)
{
    for (int op = 0; op < OP_COUNT; op++) {
        atomic_store(&ok_count[op], 0);
        atomic_store(&fail_count[op], 0);
    }
}

static int wait_child(int c, pid_t pid)
{
    int status = 0;

    if (waitpid(pid, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        fprintf(stderr, "stress: child %d (pid %ld) failed, status %d\n", c, (long)pid, status);
        return 0;
    }
    return 1;
}

/* Parent works, forks nchildren that each work in one thread, works again. */
static int run_fork(int nchildren, int serial)
{
    pid_t pids[64];
    int rc = 0;

    worker((void *)0);
    print_counts("parent-before ");
    if (total(fail_count) != 0 || total(ok_count) != ops_per_worker)
        rc = 1;
    /* The shared key used last: a TPM key is then loaded in the TPM at the fork, not saved out
     * of it (a saved context stays the parent's), and a child that needs the slot flushes it. */
    if (after_shared != NULL)
        derive_checked(OP_SHARED, shared_key, shared_pub, "P-256", 1);
    if (total(fail_count) != 0)
        rc = 1;
    reset_counts();
    for (int c = 0; c < nchildren; c++) {
        fflush(NULL);
        if ((pids[c] = fork()) < 0) {
            perror("stress: fork");
            return 1;
        }
        if (pids[c] == 0) {
            char who[32];

            in_child = 1;
            worker((void *)(intptr_t)(c + 1));
            printf("child%d %ld refused %ld\n", c, (long)getpid(), atomic_load(&refused_count));
            snprintf(who, sizeof(who), "child%d %ld ", c, (long)getpid());
            print_counts(who);
            _exit(total(fail_count) == 0 && total(ok_count) == ops_per_worker ? 0 : 1);
        }
        if (serial && !wait_child(c, pids[c]))
            rc = 1;
    }
    for (int c = 0; c < nchildren && !serial; c++)
        if (!wait_child(c, pids[c]))
            rc = 1;
    after_children = after_shared != NULL;
    worker((void *)0);
    if (after_children)
        printf("parent-after refused %ld\nparent-after refused-text %s\n",
               atomic_load(&refused_count), refused_text);
    print_counts("parent-after ");
    if (total(fail_count) != 0 || total(ok_count) != ops_per_worker)
        rc = 1;
    return rc;
}

static int usage(void)
{
    fprintf(stderr, "usage: keyx-test-stress --config FILE --ec-key URI [--rsa-key URI] "
                    "[--threads N] [--ops M] [--groups G,...] [--check-every K] [--fork N] "
                    "[--serial 0|1] [--child-shared use|refused] [--after-shared REASON]\n");
    return 2;
}

int main(int argc, char **argv)
{
    const char *config = NULL, *ec_uri = NULL, *rsa_uri = NULL;
    char *grouplist = NULL, *save = NULL;
    int nthreads = 8, nfork = 0, serial = 0, rc = 1;

    for (int i = 1; i < argc; i += 2) {
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;

        if (v == NULL)
            return usage();
        if (strcmp(argv[i], "--config") == 0)
            config = v;
        else if (strcmp(argv[i], "--ec-key") == 0)
            ec_uri = v;
        else if (strcmp(argv[i], "--rsa-key") == 0)
            rsa_uri = v;
        else if (strcmp(argv[i], "--threads") == 0)
            nthreads = atoi(v);
        else if (strcmp(argv[i], "--ops") == 0)
            ops_per_worker = atol(v);
        else if (strcmp(argv[i], "--groups") == 0)
            grouplist = strdup(v);
        else if (strcmp(argv[i], "--check-every") == 0)
            check_every = atoi(v);
        else if (strcmp(argv[i], "--fork") == 0)
            nfork = atoi(v);
        else if (strcmp(argv[i], "--serial") == 0)
            serial = atoi(v);
        else if (strcmp(argv[i], "--child-shared") == 0)
            child_shared_refused = strcmp(v, "refused") == 0;
        else if (strcmp(argv[i], "--after-shared") == 0)
            after_shared = v;
        else
            return usage();
    }
    if (config == NULL || ec_uri == NULL || nthreads < 1 || nthreads > 64 || ops_per_worker < 1 ||
        check_every < 1 || nfork < 0 || nfork > 64)
        return usage();
    if (grouplist == NULL && (grouplist = strdup("P-256")) == NULL)
        return 1;
    for (char *g = strtok_r(grouplist, ",", &save); g != NULL && ngroups < MAX_GROUPS;
         g = strtok_r(NULL, ",", &save))
        groups[ngroups++] = g;

    if ((libctx = OSSL_LIB_CTX_new()) == NULL || !OSSL_LIB_CTX_load_config(libctx, config)) {
        fprintf(stderr, "stress: cannot load config %s\n", config);
        goto end;
    }
    if ((ec_key = store_load(ec_uri)) == NULL || (ec_pub = public_copy(ec_key)) == NULL) {
        fprintf(stderr, "stress: cannot load the EC key %s\n", ec_uri);
        goto end;
    }
    if (rsa_uri != NULL &&
        ((rsa_key = store_load(rsa_uri)) == NULL || (rsa_pub = public_copy(rsa_key)) == NULL)) {
        fprintf(stderr, "stress: cannot load the RSA key %s\n", rsa_uri);
        goto end;
    }
    if ((shared_key = generate("P-256", KEYX_PQ)) == NULL || !held_by_keyx(shared_key) ||
        (shared_pub = public_copy(shared_key)) == NULL) {
        fprintf(stderr, "stress: cannot make the shared ephemeral key\n");
        goto end;
    }

    if (nfork > 0) {
        rc = run_fork(nfork, serial);
    } else {
        rc = run_threads(nthreads) ? 0 : 1;
        print_counts("");
        if (total(fail_count) != 0 || total(ok_count) != (long)nthreads * ops_per_worker)
            rc = 1;
    }
end:
    if (rc != 0)
        ERR_print_errors_fp(stderr);
    EVP_PKEY_free(ec_key);
    EVP_PKEY_free(ec_pub);
    EVP_PKEY_free(rsa_key);
    EVP_PKEY_free(rsa_pub);
    EVP_PKEY_free(shared_key);
    EVP_PKEY_free(shared_pub);
    OSSL_LIB_CTX_free(libctx);
    free(grouplist);
    return rc;
}
