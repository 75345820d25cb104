/* Checked in keyx, before any backend sees the point, so that a hardware backend that does not
 * test for an all-zero result cannot be led into one. The u-coordinate is read as RFC 7748
 * decodes it (little endian; X25519 ignores the top bit) and reduced mod p: the small-order
 * points are then u = 0, 1, p - 1 and, on Curve25519, the two points of order 8. */
#include <openssl/bn.h>
#include <openssl/evp.h>

#include "keymgmt/ecx_check.h"

/* Big-endian hex of the order-8 u-coordinates of Curve25519. */
static const char *const x25519_order8[] = {
    "00b8495f16056286fdb1329ceb8d09da6ac49ff1fae35616aeb8413b7c7aebe0",
    "57119fd0dd4e22d8868e1c58c45c44045bef839c55b1d0b1248c50a3bc959c5f",
};

int keyx_ecx_public_ok(keyx_alg alg, const EVP_PKEY *pub)
{
    unsigned char raw[56];
    size_t len = sizeof(raw), want = alg == KEYX_ALG_X448 ? 56 : 32;
    BIGNUM *u = NULL, *p = BN_new(), *t = NULL;
    int ok = 0;

    if (p == NULL || EVP_PKEY_get_raw_public_key(pub, raw, &len) != 1 || len != want)
        goto end;
    if (alg == KEYX_ALG_X25519)
        raw[31] &= 0x7f;
    /* p = 2^255 - 19, or 2^448 - 2^224 - 1 */
    if (alg == KEYX_ALG_X25519) {
        if (!BN_set_bit(p, 255) || !BN_sub_word(p, 19))
            goto end;
    } else if (!BN_set_bit(p, 448) || (t = BN_new()) == NULL || !BN_set_bit(t, 224) ||
               !BN_sub(p, p, t) || !BN_sub_word(p, 1)) {
        goto end;
    }
    if ((u = BN_lebin2bn(raw, (int)len, NULL)) == NULL)
        goto end;
    if (BN_cmp(u, p) >= 0 && !BN_sub(u, u, p))
        goto end;
    if (BN_is_zero(u) || BN_is_one(u) || !BN_add_word(u, 1))
        goto end;
    if (BN_cmp(u, p) == 0) /* u was p - 1 */
        goto end;
    if (!BN_sub_word(u, 1))
        goto end;
    ok = 1;
    for (size_t i = 0; ok && alg == KEYX_ALG_X25519 && i < 2; i++) {
        BIGNUM *o = NULL;

        if (!BN_hex2bn(&o, x25519_order8[i])) {
            ok = 0;
            break;
        }
        ok = BN_cmp(u, o) != 0;
        BN_free(o);
    }
end:
    BN_free(u);
    BN_free(p);
    BN_free(t);
    return ok;
}
