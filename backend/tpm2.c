/* The tpm backend: ECDH key pairs and shared secrets inside a TPM 2.0.
 * Ephemeral keys are transient objects made under the cached storage parent (CreateLoaded) and
 * flushed when freed; a derive is exactly one TPM2_ECDH_ZGen, its result travelling in an
 * encrypted session. Static keys are persistent handles (keyx:tpm:handle=0x81000002), used by
 * reference. Imported keys (tests) are loaded with TPM2_LoadExternal in the NULL hierarchy.
 * backend/tpm2_device.c owns the connection, parent, session and slots. */
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <tss2/tss2_mu.h>
#include <tss2/tss2_rc.h>

#include "backend/backend.h"
#include "backend/tpm2_device.h"
#include "backend/tpm2_pubkey.h"
#include "provider/errors.h"
#include "provider/provctx.h"

typedef struct tpm_key {
    tpm_obj obj;
    const tpm_curve *curve;
} tpm_key;

/* ---- open / close / supports ------------------------------------------------------------ */

static int tpm2_open(keyx_provctx *p, void **state)
{
    return tpm_dev_new(p, (tpm_dev **)state);
}

static void tpm2_close(void *state)
{
    tpm_dev_free(state);
}

static int tpm2_supports(void *state, const keyx_keyspec *spec)
{
    const tpm_curve *c;

    /* X25519, X448 and finite-field DH do not exist in TPM 2.0; RSA is not served yet. */
    if (spec->alg != KEYX_ALG_EC || (c = tpm_curve_by_group(spec->group)) == NULL)
        return 0;
    return tpm_dev_has_curve(state, c->id);
}

static tpm_key *key_new(tpm_dev *d, const tpm_curve *c)
{
    tpm_key *k = OPENSSL_zalloc(sizeof(*k));

    if (k == NULL) {
        KEYX_ERR(tpm_dev_prov(d), KEYX_R_INTERNAL, "out of memory");
        return NULL;
    }
    k->obj.tr = ESYS_TR_NONE;
    k->curve = c;
    return k;
}

/* ---- generate ---------------------------------------------------------------------------- */

static int generate_once(void *state, const keyx_keyspec *spec, void **handle, EVP_PKEY **pub)
{
    tpm_dev *d = state;
    keyx_provctx *p = tpm_dev_prov(d);
    const tpm_curve *c = tpm_curve_by_group(spec->group);
    TPM2B_SENSITIVE_CREATE sens = {0};
    TPM2B_TEMPLATE tmpl = {0};
    TPMT_PUBLIC area;
    TPM2B_PUBLIC *outpub = NULL;
    TPM2B_PRIVATE *outpriv = NULL;
    ESYS_CONTEXT *ctx;
    ESYS_TR tr = ESYS_TR_NONE;
    size_t off = 0;
    tpm_key *k;
    TSS2_RC rc;
    int r;

    *handle = NULL;
    *pub = NULL;
    if (spec->alg != KEYX_ALG_EC || c == NULL) {
        KEYX_ERR(p, KEYX_R_UNSUPPORTED,
                 "tpm: only EC P-256, P-384 and P-521 keys are made in the TPM");
        return 0;
    }
    tpm_ecdh_template(c, 1, &area);
    if (Tss2_MU_TPMT_PUBLIC_Marshal(&area, tmpl.buffer, sizeof(tmpl.buffer), &off) !=
        TSS2_RC_SUCCESS) {
        KEYX_ERR(p, KEYX_R_INTERNAL, "tpm: cannot encode the key template");
        return 0;
    }
    tmpl.size = (UINT16)off;
    if ((k = key_new(d, c)) == NULL)
        return 0;
    if ((r = tpm_begin(d, &ctx)) != 1) {
        OPENSSL_free(k);
        return r;
    }
    TPM_CALL(d, NULL, rc,
             Esys_CreateLoaded(ctx, tpm_parent(d), ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE,
                               &sens, &tmpl, &tr, &outpriv, &outpub));
    if (rc != TSS2_RC_SUCCESS) {
        r = tpm_fail(d, rc, "EC key generation (CreateLoaded)");
        tpm_end(d);
        OPENSSL_free(k);
        return r;
    }
    Esys_Free(outpriv);
    tpm_obj_loaded(d, &k->obj, tr);
    *pub = tpm_ec_public(p->libctx, c, &outpub->publicArea.unique.ecc);
    Esys_Free(outpub);
    if (*pub == NULL) {
        tpm_obj_drop(d, &k->obj);
        tpm_end(d);
        OPENSSL_free(k);
        KEYX_ERR(p, KEYX_R_BACKEND_FAILURE, "tpm: the TPM returned an unusable %s public key",
                 c->group);
        return 0;
    }
    tpm_end(d);
    *handle = k;
    return 1;
}

/* A TPM restarted since the last command answers the first one with "no such handle" (see
 * tpm_dev_take_reset): a new key can be made at once on a new connection. */
static int tpm2_generate(void *state, const keyx_keyspec *spec, void **handle, EVP_PKEY **pub)
{
    int r;

    ERR_set_mark();
    r = generate_once(state, spec, handle, pub);
    if (r == KEYX_BACKEND_DOWN && tpm_dev_take_reset(state)) {
        ERR_pop_to_mark();
        return generate_once(state, spec, handle, pub);
    }
    ERR_clear_last_mark();
    return r;
}

/* ---- import: TPM2_LoadExternal in the NULL hierarchy (tests, keys moved into the TPM) ----- */

static int import_once(void *state, EVP_PKEY *key, void **handle, EVP_PKEY **pub)
{
    tpm_dev *d = state;
    keyx_provctx *p = tpm_dev_prov(d);
    const tpm_curve *c = tpm_curve_of(key);
    TPM2B_SENSITIVE sens = {0};
    TPM2B_PUBLIC inpub = {0};
    BIGNUM *priv = NULL;
    ESYS_CONTEXT *ctx;
    ESYS_TR tr = ESYS_TR_NONE, sess;
    tpm_key *k;
    TSS2_RC rc;
    int r;

    *handle = NULL;
    *pub = NULL;
    if (c == NULL) {
        KEYX_ERR(p, KEYX_R_UNSUPPORTED,
                 "tpm: only EC P-256, P-384 and P-521 private keys can be moved into the TPM");
        return 0;
    }
    tpm_ecdh_template(c, 0, &inpub.publicArea);
    sens.sensitiveArea.sensitiveType = TPM2_ALG_ECC;
    r = EVP_PKEY_get_bn_param(key, "priv", &priv) == 1 &&
        BN_bn2binpad(priv, sens.sensitiveArea.sensitive.ecc.buffer, (int)c->field) ==
            (int)c->field &&
        tpm_ec_point(key, c, &inpub.publicArea.unique.ecc);
    BN_clear_free(priv);
    if (!r) {
        OPENSSL_cleanse(&sens, sizeof(sens));
        KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT, "tpm: unusable %s private key", c->group);
        return 0;
    }
    sens.sensitiveArea.sensitive.ecc.size = (UINT16)c->field;
    if ((*pub = tpm_ec_public(p->libctx, c, &inpub.publicArea.unique.ecc)) == NULL ||
        (k = key_new(d, c)) == NULL) {
        OPENSSL_cleanse(&sens, sizeof(sens));
        EVP_PKEY_free(*pub);
        *pub = NULL;
        return 0;
    }
    if ((r = tpm_begin(d, &ctx)) != 1) {
        OPENSSL_cleanse(&sens, sizeof(sens));
        goto fail;
    }
    /* The private scalar crosses the bus encrypted (command parameter encryption). */
    if ((r = tpm_session(d, TPMA_SESSION_DECRYPT, 0, &sess)) != 1) {
        OPENSSL_cleanse(&sens, sizeof(sens));
        tpm_end(d);
        goto fail;
    }
    TPM_CALL(d, NULL, rc,
             Esys_LoadExternal(ctx, sess, ESYS_TR_NONE, ESYS_TR_NONE, &sens, &inpub,
                               ESYS_TR_RH_NULL, &tr));
    OPENSSL_cleanse(&sens, sizeof(sens));
    if (rc != TSS2_RC_SUCCESS) {
        r = tpm_fail(d, rc, "loading the private key (LoadExternal)");
        tpm_end(d);
        goto fail;
    }
    tpm_obj_loaded(d, &k->obj, tr);
    tpm_end(d);
    *handle = k;
    return 1;

fail:
    OPENSSL_free(k);
    EVP_PKEY_free(*pub);
    *pub = NULL;
    return r;
}

static int tpm2_import(void *state, EVP_PKEY *key, void **handle, EVP_PKEY **pub)
{
    int r;

    ERR_set_mark();
    r = import_once(state, key, handle, pub);
    if (r == KEYX_BACKEND_DOWN && tpm_dev_take_reset(state)) {
        ERR_pop_to_mark();
        return import_once(state, key, handle, pub);
    }
    ERR_clear_last_mark();
    return r;
}

/* ---- derive ------------------------------------------------------------------------------ */

static int derive_once(void *state, void *handle, EVP_PKEY *peer, unsigned char *secret,
                       size_t secretlen)
{
    tpm_dev *d = state;
    tpm_key *k = handle;
    keyx_provctx *p = tpm_dev_prov(d);
    TPM2B_ECC_POINT in = {0};
    TPM2B_ECC_POINT out = {0};
    ESYS_CONTEXT *ctx;
    ESYS_TR tr;
    TSS2_RC rc;
    int r;

    if (secretlen != k->curve->field || !tpm_ec_point(peer, k->curve, &in.point)) {
        KEYX_ERR(p, KEYX_R_INVALID_PEER_KEY, "tpm: the peer key is not a %s public point",
                 k->curve->group);
        return 0;
    }
    if ((r = tpm_begin(d, &ctx)) != 1)
        return r;
    if ((r = tpm_obj_ready(d, &k->obj, &tr)) != 1) {
        tpm_end(d);
        return r;
    }
    /* One TPM command: the key's authorization and the encryption of the returned point share
     * the salted session. */
    TPM_CALL(d, &k->obj, rc, tpm_ecdh_zgen(d, tr, &in, &out));
    if (rc != TSS2_RC_SUCCESS) {
        if (tpm_rc_is(rc, TPM2_RC_ECC_POINT) || tpm_rc_is(rc, TPM2_RC_NO_RESULT)) {
            KEYX_ERR(p, KEYX_R_INVALID_PEER_KEY,
                     "tpm: the TPM rejected the peer point (%s): not a valid %s public key",
                     Tss2_RC_Decode(rc), k->curve->group);
            r = 0;
        } else {
            r = tpm_fail(d, rc, "ECDH (ECDH_ZGen)");
        }
        tpm_end(d);
        return r;
    }
    tpm_end(d);
    r = out.point.x.size != 0 && out.point.x.size <= secretlen;
    if (r) {
        size_t pad = secretlen - out.point.x.size;

        memset(secret, 0, pad);
        memcpy(secret + pad, out.point.x.buffer, out.point.x.size);
    }
    OPENSSL_cleanse(&out, sizeof(out));
    if (!r)
        KEYX_ERR(p, KEYX_R_BACKEND_FAILURE, "tpm: ECDH_ZGen returned a malformed point");
    return r;
}

static int tpm2_derive(void *state, void *handle, EVP_PKEY *peer, unsigned char *secret,
                       size_t secretlen)
{
    tpm_key *k = handle;
    int r;

    ERR_set_mark();
    r = derive_once(state, handle, peer, secret, secretlen);
    /* A persistent key survives a TPM restart: found again at its handle on a new connection. */
    if (r == KEYX_BACKEND_DOWN && k->obj.persistent != 0 && tpm_dev_take_reset(state)) {
        ERR_pop_to_mark();
        return derive_once(state, handle, peer, secret, secretlen);
    }
    ERR_clear_last_mark();
    return r;
}

/* ---- static keys: persistent handles ---------------------------------------------------- */

static int parse_locator(keyx_provctx *p, const char *locator, TPM2_HANDLE *h)
{
    const char *v = strncmp(locator, "handle=", 7) == 0 ? locator + 7 : NULL;
    char *end = NULL;
    unsigned long n = v != NULL ? strtoul(v, &end, 16) : 0;

    if (v == NULL || end == v || *end != '\0' || strncmp(v, "0x", 2) != 0 ||
        (n >> 24) != TPM2_HT_PERSISTENT) {
        KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT,
                 "tpm: '%.80s' is not a TPM key locator: expected handle=0x81xxxxxx (a persistent "
                 "handle, e.g. keyx:tpm:handle=0x81000002)",
                 locator);
        return 0;
    }
    *h = (TPM2_HANDLE)n;
    return 1;
}

static int tpm2_load(void *state, const char *locator, void **handle, EVP_PKEY **pub)
{
    tpm_dev *d = state;
    keyx_provctx *p = tpm_dev_prov(d);
    TPM2B_PUBLIC *outpub = NULL;
    const tpm_curve *c = NULL;
    ESYS_CONTEXT *ctx;
    ESYS_TR tr = ESYS_TR_NONE;
    TPM2_HANDLE h;
    TPMA_OBJECT attrs;
    tpm_key *k;
    TSS2_RC rc;
    int r;

    *handle = NULL;
    *pub = NULL;
    if (!parse_locator(p, locator, &h))
        return 0;
    if ((r = tpm_begin(d, &ctx)) != 1)
        return r;
    TPM_CALL(d, NULL, rc,
             Esys_TR_FromTPMPublic(ctx, h, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &tr));
    if (rc != TSS2_RC_SUCCESS) {
        if (tpm_rc_is(rc, TPM2_RC_HANDLE) || (rc & 0xFFF) == TPM2_RC_HANDLE ||
            (rc & TSS2_RC_LAYER_MASK) == 0) {
            KEYX_ERR(p, KEYX_R_MISSING_KEY,
                     "tpm: no persistent key at handle 0x%08X (%s): list them with "
                     "tpm2_getcap handles-persistent",
                     (unsigned)h, Tss2_RC_Decode(rc));
            r = 0;
        } else {
            r = tpm_fail(d, rc, "opening the persistent key");
        }
        tpm_end(d);
        return r;
    }
    TPM_CALL(
        d, NULL, rc,
        Esys_ReadPublic(ctx, tr, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &outpub, NULL, NULL));
    if (rc != TSS2_RC_SUCCESS) {
        r = tpm_fail(d, rc, "reading the persistent key (ReadPublic)");
        if (r != KEYX_BACKEND_DOWN)
            Esys_TR_Close(ctx, &tr);
        tpm_end(d);
        return r;
    }
    attrs = outpub->publicArea.objectAttributes;
    if (outpub->publicArea.type != TPM2_ALG_ECC ||
        (c = tpm_curve_by_id(outpub->publicArea.parameters.eccDetail.curveID)) == NULL ||
        !(attrs & TPMA_OBJECT_DECRYPT) || (attrs & TPMA_OBJECT_RESTRICTED)) {
        KEYX_ERR(p, KEYX_R_UNSUPPORTED,
                 "tpm: the key at 0x%08X is not an unrestricted decrypt ECC P-256/P-384/P-521 "
                 "key, so it cannot do ECDH (create it with tpm2_create -G ecc256 -a "
                 "'decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth')",
                 (unsigned)h);
        r = 0;
    } else if ((*pub = tpm_ec_public(p->libctx, c, &outpub->publicArea.unique.ecc)) == NULL) {
        KEYX_ERR(p, KEYX_R_BACKEND_FAILURE, "tpm: unusable public key at 0x%08X", (unsigned)h);
        r = 0;
    } else if ((k = key_new(d, c)) == NULL) {
        EVP_PKEY_free(*pub);
        *pub = NULL;
        r = 0;
    } else {
        tpm_obj_persistent(d, &k->obj, h, tr);
        *handle = k;
        r = 1;
    }
    Esys_Free(outpub);
    if (r != 1)
        Esys_TR_Close(ctx, &tr);
    tpm_end(d);
    return r;
}

/* ---- free -------------------------------------------------------------------------------- */

static void tpm2_free(void *state, void *handle)
{
    tpm_dev *d = state;
    tpm_key *k = handle;
    ESYS_CONTEXT *ctx;

    if (k == NULL)
        return;
    /* Transient objects are flushed now; persistent keys stay. A lost connection (or a fork)
     * already took the transient object with it: nothing to reconnect for. */
    ERR_set_mark();
    tpm_begin_quiet(d, &ctx);
    tpm_obj_drop(d, &k->obj);
    tpm_end(d);
    ERR_pop_to_mark();
    OPENSSL_free(k);
}

const keyx_backend_ops keyx_tpm_backend = {
    .name = "tpm",
    .exports_private = 0,
    .open = tpm2_open,
    .close = tpm2_close,
    .supports = tpm2_supports,
    .generate = tpm2_generate,
    .import = tpm2_import,
    .load = tpm2_load,
    .derive = tpm2_derive,
    .free = tpm2_free,
};
