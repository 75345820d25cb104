/* Target 1: key URIs. The input is a URI: keyx's own parser (store/uri.c) directly, then the
 * whole STORE path of keyx in a library context (scheme dispatch, the tpm locator parser, the
 * pkcs11 backend's RFC 7512 parsing) with devices that are not there: every URI must be refused
 * or fail cleanly, nothing may crash, leak or hang. */
#include <string.h>
#include <strings.h>

#include <openssl/err.h>
#include <openssl/store.h>

#include "store/uri.h"
#include "tests/fuzz/harness.h"

#define MAX_URI 2048

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    keyx_store_uri u;
    OSSL_STORE_CTX *st;
    char *uri;

    if (size > MAX_URI || (uri = fuzz_strndup(data, size)) == NULL)
        return 0;
    if (keyx_store_uri_parse(fuzz_bare_provctx(), uri, &u)) {
        /* What the parser accepts, checked independently: a pkcs11 locator is the whole
         * RFC 7512 URI, a tpm one what follows keyx:tpm:, never empty. */
        const char *rest = strncasecmp(uri, "keyx:", 5) == 0 ? uri + 5 : uri;

        if (u.locator == NULL || u.locator[0] == '\0')
            fuzz_fail("an accepted URI has an empty locator");
        if (u.backend == KEYX_BACKEND_PKCS11 &&
            (strncasecmp(rest, "pkcs11:", 7) != 0 || strcmp(u.locator, rest) != 0))
            fuzz_fail("pkcs11 locator is not the URI's pkcs11: part");
        if (u.backend == KEYX_BACKEND_TPM &&
            (rest == uri || strncasecmp(rest, "tpm:", 4) != 0 || strcmp(u.locator, rest + 4) != 0))
            fuzz_fail("tpm locator is not what follows keyx:tpm:");
        if (u.backend == KEYX_BACKEND_SOFTWARE)
            fuzz_fail("a URI was routed to the software backend");
        (void)keyx_store_uri_names_object(&u);
        keyx_store_uri_clear(&u);
    } else if ((strncasecmp(uri, "pkcs11:", 7) == 0 && uri[7] != '\0') ||
               (strncasecmp(uri, "keyx:pkcs11:", 12) == 0 && uri[12] != '\0') ||
               (strncasecmp(uri, "keyx:tpm:", 9) == 0 && uri[9] != '\0')) {
        fuzz_fail("a well-formed key URI was refused");
    }
    ERR_clear_error();

    st = OSSL_STORE_open_ex(uri, fuzz_keyx_libctx(), "provider=keyx", NULL, NULL, NULL, NULL, NULL);
    if (st != NULL) {
        for (int i = 0; i < 16 && !OSSL_STORE_eof(st); i++) {
            OSSL_STORE_INFO *info = OSSL_STORE_load(st);

            if (info == NULL)
                break;
            OSSL_STORE_INFO_free(info);
        }
        OSSL_STORE_close(st);
    }
    fuzz_drain_errors();
    OPENSSL_free(uri);
    return 0;
}
