/* The application's BIOs as OpenSSL hands them to encoders and decoders (OSSL_CORE_BIO), through
 * the core's upcalls: keyx's own library context cannot wrap them in BIOs of its own. */
#ifndef KEYX_ENCODE_CORE_BIO_H
#define KEYX_ENCODE_CORE_BIO_H

#include <stddef.h>

#include <openssl/core.h>

#include "provider/provctx.h"

/* Takes the core's BIO functions from the provider's in-dispatch. */
void keyx_core_bio_init(keyx_provctx *p, const OSSL_DISPATCH *in);
/* All that remains to read from in, in a memory BIO of keyx's (BIO_free it); NULL + error. */
BIO *keyx_core_bio_read_all(keyx_provctx *p, OSSL_CORE_BIO *in);
/* The first PEM block of in (the lines up to and with its END line), or the first DER element
 * (tag, length, content), in a memory BIO; NULL when in holds none (nothing raised). Both read
 * no further than that: OpenSSL's file: store drops a decoder's error when the file was read to
 * its end, so keyx's decoders leave it short of the end to let the user read why a key file of
 * theirs cannot be used. */
BIO *keyx_core_bio_read_pem_block(keyx_provctx *p, OSSL_CORE_BIO *in);
BIO *keyx_core_bio_read_der_element(keyx_provctx *p, OSSL_CORE_BIO *in);
/* Writes what mem holds to out; 1 or 0 + error. */
int keyx_core_bio_write_mem(keyx_provctx *p, OSSL_CORE_BIO *out, BIO *mem);

#endif
