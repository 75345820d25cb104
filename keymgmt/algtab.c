#include <openssl/evp.h>
#include <openssl/kdf.h>

#include <openssl/params.h>

#include "keymgmt/algtab.h"
#include "keymgmt/gen_target.h"
#include "provider/errors.h"
#include "provider/provctx.h"

int keyx_algtab_new(keyx_provctx *p)
{
    keyx_algtab *t = OPENSSL_zalloc(sizeof(*t));

    if (t == NULL)
        return 0;
    p->algs = t;
    for (int a = 0; a < KEYX_ALG_COUNT; a++) {
        const char *name = keyx_alg_name((keyx_alg)a);

        t->km[a] = EVP_KEYMGMT_fetch(p->libctx, name, NULL);
        if (t->km[a] == NULL) {
            KEYX_ERR(p, KEYX_R_INTERNAL, "the default provider in keyx's context lacks %s", name);
            return 0;
        }
        t->gen_settable[a] =
            OSSL_PARAM_merge(EVP_KEYMGMT_gen_settable_params(t->km[a]), keyx_gen_target_settable());
        if (t->gen_settable[a] == NULL)
            return 0;
        if (a == KEYX_ALG_X25519 || a == KEYX_ALG_X448) {
            t->fromdata[a] = EVP_PKEY_CTX_new_from_name(p->libctx, name, NULL);
            if (t->fromdata[a] == NULL || EVP_PKEY_fromdata_init(t->fromdata[a]) != 1) {
                KEYX_ERR(p, KEYX_R_INTERNAL, "%s key import unavailable in keyx's context", name);
                return 0;
            }
        }
    }
    t->sha256 = EVP_MD_fetch(p->libctx, "SHA256", NULL);
    t->ecdsa = EVP_SIGNATURE_fetch(p->libctx, "ECDSA", NULL);
    t->rsa_sig = EVP_SIGNATURE_fetch(p->libctx, "RSA", NULL);
    t->hkdf = EVP_KDF_fetch(p->libctx, "HKDF", NULL);
    if (t->sha256 == NULL || t->ecdsa == NULL || t->rsa_sig == NULL || t->hkdf == NULL) {
        KEYX_ERR(p, KEYX_R_INTERNAL, "SHA-256, ECDSA, RSA or HKDF unavailable in keyx's context");
        return 0;
    }
    return 1;
}

void keyx_algtab_free(keyx_algtab *t)
{
    if (t == NULL)
        return;
    for (int a = 0; a < KEYX_ALG_COUNT; a++) {
        EVP_KEYMGMT_free(t->km[a]);
        OPENSSL_free(t->gen_settable[a]); /* OSSL_PARAM_merge copies only the array */
        EVP_PKEY_CTX_free(t->fromdata[a]);
    }
    EVP_MD_free(t->sha256);
    EVP_SIGNATURE_free(t->ecdsa);
    EVP_SIGNATURE_free(t->rsa_sig);
    EVP_KDF_free(t->hkdf);
    OPENSSL_free(t);
}
