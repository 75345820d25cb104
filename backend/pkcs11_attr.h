/* Attribute templates and attribute reads shared by the pkcs11 backend's files. */
#ifndef KEYX_BACKEND_PKCS11_ATTR_H
#define KEYX_BACKEND_PKCS11_ATTR_H

#include <stddef.h>

#include "backend/pkcs11_device.h"

extern const CK_BBOOL p11_yes, p11_no;

#define ATTR(type, ptr, len)                                                                       \
    {                                                                                              \
        (type), (void *)(ptr), (CK_ULONG)(len)                                                     \
    }
#define ATTR_BOOL(type, v) ATTR((type), &(v), sizeof(CK_BBOOL))

/* The private half of every key pair keyx makes on a token, usable for `usage` only: a session
 * object (never stored), private, sensitive and not extractable. Five template entries. */
#define P11_SESSION_PRIVATE(usage)                                                                 \
    ATTR_BOOL(CKA_TOKEN, p11_no), ATTR_BOOL(CKA_PRIVATE, p11_yes),                                 \
        ATTR_BOOL(CKA_SENSITIVE, p11_yes), ATTR_BOOL(CKA_EXTRACTABLE, p11_no),                     \
        ATTR_BOOL((usage), p11_yes)

/* Reads one attribute into a new buffer (OPENSSL_free). With a size hint that fits (an EC point,
 * a DH value: the group says how long) that is one C_GetAttributeValue; else a size query first. */
CK_RV p11_get_attr(p11_sess *s, CK_OBJECT_HANDLE obj, CK_ATTRIBUTE_TYPE type, size_t hint,
                   unsigned char **out, size_t *len);

#endif
