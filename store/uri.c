#include <ctype.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <openssl/crypto.h>

#include "backend/backend.h"
#include "provider/errors.h"
#include "store/uri.h"

static int has_prefix(const char *s, const char *prefix)
{
    return strncasecmp(s, prefix, strlen(prefix)) == 0;
}

/* value (len bytes, RFC 3986 percent-encoding decoded) equals word. */
static int value_is(const char *value, size_t len, const char *word)
{
    size_t i = 0;

    for (; len > 0 && *word != '\0'; word++) {
        int c = (unsigned char)value[i];

        if (c == '%' && len >= 3 && isxdigit((unsigned char)value[i + 1]) &&
            isxdigit((unsigned char)value[i + 2])) {
            char hex[3] = {value[i + 1], value[i + 2], '\0'};

            c = (int)strtol(hex, NULL, 16);
            i += 3;
            len -= 3;
        } else {
            i++;
            len--;
        }
        if (tolower(c) != *word)
            return 0;
    }
    return len == 0 && *word == '\0';
}

/* KEYX_OBJ_* of a pkcs11 URI's type= (the last one given), all kinds without one. */
static int uri_kinds(const char *locator)
{
    const char *a = locator + strlen("pkcs11:"), *end = a + strcspn(a, "?");
    int kinds = KEYX_OBJ_ALL;

    while (a < end) {
        size_t len = strcspn(a, ";?");

        if (len >= 5 && strncmp(a, "type=", 5) == 0)
            kinds = value_is(a + 5, len - 5, "private")  ? KEYX_OBJ_PRIVATE
                    : value_is(a + 5, len - 5, "public") ? KEYX_OBJ_PUBLIC
                    : value_is(a + 5, len - 5, "cert")   ? KEYX_OBJ_CERT
                                                         : 0;
        a += len;
        if (*a == ';')
            a++;
        else
            break;
    }
    return kinds;
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
    out->kinds = out->backend == KEYX_BACKEND_PKCS11 ? uri_kinds(locator)
                                                     : KEYX_OBJ_PRIVATE | KEYX_OBJ_PUBLIC;
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
