/* keyx-test-derive: the key-agreement driver of the test suite.
 *
 * Loads keyx (or only the default provider) into a fresh library context and derives shared
 * secrets the way an application does: private keys built with EVP_PKEY_fromdata on a keymgmt
 * fetched with "provider=keyx" (or "provider=default" with --provider default, the independent
 * cross-check), derived through EVP_PKEY_CTX_new_from_pkey(libctx, priv, "provider=...").
 *
 * usage: keyx-test-derive [options] [mode ...]
 *   --module DIR         directory of keyx.so (default: $OPENSSL_MODULES)
 *   --config FILE        load FILE into the library context instead of loading providers by hand
 *   --provider NAME      keyx (default) or default: who holds the private key and derives
 *   --peer-provider NAME who builds raw peer keys: same (default), keyx or default
 *   --dh-pad 0|1         set the DH exchange's pad parameter
 *   --backend NAME       import private keys into keyx's backend NAME (software, tpm, pkcs11)
 *                        through the "keyx-backend" import parameter
 *
 * modes:
 *   derive (default)     vectors on stdin, one a line: "id alg group priv peerform peer"
 *                        alg EC|X25519|X448|DH; group P-256|P-384|P-521|X25519|X448|ffdheNNNN|
 *                        explicit:P:G[:Q] (hex); priv: EC and DH a hex number, X25519/X448 raw
 *                        hex; peerform spki (DER SubjectPublicKeyInfo, decoded by the default
 *                        provider) or raw (encoded point, raw key, DH public value); "-" is empty.
 *                        prints "id ok <secret hex>" or "id err <stage>: <errors>"
 *   pair ALG GROUP [zero] two key pairs made by the default provider, as lines
 *                        "A <priv> <encoded pub> <spki>", "B ...", "S <secret>" (DH padded);
 *                        zero: repeat until the secret starts with a zero byte
 *   params GROUP         "p q g" (hex) of a named DH group
 *   uses ALG GROUP N     generate a key through --provider, print "pub <encoded pub>", then
 *                        derive N times with a default-provider peer: "i ok <hex>" / "i err ..."
 *   twice URI GROUP      load the EC key at URI twice (OSSL_STORE), free the first, derive with
 *                        the second: "pub <hex>", "peer <peer scalar hex>", "1 ok <secret>"
 *   kdf KEY PEER TYPE DIGEST OUTLEN UKM [CEKALG [PROPS]]
 *                        KEY (private) and PEER (public) loaded by URI or file name (OSSL_STORE,
 *                        no property query); the exchange through --provider with kdf-type TYPE,
 *                        kdf-digest DIGEST (kdf-digest-props PROPS), kdf-outlen OUTLEN, kdf-ukm
 *                        UKM (hex, "-": not set) and cekalg CEKALG ("-": not set). Prints
 *                        "provider <who derives>", "get <kdf-type> <kdf-digest> <kdf-outlen>
 *                        <ukm hex> <cekalg>" (read back; "-" when empty), "size <query answer>",
 *                        "1 ok <secret>" / "1 err <stage>: <errors>"
 */
#define _POSIX_C_SOURCE 200809L

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/provider.h>
#include <openssl/store.h>
#include <openssl/x509.h>

#include "hexio.h"

#define DEFAULT_PQ "provider=default"

static OSSL_LIB_CTX *libctx;
static const char *prov_name = "keyx";
static char propq[64];
static char peer_propq[64];
static int dh_pad = -1;
static const char *import_backend; /* --backend: keyx backend that holds imported private keys */

static BIGNUM *bn_from_hex(const char *s)
{
    BIGNUM *bn = NULL;

    if (strcmp(s, "-") == 0 || *s == '\0')
        return BN_new();
    if (BN_hex2bn(&bn, s) != (int)strlen(s)) {
        BN_free(bn);
        return NULL;
    }
    return bn;
}

static int is_ecx(const char *alg)
{
    return strcmp(alg, "X25519") == 0 || strcmp(alg, "X448") == 0;
}

static int is_explicit(const char *group)
{
    return strncmp(group, "explicit:", 9) == 0;
}

/* ---- DH domain parameters -------------------------------------------------------------- */

typedef struct dh_domain {
    BIGNUM *p, *q, *g; /* q may be NULL */
} dh_domain;

static void dh_domain_clear(dh_domain *d)
{
    BN_free(d->p);
    BN_free(d->q);
    BN_free(d->g);
    memset(d, 0, sizeof(*d));
}

/* p, q, g of a named group (from the default provider) or of "explicit:P:G[:Q]". */
static int dh_domain_get(const char *group, dh_domain *d)
{
    memset(d, 0, sizeof(*d));
    if (is_explicit(group)) {
        char *copy = OPENSSL_strdup(group + 9), *save = NULL, *tok;
        int ok = 0;

        if (copy == NULL)
            return 0;
        if ((tok = strtok_r(copy, ":", &save)) != NULL && (d->p = bn_from_hex(tok)) != NULL &&
            (tok = strtok_r(NULL, ":", &save)) != NULL && (d->g = bn_from_hex(tok)) != NULL) {
            ok = 1;
            if ((tok = strtok_r(NULL, ":", &save)) != NULL && (d->q = bn_from_hex(tok)) == NULL)
                ok = 0;
        }
        OPENSSL_free(copy);
        if (!ok)
            dh_domain_clear(d);
        return ok;
    } else {
        EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_name(libctx, "DH", DEFAULT_PQ);
        EVP_PKEY *pk = NULL;
        OSSL_PARAM params[2];
        int ok;

        params[0] = OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, (char *)group, 0);
        params[1] = OSSL_PARAM_construct_end();
        ok = ctx != NULL && EVP_PKEY_fromdata_init(ctx) > 0 &&
             EVP_PKEY_fromdata(ctx, &pk, EVP_PKEY_KEY_PARAMETERS, params) > 0 &&
             EVP_PKEY_get_bn_param(pk, OSSL_PKEY_PARAM_FFC_P, &d->p) > 0 &&
             EVP_PKEY_get_bn_param(pk, OSSL_PKEY_PARAM_FFC_G, &d->g) > 0;
        if (ok)
            EVP_PKEY_get_bn_param(pk, OSSL_PKEY_PARAM_FFC_Q, &d->q);
        EVP_PKEY_free(pk);
        EVP_PKEY_CTX_free(ctx);
        if (!ok)
            dh_domain_clear(d);
        return ok;
    }
}

/* Adds the domain (group name, or explicit P/G/Q) of alg/group to bld. */
static int push_domain(OSSL_PARAM_BLD *bld, const char *alg, const char *group, dh_domain *dh)
{
    if (strcmp(alg, "EC") == 0)
        return OSSL_PARAM_BLD_push_utf8_string(bld, OSSL_PKEY_PARAM_GROUP_NAME, group, 0);
    if (strcmp(alg, "DH") != 0)
        return 1;
    if (!is_explicit(group))
        return OSSL_PARAM_BLD_push_utf8_string(bld, OSSL_PKEY_PARAM_GROUP_NAME, group, 0);
    return OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_FFC_P, dh->p) &&
           OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_FFC_G, dh->g) &&
           (dh->q == NULL || OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_FFC_Q, dh->q));
}

static EVP_PKEY *fromdata(const char *alg, const char *pq, int selection, OSSL_PARAM_BLD *bld)
{
    OSSL_PARAM *params = OSSL_PARAM_BLD_to_param(bld);
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_name(libctx, alg, pq);
    EVP_PKEY *pk = NULL;

    if (params == NULL || ctx == NULL || EVP_PKEY_fromdata_init(ctx) <= 0 ||
        EVP_PKEY_fromdata(ctx, &pk, selection, params) <= 0) {
        EVP_PKEY_free(pk);
        pk = NULL;
    }
    EVP_PKEY_CTX_free(ctx);
    OSSL_PARAM_free(params);
    return pk;
}

/* ---- keys from vectors ----------------------------------------------------------------- */

/* The public key of priv computed by the default provider: EC point (uncompressed), raw
 * X25519/X448 key, or DH g^x mod p as a big-endian number. */
static unsigned char *public_of(const char *alg, const char *group, const char *privhex,
                                dh_domain *dh, size_t *len)
{
    unsigned char *out = NULL;

    if (strcmp(alg, "EC") == 0) {
        int nid = EC_curve_nist2nid(group);
        EC_GROUP *grp =
            nid == NID_undef ? NULL : EC_GROUP_new_by_curve_name_ex(libctx, DEFAULT_PQ, nid);
        EC_POINT *pt = grp == NULL ? NULL : EC_POINT_new(grp);
        BIGNUM *x = bn_from_hex(privhex);

        if (pt != NULL && x != NULL && EC_POINT_mul(grp, pt, x, NULL, NULL, NULL))
            *len = EC_POINT_point2buf(grp, pt, POINT_CONVERSION_UNCOMPRESSED, &out, NULL);
        BN_clear_free(x);
        EC_POINT_free(pt);
        EC_GROUP_free(grp);
        if (out != NULL && *len == 0) {
            OPENSSL_free(out);
            out = NULL;
        }
    } else if (is_ecx(alg)) {
        size_t privlen = 0;
        unsigned char *priv = unhex(privhex, &privlen);
        EVP_PKEY *pk =
            priv == NULL ? NULL
                         : EVP_PKEY_new_raw_private_key_ex(libctx, alg, DEFAULT_PQ, priv, privlen);

        if (pk != NULL && EVP_PKEY_get_raw_public_key(pk, NULL, len) > 0 &&
            (out = OPENSSL_malloc(*len)) != NULL &&
            EVP_PKEY_get_raw_public_key(pk, out, len) <= 0) {
            OPENSSL_free(out);
            out = NULL;
        }
        EVP_PKEY_free(pk);
        OPENSSL_clear_free(priv, privlen);
    } else if (strcmp(alg, "DH") == 0) {
        BIGNUM *x = bn_from_hex(privhex), *y = BN_new();
        BN_CTX *bnctx = BN_CTX_new_ex(libctx);

        if (x != NULL && y != NULL && bnctx != NULL && BN_mod_exp(y, dh->g, x, dh->p, bnctx)) {
            *len = (size_t)BN_num_bytes(y);
            out = OPENSSL_malloc(*len + 1);
            if (out != NULL)
                BN_bn2bin(y, out);
        }
        BN_CTX_free(bnctx);
        BN_clear_free(x);
        BN_free(y);
    }
    return out;
}

static EVP_PKEY *make_private(const char *alg, const char *group, const char *privhex,
                              dh_domain *dh)
{
    OSSL_PARAM_BLD *bld = OSSL_PARAM_BLD_new();
    size_t publen = 0, privlen = 0;
    unsigned char *pub = public_of(alg, group, privhex, dh, &publen);
    unsigned char *priv = NULL;
    BIGNUM *x = NULL, *y = NULL;
    EVP_PKEY *pk = NULL;
    int ok = bld != NULL && pub != NULL && push_domain(bld, alg, group, dh);

    if (ok && is_ecx(alg)) {
        ok = (priv = unhex(privhex, &privlen)) != NULL &&
             OSSL_PARAM_BLD_push_octet_string(bld, OSSL_PKEY_PARAM_PRIV_KEY, priv, privlen) &&
             OSSL_PARAM_BLD_push_octet_string(bld, OSSL_PKEY_PARAM_PUB_KEY, pub, publen);
    } else if (ok && strcmp(alg, "EC") == 0) {
        ok = (x = bn_from_hex(privhex)) != NULL &&
             OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_PRIV_KEY, x) &&
             OSSL_PARAM_BLD_push_octet_string(bld, OSSL_PKEY_PARAM_PUB_KEY, pub, publen);
    } else if (ok) {
        ok = (x = bn_from_hex(privhex)) != NULL &&
             (y = BN_bin2bn(pub, (int)publen, NULL)) != NULL &&
             OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_PRIV_KEY, x) &&
             OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_PUB_KEY, y);
    }
    if (ok && import_backend != NULL)
        ok = OSSL_PARAM_BLD_push_utf8_string(bld, "keyx-backend", import_backend, 0);
    if (ok)
        pk = fromdata(alg, propq, EVP_PKEY_KEYPAIR, bld);
    OSSL_PARAM_BLD_free(bld);
    OPENSSL_clear_free(priv, privlen);
    OPENSSL_free(pub);
    BN_clear_free(x);
    BN_free(y);
    return pk;
}

static EVP_PKEY *make_peer(const char *alg, const char *group, const char *form,
                           const char *peerhex, dh_domain *dh)
{
    size_t len = 0;
    unsigned char *buf = NULL;
    EVP_PKEY *pk = NULL;

    if (strcmp(form, "spki") == 0) {
        const unsigned char *p;

        if ((buf = unhex(peerhex, &len)) == NULL)
            return NULL;
        p = buf;
        pk = d2i_PUBKEY_ex(NULL, &p, (long)len, libctx, DEFAULT_PQ);
    } else if (strcmp(form, "raw") == 0) {
        OSSL_PARAM_BLD *bld = OSSL_PARAM_BLD_new();
        BIGNUM *y = NULL;
        int ok = bld != NULL && push_domain(bld, alg, group, dh);

        if (ok && strcmp(alg, "DH") == 0)
            ok = (y = bn_from_hex(peerhex)) != NULL &&
                 OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_PUB_KEY, y);
        else if (ok)
            ok = (buf = unhex(peerhex, &len)) != NULL &&
                 OSSL_PARAM_BLD_push_octet_string(bld, OSSL_PKEY_PARAM_PUB_KEY, buf, len);
        if (ok)
            pk = fromdata(alg, peer_propq, EVP_PKEY_PUBLIC_KEY, bld);
        BN_free(y);
        OSSL_PARAM_BLD_free(bld);
    } else {
        ERR_raise_data(ERR_LIB_USER, ERR_R_PASSED_INVALID_ARGUMENT, "peer form %s", form);
    }
    OPENSSL_free(buf);
    return pk;
}

/* Derives into a new buffer (*len its size), with a size query first like applications do. */
static unsigned char *derive(EVP_PKEY *priv, EVP_PKEY *peer, size_t *len, const char **stage)
{
    EVP_PKEY_CTX *ctx;
    unsigned char *out = NULL;

    *stage = "init";
    ctx = EVP_PKEY_CTX_new_from_pkey(libctx, priv, propq);
    if (ctx == NULL || EVP_PKEY_derive_init(ctx) <= 0)
        goto end;
    if (dh_pad >= 0 && EVP_PKEY_get_base_id(priv) == EVP_PKEY_DH &&
        EVP_PKEY_CTX_set_dh_pad(ctx, dh_pad) <= 0)
        goto end;
    *stage = "set_peer";
    if (EVP_PKEY_derive_set_peer(ctx, peer) <= 0)
        goto end;
    *stage = "size";
    if (EVP_PKEY_derive(ctx, NULL, len) <= 0 || *len == 0 || *len > 4096)
        goto end;
    *stage = "derive";
    if ((out = OPENSSL_malloc(*len)) == NULL)
        goto end;
    if (EVP_PKEY_derive(ctx, out, len) <= 0) {
        OPENSSL_clear_free(out, *len);
        out = NULL;
    }
end:
    EVP_PKEY_CTX_free(ctx);
    return out;
}

/* The key must live in the provider under test, or the test would prove nothing. */
static int check_provider(EVP_PKEY *pk)
{
    const OSSL_PROVIDER *p = EVP_PKEY_get0_provider(pk);
    const char *name = p == NULL ? "(legacy)" : OSSL_PROVIDER_get0_name(p);

    if (strcmp(name, prov_name) != 0) {
        ERR_raise_data(ERR_LIB_USER, ERR_R_INTERNAL_ERROR, "key held by provider %s, not %s", name,
                       prov_name);
        return 0;
    }
    return 1;
}

static void run_vector(char *line)
{
    char *save = NULL;
    char *id = strtok_r(line, " \t\r\n", &save);
    char *alg = strtok_r(NULL, " \t\r\n", &save);
    char *group = strtok_r(NULL, " \t\r\n", &save);
    char *privhex = strtok_r(NULL, " \t\r\n", &save);
    char *form = strtok_r(NULL, " \t\r\n", &save);
    char *peerhex = strtok_r(NULL, " \t\r\n", &save);
    dh_domain dh = {0};
    EVP_PKEY *priv = NULL, *peer = NULL;
    unsigned char *secret = NULL;
    size_t len = 0;
    const char *stage = "vector";

    if (id == NULL || id[0] == '#')
        return;
    ERR_clear_error();
    printf("%s ", id);
    if (peerhex == NULL) {
        ERR_raise_data(ERR_LIB_USER, ERR_R_PASSED_INVALID_ARGUMENT, "malformed vector line");
        goto end;
    }
    if (strcmp(alg, "DH") == 0 && !dh_domain_get(group, &dh))
        goto end;
    stage = "priv";
    if ((priv = make_private(alg, group, privhex, &dh)) == NULL || !check_provider(priv))
        goto end;
    stage = "peer";
    if ((peer = make_peer(alg, group, form, peerhex, &dh)) == NULL)
        goto end;
    secret = derive(priv, peer, &len, &stage);
end:
    if (secret != NULL) {
        printf("ok ");
        print_hex(secret, len);
    } else {
        print_errors(stage);
    }
    printf("\n");
    fflush(stdout);
    OPENSSL_clear_free(secret, len);
    EVP_PKEY_free(priv);
    EVP_PKEY_free(peer);
    dh_domain_clear(&dh);
    ERR_clear_error();
}

static int mode_derive(void)
{
    char *line = NULL;
    size_t cap = 0;

    while (getline(&line, &cap, stdin) >= 0)
        run_vector(line);
    free(line);
    return 0;
}

/* ---- generated keys -------------------------------------------------------------------- */

static EVP_PKEY *generate(const char *alg, const char *group, const char *pq)
{
    EVP_PKEY_CTX *ctx = NULL;
    EVP_PKEY *dom = NULL, *pk = NULL;

    if (strcmp(alg, "DH") == 0 && is_explicit(group)) {
        dh_domain dh;
        OSSL_PARAM_BLD *bld = OSSL_PARAM_BLD_new();

        if (bld != NULL && dh_domain_get(group, &dh)) {
            if (push_domain(bld, alg, group, &dh))
                dom = fromdata(alg, pq, EVP_PKEY_KEY_PARAMETERS, bld);
            dh_domain_clear(&dh);
        }
        OSSL_PARAM_BLD_free(bld);
        if (dom == NULL)
            return NULL;
        ctx = EVP_PKEY_CTX_new_from_pkey(libctx, dom, pq);
    } else {
        ctx = EVP_PKEY_CTX_new_from_name(libctx, alg, pq);
    }
    if (ctx == NULL || EVP_PKEY_keygen_init(ctx) <= 0)
        goto end;
    if (dom == NULL && !is_ecx(alg) && EVP_PKEY_CTX_set_group_name(ctx, group) <= 0)
        goto end;
    if (EVP_PKEY_generate(ctx, &pk) <= 0) {
        EVP_PKEY_free(pk);
        pk = NULL;
    }
end:
    EVP_PKEY_CTX_free(ctx);
    EVP_PKEY_free(dom);
    return pk;
}

static int print_encoded_pub(EVP_PKEY *pk)
{
    unsigned char buf[1024];
    size_t len = 0;

    if (EVP_PKEY_get_octet_string_param(pk, OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, buf, sizeof(buf),
                                        &len) <= 0)
        return 0;
    print_hex(buf, len);
    return 1;
}

static int print_key(const char *tag, const char *alg, EVP_PKEY *pk)
{
    unsigned char *der = NULL;
    int derlen, ok = 0;

    printf("%s ", tag);
    if (is_ecx(alg)) {
        unsigned char priv[64];
        size_t len = sizeof(priv);

        if (EVP_PKEY_get_raw_private_key(pk, priv, &len) <= 0)
            return 0;
        print_hex(priv, len);
        OPENSSL_cleanse(priv, sizeof(priv));
    } else {
        BIGNUM *x = NULL;
        char *hex;

        if (EVP_PKEY_get_bn_param(pk, OSSL_PKEY_PARAM_PRIV_KEY, &x) <= 0)
            return 0;
        hex = BN_bn2hex(x);
        BN_clear_free(x);
        if (hex == NULL)
            return 0;
        for (char *c = hex; *c != '\0'; c++)
            *c = (char)tolower((unsigned char)*c);
        printf("%s", hex);
        OPENSSL_clear_free(hex, strlen(hex));
    }
    printf(" ");
    if (!print_encoded_pub(pk))
        return 0;
    printf(" ");
    if ((derlen = i2d_PUBKEY(pk, &der)) > 0) {
        print_hex(der, (size_t)derlen);
        ok = 1;
    }
    OPENSSL_free(der);
    printf("\n");
    return ok;
}

static int mode_pair(const char *alg, const char *group, int want_zero)
{
    EVP_PKEY *a = NULL, *b = NULL;
    unsigned char *secret = NULL;
    size_t len = 0;
    const char *stage = "pair";
    int ok = 0, saved_pad = dh_pad;

    dh_pad = 1; /* the full-size secret, so that a leading zero byte shows */
    for (int tries = 0; tries < 20000; tries++) {
        EVP_PKEY_free(a);
        EVP_PKEY_free(b);
        OPENSSL_clear_free(secret, len);
        secret = NULL;
        a = generate(alg, group, DEFAULT_PQ);
        b = generate(alg, group, DEFAULT_PQ);
        if (a == NULL || b == NULL || (secret = derive(a, b, &len, &stage)) == NULL)
            break;
        if (!want_zero || secret[0] == 0) {
            ok = 1;
            break;
        }
    }
    dh_pad = saved_pad;
    if (!ok && secret != NULL)
        ERR_raise_data(ERR_LIB_USER, ERR_R_INTERNAL_ERROR, "no secret with a leading zero byte");
    if (ok && print_key("A", alg, a) && print_key("B", alg, b)) {
        printf("S ");
        print_hex(secret, len);
        printf("\n");
    } else {
        print_errors(stage);
        printf("\n");
        ok = 0;
    }
    OPENSSL_clear_free(secret, len);
    EVP_PKEY_free(a);
    EVP_PKEY_free(b);
    return ok ? 0 : 1;
}

static int mode_params(const char *group)
{
    dh_domain d;
    char *p, *q, *g;
    int ok;

    if (!dh_domain_get(group, &d) || d.q == NULL) {
        print_errors("params");
        printf("\n");
        return 1;
    }
    p = BN_bn2hex(d.p);
    q = BN_bn2hex(d.q);
    g = BN_bn2hex(d.g);
    ok = p != NULL && q != NULL && g != NULL;
    if (ok)
        printf("%s %s %s\n", p, q, g);
    OPENSSL_free(p);
    OPENSSL_free(q);
    OPENSSL_free(g);
    dh_domain_clear(&d);
    return ok ? 0 : 1;
}

static int mode_uses(const char *alg, const char *group, int n)
{
    EVP_PKEY *key = generate(alg, group, propq), *peer = NULL;
    int rc = 0;

    if (key == NULL || !check_provider(key)) {
        print_errors("generate");
        printf("\n");
        rc = 1;
        goto end;
    }
    printf("pub ");
    if (!print_encoded_pub(key)) {
        print_errors("pub");
        printf("\n");
        rc = 1;
        goto end;
    }
    printf("\n");
    if ((peer = generate(alg, group, DEFAULT_PQ)) == NULL) {
        print_errors("peer");
        printf("\n");
        rc = 1;
        goto end;
    }
    for (int i = 1; i <= n; i++) {
        size_t len = 0;
        const char *stage;
        unsigned char *secret;

        ERR_clear_error();
        secret = derive(key, peer, &len, &stage);
        printf("%d ", i);
        if (secret != NULL) {
            printf("ok ");
            print_hex(secret, len);
        } else {
            print_errors(stage);
        }
        printf("\n");
        fflush(stdout);
        OPENSSL_clear_free(secret, len);
    }
end:
    EVP_PKEY_free(key);
    EVP_PKEY_free(peer);
    return rc;
}

/* twice URI GROUP: the key at URI loaded twice through OSSL_STORE, the first copy freed, then a
 * derive with the second (a hardware backend must not let one free break the other). Prints
 * "pub <encoded pub>", "peer <peer's private scalar>" (a throwaway default-provider key, for the
 * cross-check) and "1 ok <secret>" / "1 err ...". */
static EVP_PKEY *store_load(const char *uri)
{
    OSSL_STORE_CTX *st = OSSL_STORE_open_ex(uri, libctx, propq, NULL, NULL, NULL, NULL, NULL);
    EVP_PKEY *pk = NULL;

    while (st != NULL && pk == NULL && !OSSL_STORE_eof(st)) {
        OSSL_STORE_INFO *info = OSSL_STORE_load(st);

        if (info != NULL && OSSL_STORE_INFO_get_type(info) == OSSL_STORE_INFO_PKEY)
            pk = OSSL_STORE_INFO_get1_PKEY(info);
        OSSL_STORE_INFO_free(info);
    }
    OSSL_STORE_close(st);
    return pk;
}

static int mode_twice(const char *uri, const char *group)
{
    EVP_PKEY *k1 = store_load(uri), *k2 = store_load(uri), *peer = NULL;
    BIGNUM *x = NULL;
    unsigned char *secret = NULL;
    const char *stage = "load";
    size_t len = 0;
    int rc = 1;

    if (k1 == NULL || k2 == NULL)
        goto end;
    EVP_PKEY_free(k1);
    k1 = NULL;
    stage = "peer";
    if ((peer = generate("EC", group, DEFAULT_PQ)) == NULL ||
        EVP_PKEY_get_bn_param(peer, OSSL_PKEY_PARAM_PRIV_KEY, &x) != 1)
        goto end;
    printf("pub ");
    if (!print_encoded_pub(k2))
        goto end;
    printf("\npeer ");
    {
        char *hex = BN_bn2hex(x);

        printf("%s\n", hex != NULL ? hex : "-");
        OPENSSL_free(hex);
    }
    ERR_clear_error();
    secret = derive(k2, peer, &len, &stage);
    printf("1 ");
    if (secret != NULL) {
        printf("ok ");
        print_hex(secret, len);
        rc = 0;
    }
end:
    if (rc != 0)
        print_errors(stage);
    printf("\n");
    OPENSSL_clear_free(secret, len);
    BN_clear_free(x);
    EVP_PKEY_free(k1);
    EVP_PKEY_free(k2);
    EVP_PKEY_free(peer);
    return rc;
}

/* kdf: the exchange's KDF parameters set as EVP_PKEY_CTX params, read back, then derive. */
static EVP_PKEY *load_any(const char *uri)
{
    OSSL_STORE_CTX *st = OSSL_STORE_open_ex(uri, libctx, NULL, NULL, NULL, NULL, NULL, NULL);
    EVP_PKEY *pk = NULL;

    while (st != NULL && pk == NULL && !OSSL_STORE_eof(st)) {
        OSSL_STORE_INFO *info = OSSL_STORE_load(st);
        int t = info != NULL ? OSSL_STORE_INFO_get_type(info) : 0;

        if (t == OSSL_STORE_INFO_PKEY)
            pk = OSSL_STORE_INFO_get1_PKEY(info);
        else if (t == OSSL_STORE_INFO_PUBKEY)
            pk = OSSL_STORE_INFO_get1_PUBKEY(info);
        OSSL_STORE_INFO_free(info);
    }
    OSSL_STORE_close(st);
    return pk;
}

static void print_or_dash(const char *s)
{
    printf("%s", s != NULL && s[0] != '\0' ? s : "-");
}

static int mode_kdf(char **a, int n)
{
    EVP_PKEY *key = load_any(a[0]), *peer = load_any(a[1]);
    EVP_PKEY_CTX *ctx = NULL;
    OSSL_PARAM set[8], get[6], *q = set;
    unsigned char *ukm = NULL, *secret = NULL, *gukm = NULL;
    char gtype[64] = "", gdigest[64] = "", gcek[64] = "";
    size_t outlen = strtoul(a[4], NULL, 10), ukmlen = 0, goutlen = 0, len = 0;
    const char *stage = "load";
    const OSSL_PROVIDER *prov;
    int rc = 1;

    if (key == NULL || peer == NULL)
        goto end;
    stage = "init";
    if ((ctx = EVP_PKEY_CTX_new_from_pkey(libctx, key, propq)) == NULL ||
        EVP_PKEY_derive_init(ctx) <= 0 || EVP_PKEY_derive_set_peer(ctx, peer) <= 0)
        goto end;
    prov = EVP_PKEY_CTX_get0_provider(ctx);
    printf("provider %s\n", prov != NULL ? OSSL_PROVIDER_get0_name(prov) : "(none)");
    stage = "set_params";
    *q++ = OSSL_PARAM_construct_utf8_string(OSSL_EXCHANGE_PARAM_KDF_TYPE, a[2], 0);
    *q++ = OSSL_PARAM_construct_utf8_string(OSSL_EXCHANGE_PARAM_KDF_DIGEST, a[3], 0);
    if (n > 7)
        *q++ = OSSL_PARAM_construct_utf8_string(OSSL_EXCHANGE_PARAM_KDF_DIGEST_PROPS, a[7], 0);
    *q++ = OSSL_PARAM_construct_size_t(OSSL_EXCHANGE_PARAM_KDF_OUTLEN, &outlen);
    if (strcmp(a[5], "-") != 0) {
        if ((ukm = unhex(a[5], &ukmlen)) == NULL)
            goto end;
        *q++ = OSSL_PARAM_construct_octet_string(OSSL_EXCHANGE_PARAM_KDF_UKM, ukm, ukmlen);
    }
    if (n > 6 && strcmp(a[6], "-") != 0)
        *q++ = OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_CEK_ALG, a[6], 0);
    *q = OSSL_PARAM_construct_end();
    if (EVP_PKEY_CTX_set_params(ctx, set) <= 0)
        goto end;
    /* The UKM is the context's own copy from here on. */
    OPENSSL_free(ukm);
    ukm = NULL;
    stage = "get_params";
    q = get;
    *q++ = OSSL_PARAM_construct_utf8_string(OSSL_EXCHANGE_PARAM_KDF_TYPE, gtype, sizeof(gtype));
    *q++ =
        OSSL_PARAM_construct_utf8_string(OSSL_EXCHANGE_PARAM_KDF_DIGEST, gdigest, sizeof(gdigest));
    *q++ = OSSL_PARAM_construct_size_t(OSSL_EXCHANGE_PARAM_KDF_OUTLEN, &goutlen);
    *q++ = OSSL_PARAM_construct_octet_ptr(OSSL_EXCHANGE_PARAM_KDF_UKM, (void **)&gukm, 0);
    if (EVP_PKEY_get_base_id(key) == EVP_PKEY_DH || EVP_PKEY_is_a(key, "DHX"))
        *q++ = OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_CEK_ALG, gcek, sizeof(gcek));
    *q = OSSL_PARAM_construct_end();
    if (EVP_PKEY_CTX_get_params(ctx, get) <= 0)
        goto end;
    printf("get ");
    print_or_dash(gtype);
    printf(" ");
    print_or_dash(gdigest);
    printf(" %zu ", goutlen);
    print_hex(gukm, gukm != NULL ? get[3].return_size : 0);
    printf(" ");
    print_or_dash(gcek);
    printf("\n");
    stage = "size";
    if (EVP_PKEY_derive(ctx, NULL, &len) <= 0)
        goto end;
    printf("size %zu\n", len);
    stage = "derive";
    if (len == 0 || len > 4096 || (secret = OPENSSL_malloc(len)) == NULL ||
        EVP_PKEY_derive(ctx, secret, &len) <= 0)
        goto end;
    printf("1 ok ");
    print_hex(secret, len);
    printf("\n");
    rc = 0;
end:
    if (rc != 0) {
        printf("1 ");
        print_errors(stage);
        printf("\n");
    }
    OPENSSL_free(ukm);
    OPENSSL_clear_free(secret, len);
    EVP_PKEY_CTX_free(ctx);
    EVP_PKEY_free(key);
    EVP_PKEY_free(peer);
    return rc;
}

/* ---- main ------------------------------------------------------------------------------ */

static int usage(void)
{
    fprintf(stderr,
            "usage: keyx-test-derive [--module DIR] [--config FILE] "
            "[--provider keyx|default] [--peer-provider same|keyx|default] "
            "[--dh-pad 0|1] [--backend NAME] [derive | pair ALG GROUP [zero] | params GROUP | "
            "uses ALG GROUP N | twice URI GROUP | "
            "kdf KEY PEER TYPE DIGEST OUTLEN UKM [CEKALG [PROPS]]]\n");
    return 2;
}

int main(int argc, char **argv)
{
    const char *module = getenv("OPENSSL_MODULES"), *config = NULL, *peer_prov = "same";
    OSSL_PROVIDER *keyx = NULL, *dflt = NULL;
    int i, rc = 1;

    for (i = 1; i < argc && strncmp(argv[i], "--", 2) == 0; i += 2) {
        if (i + 1 >= argc)
            return usage();
        if (strcmp(argv[i], "--module") == 0)
            module = argv[i + 1];
        else if (strcmp(argv[i], "--config") == 0)
            config = argv[i + 1];
        else if (strcmp(argv[i], "--provider") == 0)
            prov_name = argv[i + 1];
        else if (strcmp(argv[i], "--peer-provider") == 0)
            peer_prov = argv[i + 1];
        else if (strcmp(argv[i], "--dh-pad") == 0)
            dh_pad = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--backend") == 0)
            import_backend = argv[i + 1];
        else
            return usage();
    }
    if (strcmp(prov_name, "keyx") != 0 && strcmp(prov_name, "default") != 0)
        return usage();
    snprintf(propq, sizeof(propq), "provider=%s", prov_name);
    snprintf(peer_propq, sizeof(peer_propq), "provider=%s",
             strcmp(peer_prov, "same") == 0 ? prov_name : peer_prov);

    if ((libctx = OSSL_LIB_CTX_new()) == NULL)
        goto end;
    if (config != NULL) {
        if (!OSSL_LIB_CTX_load_config(libctx, config)) {
            fprintf(stderr, "keyx-test-derive: cannot load config %s\n", config);
            ERR_print_errors_fp(stderr);
            goto end;
        }
    } else {
        if (strcmp(prov_name, "keyx") == 0) {
            if (module != NULL && !OSSL_PROVIDER_set_default_search_path(libctx, module))
                goto end;
            if ((keyx = OSSL_PROVIDER_load(libctx, "keyx")) == NULL) {
                fprintf(stderr, "keyx-test-derive: cannot load provider keyx from %s\n",
                        module != NULL ? module : "the default modules directory");
                ERR_print_errors_fp(stderr);
                goto end;
            }
        }
        if ((dflt = OSSL_PROVIDER_load(libctx, "default")) == NULL) {
            fprintf(stderr, "keyx-test-derive: cannot load provider default\n");
            ERR_print_errors_fp(stderr);
            goto end;
        }
    }

    if (i >= argc || strcmp(argv[i], "derive") == 0)
        rc = i + 1 >= argc ? mode_derive() : usage();
    else if (strcmp(argv[i], "pair") == 0 && (argc - i == 3 || argc - i == 4))
        rc = mode_pair(argv[i + 1], argv[i + 2], argc - i == 4 && !strcmp(argv[i + 3], "zero"));
    else if (strcmp(argv[i], "params") == 0 && argc - i == 2)
        rc = mode_params(argv[i + 1]);
    else if (strcmp(argv[i], "uses") == 0 && argc - i == 4)
        rc = mode_uses(argv[i + 1], argv[i + 2], atoi(argv[i + 3]));
    else if (strcmp(argv[i], "twice") == 0 && argc - i == 3)
        rc = mode_twice(argv[i + 1], argv[i + 2]);
    else if (strcmp(argv[i], "kdf") == 0 && argc - i >= 7 && argc - i <= 9)
        rc = mode_kdf(argv + i + 1, argc - i - 1);
    else
        rc = usage();
end:
    if (rc == 1 && ERR_peek_error() != 0)
        ERR_print_errors_fp(stderr);
    fflush(stdout);
    OSSL_PROVIDER_unload(keyx);
    OSSL_PROVIDER_unload(dflt);
    OSSL_LIB_CTX_free(libctx);
    return rc;
}
