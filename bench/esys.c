/* keyx-bench: the raw ESYS calls the TPM figures are compared with (see keyx-bench.c).
 *
 * One ESYS context on its own TCTI connection (tpm2-tss's swtpm TCTI opens a connection per
 * command, so keyx's context and this one take turns on swtpm's single connection). The static
 * key is a persistent ECC P-256 decrypt key found by handle (Esys_TR_FromTPMPublic + ReadPublic).
 *   derive          one Esys_ECDH_ZGen with the peer's point on the persistent key.
 *   keygen+derive   Esys_CreateLoaded in the NULL hierarchy (a primary ECDH key made from the
 *                   NULL seed, no parent needed: one transient slot) + Esys_ECDH_ZGen with the
 *                   peer's point + Esys_FlushContext.
 * With a session (raw_esys_open(..., 1)): one HMAC session salted with the persistent key (ECDH +
 * KDFe), AES-128-CFB response encryption, used as the key's authorization for every ZGen, the
 * protection keyx gives ZGen by default; CreateLoaded uses a password authorization as keyx's
 * does. Without: password authorization, the point crosses the bus in clear.
 * RSA-OAEP (oaep-decrypt): one Esys_RSA_Decrypt of a persistent RSA-2048 decrypt key (scheme
 * NULL in the key, OAEP/SHA-256 in the call, empty label), authorized by the same salted session
 * (the plaintext comes back encrypted) or by password.
 * ESYS contexts are not thread-safe: one mutex serializes this context's calls. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

#include <tss2/tss2_esys.h>
#include <tss2/tss2_mu.h>
#include <tss2/tss2_rc.h>
#include <tss2/tss2_tctildr.h>

#include "bench.h"

struct raw_esys {
    TSS2_TCTI_CONTEXT *tcti;
    ESYS_CONTEXT *ctx;
    ESYS_TR key;     /* the persistent key */
    ESYS_TR rsakey;  /* the persistent RSA key (raw_esys_rsa_key), ESYS_TR_NONE before */
    ESYS_TR signkey; /* the persistent P-256 sign key (raw_esys_sign_key), ESYS_TR_NONE before */
    ESYS_TR session; /* ESYS_TR_PASSWORD when none */
    unsigned char pub[65];
    pthread_mutex_t lock;
};

static void esys_err(const char *what, TSS2_RC rc)
{
    fprintf(stderr, "keyx-bench: raw ESYS: %s failed: %s\n", what, Tss2_RC_Decode(rc));
}

raw_esys *raw_esys_open(const char *tcti, unsigned long handle, int session)
{
    raw_esys *r = OPENSSL_zalloc(sizeof(*r));
    TPM2B_PUBLIC *pub = NULL;
    TSS2_RC rc;

    if (r == NULL)
        return NULL;
    r->session = ESYS_TR_PASSWORD;
    r->rsakey = ESYS_TR_NONE;
    r->signkey = ESYS_TR_NONE;
    pthread_mutex_init(&r->lock, NULL);
    if ((rc = Tss2_TctiLdr_Initialize(tcti, &r->tcti)) != TSS2_RC_SUCCESS) {
        fprintf(stderr, "keyx-bench: raw ESYS: cannot open TCTI '%s': %s\n", tcti,
                Tss2_RC_Decode(rc));
        goto err;
    }
    if ((rc = Esys_Initialize(&r->ctx, r->tcti, NULL)) != TSS2_RC_SUCCESS) {
        esys_err("Esys_Initialize", rc);
        goto err;
    }
    if ((rc = Esys_TR_FromTPMPublic(r->ctx, (TPM2_HANDLE)handle, ESYS_TR_NONE, ESYS_TR_NONE,
                                    ESYS_TR_NONE, &r->key)) != TSS2_RC_SUCCESS) {
        fprintf(stderr, "keyx-bench: raw ESYS: no key at persistent handle 0x%08lX: %s\n", handle,
                Tss2_RC_Decode(rc));
        goto err;
    }
    if ((rc = Esys_ReadPublic(r->ctx, r->key, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &pub, NULL,
                              NULL)) != TSS2_RC_SUCCESS) {
        esys_err("ReadPublic of the persistent key", rc);
        goto err;
    }
    if (pub->publicArea.type != TPM2_ALG_ECC ||
        pub->publicArea.parameters.eccDetail.curveID != TPM2_ECC_NIST_P256 ||
        pub->publicArea.unique.ecc.x.size > 32 || pub->publicArea.unique.ecc.y.size > 32) {
        fprintf(stderr, "keyx-bench: raw ESYS: 0x%08lX is not an ECC P-256 key\n", handle);
        Esys_Free(pub);
        goto err;
    }
    r->pub[0] = 0x04;
    memcpy(r->pub + 1 + 32 - pub->publicArea.unique.ecc.x.size, pub->publicArea.unique.ecc.x.buffer,
           pub->publicArea.unique.ecc.x.size);
    memcpy(r->pub + 33 + 32 - pub->publicArea.unique.ecc.y.size,
           pub->publicArea.unique.ecc.y.buffer, pub->publicArea.unique.ecc.y.size);
    Esys_Free(pub);
    if (session) {
        TPMT_SYM_DEF sym = {
            .algorithm = TPM2_ALG_AES, .keyBits = {.aes = 128}, .mode = {.aes = TPM2_ALG_CFB}};

        if ((rc = Esys_StartAuthSession(r->ctx, r->key, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                                        ESYS_TR_NONE, NULL, TPM2_SE_HMAC, &sym, TPM2_ALG_SHA256,
                                        &r->session)) != TSS2_RC_SUCCESS) {
            esys_err("StartAuthSession (salted with the persistent key)", rc);
            r->session = ESYS_TR_PASSWORD;
            goto err;
        }
        if ((rc = Esys_TRSess_SetAttributes(r->ctx, r->session,
                                            TPMA_SESSION_CONTINUESESSION | TPMA_SESSION_ENCRYPT,
                                            0xff)) != TSS2_RC_SUCCESS) {
            esys_err("TRSess_SetAttributes", rc);
            goto err;
        }
    }
    return r;
err:
    raw_esys_close(r);
    return NULL;
}

void raw_esys_close(raw_esys *r)
{
    if (r == NULL)
        return;
    if (r->ctx != NULL) {
        if (r->session != ESYS_TR_PASSWORD)
            Esys_FlushContext(r->ctx, r->session);
        Esys_Finalize(&r->ctx);
    }
    if (r->tcti != NULL)
        Tss2_TctiLdr_Finalize(&r->tcti);
    pthread_mutex_destroy(&r->lock);
    OPENSSL_free(r);
}

const unsigned char *raw_esys_pub(const raw_esys *r)
{
    return r->pub;
}

/* One ZGen with key (locked by the caller); the x coordinate of Z into out (32 bytes). */
static int zgen(raw_esys *r, ESYS_TR key, ESYS_TR auth, const unsigned char *peer, size_t peerlen,
                unsigned char *out)
{
    TPM2B_ECC_POINT in = {0};
    TPM2B_ECC_POINT *z = NULL;
    TSS2_RC rc;
    size_t xl;

    if (peerlen != 65 || peer[0] != 0x04) {
        fprintf(stderr, "keyx-bench: raw ESYS: the peer is not an uncompressed P-256 point\n");
        return 0;
    }
    in.point.x.size = in.point.y.size = 32;
    memcpy(in.point.x.buffer, peer + 1, 32);
    memcpy(in.point.y.buffer, peer + 33, 32);
    rc = Esys_ECDH_ZGen(r->ctx, key, auth, ESYS_TR_NONE, ESYS_TR_NONE, &in, &z);
    if (rc != TSS2_RC_SUCCESS) {
        esys_err("ECDH_ZGen", rc);
        return 0;
    }
    xl = z->point.x.size;
    if (xl > 32) {
        Esys_Free(z);
        return 0;
    }
    memset(out, 0, 32 - xl);
    memcpy(out + 32 - xl, z->point.x.buffer, xl);
    OPENSSL_cleanse(z, sizeof(*z));
    Esys_Free(z);
    return 1;
}

int raw_esys_derive(raw_esys *r, const unsigned char *peer, size_t peerlen, unsigned char *out)
{
    int ok;

    pthread_mutex_lock(&r->lock);
    ok = zgen(r, r->key, r->session, peer, peerlen, out);
    pthread_mutex_unlock(&r->lock);
    return ok;
}

int raw_esys_keygen_derive(raw_esys *r, const unsigned char *peer, size_t peerlen,
                           unsigned char *out, unsigned char *pub)
{
    TPMT_PUBLIC area = {
        .type = TPM2_ALG_ECC,
        .nameAlg = TPM2_ALG_SHA256,
        .objectAttributes = TPMA_OBJECT_DECRYPT | TPMA_OBJECT_FIXEDTPM | TPMA_OBJECT_FIXEDPARENT |
                            TPMA_OBJECT_SENSITIVEDATAORIGIN | TPMA_OBJECT_USERWITHAUTH |
                            TPMA_OBJECT_NODA,
        .parameters.eccDetail = {.symmetric = {.algorithm = TPM2_ALG_NULL},
                                 .scheme = {.scheme = TPM2_ALG_NULL},
                                 .curveID = TPM2_ECC_NIST_P256,
                                 .kdf = {.scheme = TPM2_ALG_NULL}},
    };
    TPM2B_SENSITIVE_CREATE sens = {0};
    TPM2B_TEMPLATE tmpl = {0};
    TPM2B_PUBLIC *outpub = NULL;
    TPM2B_PRIVATE *outpriv = NULL;
    ESYS_TR k = ESYS_TR_NONE;
    size_t off = 0;
    TSS2_RC rc;
    int ok = 0;

    if (Tss2_MU_TPMT_PUBLIC_Marshal(&area, tmpl.buffer, sizeof(tmpl.buffer), &off) !=
        TSS2_RC_SUCCESS)
        return 0;
    tmpl.size = (UINT16)off;
    pthread_mutex_lock(&r->lock);
    rc = Esys_CreateLoaded(r->ctx, ESYS_TR_RH_NULL, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE,
                           &sens, &tmpl, &k, &outpriv, &outpub);
    if (rc != TSS2_RC_SUCCESS) {
        esys_err("CreateLoaded (NULL hierarchy)", rc);
        goto end;
    }
    /* what the application sends its peer: the public point */
    if (outpub->publicArea.unique.ecc.x.size == 32 && outpub->publicArea.unique.ecc.y.size == 32) {
        if (pub != NULL) {
            pub[0] = 0x04;
            memcpy(pub + 1, outpub->publicArea.unique.ecc.x.buffer, 32);
            memcpy(pub + 33, outpub->publicArea.unique.ecc.y.buffer, 32);
        }
        /* the new key has an empty auth value: a password authorization, or the session */
        ok = zgen(r, k, r->session, peer, peerlen, out);
    }
end:
    if (k != ESYS_TR_NONE && (rc = Esys_FlushContext(r->ctx, k)) != TSS2_RC_SUCCESS) {
        esys_err("FlushContext", rc);
        ok = 0;
    }
    pthread_mutex_unlock(&r->lock);
    Esys_Free(outpub);
    Esys_Free(outpriv);
    return ok;
}

int raw_esys_rsa_key(raw_esys *r, unsigned long handle, unsigned char *n, size_t *nlen,
                     unsigned char *e, size_t *elen)
{
    TPM2B_PUBLIC *pub = NULL;
    UINT32 exp;
    TSS2_RC rc;
    int ok = 0;

    pthread_mutex_lock(&r->lock);
    if ((rc = Esys_TR_FromTPMPublic(r->ctx, (TPM2_HANDLE)handle, ESYS_TR_NONE, ESYS_TR_NONE,
                                    ESYS_TR_NONE, &r->rsakey)) != TSS2_RC_SUCCESS) {
        fprintf(stderr, "keyx-bench: raw ESYS: no key at persistent handle 0x%08lX: %s\n", handle,
                Tss2_RC_Decode(rc));
        r->rsakey = ESYS_TR_NONE;
        goto end;
    }
    if ((rc = Esys_ReadPublic(r->ctx, r->rsakey, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &pub,
                              NULL, NULL)) != TSS2_RC_SUCCESS) {
        esys_err("ReadPublic of the persistent RSA key", rc);
        goto end;
    }
    if (pub->publicArea.type != TPM2_ALG_RSA || pub->publicArea.unique.rsa.size > *nlen ||
        *elen < 4) {
        fprintf(stderr, "keyx-bench: raw ESYS: 0x%08lX is not an RSA key\n", handle);
        goto end;
    }
    *nlen = pub->publicArea.unique.rsa.size;
    memcpy(n, pub->publicArea.unique.rsa.buffer, *nlen);
    exp = pub->publicArea.parameters.rsaDetail.exponent;
    if (exp == 0)
        exp = 65537;
    e[0] = (unsigned char)(exp >> 24);
    e[1] = (unsigned char)(exp >> 16);
    e[2] = (unsigned char)(exp >> 8);
    e[3] = (unsigned char)exp;
    *elen = 4;
    ok = 1;
end:
    pthread_mutex_unlock(&r->lock);
    Esys_Free(pub);
    return ok;
}

int raw_esys_oaep_decrypt(raw_esys *r, const unsigned char *ct, size_t ctlen, unsigned char *out,
                          size_t *outlen)
{
    TPM2B_PUBLIC_KEY_RSA in = {0};
    TPMT_RSA_DECRYPT scheme = {.scheme = TPM2_ALG_OAEP, .details.oaep.hashAlg = TPM2_ALG_SHA256};
    TPM2B_DATA label = {0};
    TPM2B_PUBLIC_KEY_RSA *msg = NULL;
    TSS2_RC rc;
    int ok = 0;

    if (ctlen > sizeof(in.buffer) || r->rsakey == ESYS_TR_NONE)
        return 0;
    in.size = (UINT16)ctlen;
    memcpy(in.buffer, ct, ctlen);
    pthread_mutex_lock(&r->lock);
    rc = Esys_RSA_Decrypt(r->ctx, r->rsakey, r->session, ESYS_TR_NONE, ESYS_TR_NONE, &in, &scheme,
                          &label, &msg);
    pthread_mutex_unlock(&r->lock);
    if (rc != TSS2_RC_SUCCESS) {
        esys_err("RSA_Decrypt", rc);
        return 0;
    }
    if (msg->size <= *outlen) {
        memcpy(out, msg->buffer, msg->size);
        *outlen = msg->size;
        ok = 1;
    }
    OPENSSL_cleanse(msg, sizeof(*msg));
    Esys_Free(msg);
    return ok;
}

/* ---- signatures ------------------------------------------------------------------------------ */

int raw_esys_sign_key(raw_esys *r, unsigned long handle, unsigned char *pub)
{
    TPM2B_PUBLIC *p = NULL;
    TSS2_RC rc;
    int ok = 0;

    pthread_mutex_lock(&r->lock);
    if ((rc = Esys_TR_FromTPMPublic(r->ctx, (TPM2_HANDLE)handle, ESYS_TR_NONE, ESYS_TR_NONE,
                                    ESYS_TR_NONE, &r->signkey)) != TSS2_RC_SUCCESS) {
        fprintf(stderr, "keyx-bench: raw ESYS: no key at persistent handle 0x%08lX: %s\n", handle,
                Tss2_RC_Decode(rc));
        r->signkey = ESYS_TR_NONE;
        goto end;
    }
    if ((rc = Esys_ReadPublic(r->ctx, r->signkey, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &p,
                              NULL, NULL)) != TSS2_RC_SUCCESS) {
        esys_err("ReadPublic of the persistent sign key", rc);
        goto end;
    }
    if (p->publicArea.type != TPM2_ALG_ECC || p->publicArea.unique.ecc.x.size != 32 ||
        p->publicArea.unique.ecc.y.size != 32) {
        fprintf(stderr, "keyx-bench: raw ESYS: 0x%08lX is not a P-256 key\n", handle);
        goto end;
    }
    pub[0] = 0x04;
    memcpy(pub + 1, p->publicArea.unique.ecc.x.buffer, 32);
    memcpy(pub + 33, p->publicArea.unique.ecc.y.buffer, 32);
    ok = 1;
end:
    pthread_mutex_unlock(&r->lock);
    Esys_Free(p);
    return ok;
}

int raw_esys_sign(raw_esys *r, const unsigned char *dgst, unsigned char *sig)
{
    TPM2B_DIGEST d = {.size = 32};
    TPMT_SIG_SCHEME scheme = {.scheme = TPM2_ALG_ECDSA, .details.ecdsa.hashAlg = TPM2_ALG_SHA256};
    TPMT_TK_HASHCHECK ticket = {.tag = TPM2_ST_HASHCHECK, .hierarchy = TPM2_RH_NULL};
    TPMT_SIGNATURE *s = NULL;
    TSS2_RC rc;
    int ok = 0;

    if (r->signkey == ESYS_TR_NONE)
        return 0;
    memcpy(d.buffer, dgst, 32);
    pthread_mutex_lock(&r->lock);
    /* A signature has no secret to hide and no TPM2B first response parameter: the session
     * authorizes (HMAC) without response encryption, as keyx does for Sign. */
    if (r->session != ESYS_TR_PASSWORD)
        Esys_TRSess_SetAttributes(r->ctx, r->session, 0, TPMA_SESSION_ENCRYPT);
    rc = Esys_Sign(r->ctx, r->signkey, r->session, ESYS_TR_NONE, ESYS_TR_NONE, &d, &scheme, &ticket,
                   &s);
    if (r->session != ESYS_TR_PASSWORD)
        Esys_TRSess_SetAttributes(r->ctx, r->session, TPMA_SESSION_ENCRYPT, TPMA_SESSION_ENCRYPT);
    pthread_mutex_unlock(&r->lock);
    if (rc != TSS2_RC_SUCCESS) {
        esys_err("Sign", rc);
        return 0;
    }
    if (s->sigAlg == TPM2_ALG_ECDSA && s->signature.ecdsa.signatureR.size <= 32 &&
        s->signature.ecdsa.signatureS.size <= 32) {
        const TPM2B_ECC_PARAMETER *rr = &s->signature.ecdsa.signatureR,
                                  *ss = &s->signature.ecdsa.signatureS;

        memset(sig, 0, 64);
        memcpy(sig + 32 - rr->size, rr->buffer, rr->size);
        memcpy(sig + 64 - ss->size, ss->buffer, ss->size);
        ok = 1;
    }
    Esys_Free(s);
    return ok;
}
