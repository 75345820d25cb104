/* Provider entry point: context, parameters, algorithm tables, teardown. */
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/params.h>
#include <openssl/provider.h>

#include "backend/router.h"
#include "encode/core_bio.h"
#include "keymgmt/algtab.h"
#include "keymgmt/domain_cache.h"
#include "provider/audit.h"
#include "provider/dispatch.h"
#include "provider/errors.h"
#include "provider/fail_closed.h"
#include "provider/provctx.h"
#include "provider/state.h"

#define KEYX_PROPS "provider=keyx"

/* Names and aliases exactly as the default provider's, so keyx can stand in for it. */
#define NAME_EC "EC:id-ecPublicKey:1.2.840.10045.2.1"
#define NAME_X25519 "X25519:1.3.101.110"
#define NAME_X448 "X448:1.3.101.111"
#define NAME_DH "DH:dhKeyAgreement:1.2.840.113549.1.3.1"
#define NAME_DHX "DHX:X9.42 DH:dhpublicnumber:1.2.840.10046.2.1"
#define NAME_RSA "RSA:rsaEncryption:1.2.840.113549.1.1.1"

static const OSSL_ALGORITHM keyx_keymgmt[] = {
    {NAME_EC, KEYX_PROPS, keyx_ec_keymgmt_functions, "keyx EC key management"},
    {NAME_X25519, KEYX_PROPS, keyx_x25519_keymgmt_functions, "keyx X25519 key management"},
    {NAME_X448, KEYX_PROPS, keyx_x448_keymgmt_functions, "keyx X448 key management"},
    {NAME_DH, KEYX_PROPS, keyx_dh_keymgmt_functions, "keyx DH key management"},
    {NAME_DHX, KEYX_PROPS, keyx_dhx_keymgmt_functions, "keyx X9.42 DH key management"},
    {NAME_RSA, KEYX_PROPS, keyx_rsa_keymgmt_functions, "keyx RSA key management"},
    {NULL, NULL, NULL, NULL},
};

/* Private keys out as key reference files (hardware) or PKCS#8 (software), public keys as
 * SubjectPublicKeyInfo, and text: the encoders of keyx's own keys, which OpenSSL would otherwise
 * have to export (refused for a hardware key's private part). */
#define ENCODERS(NAME, lower)                                                                      \
    {NAME, KEYX_PROPS ",output=der,structure=PrivateKeyInfo",                                      \
     keyx_##lower##_to_keyref_der_encoder, "keyx key reference (DER) or PKCS#8"},                  \
        {NAME, KEYX_PROPS ",output=pem,structure=PrivateKeyInfo",                                  \
         keyx_##lower##_to_keyref_pem_encoder, "keyx key reference (PEM KEYX KEY) or PKCS#8"},     \
        {NAME, KEYX_PROPS ",output=der,structure=SubjectPublicKeyInfo",                            \
         keyx_##lower##_to_spki_der_encoder, "keyx public key (DER)"},                             \
        {NAME, KEYX_PROPS ",output=pem,structure=SubjectPublicKeyInfo",                            \
         keyx_##lower##_to_spki_pem_encoder, "keyx public key (PEM)"},                             \
    {                                                                                              \
        NAME, KEYX_PROPS ",output=text", keyx_##lower##_to_text_encoder, "keyx key as text"        \
    }

static const OSSL_ALGORITHM keyx_encoder[] = {
    ENCODERS(NAME_EC, ec),    ENCODERS(NAME_X25519, x25519), ENCODERS(NAME_X448, x448),
    ENCODERS(NAME_DH, dh),    ENCODERS(NAME_DHX, dhx),       ENCODERS(NAME_RSA, rsa),
    {NULL, NULL, NULL, NULL},
};

/* Key reference files back into the hardware keys they name: PEM "KEYX KEY" to DER
 * (structure "keyx"), then DER to the key. */
#define DECODERS(NAME, lower)                                                                      \
    {                                                                                              \
        NAME, KEYX_PROPS ",input=der,structure=keyx", keyx_keyref_der_to_##lower##_decoder,        \
            "keyx key reference file"                                                              \
    }

static const OSSL_ALGORITHM keyx_decoder[] = {
    {"DER", KEYX_PROPS ",input=pem", keyx_pem_to_der_decoder,
     "PEM to DER for keyx's PEM names (KEYX KEY, TSS2 PRIVATE KEY)"},
    {"DER", KEYX_PROPS ",input=der", keyx_der_to_der_decoder,
     "keyx's key files as DER (KEYX KEY, TSS2 PRIVATE KEY), handed on with their load's errors"},
    DECODERS(NAME_EC, ec),
    DECODERS(NAME_X25519, x25519),
    DECODERS(NAME_X448, x448),
    DECODERS(NAME_DH, dh),
    DECODERS(NAME_DHX, dhx),
    DECODERS(NAME_RSA, rsa),
#ifdef KEYX_HAVE_TPM
    /* TSS2 PRIVATE KEY files (tpm2-openssl, openssl_tpm2_engine), tpm backend: DER from the
     * PEM-to-DER decoder above (structure "TSS2") or from a DER file. */
    {NAME_EC, KEYX_PROPS ",input=der,structure=TSS2", keyx_tss2_der_to_ec_decoder,
     "TSS2 PRIVATE KEY, TPM key by reference"},
    {NAME_RSA, KEYX_PROPS ",input=der,structure=TSS2", keyx_tss2_der_to_rsa_decoder,
     "TSS2 PRIVATE KEY, TPM key by reference"},
#endif
    {NULL, NULL, NULL, NULL},
};

static const OSSL_ALGORITHM keyx_keyexch[] = {
    {"ECDH", KEYX_PROPS, keyx_ecdh_exchange_functions, "keyx ECDH"},
    {"X25519", KEYX_PROPS, keyx_x25519_exchange_functions, "keyx X25519"},
    {"X448", KEYX_PROPS, keyx_x448_exchange_functions, "keyx X448"},
    {NAME_DH, KEYX_PROPS, keyx_dh_exchange_functions, "keyx DH"},
    {NULL, NULL, NULL, NULL},
};

/* RSA key wrapping (wrap/): serves every RSA encryption of an application preferring keyx. */
static const OSSL_ALGORITHM keyx_asym_cipher[] = {
    {NAME_RSA, KEYX_PROPS, keyx_rsa_asym_cipher_functions,
     "keyx RSA (OAEP decryption in the key's backend)"},
    {NULL, NULL, NULL, NULL},
};

/* Signatures with keyx keys: certificate keys in the TPM or on a token (signature/). */
static const OSSL_ALGORITHM keyx_signature[] = {
    {"ECDSA", KEYX_PROPS, keyx_ecdsa_signature_functions,
     "keyx ECDSA (signed in the key's backend)"},
    {NAME_RSA, KEYX_PROPS, keyx_rsa_signature_functions,
     "keyx RSA PKCS#1 v1.5 and PSS signatures (signed in the key's backend)"},
    {NULL, NULL, NULL, NULL},
};

static const OSSL_ALGORITHM keyx_kem[] = {
    {"RSA", KEYX_PROPS, keyx_rsa_kem_functions, "keyx RSA KEM (RSASVE)"},
#if OPENSSL_VERSION_NUMBER >= 0x30200000L
    /* Named as the key management, as OpenSSL finds a key's KEM (no algorithm is named DHKEM). */
    {NAME_EC, KEYX_PROPS, keyx_ec_dhkem_functions, "keyx DHKEM (RFC 9180), P-256/384/521"},
    {NAME_X25519, KEYX_PROPS, keyx_x25519_dhkem_functions, "keyx DHKEM (RFC 9180), X25519"},
    {NAME_X448, KEYX_PROPS, keyx_x448_dhkem_functions, "keyx DHKEM (RFC 9180), X448"},
#endif
    {NULL, NULL, NULL, NULL},
};

/* Key URIs: "keyx:" for every backend, "pkcs11:" (RFC 7512) when the pkcs11 backend is built. */
static const OSSL_ALGORITHM keyx_store[] = {
    {"keyx", KEYX_PROPS, keyx_store_functions, "keyx key URIs (keyx:tpm:..., keyx:pkcs11:...)"},
#ifdef KEYX_HAVE_PKCS11
    {"pkcs11", KEYX_PROPS, keyx_store_functions, "keyx PKCS#11 URIs (RFC 7512)"},
#endif
    {NULL, NULL, NULL, NULL},
};

static const OSSL_ALGORITHM *keyx_query(void *provctx, int operation_id, int *no_cache)
{
    (void)provctx;
    *no_cache = 0;
    switch (operation_id) {
    case OSSL_OP_KEYMGMT:
        return keyx_keymgmt;
    case OSSL_OP_KEYEXCH:
        return keyx_keyexch;
    case OSSL_OP_ASYM_CIPHER:
        return keyx_asym_cipher;
    case OSSL_OP_KEM:
        return keyx_kem;
    case OSSL_OP_SIGNATURE:
        return keyx_signature;
    case OSSL_OP_STORE:
        return keyx_store;
    case OSSL_OP_ENCODER:
        return keyx_encoder;
    case OSSL_OP_DECODER:
        return keyx_decoder;
    default:
        return NULL;
    }
}

static const OSSL_PARAM keyx_param_types[] = {
    OSSL_PARAM_DEFN(OSSL_PROV_PARAM_NAME, OSSL_PARAM_UTF8_PTR, NULL, 0),
    OSSL_PARAM_DEFN(OSSL_PROV_PARAM_VERSION, OSSL_PARAM_UTF8_PTR, NULL, 0),
    OSSL_PARAM_DEFN(OSSL_PROV_PARAM_BUILDINFO, OSSL_PARAM_UTF8_PTR, NULL, 0),
    OSSL_PARAM_DEFN(OSSL_PROV_PARAM_STATUS, OSSL_PARAM_INTEGER, NULL, 0),
    KEYX_STATE_PARAM_TYPES,
    OSSL_PARAM_END,
};

static const OSSL_PARAM *keyx_gettable_params(void *provctx)
{
    (void)provctx;
    return keyx_param_types;
}

static int keyx_get_params(void *provctx, OSSL_PARAM params[])
{
    OSSL_PARAM *p;

    p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_NAME);
    if (p != NULL && !OSSL_PARAM_set_utf8_ptr(p, "keyx: hardware-backed key exchange"))
        return 0;
    p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_VERSION);
    if (p != NULL && !OSSL_PARAM_set_utf8_ptr(p, KEYX_VERSION))
        return 0;
    p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_BUILDINFO);
    if (p != NULL &&
        !OSSL_PARAM_set_utf8_ptr(p, "keyx " KEYX_VERSION ", built for " OPENSSL_VERSION_TEXT))
        return 0;
    /* 0 while keyx refuses to serve (fail_closed.h): `openssl list -providers -verbose` shows
     * "inactive" then. */
    p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_STATUS);
    if (p != NULL && !OSSL_PARAM_set_int(p, ((keyx_provctx *)provctx)->refusal[0] == '\0'))
        return 0;
    return keyx_state_get_params(provctx, params);
}

static const OSSL_ITEM *keyx_get_reason_strings(void *provctx)
{
    (void)provctx;
    return keyx_reason_strings();
}

static void keyx_provctx_free(keyx_provctx *p)
{
    if (p == NULL)
        return;
    keyx_router_free(p->router);
    keyx_domain_cache_free(p->domains);
    keyx_algtab_free(p->algs);
    keyx_audit_close(p->audit);
    keyx_config_free(&p->cfg);
    OSSL_PROVIDER_unload(p->dflt);
    OSSL_LIB_CTX_free(p->libctx);
    OPENSSL_free(p);
}

static void keyx_teardown(void *provctx)
{
    keyx_provctx_free(provctx);
}

static const OSSL_DISPATCH keyx_dispatch[] = {
    {OSSL_FUNC_PROVIDER_TEARDOWN, (void (*)(void))keyx_teardown},
    {OSSL_FUNC_PROVIDER_GETTABLE_PARAMS, (void (*)(void))keyx_gettable_params},
    {OSSL_FUNC_PROVIDER_GET_PARAMS, (void (*)(void))keyx_get_params},
    {OSSL_FUNC_PROVIDER_QUERY_OPERATION, (void (*)(void))keyx_query},
    {OSSL_FUNC_PROVIDER_GET_REASON_STRINGS, (void (*)(void))keyx_get_reason_strings},
    {OSSL_FUNC_PROVIDER_GET_CAPABILITIES, (void (*)(void))keyx_get_capabilities},
    {0, NULL},
};

__attribute__((visibility("default"))) int OSSL_provider_init(const OSSL_CORE_HANDLE *handle,
                                                              const OSSL_DISPATCH *in,
                                                              const OSSL_DISPATCH **out,
                                                              void **provctx);

int OSSL_provider_init(const OSSL_CORE_HANDLE *handle, const OSSL_DISPATCH *in,
                       const OSSL_DISPATCH **out, void **provctx)
{
    OSSL_FUNC_core_get_params_fn *core_get_params = NULL;
    keyx_provctx *p = OPENSSL_zalloc(sizeof(*p));

    if (p == NULL)
        return 0;
    p->handle = handle;
    keyx_errors_init(p, in);
    keyx_core_bio_init(p, in);
    for (const OSSL_DISPATCH *d = in; d->function_id != 0; d++)
        if (d->function_id == OSSL_FUNC_CORE_GET_PARAMS)
            core_get_params = OSSL_FUNC_core_get_params(d);
    if (core_get_params == NULL)
        goto err;

    /* keyx's own context: software crypto never goes back through the application's. */
    p->libctx = OSSL_LIB_CTX_new();
    if (p->libctx == NULL || (p->dflt = OSSL_PROVIDER_load(p->libctx, "default")) == NULL) {
        KEYX_ERR(p, KEYX_R_INTERNAL, "cannot load the default provider into keyx's context");
        goto err;
    }
    if (!keyx_algtab_new(p) || (p->domains = keyx_domain_cache_new()) == NULL)
        goto err;
    /* From here on a failure is the configuration's or a device's: keyx loads and refuses every
     * operation, never leaving the application to the default provider in its place. */
    ERR_set_mark();
    if (!(p->config_read = keyx_config_load(&p->cfg, p, core_get_params)) ||
        (p->cfg.audit_log != NULL && (p->audit = keyx_audit_open(p, p->cfg.audit_log)) == NULL) ||
        !keyx_router_new(p, &p->router)) {
        keyx_router_free(p->router);
        p->router = NULL;
        keyx_audit_close(p->audit);
        p->audit = NULL;
        keyx_fail_closed_enter(p);
    } else {
        ERR_clear_last_mark();
    }

    p->initialized = 1;
    *out = keyx_dispatch;
    *provctx = p;
    return 1;
err:
    keyx_provctx_free(p);
    return 0;
}
