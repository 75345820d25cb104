/* Target 5: key reference files. The input is a key file as OpenSSL's key readers hand it to
 * decoders: keyx's PEM-to-DER decoder (KEYX KEY, TSS2 PRIVATE KEY), its KEYX KEY decoders and its
 * TSS2 decoders, through OSSL_DECODER in a library context where keyx is the only decoder
 * provider. The devices the files name are not there (a TPM TCTI and a PKCS#11 module that do
 * not exist): a file must be passed over, refused, or give a key whose every use fails cleanly.
 * The KeyxKeyReference parser is also called directly: what it accepts must re-encode to a
 * reference that parses to the same fields.
 *
 * Input: first byte '-' (a PEM file) or '0' (DER): the file as it is; otherwise the first byte
 * says how to wrap the rest: 1 PEM "KEYX KEY", 2 PEM "TSS2 PRIVATE KEY", else as it is. */
#include <string.h>

#include <openssl/bio.h>
#include <openssl/decoder.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include "encode/keyref.h"
#ifdef KEYX_HAVE_TPM
#include "backend/tpm2_keyfile.h"
#endif
#include "tests/fuzz/harness.h"

#define MAX_FILE 8192

static void check_parser(const uint8_t *der, size_t len)
{
    keyx_keyref r, again;
    unsigned char *enc = NULL;
    size_t enclen = 0;

#ifdef KEYX_HAVE_TPM
    {
        tpm_keyfile f;

        /* the TSS2 PRIVATE KEY parser of the tpm backend, directly */
        (void)tpm_keyfile_parse(fuzz_bare_provctx(), der, len, &f);
    }
#endif
    if (!keyx_keyref_from_der(der, len, &r))
        return;
    if (r.backend == NULL || r.locator == NULL || r.spki == NULL || strlen(r.backend) == 0 ||
        strlen(r.locator) == 0)
        fuzz_fail("an accepted reference has an empty field");
    if (!keyx_keyref_to_der(&r, &enc, &enclen))
        fuzz_fail("an accepted reference does not encode again");
    if (!keyx_keyref_from_der(enc, enclen, &again))
        fuzz_fail("a re-encoded reference does not parse");
    if (strcmp(r.backend, again.backend) != 0 || strcmp(r.locator, again.locator) != 0 ||
        r.spkilen != again.spkilen || memcmp(r.spki, again.spki, r.spkilen) != 0)
        fuzz_fail("a reference changed through encoding and parsing");
    keyx_keyref_clear(&again);
    keyx_keyref_clear(&r);
    OPENSSL_free(enc);
}

/* Whatever was decoded is a key by reference whose device is missing: its public side works,
 * its private operations must fail with an error, not crash or hang. */
static void use_key(EVP_PKEY *key)
{
    unsigned char *spki = NULL, out[512];
    size_t outlen = sizeof(out);
    EVP_PKEY_CTX *ctx;
    int n;

    (void)EVP_PKEY_get_bits(key);
    if ((n = i2d_PUBKEY(key, &spki)) > 0)
        OPENSSL_free(spki);
    ctx = EVP_PKEY_CTX_new_from_pkey(fuzz_keyx_libctx(), key, "provider=keyx");
    if (ctx != NULL && !EVP_PKEY_is_a(key, "RSA") && EVP_PKEY_derive_init(ctx) == 1 &&
        EVP_PKEY_derive_set_peer(ctx, key) == 1 && EVP_PKEY_derive(ctx, out, &outlen) == 1)
        fuzz_fail("a key whose device is missing derived a secret");
    EVP_PKEY_CTX_free(ctx);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    OSSL_DECODER_CTX *dctx;
    EVP_PKEY *key = NULL;
    BIO *in;

    if (size < 1 || size > MAX_FILE)
        return 0;
    if ((in = BIO_new(BIO_s_mem())) == NULL)
        return 0;
    if (data[0] == '-' || data[0] == '0') {
        BIO_write(in, data, (int)size);
        if (data[0] == '0')
            check_parser(data, size);
    } else {
        check_parser(data + 1, size - 1);
        if (data[0] == 1 || data[0] == 2)
            PEM_write_bio(in, data[0] == 1 ? KEYX_KEYREF_PEM_NAME : "TSS2 PRIVATE KEY", "",
                          data + 1, (long)(size - 1));
        else
            BIO_write(in, data + 1, (int)(size - 1));
    }
    dctx = OSSL_DECODER_CTX_new_for_pkey(&key, NULL, NULL, NULL, EVP_PKEY_KEYPAIR,
                                         fuzz_keyx_libctx(), "provider=keyx");
    if (dctx != NULL && OSSL_DECODER_from_bio(dctx, in) == 1 && key != NULL)
        use_key(key);
    EVP_PKEY_free(key);
    OSSL_DECODER_CTX_free(dctx);
    BIO_free(in);
    fuzz_drain_errors();
    return 0;
}
