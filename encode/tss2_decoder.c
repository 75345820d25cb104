/* TSS2 PRIVATE KEY files in (the key files of tpm2-openssl, openssl_tpm2_engine and
 * tpm2-tss-engine), from PEM_read_bio_PrivateKey, `-inkey file` and every other OpenSSL key
 * reader: the tpm backend loads the key under the parent the file names, and the key is handed
 * over by reference. DER in (structure "TSS2": encode/pem_decoder.c turns the PEM block into
 * it); one decoder per algorithm (EC, RSA): a file holding a key of the other algorithm, or no
 * TSS2 key at all, is passed over. */
#include <string.h>

#include <openssl/asn1.h>
#include <openssl/core_dispatch.h>
#include <openssl/err.h>

#include "backend/call.h"
#include "backend/router.h"
#include "encode/core_bio.h"
#include "encode/encode.h"
#include "encode/load_failure.h"
#include "keymgmt/key.h"
#include "provider/audit.h"
#include "provider/dispatch.h"
#include "provider/errors.h"
#include "provider/fail_closed.h"

#define TSS2_PEM_NAME "TSS2 PRIVATE KEY"

/* The TPM type of the key (TPM2_ALG_ECC 0x0023, TPM2_ALG_RSA 0x0001) in a TPMKey DER, read from
 * its pubkey (the next-to-last field, a TPM2B_PUBLIC: size, then type); 0 when der is no
 * SEQUENCE whose first field is a TCG key-file OID (2.23.133.10.1.x). The backend checks the
 * rest. */
unsigned keyx_tss2_key_type(const unsigned char *der, size_t len)
{
    static const unsigned char tcg_keyfile_oid[] = {0x06, 0x06, 0x67, 0x81, 0x05, 0x0a, 0x01};
    const unsigned char *q = der;
    ASN1_SEQUENCE_ANY *seq = NULL;
    const ASN1_TYPE *pub;
    size_t hl;
    unsigned type = 0;
    int n;

    if (len < 2 || der[0] != 0x30)
        return 0;
    hl = der[1] < 0x80 ? 2 : 2 + (size_t)(der[1] & 0x7f);
    if (len < hl + sizeof(tcg_keyfile_oid) + 1 ||
        memcmp(der + hl, tcg_keyfile_oid, sizeof(tcg_keyfile_oid)) != 0)
        return 0;
    ERR_set_mark();
    seq = d2i_ASN1_SEQUENCE_ANY(NULL, &q, (long)len);
    ERR_pop_to_mark();
    if (seq != NULL && (n = sk_ASN1_TYPE_num(seq)) >= 4 &&
        (pub = sk_ASN1_TYPE_value(seq, n - 2))->type == V_ASN1_OCTET_STRING &&
        pub->value.octet_string->length >= 4)
        type = (unsigned)pub->value.octet_string->data[2] << 8 | pub->value.octet_string->data[3];
    sk_ASN1_TYPE_pop_free(seq, ASN1_TYPE_free);
    return type != 0 ? type : 1; /* 1: a TSS2 file whose key the backend will refuse */
}

/* The decoder of c's algorithm claims its keys; a TSS2 file whose key is neither EC nor RSA (or
 * unreadable) is the EC decoder's, so that the user sees the backend's error once; anything else
 * (type 0) is not a TSS2 file. */
static int claims(const keyx_codec *c, unsigned type)
{
    if (type == 0)
        return 0;
    if (type == 0x0023)
        return c->alg == KEYX_ALG_EC;
    if (type == 0x0001)
        return c->alg == KEYX_ALG_RSA;
    return c->alg == KEYX_ALG_EC;
}

/* The load event says why the file cannot be used (the backend's message); the error raised here
 * is noted with that cause for the PEM decoder, as OpenSSL 3.0's file: store (openssl -in/-inkey
 * FILE) drops a decoder's errors (load_failure.h). */
static void load_failed(keyx_codec *c)
{
    const char *data = NULL;
    int flags = 0;
    char msg[512];
    keyx_event ev = {
        .event = "load",
        .backend = "tpm",
        .alg = keyx_alg_name(c->alg),
        .ephemeral = 0,
        .ok = 0,
        .error = msg,
    };

    ERR_peek_last_error_data(&data, &flags);
    snprintf(msg, sizeof(msg), "TSS2 key file: %s",
             data != NULL && (flags & ERR_TXT_STRING) && *data != '\0'
                 ? data
                 : "it could not be loaded into the TPM");
    keyx_event_emit(c->p, &ev);
    KEYX_LOAD_FAILURE(c->p, keyx_load_failure_cause_reason(KEYX_R_BACKEND_FAILURE),
                      "TSS2 key file: the key could not be loaded into the TPM (the error before "
                      "this one says why)");
}

static int tss2_decode(void *ctx, OSSL_CORE_BIO *in, int selection, OSSL_CALLBACK *data_cb,
                       void *data_cbarg, OSSL_PASSPHRASE_CALLBACK *cb, void *cbarg)
{
    keyx_codec *c = ctx;
    BIO *mem;
    unsigned char *der = NULL;
    long len = 0;
    keyx_backend *be;
    void *handle = NULL;
    EVP_PKEY *pub = NULL;
    keyx_key *k;
    int ok = 1;

    (void)selection;
    (void)cb; /* keys with a password are refused: nothing to ask */
    (void)cbarg;
    if (!keyx_check_not_reentered(c->p, "a TSS2 key file"))
        return 0;
    /* One DER element and no further (see keyx_core_bio_read_der_element). */
    if ((mem = keyx_core_bio_read_der_element(c->p, in)) == NULL)
        return 1; /* not a SEQUENCE: passed over */
    len = BIO_get_mem_data(mem, &der);
    if (len > 0 && claims(c, keyx_tss2_key_type(der, (size_t)len))) {
        /* Ours: from here on a failure is the user's error (or keyx's refusal to serve). */
        keyx_load_failure_begin();
        if (keyx_refused(c->p) ||
            (be = keyx_router_backend(c->p->router, KEYX_BACKEND_TPM)) == NULL ||
            keyx_backend_load_encoded(be, TSS2_PEM_NAME, der, (size_t)len, &handle, &pub) != 1) {
            load_failed(c);
            ok = keyx_key_pass_refused(c->alg, data_cb, data_cbarg);
        } else {
            k = keyx_key_adopt(c->p, be, handle, pub);
            ok = k != NULL && keyx_key_pass(k, data_cb, data_cbarg);
        }
    }
    BIO_free(mem);
    return ok;
}

#define FN(f) ((void (*)(void))(f))

static int any_selection(void *provctx, int selection)
{
    (void)provctx;
    (void)selection;
    return 1;
}

#define TSS2_DECODER(lower, ALG, ENC, enc)                                                         \
    static void *lower##_##enc##_newctx(void *provctx)                                             \
    {                                                                                              \
        return keyx_codec_new(provctx, ALG, ENC);                                                  \
    }                                                                                              \
    const OSSL_DISPATCH keyx_tss2_##enc##_to_##lower##_decoder[] = {                               \
        {OSSL_FUNC_DECODER_NEWCTX, FN(lower##_##enc##_newctx)},                                    \
        {OSSL_FUNC_DECODER_FREECTX, FN(keyx_codec_free)},                                          \
        {OSSL_FUNC_DECODER_DOES_SELECTION, FN(any_selection)},                                     \
        {OSSL_FUNC_DECODER_DECODE, FN(tss2_decode)},                                               \
        {0, NULL},                                                                                 \
    }

TSS2_DECODER(ec, KEYX_ALG_EC, KEYX_ENC_DER, der);
TSS2_DECODER(rsa, KEYX_ALG_RSA, KEYX_ENC_DER, der);
