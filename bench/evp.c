/* keyx-bench: the EVP side. Every operation is written the way libssl 3.0 performs it during a
 * handshake (ssl_generate_param_group + EVP_PKEY_set1_encoded_public_key for the peer's share,
 * ssl_generate_pkey_group for the own key, ssl_derive for the secret), so that the figures are
 * those a TLS server sees per handshake. */
#include <stdio.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/dh.h>
#include <openssl/ec.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/param_build.h>
#include <openssl/provider.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>
#if OPENSSL_VERSION_NUMBER >= 0x30200000L
#include <openssl/hpke.h>
#endif

#include "bench.h"

void bench_print_errors(const char *what)
{
    unsigned long e;
    const char *file, *data;
    int line, flags;
    char buf[256];

    fprintf(stderr, "keyx-bench: %s failed\n", what);
    while ((e = ERR_get_error_all(&file, &line, NULL, &data, &flags)) != 0) {
        ERR_error_string_n(e, buf, sizeof(buf));
        fprintf(stderr, "  %s%s%s\n", buf, (flags & ERR_TXT_STRING) ? ": " : "",
                (flags & ERR_TXT_STRING) ? data : "");
    }
}

const char *bench_provider_of(const EVP_PKEY *k)
{
    const OSSL_PROVIDER *p = EVP_PKEY_get0_provider(k);

    return p != NULL ? OSSL_PROVIDER_get0_name(p) : "(legacy)";
}

OSSL_LIB_CTX *bench_peer_in_default;

EVP_PKEY *bench_pub_import(OSSL_LIB_CTX *L, const bench_alg *alg, const unsigned char *pub,
                           size_t publen)
{
    EVP_PKEY_CTX *pctx = EVP_PKEY_CTX_new_from_name(
        L, alg->keytype, L != NULL && L == bench_peer_in_default ? "provider=default" : NULL);
    EVP_PKEY *k = NULL;

    if (pctx == NULL || EVP_PKEY_paramgen_init(pctx) <= 0 ||
        EVP_PKEY_CTX_set_group_name(pctx, alg->group) <= 0 || EVP_PKEY_paramgen(pctx, &k) <= 0 ||
        EVP_PKEY_set1_encoded_public_key(k, pub, publen) <= 0) {
        EVP_PKEY_free(k);
        k = NULL;
    }
    EVP_PKEY_CTX_free(pctx);
    return k;
}

EVP_PKEY *bench_keygen(OSSL_LIB_CTX *L, const bench_alg *alg)
{
    EVP_PKEY_CTX *pctx = EVP_PKEY_CTX_new_from_name(L, alg->keytype, NULL);
    EVP_PKEY *k = NULL;

    if (pctx == NULL || EVP_PKEY_keygen_init(pctx) <= 0 ||
        EVP_PKEY_CTX_set_group_name(pctx, alg->group) <= 0 || EVP_PKEY_keygen(pctx, &k) <= 0) {
        EVP_PKEY_free(k);
        k = NULL;
    }
    EVP_PKEY_CTX_free(pctx);
    return k;
}

int bench_validate_peer = 1;

int bench_derive(OSSL_LIB_CTX *L, EVP_PKEY *own, EVP_PKEY *peer, unsigned char *out, size_t *outlen)
{
    EVP_PKEY_CTX *pctx = EVP_PKEY_CTX_new_from_pkey(L, own, NULL);
    size_t len = 0;
    int ok = 0;

    if (pctx == NULL || EVP_PKEY_derive_init(pctx) <= 0)
        goto end;
    /* TLS 1.3 pads the ffdhe secret to |p| (RFC 8446 7.4.1), as libssl asks. */
    if (EVP_PKEY_is_a(own, "DH") && EVP_PKEY_CTX_set_dh_pad(pctx, 1) <= 0)
        goto end;
    if (EVP_PKEY_derive_set_peer_ex(pctx, peer, bench_validate_peer) <= 0 ||
        EVP_PKEY_derive(pctx, NULL, &len) <= 0 || len > *outlen ||
        EVP_PKEY_derive(pctx, out, &len) <= 0)
        goto end;
    *outlen = len;
    ok = 1;
end:
    EVP_PKEY_CTX_free(pctx);
    return ok;
}

int bench_derive_fresh_peer(OSSL_LIB_CTX *L, EVP_PKEY *own, bench_peers *pp, size_t i)
{
    size_t len;
    unsigned char secret[1024];
    EVP_PKEY *peer;
    int ok;

    i %= pp->n;
    if ((peer = bench_pub_import(L, pp->alg, pp->pub[i], pp->publen[i])) == NULL)
        return 0;
    len = sizeof(secret);
    ok = bench_derive(L, own, peer, secret, &len);
    OPENSSL_cleanse(secret, len);
    EVP_PKEY_free(peer);
    return ok;
}

int bench_peers_make(bench_peers *pp, OSSL_LIB_CTX *deflt, const bench_alg *alg, size_t n)
{
    memset(pp, 0, sizeof(*pp));
    pp->alg = alg;
    pp->priv = OPENSSL_zalloc(n * sizeof(*pp->priv));
    pp->pub = OPENSSL_zalloc(n * sizeof(*pp->pub));
    pp->publen = OPENSSL_zalloc(n * sizeof(*pp->publen));
    if (pp->priv == NULL || pp->pub == NULL || pp->publen == NULL)
        return 0;
    for (pp->n = 0; pp->n < n; pp->n++) {
        EVP_PKEY *k = bench_keygen(deflt, alg);

        if (k == NULL)
            return 0;
        pp->priv[pp->n] = k;
        pp->publen[pp->n] = EVP_PKEY_get1_encoded_public_key(k, &pp->pub[pp->n]);
        if (pp->publen[pp->n] == 0) {
            pp->n++;
            return 0;
        }
    }
    return 1;
}

void bench_peers_free(bench_peers *pp)
{
    for (size_t i = 0; i < pp->n; i++) {
        EVP_PKEY_free(pp->priv[i]);
        OPENSSL_free(pp->pub[i]);
    }
    OPENSSL_free(pp->priv);
    OPENSSL_free(pp->pub);
    OPENSSL_free(pp->publen);
    memset(pp, 0, sizeof(*pp));
}

int bench_check_secret(OSSL_LIB_CTX *deflt, bench_peers *pp, const unsigned char *pub,
                       size_t publen, const unsigned char *secret, size_t secretlen)
{
    unsigned char want[1024];
    size_t wantlen = sizeof(want);
    EVP_PKEY *ownpub = bench_pub_import(deflt, pp->alg, pub, publen);
    int ok = ownpub != NULL && bench_derive(deflt, pp->priv[0], ownpub, want, &wantlen) &&
             wantlen == secretlen && CRYPTO_memcmp(want, secret, secretlen) == 0;

    OPENSSL_cleanse(want, sizeof(want));
    EVP_PKEY_free(ownpub);
    return ok;
}

size_t bench_encoded_pub(EVP_PKEY *k, unsigned char **pub)
{
    unsigned char buf[1024];
    size_t len = 0;
    size_t n = EVP_PKEY_get1_encoded_public_key(k, pub);

    if (n != 0)
        return n;
    /* tpm2-openssl 1.1 answers no size query for it: ask with a buffer, then for the point */
    ERR_set_mark();
    if (EVP_PKEY_get_octet_string_param(k, OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, buf, sizeof(buf),
                                        &len) != 1 &&
        EVP_PKEY_get_octet_string_param(k, OSSL_PKEY_PARAM_PUB_KEY, buf, sizeof(buf), &len) != 1)
        len = 0;
    ERR_pop_to_mark();
    if (len == 0 || (*pub = OPENSSL_memdup(buf, len)) == NULL)
        return 0;
    return len;
}

int bench_check_against_default(OSSL_LIB_CTX *L, OSSL_LIB_CTX *deflt, EVP_PKEY *own,
                                bench_peers *pp)
{
    unsigned char got[1024], *pub = NULL;
    size_t gotlen = sizeof(got), publen = bench_encoded_pub(own, &pub);
    EVP_PKEY *peer = bench_pub_import(L, pp->alg, pp->pub[0], pp->publen[0]);
    int ok = publen != 0 && peer != NULL && bench_derive(L, own, peer, got, &gotlen) &&
             bench_check_secret(deflt, pp, pub, publen, got, gotlen);

    OPENSSL_cleanse(got, sizeof(got));
    OPENSSL_free(pub);
    EVP_PKEY_free(peer);
    return ok;
}

/* ---- RSA-OAEP decrypt ---------------------------------------------------------------------- */

EVP_PKEY *bench_rsa_keygen(OSSL_LIB_CTX *L, unsigned int bits)
{
    EVP_PKEY_CTX *pctx = EVP_PKEY_CTX_new_from_name(L, "RSA", NULL);
    EVP_PKEY *k = NULL;

    if (pctx == NULL || EVP_PKEY_keygen_init(pctx) <= 0 ||
        EVP_PKEY_CTX_set_rsa_keygen_bits(pctx, (int)bits) <= 0 || EVP_PKEY_keygen(pctx, &k) <= 0) {
        EVP_PKEY_free(k);
        k = NULL;
    }
    EVP_PKEY_CTX_free(pctx);
    return k;
}

EVP_PKEY *bench_rsa_pub(OSSL_LIB_CTX *deflt, const unsigned char *n, size_t nlen,
                        const unsigned char *e, size_t elen)
{
    BIGNUM *bn = BN_bin2bn(n, (int)nlen, NULL), *be = BN_bin2bn(e, (int)elen, NULL);
    OSSL_PARAM_BLD *bld = OSSL_PARAM_BLD_new();
    OSSL_PARAM *params = NULL;
    EVP_PKEY_CTX *pctx = EVP_PKEY_CTX_new_from_name(deflt, "RSA", NULL);
    EVP_PKEY *k = NULL;

    if (bn == NULL || be == NULL || bld == NULL || pctx == NULL ||
        !OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_N, bn) ||
        !OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_E, be) ||
        (params = OSSL_PARAM_BLD_to_param(bld)) == NULL || EVP_PKEY_fromdata_init(pctx) <= 0 ||
        EVP_PKEY_fromdata(pctx, &k, EVP_PKEY_PUBLIC_KEY, params) <= 0) {
        EVP_PKEY_free(k);
        k = NULL;
    }
    OSSL_PARAM_free(params);
    OSSL_PARAM_BLD_free(bld);
    EVP_PKEY_CTX_free(pctx);
    BN_free(bn);
    BN_free(be);
    return k;
}

EVP_PKEY *bench_rsa_pub_of(OSSL_LIB_CTX *deflt, const EVP_PKEY *k)
{
    BIGNUM *n = NULL, *e = NULL;
    unsigned char nb[1024], eb[16];
    EVP_PKEY *pub = NULL;

    if (EVP_PKEY_get_bn_param(k, OSSL_PKEY_PARAM_RSA_N, &n) &&
        EVP_PKEY_get_bn_param(k, OSSL_PKEY_PARAM_RSA_E, &e) && BN_num_bytes(n) <= (int)sizeof(nb) &&
        BN_num_bytes(e) <= (int)sizeof(eb))
        pub = bench_rsa_pub(deflt, nb, (size_t)BN_bn2bin(n, nb), eb, (size_t)BN_bn2bin(e, eb));
    BN_free(n);
    BN_free(e);
    return pub;
}

static EVP_PKEY_CTX *oaep_ctx(OSSL_LIB_CTX *L, EVP_PKEY *k, const char *md, int decrypt)
{
    EVP_PKEY_CTX *pctx = EVP_PKEY_CTX_new_from_pkey(L, k, NULL);

    if (pctx == NULL ||
        (decrypt ? EVP_PKEY_decrypt_init(pctx) : EVP_PKEY_encrypt_init(pctx)) <= 0 ||
        EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_OAEP_PADDING) <= 0 ||
        EVP_PKEY_CTX_set_rsa_oaep_md_name(pctx, md, NULL) <= 0 ||
        EVP_PKEY_CTX_set_rsa_mgf1_md_name(pctx, md, NULL) <= 0) {
        EVP_PKEY_CTX_free(pctx);
        return NULL;
    }
    return pctx;
}

int bench_oaep_decrypt(OSSL_LIB_CTX *L, EVP_PKEY *k, const char *md, const unsigned char *ct,
                       size_t ctlen, unsigned char *out, size_t *outlen)
{
    EVP_PKEY_CTX *pctx = oaep_ctx(L, k, md, 1);
    int ok = pctx != NULL && EVP_PKEY_decrypt(pctx, out, outlen, ct, ctlen) > 0;

    EVP_PKEY_CTX_free(pctx);
    return ok;
}

int bench_ct_pool_make(bench_ct_pool *p, OSSL_LIB_CTX *deflt, EVP_PKEY *pub, const char *md,
                       size_t n)
{
    unsigned char key[BENCH_WRAPPED_LEN];
    EVP_PKEY_CTX *pctx = oaep_ctx(deflt, pub, md, 0);
    int ok = 0;

    memset(p, 0, sizeof(*p));
    if (pctx == NULL || (p->ct = OPENSSL_zalloc(n * sizeof(*p->ct))) == NULL)
        goto end;
    p->ctlen = (size_t)EVP_PKEY_get_size(pub);
    for (p->n = 0; p->n < n; p->n++) {
        size_t len = p->ctlen;

        if ((p->ct[p->n] = OPENSSL_malloc(p->ctlen)) == NULL ||
            RAND_bytes_ex(deflt, key, sizeof(key), 0) <= 0 ||
            EVP_PKEY_encrypt(pctx, p->ct[p->n], &len, key, sizeof(key)) <= 0 || len != p->ctlen) {
            p->n++;
            goto end;
        }
        if (p->n == 0)
            memcpy(p->pt0, key, sizeof(key));
    }
    ok = 1;
end:
    OPENSSL_cleanse(key, sizeof(key));
    EVP_PKEY_CTX_free(pctx);
    return ok;
}

int bench_ct_pool_check(const bench_ct_pool *p, const unsigned char *pt, size_t ptlen)
{
    return ptlen == BENCH_WRAPPED_LEN && CRYPTO_memcmp(pt, p->pt0, ptlen) == 0;
}

void bench_ct_pool_free(bench_ct_pool *p)
{
    for (size_t i = 0; i < p->n; i++)
        OPENSSL_free(p->ct[i]);
    OPENSSL_free(p->ct);
    OPENSSL_cleanse(p, sizeof(*p));
}

/* ---- HPKE open (OpenSSL >= 3.2) ----------------------------------------------------------------
 */

#if OPENSSL_VERSION_NUMBER >= 0x30200000L
static const OSSL_HPKE_SUITE hpke_suite = {OSSL_HPKE_KEM_ID_P256, OSSL_HPKE_KDF_ID_HKDF_SHA256,
                                           OSSL_HPKE_AEAD_ID_AES_GCM_128};
static const unsigned char hpke_info[] = "keyx-bench";

int bench_hpke_pool_make(bench_ct_pool *p, OSSL_LIB_CTX *deflt, const unsigned char *pub,
                         size_t publen, size_t n)
{
    unsigned char msg[BENCH_WRAPPED_LEN];
    size_t enclen = OSSL_HPKE_get_public_encap_size(hpke_suite);
    int ok = 0;

    memset(p, 0, sizeof(*p));
    if (enclen == 0 || (p->ct = OPENSSL_zalloc(n * sizeof(*p->ct))) == NULL)
        return 0;
    p->ctlen = enclen + OSSL_HPKE_get_ciphertext_size(hpke_suite, sizeof(msg));
    for (p->n = 0; p->n < n; p->n++) {
        /* one sender context per message: a context encapsulates once */
        OSSL_HPKE_CTX *ctx = NULL;
        size_t el = enclen, ctlen = p->ctlen - enclen;
        int sealed =
            (p->ct[p->n] = OPENSSL_malloc(p->ctlen)) != NULL &&
            RAND_bytes_ex(deflt, msg, sizeof(msg), 0) > 0 &&
            (ctx = OSSL_HPKE_CTX_new(OSSL_HPKE_MODE_BASE, hpke_suite, OSSL_HPKE_ROLE_SENDER, deflt,
                                     NULL)) != NULL &&
            OSSL_HPKE_encap(ctx, p->ct[p->n], &el, pub, publen, hpke_info, sizeof(hpke_info) - 1) ==
                1 &&
            el == enclen &&
            OSSL_HPKE_seal(ctx, p->ct[p->n] + enclen, &ctlen, NULL, 0, msg, sizeof(msg)) == 1 &&
            enclen + ctlen == p->ctlen;

        OSSL_HPKE_CTX_free(ctx);
        if (!sealed) {
            p->n++;
            goto end;
        }
        if (p->n == 0)
            memcpy(p->pt0, msg, sizeof(msg));
    }
    ok = 1;
end:
    OPENSSL_cleanse(msg, sizeof(msg));
    return ok;
}

int bench_hpke_open(OSSL_LIB_CTX *L, EVP_PKEY *k, const unsigned char *sealed, size_t len,
                    unsigned char *out, size_t *outlen)
{
    size_t enclen = OSSL_HPKE_get_public_encap_size(hpke_suite);
    OSSL_HPKE_CTX *ctx =
        OSSL_HPKE_CTX_new(OSSL_HPKE_MODE_BASE, hpke_suite, OSSL_HPKE_ROLE_RECEIVER, L, NULL);
    int ok = ctx != NULL && len > enclen &&
             OSSL_HPKE_decap(ctx, sealed, enclen, k, hpke_info, sizeof(hpke_info) - 1) == 1 &&
             OSSL_HPKE_open(ctx, out, outlen, NULL, 0, sealed + enclen, len - enclen) == 1;

    OSSL_HPKE_CTX_free(ctx);
    return ok;
}
#endif

/* ---- signatures ------------------------------------------------------------------------------ */

static EVP_PKEY_CTX *sign_ctx(OSSL_LIB_CTX *L, EVP_PKEY *k, int pss, int sign)
{
    EVP_PKEY_CTX *pctx = EVP_PKEY_CTX_new_from_pkey(L, k, NULL);
    int saltlen = RSA_PSS_SALTLEN_DIGEST;
    OSSL_PARAM params[4], *p = params;

    *p++ = OSSL_PARAM_construct_utf8_string(OSSL_SIGNATURE_PARAM_DIGEST, (char *)"SHA256", 0);
    if (pss) {
        *p++ = OSSL_PARAM_construct_utf8_string(OSSL_SIGNATURE_PARAM_PAD_MODE,
                                                (char *)OSSL_PKEY_RSA_PAD_MODE_PSS, 0);
        *p++ = OSSL_PARAM_construct_int(OSSL_SIGNATURE_PARAM_PSS_SALTLEN, &saltlen);
    }
    *p = OSSL_PARAM_construct_end();
    if (pctx == NULL || (sign ? EVP_PKEY_sign_init(pctx) : EVP_PKEY_verify_init(pctx)) <= 0 ||
        EVP_PKEY_CTX_set_params(pctx, params) <= 0) {
        EVP_PKEY_CTX_free(pctx);
        return NULL;
    }
    return pctx;
}

int bench_sign(OSSL_LIB_CTX *L, EVP_PKEY *k, int pss, const unsigned char *dgst, size_t dlen,
               unsigned char *sig, size_t *siglen)
{
    EVP_PKEY_CTX *pctx = sign_ctx(L, k, pss, 1);
    int ok = pctx != NULL && EVP_PKEY_sign(pctx, sig, siglen, dgst, dlen) > 0;

    EVP_PKEY_CTX_free(pctx);
    return ok;
}

int bench_verify(OSSL_LIB_CTX *deflt, EVP_PKEY *pub, int pss, const unsigned char *dgst,
                 size_t dlen, const unsigned char *sig, size_t siglen, int raw_rs)
{
    EVP_PKEY_CTX *pctx = sign_ctx(deflt, pub, pss, 0);
    unsigned char *der = NULL;
    ECDSA_SIG *es = NULL;
    int ok, derlen;

    if (raw_rs) {
        BIGNUM *r = BN_bin2bn(sig, (int)(siglen / 2), NULL);
        BIGNUM *s = BN_bin2bn(sig + siglen / 2, (int)(siglen / 2), NULL);

        if (siglen % 2 != 0 || r == NULL || s == NULL || (es = ECDSA_SIG_new()) == NULL ||
            !ECDSA_SIG_set0(es, r, s)) {
            BN_free(r);
            BN_free(s);
            ECDSA_SIG_free(es);
            EVP_PKEY_CTX_free(pctx);
            return 0;
        }
        if ((derlen = i2d_ECDSA_SIG(es, &der)) <= 0) {
            ECDSA_SIG_free(es);
            EVP_PKEY_CTX_free(pctx);
            return 0;
        }
        sig = der;
        siglen = (size_t)derlen;
    }
    ok = pctx != NULL && EVP_PKEY_verify(pctx, sig, siglen, dgst, dlen) == 1;
    OPENSSL_free(der);
    ECDSA_SIG_free(es);
    EVP_PKEY_CTX_free(pctx);
    return ok;
}
