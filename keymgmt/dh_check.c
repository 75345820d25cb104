/* For a safe prime p = 2q + 1 (the ffdhe groups and TLS 1.2's built-in primes) the order-q
 * subgroup is exactly the quadratic residues, so a Kronecker symbol replaces the full-size
 * y^q mod p exponentiation that DH_check_pub_key performs. That holds only if p is prime: the
 * shortcut is taken for the named groups alone, whose p is known to be; explicit parameters
 * (a TLS 1.2 server's, or made up: p = 2q + 1 need not be prime) get the exponentiation. */
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/params.h>

#include "keymgmt/dh_check.h"

static int named_group(const EVP_PKEY *key)
{
    char name[64] = "";
    int ok;

    ERR_set_mark(); /* no group name is an answer, not an error */
    ok = EVP_PKEY_get_utf8_string_param(key, OSSL_PKEY_PARAM_GROUP_NAME, name, sizeof(name),
                                        NULL) == 1 &&
         name[0] != '\0';
    ERR_pop_to_mark();
    return ok;
}

/* 1 with *q the key's q or NULL when it has none; 0 when it has one that is no unsigned number. */
static int has_q(const EVP_PKEY *key, BIGNUM **q)
{
    OSSL_PARAM size[] = {OSSL_PARAM_BN(OSSL_PKEY_PARAM_FFC_Q, NULL, 0), OSSL_PARAM_END};

    *q = NULL;
    if (!EVP_PKEY_get_params(key, size))
        return 0;
    if (!OSSL_PARAM_modified(&size[0]))
        return 1;
    return EVP_PKEY_get_bn_param(key, OSSL_PKEY_PARAM_FFC_Q, q) == 1;
}

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
    if (!has_q(key, &q))
        goto end; /* a q that cannot be read (a negative one) is refused, not taken as none */
    if (q == NULL || BN_is_zero(q)) {
        ok = 1; /* no q: the range check is all DH_check_pub_key does too */
        goto end;
    }
    /* t = 2q + 1 */
    if (!BN_lshift1(t, q) || !BN_add_word(t, 1))
        goto end;
    if (BN_cmp(t, p) == 0 && named_group(key))
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
