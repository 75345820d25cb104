/* TLS-GROUP capabilities. OpenSSL 3.0 keeps a group only if the keymgmt fetched for it comes from
 * the provider that advertised it, so once keyx is preferred it must list its own groups, and
 * only those a configured backend can serve. Constants as the default provider's.
 * OpenSSL 3.5 keeps every provider's groups (docs/tls-servers.md): there openssl.cnf's `Groups`
 * decides, and keyx_tls_groups_line() says what it should be for the configured backends. */
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/params.h>
#include <openssl/prov_ssl.h>

#include "backend/router.h"
#include "provider/dispatch.h"
#include "provider/provctx.h"

typedef struct tls_group {
    const char *tls_name;
    const char *internal_name;
    const char *alg_name;
    keyx_alg alg;
    const char *group; /* keyx's canonical group name, for the router */
    unsigned int id;
    unsigned int secbits;
    int mintls, maxtls, mindtls, maxdtls;
} tls_group;

static const tls_group tls_groups[] = {
    {"secp256r1", "prime256v1", "EC", KEYX_ALG_EC, "P-256", 0x17, 128, TLS1_VERSION, 0,
     DTLS1_VERSION, 0},
    {"P-256", "prime256v1", "EC", KEYX_ALG_EC, "P-256", 0x17, 128, TLS1_VERSION, 0, DTLS1_VERSION,
     0},
    {"secp384r1", "secp384r1", "EC", KEYX_ALG_EC, "P-384", 0x18, 192, TLS1_VERSION, 0,
     DTLS1_VERSION, 0},
    {"P-384", "secp384r1", "EC", KEYX_ALG_EC, "P-384", 0x18, 192, TLS1_VERSION, 0, DTLS1_VERSION,
     0},
    {"secp521r1", "secp521r1", "EC", KEYX_ALG_EC, "P-521", 0x19, 256, TLS1_VERSION, 0,
     DTLS1_VERSION, 0},
    {"P-521", "secp521r1", "EC", KEYX_ALG_EC, "P-521", 0x19, 256, TLS1_VERSION, 0, DTLS1_VERSION,
     0},
    {"x25519", "X25519", "X25519", KEYX_ALG_X25519, "X25519", 0x1d, 128, TLS1_VERSION, 0,
     DTLS1_VERSION, 0},
    {"x448", "X448", "X448", KEYX_ALG_X448, "X448", 0x1e, 224, TLS1_VERSION, 0, DTLS1_VERSION, 0},
    {"ffdhe2048", "ffdhe2048", "DH", KEYX_ALG_DH, "ffdhe2048", 0x100, 112, TLS1_3_VERSION, 0, -1,
     -1},
    {"ffdhe3072", "ffdhe3072", "DH", KEYX_ALG_DH, "ffdhe3072", 0x101, 128, TLS1_3_VERSION, 0, -1,
     -1},
    {"ffdhe4096", "ffdhe4096", "DH", KEYX_ALG_DH, "ffdhe4096", 0x102, 128, TLS1_3_VERSION, 0, -1,
     -1},
    {"ffdhe6144", "ffdhe6144", "DH", KEYX_ALG_DH, "ffdhe6144", 0x103, 128, TLS1_3_VERSION, 0, -1,
     -1},
    {"ffdhe8192", "ffdhe8192", "DH", KEYX_ALG_DH, "ffdhe8192", 0x104, 192, TLS1_3_VERSION, 0, -1,
     -1},
};

static int tls_group_report(const tls_group *g, OSSL_CALLBACK *cb, void *arg)
{
    unsigned int id = g->id, secbits = g->secbits;
    int mintls = g->mintls, maxtls = g->maxtls, mindtls = g->mindtls, maxdtls = g->maxdtls;
    OSSL_PARAM params[] = {
        OSSL_PARAM_utf8_string(OSSL_CAPABILITY_TLS_GROUP_NAME, (char *)g->tls_name, 0),
        OSSL_PARAM_utf8_string(OSSL_CAPABILITY_TLS_GROUP_NAME_INTERNAL, (char *)g->internal_name,
                               0),
        OSSL_PARAM_utf8_string(OSSL_CAPABILITY_TLS_GROUP_ALG, (char *)g->alg_name, 0),
        OSSL_PARAM_uint(OSSL_CAPABILITY_TLS_GROUP_ID, &id),
        OSSL_PARAM_uint(OSSL_CAPABILITY_TLS_GROUP_SECURITY_BITS, &secbits),
        OSSL_PARAM_int(OSSL_CAPABILITY_TLS_GROUP_MIN_TLS, &mintls),
        OSSL_PARAM_int(OSSL_CAPABILITY_TLS_GROUP_MAX_TLS, &maxtls),
        OSSL_PARAM_int(OSSL_CAPABILITY_TLS_GROUP_MIN_DTLS, &mindtls),
        OSSL_PARAM_int(OSSL_CAPABILITY_TLS_GROUP_MAX_DTLS, &maxdtls),
        OSSL_PARAM_END,
    };

    params[0].data_size = strlen(g->tls_name) + 1;
    params[1].data_size = strlen(g->internal_name) + 1;
    params[2].data_size = strlen(g->alg_name) + 1;
    return cb(params, arg);
}

int keyx_get_capabilities(void *provctx, const char *capability, OSSL_CALLBACK *cb, void *arg)
{
    keyx_provctx *p = provctx;

    if (strcasecmp(capability, "TLS-GROUP") != 0)
        return 0;
    for (size_t i = 0; i < sizeof(tls_groups) / sizeof(tls_groups[0]); i++) {
        keyx_keyspec spec = {.alg = tls_groups[i].alg, .group = tls_groups[i].group};

        /* A group no configured backend can serve is not offered: TLS then never picks it. While
         * keyx refuses to serve (no router), every group is: a handshake then fails with keyx's
         * reason instead of running on the default provider's groups. */
        if (p->router != NULL && !keyx_router_offers(p->router, &spec))
            continue;
        if (!tls_group_report(&tls_groups[i], cb, arg))
            return 0;
    }
    return 1;
}

/* The recommended `Groups` value. Groups whose keys a hardware backend makes come first, so that a
 * client that supports them (every common client supports P-256) gets its key share in hardware,
 * through a HelloRetryRequest if it guessed another; groups only software serves follow. On 3.5
 * each group pairs with its hybrid ML-KEM group (the default provider's hybrid makes the
 * classical half through keyx) in one '/' tuple, so a client offering either one gets it. 3.0
 * knows neither hybrids nor tuples. Within a part, OpenSSL 3.5's default order. */
typedef struct groups_entry {
    const char *hybrid; /* 3.5 only; NULL: none */
    const char *name, *name2;
    keyx_alg alg;
} groups_entry;

static const groups_entry groups_order[] = {
    {"X25519MLKEM768", "X25519", NULL, KEYX_ALG_X25519},
    {"SecP256r1MLKEM768", "P-256", NULL, KEYX_ALG_EC},
    {"SecP384r1MLKEM1024", "P-384", NULL, KEYX_ALG_EC},
    {NULL, "P-521", NULL, KEYX_ALG_EC},
    {NULL, "X448", NULL, KEYX_ALG_X448},
    {NULL, "ffdhe2048", "ffdhe3072", KEYX_ALG_DH},
};

static int append(char *buf, size_t len, size_t *used, const char *sep, const char *name)
{
    int n;

    if (name == NULL)
        return 1;
    n = snprintf(buf + *used, len - *used, "%s%s", *used == 0 ? "" : sep, name);
    if (n < 0 || (size_t)n >= len - *used)
        return 0;
    *used += (size_t)n;
    return 1;
}

int keyx_tls_groups_line(struct keyx_router *router, char *buf, size_t len)
{
    int v35 = OpenSSL_version_num() >= 0x30500000L;
    size_t used = 0;

    if (len == 0)
        return 0;
    buf[0] = '\0';
    for (int hardware = 1; hardware >= 0; hardware--) {
        for (size_t i = 0; i < sizeof(groups_order) / sizeof(groups_order[0]); i++) {
            const groups_entry *e = &groups_order[i];
            keyx_keyspec spec = {.alg = e->alg, .group = e->name};
            int kind = keyx_router_first_for(router, &spec);
            char tuple[64];
            size_t n = 0;

            if (kind < 0 || (kind != KEYX_BACKEND_SOFTWARE) != hardware)
                continue;
            if (!append(tuple, sizeof(tuple), &n, ":", v35 ? e->hybrid : NULL) ||
                !append(tuple, sizeof(tuple), &n, ":", e->name) ||
                !append(tuple, sizeof(tuple), &n, ":", e->name2) ||
                !append(buf, len, &used, v35 ? " / " : ":", tuple))
                return 0;
        }
    }
    return used > 0;
}
