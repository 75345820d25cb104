/* Target 2: configuration values. The input is a list of records "key index (one byte), value,
 * NUL"; keyx_config_load (provider/config.c) reads them as the core hands over openssl.cnf
 * values. Every value is also judged by an independent validator written from the table of
 * docs/configuration.md (strtoull, strcasecmp, strtok_r): keyx must accept exactly the
 * configurations it accepts, and store what they say. */
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/params.h>

#include "provider/config.h"
#include "tests/fuzz/harness.h"

enum kind { BACKENDS, STRING, PARENT, TOKEN, PIN, BOOL, POOL, COUNT, MSEC };

static const struct {
    const char *name;
    enum kind kind;
} keys[] = {
    {"backends", BACKENDS},    {"tpm-tcti", STRING},           {"tpm-parent", PARENT},
    {"pkcs11-module", STRING}, {"pkcs11-token", TOKEN},        {"pkcs11-pin", PIN},
    {"pkcs11-raw-rsa", BOOL},  {"tpm-encrypt-sessions", BOOL}, {"tpm-pool", POOL},
    {"pkcs11-pool", POOL},     {"audit-log", STRING},          {"ephemeral-max-uses", COUNT},
    {"debug", BOOL},           {"tpm-timeout", MSEC},
};

#define NKEYS (sizeof(keys) / sizeof(keys[0]))
#define MAX_VALUE 512

static const char *values[NKEYS];

static int get_params(const OSSL_CORE_HANDLE *handle, OSSL_PARAM params[])
{
    (void)handle;
    for (OSSL_PARAM *p = params; p->key != NULL; p++)
        for (size_t i = 0; i < NKEYS; i++)
            if (values[i] != NULL && strcmp(p->key, keys[i].name) == 0 &&
                !OSSL_PARAM_set_utf8_ptr(p, values[i]))
                return 0;
    return 1;
}

/* ---- the independent validators ---------------------------------------------------------- */

static int c_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

static int all_digits(const char *v)
{
    if (*v == '\0')
        return 0;
    for (; *v; v++)
        if (*v < '0' || *v > '9')
            return 0;
    return 1;
}

static int dec_ok(const char *v, unsigned long long max, unsigned long long *out)
{
    unsigned long long x;

    if (!all_digits(v))
        return 0;
    errno = 0;
    x = strtoull(v, NULL, 10);
    if (errno == ERANGE || x > max)
        return 0;
    *out = x;
    return 1;
}

static int bool_ok(const char *v, int *out)
{
    static const char *const yes[] = {"1", "yes", "true", "on"}, *const no[] = {"0", "no", "false",
                                                                                "off"};

    for (int i = 0; i < 4; i++) {
        if (strcasecmp(v, yes[i]) == 0)
            return *out = 1, 1;
        if (strcasecmp(v, no[i]) == 0)
            return *out = 0, 1;
    }
    return 0;
}

static int parent_ok(const char *v, uint32_t *out)
{
    unsigned long long x;

    if (v[0] != '0' || (v[1] != 'x' && v[1] != 'X') || v[2] == '\0' ||
        strspn(v + 2, "0123456789abcdefABCDEF") != strlen(v + 2))
        return 0;
    errno = 0;
    x = strtoull(v + 2, NULL, 16);
    if (errno == ERANGE || x < 0x81000000ull || x > 0x81FFFFFFull)
        return 0;
    *out = (uint32_t)x;
    return 1;
}

static int backends_ok(const char *v, keyx_backend_kind *list, size_t *n)
{
    static const char *const names[] = {"software", "tpm", "pkcs11"};
    char *copy = strdup(v), *save = NULL, *tok;
    int ok = copy != NULL;

    *n = 0;
    for (tok = ok ? strtok_r(copy, ", \t\n\r\v\f", &save) : NULL; ok && tok != NULL;
         tok = strtok_r(NULL, ", \t\n\r\v\f", &save)) {
        int kind = -1;

        for (int i = 0; i < 3; i++)
            if (strcasecmp(tok, names[i]) == 0)
                kind = i;
        for (size_t i = 0; kind >= 0 && i < *n; i++)
            if ((int)list[i] == kind)
                kind = -1; /* named twice */
        if (kind < 0)
            ok = 0;
        else
            list[(*n)++] = (keyx_backend_kind)kind;
    }
    free(copy);
    return ok && *n > 0;
}

/* Items joined by single spaces into norm (at least strlen(v) + 1 bytes). */
static int token_ok(const char *v, char *norm)
{
    char *copy = strdup(v), *save = NULL, *tok;
    int ok = copy != NULL, items = 0;

    norm[0] = '\0';
    for (tok = ok ? strtok_r(copy, " \t\n\r\v\f", &save) : NULL; ok && tok != NULL;
         tok = strtok_r(NULL, " \t\n\r\v\f", &save)) {
        if (strncmp(tok, "pkcs11:", 7) != 0)
            ok = 0;
        for (const char *c = tok; ok && (c = strchr(c, '%')) != NULL; c++)
            if (!isxdigit((unsigned char)c[1]) || !isxdigit((unsigned char)c[2]))
                ok = 0; /* every '%' starts a two-digit hex escape (RFC 7512) */
        if (items++ > 0)
            strcat(norm, " ");
        strcat(norm, tok);
    }
    free(copy);
    return ok && items > 0;
}

static int string_ok(const char *v)
{
    for (; *v; v++)
        if (!c_space(*v))
            return 1;
    return 0;
}

static int pin_ok(const char *v)
{
    if (strncmp(v, "file:", 5) == 0)
        return v[5] != '\0';
    if (strncmp(v, "env:", 4) == 0)
        return v[4] != '\0';
    return v[0] != '\0';
}

/* 1 when value is valid for key i, and then cfg (loaded by keyx) must hold it. */
static int valid(size_t i, const char *v)
{
    keyx_backend_kind list[KEYX_BACKEND_KINDS + 1];
    unsigned long long x;
    size_t n;
    uint32_t h;
    int b;
    char norm[MAX_VALUE + 1];

    switch (keys[i].kind) {
    case BACKENDS:
        return backends_ok(v, list, &n);
    case STRING:
        return string_ok(v);
    case PARENT:
        return parent_ok(v, &h);
    case TOKEN:
        return token_ok(v, norm);
    case PIN:
        return pin_ok(v);
    case BOOL:
        return bool_ok(v, &b);
    case POOL:
        return dec_ok(v, 1024, &x);
    case COUNT:
        return dec_ok(v, INT64_MAX, &x);
    case MSEC:
        return dec_ok(v, 600000, &x) && x >= 100;
    }
    return 0;
}

static void check_stored(const keyx_config *cfg, size_t i, const char *v)
{
    keyx_backend_kind list[KEYX_BACKEND_KINDS + 1];
    unsigned long long x = 0;
    size_t n = 0;
    uint32_t h = 0;
    int b = 0;
    char norm[MAX_VALUE + 1];

    switch (i) {
    case 0:
        backends_ok(v, list, &n);
        if (cfg->nbackends != n || memcmp(cfg->backends, list, n * sizeof(list[0])) != 0)
            fuzz_fail("backends stored differ from the value");
        return;
    case 1:
        if (cfg->tpm_tcti == NULL || strcmp(cfg->tpm_tcti, v) != 0)
            fuzz_fail("tpm-tcti stored differs");
        return;
    case 2:
        parent_ok(v, &h);
        if (cfg->tpm_parent != h)
            fuzz_fail("tpm-parent stored differs");
        return;
    case 3:
        if (cfg->pkcs11_module == NULL || strcmp(cfg->pkcs11_module, v) != 0)
            fuzz_fail("pkcs11-module stored differs");
        return;
    case 4:
        token_ok(v, norm);
        if (cfg->pkcs11_token == NULL || strcmp(cfg->pkcs11_token, norm) != 0)
            fuzz_fail("pkcs11-token stored differs from its items joined by spaces");
        return;
    case 5:
        if (cfg->pkcs11_pin == NULL || strcmp(cfg->pkcs11_pin, v) != 0)
            fuzz_fail("pkcs11-pin stored differs");
        return;
    case 6:
    case 7:
    case 12:
        bool_ok(v, &b);
        if ((i == 6 ? cfg->pkcs11_raw_rsa : i == 7 ? cfg->tpm_encrypt_sessions : cfg->debug) != b)
            fuzz_fail("boolean stored differs");
        return;
    case 8:
    case 9:
        dec_ok(v, 1024, &x);
        if ((i == 8 ? cfg->tpm_pool : cfg->pkcs11_pool) != x)
            fuzz_fail("pool size stored differs");
        return;
    case 10:
        if (cfg->audit_log == NULL || strcmp(cfg->audit_log, v) != 0)
            fuzz_fail("audit-log stored differs");
        return;
    case 11:
        dec_ok(v, INT64_MAX, &x);
        if (cfg->ephemeral_max_uses != x)
            fuzz_fail("ephemeral-max-uses stored differs");
        return;
    case 13:
        dec_ok(v, 600000, &x);
        if (cfg->tpm_timeout_ms != x)
            fuzz_fail("tpm-timeout stored differs");
        return;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *buf[NKEYS] = {NULL};
    keyx_config cfg;
    int expect = 1, ok;
    size_t i;

    if (size > 4 * MAX_VALUE)
        return 0;
    /* records: index byte, value up to the next NUL (or the end); the last value of a key wins */
    while (size > 0) {
        size_t k = data[0] % NKEYS, len;
        const uint8_t *end;

        data++, size--;
        end = memchr(data, 0, size);
        len = end != NULL ? (size_t)(end - data) : size;
        if (len > MAX_VALUE)
            goto out;
        free(buf[k]);
        if ((buf[k] = malloc(len + 1)) == NULL)
            goto out;
        memcpy(buf[k], data, len);
        buf[k][len] = '\0';
        data += len + (end != NULL), size -= len + (end != NULL);
    }
    for (i = 0; i < NKEYS; i++) {
        values[i] = buf[i];
        if (buf[i] != NULL && !valid(i, buf[i]))
            expect = 0;
    }
    fuzz_stderr_off(); /* a literal PIN is warned about on stderr */
    ok = keyx_config_load(&cfg, fuzz_bare_provctx(), get_params);
    fuzz_stderr_on();
    if (ok != expect)
        fuzz_fail(ok ? "keyx accepted a configuration value the validator refuses"
                     : "keyx refused a configuration the validator accepts");
    if (ok) {
        for (i = 0; i < NKEYS; i++)
            if (buf[i] != NULL)
                check_stored(&cfg, i, buf[i]);
        if (buf[0] == NULL && (cfg.nbackends != 1 || cfg.backends[0] != KEYX_BACKEND_SOFTWARE))
            fuzz_fail("default backends is not software");
        keyx_config_free(&cfg);
    }
    ERR_clear_error();
out:
    for (i = 0; i < NKEYS; i++) {
        free(buf[i]);
        values[i] = NULL;
    }
    return 0;
}
