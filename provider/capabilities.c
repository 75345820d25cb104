/* TLS-GROUP capabilities. OpenSSL 3.0 keeps a group only if the keymgmt fetched for it comes from
 * the provider that advertised it, so once keyx is preferred it must list its own groups, and
 * only those a configured backend can serve. Constants as the default provider's. */
#include <string.h>
#include <strings.h>

#include <openssl/core_names.h>
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

        /* A group no configured backend can serve is not offered: TLS then never picks it. */
        if (!keyx_router_offers(p->router, &spec))
            continue;
        if (!tls_group_report(&tls_groups[i], cb, arg))
            return 0;
    }
    return 1;
}
