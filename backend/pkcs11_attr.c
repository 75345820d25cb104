#include <string.h>

#include <openssl/crypto.h>

#include "backend/pkcs11_attr.h"

const CK_BBOOL p11_yes = CK_TRUE, p11_no = CK_FALSE;

void p11_tmpl_add(p11_tmpl *t, CK_ATTRIBUTE_TYPE type, const void *value, size_t len)
{
    if (t->n < sizeof(t->a) / sizeof(t->a[0]))
        t->a[t->n++] = (CK_ATTRIBUTE)ATTR(type, value, len);
}

void p11_tmpl_pair(p11_tmpl *pub, p11_tmpl *priv, const p11_name *name, CK_ATTRIBUTE_TYPE pub_usage,
                   CK_ATTRIBUTE_TYPE priv_usage, int sign)
{
    const CK_ATTRIBUTE session[] = {P11_SESSION_PRIVATE(priv_usage)};

    pub->n = priv->n = 0;
    if (name == NULL) {
        p11_tmpl_add(pub, CKA_TOKEN, &p11_no, sizeof(CK_BBOOL));
        if (pub_usage != 0)
            p11_tmpl_add(pub, pub_usage, &p11_yes, sizeof(CK_BBOOL));
        memcpy(priv->a, session, sizeof(session));
        priv->n = sizeof(session) / sizeof(session[0]);
        return;
    }
    /* Every usage is set, the unwanted ones false: tokens default them differently (SoftHSM
     * allows decrypt, unwrap and sign-recover on an EC key unless told otherwise). */
    static const CK_ATTRIBUTE_TYPE priv_usages[] = {CKA_DECRYPT, CKA_SIGN, CKA_UNWRAP, CKA_DERIVE,
                                                    CKA_SIGN_RECOVER};
    static const CK_ATTRIBUTE_TYPE pub_usages[] = {CKA_ENCRYPT, CKA_VERIFY, CKA_WRAP, CKA_DERIVE,
                                                   CKA_VERIFY_RECOVER};

    p11_tmpl_add(pub, CKA_TOKEN, &p11_yes, sizeof(CK_BBOOL));
    p11_tmpl_add(pub, CKA_PRIVATE, &p11_no, sizeof(CK_BBOOL));
    p11_tmpl_add(priv, CKA_TOKEN, &p11_yes, sizeof(CK_BBOOL));
    p11_tmpl_add(priv, CKA_PRIVATE, &p11_yes, sizeof(CK_BBOOL));
    p11_tmpl_add(priv, CKA_SENSITIVE, &p11_yes, sizeof(CK_BBOOL));
    p11_tmpl_add(priv, CKA_EXTRACTABLE, &p11_no, sizeof(CK_BBOOL));
    for (size_t i = 0; i < sizeof(priv_usages) / sizeof(priv_usages[0]); i++) {
        int on = priv_usages[i] == priv_usage || (sign && priv_usages[i] == CKA_SIGN);

        p11_tmpl_add(priv, priv_usages[i], on ? &p11_yes : &p11_no, sizeof(CK_BBOOL));
        on = pub_usages[i] == pub_usage || (sign && pub_usages[i] == CKA_VERIFY);
        p11_tmpl_add(pub, pub_usages[i], on ? &p11_yes : &p11_no, sizeof(CK_BBOOL));
    }
    if (name->label != NULL) {
        p11_tmpl_add(pub, CKA_LABEL, name->label, strlen(name->label));
        p11_tmpl_add(priv, CKA_LABEL, name->label, strlen(name->label));
    }
    p11_tmpl_add(pub, CKA_ID, name->id, name->idlen);
    p11_tmpl_add(priv, CKA_ID, name->id, name->idlen);
}

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
