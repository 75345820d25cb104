/* keyx's own key files as DER (key reference files, TSS2 key files), handed on unchanged with
 * the structure name that selects the decoder loading their key. Nothing is decoded here: this is
 * the layer above that decoder for DER files, as pem_decoder.c is for PEM. OpenSSL 3.0's file:
 * store (`openssl pkey -inform DER -in FILE`) drops the errors of a key load that fails inside
 * it and raises only "unsupported"; a decoder above it can raise the cause again
 * (load_failure.h). Any other DER is passed over.
 *
 * The decoder names no input structure on purpose: OpenSSL does not chain it after a decoder that
 * names the structure of its output (keyx's PEM decoder), which would be a second path to the
 * same key (loaded twice, a wrong PIN tried twice). */
#include <openssl/bio.h>

#include "encode/core_bio.h"
#include "encode/encode.h"
#include "encode/keyref.h"
#include "encode/load_failure.h"

int keyx_der_to_der_decode(void *ctx, OSSL_CORE_BIO *in, int selection, OSSL_CALLBACK *data_cb,
                           void *data_cbarg, OSSL_PASSPHRASE_CALLBACK *cb, void *cbarg)
{
    keyx_codec *c = ctx;
    BIO *mem = keyx_core_bio_read_der_element(c->p, in);
    unsigned char *der = NULL;
    const char *structure = NULL;
    long len;
    int ok = 1;

    (void)selection;
    (void)cb; /* keyx's files are not encrypted */
    (void)cbarg;
    if (mem == NULL)
        return 1; /* no DER element: passed over */
    len = BIO_get_mem_data(mem, &der);
#ifdef KEYX_HAVE_TPM
    if (len > 0 && keyx_tss2_key_type(der, (size_t)len) != 0)
        structure = "TSS2";
#endif
    if (structure == NULL && len > 0 && keyx_keyref_is_reference(der, (size_t)len))
        structure = KEYX_KEYREF_STRUCTURE;
    if (structure != NULL)
        ok = keyx_load_failure_hand_on(c->p, der, (size_t)len, structure, data_cb, data_cbarg);
    BIO_free(mem);
    return ok;
}
