/* DH public value check: the same verdict as DH_check_pub_key, at a fraction of its cost. */
#ifndef KEYX_KEYMGMT_DH_CHECK_H
#define KEYX_KEYMGMT_DH_CHECK_H

#include <openssl/types.h>

/* 1 if 2 <= y <= p-2 and, when q is known, y lies in the order-q subgroup. */
int keyx_dh_public_ok(const EVP_PKEY *key);

#endif
