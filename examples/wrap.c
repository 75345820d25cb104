/* keyx example: RSA key wrapping.
 *
 * The sender makes a random AES-256 key, wraps it (RSA-OAEP with SHA-256) to the receiver's
 * public key and encrypts a message under it with AES-256-GCM. The receiver unwraps the AES key
 * with its private key -- given by URI, so that with keyx preferred in openssl.cnf it is
 * unwrapped inside the backend holding it (a PKCS#11 token, a TPM, or keyx's software backend)
 * -- and decrypts the message. Plain libcrypto calls: nothing here knows about keyx.
 *
 * usage: keyx-wrap-example PUBLIC-KEY PRIVATE-KEY-URI [MESSAGE]
 *   PUBLIC-KEY        the receiver's public key (PEM or DER file, or a URI)
 *   PRIVATE-KEY-URI   the receiver's private key: a file, pkcs11:..., keyx:tpm:...
 */
#include <stdio.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>
#include <openssl/store.h>

#define KEYLEN 32 /* AES-256 */
#define IVLEN 12
#define TAGLEN 16

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

static int oaep_sha256(EVP_PKEY_CTX *ctx)
{
    return EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_OAEP_PADDING) == 1 &&
           EVP_PKEY_CTX_set_rsa_oaep_md_name(ctx, "SHA256", NULL) == 1 &&
           EVP_PKEY_CTX_set_rsa_mgf1_md_name(ctx, "SHA256", NULL) == 1;
}

/* Sender: RSA-OAEP encryption of the AES key under the public key. */
static int wrap(EVP_PKEY *pub, const unsigned char *key, unsigned char *out, size_t *outlen)
{
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_pkey(NULL, pub, NULL);
    int ok = ctx != NULL && EVP_PKEY_encrypt_init(ctx) == 1 && oaep_sha256(ctx) &&
             EVP_PKEY_encrypt(ctx, out, outlen, key, KEYLEN) == 1;

    EVP_PKEY_CTX_free(ctx);
    return ok;
}

/* Receiver: the private key's provider (keyx, with it preferred) decrypts. */
static int unwrap(EVP_PKEY *priv, const unsigned char *in, size_t inlen, unsigned char *key)
{
    unsigned char buf[1024];
    size_t len = sizeof(buf);
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_pkey(NULL, priv, NULL);
    int ok = ctx != NULL && EVP_PKEY_decrypt_init(ctx) == 1 && oaep_sha256(ctx) &&
             EVP_PKEY_decrypt(ctx, buf, &len, in, inlen) == 1 && len == KEYLEN;

    if (ok)
        memcpy(key, buf, KEYLEN);
    OPENSSL_cleanse(buf, sizeof(buf));
    EVP_PKEY_CTX_free(ctx);
    return ok;
}

/* AES-256-GCM; enc = 1 encrypts (writes the tag), 0 decrypts (checks it). */
static int gcm(int enc, const unsigned char *key, const unsigned char *iv, const unsigned char *in,
               int inlen, unsigned char *out, unsigned char *tag)
{
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    int len = 0, fin = 0;
    int ok = c != NULL && EVP_CipherInit_ex2(c, EVP_aes_256_gcm(), key, iv, enc, NULL) == 1 &&
             EVP_CipherUpdate(c, out, &len, in, inlen) == 1 &&
             (enc || EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_TAG, TAGLEN, tag) == 1) &&
             EVP_CipherFinal_ex(c, out + len, &fin) == 1 &&
             (!enc || EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, TAGLEN, tag) == 1);

    EVP_CIPHER_CTX_free(c);
    return ok;
}

int main(int argc, char **argv)
{
    const char *msg = argc > 3 ? argv[3] : "hello from keyx";
    int msglen = (int)strlen(msg);
    unsigned char key[KEYLEN], key2[KEYLEN], iv[IVLEN], tag[TAGLEN], wrapped[1024];
    unsigned char ct[4096], pt[4096];
    size_t wlen = sizeof(wrapped);
    EVP_PKEY *pub = NULL, *priv = NULL;
    int rc = 1;

    if (argc < 3 || argc > 4 || msglen > (int)sizeof(ct)) {
        fprintf(stderr, "usage: %s PUBLIC-KEY PRIVATE-KEY-URI [MESSAGE]\n", argv[0]);
        return 2;
    }
    if ((pub = load_key(argv[1], OSSL_STORE_INFO_PUBKEY)) == NULL ||
        (priv = load_key(argv[2], OSSL_STORE_INFO_PKEY)) == NULL)
        goto end;

    /* sender */
    if (RAND_bytes(key, sizeof(key)) != 1 || RAND_bytes(iv, sizeof(iv)) != 1 ||
        !wrap(pub, key, wrapped, &wlen) ||
        !gcm(1, key, iv, (const unsigned char *)msg, msglen, ct, tag)) {
        fprintf(stderr, "sender: wrapping or encryption failed\n");
        goto end;
    }
    printf("sender: wrapped a fresh AES-256 key into %zu bytes (RSA-OAEP-SHA256), "
           "encrypted %d bytes with AES-256-GCM\n",
           wlen, msglen);

    /* receiver */
    if (!unwrap(priv, wrapped, wlen, key2)) {
        fprintf(stderr, "receiver: unwrapping failed\n");
        goto end;
    }
    if (!gcm(0, key2, iv, ct, msglen, pt, tag)) {
        fprintf(stderr, "receiver: AES-256-GCM authentication failed\n");
        goto end;
    }
    printf("receiver: unwrapped the key with %s, decrypted: %.*s\n", argv[2], msglen, pt);
    rc = 0;
end:
    if (rc != 0)
        ERR_print_errors_fp(stderr);
    OPENSSL_cleanse(key, sizeof(key));
    OPENSSL_cleanse(key2, sizeof(key2));
    OPENSSL_cleanse(pt, sizeof(pt));
    EVP_PKEY_free(pub);
    EVP_PKEY_free(priv);
    return rc;
}
