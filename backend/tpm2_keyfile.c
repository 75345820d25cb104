/* TSS2 PRIVATE KEY files (see tpm2_keyfile.h), parsed with OpenSSL's ASN.1 templates. */
#include <limits.h>
#include <stdint.h>
#include <string.h>

#include <openssl/asn1.h>
#include <openssl/asn1t.h>
#include <openssl/objects.h>
#include <tss2/tss2_mu.h>

#include "backend/tpm2_keyfile.h"
#include "provider/errors.h"
#include "provider/provctx.h"

/* TCG's OIDs for the object a TSS2 key file carries (2.23.133.10.1.x). */
#define OID_LOADABLE "2.23.133.10.1.3"
#define OID_IMPORTABLE "2.23.133.10.1.4"
#define OID_SEALED "2.23.133.10.1.5"

typedef struct keyx_tpmkey_st {
    ASN1_OBJECT *type;
    ASN1_BOOLEAN empty_auth; /* -1: absent */
    ASN1_TYPE *policy;       /* SEQUENCE OF TPMPolicy; only its presence matters here */
    ASN1_OCTET_STRING *secret;
    ASN1_TYPE *auth_policy;       /* [3] SEQUENCE OF TPMAuthPolicy (later versions of the format) */
    ASN1_UTF8STRING *description; /* [4] */
    ASN1_BOOLEAN rsa_parent;      /* [5] TRUE: the owner primary is RSA; -1: absent */
    ASN1_INTEGER *parent;
    ASN1_OCTET_STRING *pubkey;
    ASN1_OCTET_STRING *privkey;
} KEYX_TPMKEY;

/* clang-format off */
ASN1_SEQUENCE(KEYX_TPMKEY) = {
    ASN1_SIMPLE(KEYX_TPMKEY, type, ASN1_OBJECT),
    ASN1_EXP_OPT(KEYX_TPMKEY, empty_auth, ASN1_BOOLEAN, 0),
    ASN1_EXP_OPT(KEYX_TPMKEY, policy, ASN1_ANY, 1),
    ASN1_EXP_OPT(KEYX_TPMKEY, secret, ASN1_OCTET_STRING, 2),
    ASN1_EXP_OPT(KEYX_TPMKEY, auth_policy, ASN1_ANY, 3),
    ASN1_EXP_OPT(KEYX_TPMKEY, description, ASN1_UTF8STRING, 4),
    ASN1_EXP_OPT(KEYX_TPMKEY, rsa_parent, ASN1_BOOLEAN, 5),
    ASN1_SIMPLE(KEYX_TPMKEY, parent, ASN1_INTEGER),
    ASN1_SIMPLE(KEYX_TPMKEY, pubkey, ASN1_OCTET_STRING),
    ASN1_SIMPLE(KEYX_TPMKEY, privkey, ASN1_OCTET_STRING),
} static_ASN1_SEQUENCE_END(KEYX_TPMKEY)

static int type_is(const ASN1_OBJECT *type, const char *oid)
{
    char txt[64];

    return OBJ_obj2txt(txt, sizeof(txt), type, 1) > 0 && strcmp(txt, oid) == 0;
}
/* clang-format on */

int tpm_keyfile_parse(keyx_provctx *p, const unsigned char *der, size_t len, tpm_keyfile *out)
{
    const unsigned char *q = der;
    KEYX_TPMKEY *k = NULL;
    uint64_t parent = 0;
    size_t off;
    int ok = 0;

    memset(out, 0, sizeof(*out));
    if (len > LONG_MAX ||
        (k = (KEYX_TPMKEY *)ASN1_item_d2i(NULL, &q, (long)len, ASN1_ITEM_rptr(KEYX_TPMKEY))) ==
            NULL ||
        q != der + len) {
        KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT,
                 "tpm: not a TSS2 PRIVATE KEY: the DER does not have the TPMKey structure (type, "
                 "emptyAuth, parent, pubkey, privkey)");
        goto done;
    }
    if (!type_is(k->type, OID_LOADABLE)) {
        KEYX_ERR(p, KEYX_R_UNSUPPORTED,
                 "tpm: this TSS2 key file holds %s, not a loadable key (OID %s): keyx loads only "
                 "keys made in a TPM",
                 type_is(k->type, OID_IMPORTABLE) ? "an importable key (OID " OID_IMPORTABLE ")"
                 : type_is(k->type, OID_SEALED)   ? "sealed data (OID " OID_SEALED ")"
                                                  : "an object of unknown type",
                 OID_LOADABLE);
        goto done;
    }
    if (k->empty_auth <= 0) { /* absent (-1) or FALSE: the key has a password */
        KEYX_ERR(p, KEYX_R_UNSUPPORTED,
                 "tpm: this TSS2 key has a password (its emptyAuth flag is not set): keyx loads "
                 "only TPM keys without one (make the key without user-auth, or change its "
                 "password to empty with tpm2_changeauth)");
        goto done;
    }
    if (k->policy != NULL || k->secret != NULL || k->auth_policy != NULL) {
        KEYX_ERR(p, KEYX_R_UNSUPPORTED,
                 "tpm: this TSS2 key is bound to a policy%s: keyx loads only keys authorized by "
                 "an empty password",
                 k->secret != NULL ? " and carries an import secret" : "");
        goto done;
    }
    if (k->rsa_parent > 0) {
        KEYX_ERR(p, KEYX_R_UNSUPPORTED,
                 "tpm: this TSS2 key was made under an RSA storage primary (rsaParent): keyx "
                 "loads keys under the ECC P-256 storage primary that tpm2-openssl uses, or under "
                 "a persistent parent");
        goto done;
    }
    if (!ASN1_INTEGER_get_uint64(&parent, k->parent) || parent > UINT32_MAX) {
        KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT, "tpm: the TSS2 key file's parent is not a TPM handle");
        goto done;
    }
    /* Some writers record the owner hierarchy as 0. */
    out->parent = parent == 0 ? TPM2_RH_OWNER : (TPM2_HANDLE)parent;
    off = 0;
    if (Tss2_MU_TPM2B_PUBLIC_Unmarshal(k->pubkey->data, (size_t)k->pubkey->length, &off,
                                       &out->pub) != TSS2_RC_SUCCESS ||
        off != (size_t)k->pubkey->length) {
        KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT,
                 "tpm: the TSS2 key file's pubkey is not a TPM2B_PUBLIC");
        goto done;
    }
    off = 0;
    if (Tss2_MU_TPM2B_PRIVATE_Unmarshal(k->privkey->data, (size_t)k->privkey->length, &off,
                                        &out->priv) != TSS2_RC_SUCCESS ||
        off != (size_t)k->privkey->length) {
        KEYX_ERR(p, KEYX_R_INVALID_ARGUMENT,
                 "tpm: the TSS2 key file's privkey is not a TPM2B_PRIVATE");
        goto done;
    }
    ok = 1;

done:
    ASN1_item_free((ASN1_VALUE *)k, ASN1_ITEM_rptr(KEYX_TPMKEY));
    if (!ok)
        OPENSSL_cleanse(out, sizeof(*out));
    return ok;
}
