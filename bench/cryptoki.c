/* keyx-bench: raw Cryptoki, the floor the pkcs11 figures are measured against. The module is
 * dlopen'ed by path (the same library instance keyx uses in this process; p11-kit's client module
 * gives every C_GetFunctionList a new instance and connection, so the remote rows have their
 * own, and count their calls in it), and every operation is
 * the minimum a caller needs: one C_GenerateKeyPair, one read of the public value into a fixed
 * buffer, one C_DeriveKey into a generic secret, one read, the destroys. The templates are those
 * of a careful implementation: session objects, private keys sensitive and not extractable.
 *
 * RSA-OAEP: SoftHSM 2.6 does CKM_RSA_PKCS_OAEP only with SHA-1 and no label, so a raw caller
 * wanting OAEP-SHA256 decrypts with CKM_RSA_X_509 and decodes OAEP itself. The decoding is
 * OpenSSL's RSA_padding_check_PKCS1_OAEP_mgf1 (constant time), the one keyx uses for the same
 * case; it is deprecated in 3.0 without a replacement outside a provider, hence
 * OPENSSL_SUPPRESS_DEPRECATED in this file only (bench code, not linked into keyx). */
#define OPENSSL_SUPPRESS_DEPRECATED
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/rsa.h>

#include <p11-kit/pkcs11.h>

#include "bench.h"

struct raw_p11 {
    void *dl;
    CK_FUNCTION_LIST_PTR f;
    int we_initialized;
    CK_SESSION_HANDLE h;
    CK_OBJECT_HANDLE key;     /* the token's private key */
    CK_OBJECT_HANDLE rsakey;  /* the token's RSA private key (raw_p11_rsa_key) */
    size_t rsalen;            /* its modulus bytes */
    unsigned char point[133]; /* its public point, uncompressed */
    size_t pointlen;
    /* ffdhe2048 domain, read once from the default provider */
    unsigned char prime[512], base[8];
    size_t primelen, baselen;
};

static const CK_BBOOL yes = CK_TRUE, no = CK_FALSE;

/* A session serves one thread at a time: a worker thread opens its own (raw_p11_thread_begin),
 * used by every operation of that thread; other threads use the one raw_p11_open made. */
static _Thread_local CK_SESSION_HANDLE thread_session;
#define SESS(r) (thread_session != CK_INVALID_HANDLE ? thread_session : (r)->h)
/* DER OID of prime256v1, the CKA_EC_PARAMS of a P-256 key. */
static const unsigned char p256_params[] = {0x06, 0x08, 0x2A, 0x86, 0x48,
                                            0xCE, 0x3D, 0x03, 0x01, 0x07};

#define ATTR(t, p, l)                                                                              \
    {                                                                                              \
        (t), (void *)(p), (CK_ULONG)(l)                                                            \
    }
#define NATTR(a) ((CK_ULONG)(sizeof(a) / sizeof((a)[0])))

static int fail(const char *what, CK_RV rv)
{
    fprintf(stderr, "keyx-bench: raw Cryptoki %s failed: CKR 0x%lx\n", what, (unsigned long)rv);
    return 0;
}

/* CKA_EC_POINT is a DER OCTET STRING holding the point; some modules give the bare point. */
static int unwrap_point(const unsigned char *der, size_t len, unsigned char *out, size_t *outlen)
{
    size_t hdr = 0, n = len;

    if (len > 2 && der[0] == 0x04 && der[1] < 0x80 && (size_t)der[1] + 2 == len) {
        hdr = 2;
        n = der[1];
    } else if (len > 3 && der[0] == 0x04 && der[1] == 0x81 && (size_t)der[2] + 3 == len) {
        hdr = 3;
        n = der[2];
    }
    if (n > *outlen)
        return 0;
    memcpy(out, der + hdr, n);
    *outlen = n;
    return 1;
}

static int read_pin(const char *path, char *pin, size_t size)
{
    FILE *fp = fopen(path, "r");
    size_t n;

    if (fp == NULL) {
        fprintf(stderr, "keyx-bench: cannot open the PIN file %s\n", path);
        return 0;
    }
    n = fread(pin, 1, size - 1, fp);
    fclose(fp);
    while (n > 0 && (pin[n - 1] == '\n' || pin[n - 1] == '\r'))
        n--;
    pin[n] = '\0';
    return 1;
}

static int find_slot(raw_p11 *r, const char *token, CK_SLOT_ID *slot)
{
    CK_SLOT_ID slots[64];
    CK_ULONG n = 64;
    CK_RV rv = r->f->C_GetSlotList(CK_TRUE, slots, &n);
    size_t tl = strlen(token);

    if (rv != CKR_OK)
        return fail("C_GetSlotList", rv);
    for (CK_ULONG i = 0; i < n; i++) {
        CK_TOKEN_INFO ti;
        size_t l = sizeof(ti.label);

        if (r->f->C_GetTokenInfo(slots[i], &ti) != CKR_OK)
            continue;
        while (l > 0 && ti.label[l - 1] == ' ')
            l--;
        if (l == tl && memcmp(ti.label, token, l) == 0) {
            *slot = slots[i];
            return 1;
        }
    }
    fprintf(stderr, "keyx-bench: no token labelled '%s' in the module\n", token);
    return 0;
}

static CK_OBJECT_HANDLE find_key(raw_p11 *r, CK_OBJECT_CLASS cls, const char *label)
{
    CK_ATTRIBUTE t[] = {ATTR(CKA_CLASS, &cls, sizeof(cls)), ATTR(CKA_LABEL, label, strlen(label))};
    CK_OBJECT_HANDLE objs[2];
    CK_ULONG n = 0;

    if (r->f->C_FindObjectsInit(r->h, t, NATTR(t)) != CKR_OK)
        return CK_INVALID_HANDLE;
    if (r->f->C_FindObjects(r->h, objs, 2, &n) != CKR_OK)
        n = 0;
    r->f->C_FindObjectsFinal(r->h);
    if (n != 1) {
        fprintf(stderr, "keyx-bench: %lu %s keys labelled '%s' on the token (want 1)\n",
                (unsigned long)n, cls == CKO_PRIVATE_KEY ? "private" : "public", label);
        return CK_INVALID_HANDLE;
    }
    return objs[0];
}

raw_p11 *raw_p11_open(const char *module, const char *token, const char *pin_file,
                      const char *key_label)
{
    raw_p11 *r = calloc(1, sizeof(*r));
    CK_C_GetFunctionList getfl;
    CK_C_INITIALIZE_ARGS args;
    CK_SLOT_ID slot;
    CK_OBJECT_HANDLE pubobj;
    unsigned char der[160];
    CK_ATTRIBUTE pa = ATTR(CKA_EC_POINT, der, sizeof(der));
    char pin[256];
    CK_RV rv;

    if (r == NULL)
        return NULL;
    r->h = CK_INVALID_HANDLE;
    if ((r->dl = dlopen(module, RTLD_NOW | RTLD_LOCAL)) == NULL) {
        fprintf(stderr, "keyx-bench: cannot load %s: %s\n", module, dlerror());
        goto err;
    }
    *(void **)(&getfl) = dlsym(r->dl, "C_GetFunctionList");
    if (getfl == NULL || (rv = getfl(&r->f)) != CKR_OK) {
        fprintf(stderr, "keyx-bench: %s has no usable C_GetFunctionList\n", module);
        goto err;
    }
    memset(&args, 0, sizeof(args));
    args.flags = CKF_OS_LOCKING_OK;
    rv = r->f->C_Initialize(&args);
    if (rv != CKR_OK && rv != CKR_CRYPTOKI_ALREADY_INITIALIZED) {
        fail("C_Initialize", rv);
        goto err;
    }
    r->we_initialized = rv == CKR_OK;
    if (!find_slot(r, token, &slot))
        goto err;
    if ((rv = r->f->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &r->h)) !=
        CKR_OK) {
        fail("C_OpenSession", rv);
        goto err;
    }
    if (!read_pin(pin_file, pin, sizeof(pin)))
        goto err;
    /* Login state is per application: keyx may have logged in already in this process. */
    rv = r->f->C_Login(r->h, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin));
    OPENSSL_cleanse(pin, sizeof(pin));
    if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN) {
        fail("C_Login", rv);
        goto err;
    }
    if ((r->key = find_key(r, CKO_PRIVATE_KEY, key_label)) == CK_INVALID_HANDLE ||
        (pubobj = find_key(r, CKO_PUBLIC_KEY, key_label)) == CK_INVALID_HANDLE)
        goto err;
    if ((rv = r->f->C_GetAttributeValue(r->h, pubobj, &pa, 1)) != CKR_OK) {
        fail("C_GetAttributeValue(CKA_EC_POINT)", rv);
        goto err;
    }
    r->pointlen = sizeof(r->point);
    if (!unwrap_point(der, pa.ulValueLen, r->point, &r->pointlen)) {
        fprintf(stderr, "keyx-bench: the token key's CKA_EC_POINT is not a P-256 point\n");
        goto err;
    }
    return r;
err:
    raw_p11_close(r);
    return NULL;
}

void raw_p11_end_session(raw_p11 *r)
{
    if (r != NULL && r->f != NULL && r->h != CK_INVALID_HANDLE)
        r->f->C_CloseSession(r->h);
    if (r != NULL)
        r->h = CK_INVALID_HANDLE;
}

void raw_p11_close(raw_p11 *r)
{
    if (r == NULL)
        return;
    raw_p11_end_session(r);
    /* Only the one who initialized the module finalizes it: keyx may still use it. */
    if (r->f != NULL && r->we_initialized)
        r->f->C_Finalize(NULL);
    /* The library stays loaded: keyx may hold the same instance. */
    free(r);
}

int raw_p11_thread_begin(raw_p11 *r)
{
    CK_SESSION_INFO info;
    CK_RV rv = r->f->C_GetSessionInfo(r->h, &info);

    if (rv == CKR_OK)
        rv = r->f->C_OpenSession(info.slotID, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL,
                                 &thread_session);
    return rv == CKR_OK ? 1 : fail("C_OpenSession (worker thread)", rv);
}

void raw_p11_thread_end(raw_p11 *r)
{
    if (thread_session != CK_INVALID_HANDLE)
        r->f->C_CloseSession(thread_session);
    thread_session = CK_INVALID_HANDLE;
}

int raw_p11_token_pub(raw_p11 *r, const unsigned char **pub, size_t *publen)
{
    *pub = r->point;
    *publen = r->pointlen;
    return 1;
}

static int dh_domain(raw_p11 *r, const EVP_PKEY *dom)
{
    BIGNUM *p = NULL, *g = NULL;
    int ok = 0;

    if (r->primelen != 0)
        return 1;
    if (EVP_PKEY_get_bn_param(dom, OSSL_PKEY_PARAM_FFC_P, &p) &&
        EVP_PKEY_get_bn_param(dom, OSSL_PKEY_PARAM_FFC_G, &g) &&
        BN_num_bytes(p) <= (int)sizeof(r->prime) && BN_num_bytes(g) <= (int)sizeof(r->base)) {
        r->primelen = (size_t)BN_bn2bin(p, r->prime);
        r->baselen = (size_t)BN_bn2bin(g, r->base);
        ok = 1;
    }
    BN_free(p);
    BN_free(g);
    return ok;
}

/* Generates a session key pair, reads its public value into pub (*publen in: size), destroys
 * the public object (the value is all a TLS peer needs). */
static int keygen(raw_p11 *r, const bench_alg *alg, const EVP_PKEY *dom, CK_OBJECT_HANDLE *priv,
                  unsigned char *pub, size_t *publen)
{
    int ec = strcmp(alg->keytype, "EC") == 0;
    CK_MECHANISM mech = {ec ? CKM_EC_KEY_PAIR_GEN : CKM_DH_PKCS_KEY_PAIR_GEN, NULL, 0};
    CK_ATTRIBUTE ect[] = {ATTR(CKA_TOKEN, &no, 1),
                          ATTR(CKA_EC_PARAMS, p256_params, sizeof(p256_params))};
    /* p and g are filled in below, once dh_domain() has read them */
    CK_ATTRIBUTE dht[] = {ATTR(CKA_TOKEN, &no, 1), ATTR(CKA_PRIME, r->prime, 0),
                          ATTR(CKA_BASE, r->base, 0)};
    CK_ATTRIBUTE privt[] = {ATTR(CKA_TOKEN, &no, 1), ATTR(CKA_PRIVATE, &yes, 1),
                            ATTR(CKA_SENSITIVE, &yes, 1), ATTR(CKA_EXTRACTABLE, &no, 1),
                            ATTR(CKA_DERIVE, &yes, 1)};
    CK_OBJECT_HANDLE pubobj = CK_INVALID_HANDLE;
    unsigned char der[600];
    CK_ATTRIBUTE pa = ATTR(ec ? CKA_EC_POINT : CKA_VALUE, der, sizeof(der));
    CK_RV rv;

    if (!ec && !dh_domain(r, dom)) {
        fprintf(stderr, "keyx-bench: cannot read the DH domain parameters\n");
        return 0;
    }
    dht[1].ulValueLen = r->primelen;
    dht[2].ulValueLen = r->baselen;
    if (ec && strcmp(alg->name, "P-256") != 0) {
        fprintf(stderr, "keyx-bench: raw Cryptoki rows exist for P-256 and ffdhe only\n");
        return 0;
    }
    rv = ec ? r->f->C_GenerateKeyPair(SESS(r), &mech, ect, NATTR(ect), privt, NATTR(privt), &pubobj,
                                      priv)
            : r->f->C_GenerateKeyPair(SESS(r), &mech, dht, NATTR(dht), privt, NATTR(privt), &pubobj,
                                      priv);
    if (rv != CKR_OK)
        return fail("C_GenerateKeyPair", rv);
    rv = r->f->C_GetAttributeValue(SESS(r), pubobj, &pa, 1);
    r->f->C_DestroyObject(SESS(r), pubobj);
    if (rv != CKR_OK) {
        r->f->C_DestroyObject(SESS(r), *priv);
        return fail("C_GetAttributeValue(public value)", rv);
    }
    if (ec) {
        if (!unwrap_point(der, pa.ulValueLen, pub, publen))
            goto bad;
    } else {
        /* y padded to |p|, as the encoded public key of a DH key in TLS */
        if (pa.ulValueLen > r->primelen || *publen < r->primelen)
            goto bad;
        memset(pub, 0, r->primelen - pa.ulValueLen);
        memcpy(pub + r->primelen - pa.ulValueLen, der, pa.ulValueLen);
        *publen = r->primelen;
    }
    return 1;
bad:
    r->f->C_DestroyObject(SESS(r), *priv);
    fprintf(stderr, "keyx-bench: unexpected public value from C_GenerateKeyPair\n");
    return 0;
}

int raw_p11_keygen(raw_p11 *r, const bench_alg *alg, const EVP_PKEY *dom, unsigned long *priv,
                   unsigned char **pub, size_t *publen)
{
    unsigned char buf[600];
    size_t len = sizeof(buf);
    CK_OBJECT_HANDLE h;

    if (!keygen(r, alg, dom, &h, buf, &len))
        return 0;
    if ((*pub = OPENSSL_memdup(buf, len)) == NULL) {
        r->f->C_DestroyObject(SESS(r), h);
        return 0;
    }
    *publen = len;
    *priv = h;
    return 1;
}

int raw_p11_derive(raw_p11 *r, const bench_alg *alg, unsigned long priv, const unsigned char *peer,
                   size_t peerlen, unsigned char *out)
{
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_KEY_TYPE kt = CKK_GENERIC_SECRET;
    CK_ULONG vlen = alg->secretlen;
    CK_ATTRIBUTE t[] = {ATTR(CKA_CLASS, &cls, sizeof(cls)),
                        ATTR(CKA_KEY_TYPE, &kt, sizeof(kt)),
                        ATTR(CKA_TOKEN, &no, 1),
                        ATTR(CKA_SENSITIVE, &no, 1),
                        ATTR(CKA_EXTRACTABLE, &yes, 1),
                        ATTR(CKA_VALUE_LEN, &vlen, sizeof(vlen))};
    CK_ECDH1_DERIVE_PARAMS ecdh;
    CK_MECHANISM mech;
    CK_OBJECT_HANDLE obj = CK_INVALID_HANDLE;
    CK_ATTRIBUTE value = ATTR(CKA_VALUE, out, alg->secretlen);
    CK_RV rv;

    if (strcmp(alg->keytype, "EC") == 0) {
        memset(&ecdh, 0, sizeof(ecdh));
        ecdh.kdf = CKD_NULL;
        ecdh.pPublicData = (CK_BYTE_PTR)peer;
        ecdh.ulPublicDataLen = peerlen;
        mech = (CK_MECHANISM){CKM_ECDH1_DERIVE, &ecdh, sizeof(ecdh)};
    } else {
        mech = (CK_MECHANISM){CKM_DH_PKCS_DERIVE, (void *)peer, peerlen};
    }
    rv = r->f->C_DeriveKey(SESS(r), &mech, priv != 0 ? priv : r->key, t, NATTR(t), &obj);
    if (rv != CKR_OK)
        return fail("C_DeriveKey", rv);
    rv = r->f->C_GetAttributeValue(SESS(r), obj, &value, 1);
    r->f->C_DestroyObject(SESS(r), obj);
    if (rv != CKR_OK)
        return fail("C_GetAttributeValue(CKA_VALUE)", rv);
    if (value.ulValueLen < alg->secretlen) { /* leading zeros stripped: fixed-size form */
        size_t got = value.ulValueLen, pad = alg->secretlen - got;

        memmove(out + pad, out, got);
        memset(out, 0, pad);
    }
    return 1;
}

int raw_p11_destroy(raw_p11 *r, unsigned long obj)
{
    CK_RV rv = r->f->C_DestroyObject(SESS(r), obj);

    return rv == CKR_OK ? 1 : fail("C_DestroyObject", rv);
}

int raw_p11_rsa_key(raw_p11 *r, const char *label, unsigned char *n, size_t *nlen, unsigned char *e,
                    size_t *elen)
{
    CK_ATTRIBUTE a[] = {ATTR(CKA_MODULUS, n, *nlen), ATTR(CKA_PUBLIC_EXPONENT, e, *elen)};
    CK_RV rv;

    if ((r->rsakey = find_key(r, CKO_PRIVATE_KEY, label)) == CK_INVALID_HANDLE)
        return 0;
    if ((rv = r->f->C_GetAttributeValue(r->h, r->rsakey, a, NATTR(a))) != CKR_OK)
        return fail("C_GetAttributeValue(CKA_MODULUS, CKA_PUBLIC_EXPONENT)", rv);
    *nlen = a[0].ulValueLen;
    *elen = a[1].ulValueLen;
    r->rsalen = *nlen;
    return 1;
}

int raw_p11_oaep_decrypt(raw_p11 *r, const EVP_MD *md, const unsigned char *ct, size_t ctlen,
                         unsigned char *out, size_t *outlen)
{
    CK_RSA_PKCS_OAEP_PARAMS oaep = {CKM_SHA_1, CKG_MGF1_SHA1, CKZ_DATA_SPECIFIED, NULL, 0};
    CK_MECHANISM mech = md == NULL ? (CK_MECHANISM){CKM_RSA_PKCS_OAEP, &oaep, sizeof(oaep)}
                                   : (CK_MECHANISM){CKM_RSA_X_509, NULL, 0};
    unsigned char em[1024];
    CK_ULONG len = sizeof(em);
    CK_RV rv;
    int n;

    if (r->rsalen == 0 || r->rsalen > sizeof(em))
        return 0;
    if ((rv = r->f->C_DecryptInit(SESS(r), &mech, r->rsakey)) != CKR_OK)
        return fail("C_DecryptInit", rv);
    if ((rv = r->f->C_Decrypt(SESS(r), (CK_BYTE_PTR)ct, ctlen, em, &len)) != CKR_OK)
        return fail("C_Decrypt", rv);
    if (md == NULL) {
        if (len > *outlen)
            return 0;
        memcpy(out, em, len);
        *outlen = len;
        OPENSSL_cleanse(em, len);
        return 1;
    }
    /* the encoded message, left-padded to the modulus size (leading zeros may be stripped) */
    if (len > r->rsalen)
        return 0;
    memmove(em + r->rsalen - len, em, len);
    memset(em, 0, r->rsalen - len);
    n = RSA_padding_check_PKCS1_OAEP_mgf1(out, (int)*outlen, em, (int)r->rsalen, (int)r->rsalen,
                                          NULL, 0, md, md);
    OPENSSL_cleanse(em, r->rsalen);
    if (n < 0) {
        fprintf(stderr, "keyx-bench: raw Cryptoki: OAEP decoding failed\n");
        return 0;
    }
    *outlen = (size_t)n;
    return 1;
}

/* ---- signatures (certificate keys) ------------------------------------------------------------
 */

int raw_p11_sign_key(raw_p11 *r, const char *label, int rsa, unsigned long *obj, unsigned char *a,
                     size_t *alen, unsigned char *b, size_t *blen)
{
    CK_OBJECT_HANDLE priv = find_key(r, CKO_PRIVATE_KEY, label), pub;
    CK_RV rv;

    if (priv == CK_INVALID_HANDLE)
        return 0;
    *obj = priv;
    if (rsa) {
        CK_ATTRIBUTE t[] = {ATTR(CKA_MODULUS, a, *alen), ATTR(CKA_PUBLIC_EXPONENT, b, *blen)};

        if ((rv = r->f->C_GetAttributeValue(r->h, priv, t, NATTR(t))) != CKR_OK)
            return fail("C_GetAttributeValue(CKA_MODULUS, CKA_PUBLIC_EXPONENT)", rv);
        *alen = t[0].ulValueLen;
        *blen = t[1].ulValueLen;
        return 1;
    } else {
        unsigned char der[200];
        CK_ATTRIBUTE t[] = {ATTR(CKA_EC_POINT, der, sizeof(der))};

        if ((pub = find_key(r, CKO_PUBLIC_KEY, label)) == CK_INVALID_HANDLE)
            return 0;
        if ((rv = r->f->C_GetAttributeValue(r->h, pub, t, NATTR(t))) != CKR_OK)
            return fail("C_GetAttributeValue(CKA_EC_POINT)", rv);
        return unwrap_point(der, t[0].ulValueLen, a, alen);
    }
}

int raw_p11_sign(raw_p11 *r, unsigned long obj, int pss, const unsigned char *dgst, size_t dlen,
                 unsigned char *sig, size_t *siglen)
{
    CK_RSA_PKCS_PSS_PARAMS pp = {CKM_SHA256, CKG_MGF1_SHA256, 32};
    CK_MECHANISM mech = pss ? (CK_MECHANISM){CKM_RSA_PKCS_PSS, &pp, sizeof(pp)}
                            : (CK_MECHANISM){CKM_ECDSA, NULL, 0};
    CK_ULONG len = *siglen;
    CK_RV rv;

    if ((rv = r->f->C_SignInit(SESS(r), &mech, obj)) != CKR_OK)
        return fail("C_SignInit", rv);
    if ((rv = r->f->C_Sign(SESS(r), (CK_BYTE_PTR)dgst, dlen, sig, &len)) != CKR_OK)
        return fail("C_Sign", rv);
    *siglen = len;
    return 1;
}

int raw_p11_keygen_derive(raw_p11 *r, const bench_alg *alg, const EVP_PKEY *dom,
                          const unsigned char *peer, size_t peerlen, unsigned char *out)
{
    unsigned char pub[600];
    size_t publen = sizeof(pub);
    CK_OBJECT_HANDLE priv;
    int ok;

    if (!keygen(r, alg, dom, &priv, pub, &publen))
        return 0;
    ok = raw_p11_derive(r, alg, priv, peer, peerlen, out);
    return raw_p11_destroy(r, priv) && ok;
}

/* ---- call counting ---------------------------------------------------------------------------
 * keyx and these raw rows share one CK_FUNCTION_LIST (the module's own table) in this process.
 * For a counting pass, its entries are swapped for wrappers that count and forward to the saved
 * originals; raw_p11_count_end puts the originals back. Never active while a cell is timed. */

static CK_FUNCTION_LIST saved;
static unsigned long counts[RAW_P11_NCOUNTED];

#define WRAP(idx, name, params, args)                                                              \
    static CK_RV count_##name params                                                               \
    {                                                                                              \
        counts[idx]++;                                                                             \
        return saved.name args;                                                                    \
    }

WRAP(0, C_GetSlotList, (CK_BBOOL a, CK_SLOT_ID_PTR b, CK_ULONG_PTR c), (a, b, c))
WRAP(1, C_GetTokenInfo, (CK_SLOT_ID a, CK_TOKEN_INFO_PTR b), (a, b))
WRAP(2, C_GetMechanismList, (CK_SLOT_ID a, CK_MECHANISM_TYPE_PTR b, CK_ULONG_PTR c), (a, b, c))
WRAP(3, C_GetMechanismInfo, (CK_SLOT_ID a, CK_MECHANISM_TYPE b, CK_MECHANISM_INFO_PTR c), (a, b, c))
WRAP(4, C_OpenSession,
     (CK_SLOT_ID a, CK_FLAGS b, CK_VOID_PTR c, CK_NOTIFY d, CK_SESSION_HANDLE_PTR e),
     (a, b, c, d, e))
WRAP(5, C_CloseSession, (CK_SESSION_HANDLE a), (a))
WRAP(6, C_GetSessionInfo, (CK_SESSION_HANDLE a, CK_SESSION_INFO_PTR b), (a, b))
WRAP(7, C_Login, (CK_SESSION_HANDLE a, CK_USER_TYPE b, CK_UTF8CHAR_PTR c, CK_ULONG d), (a, b, c, d))
WRAP(8, C_CreateObject,
     (CK_SESSION_HANDLE a, CK_ATTRIBUTE_PTR b, CK_ULONG c, CK_OBJECT_HANDLE_PTR d), (a, b, c, d))
WRAP(9, C_DestroyObject, (CK_SESSION_HANDLE a, CK_OBJECT_HANDLE b), (a, b))
WRAP(10, C_GetAttributeValue,
     (CK_SESSION_HANDLE a, CK_OBJECT_HANDLE b, CK_ATTRIBUTE_PTR c, CK_ULONG d), (a, b, c, d))
WRAP(11, C_FindObjectsInit, (CK_SESSION_HANDLE a, CK_ATTRIBUTE_PTR b, CK_ULONG c), (a, b, c))
WRAP(12, C_FindObjects, (CK_SESSION_HANDLE a, CK_OBJECT_HANDLE_PTR b, CK_ULONG c, CK_ULONG_PTR d),
     (a, b, c, d))
WRAP(13, C_FindObjectsFinal, (CK_SESSION_HANDLE a), (a))
WRAP(14, C_GenerateKeyPair,
     (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_ATTRIBUTE_PTR c, CK_ULONG d, CK_ATTRIBUTE_PTR e,
      CK_ULONG f, CK_OBJECT_HANDLE_PTR g, CK_OBJECT_HANDLE_PTR h),
     (a, b, c, d, e, f, g, h))
WRAP(15, C_DeriveKey,
     (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c, CK_ATTRIBUTE_PTR d, CK_ULONG e,
      CK_OBJECT_HANDLE_PTR f),
     (a, b, c, d, e, f))
WRAP(16, C_GenerateRandom, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c), (a, b, c))
WRAP(17, C_GetSlotInfo, (CK_SLOT_ID a, CK_SLOT_INFO_PTR b), (a, b))
WRAP(18, C_DecryptInit, (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c), (a, b, c))
WRAP(19, C_Decrypt, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e),
     (a, b, c, d, e))
WRAP(20, C_SignInit, (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c), (a, b, c))
WRAP(21, C_Sign, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e),
     (a, b, c, d, e))

static const char *const count_names[RAW_P11_NCOUNTED] = {
    "C_GetSlotList",       "C_GetTokenInfo",
    "C_GetMechanismList",  "C_GetMechanismInfo",
    "C_OpenSession",       "C_CloseSession",
    "C_GetSessionInfo",    "C_Login",
    "C_CreateObject",      "C_DestroyObject",
    "C_GetAttributeValue", "C_FindObjectsInit",
    "C_FindObjects",       "C_FindObjectsFinal",
    "C_GenerateKeyPair",   "C_DeriveKey",
    "C_GenerateRandom",    "C_GetSlotInfo",
    "C_DecryptInit",       "C_Decrypt",
    "C_SignInit",          "C_Sign",
};

const char *raw_p11_count_name(int i)
{
    return i >= 0 && i < RAW_P11_NCOUNTED ? count_names[i] : NULL;
}

/* Makes the table's page(s) writable when the module keeps it read-only. */
static int table_writable(CK_FUNCTION_LIST_PTR f)
{
    long page = sysconf(_SC_PAGESIZE);
    uintptr_t start = (uintptr_t)f & ~(uintptr_t)(page - 1);
    uintptr_t end = (uintptr_t)f + sizeof(*f);

    return mprotect((void *)start, end - start, PROT_READ | PROT_WRITE) == 0;
}

int raw_p11_count_begin(raw_p11 *r)
{
    CK_FUNCTION_LIST_PTR f = r->f;

    if (!table_writable(f)) {
        fprintf(stderr, "keyx-bench: cannot make the module's function list writable: no call "
                        "counts\n");
        return 0;
    }
    saved = *f;
    memset(counts, 0, sizeof(counts));
    f->C_GetSlotList = count_C_GetSlotList;
    f->C_GetTokenInfo = count_C_GetTokenInfo;
    f->C_GetMechanismList = count_C_GetMechanismList;
    f->C_GetMechanismInfo = count_C_GetMechanismInfo;
    f->C_OpenSession = count_C_OpenSession;
    f->C_CloseSession = count_C_CloseSession;
    f->C_GetSessionInfo = count_C_GetSessionInfo;
    f->C_Login = count_C_Login;
    f->C_CreateObject = count_C_CreateObject;
    f->C_DestroyObject = count_C_DestroyObject;
    f->C_GetAttributeValue = count_C_GetAttributeValue;
    f->C_FindObjectsInit = count_C_FindObjectsInit;
    f->C_FindObjects = count_C_FindObjects;
    f->C_FindObjectsFinal = count_C_FindObjectsFinal;
    f->C_GenerateKeyPair = count_C_GenerateKeyPair;
    f->C_DeriveKey = count_C_DeriveKey;
    f->C_GenerateRandom = count_C_GenerateRandom;
    f->C_GetSlotInfo = count_C_GetSlotInfo;
    f->C_DecryptInit = count_C_DecryptInit;
    f->C_Decrypt = count_C_Decrypt;
    f->C_SignInit = count_C_SignInit;
    f->C_Sign = count_C_Sign;
    return 1;
}

void raw_p11_count_end(raw_p11 *r, unsigned long out[RAW_P11_NCOUNTED])
{
    *r->f = saved;
    memcpy(out, counts, sizeof(counts));
}
