/* Encoders and decoders of keyx keys: key reference files (keyref_encoder.c, keyref_decoder.c),
 * public keys and text (pubkey_encoder.c). encode/dispatch.c makes one dispatch table per
 * algorithm and format on these. */
#ifndef KEYX_ENCODE_ENCODE_H
#define KEYX_ENCODE_ENCODE_H

#include <openssl/core.h>

#include "backend/backend.h"
#include "provider/provctx.h"

typedef enum keyx_encoding { KEYX_ENC_DER, KEYX_ENC_PEM, KEYX_ENC_TEXT } keyx_encoding;

/* What each encoder and decoder instance knows: the provider, its algorithm and format. */
typedef struct keyx_codec {
    keyx_provctx *p;
    keyx_alg alg;
    keyx_encoding enc;
    char cipher[64]; /* encoders: the application's encryption cipher for PKCS#8, "" none */
} keyx_codec;

keyx_codec *keyx_codec_new(void *provctx, keyx_alg alg, keyx_encoding enc);
void keyx_codec_free(void *ctx);
/* The private-key encoders' settings (OSSL_ENCODER_PARAM_CIPHER): kept for software keys. */
const OSSL_PARAM *keyx_codec_settable_ctx_params(void *provctx);
int keyx_codec_set_ctx_params(void *ctx, const OSSL_PARAM params[]);

/* PrivateKeyInfo structure: a hardware key becomes a key reference file (DER or PEM "KEYX
 * KEY"); a software key is encoded as the default provider would (PKCS#8). */
int keyx_keyref_encode(void *ctx, OSSL_CORE_BIO *out, const void *key, const OSSL_PARAM abstract[],
                       int selection, OSSL_PASSPHRASE_CALLBACK *cb, void *cbarg);
/* SubjectPublicKeyInfo (DER, PEM) and text of any keyx key, from its public view. */
int keyx_pubkey_encode(void *ctx, OSSL_CORE_BIO *out, const void *key, const OSSL_PARAM abstract[],
                       int selection, OSSL_PASSPHRASE_CALLBACK *cb, void *cbarg);
int keyx_text_encode(void *ctx, OSSL_CORE_BIO *out, const void *key, const OSSL_PARAM abstract[],
                     int selection, OSSL_PASSPHRASE_CALLBACK *cb, void *cbarg);
/* keyx's PEM blocks ("KEYX KEY", "TSS2 PRIVATE KEY") to DER for its DER decoders; other PEM
 * is passed over. */
int keyx_pem_to_der_decode(void *ctx, OSSL_CORE_BIO *in, int selection, OSSL_CALLBACK *data_cb,
                           void *data_cbarg, OSSL_PASSPHRASE_CALLBACK *cb, void *cbarg);
/* A key reference file or a TSS2 key file (DER) handed on to the decoder below, which loads its
 * key, with that load's errors kept; other DER is passed over. */
int keyx_der_to_der_decode(void *ctx, OSSL_CORE_BIO *in, int selection, OSSL_CALLBACK *data_cb,
                           void *data_cbarg, OSSL_PASSPHRASE_CALLBACK *cb, void *cbarg);
/* The TPM type of the key in a TSS2 key file (DER): 0 when der is none, 1 when its key is
 * unreadable (the tpm backend says why). */
unsigned keyx_tss2_key_type(const unsigned char *der, size_t len);
/* A key reference file (DER) back into the hardware key it names, by reference. Input
 * that is no reference file, or one for another algorithm, is passed over (1, nothing decoded). */
int keyx_keyref_decode(void *ctx, OSSL_CORE_BIO *in, int selection, OSSL_CALLBACK *data_cb,
                       void *data_cbarg, OSSL_PASSPHRASE_CALLBACK *cb, void *cbarg);

#endif
