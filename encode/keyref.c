#include <string.h>

#include <openssl/asn1t.h>
#include <openssl/crypto.h>
#include <openssl/err.h>

#include "encode/keyref.h"

typedef struct {
    ASN1_INTEGER *version;
    ASN1_UTF8STRING *backend;
    ASN1_UTF8STRING *locator;
    ASN1_TYPE *public_key;
} KEYX_KEYREF_ASN1;

ASN1_SEQUENCE(KEYX_KEYREF_ASN1) =
    {
        ASN1_SIMPLE(KEYX_KEYREF_ASN1, version, ASN1_INTEGER),
        ASN1_SIMPLE(KEYX_KEYREF_ASN1, backend, ASN1_UTF8STRING),
        ASN1_SIMPLE(KEYX_KEYREF_ASN1, locator, ASN1_UTF8STRING),
        ASN1_SIMPLE(KEYX_KEYREF_ASN1, public_key, ASN1_ANY),
} ASN1_SEQUENCE_END(KEYX_KEYREF_ASN1)

        IMPLEMENT_ASN1_ALLOC_FUNCTIONS(KEYX_KEYREF_ASN1)

#define KEYREF_VERSION 1

            int keyx_keyref_to_der(const keyx_keyref *r, unsigned char **der, size_t *len)
{
    KEYX_KEYREF_ASN1 *a = KEYX_KEYREF_ASN1_new();
    ASN1_STRING *seq = ASN1_STRING_new();
    unsigned char *out = NULL;
    int n = -1;

    *der = NULL;
    if (a != NULL && seq != NULL && ASN1_INTEGER_set(a->version, KEYREF_VERSION) &&
        ASN1_STRING_set(a->backend, r->backend, -1) &&
        ASN1_STRING_set(a->locator, r->locator, -1) &&
        ASN1_STRING_set(seq, r->spki, (int)r->spkilen)) {
        /* an ANY holding a SEQUENCE keeps its whole encoding, tag included */
        ASN1_TYPE_set(a->public_key, V_ASN1_SEQUENCE, seq);
        seq = NULL;
        n = ASN1_item_i2d((ASN1_VALUE *)a, &out, ASN1_ITEM_rptr(KEYX_KEYREF_ASN1));
    }
    ASN1_STRING_free(seq);
    KEYX_KEYREF_ASN1_free(a);
    if (n <= 0)
        return 0;
    *der = out;
    *len = (size_t)n;
    return 1;
}

static char *string_of(const ASN1_UTF8STRING *s)
{
    int n = ASN1_STRING_length(s);
    const unsigned char *d = ASN1_STRING_get0_data(s);

    /* no NULs inside: the string goes to C APIs */
    if (n <= 0 || memchr(d, 0, (size_t)n) != NULL)
        return NULL;
    return OPENSSL_strndup((const char *)d, (size_t)n);
}

int keyx_keyref_from_der(const unsigned char *der, size_t len, keyx_keyref *r)
{
    const unsigned char *p = der;
    KEYX_KEYREF_ASN1 *a;
    const ASN1_STRING *seq;
    int ok = 0;

    memset(r, 0, sizeof(*r));
    if (len > LONG_MAX)
        return 0;
    a = (KEYX_KEYREF_ASN1 *)ASN1_item_d2i(NULL, &p, (long)len, ASN1_ITEM_rptr(KEYX_KEYREF_ASN1));
    if (a == NULL || p != der + len || ASN1_INTEGER_get(a->version) != KEYREF_VERSION ||
        a->public_key->type != V_ASN1_SEQUENCE)
        goto end;
    seq = a->public_key->value.sequence;
    r->backend = string_of(a->backend);
    r->locator = string_of(a->locator);
    r->spkilen = (size_t)ASN1_STRING_length(seq);
    r->spki = OPENSSL_memdup(ASN1_STRING_get0_data(seq), r->spkilen);
    ok = r->backend != NULL && r->locator != NULL && r->spki != NULL;
    if (!ok)
        keyx_keyref_clear(r);
end:
    KEYX_KEYREF_ASN1_free(a);
    return ok;
}

int keyx_keyref_is_reference(const unsigned char *der, size_t len)
{
    keyx_keyref r;
    int ok;

    ERR_set_mark();
    ok = keyx_keyref_from_der(der, len, &r);
    ERR_pop_to_mark();
    keyx_keyref_clear(&r);
    return ok;
}

void keyx_keyref_clear(keyx_keyref *r)
{
    OPENSSL_free(r->backend);
    OPENSSL_free(r->locator);
    OPENSSL_free(r->spki);
    memset(r, 0, sizeof(*r));
}
