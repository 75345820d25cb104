/* Target 4: encoded public keys. The first byte picks a group, the rest is a peer's encoded
 * public key (a TLS key share): EVP_PKEY_set1_encoded_public_key on a keyx key with the group's
 * parameters (as libssl makes it), then a derive with a keyx private key of that group. The
 * default provider does the same with the same private key: keyx must refuse every peer it
 * refuses (invalid points, small-order points, values out of range) and derive the same secret
 * from every peer both accept. */
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/dh.h>
#include <openssl/err.h>
#include <openssl/evp.h>

#include "tests/fuzz/harness.h"

static const struct {
    const char *alg, *group;
} groups[] = {
    {"EC", "P-256"}, {"EC", "P-384"},     {"EC", "P-521"},       {"X25519", NULL},
    {"X448", NULL},  {"DH", "ffdhe2048"}, {"DH", "dh_2048_224"},
};

#define NGROUPS (sizeof(groups) / sizeof(groups[0]))
#define MAX_ENCODED 1024

/* The same private key in keyx and in the default provider. */
static EVP_PKEY *own_keyx[NGROUPS], *own_dflt[NGROUPS];

static void make_keys(void)
{
    OSSL_LIB_CTX *lc = fuzz_keyx_libctx();

    for (size_t i = 0; i < NGROUPS; i++) {
        EVP_PKEY_CTX *g = EVP_PKEY_CTX_new_from_name(lc, groups[i].alg, "provider=default");
        EVP_PKEY_CTX *im = EVP_PKEY_CTX_new_from_name(lc, groups[i].alg, "provider=keyx");
        OSSL_PARAM *params = NULL, grp[2];

        grp[0] = OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME,
                                                  (char *)groups[i].group, 0);
        grp[1] = OSSL_PARAM_construct_end();
        if (g == NULL || im == NULL || EVP_PKEY_keygen_init(g) != 1 ||
            (groups[i].group != NULL && EVP_PKEY_CTX_set_params(g, grp) != 1) ||
            EVP_PKEY_generate(g, &own_dflt[i]) != 1 ||
            EVP_PKEY_todata(own_dflt[i], EVP_PKEY_KEYPAIR, &params) != 1 ||
            EVP_PKEY_fromdata_init(im) != 1 ||
            EVP_PKEY_fromdata(im, &own_keyx[i], EVP_PKEY_KEYPAIR, params) != 1) {
            ERR_print_errors_fp(stderr);
            fuzz_fail("cannot make the own keys");
        }
        OSSL_PARAM_free(params);
        EVP_PKEY_CTX_free(g);
        EVP_PKEY_CTX_free(im);
    }
}

/* As libssl does with a key share: a key with own's parameters, then the encoded point. */
static EVP_PKEY *peer_of(EVP_PKEY *own, const uint8_t *enc, size_t len)
{
    EVP_PKEY *peer = EVP_PKEY_new();

    if (peer == NULL || EVP_PKEY_copy_parameters(peer, own) != 1 ||
        EVP_PKEY_set1_encoded_public_key(peer, enc, len) != 1) {
        EVP_PKEY_free(peer);
        return NULL;
    }
    return peer;
}

static int derive(EVP_PKEY *own, EVP_PKEY *peer, const char *propq, unsigned char *out,
                  size_t *outlen)
{
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_pkey(fuzz_keyx_libctx(), own, propq);
    int ok = ctx != NULL && EVP_PKEY_derive_init(ctx) == 1 &&
             (!EVP_PKEY_is_a(own, "DH") || EVP_PKEY_CTX_set_dh_pad(ctx, 1) == 1) &&
             EVP_PKEY_derive_set_peer(ctx, peer) == 1 && EVP_PKEY_derive(ctx, out, outlen) == 1;

    EVP_PKEY_CTX_free(ctx);
    return ok;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    unsigned char s1[512], s2[512];
    size_t l1 = sizeof(s1), l2 = sizeof(s2), g;
    EVP_PKEY *pk, *pd;
    int ok1, ok2;

    if (size < 1 || size > MAX_ENCODED + 1)
        return 0;
    if (own_keyx[0] == NULL)
        make_keys();
    g = data[0] % NGROUPS;
    pk = peer_of(own_keyx[g], data + 1, size - 1);
    pd = peer_of(own_dflt[g], data + 1, size - 1);
    if (pk != NULL && pd == NULL)
        fuzz_fail("keyx took an encoded public key the default provider refuses");
    if (pk != NULL) {
        if (EVP_PKEY_get_bits(pk) != EVP_PKEY_get_bits(own_keyx[g]))
            fuzz_fail("the peer key has another size than its parameters");
        ok1 = derive(own_keyx[g], pk, "provider=keyx", s1, &l1);
        ok2 = derive(own_dflt[g], pd, "provider=default", s2, &l2);
        if (ok1 && !ok2)
            fuzz_fail("keyx derived with a peer key the default provider refuses");
        if (ok1 && (l1 != l2 || memcmp(s1, s2, l1) != 0))
            fuzz_fail("keyx and the default provider derived different secrets");
        OPENSSL_cleanse(s1, sizeof(s1));
        OPENSSL_cleanse(s2, sizeof(s2));
    }
    EVP_PKEY_free(pk);
    EVP_PKEY_free(pd);
    fuzz_drain_errors();
    return 0;
}
