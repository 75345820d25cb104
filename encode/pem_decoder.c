/* keyx's PEM names to DER: "KEYX KEY" (key reference files) and "TSS2 PRIVATE KEY" (TPM key
 * files). OpenSSL's own PEM decoder passes names it does not know over, and its file: store hands
 * provider decoders DER only, so keyx turns its own PEM blocks into DER here (with the structure
 * name that selects the next decoder) and its DER decoders do the rest. Any other PEM block is
 * passed over. */
#include <string.h>

#include <openssl/err.h>
#include <openssl/pem.h>

#include "encode/core_bio.h"
#include "encode/encode.h"
#include "encode/keyref.h"
#include "encode/load_failure.h"
#include "provider/errors.h"

static const struct {
    const char *pem_name;
    const char *structure;
} known[] = {
    {KEYX_KEYREF_PEM_NAME, KEYX_KEYREF_STRUCTURE},
    {"TSS2 PRIVATE KEY", "TSS2"},
};

/* A "KEYX KEY" block must hold a reference: say so here, where the PEM name proves the file
 * was meant as one (as DER it could have been any other format). */
static int valid_reference(keyx_codec *c, const unsigned char *der, size_t len)
{
    int ok = keyx_keyref_is_reference(der, len);

    if (!ok)
        KEYX_ERR(c->p, KEYX_R_INVALID_ARGUMENT,
                 "malformed " KEYX_KEYREF_PEM_NAME " file: not a keyx key reference (version 1)");
    return ok;
}

int keyx_pem_to_der_decode(void *ctx, OSSL_CORE_BIO *in, int selection, OSSL_CALLBACK *data_cb,
                           void *data_cbarg, OSSL_PASSPHRASE_CALLBACK *cb, void *cbarg)
{
    keyx_codec *c = ctx;
    BIO *mem = keyx_core_bio_read_pem_block(c->p, in);
    char *name = NULL, *header = NULL;
    unsigned char *der = NULL;
    long len = 0;
    int ok = 1, read;

    (void)selection;
    (void)cb; /* keyx's files are not encrypted */
    (void)cbarg;
    if (mem == NULL)
        return 1;   /* no PEM block: passed over */
    ERR_set_mark(); /* no PEM here: not an error of ours */
    read = PEM_read_bio(mem, &name, &header, &der, &len) > 0;
    ERR_pop_to_mark();
    for (size_t i = 0; read && i < sizeof(known) / sizeof(known[0]); i++) {
        if (strcmp(name, known[i].pem_name) != 0)
            continue;
        if (i == 0 && !valid_reference(c, der, (size_t)len)) {
            ok = 0; /* the file is ours: the user hears why it cannot be read */
            break;
        }
        ok = keyx_load_failure_hand_on(c->p, der, (size_t)len, known[i].structure, data_cb,
                                       data_cbarg);
        break;
    }
    OPENSSL_free(name);
    OPENSSL_free(header);
    OPENSSL_free(der);
    BIO_free(mem);
    return ok;
}
