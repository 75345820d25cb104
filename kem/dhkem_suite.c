#include <string.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/params.h>

#include "kem/dhkem_suite.h"
#include "keymgmt/algtab.h"
#include "provider/errors.h"

static const keyx_dhkem_suite suites[] = {
    {"P-256", 0x0010, "SHA256", 32, 65, 32},  {"P-384", 0x0011, "SHA384", 48, 97, 48},
    {"P-521", 0x0012, "SHA512", 64, 133, 66}, {"X25519", 0x0020, "SHA256", 32, 32, 32},
    {"X448", 0x0021, "SHA512", 64, 56, 56},
};

const keyx_dhkem_suite *keyx_dhkem_suite_of(keyx_alg alg, const char *group)
{
    if (alg != KEYX_ALG_EC && alg != KEYX_ALG_X25519 && alg != KEYX_ALG_X448)
        return NULL;
    for (size_t i = 0; i < sizeof(suites) / sizeof(suites[0]); i++)
        if (group != NULL && strcmp(group, suites[i].group) == 0)
            return &suites[i];
    return NULL;
}

#define HPKE_VERSION "HPKE-v1"
#define SUITE_ID_LEN 5 /* "KEM" || I2OSP(kem_id, 2) */
#define MAX_LABELED (sizeof(HPKE_VERSION) - 1 + SUITE_ID_LEN + 16 + 3 * KEYX_DHKEM_MAX_NPK + 2)

/* "HPKE-v1" || suite_id || label || data, after an optional I2OSP(length, 2): the labeled
 * input of RFC 9180 section 4. Returns its length, 0 if it does not fit. */
static size_t labeled(unsigned char *out, size_t cap, int with_length, size_t length,
                      uint16_t kem_id, const char *label, const unsigned char *data, size_t len)
{
    size_t n = 0, lablen = strlen(label);

    if ((with_length ? 2 : 0) + sizeof(HPKE_VERSION) - 1 + SUITE_ID_LEN + lablen + len > cap)
        return 0;
    if (with_length) {
        out[n++] = (unsigned char)(length >> 8);
        out[n++] = (unsigned char)length;
    }
    memcpy(out + n, HPKE_VERSION, sizeof(HPKE_VERSION) - 1);
    n += sizeof(HPKE_VERSION) - 1;
    memcpy(out + n, "KEM", 3);
    out[n + 3] = (unsigned char)(kem_id >> 8);
    out[n + 4] = (unsigned char)kem_id;
    n += SUITE_ID_LEN;
    memcpy(out + n, label, lablen);
    n += lablen;
    if (len > 0)
        memcpy(out + n, data, len);
    return n + len;
}

/* One HKDF step (extract only or expand only) in keyx's library context. */
static int hkdf(keyx_provctx *p, int mode, const char *digest, const unsigned char *key,
                size_t keylen, const unsigned char *info, size_t infolen, unsigned char *out,
                size_t outlen)
{
    EVP_KDF_CTX *ctx = EVP_KDF_CTX_new(p->algs->hkdf);
    OSSL_PARAM params[5], *q = params;
    int ok;

    *q++ = OSSL_PARAM_construct_int(OSSL_KDF_PARAM_MODE, &mode);
    *q++ = OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, (char *)digest, 0);
    *q++ = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, (void *)key, keylen);
    if (info != NULL)
        *q++ = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, (void *)info, infolen);
    *q = OSSL_PARAM_construct_end();
    ok = ctx != NULL && EVP_KDF_derive(ctx, out, outlen, params) == 1;
    EVP_KDF_CTX_free(ctx);
    return ok;
}

int keyx_dhkem_extract_and_expand(keyx_provctx *p, const keyx_dhkem_suite *s,
                                  const unsigned char *dh, size_t dhlen,
                                  const unsigned char *kem_context, size_t ctxlen,
                                  unsigned char *out)
{
    unsigned char ikm[MAX_LABELED], info[MAX_LABELED], prk[EVP_MAX_MD_SIZE];
    size_t prklen = s->nsecret; /* Nh of the KEM's HKDF: equal to Nsecret for every DHKEM */
    size_t ikmlen = labeled(ikm, sizeof(ikm), 0, 0, s->kem_id, "eae_prk", dh, dhlen);
    size_t infolen =
        labeled(info, sizeof(info), 1, s->nsecret, s->kem_id, "shared_secret", kem_context, ctxlen);
    int ok =
        ikmlen != 0 && infolen != 0 &&
        hkdf(p, EVP_KDF_HKDF_MODE_EXTRACT_ONLY, s->digest, ikm, ikmlen, NULL, 0, prk, prklen) &&
        hkdf(p, EVP_KDF_HKDF_MODE_EXPAND_ONLY, s->digest, prk, prklen, info, infolen, out,
             s->nsecret);

    OPENSSL_cleanse(ikm, sizeof(ikm));
    OPENSSL_cleanse(prk, sizeof(prk));
    if (!ok) {
        OPENSSL_cleanse(out, s->nsecret);
        KEYX_ERR(p, KEYX_R_KDF, "DHKEM %s: HKDF-%s in keyx's library context failed", s->group,
                 s->digest);
    }
    return ok;
}
