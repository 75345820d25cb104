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

/* The name of a token key keyx makes (keyx-label, keyx-id): CKA_LABEL (NULL: none) and CKA_ID
 * (the one asked for, or a fresh random one). */
typedef struct p11_name {
    const char *label;
    unsigned char id[64];
    size_t idlen;
} p11_name;

/* The templates of a key pair keyx generates. name NULL: an ephemeral key, the private half a
 * session object (P11_SESSION_PRIVATE) usable for priv_usage, the public half a session object.
 * name set: both halves token objects carrying the name (so pkcs11-tool and libp11 find them),
 * the private one private, sensitive, not extractable, for priv_usage and, when sign is set,
 * CKA_SIGN (the public one CKA_VERIFY), every other usage false; the public one public.
 * pub_usage (0: none) goes on the public half either way. Room for three more attributes each
 * (the algorithm's). */
typedef struct p11_tmpl {
    CK_ATTRIBUTE a[16];
    CK_ULONG n;
} p11_tmpl;

void p11_tmpl_pair(p11_tmpl *pub, p11_tmpl *priv, const p11_name *name, CK_ATTRIBUTE_TYPE pub_usage,
                   CK_ATTRIBUTE_TYPE priv_usage, int sign);
void p11_tmpl_add(p11_tmpl *t, CK_ATTRIBUTE_TYPE type, const void *value, size_t len);

/* Reads one attribute into a new buffer (OPENSSL_free). With a size hint that fits (an EC point,
 * a DH value: the group says how long) that is one C_GetAttributeValue; else a size query first. */
CK_RV p11_get_attr(p11_sess *s, CK_OBJECT_HANDLE obj, CK_ATTRIBUTE_TYPE type, size_t hint,
                   unsigned char **out, size_t *len);

#endif
