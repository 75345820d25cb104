/* keyx example: HPKE (RFC 9180), the key wrapping of MLS, ECH and OHTTP, with plain OSSL_HPKE_*
 * calls (OpenSSL >= 3.2). Nothing here knows about keyx: with keyx preferred in openssl.cnf, the
 * recipient's Diffie-Hellman step runs in the backend that holds its private key (a TPM, a
 * PKCS#11 token or keyx's software backend), and so does the sender's in the authenticated mode.
 *
 * usage: keyx-hpke-example seal RECIPIENT-PUBLIC-KEY [SENDER-PRIVATE-KEY] < message > sealed
 *        keyx-hpke-example open RECIPIENT-PRIVATE-KEY [SENDER-PUBLIC-KEY] < sealed > message
 *   keys are files (PEM or DER, key reference files) or URIs (pkcs11:..., keyx:tpm:...);
 *   a sender key selects the authenticated mode (mode_auth), on both sides.
 * The suite: the DHKEM of the recipient key's type (P-256, P-384, P-521, X25519, X448),
 * HKDF-SHA256, AES-256-GCM; info "keyx-hpke-example"; sealed = enc || ciphertext.
 */
#include <stdio.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hpke.h>
#include <openssl/store.h>

#define MAX_MESSAGE (1 << 20)
#define INFO "keyx-hpke-example"

/* The first key of `type` (OSSL_STORE_INFO_PUBKEY or _PKEY) that uri names. */
static EVP_PKEY *load_key(const char *uri, int type)
{
    OSSL_STORE_CTX *st = OSSL_STORE_open(uri, NULL, NULL, NULL, NULL);
    EVP_PKEY *key = NULL;

    while (st != NULL && key == NULL && !OSSL_STORE_eof(st)) {
        OSSL_STORE_INFO *info = OSSL_STORE_load(st);
        int t = info != NULL ? OSSL_STORE_INFO_get_type(info) : 0;

        if (t == OSSL_STORE_INFO_PKEY)
            key = OSSL_STORE_INFO_get1_PKEY(info);
        else if (t == OSSL_STORE_INFO_PUBKEY && type == OSSL_STORE_INFO_PUBKEY)
            key = OSSL_STORE_INFO_get1_PUBKEY(info);
        OSSL_STORE_INFO_free(info);
        if (info == NULL)
            break;
    }
    OSSL_STORE_close(st);
    if (key == NULL)
        fprintf(stderr, "cannot load a key from %s\n", uri);
    return key;
}

/* The HPKE suite for the recipient's key: its DHKEM, HKDF-SHA256, AES-256-GCM. */
static int suite_for(EVP_PKEY *key, OSSL_HPKE_SUITE *suite)
{
    static const struct {
        const char *name;
        uint16_t kem;
    } kems[] = {
        {"P-256", OSSL_HPKE_KEM_ID_P256},    {"prime256v1", OSSL_HPKE_KEM_ID_P256},
        {"P-384", OSSL_HPKE_KEM_ID_P384},    {"secp384r1", OSSL_HPKE_KEM_ID_P384},
        {"P-521", OSSL_HPKE_KEM_ID_P521},    {"secp521r1", OSSL_HPKE_KEM_ID_P521},
        {"X25519", OSSL_HPKE_KEM_ID_X25519}, {"X448", OSSL_HPKE_KEM_ID_X448},
    };
    char group[32] = "";

    if (EVP_PKEY_is_a(key, "X25519") || EVP_PKEY_is_a(key, "X448"))
        snprintf(group, sizeof(group), "%s", EVP_PKEY_get0_type_name(key));
    else if (!EVP_PKEY_is_a(key, "EC") ||
             EVP_PKEY_get_utf8_string_param(key, OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof(group),
                                            NULL) != 1)
        group[0] = '\0';
    for (size_t i = 0; i < sizeof(kems) / sizeof(kems[0]); i++)
        if (strcmp(group, kems[i].name) == 0) {
            suite->kem_id = kems[i].kem;
            suite->kdf_id = OSSL_HPKE_KDF_ID_HKDF_SHA256;
            suite->aead_id = OSSL_HPKE_AEAD_ID_AES_GCM_256;
            return 1;
        }
    fprintf(stderr, "HPKE has no KEM for this key (P-256, P-384, P-521, X25519, X448)\n");
    return 0;
}

static int public_bytes(EVP_PKEY *key, unsigned char *out, size_t *len)
{
    return EVP_PKEY_get_octet_string_param(key, OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, out, *len,
                                           len) == 1;
}

static int seal(const char *recipient, const char *sender, const unsigned char *msg, size_t len)
{
    OSSL_HPKE_SUITE suite = OSSL_HPKE_SUITE_DEFAULT;
    EVP_PKEY *pub = load_key(recipient, OSSL_STORE_INFO_PUBKEY);
    EVP_PKEY *spriv = sender != NULL ? load_key(sender, OSSL_STORE_INFO_PKEY) : NULL;
    unsigned char pkr[133], enc[133], *ct = NULL;
    size_t pkrlen = sizeof(pkr), enclen = sizeof(enc), ctlen = len + 16;
    OSSL_HPKE_CTX *ctx = NULL;
    int ok = pub != NULL && (sender == NULL || spriv != NULL) && suite_for(pub, &suite) &&
             public_bytes(pub, pkr, &pkrlen) && (ct = OPENSSL_malloc(ctlen)) != NULL &&
             (ctx = OSSL_HPKE_CTX_new(sender != NULL ? OSSL_HPKE_MODE_AUTH : OSSL_HPKE_MODE_BASE,
                                      suite, OSSL_HPKE_ROLE_SENDER, NULL, NULL)) != NULL &&
             (spriv == NULL || OSSL_HPKE_CTX_set1_authpriv(ctx, spriv) == 1) &&
             OSSL_HPKE_encap(ctx, enc, &enclen, pkr, pkrlen, (const unsigned char *)INFO,
                             strlen(INFO)) == 1 &&
             OSSL_HPKE_seal(ctx, ct, &ctlen, NULL, 0, msg, len) == 1 &&
             fwrite(enc, 1, enclen, stdout) == enclen && fwrite(ct, 1, ctlen, stdout) == ctlen;

    OSSL_HPKE_CTX_free(ctx);
    OPENSSL_free(ct);
    EVP_PKEY_free(pub);
    EVP_PKEY_free(spriv);
    return ok;
}

static int open_sealed(const char *recipient, const char *sender, const unsigned char *in,
                       size_t len)
{
    OSSL_HPKE_SUITE suite = OSSL_HPKE_SUITE_DEFAULT;
    EVP_PKEY *priv = load_key(recipient, OSSL_STORE_INFO_PKEY);
    EVP_PKEY *spub = sender != NULL ? load_key(sender, OSSL_STORE_INFO_PUBKEY) : NULL;
    unsigned char pks[133], *pt = NULL;
    size_t pkslen = sizeof(pks), enclen = 0, ptlen = len;
    OSSL_HPKE_CTX *ctx = NULL;
    int ok =
        priv != NULL && (sender == NULL || spub != NULL) && suite_for(priv, &suite) &&
        (enclen = OSSL_HPKE_get_public_encap_size(suite)) != 0 && len >= enclen &&
        (spub == NULL || public_bytes(spub, pks, &pkslen)) &&
        (pt = OPENSSL_malloc(len + 1)) != NULL &&
        (ctx = OSSL_HPKE_CTX_new(sender != NULL ? OSSL_HPKE_MODE_AUTH : OSSL_HPKE_MODE_BASE, suite,
                                 OSSL_HPKE_ROLE_RECEIVER, NULL, NULL)) != NULL &&
        (spub == NULL || OSSL_HPKE_CTX_set1_authpub(ctx, pks, pkslen) == 1) &&
        OSSL_HPKE_decap(ctx, in, enclen, priv, (const unsigned char *)INFO, strlen(INFO)) == 1 &&
        OSSL_HPKE_open(ctx, pt, &ptlen, NULL, 0, in + enclen, len - enclen) == 1 &&
        fwrite(pt, 1, ptlen, stdout) == ptlen;

    if (!ok && priv != NULL && len < enclen)
        fprintf(stderr, "the sealed input is shorter than the KEM's enc (%zu bytes)\n", enclen);
    OSSL_HPKE_CTX_free(ctx);
    OPENSSL_clear_free(pt, len + 1);
    EVP_PKEY_free(priv);
    EVP_PKEY_free(spub);
    return ok;
}

int main(int argc, char **argv)
{
    static unsigned char in[MAX_MESSAGE + 1];
    size_t len;
    int ok;

    if (argc < 3 || argc > 4 || (strcmp(argv[1], "seal") != 0 && strcmp(argv[1], "open") != 0)) {
        fprintf(stderr,
                "usage: %s seal RECIPIENT-PUBLIC-KEY [SENDER-PRIVATE-KEY] < in > sealed\n"
                "       %s open RECIPIENT-PRIVATE-KEY [SENDER-PUBLIC-KEY] < sealed > out\n",
                argv[0], argv[0]);
        return 2;
    }
    len = fread(in, 1, sizeof(in), stdin);
    if (len > MAX_MESSAGE) {
        fprintf(stderr, "the input is larger than %d bytes\n", MAX_MESSAGE);
        return 1;
    }
    ok = strcmp(argv[1], "seal") == 0 ? seal(argv[2], argc > 3 ? argv[3] : NULL, in, len)
                                      : open_sealed(argv[2], argc > 3 ? argv[3] : NULL, in, len);
    if (!ok) {
        fprintf(stderr, "%s failed\n", argv[1]);
        ERR_print_errors_fp(stderr);
        return 1;
    }
    return fflush(stdout) == 0 ? 0 : 1;
}
