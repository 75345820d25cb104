/* For a safe prime p = 2q + 1 (the ffdhe groups and TLS 1.2's built-in primes) the order-q
 * subgroup is exactly the quadratic residues, so a Kronecker symbol replaces the full-size
 * y^q mod p exponentiation that DH_check_pub_key performs. Other q fall back to that
 * exponentiation. */
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>

#include "keymgmt/dh_check.h"

int keyx_dh_public_ok(const EVP_PKEY *key)
{
    BIGNUM *p = NULL, *q = NULL, *y = NULL, *t = BN_new();
    BN_CTX *ctx = BN_CTX_new();
    int ok = 0;

    if (t == NULL || ctx == NULL || !EVP_PKEY_get_bn_param(key, OSSL_PKEY_PARAM_FFC_P, &p) ||
        !EVP_PKEY_get_bn_param(key, OSSL_PKEY_PARAM_PUB_KEY, &y))
        goto end;
    /* 2 <= y <= p - 2 */
    if (BN_cmp(y, BN_value_one()) <= 0 || !BN_sub(t, p, BN_value_one()) || BN_cmp(y, t) >= 0)
        goto end;
    if (!EVP_PKEY_get_bn_param(key, OSSL_PKEY_PARAM_FFC_Q, &q) || BN_is_zero(q)) {
        ok = 1; /* no q: the range check is all DH_check_pub_key does too */
        goto end;
    }
    /* t = 2q + 1 */
    if (!BN_lshift1(t, q) || !BN_add_word(t, 1))
        goto end;
    if (BN_cmp(t, p) == 0)
        ok = BN_kronecker(y, p, ctx) == 1;
    else
        ok = BN_mod_exp(t, y, q, p, ctx) && BN_is_one(t);
end:
    BN_free(p);
    BN_free(q);
    BN_free(y);
    BN_free(t);
    BN_CTX_free(ctx);
    return ok;
}
