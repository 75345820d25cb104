/* Private keys out: a hardware key is written as a reference to where it lives (its backend, its
 * locator and its public key), so `openssl genpkey -out`, `openssl pkey -out` and every
 * PEM_write_PrivateKey caller produce a file that any PEM private-key reader turns back into the
 * same hardware key. Nothing secret is in it, so a passphrase, if asked for, is not used. */
#include <openssl/core_names.h>
#include <openssl/encoder.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include "encode/core_bio.h"
#include "encode/encode.h"
#include "encode/keyref.h"
#include "keymgmt/key.h"
#include "provider/errors.h"

/* A software key's private part is in process memory already: PKCS#8 as the default provider
 * writes it, with the application's encryption settings passed on. */
static int software_key(keyx_codec *c, BIO *mem, keyx_key *k, OSSL_PASSPHRASE_CALLBACK *cb,
                        void *cbarg)
{
    OSSL_ENCODER_CTX *ectx = OSSL_ENCODER_CTX_new_for_pkey(keyx_key_pub(k), OSSL_KEYMGMT_SELECT_ALL,
                                                           c->enc == KEYX_ENC_PEM ? "PEM" : "DER",
                                                           "PrivateKeyInfo", NULL);
    int ok = ectx != NULL && OSSL_ENCODER_CTX_get_num_encoders(ectx) > 0 &&
             (c->cipher[0] == '\0' || OSSL_ENCODER_CTX_set_cipher(ectx, c->cipher, NULL)) &&
             (cb == NULL || OSSL_ENCODER_CTX_set_passphrase_cb(ectx, cb, cbarg)) &&
             OSSL_ENCODER_to_bio(ectx, mem);

    OSSL_ENCODER_CTX_free(ectx);
    if (!ok)
        KEYX_ERR(c->p, KEYX_R_INTERNAL, "%s private key: PKCS#8 encoding failed",
                 keyx_alg_name(c->alg));
    return ok;
}

static int reference(keyx_codec *c, BIO *mem, keyx_key *k)
{
    keyx_keyref r = {.backend = (char *)keyx_key_backend_name(k)};
    unsigned char *der = NULL;
    size_t len = 0;
    int n, ok = 0;

    if (!keyx_key_locator(k, &r.locator)) {
        KEYX_ERR(c->p, KEYX_R_KEY_NOT_WRITABLE,
                 "this %s key cannot be written to a file: its private part stays in the %s "
                 "backend and nothing can name it again (generate it with keyx-persist for the "
                 "TPM, keyx-label/keyx-id for PKCS#11, or load it by URI)",
                 keyx_alg_name(c->alg), r.backend);
        return 0;
    }
    n = i2d_PUBKEY(keyx_key_pub(k), &r.spki);
    if (n > 0) {
        r.spkilen = (size_t)n;
        ok = keyx_keyref_to_der(&r, &der, &len);
    }
    if (ok)
        ok = c->enc == KEYX_ENC_PEM
                 ? PEM_write_bio(mem, KEYX_KEYREF_PEM_NAME, "", der, (long)len) > 0
                 : BIO_write(mem, der, (int)len) == (int)len;
    if (!ok)
        KEYX_ERR(c->p, KEYX_R_INTERNAL, "encoding the key reference failed");
    OPENSSL_free(der);
    OPENSSL_free(r.spki);
    OPENSSL_free(r.locator);
    return ok;
}

int keyx_keyref_encode(void *ctx, OSSL_CORE_BIO *out, const void *key, const OSSL_PARAM abstract[],
                       int selection, OSSL_PASSPHRASE_CALLBACK *cb, void *cbarg)
{
    keyx_codec *c = ctx;
    keyx_key *k = (keyx_key *)key;
    BIO *mem;
    int ok;

    if (k == NULL || abstract != NULL || !(selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) ||
        !keyx_key_has_private(k)) {
        KEYX_ERR(c->p, KEYX_R_MISSING_KEY,
                 "%s: only a key with its private part can be "
                 "written as a private key",
                 keyx_alg_name(c->alg));
        return 0;
    }
    if ((mem = BIO_new(BIO_s_mem())) == NULL)
        return 0;
    ok = keyx_key_exports_private(k) ? software_key(c, mem, k, cb, cbarg) : reference(c, mem, k);
    ok = ok && keyx_core_bio_write_mem(c->p, out, mem);
    BIO_free(mem);
    return ok;
}
