#include <string.h>
#include <strings.h>

#include <openssl/crypto.h>

#include "provider/errors.h"
#include "store/uri.h"

static int has_prefix(const char *s, const char *prefix)
{
    return strncasecmp(s, prefix, strlen(prefix)) == 0;
}

int keyx_store_uri_parse(struct keyx_provctx *p, const char *uri, keyx_store_uri *out)
{
    const char *rest = uri, *locator = NULL;

    memset(out, 0, sizeof(*out));
    if (has_prefix(rest, "keyx:"))
        rest += strlen("keyx:");
    if (has_prefix(rest, "pkcs11:")) {
        out->backend = KEYX_BACKEND_PKCS11;
        locator = rest; /* the pkcs11 backend parses the whole RFC 7512 URI */
    } else if (rest != uri && has_prefix(rest, "tpm:")) {
        out->backend = KEYX_BACKEND_TPM;
        locator = rest + strlen("tpm:");
    }
    if (locator == NULL || *locator == '\0') {
        KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT,
                 "'%.200s' is not a key URI keyx knows: use pkcs11:token=...;object=... "
                 "(RFC 7512), keyx:pkcs11:... or keyx:tpm:handle=0x81000002",
                 uri);
        return 0;
    }
    if ((out->locator = OPENSSL_strdup(locator)) == NULL) {
        KEYX_ERR(p, KEYX_R_INTERNAL, "out of memory");
        return 0;
    }
    return 1;
}

void keyx_store_uri_clear(keyx_store_uri *u)
{
    OPENSSL_free(u->locator);
    u->locator = NULL;
}

int keyx_store_uri_names_object(const keyx_store_uri *u)
{
    const char *a, *end;

    if (u->backend != KEYX_BACKEND_PKCS11)
        return 1;
    /* "pkcs11:" path attributes, ';'-separated, up to the query ('?') */
    a = u->locator + strlen("pkcs11:");
    end = a + strcspn(a, "?");
    while (a < end) {
        size_t len = strcspn(a, ";?");

        if ((len >= 7 && strncmp(a, "object=", 7) == 0) || (len >= 3 && strncmp(a, "id=", 3) == 0))
            return 1;
        a += len;
        if (*a == ';')
            a++;
        else
            break;
    }
    return 0;
}
