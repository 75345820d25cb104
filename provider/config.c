/* keyx configuration: defaults, then the provider's openssl.cnf section (through the core), then
 * the KEYX_* environment. Every value is validated; the first bad one fails the load with one
 * KEYX_R_CONFIG_INVALID error naming the key, where the value came from and what is accepted. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1 /* secure_getenv */
#endif

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <unistd.h>

#include <openssl/conf.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/params.h>

#include "provider/config.h"
#include "provider/errors.h"
#include "provider/provctx.h"

#define FROM_CNF "openssl.cnf"

typedef enum key_kind {
    KIND_BACKENDS, /* keyx_backend_kind[] + nbackends */
    KIND_STRING,   /* char *, non-empty */
    KIND_PARENT,   /* uint32_t, persistent handle */
    KIND_TOKEN,    /* char *, space-separated pkcs11: URIs */
    KIND_PIN,      /* char *, file:PATH, env:NAME or a literal */
    KIND_BOOL,     /* int, 0 or 1 */
    KIND_POOL,     /* unsigned int, 0..1024 */
    KIND_COUNT,    /* uint64_t, 0..2^63-1 */
    KIND_MSEC,     /* unsigned int, 100..600000 (milliseconds) */
} key_kind;

typedef struct key_def {
    const char *name;     /* key in the provider's openssl.cnf section */
    const char *env;      /* overriding environment variable */
    key_kind kind;        /* how to parse and store it */
    size_t off;           /* field in keyx_config */
    const char *accepted; /* end of "expected ..." in the error detail */
} key_def;

#define CFG_OFF(field) offsetof(keyx_config, field)
#define POOL_MAX 1024u
#define MSEC_MIN 100u
#define MSEC_MAX 600000u

static const key_def keys[] = {
    {"backends", "KEYX_BACKENDS", KIND_BACKENDS, CFG_OFF(backends),
     "a comma-separated list of software, tpm, pkcs11"},
    {"tpm-tcti", "KEYX_TPM_TCTI", KIND_STRING, CFG_OFF(tpm_tcti),
     "a non-empty TCTI configuration, e.g. device:/dev/tpmrm0 or swtpm:host=127.0.0.1,port=2321"},
    {"tpm-parent", "KEYX_TPM_PARENT", KIND_PARENT, CFG_OFF(tpm_parent),
     "a persistent handle in hex, 0x81000000 to 0x81FFFFFF"},
    {"pkcs11-module", "KEYX_PKCS11_MODULE", KIND_STRING, CFG_OFF(pkcs11_module),
     "a non-empty path of a PKCS#11 module"},
    {"pkcs11-token", "KEYX_PKCS11_TOKEN", KIND_TOKEN, CFG_OFF(pkcs11_token),
     "one or more space-separated PKCS#11 URIs, each starting with pkcs11: (with valid %XX "
     "escapes)"},
    {"pkcs11-pin", "KEYX_PKCS11_PIN", KIND_PIN, CFG_OFF(pkcs11_pin),
     "file:PATH or env:NAME with a non-empty PATH or NAME, or a non-empty literal PIN"},
    {"pkcs11-raw-rsa", "KEYX_PKCS11_RAW_RSA", KIND_BOOL, CFG_OFF(pkcs11_raw_rsa),
     "0, 1, yes, no, true, false, on or off"},
    {"tpm-encrypt-sessions", "KEYX_TPM_ENCRYPT_SESSIONS", KIND_BOOL, CFG_OFF(tpm_encrypt_sessions),
     "0, 1, yes, no, true, false, on or off"},
    {"tpm-timeout", "KEYX_TPM_TIMEOUT", KIND_MSEC, CFG_OFF(tpm_timeout_ms),
     "a decimal number of milliseconds from 100 to 600000"},
    {"tpm-pool", "KEYX_TPM_POOL", KIND_POOL, CFG_OFF(tpm_pool), "a decimal integer from 0 to 1024"},
    {"pkcs11-pool", "KEYX_PKCS11_POOL", KIND_POOL, CFG_OFF(pkcs11_pool),
     "a decimal integer from 0 to 1024"},
    {"pkcs11-timeout", "KEYX_PKCS11_TIMEOUT", KIND_MSEC, CFG_OFF(pkcs11_timeout_ms),
     "a decimal number of milliseconds from 100 to 600000"},
    {"audit-log", "KEYX_AUDIT_LOG", KIND_STRING, CFG_OFF(audit_log),
     "a non-empty path of the audit log file"},
    {"ephemeral-max-uses", "KEYX_EPHEMERAL_MAX_USES", KIND_COUNT, CFG_OFF(ephemeral_max_uses),
     "a decimal integer from 0 (unlimited) to 9223372036854775807"},
    {"debug", "KEYX_DEBUG", KIND_BOOL, CFG_OFF(debug), "0, 1, yes, no, true, false, on or off"},
};

#define NKEYS (sizeof(keys) / sizeof(keys[0]))

/* Keys OpenSSL itself reads from a provider section (crypto/provider_conf.c). */
static const char *const openssl_keys[] = {"module", "activate", "identity", "soft_load"};

static const char *const backend_names[KEYX_BACKEND_KINDS] = {
    [KEYX_BACKEND_SOFTWARE] = "software",
    [KEYX_BACKEND_TPM] = "tpm",
    [KEYX_BACKEND_PKCS11] = "pkcs11",
};

const char *keyx_backend_kind_name(keyx_backend_kind kind)
{
    if ((unsigned int)kind >= KEYX_BACKEND_KINDS)
        return "unknown";
    return backend_names[kind];
}

/* ---- small helpers ------------------------------------------------------------------------ */

/* A warning on stderr in one write(), so that concurrent lines do not interleave. */
static void warn(const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 1, 2)))
#endif
    ;

static void warn(const char *fmt, ...)
{
    char line[512];
    va_list ap;
    int n;
    size_t len;

    memcpy(line, "keyx: warning: ", 15);
    va_start(ap, fmt);
    n = vsnprintf(line + 15, sizeof(line) - 16, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    len = 15 + ((size_t)n < sizeof(line) - 16 ? (size_t)n : sizeof(line) - 17);
    line[len++] = '\n';
    while (write(STDERR_FILENO, line, len) < 0 && errno == EINTR)
        ;
}

static int is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

static char lower(char c)
{
    return (c >= 'A' && c <= 'Z') ? (char)(c - 'A' + 'a') : c;
}

/* ASCII case-insensitive comparison of s[0..n) with the NUL-terminated word (locale-free). */
static int word_eq(const char *s, size_t n, const char *word)
{
    size_t i;

    for (i = 0; i < n; i++)
        if (word[i] == '\0' || lower(s[i]) != word[i])
            return 0;
    return word[n] == '\0';
}

static int all_space(const char *s)
{
    for (; *s != '\0'; s++)
        if (!is_space(*s))
            return 0;
    return 1;
}

/* The value as shown in an error detail: printable ASCII kept, the rest as \xNN, long values
 * cut with "...". */
static void show(char *out, size_t outlen, const char *v)
{
    static const char hex[] = "0123456789abcdef";
    size_t o = 0;

    for (; *v != '\0'; v++) {
        unsigned char c = (unsigned char)*v;
        size_t need = (c < 0x20 || c >= 0x7f) ? 4 : (c == '"' || c == '\\') ? 2 : 1;

        if (o + need + 4 > outlen) {
            memcpy(out + o, "...", 3);
            o += 3;
            break;
        }
        if (need == 4) {
            out[o++] = '\\';
            out[o++] = 'x';
            out[o++] = hex[c >> 4];
            out[o++] = hex[c & 15];
        } else {
            if (need == 2)
                out[o++] = '\\';
            out[o++] = (char)c;
        }
    }
    out[o] = '\0';
}

static int config_invalid(const keyx_provctx *p, const key_def *k, const char *src,
                          const char *value, const char *accepted)
{
    char shown[96];

    if (k->kind == KIND_PIN) {
        /* Never any part of a PIN, not even a rejected one. */
        KEYX_ERR(p, KEYX_R_CONFIG_INVALID, "%s (value not shown): expected %s (from %s)", k->name,
                 accepted, src);
        return 0;
    }
    show(shown, sizeof(shown), value);
    KEYX_ERR(p, KEYX_R_CONFIG_INVALID, "%s = \"%s\": expected %s (from %s)", k->name, shown,
             accepted, src);
    return 0;
}

static int out_of_memory(const keyx_provctx *p, const key_def *k)
{
    KEYX_ERR(p, KEYX_R_INTERNAL, "out of memory storing configuration key %s", k->name);
    return 0;
}

/* ---- parsers ------------------------------------------------------------------------------ */

static int parse_backends(const char *v, keyx_backend_kind *out, size_t *nout, int *dup)
{
    size_t n = 0;

    *dup = 0;
    while (*v != '\0') {
        const char *start;
        size_t len, i;
        int kind = -1;

        while (*v == ',' || is_space(*v))
            v++;
        if (*v == '\0')
            break;
        start = v;
        while (*v != '\0' && *v != ',' && !is_space(*v))
            v++;
        len = (size_t)(v - start);
        for (i = 0; i < KEYX_BACKEND_KINDS; i++)
            if (word_eq(start, len, backend_names[i]))
                kind = (int)i;
        if (kind < 0)
            return 0;
        for (i = 0; i < n; i++) {
            if (out[i] == (keyx_backend_kind)kind) {
                *dup = 1;
                return 0;
            }
        }
        out[n++] = (keyx_backend_kind)kind;
    }
    *nout = n;
    return n > 0;
}

static int parse_bool(const char *v, int *out)
{
    static const char *const yes[] = {"1", "yes", "true", "on"};
    static const char *const no[] = {"0", "no", "false", "off"};
    size_t i, len = strlen(v);

    for (i = 0; i < sizeof(yes) / sizeof(yes[0]); i++) {
        if (word_eq(v, len, yes[i])) {
            *out = 1;
            return 1;
        }
        if (word_eq(v, len, no[i])) {
            *out = 0;
            return 1;
        }
    }
    return 0;
}

/* Decimal digits only (no sign, space or junk), value <= max, overflow rejected. */
static int parse_dec(const char *v, uint64_t max, uint64_t *out)
{
    uint64_t x = 0;

    if (*v == '\0')
        return 0;
    for (; *v != '\0'; v++) {
        unsigned int d;

        if (*v < '0' || *v > '9')
            return 0;
        d = (unsigned int)(*v - '0');
        if (x > (max - d) / 10)
            return 0;
        x = x * 10 + d;
    }
    *out = x;
    return 1;
}

static int parse_parent(const char *v, uint32_t *out)
{
    uint64_t x = 0;

    if (v[0] != '0' || (v[1] != 'x' && v[1] != 'X') || v[2] == '\0')
        return 0;
    for (v += 2; *v != '\0'; v++) {
        char c = lower(*v);
        unsigned int d;

        if (c >= '0' && c <= '9')
            d = (unsigned int)(c - '0');
        else if (c >= 'a' && c <= 'f')
            d = (unsigned int)(c - 'a' + 10);
        else
            return 0;
        x = x * 16 + d;
        if (x > 0xFFFFFFFFu)
            return 0;
    }
    if (x < 0x81000000u || x > 0x81FFFFFFu)
        return 0;
    *out = (uint32_t)x;
    return 1;
}

static int is_hex(char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

/* Every '%' of a URI starts a two-digit hex escape (RFC 7512): a broken one is refused at load,
 * not at the first operation. */
static int percent_escapes_ok(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (s[i] == '%' && (i + 2 >= n || !is_hex(s[i + 1]) || !is_hex(s[i + 2])))
            return 0;
    return 1;
}

/* Checks every whitespace-separated item starts with "pkcs11:" and returns them joined by single
 * spaces (so that consumers can split on ' '). 0: invalid; 1: *out set (NULL on no memory). */
static int parse_token(const char *v, char **out)
{
    size_t len = strlen(v), o = 0;
    char *norm;
    int items = 0;

    *out = NULL;
    norm = OPENSSL_malloc(len + 1);
    while (*v != '\0') {
        const char *start;

        while (is_space(*v))
            v++;
        if (*v == '\0')
            break;
        start = v;
        while (*v != '\0' && !is_space(*v))
            v++;
        if ((size_t)(v - start) < 7 || strncmp(start, "pkcs11:", 7) != 0 ||
            !percent_escapes_ok(start, (size_t)(v - start))) {
            OPENSSL_free(norm);
            return 0;
        }
        if (norm != NULL) {
            if (items > 0)
                norm[o++] = ' ';
            memcpy(norm + o, start, (size_t)(v - start));
            o += (size_t)(v - start);
        }
        items++;
    }
    if (items == 0) {
        OPENSSL_free(norm);
        return 0;
    }
    if (norm != NULL)
        norm[o] = '\0';
    *out = norm;
    return 1;
}

/* 1: valid; *literal set when v is a literal PIN rather than file:PATH or env:NAME. */
static int check_pin(const char *v, int *literal)
{
    *literal = 0;
    if (strncmp(v, "file:", 5) == 0)
        return v[5] != '\0';
    if (strncmp(v, "env:", 4) == 0)
        return v[4] != '\0';
    *literal = 1;
    return v[0] != '\0';
}

/* ---- one key ------------------------------------------------------------------------------ */

static int apply(keyx_config *cfg, const keyx_provctx *p, const key_def *k, const char *v,
                 const char *src)
{
    char *field = (char *)cfg + k->off;

    switch (k->kind) {
    case KIND_BACKENDS: {
        keyx_backend_kind list[KEYX_BACKEND_KINDS];
        size_t n = 0;
        int dup;

        if (!parse_backends(v, list, &n, &dup))
            return config_invalid(
                p, k, src, v,
                dup ? "a comma-separated list of software, tpm, pkcs11, each named once"
                    : k->accepted);
        memcpy(cfg->backends, list, n * sizeof(list[0]));
        cfg->nbackends = n;
        return 1;
    }
    case KIND_STRING: {
        char *s;

        if (v[0] == '\0' || all_space(v))
            return config_invalid(p, k, src, v, k->accepted);
        if ((s = OPENSSL_strdup(v)) == NULL)
            return out_of_memory(p, k);
        OPENSSL_free(*(char **)field);
        *(char **)field = s;
        return 1;
    }
    case KIND_PARENT: {
        uint32_t h;

        if (!parse_parent(v, &h))
            return config_invalid(p, k, src, v, k->accepted);
        *(uint32_t *)field = h;
        return 1;
    }
    case KIND_TOKEN: {
        char *s;

        if (!parse_token(v, &s))
            return config_invalid(p, k, src, v, k->accepted);
        if (s == NULL)
            return out_of_memory(p, k);
        OPENSSL_free(*(char **)field);
        *(char **)field = s;
        return 1;
    }
    case KIND_PIN: {
        char *old = *(char **)field, *s;
        int literal;

        if (!check_pin(v, &literal))
            return config_invalid(p, k, src, v, k->accepted);
        if ((s = OPENSSL_strdup(v)) == NULL)
            return out_of_memory(p, k);
        if (old != NULL)
            OPENSSL_clear_free(old, strlen(old));
        *(char **)field = s;
        if (literal)
            warn("pkcs11-pin holds a literal PIN; use file:PATH or env:NAME");
        return 1;
    }
    case KIND_BOOL: {
        int b;

        if (!parse_bool(v, &b))
            return config_invalid(p, k, src, v, k->accepted);
        *(int *)field = b;
        return 1;
    }
    case KIND_POOL: {
        uint64_t x;

        if (!parse_dec(v, POOL_MAX, &x))
            return config_invalid(p, k, src, v, k->accepted);
        *(unsigned int *)field = (unsigned int)x;
        return 1;
    }
    case KIND_MSEC: {
        uint64_t x;

        if (!parse_dec(v, MSEC_MAX, &x) || x < MSEC_MIN)
            return config_invalid(p, k, src, v, k->accepted);
        *(unsigned int *)field = (unsigned int)x;
        return 1;
    }
    case KIND_COUNT: {
        uint64_t x;

        if (!parse_dec(v, (uint64_t)INT64_MAX, &x))
            return config_invalid(p, k, src, v, k->accepted);
        *(uint64_t *)field = x;
        return 1;
    }
    }
    return 0;
}

/* ---- unknown keys (best effort) ----------------------------------------------------------- */

static const char *skip_dot(const char *name)
{
    const char *dot = strchr(name, '.');

    return dot != NULL ? dot + 1 : name;
}

static const key_def *keyx_key(const char *name)
{
    size_t i;

    for (i = 0; i < NKEYS; i++)
        if (strcmp(name, keys[i].name) == 0)
            return &keys[i];
    return NULL;
}

static int known_key(const char *name)
{
    size_t i;

    if (keyx_key(name) != NULL)
        return 1;
    /* OpenSSL accepts "1.activate" etc. for its own keys (duplicate names in one section). */
    for (i = 0; i < sizeof(openssl_keys) / sizeof(openssl_keys[0]); i++)
        if (strcmp(skip_dot(name), openssl_keys[i]) == 0)
            return 1;
    return 0;
}

/* The provider's section in conf: the [providers] entry named like the provider, or whose
 * section's `identity` names it. NULL when not found. */
static const char *provider_section(CONF *conf, const char *provname)
{
    const char *init, *provs;
    STACK_OF(CONF_VALUE) * list;
    int i, j;

    if ((init = NCONF_get_string(conf, NULL, "openssl_conf")) == NULL ||
        (provs = NCONF_get_string(conf, init, "providers")) == NULL ||
        (list = NCONF_get_section(conf, provs)) == NULL)
        return NULL;
    for (i = 0; i < sk_CONF_VALUE_num(list); i++) {
        CONF_VALUE *entry = sk_CONF_VALUE_value(list, i);
        STACK_OF(CONF_VALUE) * sect;
        const char *name;

        if (entry == NULL || entry->name == NULL || entry->value == NULL ||
            (sect = NCONF_get_section(conf, entry->value)) == NULL)
            continue;
        name = entry->name;
        for (j = 0; j < sk_CONF_VALUE_num(sect); j++) {
            CONF_VALUE *kv = sk_CONF_VALUE_value(sect, j);

            if (kv != NULL && kv->name != NULL && kv->value != NULL &&
                strcmp(skip_dot(kv->name), "identity") == 0)
                name = kv->value;
        }
        if (strcmp(name, provname) == 0)
            return entry->value;
    }
    return NULL;
}

/* Every key in keyx's section must be one keyx or OpenSSL knows, with a value keyx sees: a typo
 * (`backedns = tpm`) would otherwise leave keyx running on its defaults, in software. The core
 * passes keyx only the keys it asks for, so the section is read from the file here: OPENSSL_CONF
 * or OpenSSL's default file, when its keyx section matches what the core passed (a program that
 * loads a configuration by path is not checked). 0 with a KEYX_R_CONFIG_INVALID error naming the
 * first bad key. */
/* 1 when the section holds exactly the keyx keys and values the core gave keyx: the file read
 * here is the one the application loaded (it may have loaded another by path). */
static int same_section(CONF *conf, const char *section, char *const core_values[NKEYS])
{
    for (size_t i = 0; i < NKEYS; i++) {
        const char *v = NCONF_get_string(conf, section, keys[i].name);

        if (v != NULL && NCONF_get_section(conf, v) != NULL)
            v = NULL; /* OpenSSL reads that section instead: the core has no value for the key */
        if ((v == NULL) != (core_values[i] == NULL) ||
            (v != NULL && strcmp(v, core_values[i]) != 0))
            return 0;
    }
    return 1;
}

static int check_section_keys(const keyx_provctx *p, const char *provname,
                              char *const core_values[NKEYS])
{
    const char *env, *section = NULL;
    char *file = NULL, why[400] = "";
    CONF *conf = NULL;
    STACK_OF(CONF_VALUE) * sect;
    long eline = 0;
    int i;

    if (p == NULL || provname == NULL)
        return 1;
    ERR_set_mark(); /* nothing from this walk may reach the application's error queue */
    env = secure_getenv("OPENSSL_CONF");
    file = (env != NULL && env[0] != '\0') ? OPENSSL_strdup(env) : CONF_get1_default_config_file();
    if (file == NULL || (conf = NCONF_new_ex(p->libctx, NULL)) == NULL ||
        NCONF_load(conf, file, &eline) <= 0 ||
        (section = provider_section(conf, provname)) == NULL ||
        (sect = NCONF_get_section(conf, section)) == NULL ||
        !same_section(conf, section, core_values))
        goto end;
    for (i = 0; i < sk_CONF_VALUE_num(sect) && why[0] == '\0'; i++) {
        CONF_VALUE *kv = sk_CONF_VALUE_value(sect, i);
        const key_def *k;
        char shown[64];

        if (kv == NULL || kv->name == NULL || kv->value == NULL)
            continue;
        if (!known_key(kv->name)) {
            size_t used;

            show(shown, sizeof(shown), kv->name);
            snprintf(why, sizeof(why),
                     "unknown configuration key \"%s\" in [%s] (a typo?); keyx knows", shown,
                     section);
            for (size_t j = 0; j < NKEYS; j++) {
                used = strlen(why);
                snprintf(why + used, sizeof(why) - used, "%s %s", j ? "," : "", keys[j].name);
            }
        } else if ((k = keyx_key(kv->name)) != NULL && NCONF_get_section(conf, kv->value) != NULL) {
            /* OpenSSL turns such a value into the sub-section's keys: keyx never sees it. */
            show(shown, sizeof(shown), kv->value);
            snprintf(why, sizeof(why),
                     "%s in [%s] cannot be read: its value is also the name of a section%s%s%s, "
                     "which OpenSSL reads instead; rename that section",
                     k->name, section, k->kind == KIND_PIN ? "" : " [",
                     k->kind == KIND_PIN ? "" : shown, k->kind == KIND_PIN ? "" : "]");
        }
    }
end:
    NCONF_free(conf);
    OPENSSL_free(file);
    ERR_pop_to_mark();
    if (why[0] == '\0')
        return 1;
    KEYX_ERR(p, KEYX_R_CONFIG_INVALID, "%s", why);
    return 0;
}

/* ---- entry points ------------------------------------------------------------------------- */

int keyx_config_load(keyx_config *cfg, struct keyx_provctx *p,
                     OSSL_FUNC_core_get_params_fn *core_get_params)
{
    char *values[NKEYS] = {NULL};
    char *provname = NULL;
    OSSL_PARAM params[NKEYS + 2];
    size_t i;

    memset(cfg, 0, sizeof(*cfg));
    cfg->backends[0] = KEYX_BACKEND_SOFTWARE;
    cfg->nbackends = 1;
    cfg->tpm_encrypt_sessions = 1;
    cfg->tpm_timeout_ms = 5000;
    cfg->pkcs11_timeout_ms = 30000; /* a network HSM may take seconds for an RSA key pair */

    if (p != NULL && core_get_params != NULL) {
        for (i = 0; i < NKEYS; i++)
            params[i] = OSSL_PARAM_construct_utf8_ptr(keys[i].name, &values[i], 0);
        params[NKEYS] = OSSL_PARAM_construct_utf8_ptr(OSSL_PROV_PARAM_CORE_PROV_NAME, &provname, 0);
        params[NKEYS + 1] = OSSL_PARAM_construct_end();
        if (!core_get_params(p->handle, params)) {
            KEYX_ERR(p, KEYX_R_INTERNAL, "cannot read keyx's configuration from the core");
            return 0;
        }
        if (!check_section_keys(p, provname, values))
            return 0;
    }

    for (i = 0; i < NKEYS; i++) {
        const char *v = values[i], *src = FROM_CNF;
        const char *e = secure_getenv(keys[i].env);

        if (e != NULL) {
            v = e;
            src = keys[i].env;
        }
        if (v != NULL && !apply(cfg, p, &keys[i], v, src)) {
            keyx_config_free(cfg);
            return 0;
        }
    }
    return 1;
}

void keyx_config_free(keyx_config *cfg)
{
    if (cfg == NULL)
        return;
    OPENSSL_free(cfg->tpm_tcti);
    OPENSSL_free(cfg->pkcs11_module);
    OPENSSL_free(cfg->pkcs11_token);
    if (cfg->pkcs11_pin != NULL)
        OPENSSL_clear_free(cfg->pkcs11_pin, strlen(cfg->pkcs11_pin));
    OPENSSL_free(cfg->audit_log);
    memset(cfg, 0, sizeof(*cfg));
}
