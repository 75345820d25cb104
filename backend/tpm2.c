/* The tpm backend: ECDH key pairs and shared secrets, RSA decryption and signatures (ECDSA,
 * RSASSA, RSASSA-PSS on a digest keyx computed: one TPM2_Sign), inside a TPM 2.0.
 * Ephemeral EC keys are primaries in the NULL hierarchy (one TPM2_CreatePrimary each, random
 * unique field) and RSA keys transient objects under the cached storage parent (CreateLoaded),
 * all flushed when freed; a derive is exactly one TPM2_ECDH_ZGen and a decryption one
 * TPM2_RSA_Decrypt, the result travelling in an encrypted session. Static keys are persistent
 * handles (keyx:tpm:handle=0x81000002), used by reference. Imported keys (tests) are loaded with
 * TPM2_LoadExternal in the NULL hierarchy. backend/tpm2_device.c owns the connection, parent,
 * session and slots. */
#include <stdlib.h>
#include <string.h>

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/rand.h>
#include <tss2/tss2_mu.h>
#include <tss2/tss2_rc.h>

#include "backend/backend.h"
#include "backend/pool.h"
#include "backend/rsa_oaep_decode.h"
#include "backend/tpm2_device.h"
#include "backend/tpm2_keyfile.h"
#include "backend/tpm2_pubkey.h"
#include "provider/errors.h"
#include "provider/provctx.h"

typedef struct tpm_key {
    tpm_obj obj;
    const tpm_curve *curve;     /* EC keys; NULL for RSA */
    size_t nlen;                /* RSA keys: modulus bytes; 0 for EC */
    tpm_keyfile *file;          /* loaded from a TSS2 key file (a transient object, loaded again
                                   when the TPM lost it); NULL for other keys */
    int no_decrypt;             /* TSS2 and persistent keys: not an unrestricted decrypt key (e.g.
                                   sign only) */
    int sign;                   /* 1: signs (sign attribute, not restricted); 0: no sign attribute;
                                   -1: restricted (signs only TPM-made data) */
    TPMI_ALG_SIG_SCHEME scheme; /* the key's own signing scheme (TPM2_ALG_NULL: any) */
    TPMI_ALG_HASH scheme_hash;  /* and its hash */
    EVP_PKEY *expect;           /* from a key reference file: the recorded public key */
    int unsettled;              /* 1 until key_settle found and checked the key (atomic) */
} tpm_key;

/* What a key's public area says about signing (persistent and TSS2 keys). */
static void key_sign_attrs(tpm_key *k, const TPMT_PUBLIC *area)
{
    TPMA_OBJECT a = area->objectAttributes;

    k->sign = !(a & TPMA_OBJECT_SIGN_ENCRYPT) ? 0 : (a & TPMA_OBJECT_RESTRICTED) ? -1 : 1;
    if (area->type == TPM2_ALG_RSA) {
        k->scheme = area->parameters.rsaDetail.scheme.scheme;
        k->scheme_hash = area->parameters.rsaDetail.scheme.details.anySig.hashAlg;
    } else {
        k->scheme = area->parameters.eccDetail.scheme.scheme;
        k->scheme_hash = area->parameters.eccDetail.scheme.details.anySig.hashAlg;
    }
}

/* ---- open / close / supports ------------------------------------------------------------ */

static const keyx_pool_ops tpm_pool_ops;

static int tpm2_open(keyx_provctx *p, void **state)
{
    int r = tpm_dev_new(p, (tpm_dev **)state);

    /* `tpm-pool`: the pool exists from now on, its refill thread only from the first ephemeral
     * key generated inline (pool.h). */
    if (r == 1 && p->cfg.tpm_pool > 0 &&
        keyx_pool_new(p, "tpm", p->cfg.tpm_pool, &tpm_pool_ops, *state) == NULL) {
        tpm_dev_free(*state);
        *state = NULL;
        KEYX_ERR(p, KEYX_R_INTERNAL, "tpm: out of memory for the key pool (tpm-pool)");
        return 0;
    }
    return r;
}

static void tpm2_close(void *state)
{
    /* The refill thread stops first, then the pooled keys are flushed, then the device goes. */
    keyx_pool_free(keyx_pool_of(state));
    tpm_dev_free(state);
}

static void tpm2_describe(void *state, char *buf, size_t len)
{
    tpm_dev_describe(state, buf, len);
}

static int tpm2_supports(void *state, const keyx_keyspec *spec)
{
    const tpm_curve *c;

    /* X25519, X448 and finite-field DH do not exist in TPM 2.0. */
    if (spec->alg == KEYX_ALG_RSA)
        return tpm_dev_has_rsa(state, spec->bits != 0 ? spec->bits : 2048);
    if (spec->alg != KEYX_ALG_EC || (c = tpm_curve_by_group(spec->group)) == NULL)
        return 0;
    /* With domain parameters, a key generation asks (it uses the TPM next): the real list.
     * Without, a capability query (TLS-GROUP), which may not open a tabrmd TCTI (a forking
     * server's master lists the groups before its workers use the TPM): see tpm_dev_has_curve. */
    if (spec->domain != NULL)
        tpm_dev_probe(state);
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
    k->scheme = TPM2_ALG_NULL;
    return k;
}

/* The public exponent the application asked for ("e"); 65537 by default. */
static int rsa_exponent(keyx_provctx *p, const OSSL_PARAM *params, uint32_t *e)
{
    const OSSL_PARAM *pe =
        params != NULL ? OSSL_PARAM_locate_const(params, OSSL_PKEY_PARAM_RSA_E) : NULL;
    BIGNUM *bn = NULL;
    int ok;

    *e = 65537;
    if (pe == NULL)
        return 1;
    ok = OSSL_PARAM_get_BN(pe, &bn) && BN_is_odd(bn) && !BN_is_one(bn) && BN_num_bits(bn) <= 32;
    if (ok)
        *e = (uint32_t)BN_get_word(bn);
    BN_free(bn);
    if (!ok)
        KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT,
                 "tpm: the RSA public exponent must be an odd number greater than 1 that fits in "
                 "32 bits (the TPM's limit)");
    return ok;
}

/* ---- generate ---------------------------------------------------------------------------- */

/* The decrypt template of an RSA key of spec's size and exponent, when the TPM makes such keys;
 * 0 + error otherwise. */
static int rsa_area(tpm_dev *d, const keyx_keyspec *spec, TPMT_PUBLIC *area)
{
    keyx_provctx *p = tpm_dev_prov(d);
    size_t bits = spec->bits != 0 ? spec->bits : 2048;
    uint32_t e = 65537;

    if (!rsa_exponent(p, spec->params, &e))
        return 0;
    if (!tpm_dev_has_rsa(d, bits)) {
        KEYX_ERR(p, KEYX_R_UNSUPPORTED,
                 "tpm: this TPM does not make %zu-bit RSA keys (TPM2_TestParms refused them; "
                 "swtpm and most TPMs do 2048, some 3072)",
                 bits);
        return 0;
    }
    tpm_rsa_template(bits, e, 1, area);
    return 1;
}

/* pooled: a key for the pool (`tpm-pool`), saved out of the TPM (ContextSave, FlushContext) in
 * the same lock acquisition, so that keys waiting in the pool hold no object slot whatever the
 * pool's size; pool_usable loads it back (ContextLoad) when it is handed out. Keeping one pooled
 * key loaded was measured too: a TPM with three transient slots (swtpm, no resource manager)
 * holding the storage parent, the key of the handshake in progress and that key then answered
 * the refill's CreatePrimary with 0x902 (object memory full; recovered by tpm_make_room, but
 * not clean), for no measurable gain. */
static int generate_once(void *state, const keyx_keyspec *spec, void **handle, EVP_PKEY **pub,
                         int pooled)
{
    tpm_dev *d = state;
    keyx_provctx *p = tpm_dev_prov(d);
    const tpm_curve *c = tpm_curve_by_group(spec->group);
    TPM2B_SENSITIVE_CREATE sens = {0};
    TPM2B_TEMPLATE tmpl = {0};
    TPMT_PUBLIC area;
    TPM2B_PUBLIC *outpub = NULL, prim_pub;
    TPM2B_PRIVATE *outpriv = NULL;
    ESYS_CONTEXT *ctx;
    ESYS_TR tr = ESYS_TR_NONE;
    size_t off = 0;
    tpm_key *k;
    TSS2_RC rc;
    int r;

    *handle = NULL;
    *pub = NULL;
    if (spec->alg == KEYX_ALG_RSA) {
        if (!rsa_area(d, spec, &area))
            return 0;
    } else if (spec->alg != KEYX_ALG_EC || c == NULL) {
        KEYX_ERR(p, KEYX_R_UNSUPPORTED,
                 "tpm: only EC P-256, P-384 and P-521 and RSA keys are made in the TPM");
        return 0;
    } else {
        tpm_ecdh_template(c, 1, &area);
    }
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
    if (c != NULL) {
        /* An ephemeral EC key is a primary key in the NULL hierarchy: one command, no storage
         * parent, and gone with the next TPM reset like the NULL seed it comes from. The random
         * unique field makes every key a new one (a primary is derived from the hierarchy's
         * seed and its template). */
        TPM2B_PUBLIC inpub = {.publicArea = area};

        if (RAND_bytes_ex(p->libctx, inpub.publicArea.unique.ecc.x.buffer, c->field, 0) != 1) {
            tpm_end(d);
            OPENSSL_free(k);
            KEYX_ERR(p, KEYX_R_INTERNAL, "tpm: no random bytes for the key template");
            return 0;
        }
        inpub.publicArea.unique.ecc.x.size = (UINT16)c->field;
        TPM_CALL(d, NULL, rc, tpm_create_null_primary(d, &inpub, &tr, &prim_pub, &k->obj.name));
    } else {
        TPM_CALL(d, NULL, rc,
                 Esys_CreateLoaded(ctx, tpm_parent(d), ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE,
                                   &sens, &tmpl, &tr, &outpriv, &outpub));
    }
    if (rc != TSS2_RC_SUCCESS) {
        r = tpm_fail(d, rc,
                     c != NULL ? "EC key generation (CreatePrimary, NULL hierarchy)"
                               : "RSA key generation (CreateLoaded)");
        tpm_end(d);
        OPENSSL_free(k);
        return r;
    }
    Esys_Free(outpriv);
    tpm_obj_loaded(d, &k->obj, tr);
    if (c != NULL) {
        *pub = tpm_ec_public_from(spec->domain, p->libctx, c, &prim_pub.publicArea.unique.ecc);
    } else {
        tpm_obj_public(d, &k->obj, &outpub->publicArea);
        *pub = tpm_rsa_public(p->libctx, &outpub->publicArea);
        k->nlen = outpub->publicArea.unique.rsa.size;
    }
    Esys_Free(outpub);
    if (*pub == NULL) {
        tpm_obj_drop(d, &k->obj);
        tpm_end(d);
        OPENSSL_free(k);
        KEYX_ERR(p, KEYX_R_BACKEND_FAILURE, "tpm: the TPM returned an unusable %s public key",
                 c != NULL ? c->group : "RSA");
        return 0;
    }
    if (pooled) {
        TPMS_CONTEXT *saved = NULL;

        /* Not fatal: a key that cannot be saved out stays loaded (tpm_make_room may still). */
        if (Esys_ContextSave(ctx, tr, &saved) == TSS2_RC_SUCCESS) {
            if (Esys_FlushContext(ctx, tr) == TSS2_RC_SUCCESS) {
                k->obj.saved = saved;
                k->obj.tr = ESYS_TR_NONE; /* stays listed: tpm_make_room skips saved objects */
            } else {
                Esys_Free(saved);
            }
        }
    }
    tpm_end(d);
    *handle = k;
    return 1;
}

/* A TPM restarted since the last command answers the first one with "no such handle" (see
 * tpm_dev_take_reset): a new key can be made at once on a new connection. */
static int generate_persistent(tpm_dev *d, const keyx_keyspec *spec, void **handle, EVP_PKEY **pub);

static int generate_ephemeral(void *state, const keyx_keyspec *spec, void **handle, EVP_PKEY **pub,
                              int pooled)
{
    int r;

    ERR_set_mark();
    r = generate_once(state, spec, handle, pub, pooled);
    if (r == KEYX_BACKEND_DOWN && tpm_dev_take_reset(state)) {
        ERR_pop_to_mark();
        return generate_once(state, spec, handle, pub, pooled);
    }
    ERR_clear_last_mark();
    return r;
}

static int tpm2_generate(void *state, const keyx_keyspec *spec, void **handle, EVP_PKEY **pub)
{
    keyx_pool *pl;
    int r;

    /* Never retried: after a reset the handle may hold the key made by the first attempt. */
    if (spec->persist != NULL)
        return generate_persistent(state, spec, handle, pub);
    /* `tpm-pool`: an ephemeral EC key made ahead by the refill thread, if one is ready. */
    pl = spec->alg == KEYX_ALG_EC ? keyx_pool_of(state) : NULL;
    if (pl != NULL && keyx_pool_take(pl, spec, handle, pub))
        return 1;
    r = generate_ephemeral(state, spec, handle, pub, 0);
    if (r == 1 && pl != NULL)
        keyx_pool_kick(pl);
    return r;
}

/* ---- key pool (`tpm-pool`) ---------------------------------------------------------------- */

/* A pooled key is a NULL-hierarchy primary like any ephemeral key, saved out of the TPM while
 * it waits in the pool (generate_once). */
static int pool_usable(void *state, void *handle)
{
    tpm_dev *d = state;
    tpm_key *k = handle;
    ESYS_CONTEXT *ctx;
    ESYS_TR tr;
    int ok = 0;

    /* Made on the device's current connection (no reconnect or fork since), and loaded back
     * into the TPM now (ContextLoad, which the derive would do anyway): a TPM that restarted
     * unnoticed refuses the saved context here, and the key is never handed out. */
    ERR_set_mark();
    if (tpm_begin(d, &ctx) == 1) {
        ok = tpm_obj_current(d, &k->obj) && tpm_obj_ready(d, &k->obj, &tr) == 1;
        tpm_end(d);
    }
    ERR_pop_to_mark();
    return ok;
}

static int pool_make(void *state, const keyx_keyspec *spec, void **handle, EVP_PKEY **pub)
{
    return generate_ephemeral(state, spec, handle, pub, 1);
}

static void tpm2_free(void *state, void *handle);

static const keyx_pool_ops tpm_pool_ops = {
    .make = pool_make,
    .usable = pool_usable,
    .destroy = tpm2_free,
};

/* ---- import: TPM2_LoadExternal in the NULL hierarchy (tests, keys moved into the TPM) ----- */

/* An RSA private key: its first prime is the TPM's sensitive part, n and e the public area. */
static int import_rsa_once(tpm_dev *d, EVP_PKEY *key, void **handle, EVP_PKEY **pub)
{
    keyx_provctx *p = tpm_dev_prov(d);
    TPM2B_SENSITIVE sens = {0};
    TPM2B_PUBLIC inpub = {0};
    ESYS_CONTEXT *ctx;
    ESYS_TR tr = ESYS_TR_NONE, sess;
    int bits = EVP_PKEY_get_bits(key);
    tpm_key *k = NULL;
    TSS2_RC rc;
    int r;

    *handle = NULL;
    *pub = NULL;
    if (bits != 2048 && bits != 3072 && bits != 4096) {
        KEYX_ERR(p, KEYX_R_UNSUPPORTED,
                 "tpm: only 2048, 3072 and 4096-bit RSA keys can be moved into a TPM (this one "
                 "has %d bits)",
                 bits);
        return 0;
    }
    if (!tpm_dev_has_rsa(d, (size_t)bits)) {
        KEYX_ERR(p, KEYX_R_UNSUPPORTED,
                 "tpm: this TPM does not take %d-bit RSA keys (TPM2_TestParms refused them)", bits);
        return 0;
    }
    sens.sensitiveArea.sensitiveType = TPM2_ALG_RSA;
    if (!tpm_rsa_area(key, &inpub.publicArea, &sens.sensitiveArea.sensitive.rsa)) {
        OPENSSL_cleanse(&sens, sizeof(sens));
        KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT,
                 "tpm: unusable RSA private key (the TPM needs n, a public exponent below 2^32 "
                 "and the prime p)");
        return 0;
    }
    if ((*pub = tpm_rsa_public(p->libctx, &inpub.publicArea)) == NULL ||
        (k = key_new(d, NULL)) == NULL) {
        OPENSSL_cleanse(&sens, sizeof(sens));
        goto fail;
    }
    k->nlen = inpub.publicArea.unique.rsa.size;
    if ((r = tpm_begin(d, &ctx)) != 1) {
        OPENSSL_cleanse(&sens, sizeof(sens));
        goto fail_r;
    }
    /* The prime crosses the bus encrypted (command parameter encryption). */
    if ((r = tpm_session(d, TPMA_SESSION_DECRYPT, 0, &sess)) != 1) {
        OPENSSL_cleanse(&sens, sizeof(sens));
        tpm_end(d);
        goto fail_r;
    }
    TPM_CALL(d, NULL, rc,
             Esys_LoadExternal(ctx, sess, ESYS_TR_NONE, ESYS_TR_NONE, &sens, &inpub,
                               ESYS_TR_RH_NULL, &tr));
    OPENSSL_cleanse(&sens, sizeof(sens));
    if (rc != TSS2_RC_SUCCESS) {
        r = tpm_fail(d, rc, "loading the RSA private key (LoadExternal)");
        tpm_end(d);
        goto fail_r;
    }
    tpm_obj_loaded(d, &k->obj, tr);
    tpm_obj_public(d, &k->obj, &inpub.publicArea);
    tpm_end(d);
    *handle = k;
    return 1;

fail:
    r = 0;
fail_r:
    OPENSSL_free(k);
    EVP_PKEY_free(*pub);
    *pub = NULL;
    return r;
}

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

    if (EVP_PKEY_is_a(key, "RSA"))
        return import_rsa_once(d, key, handle, pub);
    *handle = NULL;
    *pub = NULL;
    if (c == NULL) {
        KEYX_ERR(p, KEYX_R_UNSUPPORTED,
                 "tpm: only EC P-256, P-384 and P-521 and RSA private keys can be moved into the "
                 "TPM");
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
    tpm_obj_public(d, &k->obj, &inpub.publicArea);
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

static int derive_once(void *state, void *handle, const keyx_peer *peer, unsigned char *secret,
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

    if (k->curve == NULL) {
        KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT, "tpm: an RSA key does not do key agreement");
        return 0;
    }
    if (k->no_decrypt) {
        KEYX_ERR(p, KEYX_R_KEY_USAGE,
                 "tpm: this TPM key cannot do key agreement (ECDH_ZGen): its attributes make it "
                 "no unrestricted decrypt key (a signing-only or storage key)");
        return 0;
    }
    if (secretlen != k->curve->field ||
        !(peer->point != NULL
              ? tpm_ec_point_decode(peer->point, peer->pointlen, k->curve, &in.point)
              : tpm_ec_point(peer->view, k->curve, &in.point))) {
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
    TPM_CALL(d, &k->obj, rc, tpm_ecdh_zgen(d, &k->obj, tr, &in, &out));
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

static int file_key_refresh(tpm_dev *d, tpm_key *k);
static int key_settle(tpm_dev *d, tpm_key *k);

static int tpm2_derive(void *state, void *handle, const keyx_peer *peer, unsigned char *secret,
                       size_t secretlen)
{
    tpm_key *k = handle;
    int r;

    if ((r = key_settle(state, k)) != 1)
        return r;
    if (k->file != NULL && (r = file_key_refresh(state, k)) != 1)
        return r;
    ERR_set_mark();
    r = derive_once(state, handle, peer, secret, secretlen);
    /* A persistent key survives a TPM restart: found again at its handle on a new connection;
     * a key from a TSS2 file is loaded again. */
    if (r == KEYX_BACKEND_DOWN && (k->obj.persistent != 0 || k->file != NULL) &&
        tpm_dev_take_reset(state)) {
        ERR_pop_to_mark();
        if (k->file != NULL && (r = file_key_refresh(state, k)) != 1)
            return r;
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

/* The key a persistent object's public area describes: *k (its obj not yet set) and *pub, or 0
 * with an error when keyx cannot use it. */
static int persistent_key(tpm_dev *d, TPM2_HANDLE h, const TPMT_PUBLIC *area, tpm_key **out,
                          EVP_PKEY **pub)
{
    keyx_provctx *p = tpm_dev_prov(d);
    TPMA_OBJECT attrs = area->objectAttributes;
    const tpm_curve *c = NULL;
    tpm_key *k;
    int sign_ok;

    *out = NULL;
    *pub = NULL;
    /* Keys for key agreement or decryption, and keys for signing (TLS certificate keys). */
    sign_ok = (attrs & TPMA_OBJECT_SIGN_ENCRYPT) && !(attrs & TPMA_OBJECT_RESTRICTED);
    if (area->type == TPM2_ALG_RSA) {
        TPMI_ALG_RSA_SCHEME sch = area->parameters.rsaDetail.scheme.scheme;
        int dec = (attrs & TPMA_OBJECT_DECRYPT) && !(attrs & TPMA_OBJECT_RESTRICTED) &&
                  sch == TPM2_ALG_NULL;

        if (!dec && !sign_ok) {
            KEYX_ERR(p, KEYX_R_KEY_USAGE,
                     "tpm: the RSA key at 0x%08X is not an unrestricted decrypt key without a "
                     "scheme of its own, nor an unrestricted signing key, so keyx cannot use it "
                     "(create it with tpm2_create -G rsa2048:null:null -a "
                     "'decrypt|sign|fixedtpm|fixedparent|sensitivedataorigin|userwithauth')",
                     (unsigned)h);
            return 0;
        }
        if ((*pub = tpm_rsa_public(p->libctx, area)) == NULL) {
            KEYX_ERR(p, KEYX_R_BACKEND_FAILURE, "tpm: unusable RSA public key at 0x%08X",
                     (unsigned)h);
            return 0;
        }
        if ((k = key_new(d, NULL)) == NULL) {
            EVP_PKEY_free(*pub);
            *pub = NULL;
            return 0;
        }
        k->nlen = area->unique.rsa.size;
        k->no_decrypt = !dec;
    } else {
        if (area->type != TPM2_ALG_ECC ||
            (c = tpm_curve_by_id(area->parameters.eccDetail.curveID)) == NULL ||
            (!sign_ok && (!(attrs & TPMA_OBJECT_DECRYPT) || (attrs & TPMA_OBJECT_RESTRICTED)))) {
            KEYX_ERR(p, KEYX_R_KEY_USAGE,
                     "tpm: the key at 0x%08X is not an unrestricted decrypt (or signing) ECC "
                     "P-256/P-384/P-521 or RSA key, so keyx cannot use it (create it with "
                     "tpm2_create -G ecc256 -a "
                     "'decrypt|sign|fixedtpm|fixedparent|sensitivedataorigin|userwithauth')",
                     (unsigned)h);
            return 0;
        }
        if ((*pub = tpm_ec_public(p->libctx, c, &area->unique.ecc)) == NULL) {
            KEYX_ERR(p, KEYX_R_BACKEND_FAILURE, "tpm: unusable public key at 0x%08X", (unsigned)h);
            return 0;
        }
        if ((k = key_new(d, c)) == NULL) {
            EVP_PKEY_free(*pub);
            *pub = NULL;
            return 0;
        }
        k->no_decrypt = !(attrs & TPMA_OBJECT_DECRYPT) || (attrs & TPMA_OBJECT_RESTRICTED);
    }
    key_sign_attrs(k, area);
    *out = k;
    return 1;
}

static int tpm2_load(void *state, const char *locator, void **handle, EVP_PKEY **pub)
{
    tpm_dev *d = state;
    keyx_provctx *p = tpm_dev_prov(d);
    TPM2B_PUBLIC *outpub = NULL;
    ESYS_CONTEXT *ctx;
    ESYS_TR tr = ESYS_TR_NONE;
    TPM2_HANDLE h;
    tpm_key *k = NULL;
    TSS2_RC rc;
    int r, used = 0;

    *handle = NULL;
    *pub = NULL;
    if (!parse_locator(p, locator, &h))
        return 0;
    if ((r = tpm_begin(d, &ctx)) != 1)
        return r;
    if ((r = tpm_persistent_in_use(d, h, &used)) != 1 || !used) {
        if (r == 1)
            KEYX_ERR(p, KEYX_R_MISSING_KEY,
                     "tpm: no persistent key at handle 0x%08X: list them with tpm2_getcap "
                     "handles-persistent",
                     (unsigned)h);
        tpm_end(d);
        return r == 1 ? 0 : r;
    }
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
            tpm_persistent_close_unused(d, &tr);
        tpm_end(d);
        return r;
    }
    r = persistent_key(d, h, &outpub->publicArea, &k, pub);
    if (r == 1) {
        tpm_obj_persistent(d, &k->obj, h, tr);
        *handle = k;
    }
    Esys_Free(outpub);
    if (r != 1)
        tpm_persistent_close_unused(d, &tr);
    tpm_end(d);
    return r;
}

/* ---- static keys from a key reference file: opened at first use ------------------------- */

/* A key reference file records the key's locator and public key, so the key is made without the
 * TPM: nginx's master loads its certificate key before forking the workers, and a tabrmd TCTI
 * opened there cannot be opened again in the workers. The key is a persistent object
 * of no connection yet: its first use (key_settle) finds it at its handle exactly as after a
 * reconnect or fork, reads its public area and checks it against the recorded public key. */
static int tpm2_load_deferred(void *state, const char *locator, EVP_PKEY *recorded, void **handle,
                              EVP_PKEY **pub)
{
    tpm_dev *d = state;
    keyx_provctx *p = tpm_dev_prov(d);
    const tpm_curve *c = NULL;
    size_t nlen = 0;
    TPM2_HANDLE h;
    tpm_key *k;

    *handle = NULL;
    *pub = NULL;
    if (!parse_locator(p, locator, &h))
        return 0;
    if (EVP_PKEY_is_a(recorded, "EC")) {
        char group[64];

        if (!EVP_PKEY_get_utf8_string_param(recorded, OSSL_PKEY_PARAM_GROUP_NAME, group,
                                            sizeof(group), NULL) ||
            (c = tpm_curve_by_group(group)) == NULL) {
            KEYX_ERR(p, KEYX_R_UNSUPPORTED,
                     "tpm: the key reference for 0x%08X records an EC key on a curve a TPM key "
                     "of keyx cannot have (P-256, P-384, P-521)",
                     (unsigned)h);
            return 0;
        }
    } else if (EVP_PKEY_is_a(recorded, "RSA")) {
        nlen = (size_t)EVP_PKEY_get_size(recorded);
    } else {
        KEYX_ERR(p, KEYX_R_UNSUPPORTED,
                 "tpm: the key reference for 0x%08X records neither an EC nor an RSA key",
                 (unsigned)h);
        return 0;
    }
    if ((k = key_new(d, c)) == NULL)
        return 0;
    if (!EVP_PKEY_up_ref(recorded) || !EVP_PKEY_up_ref(recorded)) {
        OPENSSL_free(k);
        KEYX_ERR(p, KEYX_R_INTERNAL, "out of memory");
        return 0;
    }
    k->nlen = nlen;
    k->sign = 1; /* settled at first use */
    k->expect = recorded;
    k->unsettled = 1;
    k->obj.persistent = h;
    k->obj.gen = UINT64_MAX; /* of no connection: found at its handle at first use */
    *handle = k;
    *pub = recorded;
    return 1;
}

/* Before any use of a key from a reference file: finds it at its handle, reads its public area
 * and checks it against the recorded one; then the key is an ordinary persistent key. 1, or
 * 0/KEYX_BACKEND_DOWN with an error raised (every use of a replaced key is refused). */
static int key_settle(tpm_dev *d, tpm_key *k)
{
    keyx_provctx *p = tpm_dev_prov(d);
    TPM2B_PUBLIC *outpub = NULL;
    ESYS_CONTEXT *ctx;
    ESYS_TR tr;
    EVP_PKEY *pub = NULL;
    tpm_key *seen = NULL;
    TSS2_RC rc;
    int r, used = 1;

    if (!__atomic_load_n(&k->unsettled, __ATOMIC_ACQUIRE))
        return 1;
    if ((r = tpm_begin(d, &ctx)) != 1)
        return r;
    if (!k->unsettled) { /* another thread settled it (under the device lock) */
        tpm_end(d);
        return 1;
    }
    /* Asked of the handle list first: ReadPublic on a free handle makes ESYS print errors. */
    if (!tpm_obj_current(d, &k->obj) &&
        (r = tpm_persistent_in_use(d, k->obj.persistent, &used)) != 1) {
        tpm_end(d);
        return r;
    }
    if (!used || (r = tpm_obj_ready(d, &k->obj, &tr)) != 1) {
        if (!used || r == 0)
            KEYX_ERR(p, KEYX_R_MISSING_KEY,
                     "key reference file: the tpm key \"handle=0x%08X\" could not be loaded "
                     "(deleted, or another TPM or token?): no persistent key at handle 0x%08X: "
                     "list them with tpm2_getcap handles-persistent",
                     (unsigned)k->obj.persistent, (unsigned)k->obj.persistent);
        tpm_end(d);
        return !used ? 0 : r;
    }
    TPM_CALL(
        d, NULL, rc,
        Esys_ReadPublic(ctx, tr, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &outpub, NULL, NULL));
    if (rc != TSS2_RC_SUCCESS) {
        r = tpm_fail(d, rc, "reading the persistent key (ReadPublic)");
        tpm_end(d);
        return r;
    }
    r = persistent_key(d, k->obj.persistent, &outpub->publicArea, &seen, &pub);
    if (r == 1 && EVP_PKEY_eq(pub, k->expect) != 1) {
        KEYX_ERR(p, KEYX_R_KEY_MISMATCH,
                 "key reference file: the tpm key \"handle=0x%08X\" is not the key this file was "
                 "written for (its public key differs): the key there was replaced",
                 (unsigned)k->obj.persistent);
        r = 0;
    } else if (r == 1) {
        k->nlen = seen->nlen;
        k->no_decrypt = seen->no_decrypt;
        k->sign = seen->sign;
        k->scheme = seen->scheme;
        k->scheme_hash = seen->scheme_hash;
        __atomic_store_n(&k->unsettled, 0, __ATOMIC_RELEASE);
    }
    OPENSSL_free(seen);
    EVP_PKEY_free(pub);
    Esys_Free(outpub);
    tpm_end(d);
    return r;
}

/* ---- keyx-persist: a new key made persistent at a handle -------------------------------- */

/* Owner-hierarchy persistent handles (TPM 2.0 Part 2, 7.5: 0x81800000 and above belong to the
 * platform). */
#define OWNER_PERSISTENT_FIRST 0x81000000UL
#define OWNER_PERSISTENT_LAST 0x817FFFFFUL

/* The public area of a persistent key: what tpm_ecdh_template / tpm_rsa_template give (decrypt,
 * fixedTPM, fixedParent, sensitiveDataOrigin, userWithAuth, noDA, no scheme) plus sign, so that
 * the key can also be a certificate key. */
static int persistent_area(tpm_dev *d, const keyx_keyspec *spec, TPMT_PUBLIC *area)
{
    keyx_provctx *p = tpm_dev_prov(d);
    const tpm_curve *c = tpm_curve_by_group(spec->group);

    if (spec->alg == KEYX_ALG_RSA) {
        if (!rsa_area(d, spec, area))
            return 0;
    } else if (spec->alg == KEYX_ALG_EC && c != NULL && tpm_dev_has_curve(d, c->id)) {
        tpm_ecdh_template(c, 1, area);
    } else {
        KEYX_ERR(p, KEYX_R_UNSUPPORTED,
                 "tpm: keyx-persist makes EC (P-256, P-384, P-521 when the TPM has it) and RSA "
                 "keys; a TPM has no %s%s%s keys",
                 keyx_alg_name(spec->alg), spec->group != NULL ? " " : "",
                 spec->group != NULL ? spec->group : "");
        return 0;
    }
    area->objectAttributes |= TPMA_OBJECT_SIGN_ENCRYPT;
    return 1;
}

static int tpm2_load(void *state, const char *locator, void **handle, EVP_PKEY **pub);

/* TPM2_Create under the storage parent, TPM2_Load, TPM2_EvictControl (owner) to the handle,
 * flush of the transient copy; then the key is opened by its handle exactly as
 * keyx:tpm:handle=0x81... opens it. A handle in use is never overwritten. */
static int generate_persistent(tpm_dev *d, const keyx_keyspec *spec, void **handle, EVP_PKEY **pub)
{
    keyx_provctx *p = tpm_dev_prov(d);
    const keyx_persist *ps = spec->persist;
    TPM2_HANDLE h = (TPM2_HANDLE)ps->tpm_handle;
    TPM2B_SENSITIVE_CREATE sens = {0};
    TPM2B_PUBLIC inpub = {0};
    TPM2B_DATA outside = {0};
    TPML_PCR_SELECTION pcrs = {0};
    TPM2B_PUBLIC *outpub = NULL;
    TPM2B_PRIVATE *outpriv = NULL;
    ESYS_CONTEXT *ctx;
    ESYS_TR tr = ESYS_TR_NONE, ptr = ESYS_TR_NONE;
    char locator[32];
    int used = 0;
    TSS2_RC rc;
    int r;

    *handle = NULL;
    *pub = NULL;
    if (ps->label != NULL || ps->id != NULL) {
        KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT,
                 "tpm: keyx-label and keyx-id name PKCS#11 token keys; a TPM key is kept at a "
                 "persistent handle: use keyx-persist:0x81xxxxxx alone");
        return 0;
    }
    if (ps->tpm_handle < OWNER_PERSISTENT_FIRST || ps->tpm_handle > OWNER_PERSISTENT_LAST) {
        KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT,
                 "tpm: keyx-persist:0x%08lX is not an owner persistent handle: keys are kept at "
                 "0x81000000..0x817FFFFF (0x81800000 and above belong to the platform)",
                 ps->tpm_handle);
        return 0;
    }
    if (!persistent_area(d, spec, &inpub.publicArea))
        return 0;
    if ((r = tpm_begin(d, &ctx)) != 1)
        return r;
    if ((r = tpm_persistent_in_use(d, h, &used)) != 1) {
        tpm_end(d);
        return r;
    }
    if (used) {
        tpm_end(d);
        KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT,
                 "tpm: persistent handle 0x%08X is already in use: keyx never overwrites a key; "
                 "choose a free handle (tpm2_getcap handles-persistent lists the used ones) or "
                 "free this one with tpm2_evictcontrol -C o -c 0x%08X",
                 (unsigned)h, (unsigned)h);
        return 0;
    }
    TPM_CALL(d, NULL, rc,
             Esys_Create(ctx, tpm_parent(d), ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE, &sens,
                         &inpub, &outside, &pcrs, &outpriv, &outpub, NULL, NULL, NULL));
    if (rc != TSS2_RC_SUCCESS) {
        r = tpm_fail(d, rc, "persistent key generation (Create)");
        tpm_end(d);
        return r;
    }
    TPM_CALL(d, NULL, rc,
             Esys_Load(ctx, tpm_parent(d), ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE, outpriv,
                       outpub, &tr));
    Esys_Free(outpriv);
    Esys_Free(outpub);
    if (rc != TSS2_RC_SUCCESS) {
        r = tpm_fail(d, rc, "loading the new key (Load)");
        tpm_end(d);
        return r;
    }
    rc = Esys_EvictControl(ctx, ESYS_TR_RH_OWNER, tr, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE,
                           h, &ptr);
    Esys_FlushContext(ctx, tr);
    if (rc != TSS2_RC_SUCCESS) {
        if (rc == TPM2_RC_NV_DEFINED) {
            KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT,
                     "tpm: persistent handle 0x%08X was taken meanwhile: keyx never overwrites a "
                     "key; choose another handle or free it with tpm2_evictcontrol -C o -c 0x%08X",
                     (unsigned)h, (unsigned)h);
            r = 0;
        } else if (rc == TPM2_RC_NV_SPACE) {
            KEYX_ERR(p, KEYX_R_BACKEND_FAILURE,
                     "tpm: no room for another persistent key (%s): free one with "
                     "tpm2_evictcontrol -C o -c 0x81xxxxxx (tpm2_getcap handles-persistent lists "
                     "them)",
                     Tss2_RC_Decode(rc));
            r = 0;
        } else {
            r = tpm_fail(d, rc, "making the key persistent (EvictControl, owner hierarchy)");
        }
        tpm_end(d);
        return r;
    }
    Esys_TR_Close(ctx, &ptr);
    tpm_end(d);
    snprintf(locator, sizeof(locator), "handle=0x%08x", (unsigned)h);
    return tpm2_load(d, locator, handle, pub);
}

/* ---- locator: how a key reference file names a key ------------------------------------- */

static int tpm2_locator(void *state, void *handle, char **out)
{
    keyx_provctx *p = tpm_dev_prov(state);
    tpm_key *k = handle;

    *out = NULL;
    if (k->obj.persistent == 0) {
        if (k->file != NULL)
            KEYX_ERR(p, KEYX_R_KEY_NOT_WRITABLE,
                     "tpm: a key loaded from a TSS2 key file has no locator: it lives in that "
                     "file; give the file itself where the key is wanted");
        else
            KEYX_ERR(p, KEYX_R_KEY_NOT_WRITABLE,
                     "tpm: ephemeral TPM key has no locator; generate it with keyx-persist to "
                     "keep it");
        return 0;
    }
    if ((*out = OPENSSL_malloc(32)) == NULL) {
        KEYX_ERR(p, KEYX_R_INTERNAL, "out of memory");
        return 0;
    }
    snprintf(*out, 32, "handle=0x%08x", (unsigned)k->obj.persistent);
    return 1;
}

/* ---- TSS2 PRIVATE KEY files: TPM2_Load under the parent the file names --------------------- */

#define TSS2_FORMAT "TSS2 PRIVATE KEY"

/* Loads k's TSS2 key under the parent its file names, unless it is loaded on the current
 * connection already: at load time, and again after the TPM lost it (restarted, reconnected,
 * fork()). */
static int file_key_refresh(tpm_dev *d, tpm_key *k)
{
    keyx_provctx *p = tpm_dev_prov(d);
    const tpm_keyfile *f = k->file;
    ESYS_CONTEXT *ctx;
    ESYS_TR parent = ESYS_TR_NONE, tr = ESYS_TR_NONE;
    TSS2_RC rc;
    int release = 0, r;

    if ((r = tpm_begin(d, &ctx)) != 1)
        return r;
    if (tpm_obj_current(d, &k->obj)) {
        tpm_end(d);
        return 1;
    }
    tpm_obj_drop(d, &k->obj); /* what was left of the lost object */
    if ((r = tpm_open_parent(d, f->parent, &parent, &release)) != 1) {
        tpm_end(d);
        return r;
    }
    TPM_CALL(d, NULL, rc,
             Esys_Load(ctx, parent, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE, &f->priv, &f->pub,
                       &tr));
    tpm_release_parent(d, parent, release);
    if (rc != TSS2_RC_SUCCESS) {
        if ((rc & TSS2_RC_LAYER_MASK) == TSS2_TPM_RC_LAYER &&
            (tpm_rc_is(rc, TPM2_RC_INTEGRITY) || tpm_rc_is(rc, TPM2_RC_SIZE) ||
             tpm_rc_is(rc, TPM2_RC_VALUE) || tpm_rc_is(rc, TPM2_RC_KEY))) {
            KEYX_ERR(p, KEYX_R_MISSING_KEY,
                     "tpm: this TPM cannot load the TSS2 key under its parent 0x%08X (%s): the "
                     "file was made by another TPM, or under another parent, or the TPM was "
                     "cleared since",
                     (unsigned)f->parent, Tss2_RC_Decode(rc));
            r = 0;
        } else {
            r = tpm_fail(d, rc, "loading the TSS2 key (Load)");
        }
        tpm_end(d);
        return r;
    }
    tpm_obj_loaded(d, &k->obj, tr);
    tpm_obj_public(d, &k->obj, &f->pub.publicArea);
    tpm_end(d);
    return 1;
}

static int load_encoded_once(void *state, const char *format, const unsigned char *der, size_t len,
                             void **handle, EVP_PKEY **pub)
{
    tpm_dev *d = state;
    keyx_provctx *p = tpm_dev_prov(d);
    const tpm_curve *c = NULL;
    const TPMT_PUBLIC *area;
    tpm_keyfile f;
    TPMA_OBJECT attrs;
    tpm_key *k;
    int r;

    *handle = NULL;
    *pub = NULL;
    if (strcmp(format, TSS2_FORMAT) != 0) {
        KEYX_ERR(p, KEYX_R_UNSUPPORTED, "tpm: cannot load a %s (only a " TSS2_FORMAT ")", format);
        return 0;
    }
    if (!tpm_keyfile_parse(p, der, len, &f))
        return 0;
    area = &f.pub.publicArea;
    attrs = area->objectAttributes;
    if (area->type == TPM2_ALG_ECC) {
        if ((c = tpm_curve_by_id(area->parameters.eccDetail.curveID)) == NULL) {
            KEYX_ERR(p, KEYX_R_UNSUPPORTED,
                     "tpm: this TSS2 key is on TPM curve 0x%04X: keyx serves P-256, P-384 and "
                     "P-521 keys",
                     (unsigned)area->parameters.eccDetail.curveID);
            r = 0;
            goto out;
        }
        *pub = tpm_ec_public(p->libctx, c, &area->unique.ecc);
    } else if (area->type == TPM2_ALG_RSA) {
        *pub = tpm_rsa_public(p->libctx, area);
    } else {
        KEYX_ERR(p, KEYX_R_UNSUPPORTED,
                 "tpm: this TSS2 key is of TPM type 0x%04X: keyx serves EC and RSA keys",
                 (unsigned)area->type);
        r = 0;
        goto out;
    }
    if (*pub == NULL) {
        KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT, "tpm: the TSS2 key file's public key is unusable");
        r = 0;
        goto out;
    }
    if ((k = key_new(d, c)) == NULL) {
        r = 0;
        goto out;
    }
    /* Loaded whatever it is for (certificate keys sign with keys like these); derive and decrypt
     * refuse a key that is not an unrestricted decrypt key without a scheme of its own. */
    k->no_decrypt = !(attrs & TPMA_OBJECT_DECRYPT) || (attrs & TPMA_OBJECT_RESTRICTED) ||
                    (c == NULL && area->parameters.rsaDetail.scheme.scheme != TPM2_ALG_NULL &&
                     area->parameters.rsaDetail.scheme.scheme != TPM2_ALG_OAEP);
    key_sign_attrs(k, area);
    if (c == NULL)
        k->nlen = area->unique.rsa.size;
    if ((k->file = OPENSSL_memdup(&f, sizeof(f))) == NULL) {
        KEYX_ERR(p, KEYX_R_INTERNAL, "out of memory");
        OPENSSL_free(k);
        r = 0;
        goto out;
    }
    if ((r = file_key_refresh(d, k)) != 1) {
        OPENSSL_clear_free(k->file, sizeof(*k->file));
        OPENSSL_free(k);
        goto out;
    }
    *handle = k;
    r = 1;

out:
    OPENSSL_cleanse(&f, sizeof(f));
    if (r != 1) {
        EVP_PKEY_free(*pub);
        *pub = NULL;
    }
    return r;
}

/* A TPM restarted since the last command: the key is loaded again on a new connection. */
static int tpm2_load_encoded(void *state, const char *format, const unsigned char *der, size_t len,
                             void **handle, EVP_PKEY **pub)
{
    int r;

    ERR_set_mark();
    r = load_encoded_once(state, format, der, len, handle, pub);
    if (r == KEYX_BACKEND_DOWN && tpm_dev_take_reset(state)) {
        ERR_pop_to_mark();
        return load_encoded_once(state, format, der, len, handle, pub);
    }
    ERR_clear_last_mark();
    return r;
}

/* ---- RSA decryption: one TPM2_RSA_Decrypt ------------------------------------------------- */

static TPMI_ALG_HASH tpm_hash(const char *md)
{
    static const struct {
        const char *name;
        TPMI_ALG_HASH alg;
    } map[] = {
        {"SHA1", TPM2_ALG_SHA1},       {"SHA-1", TPM2_ALG_SHA1},     {"SHA256", TPM2_ALG_SHA256},
        {"SHA2-256", TPM2_ALG_SHA256}, {"SHA-256", TPM2_ALG_SHA256}, {"SHA384", TPM2_ALG_SHA384},
        {"SHA2-384", TPM2_ALG_SHA384}, {"SHA-384", TPM2_ALG_SHA384}, {"SHA512", TPM2_ALG_SHA512},
        {"SHA2-512", TPM2_ALG_SHA512}, {"SHA-512", TPM2_ALG_SHA512}};

    for (size_t i = 0; i < sizeof(map) / sizeof(map[0]); i++)
        if (OPENSSL_strcasecmp(md, map[i].name) == 0)
            return map[i].alg;
    return TPM2_ALG_NULL;
}

static const char *hash_name(TPMI_ALG_HASH h)
{
    return h == TPM2_ALG_SHA1     ? "SHA1"
           : h == TPM2_ALG_SHA256 ? "SHA256"
           : h == TPM2_ALG_SHA384 ? "SHA384"
           : h == TPM2_ALG_SHA512 ? "SHA512"
                                  : "another hash";
}

/* The request's parameters as TPM2_RSA_Decrypt takes them; 0 (error raised) when the TPM
 * cannot take them, whatever the ciphertext. *decode = 1: OAEP runs as TPM2_RSA_Decrypt with
 * the null scheme (raw RSA) and keyx removes the padding (backend/rsa_oaep_decode.c).
 *
 * Keys without a scheme of their own (TPM2_ALG_NULL) take every OAEP request: the TPM's own
 * OAEP when it can do it (a hash it lists, MGF1 with that hash, no label or one ending with a
 * zero byte), raw RSA and keyx's decoding otherwise. The TPM's own OAEP stays first although
 * raw decoding would serve every request: with it the padded plaintext (seed and padding
 * block) never leaves the TPM and only the message travels, in the encrypted session. Which
 * path runs depends on the parameters alone, never on the ciphertext, and a failure on either
 * path is the same KEYX_RSA_DECRYPT_ERROR, so the choice tells an attacker nothing. The
 * TPM's sign attribute does not matter: TPM2_RSA_Decrypt asks for decrypt and not restricted
 * (checked when the key is loaded), and the raw result never reaches the application.
 *
 * Keys with a scheme of their own (TPM2_ALG_OAEP with a hash) cannot decrypt raw (the TPM
 * applies their scheme to a null-scheme request), so whatever the TPM cannot do for them is
 * refused with its reason. */
static int rsa_params(tpm_dev *d, const tpm_key *k, const keyx_rsa_op *op, TPMT_RSA_DECRYPT *scheme,
                      TPM2B_DATA *label, int *decode)
{
    keyx_provctx *p = tpm_dev_prov(d);
    const char *md = op->md != NULL ? op->md : "SHA1";
    const char *mgf1 = op->mgf1_md != NULL ? op->mgf1_md : md;
    TPMI_ALG_HASH h = tpm_hash(md);
    int zero_label = op->labellen == 0 ||
                     (op->label[op->labellen - 1] == 0 && op->labellen <= sizeof(label->buffer));
    int fixed = k->scheme != TPM2_ALG_NULL;

    memset(scheme, 0, sizeof(*scheme));
    memset(label, 0, sizeof(*label));
    *decode = 0;
    if (op->pad == KEYX_RSA_PAD_TLS) {
        KEYX_ERR(p, KEYX_R_UNSUPPORTED,
                 "tpm: TLS RSA key exchange padding (PKCS#1 v1.5 with implicit rejection) is "
                 "not offered for TPM keys; use RSA-OAEP or RSASVE");
        return 0;
    }
    if (op->pad == KEYX_RSA_PAD_RAW) {
        if (fixed) {
            KEYX_ERR(p, KEYX_R_KEY_USAGE,
                     "tpm: this TPM key is bound to RSA-OAEP with %s (its own scheme), so it has "
                     "no raw RSA decryption (RSASVE); use RSA-OAEP with %s, or a key made "
                     "without a scheme (tpm2_create -G rsa2048:null:null)",
                     hash_name(k->scheme_hash), hash_name(k->scheme_hash));
            return 0;
        }
        scheme->scheme = TPM2_ALG_NULL;
        return 1;
    }
    if (!fixed &&
        (h == TPM2_ALG_NULL || !tpm_dev_has_alg(d, h) || tpm_hash(mgf1) != h || !zero_label)) {
        scheme->scheme = TPM2_ALG_NULL;
        *decode = 1;
        return 1;
    }
    scheme->scheme = TPM2_ALG_OAEP;
    scheme->details.oaep.hashAlg = h;
    if (h == TPM2_ALG_NULL) {
        KEYX_ERR(p, KEYX_R_KEY_USAGE,
                 "tpm: RSA-OAEP with %s is not offered by this TPM key: it is bound to "
                 "RSA-OAEP with %s (its own scheme)",
                 md, hash_name(k->scheme_hash));
        return 0;
    }
    if (fixed && h != k->scheme_hash) {
        KEYX_ERR(p, KEYX_R_KEY_USAGE,
                 "tpm: this TPM key is bound to RSA-OAEP with %s (its own scheme); it cannot "
                 "decrypt RSA-OAEP with %s (set rsa_oaep_md to %s, or use a key made without a "
                 "scheme: tpm2_create -G rsa2048:null:null)",
                 hash_name(k->scheme_hash), md, hash_name(k->scheme_hash));
        return 0;
    }
    if (tpm_hash(mgf1) != h) {
        KEYX_ERR(p, KEYX_R_UNSUPPORTED,
                 "tpm: RSA-OAEP with %s and MGF1-%s cannot run in a TPM: TPM2_RSA_Decrypt "
                 "always uses the OAEP digest for MGF1 (set rsa_mgf1_md to %s; a key made "
                 "without a scheme of its own takes any MGF1 digest)",
                 md, mgf1, md);
        return 0;
    }
    if (op->labellen > 0) {
        /* TPM 2.0 Part 3, TPM2_RSA_Decrypt: a label must end with a zero byte, which is part of
         * the label OAEP hashes (TPM_RC_VALUE otherwise); nothing is appended. */
        if (!zero_label) {
            KEYX_ERR(p, KEYX_R_UNSUPPORTED,
                     "tpm: this RSA-OAEP label (%zu bytes) cannot be given to a TPM: "
                     "TPM2_RSA_Decrypt takes only labels that end with a zero byte (a C string "
                     "with its terminator), at most %zu bytes (a key made without a scheme of "
                     "its own takes any label)",
                     op->labellen, sizeof(label->buffer));
            return 0;
        }
        memcpy(label->buffer, op->label, op->labellen);
        label->size = (UINT16)op->labellen;
    }
    return 1;
}

static int rsa_decrypt_once(tpm_dev *d, tpm_key *k, const TPMT_RSA_DECRYPT *scheme,
                            const TPM2B_DATA *label, const TPM2B_PUBLIC_KEY_RSA *ct,
                            unsigned char *out, size_t *outlen, int fixed)
{
    TPM2B_PUBLIC_KEY_RSA msg = {0};
    ESYS_CONTEXT *ctx;
    ESYS_TR tr;
    TSS2_RC rc;
    int r;

    if ((r = tpm_begin(d, &ctx)) != 1)
        return r;
    if ((r = tpm_obj_ready(d, &k->obj, &tr)) != 1) {
        tpm_end(d);
        return r;
    }
    TPM_CALL(d, &k->obj, rc, tpm_rsa_decrypt(d, &k->obj, tr, ct, scheme, label, &msg));
    if (rc != TSS2_RC_SUCCESS) {
        if ((rc & TSS2_RC_LAYER_MASK) == TSS2_TPM_RC_LAYER &&
            (tpm_rc_is(rc, TPM2_RC_VALUE) || tpm_rc_is(rc, TPM2_RC_SIZE) ||
             rc == TPM2_RC_FAILURE)) {
            /* Bad padding, wrong label, a value not below the modulus: the ciphertext's fault.
             * (libtpms answers a failed OpenSSL decryption with TPM_RC_FAILURE.) */
            r = KEYX_RSA_DECRYPT_ERROR;
        } else {
            r = tpm_fail(d, rc, "RSA decryption (RSA_Decrypt)");
        }
        tpm_end(d);
        OPENSSL_cleanse(&msg, sizeof(msg));
        return r;
    }
    tpm_end(d);
    if (msg.size > *outlen || (fixed && msg.size > k->nlen)) {
        r = KEYX_RSA_DECRYPT_ERROR;
    } else if (fixed) { /* raw: keep the leading zeros of the modulus-size value */
        memset(out, 0, k->nlen - msg.size);
        memcpy(out + k->nlen - msg.size, msg.buffer, msg.size);
        *outlen = k->nlen;
        r = 1;
    } else {
        memcpy(out, msg.buffer, msg.size);
        *outlen = msg.size;
        r = 1;
    }
    OPENSSL_cleanse(&msg, sizeof(msg));
    return r;
}

/* rsa_decrypt_once, once more on a new connection when the TPM restarted meanwhile. */
static int rsa_decrypt_retry(tpm_dev *d, tpm_key *k, const TPMT_RSA_DECRYPT *scheme,
                             const TPM2B_DATA *label, const TPM2B_PUBLIC_KEY_RSA *ct,
                             unsigned char *out, size_t *outlen, int fixed)
{
    size_t cap = *outlen;
    int r;

    if (k->file != NULL && (r = file_key_refresh(d, k)) != 1)
        return r;
    ERR_set_mark();
    r = rsa_decrypt_once(d, k, scheme, label, ct, out, outlen, fixed);
    if (r == KEYX_BACKEND_DOWN && (k->obj.persistent != 0 || k->file != NULL) &&
        tpm_dev_take_reset(d)) {
        ERR_pop_to_mark();
        if (k->file != NULL && (r = file_key_refresh(d, k)) != 1)
            return r;
        *outlen = cap;
        return rsa_decrypt_once(d, k, scheme, label, ct, out, outlen, fixed);
    }
    ERR_clear_last_mark();
    return r;
}

/* OAEP the TPM cannot do for a key without a scheme: TPM2_RSA_Decrypt with the null scheme,
 * then OpenSSL's constant-time OAEP decoding in keyx's library context. The raw value exists
 * only in em, wiped before it is freed; every decoding failure is the same
 * KEYX_RSA_DECRYPT_ERROR. */
static int rsa_decrypt_decode(tpm_dev *d, tpm_key *k, const keyx_rsa_op *op,
                              const TPMT_RSA_DECRYPT *scheme, const TPM2B_DATA *label,
                              const TPM2B_PUBLIC_KEY_RSA *ct, unsigned char *out, size_t *outlen)
{
    keyx_provctx *p = tpm_dev_prov(d);
    const char *md = op->md != NULL ? op->md : "SHA1";
    const char *mgf1 = op->mgf1_md != NULL ? op->mgf1_md : md;
    size_t emlen = k->nlen;
    unsigned char *em = OPENSSL_malloc(k->nlen);
    int r;

    if (em == NULL) {
        KEYX_ERR(p, KEYX_R_INTERNAL, "out of memory");
        return 0;
    }
    r = rsa_decrypt_retry(d, k, scheme, label, ct, em, &emlen, 1);
    if (r == 1) {
        r = keyx_oaep_decode(p->libctx, em, k->nlen, md, mgf1, op->label, op->labellen, out,
                             outlen);
        if (r == -1)
            KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT, "tpm: unknown OAEP digest %s or %s", md, mgf1);
        r = r == 1 ? 1 : r == 0 ? KEYX_RSA_DECRYPT_ERROR : 0;
    }
    OPENSSL_clear_free(em, k->nlen);
    return r;
}

static int tpm2_rsa_decrypt(void *state, void *handle, const keyx_rsa_op *op,
                            const unsigned char *in, size_t inlen, unsigned char *out,
                            size_t *outlen)
{
    tpm_dev *d = state;
    tpm_key *k = handle;
    keyx_provctx *p = tpm_dev_prov(d);
    TPMT_RSA_DECRYPT scheme;
    TPM2B_DATA label;
    TPM2B_PUBLIC_KEY_RSA ct = {0};
    int r, decode;

    if ((r = key_settle(d, k)) != 1)
        return r;
    if (k->nlen == 0) {
        KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT, "tpm: an EC key does not decrypt");
        return 0;
    }
    if (k->no_decrypt) {
        KEYX_ERR(p, KEYX_R_KEY_USAGE,
                 "tpm: this TPM key cannot decrypt (RSA_Decrypt): its attributes make it no "
                 "unrestricted decrypt key without a signing scheme (a signing-only or storage "
                 "key)");
        return 0;
    }
    /* Parameters first: the same answer for every ciphertext. */
    if (!rsa_params(d, k, op, &scheme, &label, &decode))
        return 0;
    if (*outlen < k->nlen) {
        KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT, "tpm: RSA output buffer smaller than the modulus");
        return 0;
    }
    if (inlen > k->nlen || k->nlen > sizeof(ct.buffer))
        return KEYX_RSA_DECRYPT_ERROR;
    /* The TPM takes exactly a modulus-size ciphertext: a shorter one is the same number
     * without its leading zeros. */
    memcpy(ct.buffer + k->nlen - inlen, in, inlen);
    ct.size = (UINT16)k->nlen;
    if (decode)
        return rsa_decrypt_decode(d, k, op, &scheme, &label, &ct, out, outlen);
    return rsa_decrypt_retry(d, k, &scheme, &label, &ct, out, outlen, op->pad == KEYX_RSA_PAD_RAW);
}

/* ---- signatures: one TPM2_Sign -------------------------------------------------------------- */

static size_t hash_size(TPMI_ALG_HASH h)
{
    return h == TPM2_ALG_SHA1     ? 20
           : h == TPM2_ALG_SHA256 ? 32
           : h == TPM2_ALG_SHA384 ? 48
           : h == TPM2_ALG_SHA512 ? 64
                                  : 0;
}

/* The salt TPM2_Sign uses for RSASSA-PSS with a digest of hlen bytes and a modulus of nlen bytes:
 * the digest's length (TPM 2.0 Part 1, B.7, as FIPS 186-4 limits it; libtpms 0.9 / swtpm 0.7
 * measured by tests/test_tpm_sign.py: the signatures verify with rsa_pss_saltlen:digest), or
 * the most that fits when the modulus is too small for that. */
static int tpm_pss_salt(size_t hlen, size_t nlen)
{
    size_t max = nlen >= hlen + 2 ? nlen - hlen - 2 : 0;

    return (int)(hlen < max ? hlen : max);
}

static const char *scheme_name(TPMI_ALG_SIG_SCHEME s)
{
    return s == TPM2_ALG_ECDSA       ? "ECDSA"
           : s == TPM2_ALG_RSASSA    ? "RSASSA (PKCS#1 v1.5)"
           : s == TPM2_ALG_RSAPSS    ? "RSASSA-PSS"
           : s == TPM2_ALG_ECDAA     ? "ECDAA"
           : s == TPM2_ALG_SM2       ? "SM2"
           : s == TPM2_ALG_ECSCHNORR ? "EC-Schnorr"
                                     : "another scheme";
}

/* The TPM scheme for op, or 0 with an error: from the key's attributes and the TPM's algorithm
 * list cached at connect time, no TPM command. */
static int sign_scheme(tpm_dev *d, const tpm_key *k, const keyx_sign_op *op, TPMT_SIG_SCHEME *out)
{
    keyx_provctx *p = tpm_dev_prov(d);
    TPMI_ALG_HASH h = op->md != NULL ? tpm_hash(op->md) : TPM2_ALG_NULL;
    TPMI_ALG_SIG_SCHEME want;

    memset(out, 0, sizeof(*out));
    if (k->sign == 0) {
        KEYX_ERR(p, KEYX_R_KEY_USAGE,
                 "tpm: this TPM key cannot sign: it has no sign attribute (ephemeral key-agreement "
                 "and decryption keys never sign); make a certificate key with openssl genpkey "
                 "-pkeyopt keyx-persist:0x81xxxxxx, or tpm2_create -a "
                 "'sign|fixedtpm|fixedparent|sensitivedataorigin|userwithauth'");
        return 0;
    }
    if (k->sign < 0) {
        KEYX_ERR(p, KEYX_R_KEY_USAGE,
                 "tpm: this TPM key is a restricted signing key: it signs only data the TPM made "
                 "itself (quotes, certifications), not application digests; use an unrestricted "
                 "signing key");
        return 0;
    }
    if (k->curve != NULL) {
        if (op->scheme != KEYX_SIG_ECDSA) {
            KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT, "tpm: an EC key signs with ECDSA only");
            return 0;
        }
        want = TPM2_ALG_ECDSA;
    } else if (op->scheme == KEYX_SIG_RSA_PKCS1) {
        want = TPM2_ALG_RSASSA;
    } else if (op->scheme == KEYX_SIG_RSA_PSS) {
        want = TPM2_ALG_RSAPSS;
    } else {
        KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT,
                 "tpm: an RSA key signs with PKCS#1 v1.5 or PSS padding, not ECDSA");
        return 0;
    }
    if (h == TPM2_ALG_NULL || !tpm_dev_has_alg(d, h)) {
        KEYX_ERR(p, KEYX_R_DIGEST_UNSUPPORTED,
                 "tpm: this TPM does not sign %s digests: it lists %s%s%s%s (TPM2_CAP_ALGS); "
                 "choose one of those (e.g. -sha256)",
                 op->md != NULL ? op->md : "(no digest)",
                 tpm_dev_has_alg(d, TPM2_ALG_SHA1) ? "SHA1 " : "",
                 tpm_dev_has_alg(d, TPM2_ALG_SHA256) ? "SHA256 " : "",
                 tpm_dev_has_alg(d, TPM2_ALG_SHA384) ? "SHA384 " : "",
                 tpm_dev_has_alg(d, TPM2_ALG_SHA512) ? "SHA512" : "");
        return 0;
    }
    if (!tpm_dev_has_alg(d, want)) {
        KEYX_ERR(p, KEYX_R_UNSUPPORTED,
                 "tpm: this TPM does not offer %s signatures (not in TPM2_CAP_ALGS)%s",
                 scheme_name(want), want == TPM2_ALG_RSAPSS ? ": use PKCS#1 v1.5 padding" : "");
        return 0;
    }
    if (k->scheme != TPM2_ALG_NULL && (k->scheme != want || k->scheme_hash != h)) {
        KEYX_ERR(p, KEYX_R_KEY_USAGE,
                 "tpm: this TPM key is bound to %s with hash 0x%04X (its own scheme); it cannot "
                 "sign %s with %s",
                 scheme_name(k->scheme), (unsigned)k->scheme_hash, scheme_name(want), op->md);
        return 0;
    }
    if (want == TPM2_ALG_RSAPSS) {
        int salt = tpm_pss_salt(hash_size(h), k->nlen);

        if (op->mgf1_md == NULL || tpm_hash(op->mgf1_md) != h) {
            KEYX_ERR(p, KEYX_R_UNSUPPORTED,
                     "tpm: RSA-PSS with %s and MGF1-%s cannot run in a TPM: TPM2_Sign always uses "
                     "the message digest for MGF1 (set rsa_mgf1_md to %s)",
                     op->md, op->mgf1_md != NULL ? op->mgf1_md : "?", op->md);
            return 0;
        }
        /* An "auto" salt (PSS's default, which libssl replaces right after choosing PSS) is
         * checked as the digest length and resolved to the maximum at the signature, where
         * this refuses it before any TPM command. */
        if (op->saltlen != salt) {
            KEYX_ERR(p, KEYX_R_UNSUPPORTED,
                     "tpm: RSA-PSS with a %d-byte salt cannot run in a TPM: TPM2_Sign chooses the "
                     "salt itself and uses %d bytes (the %s length) with this key; set "
                     "rsa_pss_saltlen:digest (or %d); 'max' and 'auto' are refused for TPM keys",
                     op->saltlen, salt, op->md, salt);
            return 0;
        }
    }
    out->scheme = want;
    out->details.any.hashAlg = h;
    return 1;
}

static int tpm2_sign_check(void *state, void *handle, const keyx_sign_op *op)
{
    TPMT_SIG_SCHEME scheme;

    /* A key from a reference file is checked first: its attributes decide the schemes. */
    if (key_settle(state, handle) != 1)
        return 0;
    return sign_scheme(state, handle, op, &scheme);
}

/* r || s (ECDSA) or the signature (RSA), left-padded to the order or modulus size. */
static int sig_out(keyx_provctx *p, const tpm_key *k, const TPMT_SIGNATURE *ts, unsigned char *sig,
                   size_t *siglen)
{
    if (k->curve != NULL) {
        const TPM2B_ECC_PARAMETER *r = &ts->signature.ecdsa.signatureR;
        const TPM2B_ECC_PARAMETER *sv = &ts->signature.ecdsa.signatureS;
        size_t n = k->curve->field;

        if (ts->sigAlg != TPM2_ALG_ECDSA || r->size > n || sv->size > n) {
            KEYX_ERR(p, KEYX_R_BACKEND_FAILURE, "tpm: TPM2_Sign returned a malformed signature");
            return 0;
        }
        if (*siglen < 2 * n) {
            KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT, "tpm: ECDSA signature buffer too small");
            return 0;
        }
        memset(sig, 0, 2 * n);
        memcpy(sig + n - r->size, r->buffer, r->size);
        memcpy(sig + 2 * n - sv->size, sv->buffer, sv->size);
        *siglen = 2 * n;
        return 1;
    } else {
        const TPM2B_PUBLIC_KEY_RSA *rs = &ts->signature.rsassa.sig; /* same layout for PSS */

        if ((ts->sigAlg != TPM2_ALG_RSASSA && ts->sigAlg != TPM2_ALG_RSAPSS) ||
            rs->size > k->nlen) {
            KEYX_ERR(p, KEYX_R_BACKEND_FAILURE, "tpm: TPM2_Sign returned a malformed signature");
            return 0;
        }
        if (*siglen < k->nlen) {
            KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT, "tpm: RSA signature buffer too small");
            return 0;
        }
        memset(sig, 0, k->nlen - rs->size);
        memcpy(sig + k->nlen - rs->size, rs->buffer, rs->size);
        *siglen = k->nlen;
        return 1;
    }
}

static int sign_once(tpm_dev *d, tpm_key *k, const TPMT_SIG_SCHEME *scheme,
                     const TPM2B_DIGEST *digest, unsigned char *sig, size_t *siglen)
{
    TPMT_SIGNATURE ts;
    ESYS_CONTEXT *ctx;
    ESYS_TR tr;
    TSS2_RC rc;
    int r;

    memset(&ts, 0, sizeof(ts));
    if ((r = tpm_begin(d, &ctx)) != 1)
        return r;
    if ((r = tpm_obj_ready(d, &k->obj, &tr)) != 1) {
        tpm_end(d);
        return r;
    }
    TPM_CALL(d, &k->obj, rc, tpm_sign(d, &k->obj, tr, digest, scheme, &ts));
    if (rc != TSS2_RC_SUCCESS) {
        if ((rc & TSS2_RC_LAYER_MASK) == TSS2_TPM_RC_LAYER &&
            (tpm_rc_is(rc, TPM2_RC_SCHEME) || tpm_rc_is(rc, TPM2_RC_HASH) ||
             tpm_rc_is(rc, TPM2_RC_KEY) || tpm_rc_is(rc, TPM2_RC_ATTRIBUTES) ||
             tpm_rc_is(rc, TPM2_RC_SIZE) || tpm_rc_is(rc, TPM2_RC_VALUE))) {
            KEYX_ERR(tpm_dev_prov(d), KEYX_R_UNSUPPORTED,
                     "tpm: the TPM refused to sign with this key under %s: %s",
                     scheme_name(scheme->scheme), Tss2_RC_Decode(rc));
            r = 0;
        } else {
            r = tpm_fail(d, rc, "signing (Sign)");
        }
        tpm_end(d);
        return r;
    }
    tpm_end(d);
    return sig_out(tpm_dev_prov(d), k, &ts, sig, siglen);
}

static int tpm2_sign(void *state, void *handle, const keyx_sign_op *op, const unsigned char *dgst,
                     size_t dlen, unsigned char *sig, size_t *siglen)
{
    tpm_dev *d = state;
    tpm_key *k = handle;
    TPMT_SIG_SCHEME scheme;
    TPM2B_DIGEST digest = {0};
    int r;

    if ((r = key_settle(d, k)) != 1)
        return r;
    if (!sign_scheme(d, k, op, &scheme))
        return 0;
    if (dlen != hash_size(scheme.details.any.hashAlg)) {
        KEYX_ERR(tpm_dev_prov(d), KEYX_R_INVALID_ARGUMENT,
                 "tpm: the data to sign is not a %s "
                 "digest (%zu bytes)",
                 op->md, dlen);
        return 0;
    }
    memcpy(digest.buffer, dgst, dlen);
    digest.size = (UINT16)dlen;
    if (k->file != NULL && (r = file_key_refresh(d, k)) != 1)
        return r;
    ERR_set_mark();
    r = sign_once(d, k, &scheme, &digest, sig, siglen);
    /* A persistent key survives a TPM restart (found again on a new connection); a TSS2 file
     * key is loaded again. */
    if (r == KEYX_BACKEND_DOWN && (k->obj.persistent != 0 || k->file != NULL) &&
        tpm_dev_take_reset(d)) {
        ERR_pop_to_mark();
        if (k->file != NULL && (r = file_key_refresh(d, k)) != 1)
            return r;
        return sign_once(d, k, &scheme, &digest, sig, siglen);
    }
    ERR_clear_last_mark();
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
    OPENSSL_clear_free(k->file, k->file != NULL ? sizeof(*k->file) : 0);
    EVP_PKEY_free(k->expect);
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
    .load_deferred = tpm2_load_deferred,
    .locator = tpm2_locator,
    .load_encoded = tpm2_load_encoded,
    .derive = tpm2_derive,
    .free = tpm2_free,
    .rsa_decrypt = tpm2_rsa_decrypt,
    .sign_check = tpm2_sign_check,
    .sign = tpm2_sign,
    .describe = tpm2_describe,
};
