/* The exchange's KDF parameters and the KDF itself: the default provider's parameter names,
 * defaults and outputs, with the KDF fetched from keyx's own library context. */
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/params.h>

#include "exchange/kdf.h"
#include "provider/errors.h"

/* The names the default provider's exchanges accept and report. */
static const char *kdf_name(keyx_kdf_type t)
{
    switch (t) {
    case KEYX_KDF_X963:
        return OSSL_KDF_NAME_X963KDF;
    case KEYX_KDF_X942_ASN1:
        return OSSL_KDF_NAME_X942KDF_ASN1;
    default:
        return "";
    }
}

static int set_type(keyx_provctx *p, keyx_kdf *k, keyx_kdf_type offered, const OSSL_PARAM *par)
{
    const char *name = NULL;

    if (!OSSL_PARAM_get_utf8_string_ptr(par, &name)) {
        KEYX_ERR(p, KEYX_R_KDF, "kdf-type must be a UTF-8 string");
        return 0;
    }
    if (name[0] == '\0') {
        k->type = KEYX_KDF_NONE;
        return 1;
    }
    if (offered != KEYX_KDF_NONE && strcmp(name, kdf_name(offered)) == 0) {
        k->type = offered;
        return 1;
    }
    if (offered == KEYX_KDF_NONE)
        KEYX_ERR(p, KEYX_R_KDF,
                 "kdf-type '%s': this key exchange has no KDF; set an empty kdf-type and apply the "
                 "KDF to the shared secret after derive",
                 name);
    else
        KEYX_ERR(p, KEYX_R_KDF, "kdf-type '%s' is not supported here: use '%s' or '' (none)", name,
                 kdf_name(offered));
    return 0;
}

static int set_digest(keyx_provctx *p, keyx_kdf *k, const OSSL_PARAM params[],
                      const OSSL_PARAM *par)
{
    const char *name = NULL, *props = NULL;
    const OSSL_PARAM *pp = OSSL_PARAM_locate_const(params, OSSL_EXCHANGE_PARAM_KDF_DIGEST_PROPS);
    EVP_MD *md;

    if (!OSSL_PARAM_get_utf8_string_ptr(par, &name) ||
        (pp != NULL && !OSSL_PARAM_get_utf8_string_ptr(pp, &props))) {
        KEYX_ERR(p, KEYX_R_KDF, "kdf-digest and kdf-digest-props must be UTF-8 strings");
        return 0;
    }
    /* keyx's context holds only the default provider: the properties select among its digests. */
    md = EVP_MD_fetch(p->libctx, name, props);
    if (md == NULL) {
        KEYX_ERR(p, KEYX_R_KDF,
                 "kdf-digest '%s'%s%s%s is not available to keyx's KDF: name a digest of "
                 "OpenSSL's default provider (e.g. SHA256)",
                 name, props != NULL ? " (properties '" : "", props != NULL ? props : "",
                 props != NULL ? "')" : "");
        return 0;
    }
    if ((EVP_MD_get_flags(md) & EVP_MD_FLAG_XOF) != 0) {
        KEYX_ERR(p, KEYX_R_KDF,
                 "kdf-digest '%s' is an XOF, which the KDF cannot use: choose a "
                 "fixed-length digest such as SHA256",
                 name);
        EVP_MD_free(md);
        return 0;
    }
    EVP_MD_free(k->md);
    k->md = md;
    return 1;
}

static int set_ukm(keyx_provctx *p, keyx_kdf *k, const OSSL_PARAM *par)
{
    void *ukm = NULL;
    size_t len = 0;

    /* An empty or absent UKM clears it, as the default provider does. */
    if (par->data != NULL && par->data_size != 0 &&
        !OSSL_PARAM_get_octet_string(par, &ukm, 0, &len)) {
        KEYX_ERR(p, KEYX_R_KDF, "kdf-ukm must be an octet string");
        return 0;
    }
    OPENSSL_clear_free(k->ukm, k->ukmlen);
    k->ukm = ukm;
    k->ukmlen = len;
    return 1;
}

static int set_cekalg(keyx_provctx *p, keyx_kdf *k, const OSSL_PARAM *par)
{
    const char *name = NULL;
    char *dup = NULL;

    if (par->data != NULL && par->data_size != 0) {
        if (!OSSL_PARAM_get_utf8_string_ptr(par, &name)) {
            KEYX_ERR(p, KEYX_R_KDF, "cekalg must be a UTF-8 string");
            return 0;
        }
        if ((dup = OPENSSL_strdup(name)) == NULL)
            return 0;
    }
    OPENSSL_free(k->cekalg);
    k->cekalg = dup;
    return 1;
}

int keyx_kdf_set_params(keyx_provctx *p, keyx_kdf *k, keyx_kdf_type offered,
                        const OSSL_PARAM params[])
{
    const OSSL_PARAM *par;

    if ((par = OSSL_PARAM_locate_const(params, OSSL_EXCHANGE_PARAM_KDF_TYPE)) != NULL &&
        !set_type(p, k, offered, par))
        return 0;
    /* An exchange without a KDF (X25519, X448) has no further KDF parameters, as the default
     * provider's. */
    if (offered == KEYX_KDF_NONE)
        return 1;
    if ((par = OSSL_PARAM_locate_const(params, OSSL_EXCHANGE_PARAM_KDF_DIGEST)) != NULL &&
        !set_digest(p, k, params, par))
        return 0;
    if ((par = OSSL_PARAM_locate_const(params, OSSL_EXCHANGE_PARAM_KDF_OUTLEN)) != NULL &&
        !OSSL_PARAM_get_size_t(par, &k->outlen)) {
        KEYX_ERR(p, KEYX_R_KDF, "kdf-outlen must be an unsigned integer");
        return 0;
    }
    if ((par = OSSL_PARAM_locate_const(params, OSSL_EXCHANGE_PARAM_KDF_UKM)) != NULL &&
        !set_ukm(p, k, par))
        return 0;
    if (offered == KEYX_KDF_X942_ASN1 &&
        (par = OSSL_PARAM_locate_const(params, OSSL_KDF_PARAM_CEK_ALG)) != NULL &&
        !set_cekalg(p, k, par))
        return 0;
    return 1;
}

int keyx_kdf_get_params(const keyx_kdf *k, keyx_kdf_type offered, OSSL_PARAM params[])
{
    OSSL_PARAM *par;

    if ((par = OSSL_PARAM_locate(params, OSSL_EXCHANGE_PARAM_KDF_TYPE)) != NULL &&
        !OSSL_PARAM_set_utf8_string(par, kdf_name(k->type)))
        return 0;
    if (offered == KEYX_KDF_NONE)
        return 1;
    if ((par = OSSL_PARAM_locate(params, OSSL_EXCHANGE_PARAM_KDF_DIGEST)) != NULL &&
        !OSSL_PARAM_set_utf8_string(par, k->md == NULL ? "" : EVP_MD_get0_name(k->md)))
        return 0;
    if ((par = OSSL_PARAM_locate(params, OSSL_EXCHANGE_PARAM_KDF_OUTLEN)) != NULL &&
        !OSSL_PARAM_set_size_t(par, k->outlen))
        return 0;
    if ((par = OSSL_PARAM_locate(params, OSSL_EXCHANGE_PARAM_KDF_UKM)) != NULL &&
        !OSSL_PARAM_set_octet_ptr(par, k->ukm, k->ukmlen))
        return 0;
    if (offered == KEYX_KDF_X942_ASN1 &&
        (par = OSSL_PARAM_locate(params, OSSL_KDF_PARAM_CEK_ALG)) != NULL &&
        !OSSL_PARAM_set_utf8_string(par, k->cekalg == NULL ? "" : k->cekalg))
        return 0;
    return 1;
}

int keyx_kdf_copy(keyx_kdf *dst, const keyx_kdf *src)
{
    *dst = *src;
    dst->md = NULL;
    dst->ukm = NULL;
    dst->cekalg = NULL;
    if (src->md != NULL) {
        if (!EVP_MD_up_ref(src->md))
            goto err;
        dst->md = src->md;
    }
    if (src->ukm != NULL && (dst->ukm = OPENSSL_memdup(src->ukm, src->ukmlen)) == NULL)
        goto err;
    if (src->cekalg != NULL && (dst->cekalg = OPENSSL_strdup(src->cekalg)) == NULL)
        goto err;
    return 1;
err:
    keyx_kdf_clear(dst);
    return 0;
}

void keyx_kdf_clear(keyx_kdf *k)
{
    EVP_MD_free(k->md);
    OPENSSL_clear_free(k->ukm, k->ukmlen);
    OPENSSL_free(k->cekalg);
    memset(k, 0, sizeof(*k));
}

int keyx_kdf_check(keyx_provctx *p, const keyx_kdf *k)
{
    const char *name = kdf_name(k->type);

    if (k->md == NULL) {
        KEYX_ERR(p, KEYX_R_KDF, "%s needs kdf-digest: set it before derive", name);
        return 0;
    }
    if (k->outlen == 0) {
        KEYX_ERR(p, KEYX_R_KDF, "%s needs kdf-outlen: set it before derive", name);
        return 0;
    }
    if (k->type == KEYX_KDF_X942_ASN1 && k->cekalg == NULL) {
        KEYX_ERR(p, KEYX_R_KDF,
                 "%s needs cekalg, the key-wrap algorithm its output is for (e.g. "
                 "id-aes128-wrap): set it before derive",
                 name);
        return 0;
    }
    return 1;
}

int keyx_kdf_derive(keyx_provctx *p, const keyx_kdf *k, const unsigned char *z, size_t zlen,
                    unsigned char *out)
{
    const char *name = kdf_name(k->type);
    OSSL_PARAM params[6], *par = params;
    EVP_KDF *kdf;
    EVP_KDF_CTX *kctx = NULL;
    int ok = 0;

    if (!keyx_kdf_check(p, k))
        return 0;
    *par++ =
        OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, (char *)EVP_MD_get0_name(k->md), 0);
    *par++ = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, (void *)z, zlen);
    if (k->type == KEYX_KDF_X963) {
        if (k->ukm != NULL)
            *par++ = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, k->ukm, k->ukmlen);
    } else {
        if (k->ukm != NULL)
            *par++ = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_UKM, k->ukm, k->ukmlen);
        *par++ = OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_CEK_ALG, k->cekalg, 0);
    }
    *par = OSSL_PARAM_construct_end();

    kdf = EVP_KDF_fetch(p->libctx, name, NULL);
    if (kdf == NULL || (kctx = EVP_KDF_CTX_new(kdf)) == NULL) {
        KEYX_ERR(p, KEYX_R_KDF, "%s is not available in keyx's library context", name);
        goto end;
    }
    if (EVP_KDF_derive(kctx, out, k->outlen, params) != 1) {
        KEYX_ERR(p, KEYX_R_KDF, "%s with digest %s failed (kdf-outlen %zu%s%s): check them", name,
                 EVP_MD_get0_name(k->md), k->outlen, k->cekalg != NULL ? ", cekalg " : "",
                 k->cekalg != NULL ? k->cekalg : "");
        goto end;
    }
    ok = 1;
end:
    EVP_KDF_CTX_free(kctx);
    EVP_KDF_free(kdf);
    return ok;
}
