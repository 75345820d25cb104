/* The pkcs11 backend: key pairs and shared secrets inside a PKCS#11 token.
 * Ephemeral keys are session objects (never token objects) that cannot leave the token; derived
 * secrets are session objects read once and destroyed. Static keys are token objects found by
 * RFC 7512 URI and used by reference. backend/pkcs11_device.c owns the module and sessions. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include "backend/backend.h"
#include "backend/pool.h"
#include "backend/pkcs11_attr.h"
#include "backend/pkcs11_device.h"
#include "backend/pkcs11_objects.h"
#include "backend/pkcs11_pubkey.h"
#include "backend/pkcs11_rsa.h"
#include "backend/pkcs11_sign.h"
#include "backend/watchdog.h"
#include "provider/errors.h"
#include "provider/provctx.h"

typedef struct p11_key {
    keyx_alg alg;
    int tok;              /* token index in the device */
    uint64_t gen;         /* module generation the handle belongs to */
    CK_OBJECT_HANDLE obj; /* the private key */
    int owned;            /* a session object keyx created: destroyed when freed */
    int nameless;         /* a token key with neither CKA_ID nor CKA_LABEL: no locator */
    size_t secretlen;     /* EC field size or |p|; RSA: modulus bytes */
    size_t bits;          /* RSA: modulus bits (PSS salt limits) */
    /* What the token lets the key do, known when it is made or loaded (no Cryptoki call per
     * operation): derive (EC, DH) or decrypt (RSA), and sign (CKA_SIGN: token keys made with
     * keyx-label/keyx-id, or found by URI with it; never ephemeral or imported keys). */
    int can_use;
    int can_sign;
    char *uri; /* token keys: the canonical URI (the locator; finds the key again after a fork) */
    /* Keys loaded by URI: that URI and the public key, to find the same key on another token
     * of the failover set when its own is down (key_elsewhere). */
    char *asked;
    EVP_PKEY *pub;
    /* EC keys keyx generated: the uncompressed point, which keyx takes instead of a view
     * (p11_public_raw); pointlen 0 for other keys */
    unsigned char point[1 + 2 * 66];
    size_t pointlen;
} p11_key;

/* Guards where a static key is (tok, gen, obj, uri): it moves after a fork and when its token
 * fails, while other threads may use it. */
static pthread_mutex_t key_moves = PTHREAD_MUTEX_INITIALIZER;

/* The part of a URI that can be printed: RFC 7512 puts pin-value in the query. */
static int printable_len(const char *uri)
{
    size_t n = strcspn(uri, "?");

    return n > 200 ? 200 : (int)n;
}

/* ---- open / close / supports ------------------------------------------------------------ */

static const keyx_pool_ops p11_pool_ops;

static int p11_open(keyx_provctx *p, void **state)
{
    int r = p11_dev_new(p, (p11_dev **)state);

    /* `pkcs11-pool`: the pool exists from now on, its refill thread only from the first
     * ephemeral key generated inline (pool.h). */
    if (r == 1 && p->cfg.pkcs11_pool > 0 &&
        keyx_pool_new(p, "pkcs11", p->cfg.pkcs11_pool, &p11_pool_ops, *state) == NULL) {
        p11_dev_free(*state);
        *state = NULL;
        KEYX_ERR(p, KEYX_R_INTERNAL, "pkcs11: out of memory for the key pool (pkcs11-pool)");
        return 0;
    }
    if (r == 1)
        keyx_watchdog_hold(); /* pkcs11-timeout (p11_call_limit_ms) */
    return r;
}

static void p11_close(void *state)
{
    /* The refill thread stops first, then the pooled session objects are destroyed, then the
     * device goes. */
    keyx_pool_free(keyx_pool_of(state));
    p11_dev_free(state);
    keyx_watchdog_release();
}

/* A module that reaches its token over a socket blocks for as long as the server does not
 * answer: keyx's watchdog cuts that socket after pkcs11-timeout (the module then answers
 * CKR_DEVICE_ERROR, the token is marked down and the next one serves). A module working in the
 * process (SoftHSM) has nothing to cut: no limit, and no watchdog thread. */
static unsigned int p11_call_limit_ms(void *state)
{
    return p11_dev_over_socket(state) ? p11_dev_prov(state)->cfg.pkcs11_timeout_ms : 0;
}

static void p11_describe(void *state, char *buf, size_t len)
{
    p11_dev_describe(state, buf, len);
}

static int p11_supports(void *state, const keyx_keyspec *spec)
{
    p11_caps caps;
    size_t bits;

    if (spec->alg != KEYX_ALG_EC && !keyx_alg_is_dh(spec->alg) && spec->alg != KEYX_ALG_RSA)
        return 0; /* X25519/X448: SoftHSM-class tokens lack Montgomery keygen */
    if (!p11_dev_caps(state, &caps))
        /* Unreachable now: claim what keyx can do in a token, so that generation runs into
         * the real error (or fails over) instead of a misleading "unsupported". */
        return spec->alg == KEYX_ALG_EC ? p11_ec_field_bytes(spec->group) != 0
               : spec->alg == KEYX_ALG_RSA
                   ? spec->bits == 2048 || spec->bits == 3072 || spec->bits == 4096
                   : 1;
    if (spec->alg == KEYX_ALG_RSA)
        return p11_rsa_supports(&caps, spec->bits);
    if (spec->alg == KEYX_ALG_EC) {
        bits = spec->group != NULL && strcmp(spec->group, "P-521") == 0
                   ? 521
                   : 8 * p11_ec_field_bytes(spec->group);
        return caps.ec && bits != 0 && (caps.ec_max == 0 || bits <= caps.ec_max) &&
               bits >= caps.ec_min;
    }
    return caps.dh && (spec->bits == 0 || caps.dh_max == 0 ||
                       (spec->bits >= caps.dh_min && spec->bits <= caps.dh_max));
}

/* ---- key objects ------------------------------------------------------------------------- */

static p11_key *key_new(keyx_provctx *p, keyx_alg alg, const p11_sess *s, CK_OBJECT_HANDLE obj,
                        int owned, size_t secretlen)
{
    p11_key *k = OPENSSL_zalloc(sizeof(*k));

    if (k == NULL) {
        KEYX_ERR(p, KEYX_R_INTERNAL, "out of memory");
        return NULL;
    }
    k->alg = alg;
    k->tok = s->tok;
    k->gen = s->gen;
    k->obj = obj;
    k->owned = owned;
    if (owned)
        p11_dev_objects(s->dev, s->gen, 1);
    k->secretlen = secretlen;
    k->can_use = 1;
    return k;
}

static int bn_bytes(const EVP_PKEY *pk, const char *name, unsigned char **out, size_t *len)
{
    BIGNUM *bn = NULL;
    int ok = EVP_PKEY_get_bn_param(pk, name, &bn) == 1 &&
             (*out = OPENSSL_malloc((size_t)BN_num_bytes(bn) + 1)) != NULL;

    if (ok)
        *len = (size_t)BN_bn2bin(bn, *out);
    BN_clear_free(bn);
    return ok;
}

/* ---- generate ---------------------------------------------------------------------------- */

/* An EC key pair; *pub stays NULL: keyx makes the view from the point (out, *outlen) when it
 * needs one, which a TLS key share never does. */
static int gen_ec(p11_dev *d, p11_sess *s, const keyx_keyspec *spec, const p11_name *name,
                  CK_OBJECT_HANDLE *priv, unsigned char *out, size_t *outlen)
{
    keyx_provctx *p = p11_dev_prov(d);
    size_t plen = 0, ptlen = 0;
    const unsigned char *params = p11_ec_params(spec->group, &plen);
    CK_MECHANISM mech = {CKM_EC_KEY_PAIR_GEN, NULL, 0};
    CK_OBJECT_HANDLE pubobj = CK_INVALID_HANDLE;
    unsigned char *point = NULL;
    p11_tmpl pubt, privt;
    CK_RV rv;

    if (params == NULL) {
        p11_session_put(s, CKR_OK);
        KEYX_ERR(p, KEYX_R_UNSUPPORTED, "pkcs11: curve %s is not served by keyx's pkcs11 backend",
                 spec->group != NULL ? spec->group : "(explicit)");
        return 0;
    }
    /* Ephemeral: a session object usable only for derivation, never readable or extractable.
     * Named: token objects, for derivation and signing. */
    p11_tmpl_pair(&pubt, &privt, name, 0, CKA_DERIVE, 1);
    p11_tmpl_add(&pubt, CKA_EC_PARAMS, params, plen);
    rv = s->f->C_GenerateKeyPair(s->h, &mech, pubt.a, pubt.n, privt.a, privt.n, &pubobj, priv);
    if (rv != CKR_OK) {
        p11_session_put(s, rv);
        return p11_fail(s, rv, "EC key generation (C_GenerateKeyPair)");
    }
    /* The public point is read once and kept in keyx; an ephemeral key's public object goes
     * now, a token key's stays beside its private key. */
    /* DER OCTET STRING of an uncompressed point: 04 X Y plus at most 3 header bytes */
    rv = p11_get_attr(s, pubobj, CKA_EC_POINT, 2 * p11_ec_field_bytes(spec->group) + 4, &point,
                      &ptlen);
    if (rv == CKR_OK && (*outlen = p11_ec_point(spec->group, point, ptlen, out)) == 0)
        rv = CKR_ATTRIBUTE_VALUE_INVALID;
    OPENSSL_free(point);
    if (name == NULL || rv != CKR_OK)
        s->f->C_DestroyObject(s->h, pubobj);
    if (rv != CKR_OK) {
        s->f->C_DestroyObject(s->h, *priv);
        p11_session_put(s, rv);
        return p11_fail(s, rv, "reading the generated EC public key");
    }
    p11_session_put(s, CKR_OK);
    return 1;
}

static int gen_dh(p11_dev *d, p11_sess *s, const keyx_keyspec *spec, const p11_name *name,
                  CK_OBJECT_HANDLE *priv, EVP_PKEY **pub)
{
    keyx_provctx *p = p11_dev_prov(d);
    unsigned char *prime = NULL, *base = NULL, *y = NULL;
    size_t plen = 0, glen = 0, ylen = 0;
    CK_MECHANISM mech = {CKM_DH_PKCS_KEY_PAIR_GEN, NULL, 0};
    CK_OBJECT_HANDLE pubobj = CK_INVALID_HANDLE;
    p11_tmpl pubt, privt;
    CK_RV rv = CKR_HOST_MEMORY;

    if (spec->domain == NULL || !bn_bytes(spec->domain, OSSL_PKEY_PARAM_FFC_P, &prime, &plen) ||
        !bn_bytes(spec->domain, OSSL_PKEY_PARAM_FFC_G, &base, &glen)) {
        OPENSSL_free(prime);
        p11_session_put(s, CKR_OK);
        KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT, "pkcs11: DH key generation needs p and g");
        return 0;
    }
    p11_tmpl_pair(&pubt, &privt, name, 0, CKA_DERIVE, 0);
    p11_tmpl_add(&pubt, CKA_PRIME, prime, plen);
    p11_tmpl_add(&pubt, CKA_BASE, base, glen);
    rv = s->f->C_GenerateKeyPair(s->h, &mech, pubt.a, pubt.n, privt.a, privt.n, &pubobj, priv);
    OPENSSL_free(prime);
    OPENSSL_free(base);
    if (rv != CKR_OK) {
        p11_session_put(s, rv);
        return p11_fail(s, rv, "DH key generation (C_GenerateKeyPair)");
    }
    rv = p11_get_attr(s, pubobj, CKA_VALUE, plen, &y, &ylen);
    if (rv == CKR_OK && (*pub = p11_dh_public(p->libctx, spec->domain, y, ylen)) == NULL)
        rv = CKR_ATTRIBUTE_VALUE_INVALID;
    OPENSSL_free(y);
    if (name == NULL || rv != CKR_OK)
        s->f->C_DestroyObject(s->h, pubobj);
    if (rv != CKR_OK) {
        s->f->C_DestroyObject(s->h, *priv);
        p11_session_put(s, rv);
        return p11_fail(s, rv, "reading the generated DH public key");
    }
    p11_session_put(s, CKR_OK);
    return 1;
}

/* ---- token keys: names and locators ------------------------------------------------------ */

/* "a1b2" for messages (ids are not secret). */
static void hex_id(const unsigned char *id, size_t len, char *out, size_t cap)
{
    size_t i;

    for (i = 0; i < len && 2 * i + 3 <= cap; i++)
        snprintf(out + 2 * i, 3, "%02x", id[i]);
    out[2 * i] = '\0';
}

/* The canonical locator of a private key on token tok: the token's label and serial, the key's
 * CKA_ID and CKA_LABEL (RFC 7512, percent-encoded by p11-kit), type=private. Never a PIN or a
 * module path. OPENSSL_malloc'ed; NULL + error. */
static char *make_locator(p11_dev *d, int tok, const unsigned char *id, size_t idlen,
                          const char *label, size_t labellen)
{
    keyx_provctx *p = p11_dev_prov(d);
    char tlabel[33], serial[17], *text = NULL, *out = NULL;
    CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
    P11KitUri *u;
    CK_TOKEN_INFO *ti;
    CK_ATTRIBUTE a;

    if (!p11_dev_token_name(d, tok, tlabel, serial) || (u = p11_kit_uri_new()) == NULL) {
        KEYX_ERR(p, KEYX_R_INTERNAL, "pkcs11: the key's token is unknown");
        return NULL;
    }
    ti = p11_kit_uri_get_token_info(u);
    memset(ti->label, ' ', sizeof(ti->label));
    memcpy(ti->label, tlabel, strlen(tlabel));
    if (serial[0] != '\0') {
        memset(ti->serialNumber, ' ', sizeof(ti->serialNumber));
        memcpy(ti->serialNumber, serial, strlen(serial));
    }
    a = (CK_ATTRIBUTE)ATTR(CKA_CLASS, &cls, sizeof(cls));
    p11_kit_uri_set_attribute(u, &a);
    if (idlen > 0) {
        a = (CK_ATTRIBUTE)ATTR(CKA_ID, id, idlen);
        p11_kit_uri_set_attribute(u, &a);
    }
    if (labellen > 0) {
        a = (CK_ATTRIBUTE)ATTR(CKA_LABEL, label, labellen);
        p11_kit_uri_set_attribute(u, &a);
    }
    if (p11_kit_uri_format(u, P11_KIT_URI_FOR_OBJECT_ON_TOKEN, &text) == P11_KIT_URI_OK)
        out = OPENSSL_strdup(text);
    free(text);
    p11_kit_uri_free(u);
    if (out == NULL)
        KEYX_ERR(p, KEYX_R_INTERNAL, "pkcs11: cannot write the key's URI");
    return out;
}

/* The locator of object obj (CKA_ID and CKA_LABEL read from it); NULL without an error when the
 * object has neither, since no URI can then tell it from the token's other keys. */
static char *object_locator(p11_sess *s, CK_OBJECT_HANDLE obj, int *nameless)
{
    unsigned char *id = NULL, *label = NULL;
    size_t idlen = 0, labellen = 0;
    char *out = NULL;

    if (p11_get_attr(s, obj, CKA_ID, 0, &id, &idlen) != CKR_OK)
        idlen = 0;
    if (p11_get_attr(s, obj, CKA_LABEL, 0, &label, &labellen) != CKR_OK)
        labellen = 0;
    *nameless = idlen == 0 && labellen == 0;
    if (!*nameless)
        out = make_locator(s->dev, s->tok, id, idlen, (const char *)label, labellen);
    OPENSSL_free(id);
    OPENSSL_free(label);
    return out;
}

/* Whether a key object (private or public) with attribute a exists on the session's token. */
static CK_RV key_exists(p11_sess *s, CK_ATTRIBUTE a, int *found)
{
    static const CK_OBJECT_CLASS classes[] = {CKO_PRIVATE_KEY, CKO_PUBLIC_KEY};
    CK_OBJECT_HANDLE obj;
    CK_ULONG count = 0;
    CK_RV rv = CKR_OK;

    *found = 0;
    for (size_t i = 0; i < 2 && rv == CKR_OK && !*found; i++) {
        CK_ATTRIBUTE t[] = {ATTR(CKA_CLASS, &classes[i], sizeof(CK_OBJECT_CLASS)), a};

        if ((rv = s->f->C_FindObjectsInit(s->h, t, 2)) != CKR_OK)
            break;
        rv = s->f->C_FindObjects(s->h, &obj, 1, &count);
        s->f->C_FindObjectsFinal(s->h);
        *found = rv == CKR_OK && count > 0;
    }
    return rv;
}

/* The name of a new token key: persist's label and id, or a fresh random 8-byte id. Refused
 * (session given back, 0 + error) when a key with that label or id is on the token already:
 * keyx never makes two keys one URI cannot tell apart. */
static int new_name(p11_sess *s, const keyx_keyspec *spec, p11_name *name)
{
    keyx_provctx *p = p11_dev_prov(s->dev);
    const keyx_persist *persist = spec->persist;
    char idhex[2 * sizeof(name->id) + 1];
    int found = 0;
    CK_RV rv;

    memset(name, 0, sizeof(*name));
    name->label = persist->label;
    if (persist->id != NULL && persist->idlen > 0 && persist->idlen <= sizeof(name->id)) {
        memcpy(name->id, persist->id, persist->idlen);
        name->idlen = persist->idlen;
    } else if (RAND_bytes_ex(p->libctx, name->id, 8, 0) == 1) {
        name->idlen = 8;
    } else {
        p11_session_put(s, CKR_OK);
        KEYX_ERR(p, KEYX_R_INTERNAL, "pkcs11: no random bytes for the new key's CKA_ID");
        return 0;
    }
    hex_id(name->id, name->idlen, idhex, sizeof(idhex));
    if (name->label != NULL) {
        rv = key_exists(s, (CK_ATTRIBUTE)ATTR(CKA_LABEL, name->label, strlen(name->label)), &found);
        if (rv == CKR_OK && found) {
            p11_session_put(s, rv);
            KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT,
                     "pkcs11: a key labelled '%s' already exists on token '%s': keyx does not "
                     "make two keys of one label; choose another keyx-label or delete the old key",
                     name->label, p11_dev_token_label(s->dev, s->tok));
            return 0;
        }
        if (rv != CKR_OK) {
            p11_session_put(s, rv);
            return p11_fail(s, rv, "looking for keys of the same label (C_FindObjects)");
        }
    }
    rv = key_exists(s, (CK_ATTRIBUTE)ATTR(CKA_ID, name->id, name->idlen), &found);
    if (rv == CKR_OK && found) {
        p11_session_put(s, rv);
        KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT,
                 "pkcs11: a key with id %s already exists on token '%s': keyx does not make two "
                 "keys of one id; choose another keyx-id (or none: keyx then picks a fresh one)",
                 idhex, p11_dev_token_label(s->dev, s->tok));
        return 0;
    }
    if (rv != CKR_OK) {
        p11_session_put(s, rv);
        return p11_fail(s, rv, "looking for keys of the same id (C_FindObjects)");
    }
    return 1;
}

/* Deletes a token key pair made by this very request that could not be completed. */
static void drop_new_pair(p11_dev *d, int tok, CK_OBJECT_HANDLE priv, const p11_name *name)
{
    CK_OBJECT_CLASS cls = CKO_PUBLIC_KEY;
    CK_ATTRIBUTE t[] = {
        ATTR(CKA_CLASS, &cls, sizeof(cls)),
        ATTR(CKA_ID, name->id, name->idlen),
    };
    CK_OBJECT_HANDLE objs[2];
    CK_ULONG count = 0;
    p11_sess s;

    ERR_set_mark();
    if (p11_session_get(d, tok, &s) == 1) {
        s.f->C_DestroyObject(s.h, priv);
        if (s.f->C_FindObjectsInit(s.h, t, 2) == CKR_OK) {
            s.f->C_FindObjects(s.h, objs, 2, &count);
            s.f->C_FindObjectsFinal(s.h);
            for (CK_ULONG i = 0; i < count; i++)
                s.f->C_DestroyObject(s.h, objs[i]);
        }
        p11_session_put(&s, CKR_OK);
    }
    ERR_pop_to_mark();
}

static int generate_once(void *state, const keyx_keyspec *spec, void **handle, EVP_PKEY **pub)
{
    p11_dev *d = state;
    keyx_provctx *p = p11_dev_prov(d);
    CK_OBJECT_HANDLE priv = CK_INVALID_HANDLE;
    const p11_name *named = NULL;
    p11_name name;
    p11_sess s;
    p11_key *k;
    unsigned char point[1 + 2 * 66];
    size_t pointlen = 0;
    int rc;

    if (spec->persist != NULL && spec->persist->tpm_handle != 0) {
        KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT,
                 "pkcs11: keyx-persist names a TPM handle; a token key is named by keyx-label "
                 "and keyx-id");
        return 0;
    }
    /* A token that fails now is marked down by p11_session_put and the next one in the set
     * serves this very request; the router sees KEYX_BACKEND_DOWN only when none is left.
     * A token key is made on the first token of the set that is up: one that is down before
     * the request is passed over (p11_session_get), but once C_GenerateKeyPair was sent the
     * key may exist there, and no second one is made elsewhere. */
    ERR_set_mark();
    for (int tries = p11_dev_set_size(d); tries > 0; tries--) {
        if (tries < p11_dev_set_size(d))
            keyx_watchdog_renew(); /* pkcs11-timeout is per token */
        if ((rc = p11_session_get(d, -1, &s)) != 1)
            break;
        if (spec->persist != NULL) {
            if ((rc = new_name(&s, spec, &name)) == KEYX_BACKEND_DOWN)
                continue; /* nothing made there yet */
            if (rc != 1)
                break;
            named = &name;
        }
        *pub = NULL;
        rc = spec->alg == KEYX_ALG_EC    ? gen_ec(d, &s, spec, named, &priv, point, &pointlen)
             : spec->alg == KEYX_ALG_RSA ? p11_rsa_generate(&s, spec, named, &priv, pub)
                                         : gen_dh(d, &s, spec, named, &priv, pub);
        if (rc != KEYX_BACKEND_DOWN || named != NULL)
            break;
    }
    if (rc != 1) {
        ERR_clear_last_mark();
        return rc;
    }
    ERR_pop_to_mark(); /* a failed token is in the audit log (failover event) */
    k = key_new(p, spec->alg, &s, priv, named == NULL,
                spec->alg == KEYX_ALG_EC ? p11_ec_field_bytes(spec->group)
                                         : (size_t)EVP_PKEY_get_size(*pub)); /* |p|, |n| */
    if (k != NULL && named != NULL &&
        (k->uri = make_locator(d, s.tok, name.id, name.idlen, name.label,
                               name.label != NULL ? strlen(name.label) : 0)) == NULL) {
        OPENSSL_free(k);
        k = NULL;
    }
    if (k != NULL) {
        /* token keys are made for signing too (p11_tmpl_pair), except DH keys */
        k->can_sign = named != NULL && !keyx_alg_is_dh(spec->alg);
        k->bits = spec->alg == KEYX_ALG_RSA ? (size_t)EVP_PKEY_get_bits(*pub) : 0;
        memcpy(k->point, point, pointlen);
        k->pointlen = pointlen;
    }
    if (k == NULL) {
        EVP_PKEY_free(*pub);
        *pub = NULL;
        if (named != NULL) {
            drop_new_pair(d, s.tok, priv, named);
        } else if (p11_session_get(d, s.tok, &s) == 1) {
            s.f->C_DestroyObject(s.h, priv);
            p11_session_put(&s, CKR_OK);
        }
        return 0;
    }
    *handle = k;
    return 1;
}

static size_t p11_public_raw(void *state, void *handle, unsigned char *buf)
{
    const p11_key *k = handle;

    (void)state;
    memcpy(buf, k->point, k->pointlen);
    return k->pointlen;
}

static int p11_generate(void *state, const keyx_keyspec *spec, void **handle, EVP_PKEY **pub)
{
    keyx_pool *pl = spec->persist == NULL && spec->alg != KEYX_ALG_RSA ? keyx_pool_of(state) : NULL;
    int r;

    /* `pkcs11-pool`: an ephemeral key made ahead by the refill thread, if one is ready. */
    if (pl != NULL && keyx_pool_take(pl, spec, handle, pub))
        return 1;
    r = generate_once(state, spec, handle, pub);
    if (r == 1 && pl != NULL && spec->group != NULL)
        keyx_pool_kick(pl);
    return r;
}

/* ---- key pool (`pkcs11-pool`) ------------------------------------------------------------- */

/* A pooled key is a session object like any ephemeral key; it may be handed out while the
 * module generation it was made under is current (no re-initialization after a token loss,
 * no fork). */
static int pool_usable(void *state, void *handle)
{
    const p11_key *k = handle;

    return p11_dev_current(state, k->gen);
}

static void p11_free(void *state, void *handle);

static const keyx_pool_ops p11_pool_ops = {
    .make = generate_once,
    .usable = pool_usable,
    .destroy = p11_free,
};

/* ---- import (tests, and private keys the application moves into the token) ---------------- */

/* RSA: the whole private key (CRT parts too) becomes a session object; keyx keeps n and e. */
static int import_rsa(p11_dev *d, EVP_PKEY *key, void **handle, EVP_PKEY **pub)
{
    CK_OBJECT_HANDLE obj = CK_INVALID_HANDLE;
    p11_sess s;
    int rc;

    *pub = NULL;
    if ((rc = p11_session_get(d, -1, &s)) != 1 || (rc = p11_rsa_import(&s, key, &obj, pub)) != 1)
        return rc;
    if ((*handle = key_new(p11_dev_prov(d), KEYX_ALG_RSA, &s, obj, 1,
                           (size_t)EVP_PKEY_get_size(*pub))) == NULL) {
        if (p11_session_get(d, s.tok, &s) == 1) {
            s.f->C_DestroyObject(s.h, obj);
            p11_session_put(&s, CKR_OK);
        }
        EVP_PKEY_free(*pub);
        *pub = NULL;
        return 0;
    }
    ((p11_key *)*handle)->bits = (size_t)EVP_PKEY_get_bits(*pub);
    return 1;
}

static int p11_import(void *state, EVP_PKEY *key, void **handle, EVP_PKEY **pub)
{
    p11_dev *d = state;
    keyx_provctx *p = p11_dev_prov(d);
    CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
    CK_KEY_TYPE kt;
    unsigned char *x = NULL, *prime = NULL, *base = NULL, *value = NULL;
    size_t xlen = 0, plen = 0, glen = 0, field = 0, vlen;
    const unsigned char *params = NULL;
    char group[64];
    CK_OBJECT_HANDLE obj;
    CK_ATTRIBUTE t[10] = {
        ATTR(CKA_CLASS, &cls, sizeof(cls)),
        ATTR(CKA_KEY_TYPE, &kt, sizeof(kt)),
        P11_SESSION_PRIVATE(CKA_DERIVE),
    };
    CK_ULONG nt = 7;
    keyx_alg alg;
    p11_sess s;
    CK_RV rv;
    int rc;

    if (EVP_PKEY_is_a(key, "RSA"))
        return import_rsa(d, key, handle, pub);
    if (EVP_PKEY_is_a(key, "EC")) {
        alg = KEYX_ALG_EC;
        kt = CKK_EC;
        if (EVP_PKEY_get_utf8_string_param(key, OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof(group),
                                           NULL) != 1)
            group[0] = '\0';
        {
            static const char *const names[][2] = {
                {"prime256v1", "P-256"}, {"secp384r1", "P-384"}, {"secp521r1", "P-521"}};

            for (size_t i = 0; i < 3; i++)
                if (strcmp(group, names[i][0]) == 0)
                    memcpy(group, names[i][1], 6);
        }
        if ((params = p11_ec_params(group, &plen)) == NULL) {
            KEYX_ERR(p, KEYX_R_UNSUPPORTED, "pkcs11: curve '%s' cannot be imported", group);
            return 0;
        }
        field = p11_ec_field_bytes(group);
        /* CKA_VALUE of an EC private key: the scalar, big-endian, field-size bytes. */
        if (!bn_bytes(key, OSSL_PKEY_PARAM_PRIV_KEY, &x, &xlen) || xlen > field ||
            (value = OPENSSL_zalloc(field)) == NULL) {
            OPENSSL_clear_free(x, xlen);
            KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT, "pkcs11: unusable EC private key");
            return 0;
        }
        memcpy(value + field - xlen, x, xlen);
        vlen = field;
        t[nt++] = (CK_ATTRIBUTE)ATTR(CKA_EC_PARAMS, params, plen);
    } else if (EVP_PKEY_is_a(key, "DH") || EVP_PKEY_is_a(key, "DHX")) {
        /* An X9.42 key is a PKCS#3 key with q: the token needs p and g only. */
        alg = EVP_PKEY_is_a(key, "DHX") ? KEYX_ALG_DHX : KEYX_ALG_DH;
        kt = CKK_DH;
        if (!bn_bytes(key, OSSL_PKEY_PARAM_FFC_P, &prime, &plen) ||
            !bn_bytes(key, OSSL_PKEY_PARAM_FFC_G, &base, &glen) ||
            !bn_bytes(key, OSSL_PKEY_PARAM_PRIV_KEY, &value, &vlen)) {
            OPENSSL_free(prime);
            OPENSSL_free(base);
            KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT, "pkcs11: unusable DH private key");
            return 0;
        }
        field = plen;
        t[nt++] = (CK_ATTRIBUTE)ATTR(CKA_PRIME, prime, plen);
        t[nt++] = (CK_ATTRIBUTE)ATTR(CKA_BASE, base, glen);
    } else {
        KEYX_ERR(p, KEYX_R_UNSUPPORTED, "pkcs11: only EC, DH and RSA private keys can be imported");
        return 0;
    }
    t[nt++] = (CK_ATTRIBUTE)ATTR(CKA_VALUE, value, vlen);
    if ((rc = p11_session_get(d, -1, &s)) == 1) {
        rv = s.f->C_CreateObject(s.h, t, nt, &obj);
        p11_session_put(&s, rv);
        rc = rv == CKR_OK ? 1 : p11_fail(&s, rv, "importing the private key (C_CreateObject)");
    }
    OPENSSL_clear_free(value, vlen);
    OPENSSL_clear_free(x, xlen);
    OPENSSL_free(prime);
    OPENSSL_free(base);
    if (rc != 1)
        return rc;
    if ((*handle = key_new(p, alg, &s, obj, 1, field)) == NULL || !EVP_PKEY_up_ref(key)) {
        if (p11_session_get(d, s.tok, &s) == 1) {
            s.f->C_DestroyObject(s.h, obj);
            p11_session_put(&s, CKR_OK);
        }
        if (*handle != NULL)
            p11_dev_objects(d, ((p11_key *)*handle)->gen, -1);
        OPENSSL_free(*handle);
        return 0;
    }
    /* keyx keeps only the public view; the private scalar is now in the token only. */
    *pub = key;
    return 1;
}

/* ---- derive ------------------------------------------------------------------------------ */

static int find_static(p11_dev *d, const char *uri, p11_key **out, EVP_PKEY **pub);

/* Moves k to where fresh found it (key_moves held). */
static void key_move(p11_key *k, p11_key *fresh)
{
    k->tok = fresh->tok;
    k->gen = fresh->gen;
    k->obj = fresh->obj;
    OPENSSL_free(k->uri);
    k->uri = fresh->uri;
    OPENSSL_free(fresh->asked);
    OPENSSL_free(fresh);
}

/* The key's token is down (or the key's generation is gone with it): the same key on another
 * token serves, found by the URI it was loaded by, and only if its public key is the same (a
 * failover set's tokens each hold a copy of the key, imported into each). key_moves held.
 * 1 when k moved, else the result of the search (error raised). */
static int key_elsewhere(p11_dev *d, p11_key *k)
{
    p11_key *fresh = NULL;
    EVP_PKEY *pub = NULL;
    int rc;

    if (k->asked == NULL || k->pub == NULL)
        return KEYX_BACKEND_DOWN;
    keyx_watchdog_renew(); /* pkcs11-timeout is per token */
    if ((rc = find_static(d, k->asked, &fresh, &pub)) != 1)
        return rc;
    if (EVP_PKEY_eq(pub, k->pub) != 1) {
        KEYX_ERR(p11_dev_prov(d), KEYX_R_MISSING_KEY,
                 "pkcs11: the key '%.*s' found on token '%s' is not the key loaded before (its "
                 "public key differs): not used; a failover set needs the same key on each token",
                 printable_len(k->asked), k->asked, p11_dev_token_label(d, fresh->tok));
        OPENSSL_free(fresh->uri);
        OPENSSL_free(fresh->asked);
        OPENSSL_free(fresh);
        rc = 0;
    } else {
        key_move(k, fresh);
    }
    EVP_PKEY_free(pub);
    return rc;
}

/* A session on the key's token, and the key's object there; after a fork a static key is found
 * again by its URI, and when its token is down, on another token (key_elsewhere). */
static int key_session(p11_dev *d, p11_key *k, p11_sess *s, CK_OBJECT_HANDLE *obj)
{
    p11_key *fresh = NULL;
    int rc;

    pthread_mutex_lock(&key_moves);
    if (!p11_dev_current(d, k->gen)) {
        if (k->uri == NULL) {
            pthread_mutex_unlock(&key_moves);
            KEYX_ERR(p11_dev_prov(d), KEYX_R_MISSING_KEY,
                     "pkcs11: this ephemeral key was made before fork() or before the module was "
                     "re-initialized (a token went missing) and does not exist any more: "
                     "generate keys after forking");
            return 0;
        }
        ERR_set_mark();
        if ((rc = find_static(d, k->uri, &fresh, NULL)) == 1) {
            OPENSSL_free(fresh->uri);
            fresh->uri = k->uri;
            k->uri = NULL;
            key_move(k, fresh);
        } else if (rc != KEYX_BACKEND_DOWN || (rc = key_elsewhere(d, k)) != 1) {
            ERR_clear_last_mark();
            pthread_mutex_unlock(&key_moves);
            return rc == KEYX_BACKEND_DOWN ? KEYX_BACKEND_DOWN : 0;
        }
        ERR_pop_to_mark();
    }
    ERR_set_mark();
    if ((rc = p11_session_get(d, k->tok, s)) == KEYX_BACKEND_DOWN && key_elsewhere(d, k) == 1) {
        ERR_pop_to_mark(); /* the failed token is in the audit log (failover event) */
        ERR_set_mark();
        rc = p11_session_get(d, k->tok, s);
    }
    ERR_clear_last_mark();
    *obj = k->obj;
    pthread_mutex_unlock(&key_moves);
    return rc;
}

/* After an operation on a static key failed with its token (KEYX_BACKEND_DOWN): 1 when the key
 * was found on another token, so that the operation is tried there once. */
static int key_failed_over(p11_dev *d, p11_key *k)
{
    int rc;

    if (k->asked == NULL)
        return 0;
    pthread_mutex_lock(&key_moves);
    ERR_set_mark();
    rc = key_elsewhere(d, k);
    ERR_pop_to_mark(); /* the operation's own error stays, should this fail */
    pthread_mutex_unlock(&key_moves);
    return rc == 1;
}

/* An operation on key k's object obj through session s (which it gives back). */
typedef int key_op(p11_dev *d, p11_key *k, p11_sess *s, CK_OBJECT_HANDLE obj, void *arg);

/* Runs op with a session on k's token; when the token fails under it (KEYX_BACKEND_DOWN) and the
 * key is found on another token, once more there. */
static int on_key(p11_dev *d, p11_key *k, key_op *op, void *arg)
{
    p11_sess s;
    CK_OBJECT_HANDLE obj;
    int rc;

    ERR_set_mark();
    for (int again = 1;; again = 0) {
        if ((rc = key_session(d, k, &s, &obj)) == 1)
            rc = op(d, k, &s, obj, arg);
        if (rc != KEYX_BACKEND_DOWN || !again || !key_failed_over(d, k))
            break;
        ERR_pop_to_mark(); /* the failed token is in the audit log (failover event) */
        ERR_set_mark();
    }
    ERR_clear_last_mark();
    return rc;
}

/* p11-kit's RPC client (a token reached through `p11-kit server`) before 0.25 cannot carry the
 * parameters of ECDH and DH derivation and refuses them itself with CKR_MECHANISM_INVALID: say
 * so, instead of blaming the token. That client reports the manufacturer "PKCS#11 Kit" and
 * Cryptoki 2.40 (0.25 reports 3.0). 1 when that is the cause (raised). */
static int rpc_without_derive(const p11_sess *s, CK_RV rv, keyx_provctx *p, keyx_alg alg)
{
    CK_INFO info;

    if (rv != CKR_MECHANISM_INVALID || s->f->C_GetInfo(&info) != CKR_OK ||
        memcmp(info.manufacturerID, "PKCS#11 Kit", 11) != 0 || info.cryptokiVersion.major >= 3)
        return 0;
    KEYX_ERR(p, KEYX_R_UNSUPPORTED,
             "pkcs11: %s on a remote token through p11-kit's RPC client older than 0.25 (it "
             "reports Cryptoki %u.%u): p11-kit forwards CKM_%s from 0.25 on, on client and "
             "server; use p11-kit 0.25 or later on both ends (Debian 13), or the HSM's own "
             "PKCS#11 module",
             alg == KEYX_ALG_EC ? "ECDH" : "DH", info.cryptokiVersion.major,
             info.cryptokiVersion.minor, alg == KEYX_ALG_EC ? "ECDH1_DERIVE" : "DH_PKCS_DERIVE");
    return 1;
}

static int derive_once(void *state, void *handle, const keyx_peer *from, unsigned char *secret,
                       size_t secretlen)
{
    EVP_PKEY *peer = from->view;
    p11_dev *d = state;
    p11_key *k = handle;
    unsigned char *peerdata = NULL, point[1 + 2 * 66]; /* P-521, uncompressed */
    size_t peerlen = 0;
    CK_ECDH1_DERIVE_PARAMS ecdh;
    CK_MECHANISM mech;
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_KEY_TYPE kt = CKK_GENERIC_SECRET;
    CK_ULONG vlen = secretlen;
    /* The secret is a session object that exists only between C_DeriveKey and its read. */
    CK_ATTRIBUTE t[] = {
        ATTR(CKA_CLASS, &cls, sizeof(cls)),  ATTR(CKA_KEY_TYPE, &kt, sizeof(kt)),
        ATTR_BOOL(CKA_TOKEN, p11_no),        ATTR_BOOL(CKA_SENSITIVE, p11_no),
        ATTR_BOOL(CKA_EXTRACTABLE, p11_yes), ATTR(CKA_VALUE_LEN, &vlen, sizeof(vlen)),
    };
    CK_OBJECT_HANDLE obj = CK_INVALID_HANDLE, key;
    CK_ATTRIBUTE value = {CKA_VALUE, secret, secretlen};
    p11_sess s;
    CK_RV rv;
    int rc;

    if (!k->can_use) {
        KEYX_ERR(p11_dev_prov(d), KEYX_R_KEY_USAGE,
                 "pkcs11: the key '%.*s' does not allow derivation (CKA_DERIVE is false): it is "
                 "a signing key",
                 k->uri != NULL ? printable_len(k->uri) : 1, k->uri != NULL ? k->uri : "?");
        return 0;
    }
    if (k->alg == KEYX_ALG_EC) {
        /* the uncompressed point as the application set it, or else from the view, straight
         * into a stack buffer: one call, no allocation */
        if (from->point != NULL && from->pointlen <= sizeof(point)) {
            memcpy(point, from->point, from->pointlen);
            peerlen = from->pointlen;
        } else if (EVP_PKEY_get_octet_string_param(peer, OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, point,
                                                   sizeof(point), &peerlen) != 1) {
            goto bad_peer;
        }
        memset(&ecdh, 0, sizeof(ecdh));
        ecdh.kdf = CKD_NULL;
        ecdh.pPublicData = point;
        ecdh.ulPublicDataLen = peerlen;
        mech = (CK_MECHANISM){CKM_ECDH1_DERIVE, &ecdh, sizeof(ecdh)};
    } else {
        if (!bn_bytes(peer, OSSL_PKEY_PARAM_PUB_KEY, &peerdata, &peerlen))
            goto bad_peer;
        mech = (CK_MECHANISM){CKM_DH_PKCS_DERIVE, peerdata, peerlen};
    }
    if ((rc = key_session(d, k, &s, &key)) != 1) {
        OPENSSL_free(peerdata);
        return rc;
    }
    rv = s.f->C_DeriveKey(s.h, &mech, key, t, sizeof(t) / sizeof(t[0]), &obj);
    OPENSSL_free(peerdata);
    if (rv == CKR_OK) {
        rv = s.f->C_GetAttributeValue(s.h, obj, &value, 1);
        s.f->C_DestroyObject(s.h, obj);
    }
    p11_session_put(&s, rv);
    if (rv != CKR_OK) {
        OPENSSL_cleanse(secret, secretlen);
        if (rpc_without_derive(&s, rv, p11_dev_prov(d), k->alg))
            return 0;
        return p11_fail(&s, rv,
                        k->alg == KEYX_ALG_EC ? "ECDH (C_DeriveKey CKM_ECDH1_DERIVE)"
                                              : "DH (C_DeriveKey CKM_DH_PKCS_DERIVE)");
    }
    if (value.ulValueLen < secretlen) {
        /* A token that strips leading zeros: restore the fixed-size form keyx promises. */
        size_t got = value.ulValueLen, pad = secretlen - got;

        memmove(secret + pad, secret, got);
        memset(secret, 0, pad);
    }
    return 1;

bad_peer:
    OPENSSL_free(peerdata);
    KEYX_ERR(p11_dev_prov(d), KEYX_R_INVALID_PEER_KEY, "pkcs11: the peer key has no public value");
    return 0;
}

static int p11_derive(void *state, void *handle, const keyx_peer *from, unsigned char *secret,
                      size_t secretlen)
{
    int rc;

    ERR_set_mark();
    if ((rc = derive_once(state, handle, from, secret, secretlen)) == KEYX_BACKEND_DOWN &&
        key_failed_over(state, handle)) {
        ERR_pop_to_mark();
        ERR_set_mark();
        rc = derive_once(state, handle, from, secret, secretlen);
    }
    ERR_clear_last_mark();
    return rc;
}

/* ---- static keys by URI ------------------------------------------------------------------ */

/* Up to two private keys matching attrs on the session's token. */
static CK_RV find_objects(p11_sess *s, CK_ATTRIBUTE *attrs, CK_ULONG n, CK_OBJECT_HANDLE *objs,
                          CK_ULONG *count)
{
    CK_RV rv = s->f->C_FindObjectsInit(s->h, attrs, n);

    *count = 0;
    if (rv != CKR_OK)
        return rv;
    rv = s->f->C_FindObjects(s->h, objs, 2, count);
    s->f->C_FindObjectsFinal(s->h);
    return rv;
}

/* The public key of a static private key: EC from its public object (same CKA_ID, else same
 * label); DH from p, g and the public object's value. */
static CK_RV static_public(p11_sess *s, CK_OBJECT_HANDLE priv, CK_KEY_TYPE kt, OSSL_LIB_CTX *libctx,
                           EVP_PKEY **pub, size_t *secretlen)
{
    CK_OBJECT_CLASS pubcls = CKO_PUBLIC_KEY;
    unsigned char *id = NULL, *params = NULL, *point = NULL, *prime = NULL, *base = NULL;
    size_t idlen = 0, plen = 0, ptlen = 0, glen = 0;
    CK_ATTRIBUTE_TYPE link = CKA_ID;
    CK_OBJECT_HANDLE objs[2];
    CK_ULONG count = 0;
    const char *group = NULL;
    CK_RV rv;

    rv = p11_get_attr(s, priv, CKA_ID, 0, &id, &idlen);
    if (rv != CKR_OK || idlen == 0) {
        OPENSSL_free(id);
        link = CKA_LABEL;
        rv = p11_get_attr(s, priv, CKA_LABEL, 0, &id, &idlen);
    }
    if (rv == CKR_OK) {
        CK_ATTRIBUTE t[] = {
            ATTR(CKA_CLASS, &pubcls, sizeof(pubcls)),
            ATTR(CKA_KEY_TYPE, &kt, sizeof(kt)),
            ATTR(link, id, idlen),
        };

        rv = find_objects(s, t, 3, objs, &count);
        if (rv == CKR_OK && count == 0)
            rv = CKR_KEY_HANDLE_INVALID; /* no public key object beside the private key */
    }
    if (rv == CKR_OK && kt == CKK_EC) {
        if ((rv = p11_get_attr(s, priv, CKA_EC_PARAMS, 0, &params, &plen)) == CKR_OK &&
            (group = p11_ec_group(params, plen)) == NULL)
            rv = CKR_DOMAIN_PARAMS_INVALID;
        if (rv == CKR_OK &&
            (rv = p11_get_attr(s, objs[0], CKA_EC_POINT, 0, &point, &ptlen)) == CKR_OK &&
            (*pub = p11_ec_public(libctx, group, NULL, point, ptlen)) == NULL)
            rv = CKR_ATTRIBUTE_VALUE_INVALID;
        *secretlen = p11_ec_field_bytes(group);
    } else if (rv == CKR_OK) {
        if ((rv = p11_get_attr(s, priv, CKA_PRIME, 0, &prime, &plen)) == CKR_OK &&
            (rv = p11_get_attr(s, priv, CKA_BASE, 0, &base, &glen)) == CKR_OK &&
            (rv = p11_get_attr(s, objs[0], CKA_VALUE, 0, &point, &ptlen)) == CKR_OK &&
            (*pub = p11_dh_public_pg(libctx, prime, plen, base, glen, point, ptlen)) == NULL)
            rv = CKR_ATTRIBUTE_VALUE_INVALID;
        *secretlen = plen;
    }
    OPENSSL_free(id);
    OPENSSL_free(params);
    OPENSSL_free(point);
    OPENSSL_free(prime);
    OPENSSL_free(base);
    return rv;
}

/* A CK_BBOOL attribute of obj: 1 when true or unreadable (the token then decides), 0 when
 * false. */
static int attr_true(p11_sess *s, CK_OBJECT_HANDLE obj, CK_ATTRIBUTE_TYPE type)
{
    CK_BBOOL v = CK_FALSE;
    CK_ATTRIBUTE a = {type, &v, sizeof(v)};

    return s->f->C_GetAttributeValue(s->h, obj, &a, 1) != CKR_OK || v == CK_TRUE;
}

/* Parses a URI into u and its object attributes into t (at most 7, the class left out: the
 * caller adds its own). *cls: the class type= names, CK_UNAVAILABLE_INFORMATION without one. 0 +
 * error for a malformed URI. */
static int parse_uri(keyx_provctx *p, const char *uri, P11KitUri *u, CK_ATTRIBUTE *t, CK_ULONG *nt,
                     CK_OBJECT_CLASS *cls)
{
    CK_ATTRIBUTE *uattrs;
    CK_ULONG nu = 0;
    int pr;

    *nt = 0;
    *cls = CK_UNAVAILABLE_INFORMATION;
    if ((pr = p11_kit_uri_parse(uri, P11_KIT_URI_FOR_OBJECT_ON_TOKEN_AND_MODULE, u)) !=
        P11_KIT_URI_OK) {
        KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT,
                 "pkcs11: invalid PKCS#11 URI '%.*s': %s (RFC 7512, e.g. "
                 "pkcs11:token=keyx;object=srv;type=private)",
                 printable_len(uri), uri, p11_kit_uri_message(pr));
        return 0;
    }
    uattrs = p11_kit_uri_get_attributes(u, &nu);
    for (CK_ULONG i = 0; i < nu && *nt < 7; i++) {
        if (uattrs[i].type == CKA_CLASS) {
            *cls = *(CK_OBJECT_CLASS *)uattrs[i].pValue;
            continue;
        }
        t[(*nt)++] = uattrs[i];
    }
    return 1;
}

/* parse_uri for a private key: a URI naming another class is refused. */
static int parse_key_uri(keyx_provctx *p, const char *uri, P11KitUri *u, CK_ATTRIBUTE *t,
                         CK_ULONG *nt)
{
    CK_OBJECT_CLASS c;

    if (!parse_uri(p, uri, u, t, nt, &c))
        return 0;
    if (c != CK_UNAVAILABLE_INFORMATION && c != CKO_PRIVATE_KEY) {
        KEYX_ERR(p, KEYX_R_UNSUPPORTED,
                 "pkcs11: '%.*s' names a %s object where a private key is needed: name the "
                 "private key (type=private)",
                 printable_len(uri), uri,
                 c == CKO_PUBLIC_KEY    ? "public key"
                 : c == CKO_CERTIFICATE ? "certificate"
                                        : "non-key");
        return 0;
    }
    return 1;
}

/* Finds the one private key uri names, on the tokens it matches. pub may be NULL (found again
 * after a fork: the public view is kept). 1, 0 or KEYX_BACKEND_DOWN with an error raised. */
static int find_static(p11_dev *d, const char *uri, p11_key **out, EVP_PKEY **pub)
{
    keyx_provctx *p = p11_dev_prov(d);
    P11KitUri *u = p11_kit_uri_new();
    CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
    CK_ATTRIBUTE t[8];
    CK_ULONG nt = 0, count = 0;
    CK_OBJECT_HANDLE objs[2];
    CK_KEY_TYPE kt = 0;
    CK_ATTRIBUTE kta = {CKA_KEY_TYPE, &kt, sizeof(kt)};
    int toks[8], ntoks, rc = 0, usage = 1, sign = 0;
    size_t secretlen = 0, bits = 0;
    char *canon = NULL;
    int nameless = 0;
    p11_sess s;
    CK_RV rv = CKR_OK;

    *out = NULL;
    if (u == NULL)
        return 0;
    if (!parse_key_uri(p, uri, u, t, &nt))
        goto done;
    t[nt++] = (CK_ATTRIBUTE)ATTR(CKA_CLASS, &cls, sizeof(cls));
    if ((ntoks = p11_dev_find_tokens(d, u, toks, 8)) < 0) {
        rc = ntoks == KEYX_BACKEND_DOWN ? KEYX_BACKEND_DOWN : 0;
        goto done;
    }
    for (int i = 0; i < ntoks; i++) {
        if ((rc = p11_session_get(d, toks[i], &s)) != 1)
            goto done;
        rv = find_objects(&s, t, nt, objs, &count);
        if (rv == CKR_OK && count > 1) {
            p11_session_put(&s, rv);
            KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT,
                     "pkcs11: several private keys match '%.*s' on token '%s': add id= or "
                     "object= to the URI",
                     printable_len(uri), uri, p11_dev_token_label(d, toks[i]));
            rc = 0;
            goto done;
        }
        if (rv == CKR_OK && count == 1) {
            rv = s.f->C_GetAttributeValue(s.h, objs[0], &kta, 1);
            if (rv == CKR_OK) {
                /* A key for derivation (decryption), for signing (a certificate key), or both;
                 * read once here, so that each operation is refused without a Cryptoki call. */
                usage = attr_true(&s, objs[0], kt == CKK_RSA ? CKA_DECRYPT : CKA_DERIVE);
                sign = (kt == CKK_EC || kt == CKK_RSA) && attr_true(&s, objs[0], CKA_SIGN);
            }
            if (rv == CKR_OK && !usage && !sign) {
                p11_session_put(&s, rv);
                KEYX_ERR(p, KEYX_R_KEY_USAGE,
                         kt == CKK_RSA  ? "pkcs11: the RSA key '%.*s' allows neither decryption "
                                          "(CKA_DECRYPT) nor signing (CKA_SIGN)"
                         : kt == CKK_EC ? "pkcs11: the key '%.*s' allows neither derivation "
                                          "(CKA_DERIVE) nor signing (CKA_SIGN)"
                                        : "pkcs11: the key '%.*s' does not allow derivation "
                                          "(CKA_DERIVE is false)",
                         printable_len(uri), uri);
                rc = 0;
                goto done;
            }
            if (rv == CKR_OK && kt != CKK_EC && kt != CKK_DH && kt != CKK_RSA)
                rv = CKR_KEY_TYPE_INCONSISTENT;
            if (rv == CKR_OK && kt == CKK_RSA) {
                EVP_PKEY *rsapub = NULL;

                rv = p11_rsa_public(&s, objs[0], p->libctx, &rsapub, &secretlen);
                if (rv == CKR_OK)
                    bits = (size_t)EVP_PKEY_get_bits(rsapub);
                if (pub != NULL)
                    *pub = rsapub;
                else
                    EVP_PKEY_free(rsapub);
            } else if (rv == CKR_OK && pub != NULL) {
                rv = static_public(&s, objs[0], kt, p->libctx, pub, &secretlen);
            }
            if (rv == CKR_OK && (canon = object_locator(&s, objs[0], &nameless)) == NULL &&
                !nameless)
                rv = CKR_HOST_MEMORY;
            p11_session_put(&s, rv);
            if (rv != CKR_OK) {
                rc = rv == CKR_KEY_TYPE_INCONSISTENT
                         ? (KEYX_ERR(p, KEYX_R_UNSUPPORTED,
                                     "pkcs11: '%.*s' is not an EC, DH or RSA key",
                                     printable_len(uri), uri),
                            0)
                     : rv == CKR_KEY_HANDLE_INVALID
                         ? (KEYX_ERR(p, KEYX_R_MISSING_KEY,
                                     "pkcs11: the public key of '%.*s' is not on the token "
                                     "(keyx needs the public key object with the same CKA_ID)",
                                     printable_len(uri), uri),
                            0)
                         : p11_fail(&s, rv, "reading the key's public part");
                goto done;
            }
            if ((*out = key_new(p,
                                kt == CKK_EC    ? KEYX_ALG_EC
                                : kt == CKK_RSA ? KEYX_ALG_RSA
                                                : KEYX_ALG_DH,
                                &s, objs[0], 0, secretlen)) == NULL ||
                ((*out)->uri = canon != NULL ? canon : OPENSSL_strdup(uri)) == NULL) {
                OPENSSL_free(canon);
                OPENSSL_free(*out);
                *out = NULL;
                rc = 0;
                goto done;
            }
            (*out)->nameless = nameless;
            (*out)->can_use = usage;
            (*out)->can_sign = sign;
            (*out)->bits = bits;
            rc = 1;
            goto done;
        }
        p11_session_put(&s, rv);
        if (rv != CKR_OK) {
            rc = p11_fail(&s, rv, "searching for the key (C_FindObjects)");
            goto done;
        }
    }
    KEYX_ERR(p, KEYX_R_MISSING_KEY,
             "pkcs11: no key matches '%.*s' (searched %d token%s): check token=, object= and "
             "id= in the URI",
             printable_len(uri), uri, ntoks, ntoks == 1 ? "" : "s");
    rc = 0;
done:
    if (rc != 1 && pub != NULL && *pub != NULL) {
        EVP_PKEY_free(*pub);
        *pub = NULL;
    }
    p11_kit_uri_free(u);
    return rc;
}

static int p11_load(void *state, const char *locator, void **handle, EVP_PKEY **pub)
{
    p11_key *k = NULL;
    int rc;

    *pub = NULL;
    rc = find_static(state, locator, &k, pub);
    if (rc == 1 && ((k->asked = OPENSSL_strdup(locator)) == NULL || EVP_PKEY_up_ref(*pub) != 1)) {
        OPENSSL_free(k->asked);
        OPENSSL_free(k->uri);
        OPENSSL_free(k);
        EVP_PKEY_free(*pub);
        *pub = NULL;
        KEYX_ERR(p11_dev_prov(state), KEYX_R_INTERNAL, "out of memory");
        return 0;
    }
    if (rc == 1)
        k->pub = *pub;
    *handle = k;
    return rc;
}

static int p11_locator(void *state, void *handle, char **out)
{
    p11_dev *d = state;
    p11_key *k = handle;

    *out = NULL;
    if (k->uri == NULL) {
        KEYX_ERR(p11_dev_prov(d), KEYX_R_KEY_NOT_WRITABLE,
                 "pkcs11: an ephemeral pkcs11 key has no locator; generate it with keyx-label/"
                 "keyx-id to keep it on the token");
        return 0;
    }
    if (k->nameless) {
        KEYX_ERR(p11_dev_prov(d), KEYX_R_KEY_NOT_WRITABLE,
                 "pkcs11: the key '%.*s' has neither CKA_ID nor CKA_LABEL, so no URI names it "
                 "alone: give it an id (pkcs11-tool --set-id) to refer to it",
                 printable_len(k->uri), k->uri);
        return 0;
    }
    if ((*out = OPENSSL_strdup(k->uri)) == NULL) {
        KEYX_ERR(p11_dev_prov(d), KEYX_R_INTERNAL, "out of memory");
        return 0;
    }
    return 1;
}

/* ---- listing (openssl storeutl) ---------------------------------------------------------- */

/* 1 if keyx can load obj as a key: EC on a curve keyx serves or DH, allowed to derive; RSA
 * allowed to decrypt; EC and RSA allowed to sign. */
static int loadable(p11_sess *s, CK_OBJECT_HANDLE obj)
{
    CK_KEY_TYPE kt = 0;
    CK_BBOOL usage = CK_FALSE;
    CK_ATTRIBUTE kta = {CKA_KEY_TYPE, &kt, sizeof(kt)};
    CK_ATTRIBUTE ua = {CKA_DERIVE, &usage, sizeof(usage)};
    unsigned char *params = NULL;
    size_t plen = 0;
    int ok;

    if (s->f->C_GetAttributeValue(s->h, obj, &kta, 1) != CKR_OK ||
        (kt != CKK_EC && kt != CKK_DH && kt != CKK_RSA))
        return 0;
    if (kt == CKK_RSA)
        ua.type = CKA_DECRYPT;
    if ((s->f->C_GetAttributeValue(s->h, obj, &ua, 1) != CKR_OK || !usage) &&
        (kt == CKK_DH || !attr_true(s, obj, CKA_SIGN)))
        return 0;
    if (kt != CKK_EC)
        return 1;
    ok = p11_get_attr(s, obj, CKA_EC_PARAMS, 0, &params, &plen) == CKR_OK &&
         p11_ec_group(params, plen) != NULL;
    OPENSSL_free(params);
    return ok;
}

/* Every object matching t on the session's token, into a new array (OPENSSL_free). */
static CK_RV all_objects(p11_sess *s, CK_ATTRIBUTE *t, CK_ULONG nt, CK_OBJECT_HANDLE **objs,
                         size_t *count)
{
    size_t cap = 0;
    CK_ULONG got = 0;
    CK_RV rv;

    *objs = NULL;
    *count = 0;
    if ((rv = s->f->C_FindObjectsInit(s->h, t, nt)) != CKR_OK)
        return rv;
    do {
        if (*count + 32 > cap) {
            CK_OBJECT_HANDLE *grown = OPENSSL_realloc(*objs, (cap + 64) * sizeof(**objs));

            if (grown == NULL) {
                rv = CKR_HOST_MEMORY;
                break;
            }
            *objs = grown;
            cap += 64;
        }
        rv = s->f->C_FindObjects(s->h, *objs + *count, 32, &got);
        if (rv == CKR_OK)
            *count += got;
    } while (rv == CKR_OK && got == 32);
    s->f->C_FindObjectsFinal(s->h);
    return rv;
}

static int push_object(keyx_object **list, size_t *n, size_t *cap, const keyx_object *o)
{
    if (*n == *cap) {
        size_t ncap = *cap ? 2 * *cap : 8;
        keyx_object *grown = OPENSSL_realloc(*list, ncap * sizeof(**list));

        if (grown == NULL)
            return 0;
        *list = grown;
        *cap = ncap;
    }
    (*list)[(*n)++] = *o;
    return 1;
}

/* obj (of class cls) as a STORE object into o. *skip when keyx passes it over: a private key
 * keyx cannot use or no locator can name (neither CKA_ID nor CKA_LABEL), a public key of a type
 * or curve keyx does not read, a certificate that is not X.509, an object whose attributes
 * cannot be read (one odd object does not hide the token's others). */
static CK_RV read_object(p11_sess *s, CK_OBJECT_HANDLE obj, CK_OBJECT_CLASS cls, keyx_object *o,
                         int *skip)
{
    OSSL_LIB_CTX *libctx = p11_dev_prov(s->dev)->libctx;
    int nameless = 0;
    CK_RV rv = CKR_OK;

    memset(o, 0, sizeof(*o));
    *skip = 0;
    if (cls == CKO_PRIVATE_KEY) {
        o->kind = KEYX_OBJ_PRIVATE;
        if (!loadable(s, obj)) {
            *skip = 1;
        } else if ((o->locator = object_locator(s, obj, &nameless)) == NULL) {
            *skip = nameless;
            rv = nameless ? CKR_OK : CKR_HOST_MEMORY;
        }
        return rv;
    }
    if (cls == CKO_PUBLIC_KEY) {
        o->kind = KEYX_OBJ_PUBLIC;
        rv = p11_public_spki(s, obj, libctx, &o->der, &o->derlen);
    } else {
        o->kind = KEYX_OBJ_CERT;
        rv = p11_cert_read(s, obj, &o->der, &o->derlen, &o->subject, &o->subjectlen);
    }
    if (rv != CKR_OK && rv != CKR_HOST_MEMORY && !p11_rv_is_down(rv)) {
        *skip = 1;
        rv = CKR_OK;
    }
    return rv;
}

/* The objects of the kinds asked for among those the URI matches, on every token it matches:
 * private keys (their locators), then public keys, then certificates. A listing of public
 * objects only runs without a login when no PIN is configured. */
static int p11_objects(void *state, const char *locator, int kinds, keyx_object **out, size_t *n)
{
    static const struct {
        int kind;
        CK_OBJECT_CLASS cls;
    } order[] = {
        {KEYX_OBJ_PRIVATE, CKO_PRIVATE_KEY},
        {KEYX_OBJ_PUBLIC, CKO_PUBLIC_KEY},
        {KEYX_OBJ_CERT, CKO_CERTIFICATE},
    };
    p11_dev *d = state;
    keyx_provctx *p = p11_dev_prov(d);
    P11KitUri *u = p11_kit_uri_new();
    CK_OBJECT_CLASS uricls, cls;
    CK_ATTRIBUTE t[8];
    CK_ULONG nt = 0;
    int toks[8], ntoks, rc = 0;
    size_t cap = 0;

    *out = NULL;
    *n = 0;
    if (u == NULL || !parse_uri(p, locator, u, t, &nt, &uricls))
        goto done;
    t[nt++] = (CK_ATTRIBUTE)ATTR(CKA_CLASS, &cls, sizeof(cls));
    if ((ntoks = p11_dev_find_tokens(d, u, toks, 8)) < 0) {
        rc = ntoks == KEYX_BACKEND_DOWN ? KEYX_BACKEND_DOWN : 0;
        goto done;
    }
    for (int i = 0; i < ntoks; i++) {
        p11_sess s;
        CK_RV rv = CKR_OK;

        /* Private keys need the login. Public objects and certificates do not: listed with
         * them, private keys are seen when a PIN is configured. */
        if ((rc = kinds == KEYX_OBJ_PRIVATE ? p11_session_get(d, toks[i], &s)
                                            : p11_session_get_public(d, toks[i], &s)) != 1)
            goto done;
        for (size_t c = 0; c < sizeof(order) / sizeof(order[0]) && rv == CKR_OK; c++) {
            CK_OBJECT_HANDLE *objs = NULL;
            size_t count = 0;

            if (!(kinds & order[c].kind) ||
                (uricls != CK_UNAVAILABLE_INFORMATION && uricls != order[c].cls))
                continue;
            cls = order[c].cls;
            /* all handles first: reading attributes inside a search is not portable */
            rv = all_objects(&s, t, nt, &objs, &count);
            for (size_t j = 0; rv == CKR_OK && j < count; j++) {
                keyx_object o;
                int skip = 0;

                rv = read_object(&s, objs[j], cls, &o, &skip);
                if (rv == CKR_OK && !skip && !push_object(out, n, &cap, &o)) {
                    OPENSSL_free(o.locator);
                    OPENSSL_free(o.der);
                    OPENSSL_free(o.subject);
                    rv = CKR_HOST_MEMORY;
                }
            }
            OPENSSL_free(objs);
        }
        p11_session_put(&s, rv);
        if (rv != CKR_OK) {
            rc = p11_fail(&s, rv, "listing the token's objects (C_FindObjects)");
            goto done;
        }
    }
    if (ntoks == 0) {
        KEYX_ERR(p, KEYX_R_MISSING_KEY,
                 "pkcs11: no token matches '%.*s': check token= (and serial=) in the URI",
                 printable_len(locator), locator);
        goto done;
    }
    rc = 1;
done:
    if (rc != 1) {
        keyx_objects_free(*out, *n);
        *out = NULL;
        *n = 0;
    }
    if (u != NULL)
        p11_kit_uri_free(u);
    return rc;
}

/* ---- RSA decryption (backend/pkcs11_rsa.c) ----------------------------------------------- */

typedef struct decrypt_args {
    const keyx_rsa_op *op;
    const unsigned char *in;
    size_t inlen;
    unsigned char *out;
    size_t *outlen;
} decrypt_args;

static int decrypt_on(p11_dev *d, p11_key *k, p11_sess *s, CK_OBJECT_HANDLE obj, void *arg)
{
    decrypt_args *a = arg;

    (void)d;
    return p11_rsa_decrypt(s, obj, k->secretlen, a->op, a->in, a->inlen, a->out, a->outlen);
}

static int p11_rsa_decrypt_op(void *state, void *handle, const keyx_rsa_op *op,
                              const unsigned char *in, size_t inlen, unsigned char *out,
                              size_t *outlen)
{
    p11_dev *d = state;
    p11_key *k = handle;
    decrypt_args a = {op, in, inlen, out, outlen};

    if (k->alg != KEYX_ALG_RSA) {
        KEYX_ERR(p11_dev_prov(d), KEYX_R_KEY_MISMATCH, "pkcs11: not an RSA key");
        return 0;
    }
    if (!k->can_use) {
        KEYX_ERR(p11_dev_prov(d), KEYX_R_KEY_USAGE,
                 "pkcs11: the RSA key '%.*s' does not allow decryption (CKA_DECRYPT is false): "
                 "it is a signing key",
                 k->uri != NULL ? printable_len(k->uri) : 1, k->uri != NULL ? k->uri : "?");
        return 0;
    }
    return on_key(d, k, decrypt_on, &a);
}

/* ---- signatures (backend/pkcs11_sign.c) ------------------------------------------------- */

/* Refuses keys without CKA_SIGN, from what keyx learned when the key was made or loaded. */
static int signing_key(p11_dev *d, const p11_key *k)
{
    if (k->can_sign)
        return 1;
    if (k->uri == NULL)
        KEYX_ERR(p11_dev_prov(d), KEYX_R_KEY_USAGE,
                 "pkcs11: this pkcs11 key is not a signing key (CKA_SIGN): keys keyx makes "
                 "without keyx-label/keyx-id (ephemeral key-exchange keys) and imported keys "
                 "only %s; a certificate key is made with openssl genpkey -pkeyopt "
                 "keyx-label:NAME",
                 k->alg == KEYX_ALG_RSA ? "decrypt" : "derive");
    else
        KEYX_ERR(p11_dev_prov(d), KEYX_R_KEY_USAGE,
                 "pkcs11: this pkcs11 key is not a signing key (CKA_SIGN): '%.*s' is not allowed "
                 "to sign on its token; use a key made for signing",
                 printable_len(k->uri), k->uri);
    return 0;
}

/* At EVP_DigestSignInit/EVP_PKEY_sign_init (each TLS handshake): the key's usage and the
 * token's mechanisms, both cached; a PSS parameter set the token was never asked about costs
 * one trial C_SignInit, once per token. */
static int p11_sign_check(void *state, void *handle, const keyx_sign_op *op)
{
    p11_dev *d = state;
    p11_key *k = handle;
    p11_sig g;
    p11_sess s;
    CK_OBJECT_HANDLE obj;
    int rc;

    if (!signing_key(d, k))
        return 0;
    rc = p11_sig_prepare(d, k->tok, k->alg, k->secretlen, k->bits, op, &g);
    if (rc != P11_SIG_PROBE)
        return rc;
    if ((rc = key_session(d, k, &s, &obj)) != 1)
        return rc;
    return p11_sig_probe(&s, obj, &g);
}

typedef struct sign_args {
    p11_sig *g;
    const unsigned char *dgst;
    size_t dlen;
    unsigned char *sig;
    size_t *siglen;
} sign_args;

static int sign_on(p11_dev *d, p11_key *k, p11_sess *s, CK_OBJECT_HANDLE obj, void *arg)
{
    sign_args *a = arg;

    (void)d;
    (void)k;
    a->g->tok = s->tok; /* key_session may have found the key on another token (fork, failover) */
    return p11_sig_sign(s, obj, a->g, a->dgst, a->dlen, a->sig, a->siglen);
}

static int p11_sign(void *state, void *handle, const keyx_sign_op *op, const unsigned char *dgst,
                    size_t dlen, unsigned char *sig, size_t *siglen)
{
    p11_dev *d = state;
    p11_key *k = handle;
    p11_sig g;
    sign_args a = {&g, dgst, dlen, sig, siglen};

    if (!signing_key(d, k))
        return 0;
    /* P11_SIG_PROBE: the signature itself tells (and is remembered) */
    if (!p11_sig_prepare(d, k->tok, k->alg, k->secretlen, k->bits, op, &g))
        return 0;
    return on_key(d, k, sign_on, &a);
}

/* ---- free -------------------------------------------------------------------------------- */

static void p11_free(void *state, void *handle)
{
    p11_dev *d = state;
    p11_key *k = handle;
    p11_sess s;

    if (k == NULL)
        return;
    /* Session objects keyx made are destroyed now; token keys stay on the token. After a fork
     * the child's module has no such object (and the parent's is not the child's to destroy). */
    ERR_set_mark(); /* free() reports nothing: a gone token took the object with it */
    if (k->owned && p11_dev_current(d, k->gen) && p11_session_get(d, k->tok, &s) == 1) {
        CK_RV rv = s.f->C_DestroyObject(s.h, k->obj);

        p11_session_put(&s, rv == CKR_OBJECT_HANDLE_INVALID ? CKR_OK : rv);
    }
    ERR_pop_to_mark();
    if (k->owned)
        p11_dev_objects(d, k->gen, -1);
    OPENSSL_free(k->uri);
    OPENSSL_free(k->asked);
    EVP_PKEY_free(k->pub);
    OPENSSL_free(k);
}

const keyx_backend_ops keyx_pkcs11_backend = {
    .name = "pkcs11",
    .exports_private = 0,
    .open = p11_open,
    .close = p11_close,
    .supports = p11_supports,
    .generate = p11_generate,
    .public_raw = p11_public_raw,
    .import = p11_import,
    .load = p11_load,
    .locator = p11_locator,
    .objects = p11_objects,
    .derive = p11_derive,
    .sign_check = p11_sign_check,
    .sign = p11_sign,
    .free = p11_free,
    .rsa_decrypt = p11_rsa_decrypt_op,
    .describe = p11_describe,
    .call_limit_ms = p11_call_limit_ms,
};
