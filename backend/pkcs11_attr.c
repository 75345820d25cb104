#include <openssl/crypto.h>

#include "backend/pkcs11_attr.h"

const CK_BBOOL p11_yes = CK_TRUE, p11_no = CK_FALSE;

CK_RV p11_get_attr(p11_sess *s, CK_OBJECT_HANDLE obj, CK_ATTRIBUTE_TYPE type, size_t hint,
                   unsigned char **out, size_t *len)
{
    CK_ATTRIBUTE a = {type, NULL, 0};
    CK_RV rv;

    *out = NULL;
    if (hint > 0) {
        if ((a.pValue = *out = OPENSSL_malloc(hint)) == NULL)
            return CKR_HOST_MEMORY;
        a.ulValueLen = hint;
        if ((rv = s->f->C_GetAttributeValue(s->h, obj, &a, 1)) == CKR_OK) {
            *len = a.ulValueLen;
            return CKR_OK;
        }
        OPENSSL_free(*out);
        *out = NULL;
        if (rv != CKR_BUFFER_TOO_SMALL)
            return rv;
        a.pValue = NULL;
    }
    if ((rv = s->f->C_GetAttributeValue(s->h, obj, &a, 1)) != CKR_OK)
        return rv;
    if (a.ulValueLen == CK_UNAVAILABLE_INFORMATION || a.ulValueLen > 65536)
        return CKR_ATTRIBUTE_TYPE_INVALID;
    if ((a.pValue = *out = OPENSSL_malloc(a.ulValueLen + 1)) == NULL)
        return CKR_HOST_MEMORY;
    if ((rv = s->f->C_GetAttributeValue(s->h, obj, &a, 1)) != CKR_OK) {
        OPENSSL_free(*out);
        *out = NULL;
        return rv;
    }
    *len = a.ulValueLen;
    return CKR_OK;
}
