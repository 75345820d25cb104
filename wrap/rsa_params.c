#include <string.h>
#include <strings.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/rsa.h>

#include "provider/errors.h"
#include "wrap/rsa_params.h"

static const struct {
    int pad;
    const char *name;
} pad_names[] = {
    {RSA_PKCS1_PADDING, OSSL_PKEY_RSA_PAD_MODE_PKCSV15},
    {RSA_NO_PADDING, OSSL_PKEY_RSA_PAD_MODE_NONE},
    {RSA_PKCS1_OAEP_PADDING, OSSL_PKEY_RSA_PAD_MODE_OAEP},
    {RSA_PKCS1_OAEP_PADDING, "oeap"}, /* OpenSSL's historical alias */
    {RSA_X931_PADDING, OSSL_PKEY_RSA_PAD_MODE_X931},
};

void keyx_rsa_params_reset(keyx_rsa_params *rp)
{
    memset(rp, 0, sizeof(*rp));
    rp->pad = RSA_PKCS1_PADDING;
}

void keyx_rsa_params_clear(keyx_rsa_params *rp)
{
    OPENSSL_clear_free(rp->label, rp->labellen);
    rp->label = NULL;
    rp->labellen = 0;
}

int keyx_rsa_params_copy(keyx_rsa_params *dst, const keyx_rsa_params *src)
{
    *dst = *src;
    dst->label = NULL;
    if (src->label != NULL && (dst->label = OPENSSL_memdup(src->label, src->labellen)) == NULL)
        return 0;
    return 1;
}

/* Digest name as keyx's backends know it: SHA1..SHA512 by their short names, others by the
 * default provider's first name. 0 with an error for a digest keyx's context does not have. */
static int canonical_md(keyx_provctx *p, const OSSL_PARAM *prm, char *out, size_t outsize)
{
    static const char *const shorts[] = {"SHA1", "SHA224", "SHA256", "SHA384", "SHA512"};
    const char *name = NULL;
    EVP_MD *md;

    if (!OSSL_PARAM_get_utf8_string_ptr(prm, &name) ||
        (md = EVP_MD_fetch(p->libctx, name, NULL)) == NULL) {
        KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT, "%s: unknown digest '%s'", prm->key,
                 name != NULL ? name : "(not a string)");
        return 0;
    }
    snprintf(out, outsize, "%s", EVP_MD_get0_name(md));
    for (size_t i = 0; i < sizeof(shorts) / sizeof(shorts[0]); i++)
        if (EVP_MD_is_a(md, shorts[i]))
            snprintf(out, outsize, "%s", shorts[i]);
    EVP_MD_free(md);
    return 1;
}

static int get_pad(keyx_provctx *p, const OSSL_PARAM *prm, int *pad)
{
    const char *name = NULL;

    if (prm->data_type == OSSL_PARAM_UTF8_STRING) {
        if (OSSL_PARAM_get_utf8_string_ptr(prm, &name))
            for (size_t i = 0; i < sizeof(pad_names) / sizeof(pad_names[0]); i++)
                if (strcasecmp(name, pad_names[i].name) == 0) {
                    *pad = pad_names[i].pad;
                    return 1;
                }
    } else if (OSSL_PARAM_get_int(prm, pad)) {
        switch (*pad) {
        case RSA_PKCS1_PADDING:
        case RSA_NO_PADDING:
        case RSA_PKCS1_OAEP_PADDING:
        case RSA_X931_PADDING:
        case RSA_PKCS1_WITH_TLS_PADDING:
            return 1;
        default:
            break;
        }
    }
    KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT,
             "pad-mode: expected oaep, pkcs1, none or x931 (or libssl's TLS padding)");
    return 0;
}

int keyx_rsa_params_set(keyx_provctx *p, keyx_rsa_params *rp, const OSSL_PARAM params[])
{
    const OSSL_PARAM *prm;
    void *label = NULL;
    size_t labellen = 0;
    char md[64], mgf1[64];
    int pad = rp->pad;

    if (params == NULL)
        return 1;
    snprintf(md, sizeof(md), "%s", rp->md);
    snprintf(mgf1, sizeof(mgf1), "%s", rp->mgf1_md);
    if ((prm = OSSL_PARAM_locate_const(params, OSSL_ASYM_CIPHER_PARAM_PAD_MODE)) != NULL &&
        !get_pad(p, prm, &pad))
        return 0;
    if ((prm = OSSL_PARAM_locate_const(params, OSSL_ASYM_CIPHER_PARAM_OAEP_DIGEST)) != NULL &&
        !canonical_md(p, prm, md, sizeof(md)))
        return 0;
    if ((prm = OSSL_PARAM_locate_const(params, OSSL_ASYM_CIPHER_PARAM_MGF1_DIGEST)) != NULL &&
        !canonical_md(p, prm, mgf1, sizeof(mgf1)))
        return 0;
    /* digest-props and mgf1-digest-props are accepted and not used: keyx fetches digests in its
     * own library context, which has the default provider only. */
    if ((prm = OSSL_PARAM_locate_const(params, OSSL_ASYM_CIPHER_PARAM_TLS_CLIENT_VERSION)) !=
            NULL &&
        !OSSL_PARAM_get_uint(prm, &rp->tls_client))
        return 0;
    if ((prm = OSSL_PARAM_locate_const(params, OSSL_ASYM_CIPHER_PARAM_TLS_NEGOTIATED_VERSION)) !=
            NULL &&
        !OSSL_PARAM_get_uint(prm, &rp->tls_alt))
        return 0;
    if ((prm = OSSL_PARAM_locate_const(params, OSSL_ASYM_CIPHER_PARAM_OAEP_LABEL)) != NULL) {
        if (!OSSL_PARAM_get_octet_string(prm, &label, 0, &labellen))
            return 0;
        keyx_rsa_params_clear(rp);
        if (labellen == 0) {
            OPENSSL_free(label);
            label = NULL;
        }
        rp->label = label;
        rp->labellen = labellen;
    }
    rp->pad = pad;
    memcpy(rp->md, md, sizeof(md));
    memcpy(rp->mgf1_md, mgf1, sizeof(mgf1));
    return 1;
}

int keyx_rsa_params_get(const keyx_rsa_params *rp, OSSL_PARAM params[])
{
    OSSL_PARAM *prm;
    const char *md = rp->md[0] ? rp->md : "SHA1";

    if ((prm = OSSL_PARAM_locate(params, OSSL_ASYM_CIPHER_PARAM_PAD_MODE)) != NULL) {
        if (prm->data_type == OSSL_PARAM_INTEGER) {
            if (!OSSL_PARAM_set_int(prm, rp->pad))
                return 0;
        } else {
            const char *name = NULL;

            for (size_t i = 0; i < sizeof(pad_names) / sizeof(pad_names[0]) && name == NULL; i++)
                if (pad_names[i].pad == rp->pad)
                    name = pad_names[i].name;
            if (name == NULL || !OSSL_PARAM_set_utf8_string(prm, name))
                return 0;
        }
    }
    if ((prm = OSSL_PARAM_locate(params, OSSL_ASYM_CIPHER_PARAM_OAEP_DIGEST)) != NULL &&
        !OSSL_PARAM_set_utf8_string(prm, md))
        return 0;
    if ((prm = OSSL_PARAM_locate(params, OSSL_ASYM_CIPHER_PARAM_MGF1_DIGEST)) != NULL &&
        !OSSL_PARAM_set_utf8_string(prm, rp->mgf1_md[0] ? rp->mgf1_md : md))
        return 0;
    if ((prm = OSSL_PARAM_locate(params, OSSL_ASYM_CIPHER_PARAM_OAEP_LABEL)) != NULL &&
        !OSSL_PARAM_set_octet_ptr(prm, rp->label, rp->labellen))
        return 0;
    if ((prm = OSSL_PARAM_locate(params, OSSL_ASYM_CIPHER_PARAM_TLS_CLIENT_VERSION)) != NULL &&
        !OSSL_PARAM_set_uint(prm, rp->tls_client))
        return 0;
    if ((prm = OSSL_PARAM_locate(params, OSSL_ASYM_CIPHER_PARAM_TLS_NEGOTIATED_VERSION)) != NULL &&
        !OSSL_PARAM_set_uint(prm, rp->tls_alt))
        return 0;
    return 1;
}

static const OSSL_PARAM settable[] = {
    OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_OAEP_DIGEST, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_OAEP_DIGEST_PROPS, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_PAD_MODE, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_MGF1_DIGEST, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_MGF1_DIGEST_PROPS, NULL, 0),
    OSSL_PARAM_octet_string(OSSL_ASYM_CIPHER_PARAM_OAEP_LABEL, NULL, 0),
    OSSL_PARAM_uint(OSSL_ASYM_CIPHER_PARAM_TLS_CLIENT_VERSION, NULL),
    OSSL_PARAM_uint(OSSL_ASYM_CIPHER_PARAM_TLS_NEGOTIATED_VERSION, NULL),
    OSSL_PARAM_END,
};

static const OSSL_PARAM gettable[] = {
    OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_OAEP_DIGEST, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_PAD_MODE, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_MGF1_DIGEST, NULL, 0),
    OSSL_PARAM_DEFN(OSSL_ASYM_CIPHER_PARAM_OAEP_LABEL, OSSL_PARAM_OCTET_PTR, NULL, 0),
    OSSL_PARAM_uint(OSSL_ASYM_CIPHER_PARAM_TLS_CLIENT_VERSION, NULL),
    OSSL_PARAM_uint(OSSL_ASYM_CIPHER_PARAM_TLS_NEGOTIATED_VERSION, NULL),
    OSSL_PARAM_END,
};

const OSSL_PARAM *keyx_rsa_params_settable(void)
{
    return settable;
}

const OSSL_PARAM *keyx_rsa_params_gettable(void)
{
    return gettable;
}

void keyx_rsa_params_to_ossl(const keyx_rsa_params *rp, OSSL_PARAM out[5])
{
    OSSL_PARAM *q = out;

    *q++ = OSSL_PARAM_construct_int(OSSL_ASYM_CIPHER_PARAM_PAD_MODE, (int *)&rp->pad);
    if (rp->pad == RSA_PKCS1_OAEP_PADDING) {
        *q++ = OSSL_PARAM_construct_utf8_string(OSSL_ASYM_CIPHER_PARAM_OAEP_DIGEST,
                                                (char *)(rp->md[0] ? rp->md : "SHA1"), 0);
        if (rp->mgf1_md[0])
            *q++ = OSSL_PARAM_construct_utf8_string(OSSL_ASYM_CIPHER_PARAM_MGF1_DIGEST,
                                                    (char *)rp->mgf1_md, 0);
        if (rp->labellen > 0)
            *q++ = OSSL_PARAM_construct_octet_string(OSSL_ASYM_CIPHER_PARAM_OAEP_LABEL, rp->label,
                                                     rp->labellen);
    }
    *q = OSSL_PARAM_construct_end();
}

int keyx_rsa_params_op(keyx_provctx *p, const keyx_rsa_params *rp, int software,
                       const char *backend, keyx_rsa_op *op)
{
    memset(op, 0, sizeof(*op));
    switch (rp->pad) {
    case RSA_PKCS1_OAEP_PADDING:
        op->pad = KEYX_RSA_PAD_OAEP;
        op->md = rp->md[0] ? rp->md : "SHA1";
        op->mgf1_md = rp->mgf1_md[0] ? rp->mgf1_md : op->md;
        op->label = rp->label;
        op->labellen = rp->labellen;
        return 1;
    case RSA_PKCS1_PADDING:
        KEYX_ERR(p, KEYX_R_PKCS1_DECRYPT_REFUSED,
                 "PKCS#1 v1.5 decryption is refused: its padding errors are an oracle "
                 "(Bleichenbacher) that lets a peer decrypt session keys, and OpenSSL 3.0 has no "
                 "implicit rejection; use OAEP: the sender encrypts with -pkeyopt "
                 "rsa_padding_mode:oaep, and the same padding decrypts");
        return 0;
    case RSA_NO_PADDING:
        if (!software) {
            KEYX_ERR(p, KEYX_R_UNSUPPORTED,
                     "RSA decryption without padding is refused for a %s key (it would make the "
                     "device a raw RSA oracle); use OAEP, or the RSASVE KEM",
                     backend != NULL ? backend : "hardware");
            return 0;
        }
        op->pad = KEYX_RSA_PAD_RAW;
        return 1;
    case RSA_PKCS1_WITH_TLS_PADDING:
        if (!software) {
            KEYX_ERR(p, KEYX_R_UNSUPPORTED,
                     "TLS 1.2 RSA key exchange (RSA_PKCS1_WITH_TLS_PADDING) is served for "
                     "software keys only, not for a %s key; offer (EC)DHE cipher suites",
                     backend != NULL ? backend : "hardware");
            return 0;
        }
        op->pad = KEYX_RSA_PAD_TLS;
        op->tls_client_version = rp->tls_client;
        op->tls_alt_version = rp->tls_alt;
        return 1;
    default:
        KEYX_ERR(p, KEYX_R_UNSUPPORTED, "RSA padding mode %d cannot decrypt; use OAEP", rp->pad);
        return 0;
    }
}
