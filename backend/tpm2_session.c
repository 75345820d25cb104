/* keyx's salted HMAC session for ECDH_ZGen (see tpm2_session.h). */
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/rand.h>
#include <tss2/tss2_mu.h>
#include <tss2/tss2_sys.h>

#include "backend/tpm2_pubkey.h"
#include "backend/tpm2_session.h"

#define DIGEST 32 /* SHA-256 */
#define ATTRS (TPMA_SESSION_CONTINUESESSION | TPMA_SESSION_ENCRYPT)

int tpm_fsess_init(tpm_fsess *s, OSSL_LIB_CTX *libctx)
{
    memset(s, 0, sizeof(*s));
    s->libctx = libctx;
    s->sha256 = EVP_MD_fetch(libctx, "SHA256", NULL);
    s->hmac = EVP_MAC_fetch(libctx, "HMAC", NULL);
    s->aes = EVP_CIPHER_fetch(libctx, "AES-128-CFB", NULL);
    return s->sha256 != NULL && s->hmac != NULL && s->aes != NULL;
}

void tpm_fsess_cleanup(tpm_fsess *s)
{
    EVP_MAC_CTX_free(s->keyed);
    EVP_MD_free(s->sha256);
    EVP_MAC_free(s->hmac);
    EVP_CIPHER_free(s->aes);
    OPENSSL_cleanse(s, sizeof(*s));
}

void tpm_fsess_forget(tpm_fsess *s)
{
    s->handle = 0;
    OPENSSL_cleanse(s->key, sizeof(s->key));
    EVP_MAC_CTX_free(s->keyed); /* its provider context is wiped as it is freed */
    s->keyed = NULL;
}

void tpm_fsess_flush(tpm_fsess *s, ESYS_CONTEXT *ectx)
{
    TSS2_SYS_CONTEXT *sys = NULL;

    if (s->handle != 0 && Esys_GetSysContext(ectx, &sys) == TSS2_RC_SUCCESS && sys != NULL)
        Tss2_Sys_FlushContext(sys, s->handle);
    tpm_fsess_forget(s);
}

/* A new HMAC-SHA256 context keyed with key. */
static EVP_MAC_CTX *hmac_keyed(tpm_fsess *s, const unsigned char *key, size_t keylen)
{
    EVP_MAC_CTX *m = EVP_MAC_CTX_new(s->hmac);
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, "SHA256", 0),
        OSSL_PARAM_END,
    };

    if (m != NULL && EVP_MAC_init(m, key, keylen, params) != 1) {
        EVP_MAC_CTX_free(m);
        m = NULL;
    }
    return m;
}

/* HMAC-SHA256 over up to 6 pieces; key == s->key takes the session's keyed context. */
static int hmac(tpm_fsess *s, const unsigned char *key, size_t keylen, const void *const *parts,
                const size_t *lens, size_t n, unsigned char out[DIGEST])
{
    EVP_MAC_CTX *m =
        key == s->key && s->keyed != NULL ? EVP_MAC_CTX_dup(s->keyed) : hmac_keyed(s, key, keylen);
    size_t outl = 0;
    int ok = m != NULL;

    for (size_t i = 0; ok && i < n; i++)
        ok = lens[i] == 0 || EVP_MAC_update(m, parts[i], lens[i]) == 1;
    ok = ok && EVP_MAC_final(m, out, &outl, DIGEST) == 1 && outl == DIGEST;
    EVP_MAC_CTX_free(m);
    return ok;
}

static int sha256(tpm_fsess *s, const void *const *parts, const size_t *lens, size_t n,
                  unsigned char out[DIGEST])
{
    EVP_MD_CTX *c = EVP_MD_CTX_new();
    int ok = c != NULL && EVP_DigestInit_ex(c, s->sha256, NULL) == 1;

    for (size_t i = 0; ok && i < n; i++)
        ok = lens[i] == 0 || EVP_DigestUpdate(c, parts[i], lens[i]) == 1;
    ok = ok && EVP_DigestFinal_ex(c, out, NULL) == 1;
    EVP_MD_CTX_free(c);
    return ok;
}

static void be32(unsigned char b[4], uint32_t v)
{
    b[0] = (unsigned char)(v >> 24);
    b[1] = (unsigned char)(v >> 16);
    b[2] = (unsigned char)(v >> 8);
    b[3] = (unsigned char)v;
}

/* KDFa (Part 1, 11.4.10.2) with SHA-256 for 256 bits: one HMAC block. label includes its
 * terminating zero. */
static int kdfa(tpm_fsess *s, const unsigned char *key, size_t keylen, const char *label,
                const TPM2B_NONCE *u, const TPM2B_NONCE *v, unsigned char out[DIGEST])
{
    unsigned char counter[4], bits[4];
    const void *parts[] = {counter, label, u->buffer, v->buffer, bits};
    size_t lens[] = {4, strlen(label) + 1, u->size, v->size, 4};

    be32(counter, 1);
    be32(bits, 8 * DIGEST);
    return hmac(s, key, keylen, parts, lens, 5, out);
}

/* KDFe (Part 1, 11.4.10.3) with SHA-256 for 256 bits: the salt of an ECC-salted session. */
static int kdfe(tpm_fsess *s, const unsigned char *z, size_t zlen, const TPM2B_ECC_PARAMETER *u,
                const TPM2B_ECC_PARAMETER *v, unsigned char out[DIGEST])
{
    unsigned char counter[4];
    static const char use[] = "SECRET";
    const void *parts[] = {counter, z, use, u->buffer, v->buffer};
    size_t lens[] = {4, zlen, sizeof(use), u->size, v->size};

    be32(counter, 1);
    return sha256(s, parts, lens, 5, out);
}

int tpm_fsess_start(tpm_fsess *s, ESYS_CONTEXT *ectx, ESYS_TR parent, TSS2_RC *rc)
{
    const tpm_curve *c = tpm_curve_by_id(TPM2_ECC_NIST_P256);
    TPM2B_PUBLIC *ppub = NULL;
    TSS2_SYS_CONTEXT *sys = NULL;
    TPM2_HANDLE phandle = 0;
    EVP_PKEY *eph = NULL, *tpmkey = NULL;
    EVP_PKEY_CTX *kctx = NULL;
    TPMS_ECC_POINT ephpt;
    TPM2B_ENCRYPTED_SECRET salt_in = {0};
    TPM2B_NONCE caller = {.size = DIGEST};
    TPMT_SYM_DEF sym = {.algorithm = TPM2_ALG_AES, .keyBits.aes = 128, .mode.aes = TPM2_ALG_CFB};
    unsigned char z[66], salt[DIGEST];
    size_t zlen = sizeof(z), off = 0;
    int ok = 0;

    *rc = TSS2_RC_SUCCESS;
    tpm_fsess_forget(s);
    if ((*rc = Esys_ReadPublic(ectx, parent, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &ppub, NULL,
                               NULL)) != TSS2_RC_SUCCESS ||
        (*rc = Esys_TR_GetTpmHandle(ectx, parent, &phandle)) != TSS2_RC_SUCCESS ||
        (*rc = Esys_GetSysContext(ectx, &sys)) != TSS2_RC_SUCCESS)
        goto end;
    /* Anything but an ECC P-256 SHA-256 storage key: ESYS salts the session instead. */
    if (ppub->publicArea.type != TPM2_ALG_ECC || ppub->publicArea.nameAlg != TPM2_ALG_SHA256 ||
        ppub->publicArea.parameters.eccDetail.curveID != TPM2_ECC_NIST_P256)
        goto end;
    /* Salt: ECDH of a fresh key with the parent's public key, through KDFe. */
    if ((tpmkey = tpm_ec_public(s->libctx, c, &ppub->publicArea.unique.ecc)) == NULL ||
        (eph = EVP_PKEY_Q_keygen(s->libctx, NULL, "EC", "P-256")) == NULL ||
        !tpm_ec_point(eph, c, &ephpt) ||
        (kctx = EVP_PKEY_CTX_new_from_pkey(s->libctx, eph, NULL)) == NULL ||
        EVP_PKEY_derive_init(kctx) != 1 || EVP_PKEY_derive_set_peer(kctx, tpmkey) != 1 ||
        EVP_PKEY_derive(kctx, z, &zlen) != 1 || zlen != c->field ||
        !kdfe(s, z, zlen, &ephpt.x, &ppub->publicArea.unique.ecc.x, salt) ||
        Tss2_MU_TPMS_ECC_POINT_Marshal(&ephpt, salt_in.secret, sizeof(salt_in.secret), &off) !=
            TSS2_RC_SUCCESS ||
        RAND_bytes_ex(s->libctx, caller.buffer, DIGEST, 0) != 1)
        goto end;
    salt_in.size = (UINT16)off;
    s->nonce_tpm.size = sizeof(s->nonce_tpm.buffer);
    *rc =
        Tss2_Sys_StartAuthSession(sys, phandle, TPM2_RH_NULL, NULL, &caller, &salt_in, TPM2_SE_HMAC,
                                  &sym, TPM2_ALG_SHA256, &s->handle, &s->nonce_tpm, NULL);
    if (*rc != TSS2_RC_SUCCESS) {
        s->handle = 0;
        goto end;
    }
    /* sessionKey = KDFa(SHA-256, bind auth (none) || salt, "ATH", nonceTPM, nonceCaller) */
    ok = kdfa(s, salt, DIGEST, "ATH", &s->nonce_tpm, &caller, s->key) &&
         (s->keyed = hmac_keyed(s, s->key, DIGEST)) != NULL;
    if (!ok) {
        Tss2_Sys_FlushContext(sys, s->handle);
        tpm_fsess_forget(s);
    }
end:
    OPENSSL_cleanse(z, sizeof(z));
    OPENSSL_cleanse(salt, sizeof(salt));
    EVP_PKEY_CTX_free(kctx);
    EVP_PKEY_free(eph);
    EVP_PKEY_free(tpmkey);
    Esys_Free(ppub);
    return ok;
}

/* The command already prepared in the SAPI context (Tss2_Sys_<command>_Prepare) runs with
 * key (TPM handle, name) authorized by the session (session attributes attrs); with
 * TPMA_SESSION_ENCRYPT its first response parameter comes back encrypted and, on success, is
 * decrypted in place for Tss2_Sys_<command>_Complete. */
static TSS2_RC run_prepared(tpm_fsess *s, TSS2_SYS_CONTEXT *sys, const TPM2B_NAME *name,
                            TPM2_CC code, unsigned char attrs)
{
    TSS2L_SYS_AUTH_COMMAND cmd = {.count = 1};
    TSS2L_SYS_AUTH_RESPONSE rsp = {0};
    TPM2B_NONCE caller = {.size = DIGEST};
    unsigned char cc[4], zero[4] = {0}, cphash[DIGEST], rphash[DIGEST], mac[DIGEST];
    unsigned char cfb[DIGEST];
    const uint8_t *cp = NULL, *rp = NULL, *enc = NULL;
    size_t cplen = 0, rplen = 0, enclen = 0;
    EVP_CIPHER_CTX *cctx = NULL;
    int outl = 0;
    TSS2_RC rc;

    be32(cc, code);
    if ((rc = Tss2_Sys_GetCpBuffer(sys, &cplen, &cp)) != TSS2_RC_SUCCESS)
        return rc;
    rc = TSS2_ESYS_RC_GENERAL_FAILURE;
    if (RAND_bytes_ex(s->libctx, caller.buffer, DIGEST, 0) != 1)
        goto end;
    {
        /* cpHash = H(commandCode || Name(keyHandle) || parameters);
         * HMAC(sessionKey || authValue (empty), cpHash || nonceCaller || nonceTPM || attrs) */
        const void *hp[] = {cc, name->name, cp};
        size_t hl[] = {4, name->size, cplen};
        const void *mp[] = {cphash, caller.buffer, s->nonce_tpm.buffer, &attrs};
        size_t ml[] = {DIGEST, caller.size, s->nonce_tpm.size, 1};

        if (!sha256(s, hp, hl, 3, cphash) || !hmac(s, s->key, DIGEST, mp, ml, 4, mac))
            goto end;
    }
    cmd.auths[0].sessionHandle = s->handle;
    cmd.auths[0].nonce = caller;
    cmd.auths[0].sessionAttributes = attrs;
    cmd.auths[0].hmac.size = DIGEST;
    memcpy(cmd.auths[0].hmac.buffer, mac, DIGEST);
    if ((rc = Tss2_Sys_SetCmdAuths(sys, &cmd)) != TSS2_RC_SUCCESS ||
        (rc = Tss2_Sys_Execute(sys)) != TSS2_RC_SUCCESS)
        goto end;
    if ((rc = Tss2_Sys_GetRspAuths(sys, &rsp)) != TSS2_RC_SUCCESS ||
        (rc = Tss2_Sys_GetRpBuffer(sys, &rplen, &rp)) != TSS2_RC_SUCCESS ||
        ((attrs & TPMA_SESSION_ENCRYPT) &&
         (rc = Tss2_Sys_GetEncryptParam(sys, &enclen, &enc)) != TSS2_RC_SUCCESS))
        goto end;
    rc = TSS2_ESYS_RC_RSP_AUTH_FAILED;
    if (rsp.count != 1 || rsp.auths[0].hmac.size != DIGEST)
        goto end;
    {
        /* rpHash = H(responseCode (0) || commandCode || parameters);
         * HMAC(key, rpHash || nonceTPM' || nonceCaller || attrs) */
        const void *hp[] = {zero, cc, rp};
        size_t hl[] = {4, 4, rplen};
        const void *mp[] = {rphash, rsp.auths[0].nonce.buffer, caller.buffer,
                            &rsp.auths[0].sessionAttributes};
        size_t ml[] = {DIGEST, rsp.auths[0].nonce.size, caller.size, 1};

        if (!sha256(s, hp, hl, 3, rphash) || !hmac(s, s->key, DIGEST, mp, ml, 4, mac) ||
            CRYPTO_memcmp(mac, rsp.auths[0].hmac.buffer, DIGEST) != 0)
            goto end;
    }
    s->nonce_tpm = rsp.auths[0].nonce;
    if (!(attrs & TPMA_SESSION_ENCRYPT)) {
        rc = TSS2_RC_SUCCESS;
        goto end;
    }
    /* The parameter's contents: AES-128-CFB, key || IV = KDFa(key, "CFB", nonceTPM',
     * nonceCaller) */
    rc = TSS2_ESYS_RC_GENERAL_FAILURE;
    if (!kdfa(s, s->key, DIGEST, "CFB", &s->nonce_tpm, &caller, cfb) ||
        (cctx = EVP_CIPHER_CTX_new()) == NULL ||
        EVP_DecryptInit_ex2(cctx, s->aes, cfb, cfb + 16, NULL) != 1 ||
        (enclen > 0 &&
         EVP_DecryptUpdate(cctx, (unsigned char *)enc, &outl, enc, (int)enclen) != 1) ||
        (size_t)outl != enclen)
        goto end;
    rc = TSS2_RC_SUCCESS;
end:
    OPENSSL_cleanse(cfb, sizeof(cfb));
    EVP_CIPHER_CTX_free(cctx);
    return rc;
}

int tpm_fsess_name(tpm_fsess *s, const TPMT_PUBLIC *pub, TPM2B_NAME *name)
{
    unsigned char buf[sizeof(TPMT_PUBLIC)];
    size_t off = 0;
    const void *parts[] = {buf};
    size_t lens[1];

    name->size = 0;
    if (pub->nameAlg != TPM2_ALG_SHA256 || s->sha256 == NULL ||
        Tss2_MU_TPMT_PUBLIC_Marshal(pub, buf, sizeof(buf), &off) != TSS2_RC_SUCCESS)
        return 0;
    lens[0] = off;
    name->name[0] = (BYTE)(TPM2_ALG_SHA256 >> 8);
    name->name[1] = (BYTE)TPM2_ALG_SHA256;
    if (!sha256(s, parts, lens, 1, name->name + 2))
        return 0;
    name->size = 2 + DIGEST;
    return 1;
}

TSS2_RC tpm_fsess_zgen(tpm_fsess *s, ESYS_CONTEXT *ectx, ESYS_TR key, const TPM2B_NAME *name,
                       const TPM2B_ECC_POINT *in, TPM2B_ECC_POINT *out)
{
    TSS2_SYS_CONTEXT *sys = NULL;
    TPM2_HANDLE handle = 0;
    TSS2_RC rc;

    if ((rc = Esys_GetSysContext(ectx, &sys)) == TSS2_RC_SUCCESS &&
        (rc = Esys_TR_GetTpmHandle(ectx, key, &handle)) == TSS2_RC_SUCCESS &&
        (rc = Tss2_Sys_ECDH_ZGen_Prepare(sys, handle, in)) == TSS2_RC_SUCCESS &&
        (rc = run_prepared(s, sys, name, TPM2_CC_ECDH_ZGen, ATTRS)) == TSS2_RC_SUCCESS)
        rc = Tss2_Sys_ECDH_ZGen_Complete(sys, out);
    return rc;
}

TSS2_RC tpm_fsess_rsa_decrypt(tpm_fsess *s, ESYS_CONTEXT *ectx, ESYS_TR key, const TPM2B_NAME *name,
                              const TPM2B_PUBLIC_KEY_RSA *in, const TPMT_RSA_DECRYPT *scheme,
                              const TPM2B_DATA *label, TPM2B_PUBLIC_KEY_RSA *out)
{
    TSS2_SYS_CONTEXT *sys = NULL;
    TPM2_HANDLE handle = 0;
    TSS2_RC rc;

    if ((rc = Esys_GetSysContext(ectx, &sys)) == TSS2_RC_SUCCESS &&
        (rc = Esys_TR_GetTpmHandle(ectx, key, &handle)) == TSS2_RC_SUCCESS &&
        (rc = Tss2_Sys_RSA_Decrypt_Prepare(sys, handle, in, scheme, label)) == TSS2_RC_SUCCESS &&
        (rc = run_prepared(s, sys, name, TPM2_CC_RSA_Decrypt, ATTRS)) == TSS2_RC_SUCCESS)
        rc = Tss2_Sys_RSA_Decrypt_Complete(sys, out);
    return rc;
}

TSS2_RC tpm_fsess_create_primary(tpm_fsess *s, ESYS_CONTEXT *ectx, TPM2_HANDLE hierarchy,
                                 const TPM2B_PUBLIC *inpub, TPM2_HANDLE *handle,
                                 TPM2B_PUBLIC *outpub, TPM2B_NAME *name)
{
    TSS2_SYS_CONTEXT *sys = NULL;
    TPM2B_SENSITIVE_CREATE sens = {0};
    TPM2B_DATA outside = {0};
    TPML_PCR_SELECTION pcrs = {0};
    TPM2B_CREATION_DATA cdata = {0};
    TPM2B_DIGEST chash = {0};
    TPMT_TK_CREATION ticket = {0};
    /* A permanent handle's name is the handle itself. */
    TPM2B_NAME hname = {.size = 4};
    TSS2_RC rc;

    be32(hname.name, hierarchy);
    if ((rc = Esys_GetSysContext(ectx, &sys)) == TSS2_RC_SUCCESS &&
        (rc = Tss2_Sys_CreatePrimary_Prepare(sys, hierarchy, &sens, inpub, &outside, &pcrs)) ==
            TSS2_RC_SUCCESS &&
        (rc = run_prepared(s, sys, &hname, TPM2_CC_CreatePrimary, ATTRS)) == TSS2_RC_SUCCESS)
        rc = Tss2_Sys_CreatePrimary_Complete(sys, handle, outpub, &cdata, &chash, &ticket, name);
    return rc;
}

TSS2_RC tpm_fsess_sign(tpm_fsess *s, ESYS_CONTEXT *ectx, ESYS_TR key, const TPM2B_NAME *name,
                       const TPM2B_DIGEST *digest, const TPMT_SIG_SCHEME *scheme,
                       TPMT_SIGNATURE *out)
{
    TSS2_SYS_CONTEXT *sys = NULL;
    TPM2_HANDLE handle = 0;
    /* An unrestricted key signs any digest: the NULL ticket (TPM 2.0 Part 3, TPM2_Sign). */
    TPMT_TK_HASHCHECK ticket = {.tag = TPM2_ST_HASHCHECK, .hierarchy = TPM2_RH_NULL};
    TSS2_RC rc;

    /* The signature is no secret (and no sized buffer to encrypt): the session authorizes the
     * key and binds the digest to the command (cpHash), nothing more. */
    if ((rc = Esys_GetSysContext(ectx, &sys)) == TSS2_RC_SUCCESS &&
        (rc = Esys_TR_GetTpmHandle(ectx, key, &handle)) == TSS2_RC_SUCCESS &&
        (rc = Tss2_Sys_Sign_Prepare(sys, handle, digest, scheme, &ticket)) == TSS2_RC_SUCCESS &&
        (rc = run_prepared(s, sys, name, TPM2_CC_Sign, TPMA_SESSION_CONTINUESESSION)) ==
            TSS2_RC_SUCCESS)
        rc = Tss2_Sys_Sign_Complete(sys, out);
    return rc;
}
