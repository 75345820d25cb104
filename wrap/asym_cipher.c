/* RSA asymmetric cipher. Once keyx registers it, an application preferring keyx has every RSA
 * encryption and decryption of the process come here, so nothing the default provider does for
 * software keys may get lost:
 *   - encrypt (a public-key operation, any padding): the default provider in keyx's own library
 *     context on the key's public view;
 *   - decrypt OAEP: in the key's backend (keyx_key_decrypt), one error for every failure;
 *   - decrypt with libssl's TLS padding or with no padding: software keys only (the default
 *     provider in keyx's context has them), refused for hardware keys;
 *   - decrypt PKCS#1 v1.5: refused on every backend (a padding oracle without implicit
 *     rejection, which OpenSSL 3.0 lacks).
 * Parameters are those of OpenSSL's RSA asym cipher (pad-mode, digest, mgf1-digest, oaep-label,
 * tls-client-version, tls-negotiated-version). */
#include <string.h>

#include <openssl/core_dispatch.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>

#include "backend/call.h"
#include "keymgmt/key.h"
#include "provider/dispatch.h"
#include "provider/errors.h"
#include "wrap/rsa_params.h"
#include "provider/fail_closed.h"

typedef struct keyx_rsa_ctx {
    keyx_provctx *p;
    keyx_key *key; /* owned by the application's EVP_PKEY, which the EVP_PKEY_CTX holds */
    int decrypt;
    keyx_rsa_params rp;
} keyx_rsa_ctx;

static void *rsa_newctx(void *provctx)
{
    keyx_rsa_ctx *c;

    if (keyx_refused(provctx) ||
        !keyx_check_not_reentered(provctx, "an RSA encryption or decryption"))
        return NULL;
    if ((c = OPENSSL_zalloc(sizeof(*c))) == NULL)
        return NULL;
    c->p = provctx;
    keyx_rsa_params_reset(&c->rp);
    return c;
}

static void rsa_freectx(void *vctx)
{
    keyx_rsa_ctx *c = vctx;

    if (c == NULL)
        return;
    keyx_rsa_params_clear(&c->rp);
    OPENSSL_free(c);
}

static void *rsa_dupctx(void *vctx)
{
    keyx_rsa_ctx *c = vctx, *d = OPENSSL_malloc(sizeof(*d));

    if (d == NULL)
        return NULL;
    *d = *c;
    if (!keyx_rsa_params_copy(&d->rp, &c->rp)) {
        OPENSSL_free(d);
        return NULL;
    }
    return d;
}

static int rsa_set_ctx_params(void *vctx, const OSSL_PARAM params[])
{
    keyx_rsa_ctx *c = vctx;

    return keyx_rsa_params_set(c->p, &c->rp, params);
}

static int rsa_get_ctx_params(void *vctx, OSSL_PARAM params[])
{
    keyx_rsa_ctx *c = vctx;

    return keyx_rsa_params_get(&c->rp, params);
}

static int rsa_init(keyx_rsa_ctx *c, void *vkey, int decrypt, const OSSL_PARAM params[])
{
    keyx_key *k = vkey;

    if (k == NULL || k->alg != KEYX_ALG_RSA || !k->has_public) {
        KEYX_ERR(c->p, KEYX_R_KEY_MISMATCH, "RSA %s needs an RSA key",
                 decrypt ? "decryption" : "encryption");
        return 0;
    }
    if (decrypt && !keyx_key_has_private(k)) {
        KEYX_ERR(c->p, KEYX_R_MISSING_KEY, "RSA decryption needs a private key");
        return 0;
    }
    c->key = k;
    c->decrypt = decrypt;
    keyx_rsa_params_clear(&c->rp);
    keyx_rsa_params_reset(&c->rp);
    return rsa_set_ctx_params(c, params);
}

static int rsa_encrypt_init(void *vctx, void *vkey, const OSSL_PARAM params[])
{
    return rsa_init(vctx, vkey, 0, params);
}

static int rsa_decrypt_init(void *vctx, void *vkey, const OSSL_PARAM params[])
{
    return rsa_init(vctx, vkey, 1, params);
}

static int rsa_encrypt(void *vctx, unsigned char *out, size_t *outlen, size_t outsize,
                       const unsigned char *in, size_t inlen)
{
    keyx_rsa_ctx *c = vctx;
    OSSL_PARAM params[5];
    EVP_PKEY_CTX *ctx;
    size_t len = outsize;
    int ok;

    if (c->key == NULL || c->decrypt) {
        KEYX_ERR(c->p, KEYX_R_MISSING_KEY, "initialize the context for encryption first");
        return 0;
    }
    if (out == NULL) {
        *outlen = (size_t)EVP_PKEY_get_size(keyx_key_pub(c->key));
        return 1;
    }
    keyx_rsa_params_to_ossl(&c->rp, params);
    ctx = EVP_PKEY_CTX_new_from_pkey(c->p->libctx, keyx_key_pub(c->key), NULL);
    ok = ctx != NULL && EVP_PKEY_encrypt_init_ex(ctx, params) == 1 &&
         EVP_PKEY_encrypt(ctx, out, &len, in, inlen) == 1;
    EVP_PKEY_CTX_free(ctx);
    if (ok)
        *outlen = len;
    else
        KEYX_ERR(c->p, KEYX_R_INVALID_ARGUMENT,
                 "RSA encryption failed (message too long for the key and padding, or "
                 "parameters the padding does not take)");
    keyx_key_event(c->key, "encrypt", ok, ok ? NULL : "RSA encryption failed");
    return ok;
}

static int rsa_decrypt(void *vctx, unsigned char *out, size_t *outlen, size_t outsize,
                       const unsigned char *in, size_t inlen)
{
    keyx_rsa_ctx *c = vctx;
    keyx_key *k = c->key;
    keyx_rsa_op op;
    unsigned char *tmp = NULL;
    size_t nlen, len;
    int ok;

    if (k == NULL || !c->decrypt) {
        KEYX_ERR(c->p, KEYX_R_MISSING_KEY, "initialize the context for decryption first");
        return 0;
    }
    nlen = (size_t)EVP_PKEY_get_size(keyx_key_pub(k));
    if (!keyx_rsa_params_op(c->p, &c->rp, keyx_key_exports_private(k), keyx_key_backend_name(k),
                            &op))
        return 0;
    if (out == NULL) {
        *outlen = nlen;
        return 1;
    }
    if (op.pad == KEYX_RSA_PAD_TLS) {
        /* libssl asks for exactly the 48-byte premaster; the backend fills it, random on failure */
        len = outsize;
        if (!keyx_key_decrypt(k, "decrypt", &op, in, inlen, out, &len))
            return 0;
        *outlen = len;
        return 1;
    }
    /* OAEP and raw: the backend writes up to the modulus size; a smaller caller buffer gets a
     * copy once the plaintext is known to fit (the default provider does the same). */
    if (outsize < nlen && (tmp = OPENSSL_malloc(nlen)) == NULL)
        return 0;
    len = nlen;
    ok = keyx_key_decrypt(k, "decrypt", &op, in, inlen, tmp != NULL ? tmp : out, &len);
    if (ok && tmp != NULL) {
        if (len > outsize) {
            KEYX_ERR(c->p, KEYX_R_INVALID_ARGUMENT,
                     "output buffer of %zu bytes is too small for the plaintext", outsize);
            ok = 0;
        } else {
            memcpy(out, tmp, len);
        }
    }
    if (tmp != NULL)
        OPENSSL_clear_free(tmp, nlen);
    if (ok)
        *outlen = len;
    return ok;
}

static const OSSL_PARAM *rsa_settable(void *vctx, void *provctx)
{
    (void)vctx;
    (void)provctx;
    return keyx_rsa_params_settable();
}

static const OSSL_PARAM *rsa_gettable(void *vctx, void *provctx)
{
    (void)vctx;
    (void)provctx;
    return keyx_rsa_params_gettable();
}

#define FN(f) ((void (*)(void))(f))

const OSSL_DISPATCH keyx_rsa_asym_cipher_functions[] = {
    {OSSL_FUNC_ASYM_CIPHER_NEWCTX, FN(rsa_newctx)},
    {OSSL_FUNC_ASYM_CIPHER_ENCRYPT_INIT, FN(rsa_encrypt_init)},
    {OSSL_FUNC_ASYM_CIPHER_ENCRYPT, FN(rsa_encrypt)},
    {OSSL_FUNC_ASYM_CIPHER_DECRYPT_INIT, FN(rsa_decrypt_init)},
    {OSSL_FUNC_ASYM_CIPHER_DECRYPT, FN(rsa_decrypt)},
    {OSSL_FUNC_ASYM_CIPHER_FREECTX, FN(rsa_freectx)},
    {OSSL_FUNC_ASYM_CIPHER_DUPCTX, FN(rsa_dupctx)},
    {OSSL_FUNC_ASYM_CIPHER_GET_CTX_PARAMS, FN(rsa_get_ctx_params)},
    {OSSL_FUNC_ASYM_CIPHER_GETTABLE_CTX_PARAMS, FN(rsa_gettable)},
    {OSSL_FUNC_ASYM_CIPHER_SET_CTX_PARAMS, FN(rsa_set_ctx_params)},
    {OSSL_FUNC_ASYM_CIPHER_SETTABLE_CTX_PARAMS, FN(rsa_settable)},
    {0, NULL},
};
