/* Public keys out, from the key's public view in keyx's context: SubjectPublicKeyInfo for
 * `openssl pkey -pubout`, certificate requests and certificates, and text for -text/-text_pub.
 * A hardware key's text names where its private part lives instead of printing it. */
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include "encode/core_bio.h"
#include "encode/encode.h"
#include "keymgmt/key.h"
#include "provider/errors.h"

int keyx_pubkey_encode(void *ctx, OSSL_CORE_BIO *out, const void *key, const OSSL_PARAM abstract[],
                       int selection, OSSL_PASSPHRASE_CALLBACK *cb, void *cbarg)
{
    keyx_codec *c = ctx;
    const keyx_key *k = key;
    BIO *mem;
    int ok;

    (void)selection;
    (void)cb;
    (void)cbarg;
    if (k == NULL || abstract != NULL || keyx_key_pub(k) == NULL || !k->has_public) {
        KEYX_ERR(c->p, KEYX_R_MISSING_KEY, "%s: no public key to encode", keyx_alg_name(c->alg));
        return 0;
    }
    if ((mem = BIO_new(BIO_s_mem())) == NULL)
        return 0;
    ok = c->enc == KEYX_ENC_PEM ? PEM_write_bio_PUBKEY(mem, keyx_key_pub(k))
                                : i2d_PUBKEY_bio(mem, keyx_key_pub(k));
    if (!ok)
        KEYX_ERR(c->p, KEYX_R_INTERNAL, "%s public key: encoding failed", keyx_alg_name(c->alg));
    ok = ok && keyx_core_bio_write_mem(c->p, out, mem);
    BIO_free(mem);
    return ok;
}

int keyx_text_encode(void *ctx, OSSL_CORE_BIO *out, const void *key, const OSSL_PARAM abstract[],
                     int selection, OSSL_PASSPHRASE_CALLBACK *cb, void *cbarg)
{
    keyx_codec *c = ctx;
    keyx_key *k = (keyx_key *)key;
    BIO *mem;
    char *where = NULL;
    int ok;

    (void)cb;
    (void)cbarg;
    if (k == NULL || abstract != NULL || keyx_key_pub(k) == NULL) {
        KEYX_ERR(c->p, KEYX_R_MISSING_KEY, "%s: empty key", keyx_alg_name(c->alg));
        return 0;
    }
    if ((mem = BIO_new(BIO_s_mem())) == NULL)
        return 0;
    if ((selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) && keyx_key_exports_private(k) &&
        keyx_key_has_private(k))
        ok = EVP_PKEY_print_private(mem, keyx_key_pub(k), 0, NULL) > 0;
    else if (selection & OSSL_KEYMGMT_SELECT_KEYPAIR && k->has_public)
        ok = EVP_PKEY_print_public(mem, keyx_key_pub(k), 0, NULL) > 0;
    else
        ok = EVP_PKEY_print_params(mem, keyx_key_pub(k), 0, NULL) > 0;
    if (ok && (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) && !keyx_key_exports_private(k)) {
        ERR_set_mark();
        if (keyx_key_locator(k, &where))
            BIO_printf(mem, "private key: in the %s backend, %s\n", keyx_key_backend_name(k),
                       where);
        else
            BIO_printf(mem, "private key: in the %s backend (ephemeral)\n",
                       keyx_key_backend_name(k));
        ERR_pop_to_mark();
        OPENSSL_free(where);
    }
    if (!ok)
        KEYX_ERR(c->p, KEYX_R_INTERNAL, "%s key: printing failed", keyx_alg_name(c->alg));
    ok = ok && keyx_core_bio_write_mem(c->p, out, mem);
    BIO_free(mem);
    return ok;
}
