/* keyx-test-wrap: the RSA key-wrapping driver of the test suite.
 *
 * Loads keyx and the default provider into a fresh library context (or only the default
 * provider with --provider default, the independent cross-check) and decrypts, encapsulates and
 * decapsulates as an application does.
 *
 * usage: keyx-test-wrap [options] mode ...
 *   --module DIR       directory of keyx.so (default: $OPENSSL_MODULES)
 *   --config FILE      load FILE into the library context instead of loading providers by hand
 *   --provider NAME    keyx (default) or default: who holds the private key and decrypts
 *   --backend NAME     import private keys into keyx's backend NAME (software, tpm,
 *                      pkcs11) through the "keyx-backend" parameter
 *
 * modes:
 *   oaep               vectors on stdin, one a line: "id pkcs8 md mgf1md label ct" (hex; "-" is
 *                      empty); the private key (PKCS#8 DER) is decoded by the default provider
 *                      and imported with EVP_PKEY_fromdata; consecutive vectors with the same key
 *                      share one import. Prints "id ok <msg hex>" or "id err <stage>: <errors>".
 *   kem KEY            RSASVE round trip: encapsulate with the public key exported to the
 *                      default provider, decapsulate through --provider; prints
 *                      "kem ok <bytes>" when both secrets are equal, "kem mismatch" or "kem err
 * ...". reuse KEY MD       two different messages OAEP-encrypted (MD, MGF1 MD, no label) by the
 *                      default provider, decrypted one after the other on ONE EVP_PKEY_CTX:
 *                      "reuse ok" when each call returns its own plaintext.
 *   export KEY         tries to export the private key: "export refused" or "export allowed".
 *   KEY is gen:BITS (a key generated through --provider, by keyx in the first configured backend
 *   that serves RSA: set `backends`, e.g. KEYX_BACKENDS=pkcs11) or a key URI (OSSL_STORE,
 *   e.g. pkcs11:token=keyx-a;object=srv-rsa;type=private).
 */
#define _POSIX_C_SOURCE 200809L

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/provider.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>
#include <openssl/store.h>
#include <openssl/x509.h>

#include "hexio.h"

#define DEFAULT_PQ "provider=default"

static OSSL_LIB_CTX *libctx;
static const char *prov_name = "keyx";
static char propq[64];
static const char *backend; /* --backend */

/* ---- keys ------------------------------------------------------------------------------ */

/* PKCS#8 DER decoded by the default provider; for keyx, re-imported with EVP_PKEY_fromdata on
 * keyx's RSA keymgmt (plus "keyx-backend" with --backend). */
static EVP_PKEY *import_private(const unsigned char *der, size_t len)
{
    const unsigned char *p = der;
    EVP_PKEY *dflt = d2i_PrivateKey_ex(EVP_PKEY_RSA, NULL, &p, (long)len, libctx, DEFAULT_PQ);
    OSSL_PARAM *data = NULL, *all = NULL, extra[2];
    EVP_PKEY_CTX *ctx = NULL;
    EVP_PKEY *pk = NULL;

    if (dflt == NULL || strcmp(prov_name, "default") == 0)
        return dflt;
    extra[0] = OSSL_PARAM_construct_utf8_string("keyx-backend", (char *)backend, 0);
    extra[1] = OSSL_PARAM_construct_end();
    if (EVP_PKEY_todata(dflt, EVP_PKEY_KEYPAIR, &data) == 1 &&
        (all = backend != NULL ? OSSL_PARAM_merge(data, extra) : data) != NULL &&
        (ctx = EVP_PKEY_CTX_new_from_name(libctx, "RSA", propq)) != NULL &&
        EVP_PKEY_fromdata_init(ctx) == 1)
        EVP_PKEY_fromdata(ctx, &pk, EVP_PKEY_KEYPAIR, all);
    if (all != data)
        OSSL_PARAM_free(all);
    OSSL_PARAM_free(data);
    EVP_PKEY_CTX_free(ctx);
    EVP_PKEY_free(dflt);
    return pk;
}

static EVP_PKEY *generate(int bits)
{
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_name(libctx, "RSA", propq);
    OSSL_PARAM params[2], *q = params;
    size_t b = (size_t)bits;
    EVP_PKEY *pk = NULL;

    *q++ = OSSL_PARAM_construct_size_t(OSSL_PKEY_PARAM_RSA_BITS, &b);
    *q = OSSL_PARAM_construct_end();
    if (ctx == NULL || EVP_PKEY_keygen_init(ctx) != 1 ||
        EVP_PKEY_CTX_set_params(ctx, params) != 1 || EVP_PKEY_generate(ctx, &pk) != 1)
        pk = NULL;
    EVP_PKEY_CTX_free(ctx);
    return pk;
}

static EVP_PKEY *load_uri(const char *uri)
{
    OSSL_STORE_CTX *st = OSSL_STORE_open_ex(uri, libctx, propq, NULL, NULL, NULL, NULL, NULL);
    EVP_PKEY *pk = NULL;

    if (st == NULL)
        return NULL;
    while (pk == NULL && !OSSL_STORE_eof(st)) {
        OSSL_STORE_INFO *info = OSSL_STORE_load(st);

        if (info != NULL && OSSL_STORE_INFO_get_type(info) == OSSL_STORE_INFO_PKEY)
            pk = OSSL_STORE_INFO_get1_PKEY(info);
        OSSL_STORE_INFO_free(info);
        if (info == NULL)
            break;
    }
    OSSL_STORE_close(st);
    return pk;
}

static EVP_PKEY *key_from_arg(const char *arg)
{
    if (strncmp(arg, "gen:", 4) == 0)
        return generate(atoi(arg + 4));
    return load_uri(arg);
}

/* The public key as the default provider sees it (SubjectPublicKeyInfo round trip). */
static EVP_PKEY *public_in_default(EVP_PKEY *key)
{
    unsigned char *der = NULL;
    const unsigned char *p;
    int len = i2d_PUBKEY(key, &der);
    EVP_PKEY *pub = NULL;

    if (len > 0) {
        p = der;
        pub = d2i_PUBKEY_ex(NULL, &p, len, libctx, DEFAULT_PQ);
    }
    OPENSSL_free(der);
    return pub;
}

/* ---- oaep ------------------------------------------------------------------------------ */

static int oaep_setup(EVP_PKEY_CTX *ctx, const char *md, const char *mgf1,
                      const unsigned char *label, size_t labellen)
{
    unsigned char *l = NULL;

    if (EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_OAEP_PADDING) != 1 ||
        EVP_PKEY_CTX_set_rsa_oaep_md_name(ctx, md, NULL) != 1 ||
        EVP_PKEY_CTX_set_rsa_mgf1_md_name(ctx, mgf1, NULL) != 1)
        return 0;
    if (labellen == 0)
        return 1;
    if ((l = OPENSSL_memdup(label, labellen)) == NULL)
        return 0;
    if (EVP_PKEY_CTX_set0_rsa_oaep_label(ctx, l, (int)labellen) != 1) {
        OPENSSL_free(l);
        return 0;
    }
    return 1;
}

static void run_oaep(char *line, char **cached_hex, EVP_PKEY **cached)
{
    char *save = NULL, *id = strtok_r(line, " \t\n", &save);
    char *keyhex = strtok_r(NULL, " \t\n", &save), *md = strtok_r(NULL, " \t\n", &save);
    char *mgf1 = strtok_r(NULL, " \t\n", &save), *labelhex = strtok_r(NULL, " \t\n", &save);
    char *cthex = strtok_r(NULL, " \t\n", &save);
    unsigned char *label = NULL, *ct = NULL, *der = NULL, *msg = NULL;
    size_t labellen = 0, ctlen = 0, derlen = 0, msglen = 0;
    const char *stage = "input";
    EVP_PKEY_CTX *ctx = NULL;
    int ok = 0;

    if (id == NULL)
        return;
    ERR_clear_error();
    if (cthex == NULL || (label = unhex(labelhex, &labellen)) == NULL ||
        (ct = unhex(cthex, &ctlen)) == NULL)
        goto end;
    stage = "key";
    if (*cached_hex == NULL || strcmp(*cached_hex, keyhex) != 0) {
        EVP_PKEY_free(*cached);
        OPENSSL_free(*cached_hex);
        *cached = NULL;
        if ((*cached_hex = OPENSSL_strdup(keyhex)) == NULL ||
            (der = unhex(keyhex, &derlen)) == NULL ||
            (*cached = import_private(der, derlen)) == NULL)
            goto end;
    }
    if (*cached == NULL)
        goto end;
    stage = "setup";
    if ((ctx = EVP_PKEY_CTX_new_from_pkey(libctx, *cached, propq)) == NULL ||
        EVP_PKEY_decrypt_init(ctx) != 1 || !oaep_setup(ctx, md, mgf1, label, labellen))
        goto end;
    stage = "decrypt";
    if (EVP_PKEY_decrypt(ctx, NULL, &msglen, ct, ctlen) != 1 ||
        (msg = OPENSSL_malloc(msglen + 1)) == NULL ||
        EVP_PKEY_decrypt(ctx, msg, &msglen, ct, ctlen) != 1)
        goto end;
    ok = 1;
end:
    printf("%s ", id);
    if (ok) {
        printf("ok ");
        print_hex(msg, msglen);
    } else {
        if (*cached == NULL && strcmp(stage, "key") == 0) {
            OPENSSL_free(*cached_hex);
            *cached_hex = NULL;
        }
        print_errors(stage);
    }
    printf("\n");
    fflush(stdout);
    EVP_PKEY_CTX_free(ctx);
    OPENSSL_free(label);
    OPENSSL_free(ct);
    OPENSSL_clear_free(der, derlen);
    OPENSSL_clear_free(msg, msglen);
}

static int mode_oaep(void)
{
    char *line = NULL, *cached_hex = NULL;
    size_t cap = 0;
    EVP_PKEY *cached = NULL;

    while (getline(&line, &cap, stdin) > 0)
        run_oaep(line, &cached_hex, &cached);
    free(line);
    OPENSSL_free(cached_hex);
    EVP_PKEY_free(cached);
    return 0;
}

/* ---- kem, reuse, export ---------------------------------------------------------------- */

static int mode_kem(const char *keyarg)
{
    EVP_PKEY *key = key_from_arg(keyarg), *pub = NULL;
    EVP_PKEY_CTX *ectx = NULL, *dctx = NULL;
    unsigned char *wrapped = NULL, *secret = NULL, *got = NULL;
    size_t wlen = 0, slen = 0, glen = 0;
    const char *stage = "key";
    int ok = 0;

    if (key == NULL)
        goto end;
    stage = "encapsulate";
    if ((pub = public_in_default(key)) == NULL ||
        (ectx = EVP_PKEY_CTX_new_from_pkey(libctx, pub, DEFAULT_PQ)) == NULL ||
        EVP_PKEY_encapsulate_init(ectx, NULL) != 1 ||
        EVP_PKEY_CTX_set_kem_op(ectx, "RSASVE") != 1 ||
        EVP_PKEY_encapsulate(ectx, NULL, &wlen, NULL, &slen) != 1 ||
        (wrapped = OPENSSL_malloc(wlen)) == NULL || (secret = OPENSSL_malloc(slen)) == NULL ||
        EVP_PKEY_encapsulate(ectx, wrapped, &wlen, secret, &slen) != 1)
        goto end;
    stage = "decapsulate";
    if ((dctx = EVP_PKEY_CTX_new_from_pkey(libctx, key, propq)) == NULL ||
        EVP_PKEY_decapsulate_init(dctx, NULL) != 1 ||
        EVP_PKEY_CTX_set_kem_op(dctx, "RSASVE") != 1 ||
        EVP_PKEY_decapsulate(dctx, NULL, &glen, wrapped, wlen) != 1 ||
        (got = OPENSSL_malloc(glen)) == NULL ||
        EVP_PKEY_decapsulate(dctx, got, &glen, wrapped, wlen) != 1)
        goto end;
    ok = 1;
end:
    if (ok && glen == slen && CRYPTO_memcmp(got, secret, slen) == 0)
        printf("kem ok %zu\n", slen);
    else if (ok)
        printf("kem mismatch %zu %zu\n", slen, glen);
    else {
        printf("kem ");
        print_errors(stage);
        printf("\n");
    }
    EVP_PKEY_CTX_free(ectx);
    EVP_PKEY_CTX_free(dctx);
    EVP_PKEY_free(key);
    EVP_PKEY_free(pub);
    OPENSSL_free(wrapped);
    OPENSSL_clear_free(secret, slen);
    OPENSSL_clear_free(got, glen);
    return ok ? 0 : 1;
}

static int encrypt_default(EVP_PKEY *pub, const char *md, const unsigned char *m, size_t mlen,
                           unsigned char *out, size_t *outlen)
{
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_pkey(libctx, pub, DEFAULT_PQ);
    int ok = ctx != NULL && EVP_PKEY_encrypt_init(ctx) == 1 && oaep_setup(ctx, md, md, NULL, 0) &&
             EVP_PKEY_encrypt(ctx, out, outlen, m, mlen) == 1;

    EVP_PKEY_CTX_free(ctx);
    return ok;
}

static int mode_reuse(const char *keyarg, const char *md)
{
    EVP_PKEY *key = key_from_arg(keyarg), *pub = NULL;
    EVP_PKEY_CTX *ctx = NULL;
    unsigned char m[2][32], c[2][1024], d[1024];
    size_t clen[2] = {sizeof(c[0]), sizeof(c[1])}, dlen;
    const char *stage = "key";
    int ok = 0, same = 1;

    if (key == NULL)
        goto end;
    stage = "encrypt";
    if ((pub = public_in_default(key)) == NULL || RAND_bytes(m[0], sizeof(m[0])) != 1 ||
        RAND_bytes(m[1], sizeof(m[1])) != 1 ||
        !encrypt_default(pub, md, m[0], sizeof(m[0]), c[0], &clen[0]) ||
        !encrypt_default(pub, md, m[1], sizeof(m[1]), c[1], &clen[1]))
        goto end;
    stage = "decrypt";
    if ((ctx = EVP_PKEY_CTX_new_from_pkey(libctx, key, propq)) == NULL ||
        EVP_PKEY_decrypt_init(ctx) != 1 || !oaep_setup(ctx, md, md, NULL, 0))
        goto end;
    for (int i = 0; i < 2; i++) {
        dlen = sizeof(d);
        if (EVP_PKEY_decrypt(ctx, d, &dlen, c[i], clen[i]) != 1)
            goto end;
        same = same && dlen == sizeof(m[i]) && memcmp(d, m[i], dlen) == 0;
    }
    ok = 1;
end:
    if (ok)
        printf("reuse %s\n", same ? "ok" : "stale");
    else {
        printf("reuse ");
        print_errors(stage);
        printf("\n");
    }
    OPENSSL_cleanse(d, sizeof(d));
    EVP_PKEY_CTX_free(ctx);
    EVP_PKEY_free(key);
    EVP_PKEY_free(pub);
    return ok && same ? 0 : 1;
}

static int mode_export(const char *keyarg)
{
    EVP_PKEY *key = key_from_arg(keyarg);
    OSSL_PARAM *data = NULL;
    int ok;

    if (key == NULL) {
        printf("export ");
        print_errors("key");
        printf("\n");
        return 1;
    }
    ok = EVP_PKEY_todata(key, EVP_PKEY_KEYPAIR, &data) == 1 &&
         OSSL_PARAM_locate(data, OSSL_PKEY_PARAM_RSA_D) != NULL;
    printf("export %s bits %d\n", ok ? "allowed" : "refused", EVP_PKEY_get_bits(key));
    ERR_clear_error();
    OSSL_PARAM_free(data);
    EVP_PKEY_free(key);
    return 0;
}

/* ---- main ------------------------------------------------------------------------------ */

static int usage(void)
{
    fprintf(stderr,
            "usage: keyx-test-wrap [--module DIR] [--config FILE] [--provider keyx|default] "
            "[--backend NAME] oaep | kem KEY | reuse KEY MD | export KEY\n");
    return 2;
}

int main(int argc, char **argv)
{
    const char *module = getenv("OPENSSL_MODULES"), *config = NULL;
    OSSL_PROVIDER *keyx = NULL, *dflt = NULL;
    int i, rc = 1;

    for (i = 1; i < argc && strncmp(argv[i], "--", 2) == 0; i += 2) {
        if (i + 1 >= argc)
            return usage();
        if (strcmp(argv[i], "--module") == 0)
            module = argv[i + 1];
        else if (strcmp(argv[i], "--config") == 0)
            config = argv[i + 1];
        else if (strcmp(argv[i], "--provider") == 0)
            prov_name = argv[i + 1];
        else if (strcmp(argv[i], "--backend") == 0)
            backend = argv[i + 1];
        else
            return usage();
    }
    if ((strcmp(prov_name, "keyx") != 0 && strcmp(prov_name, "default") != 0) || i >= argc)
        return usage();
    snprintf(propq, sizeof(propq), "provider=%s", prov_name);

    if ((libctx = OSSL_LIB_CTX_new()) == NULL)
        goto end;
    if (config != NULL) {
        if (!OSSL_LIB_CTX_load_config(libctx, config)) {
            fprintf(stderr, "keyx-test-wrap: cannot load config %s\n", config);
            goto end;
        }
    } else {
        if (strcmp(prov_name, "keyx") == 0) {
            if (module != NULL && !OSSL_PROVIDER_set_default_search_path(libctx, module))
                goto end;
            if ((keyx = OSSL_PROVIDER_load(libctx, "keyx")) == NULL) {
                fprintf(stderr, "keyx-test-wrap: cannot load provider keyx\n");
                goto end;
            }
        }
        if ((dflt = OSSL_PROVIDER_load(libctx, "default")) == NULL)
            goto end;
    }

    if (strcmp(argv[i], "oaep") == 0 && argc - i == 1)
        rc = mode_oaep();
    else if (strcmp(argv[i], "kem") == 0 && argc - i == 2)
        rc = mode_kem(argv[i + 1]);
    else if (strcmp(argv[i], "reuse") == 0 && argc - i == 3)
        rc = mode_reuse(argv[i + 1], argv[i + 2]);
    else if (strcmp(argv[i], "export") == 0 && argc - i == 2)
        rc = mode_export(argv[i + 1]);
    else
        rc = usage();
end:
    if (rc == 1 && ERR_peek_error() != 0)
        ERR_print_errors_fp(stderr);
    fflush(stdout);
    OSSL_PROVIDER_unload(keyx);
    OSSL_PROVIDER_unload(dflt);
    OSSL_LIB_CTX_free(libctx);
    return rc;
}
