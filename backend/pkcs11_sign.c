#include <string.h>
#include <strings.h>

#include <openssl/crypto.h>

#include "backend/pkcs11_sign.h"
#include "provider/audit.h"
#include "provider/errors.h"
#include "provider/provctx.h"

/* The digests keyx hands a token: their PKCS#11 names for PSS and, for PKCS#1 v1.5, the DER of
 * DigestInfo up to the digest itself (RFC 8017, section 9.2, note 1). */
typedef struct p11_md {
    const char *names[3]; /* OpenSSL's spellings */
    const char *label;    /* for messages */
    size_t len;
    CK_MECHANISM_TYPE hash;
    CK_RSA_PKCS_MGF_TYPE mgf;
    unsigned char prefix[19];
    size_t prefixlen;
} p11_md;

static const p11_md digests[] = {
    {{"SHA1", "SHA-1", "SHA1"},
     "SHA-1",
     20,
     CKM_SHA_1,
     CKG_MGF1_SHA1,
     {0x30, 0x21, 0x30, 0x09, 0x06, 0x05, 0x2b, 0x0e, 0x03, 0x02, 0x1a, 0x05, 0x00, 0x04, 0x14},
     15},
    {{"SHA224", "SHA2-224", "SHA-224"},
     "SHA-224",
     28,
     CKM_SHA224,
     CKG_MGF1_SHA224,
     {0x30, 0x2d, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x04,
      0x05, 0x00, 0x04, 0x1c},
     19},
    {{"SHA256", "SHA2-256", "SHA-256"},
     "SHA-256",
     32,
     CKM_SHA256,
     CKG_MGF1_SHA256,
     {0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01,
      0x05, 0x00, 0x04, 0x20},
     19},
    {{"SHA384", "SHA2-384", "SHA-384"},
     "SHA-384",
     48,
     CKM_SHA384,
     CKG_MGF1_SHA384,
     {0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02,
      0x05, 0x00, 0x04, 0x30},
     19},
    {{"SHA512", "SHA2-512", "SHA-512"},
     "SHA-512",
     64,
     CKM_SHA512,
     CKG_MGF1_SHA512,
     {0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03,
      0x05, 0x00, 0x04, 0x40},
     19},
};
#define NDIGESTS (sizeof(digests) / sizeof(digests[0]))

static const char *const scheme_names[3] = {"ECDSA", "RSA PKCS#1 v1.5", "RSA-PSS"};
static const char *const scheme_mechs[3] = {"CKM_ECDSA", "CKM_RSA_PKCS", "CKM_RSA_PKCS_PSS"};

static int md_index(const char *name)
{
    if (name == NULL)
        return -1;
    for (size_t i = 0; i < NDIGESTS; i++)
        for (size_t j = 0; j < 3; j++)
            if (strcasecmp(name, digests[i].names[j]) == 0)
                return (int)i;
    return -1;
}

static int params_refused(CK_RV rv)
{
    return rv == CKR_MECHANISM_INVALID || rv == CKR_MECHANISM_PARAM_INVALID ||
           rv == CKR_ARGUMENTS_BAD;
}

int p11_sig_prepare(p11_dev *d, int tok, keyx_alg alg, size_t size, size_t bits,
                    const keyx_sign_op *op, p11_sig *out)
{
    keyx_provctx *p = p11_dev_prov(d);
    const char *token = p11_dev_token_label(d, tok);
    size_t keybits;
    p11_caps caps;
    int mi = -1, gi = -1;

    memset(out, 0, sizeof(*out));
    out->pair = -1;
    out->tok = tok;
    out->size = size;
    out->md_name = op->md != NULL ? op->md : "(none)";
    out->mgf1_name = op->mgf1_md != NULL ? op->mgf1_md : out->md_name;
    if ((unsigned)op->scheme > KEYX_SIG_RSA_PSS) {
        KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT, "pkcs11: unknown signature scheme %d", op->scheme);
        return 0;
    }
    out->scheme = op->scheme;
    if ((op->scheme == KEYX_SIG_ECDSA) != (alg == KEYX_ALG_EC) ||
        (alg != KEYX_ALG_EC && alg != KEYX_ALG_RSA)) {
        KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT, "pkcs11: an %s key cannot make %s signatures",
                 keyx_alg_name(alg), scheme_names[op->scheme]);
        return 0;
    }
    /* Key size as the mechanism info counts it: EC order bits, RSA modulus bits. */
    keybits = alg == KEYX_ALG_EC ? (size == 66 ? 521 : 8 * size) : bits;
    if (p11_dev_token_caps(d, tok, &caps)) {
        if (!caps.sign[op->scheme].ok) {
            KEYX_ERR(p, KEYX_R_UNSUPPORTED,
                     "pkcs11: token '%s' does not sign with %s (its mechanism list has no %s with "
                     "CKF_SIGN)%s",
                     token, scheme_names[op->scheme], scheme_mechs[op->scheme],
                     op->scheme == KEYX_SIG_RSA_PSS     ? ": use PKCS#1 v1.5 padding with this key"
                     : op->scheme == KEYX_SIG_RSA_PKCS1 ? ": use RSA-PSS padding with this key"
                                                        : "");
            return 0;
        }
        if (keybits < caps.sign[op->scheme].min ||
            (caps.sign[op->scheme].max != 0 && keybits > caps.sign[op->scheme].max)) {
            KEYX_ERR(p, KEYX_R_UNSUPPORTED,
                     "pkcs11: token '%s' signs %s with %zu- to %zu-bit keys only; this key has "
                     "%zu bits",
                     token, scheme_names[op->scheme], (size_t)caps.sign[op->scheme].min,
                     (size_t)caps.sign[op->scheme].max, keybits);
            return 0;
        }
    }
    if (op->scheme == KEYX_SIG_ECDSA) {
        out->mech = CKM_ECDSA;
        return 1;
    }
    /* RSA: the token must be able to name the digest (PSS) or keyx must know its DigestInfo
     * (PKCS#1 v1.5); the same five digests either way. */
    if ((mi = md_index(op->md)) < 0) {
        KEYX_ERR(p, KEYX_R_DIGEST_UNSUPPORTED,
                 "pkcs11: %s signatures with digest %s cannot be made on token '%s': keyx hands "
                 "PKCS#11 tokens SHA-1, SHA-224, SHA-256, SHA-384 and SHA-512 digests only; use "
                 "one of those",
                 scheme_names[op->scheme], out->md_name, token);
        return 0;
    }
    out->md = &digests[mi];
    if (op->scheme == KEYX_SIG_RSA_PKCS1) {
        out->mech = CKM_RSA_PKCS;
        if (size < out->md->prefixlen + out->md->len + 11) {
            KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT,
                     "pkcs11: a %zu-bit RSA key is too small for PKCS#1 v1.5 signatures with %s",
                     bits, out->md->label);
            return 0;
        }
        return 1;
    }
    if ((gi = md_index(out->mgf1_name)) < 0) {
        KEYX_ERR(p, KEYX_R_DIGEST_UNSUPPORTED,
                 "pkcs11: RSA-PSS with MGF1 digest %s cannot be made on token '%s': PKCS#11 names "
                 "MGF1 with SHA-1, SHA-224, SHA-256, SHA-384 and SHA-512 only",
                 out->mgf1_name, token);
        return 0;
    }
    {
        /* EMSA-PSS (RFC 8017 9.1.1): emLen = ceil((modBits - 1) / 8) >= hLen + sLen + 2 */
        size_t emlen = bits > 0 ? (bits - 1 + 7) / 8 : size;

        if (op->saltlen < 0 || emlen < out->md->len + 2 ||
            (size_t)op->saltlen > emlen - out->md->len - 2) {
            KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT,
                     "pkcs11: an RSA-PSS salt of %d bytes does not fit a %zu-bit key with %s (at "
                     "most %zu bytes)",
                     op->saltlen, bits, out->md->label,
                     emlen >= out->md->len + 2 ? emlen - out->md->len - 2 : 0);
            return 0;
        }
    }
    out->mech = CKM_RSA_PKCS_PSS;
    out->pss.hashAlg = out->md->hash;
    out->pss.mgf = digests[gi].mgf;
    out->pss.sLen = (CK_ULONG)op->saltlen;
    out->pair = mi * (int)NDIGESTS + gi;
    switch (p11_dev_pss_state(d, tok, out->pair)) {
    case 1:
        return 1;
    case 0:
        return P11_SIG_PROBE;
    default:
        KEYX_ERR(p, KEYX_R_UNSUPPORTED, "pkcs11: token '%s' refuses RSA-PSS with %s and MGF1-%s%s",
                 token, out->md->label, digests[gi].label,
                 mi != gi ? ": use the same digest for MGF1 (SoftHSM 2 takes only those)" : "");
        return 0;
    }
}

static void refused_error(p11_sess *s, const p11_sig *g, CK_RV rv)
{
    char buf[24];
    int gi = g->pair >= 0 ? g->pair % (int)NDIGESTS : 0;

    KEYX_ERR(p11_dev_prov(s->dev), KEYX_R_UNSUPPORTED,
             "pkcs11: token '%s' refuses RSA-PSS with %s and MGF1-%s (%s)%s",
             p11_dev_token_label(s->dev, s->tok), g->md->label, digests[gi].label,
             p11_rv_name(rv, buf, sizeof(buf)),
             g->pss.mgf != g->md->mgf
                 ? ": use the same digest for MGF1 (SoftHSM 2 takes only those)"
                 : "");
}

int p11_sig_probe(p11_sess *s, CK_OBJECT_HANDLE obj, const p11_sig *g)
{
    keyx_provctx *p = p11_dev_prov(s->dev);
    CK_RSA_PKCS_PSS_PARAMS prm = g->pss;
    CK_MECHANISM mech = {g->mech, &prm, sizeof(prm)};
    unsigned char zero[64] = {0}, *buf;
    CK_ULONG len = g->size;
    CK_RV rv;

    rv = s->f->C_SignInit(s->h, &mech, obj);
    if (rv == CKR_OK) {
        /* ends the operation: the session goes back to the pool clean */
        if ((buf = OPENSSL_malloc(g->size)) == NULL) {
            rv = CKR_HOST_MEMORY;
        } else {
            rv = s->f->C_Sign(s->h, zero, g->md->len, buf, &len);
            OPENSSL_free(buf);
        }
        p11_session_put(s, rv);
        if (rv != CKR_OK)
            return p11_fail(s, rv, "trying RSA-PSS parameters (C_Sign)");
        p11_dev_pss_note(s->dev, g->tok, g->pair, 1);
        keyx_debug(p, "pkcs11: token '%s' takes RSA-PSS with %s and MGF1-%s (remembered)",
                   p11_dev_token_label(s->dev, s->tok), g->md->label,
                   digests[g->pair % (int)NDIGESTS].label);
        return 1;
    }
    p11_session_put(s, rv);
    if (!params_refused(rv))
        return p11_fail(s, rv, "RSA-PSS signing (C_SignInit CKM_RSA_PKCS_PSS)");
    p11_dev_pss_note(s->dev, g->tok, g->pair, 0);
    refused_error(s, g, rv);
    return 0;
}

int p11_sig_sign(p11_sess *s, CK_OBJECT_HANDLE obj, const p11_sig *g, const unsigned char *dgst,
                 size_t dlen, unsigned char *sig, size_t *siglen)
{
    keyx_provctx *p = p11_dev_prov(s->dev);
    CK_RSA_PKCS_PSS_PARAMS prm = g->pss;
    CK_MECHANISM mech = {g->mech, NULL, 0};
    unsigned char in[19 + 64], ec[2 * 66 + 16], *out, *big = NULL;
    size_t inlen = dlen, want = g->scheme == KEYX_SIG_ECDSA ? 2 * g->size : g->size;
    CK_ULONG len;
    CK_RV rv;

    if (g->md != NULL ? dlen != g->md->len : dlen == 0 || dlen > 64) {
        p11_session_put(s, CKR_OK);
        KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT,
                 "pkcs11: a %zu-byte digest cannot be signed as %s with %s", dlen, g->md_name,
                 scheme_names[g->scheme]);
        return 0;
    }
    if (*siglen < want) {
        p11_session_put(s, CKR_OK);
        KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT, "pkcs11: signature buffer of %zu bytes, %zu needed",
                 *siglen, want);
        return 0;
    }
    if (g->scheme == KEYX_SIG_RSA_PKCS1) {
        memcpy(in, g->md->prefix, g->md->prefixlen);
        memcpy(in + g->md->prefixlen, dgst, dlen);
        inlen = g->md->prefixlen + dlen;
    } else {
        memcpy(in, dgst, dlen);
    }
    if (g->scheme == KEYX_SIG_RSA_PSS) {
        mech.pParameter = &prm;
        mech.ulParameterLen = sizeof(prm);
    }
    rv = s->f->C_SignInit(s->h, &mech, obj);
    if (rv != CKR_OK) {
        p11_session_put(s, rv);
        if (g->scheme == KEYX_SIG_RSA_PSS && params_refused(rv)) {
            p11_dev_pss_note(s->dev, g->tok, g->pair, 0);
            refused_error(s, g, rv);
            return 0;
        }
        if (rv == CKR_KEY_FUNCTION_NOT_PERMITTED) {
            KEYX_ERR(p, KEYX_R_KEY_USAGE,
                     "pkcs11: this pkcs11 key is not a signing key (CKA_SIGN): token '%s' "
                     "refuses to sign with it",
                     p11_dev_token_label(s->dev, s->tok));
            return 0;
        }
        return p11_fail(s, rv,
                        g->scheme == KEYX_SIG_ECDSA       ? "ECDSA signing (C_SignInit CKM_ECDSA)"
                        : g->scheme == KEYX_SIG_RSA_PKCS1 ? "RSA signing (C_SignInit CKM_RSA_PKCS)"
                                                          : "RSA-PSS signing (C_SignInit "
                                                            "CKM_RSA_PKCS_PSS)");
    }
    /* RSA signs straight into the caller's buffer (at least the modulus size); ECDSA into a
     * buffer of its own, then each half is padded to the order size. */
    out = g->scheme == KEYX_SIG_ECDSA ? ec : sig;
    len = g->scheme == KEYX_SIG_ECDSA ? sizeof(ec) : *siglen;
    rv = s->f->C_Sign(s->h, in, inlen, out, &len);
    if (rv == CKR_BUFFER_TOO_SMALL && len <= 65536 && (big = OPENSSL_malloc(len)) != NULL) {
        /* the operation is still active: finish it, then refuse the odd length below */
        out = big;
        rv = s->f->C_Sign(s->h, in, inlen, out, &len);
    }
    OPENSSL_cleanse(in, sizeof(in));
    p11_session_put(s, rv);
    if (rv != CKR_OK) {
        OPENSSL_free(big);
        return p11_fail(
            s, rv, g->scheme == KEYX_SIG_ECDSA ? "ECDSA signing (C_Sign)" : "RSA signing (C_Sign)");
    }
    if (big != NULL || len == 0 || len > want || (g->scheme == KEYX_SIG_ECDSA && (len % 2 != 0))) {
        OPENSSL_free(big);
        KEYX_ERR(p, KEYX_R_BACKEND_FAILURE,
                 "pkcs11: token '%s' returned a %lu-byte %s signature where %zu bytes were "
                 "expected",
                 p11_dev_token_label(s->dev, s->tok), (unsigned long)len, scheme_names[g->scheme],
                 want);
        return 0;
    }
    if (g->scheme == KEYX_SIG_ECDSA) {
        size_t half = len / 2;

        /* r || s, each left-padded to the order size */
        memset(sig, 0, want);
        memcpy(sig + g->size - half, ec, half);
        memcpy(sig + 2 * g->size - half, ec + half, half);
    } else if (len < want) {
        memmove(sig + want - len, sig, len);
        memset(sig, 0, want - len);
    }
    *siglen = want;
    return 1;
}
