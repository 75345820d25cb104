#include <ctype.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/params.h>

#include "keymgmt/gen_target.h"
#include "provider/errors.h"
#include "provider/provctx.h"

const OSSL_PARAM *keyx_gen_target_settable(void)
{
    static const OSSL_PARAM settable[] = {
        OSSL_PARAM_utf8_string(KEYX_PARAM_BACKEND, NULL, 0),
        OSSL_PARAM_utf8_string(KEYX_PARAM_PERSIST, NULL, 0),
        OSSL_PARAM_utf8_string(KEYX_PARAM_LABEL, NULL, 0),
        OSSL_PARAM_utf8_string(KEYX_PARAM_ID, NULL, 0),
        OSSL_PARAM_END,
    };

    return settable;
}

/* The string value of key in params: 1 found, 0 absent, -1 present but not a string. */
static int string_param(const OSSL_PARAM params[], const char *key, const char **out)
{
    const OSSL_PARAM *p = OSSL_PARAM_locate_const(params, key);

    *out = NULL;
    if (p == NULL)
        return 0;
    return OSSL_PARAM_get_utf8_string_ptr(p, out) && **out != '\0' ? 1 : -1;
}

static int hexval(int c)
{
    return isdigit(c) ? c - '0' : tolower(c) - 'a' + 10;
}

/* "01", "a1b2", "%a1%b2" (as in a PKCS#11 URI) or "a1:b2" (as pkcs11-tool prints). */
static int parse_id(const char *s, unsigned char *out, size_t cap, size_t *len)
{
    size_t n = 0;

    while (*s != '\0') {
        if (*s == '%' || *s == ':') {
            s++;
            continue;
        }
        if (!isxdigit((unsigned char)s[0]) || !isxdigit((unsigned char)s[1]) || n == cap)
            return 0;
        out[n++] = (unsigned char)(hexval((unsigned char)s[0]) << 4 | hexval((unsigned char)s[1]));
        s += 2;
    }
    *len = n;
    return n > 0;
}

static int parse_kind(const char *name, keyx_backend_kind *kind)
{
    for (int k = 0; k < KEYX_BACKEND_KINDS; k++)
        if (strcmp(name, keyx_backend_kind_name((keyx_backend_kind)k)) == 0) {
            *kind = (keyx_backend_kind)k;
            return 1;
        }
    return 0;
}

/* Sets the backend a persistence parameter implies; 0 + error when keyx-backend said another. */
static int implied(keyx_provctx *p, keyx_gen_target *t, keyx_backend_kind kind, const char *key)
{
    if (t->named && t->kind != kind) {
        if (t->persistent) /* keyx-persist with keyx-label/keyx-id */
            KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT,
                     "%s and %s cannot be combined: %s and %s name PKCS#11 token keys, %s a TPM "
                     "handle",
                     KEYX_PARAM_PERSIST, key, KEYX_PARAM_LABEL, KEYX_PARAM_ID, KEYX_PARAM_PERSIST);
        else
            KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT, "%s is for keys of the %s backend, not %s", key,
                     keyx_backend_kind_name(kind), keyx_backend_kind_name(t->kind));
        return 0;
    }
    t->named = 1;
    t->kind = kind;
    t->persistent = 1;
    return 1;
}

int keyx_gen_target_parse(keyx_provctx *p, const OSSL_PARAM params[], keyx_gen_target *t)
{
    const char *backend, *handle, *label, *id;
    int rb, rh, rl, ri;

    memset(t, 0, sizeof(*t));
    if (params == NULL)
        return 1;
    rb = string_param(params, KEYX_PARAM_BACKEND, &backend);
    rh = string_param(params, KEYX_PARAM_PERSIST, &handle);
    rl = string_param(params, KEYX_PARAM_LABEL, &label);
    ri = string_param(params, KEYX_PARAM_ID, &id);
    if (rb < 0 || rh < 0 || rl < 0 || ri < 0) {
        KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT, "%s, %s, %s and %s take non-empty strings",
                 KEYX_PARAM_BACKEND, KEYX_PARAM_PERSIST, KEYX_PARAM_LABEL, KEYX_PARAM_ID);
        return 0;
    }
    if (rb && !(t->named = parse_kind(backend, &t->kind))) {
        KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT, "%s:%s: expected software, tpm or pkcs11",
                 KEYX_PARAM_BACKEND, backend);
        return 0;
    }
    if (rh) {
        char *end;
        unsigned long h = strtoul(handle, &end, 0);

        if (*end != '\0' || h < 0x81000000UL || h > 0x81FFFFFFUL) {
            KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT,
                     "%s:%s: expected a TPM persistent handle 0x81000000..0x81FFFFFF",
                     KEYX_PARAM_PERSIST, handle);
            return 0;
        }
        if (!implied(p, t, KEYX_BACKEND_TPM, KEYX_PARAM_PERSIST))
            return 0;
        t->persist.tpm_handle = h;
    }
    if (rl) {
        if (!implied(p, t, KEYX_BACKEND_PKCS11, KEYX_PARAM_LABEL))
            return 0;
        t->persist.label = label;
    }
    if (ri) {
        if (!parse_id(id, t->id, sizeof(t->id), &t->persist.idlen)) {
            KEYX_ERR(
                p, KEYX_R_INVALID_ARGUMENT,
                "%s:%s: expected hex digits (\"01\", \"a1b2\", \"%%a1%%b2\"), at most %zu bytes",
                KEYX_PARAM_ID, id, sizeof(t->id));
            return 0;
        }
        if (!implied(p, t, KEYX_BACKEND_PKCS11, KEYX_PARAM_ID))
            return 0;
        t->persist.id = t->id;
    }
    return 1;
}
