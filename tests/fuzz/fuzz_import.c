/* Target 3: key import parameters. The input picks an algorithm (EC, X25519, X448, DH, RSA) and a
 * selection, then lists parameters (name, type, value) for EVP_PKEY_fromdata through keyx loaded
 * as a provider (keymgmt import, set_params, validate, derive). The same parameters go to the
 * default provider, the independent implementation: keyx may refuse more (it is stricter about
 * peers) but never accept what the default provider refuses, and a key both accept must derive
 * the same secret and pass or fail the same public-key check. */
#include <string.h>

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/dh.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/rsa.h>

#include "backend/backend.h"
#include "tests/fuzz/harness.h"

static const char *const algs[] = {"EC", "X25519", "X448", "DH", "RSA"};

static const char *const names[] = {
    OSSL_PKEY_PARAM_PUB_KEY,
    OSSL_PKEY_PARAM_PRIV_KEY,
    OSSL_PKEY_PARAM_GROUP_NAME,
    OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY,
    OSSL_PKEY_PARAM_EC_POINT_CONVERSION_FORMAT,
    OSSL_PKEY_PARAM_EC_ENCODING,
    OSSL_PKEY_PARAM_USE_COFACTOR_ECDH,
    OSSL_PKEY_PARAM_EC_FIELD_TYPE,
    OSSL_PKEY_PARAM_EC_P,
    OSSL_PKEY_PARAM_EC_A,
    OSSL_PKEY_PARAM_EC_B,
    OSSL_PKEY_PARAM_EC_GENERATOR,
    OSSL_PKEY_PARAM_EC_ORDER,
    OSSL_PKEY_PARAM_EC_COFACTOR,
    OSSL_PKEY_PARAM_EC_SEED,
    OSSL_PKEY_PARAM_EC_PUB_X,
    OSSL_PKEY_PARAM_EC_PUB_Y,
    OSSL_PKEY_PARAM_EC_INCLUDE_PUBLIC,
    OSSL_PKEY_PARAM_FFC_Q,
    OSSL_PKEY_PARAM_FFC_G,
    OSSL_PKEY_PARAM_FFC_COFACTOR,
    OSSL_PKEY_PARAM_FFC_GINDEX,
    OSSL_PKEY_PARAM_FFC_PCOUNTER,
    OSSL_PKEY_PARAM_FFC_H,
    OSSL_PKEY_PARAM_DH_PRIV_LEN,
    OSSL_PKEY_PARAM_DH_GENERATOR,
    OSSL_PKEY_PARAM_RSA_N,
    OSSL_PKEY_PARAM_RSA_E,
    OSSL_PKEY_PARAM_RSA_D,
    OSSL_PKEY_PARAM_RSA_FACTOR1,
    OSSL_PKEY_PARAM_RSA_FACTOR2,
    OSSL_PKEY_PARAM_RSA_EXPONENT1,
    OSSL_PKEY_PARAM_RSA_EXPONENT2,
    OSSL_PKEY_PARAM_RSA_COEFFICIENT1,
    KEYX_PARAM_BACKEND,
};

/* Values the fuzzer would take long to spell: groups, formats, backends. */
static const char *const words[] = {
    "P-256",
    "prime256v1",
    "secp256r1",
    "P-384",
    "secp384r1",
    "P-521",
    "secp521r1",
    "secp256k1",
    "brainpoolP256r1",
    "sect163k1",
    "ffdhe2048",
    "ffdhe3072",
    "ffdhe4096",
    "modp_2048",
    "dh_2048_224",
    "dh_1024_160",
    "uncompressed",
    "compressed",
    "hybrid",
    "named_curve",
    "explicit",
    "prime-field",
    "characteristic-two-field",
    "software",
    "tpm",
    "pkcs11",
    "X25519",
    "",
};

#define NAMES (sizeof(names) / sizeof(names[0]))
#define WORDS (sizeof(words) / sizeof(words[0]))
#define MAX_FUZZ_INPUT 2048
#define MAX_BN 520 /* 4160 bits: large enough for every size keyx serves, fast enough to fuzz */

static const int selections[] = {
    EVP_PKEY_KEYPAIR,
    EVP_PKEY_PUBLIC_KEY,
    EVP_PKEY_KEY_PARAMETERS,
    OSSL_KEYMGMT_SELECT_ALL,
};

/* Records: name index, type, length (one byte, or two when the top bit is set), value. */
static OSSL_PARAM *build(const uint8_t *d, size_t n)
{
    OSSL_PARAM_BLD *bld = OSSL_PARAM_BLD_new();
    OSSL_PARAM *params = NULL;
    BIGNUM *bns[32] = {NULL};
    size_t nbn = 0;
    char str[MAX_FUZZ_INPUT + 1];
    int ok = bld != NULL, count = 0;

    while (ok && n >= 3 && count++ < 24) {
        const char *name = names[d[0] % NAMES];
        unsigned type = d[1] % 5;
        size_t len = d[2];

        d += 3, n -= 3;
        if (len & 0x80) {
            if (n < 1)
                break;
            len = (len & 0x7f) << 8 | d[0];
            d++, n--;
        }
        if (len > n)
            len = n;
        switch (type) {
        case 0: /* unsigned integer, big-endian bytes */
            if (len > MAX_BN || nbn == sizeof(bns) / sizeof(bns[0]))
                break;
            ok = (bns[nbn] = BN_bin2bn(d, (int)len, NULL)) != NULL &&
                 OSSL_PARAM_BLD_push_BN(bld, name, bns[nbn]);
            nbn++;
            break;
        case 1:
            ok = OSSL_PARAM_BLD_push_octet_string(bld, name, d, len);
            break;
        case 2: /* UTF-8 string, raw */
            memcpy(str, d, len);
            str[len] = '\0';
            ok = OSSL_PARAM_BLD_push_utf8_string(bld, name, str, strlen(str));
            break;
        case 3: /* UTF-8 string, one of the words */
            ok = OSSL_PARAM_BLD_push_utf8_string(bld, name, words[len % WORDS], 0);
            len = 0; /* the length byte was the choice */
            break;
        default: { /* int */
            int v = 0;

            memcpy(&v, d, len < sizeof(v) ? len : sizeof(v));
            ok = OSSL_PARAM_BLD_push_int(bld, name, v);
        }
        }
        d += len, n -= len;
    }
    if (ok)
        params = OSSL_PARAM_BLD_to_param(bld);
    OSSL_PARAM_BLD_free(bld);
    for (size_t i = 0; i < nbn; i++)
        BN_free(bns[i]);
    return params;
}

/* Some but not all of the CRT parameters of a two-prime RSA key. */
static int partial_crt(const OSSL_PARAM *params)
{
    static const char *const crt[] = {OSSL_PKEY_PARAM_RSA_FACTOR1, OSSL_PKEY_PARAM_RSA_FACTOR2,
                                      OSSL_PKEY_PARAM_RSA_EXPONENT1, OSSL_PKEY_PARAM_RSA_EXPONENT2,
                                      OSSL_PKEY_PARAM_RSA_COEFFICIENT1};
    int n = 0;

    for (size_t i = 0; i < sizeof(crt) / sizeof(crt[0]); i++)
        n += OSSL_PARAM_locate_const(params, crt[i]) != NULL;
    return n > 0 && n < (int)(sizeof(crt) / sizeof(crt[0]));
}

static EVP_PKEY *import(const char *alg, const char *propq, int selection, OSSL_PARAM *params)
{
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_name(fuzz_keyx_libctx(), alg, propq);
    EVP_PKEY *key = NULL;

    if (ctx == NULL)
        fuzz_fail("no key management for an algorithm keyx serves");
    if (EVP_PKEY_fromdata_init(ctx) != 1 || EVP_PKEY_fromdata(ctx, &key, selection, params) != 1)
        key = NULL;
    EVP_PKEY_CTX_free(ctx);
    return key;
}

/* The key's own secret with its own public key as the peer: 1 and *out (OPENSSL_free) or 0. */
static int self_derive(EVP_PKEY *key, const char *propq, unsigned char **out, size_t *outlen)
{
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_pkey(fuzz_keyx_libctx(), key, propq);
    int ok;

    *out = NULL;
    ok = ctx != NULL && EVP_PKEY_derive_init(ctx) == 1 &&
         (!EVP_PKEY_is_a(key, "DH") || EVP_PKEY_CTX_set_dh_pad(ctx, 1) == 1) &&
         EVP_PKEY_derive_set_peer(ctx, key) == 1 && EVP_PKEY_derive(ctx, NULL, outlen) == 1 &&
         *outlen <= 1024 && (*out = OPENSSL_malloc(*outlen)) != NULL &&
         EVP_PKEY_derive(ctx, *out, outlen) == 1;
    EVP_PKEY_CTX_free(ctx);
    if (!ok) {
        OPENSSL_free(*out);
        *out = NULL;
    }
    return ok;
}

static int public_check(EVP_PKEY *key, const char *propq)
{
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_pkey(fuzz_keyx_libctx(), key, propq);
    int ok = ctx != NULL && EVP_PKEY_public_check(ctx) == 1;

    EVP_PKEY_CTX_free(ctx);
    return ok;
}

/* 1 if df is a DH key whose public value lies outside the order-q subgroup (y^q mod p != 1).
 * keyx's DH public check includes that test; OpenSSL 3.5's default provider no longer makes it
 * for a named safe-prime group (3.0 did), so there the two checks may differ on exactly these. */
static int dh_outside_subgroup(EVP_PKEY *df)
{
    BIGNUM *p = NULL, *q = NULL, *y = NULL, *r = BN_new();
    BN_CTX *bn = BN_CTX_new();
    int out = 0;

    ERR_set_mark();
    if (r != NULL && bn != NULL && EVP_PKEY_get_bn_param(df, OSSL_PKEY_PARAM_FFC_P, &p) == 1 &&
        EVP_PKEY_get_bn_param(df, OSSL_PKEY_PARAM_FFC_Q, &q) == 1 &&
        EVP_PKEY_get_bn_param(df, OSSL_PKEY_PARAM_PUB_KEY, &y) == 1 &&
        BN_mod_exp(r, y, q, p, bn) == 1)
        out = !BN_is_one(r);
    ERR_pop_to_mark();
    BN_free(p);
    BN_free(q);
    BN_free(y);
    BN_free(r);
    BN_CTX_free(bn);
    return out;
}

/* RSA: OAEP encryption to the key by the default provider, decryption through keyx. */
static void rsa_round_trip(EVP_PKEY *kx, EVP_PKEY *df)
{
    static const unsigned char msg[16] = "keyx fuzz import";
    unsigned char ct[512], pt[512];
    size_t ctlen = sizeof(ct), ptlen = sizeof(pt);
    EVP_PKEY_CTX *e = NULL, *d = NULL;

    if (EVP_PKEY_get_bits(df) > 2048 || EVP_PKEY_get_bits(df) < 1024)
        return;
    e = EVP_PKEY_CTX_new_from_pkey(fuzz_keyx_libctx(), df, "provider=default");
    if (e == NULL || EVP_PKEY_encrypt_init(e) != 1 ||
        EVP_PKEY_CTX_set_rsa_padding(e, RSA_PKCS1_OAEP_PADDING) != 1 ||
        EVP_PKEY_encrypt(e, ct, &ctlen, msg, sizeof(msg)) != 1)
        goto end;
    d = EVP_PKEY_CTX_new_from_pkey(fuzz_keyx_libctx(), kx, "provider=keyx");
    if (d != NULL && EVP_PKEY_decrypt_init(d) == 1 &&
        EVP_PKEY_CTX_set_rsa_padding(d, RSA_PKCS1_OAEP_PADDING) == 1 &&
        EVP_PKEY_decrypt(d, pt, &ptlen, ct, ctlen) == 1 &&
        (ptlen != sizeof(msg) || memcmp(pt, msg, ptlen) != 0))
        fuzz_fail("keyx's RSA decryption returned something else than was encrypted");
end:
    EVP_PKEY_CTX_free(e);
    EVP_PKEY_CTX_free(d);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    OSSL_PARAM *params;
    EVP_PKEY *kx, *df;
    const char *alg;
    int selection;

    if (size < 2 || size > MAX_FUZZ_INPUT)
        return 0;
    alg = algs[data[0] % 5];
    selection = selections[data[1] % 4];
    if ((params = build(data + 2, size - 2)) == NULL)
        return 0;
    if (strcmp(alg, "RSA") == 0 && partial_crt(params)) {
        /* OpenSSL 3.0's RSA import (ossl_rsa_fromdata, default provider) leaks the CRT numbers
         * it was given when some are missing: not keyx's leak, and it would stop every run. */
        OSSL_PARAM_free(params);
        return 0;
    }
    kx = import(alg, "provider=keyx", selection, params);
    df = import(alg, "provider=default", selection, params);
    if (kx != NULL && df == NULL)
        fuzz_fail("keyx imported parameters the default provider refuses");
    if (kx != NULL) {
        char group[64] = "";
        unsigned char *s1 = NULL, *s2 = NULL;
        size_t l1 = 0, l2 = 0;
        int has_priv =
            OSSL_PARAM_locate(params, strcmp(alg, "RSA") == 0 ? OSSL_PKEY_PARAM_RSA_D
                                                              : OSSL_PKEY_PARAM_PRIV_KEY) != NULL;

        ERR_set_mark();
        EVP_PKEY_get_utf8_string_param(df, OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof(group), NULL);
        ERR_pop_to_mark();
        /* A named group's public check must agree (keyx's DH check is its own, cheaper one:
         * for made-up parameters whose p is no prime the two may differ, as both say). */
        if (group[0] != '\0' && (selection & EVP_PKEY_PUBLIC_KEY)) {
            int kc = public_check(kx, "provider=keyx"), dc = public_check(df, "provider=default");

            /* keyx may refuse what the default provider accepts only for a DH value outside
             * the subgroup (see dh_outside_subgroup); it never accepts what that refuses */
            if (kc != dc && !(kc == 0 && strcmp(alg, "DH") == 0 && dh_outside_subgroup(df)))
                fuzz_fail("keyx's public-key check disagrees with the default provider's");
        }
        if (strcmp(alg, "RSA") == 0) {
            if (has_priv && (selection & EVP_PKEY_PRIVATE_KEY))
                rsa_round_trip(kx, df);
        } else if (has_priv && (selection & EVP_PKEY_PRIVATE_KEY) &&
                   self_derive(kx, "provider=keyx", &s1, &l1)) {
            if (!self_derive(df, "provider=default", &s2, &l2))
                fuzz_fail("keyx derived with a key the default provider cannot derive with");
            if (l1 != l2 || memcmp(s1, s2, l1) != 0)
                fuzz_fail("keyx and the default provider derived different secrets");
        }
        OPENSSL_clear_free(s1, l1);
        OPENSSL_clear_free(s2, l2);
        /* set_params with the same parameters on the imported key (keyx copies its view) */
        (void)EVP_PKEY_set_params(kx, params);
    }
    EVP_PKEY_free(kx);
    EVP_PKEY_free(df);
    OSSL_PARAM_free(params);
    fuzz_drain_errors();
    return 0;
}
