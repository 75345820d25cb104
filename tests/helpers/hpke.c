/* RFC 9180 test vectors through OSSL_HPKE_* (OpenSSL >= 3.2), for tests/test_hpke.py: whatever
 * provider openssl.cnf prefers does the keys and KEMs, as for any application.
 *
 * usage: keyx-test-hpke MODE KEM KDF AEAD IKME IKMR IKMS INFO PSK PSK-ID AAD PT EXP-CONTEXT EXP-LEN
 *   numbers in decimal, byte strings in hex ("-": empty). The recipient's (and in the auth modes
 *   the sender's) key pair comes from OSSL_HPKE_keygen with IKMR (IKMS), the ephemeral key from
 *   IKME (OSSL_HPKE_CTX_set1_ikme); an empty IKMR makes a random recipient key. Prints "pkR",
 * "pkS", "enc", "ct", "pt" (opened by the receiver), "export-sender", "export-receiver" lines, or
 * "err STAGE: ..." and exits 1.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hpke.h>

#include "hexio.h"

enum {
    A_MODE = 1,
    A_KEM,
    A_KDF,
    A_AEAD,
    A_IKME,
    A_IKMR,
    A_IKMS,
    A_INFO,
    A_PSK,
    A_PSKID,
    A_AAD,
    A_PT,
    A_EXPCTX,
    A_EXPLEN,
    A_COUNT
};

static unsigned char *arg[A_COUNT];
static size_t arglen[A_COUNT];

static int fail(const char *stage)
{
    print_errors(stage);
    printf("\n");
    return 1;
}

static void line(const char *name, const unsigned char *buf, size_t len)
{
    printf("%s ", name);
    print_hex(buf, len);
    printf("\n");
}

/* The PSK (modes psk and auth_psk) and, when the mode is authenticated, the sender's key. */
static int set_psk(OSSL_HPKE_CTX *ctx, int mode)
{
    if (mode != OSSL_HPKE_MODE_PSK && mode != OSSL_HPKE_MODE_PSKAUTH)
        return 1;
    char *id = OPENSSL_zalloc(arglen[A_PSKID] + 1);
    int ok = id != NULL;

    if (ok) {
        memcpy(id, arg[A_PSKID], arglen[A_PSKID]);
        ok = OSSL_HPKE_CTX_set1_psk(ctx, id, arg[A_PSK], arglen[A_PSK]) == 1;
    }
    OPENSSL_free(id);
    return ok;
}

int main(int argc, char **argv)
{
    OSSL_HPKE_SUITE suite;
    OSSL_HPKE_CTX *snd = NULL, *rcv = NULL;
    EVP_PKEY *skr = NULL, *sks = NULL;
    unsigned char pkr[133], pks[133], enc[133], ct[512], pt[512], exs[256], exr[256];
    size_t pkrlen = sizeof(pkr), pkslen = sizeof(pks), enclen = sizeof(enc), ctlen = sizeof(ct);
    size_t ptlen = sizeof(pt), explen;
    int mode, auth;

    if (argc != A_COUNT) {
        fprintf(stderr,
                "usage: %s MODE KEM KDF AEAD IKME IKMR IKMS INFO PSK PSK-ID AAD PT "
                "EXP-CONTEXT EXP-LEN\n",
                argv[0]);
        return 2;
    }
    for (int i = A_IKME; i <= A_EXPCTX; i++)
        if ((arg[i] = unhex(argv[i], &arglen[i])) == NULL) {
            fprintf(stderr, "bad hex in argument %d\n", i);
            return 2;
        }
    mode = atoi(argv[A_MODE]);
    auth = mode == OSSL_HPKE_MODE_AUTH || mode == OSSL_HPKE_MODE_PSKAUTH;
    suite.kem_id = (uint16_t)atoi(argv[A_KEM]);
    suite.kdf_id = (uint16_t)atoi(argv[A_KDF]);
    suite.aead_id = (uint16_t)atoi(argv[A_AEAD]);
    explen = (size_t)atoi(argv[A_EXPLEN]);
    if (explen > sizeof(exs) || arglen[A_PT] + 16 > sizeof(ct))
        return 2;

    if (OSSL_HPKE_keygen(suite, pkr, &pkrlen, &skr, arglen[A_IKMR] ? arg[A_IKMR] : NULL,
                         arglen[A_IKMR], NULL, NULL) != 1)
        return fail("keygen recipient");
    line("pkR", pkr, pkrlen);
    if (auth) {
        if (OSSL_HPKE_keygen(suite, pks, &pkslen, &sks, arg[A_IKMS], arglen[A_IKMS], NULL, NULL) !=
            1)
            return fail("keygen sender");
        line("pkS", pks, pkslen);
    }

    if ((snd = OSSL_HPKE_CTX_new(mode, suite, OSSL_HPKE_ROLE_SENDER, NULL, NULL)) == NULL ||
        OSSL_HPKE_CTX_set1_ikme(snd, arg[A_IKME], arglen[A_IKME]) != 1 || !set_psk(snd, mode) ||
        (auth && OSSL_HPKE_CTX_set1_authpriv(snd, sks) != 1))
        return fail("sender");
    if (OSSL_HPKE_encap(snd, enc, &enclen, pkr, pkrlen, arg[A_INFO], arglen[A_INFO]) != 1)
        return fail("encap");
    line("enc", enc, enclen);
    if (suite.aead_id != OSSL_HPKE_AEAD_ID_EXPORTONLY) {
        if (OSSL_HPKE_seal(snd, ct, &ctlen, arg[A_AAD], arglen[A_AAD], arg[A_PT], arglen[A_PT]) !=
            1)
            return fail("seal");
        line("ct", ct, ctlen);
    }
    if (OSSL_HPKE_export(snd, exs, explen, arg[A_EXPCTX], arglen[A_EXPCTX]) != 1)
        return fail("export sender");
    line("export-sender", exs, explen);

    if ((rcv = OSSL_HPKE_CTX_new(mode, suite, OSSL_HPKE_ROLE_RECEIVER, NULL, NULL)) == NULL ||
        !set_psk(rcv, mode) || (auth && OSSL_HPKE_CTX_set1_authpub(rcv, pks, pkslen) != 1))
        return fail("receiver");
    if (OSSL_HPKE_decap(rcv, enc, enclen, skr, arg[A_INFO], arglen[A_INFO]) != 1)
        return fail("decap");
    if (suite.aead_id != OSSL_HPKE_AEAD_ID_EXPORTONLY) {
        if (OSSL_HPKE_open(rcv, pt, &ptlen, arg[A_AAD], arglen[A_AAD], ct, ctlen) != 1)
            return fail("open");
        line("pt", pt, ptlen);
    }
    if (OSSL_HPKE_export(rcv, exr, explen, arg[A_EXPCTX], arglen[A_EXPCTX]) != 1)
        return fail("export receiver");
    line("export-receiver", exr, explen);

    OSSL_HPKE_CTX_free(snd);
    OSSL_HPKE_CTX_free(rcv);
    EVP_PKEY_free(skr);
    EVP_PKEY_free(sks);
    for (int i = 0; i < A_COUNT; i++)
        OPENSSL_free(arg[i]);
    return 0;
}
