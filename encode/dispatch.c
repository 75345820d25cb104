/* One dispatch table per algorithm and format, all on the shared functions of encode/: key
 * reference files and PKCS#8 (PrivateKeyInfo), SubjectPublicKeyInfo, text, and the reference
 * file decoders, with the PEM-to-DER decoder of keyx's PEM names. provider/keyx.c lists them with
 * their properties. */
#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>

#include "encode/encode.h"
#include "provider/dispatch.h"

#define FN(f) ((void (*)(void))(f))

/* As the default provider decides: a structure serves a selection when it holds the most
 * important part selected (private key, else public key, else parameters). */
static int serves(int selection, int held)
{
    static const int order[] = {OSSL_KEYMGMT_SELECT_PRIVATE_KEY, OSSL_KEYMGMT_SELECT_PUBLIC_KEY,
                                OSSL_KEYMGMT_SELECT_ALL_PARAMETERS};

    if (selection == 0)
        return 1;
    for (size_t i = 0; i < sizeof(order) / sizeof(order[0]); i++)
        if (selection & order[i])
            return (held & order[i]) != 0;
    return 0;
}

static int private_selection(void *provctx, int selection)
{
    (void)provctx;
    return serves(selection, OSSL_KEYMGMT_SELECT_PRIVATE_KEY);
}

static int public_selection(void *provctx, int selection)
{
    (void)provctx;
    return serves(selection, OSSL_KEYMGMT_SELECT_PUBLIC_KEY);
}

static int any_selection(void *provctx, int selection)
{
    (void)provctx;
    (void)selection;
    return 1;
}

#define ENCODER(name, newctx, selection_fn, encode_fn)                                             \
    const OSSL_DISPATCH name[] = {                                                                 \
        {OSSL_FUNC_ENCODER_NEWCTX, FN(newctx)},                                                    \
        {OSSL_FUNC_ENCODER_FREECTX, FN(keyx_codec_free)},                                          \
        {OSSL_FUNC_ENCODER_SETTABLE_CTX_PARAMS, FN(keyx_codec_settable_ctx_params)},               \
        {OSSL_FUNC_ENCODER_SET_CTX_PARAMS, FN(keyx_codec_set_ctx_params)},                         \
        {OSSL_FUNC_ENCODER_DOES_SELECTION, FN(selection_fn)},                                      \
        {OSSL_FUNC_ENCODER_ENCODE, FN(encode_fn)},                                                 \
        {0, NULL},                                                                                 \
    }

#define DECODER(name, newctx, decode_fn)                                                           \
    const OSSL_DISPATCH name[] = {                                                                 \
        {OSSL_FUNC_DECODER_NEWCTX, FN(newctx)},                                                    \
        {OSSL_FUNC_DECODER_FREECTX, FN(keyx_codec_free)},                                          \
        {OSSL_FUNC_DECODER_DOES_SELECTION, FN(any_selection)},                                     \
        {OSSL_FUNC_DECODER_DECODE, FN(decode_fn)},                                                 \
        {0, NULL},                                                                                 \
    }

static void *pem_newctx(void *provctx)
{
    return keyx_codec_new(provctx, KEYX_ALG_COUNT, KEYX_ENC_PEM);
}

DECODER(keyx_pem_to_der_decoder, pem_newctx, keyx_pem_to_der_decode);

static void *der_newctx(void *provctx)
{
    return keyx_codec_new(provctx, KEYX_ALG_COUNT, KEYX_ENC_DER);
}

DECODER(keyx_der_to_der_decoder, der_newctx, keyx_der_to_der_decode);

#define KEYX_CODECS(lower, ALG)                                                                    \
    static void *lower##_der_newctx(void *provctx)                                                 \
    {                                                                                              \
        return keyx_codec_new(provctx, ALG, KEYX_ENC_DER);                                         \
    }                                                                                              \
    static void *lower##_pem_newctx(void *provctx)                                                 \
    {                                                                                              \
        return keyx_codec_new(provctx, ALG, KEYX_ENC_PEM);                                         \
    }                                                                                              \
    static void *lower##_text_newctx(void *provctx)                                                \
    {                                                                                              \
        return keyx_codec_new(provctx, ALG, KEYX_ENC_TEXT);                                        \
    }                                                                                              \
    ENCODER(keyx_##lower##_to_keyref_der_encoder, lower##_der_newctx, private_selection,           \
            keyx_keyref_encode);                                                                   \
    ENCODER(keyx_##lower##_to_keyref_pem_encoder, lower##_pem_newctx, private_selection,           \
            keyx_keyref_encode);                                                                   \
    ENCODER(keyx_##lower##_to_spki_der_encoder, lower##_der_newctx, public_selection,              \
            keyx_pubkey_encode);                                                                   \
    ENCODER(keyx_##lower##_to_spki_pem_encoder, lower##_pem_newctx, public_selection,              \
            keyx_pubkey_encode);                                                                   \
    ENCODER(keyx_##lower##_to_text_encoder, lower##_text_newctx, any_selection, keyx_text_encode); \
    DECODER(keyx_keyref_der_to_##lower##_decoder, lower##_der_newctx, keyx_keyref_decode)

KEYX_CODECS(ec, KEYX_ALG_EC);
KEYX_CODECS(x25519, KEYX_ALG_X25519);
KEYX_CODECS(x448, KEYX_ALG_X448);
KEYX_CODECS(dh, KEYX_ALG_DH);
KEYX_CODECS(dhx, KEYX_ALG_DHX);
KEYX_CODECS(rsa, KEYX_ALG_RSA);
