/* TPM ECC keys and OpenSSL keys: the curves keyx serves through the TPM, TPM2B_PUBLIC areas for
 * the keys it creates or loads, and the conversions between TPM points and EVP_PKEYs. */
#ifndef KEYX_BACKEND_TPM2_PUBKEY_H
#define KEYX_BACKEND_TPM2_PUBKEY_H

#include <stddef.h>

#include <openssl/types.h>
#include <tss2/tss2_tpm2_types.h>

typedef struct tpm_curve {
    const char *group;   /* keyx's name: "P-256" */
    const char *openssl; /* OpenSSL's group name: "prime256v1" */
    TPM2_ECC_CURVE id;   /* TPM2_ECC_NIST_P256 */
    size_t field;        /* bytes of a coordinate and of the shared secret */
} tpm_curve;

/* NULL when keyx does not serve the group or curve through the TPM. */
const tpm_curve *tpm_curve_by_group(const char *group);
const tpm_curve *tpm_curve_by_id(TPM2_ECC_CURVE id);
/* Curve of an EC EVP_PKEY (by its group name); NULL if not one of keyx's TPM curves. */
const tpm_curve *tpm_curve_of(const EVP_PKEY *pk);

/* The public area of an ECDH key for curve c: decrypt, userWithAuth, noDA, no scheme; plus
 * fixedTPM, fixedParent and sensitiveDataOrigin when the TPM makes the key (internal = 1),
 * without them for a key loaded from outside (TPM2_LoadExternal requires that). */
void tpm_ecdh_template(const tpm_curve *c, int internal, TPMT_PUBLIC *out);
/* The storage parent: ECC P-256, restricted decrypt, AES-128-CFB (the owner-hierarchy SRK). */
void tpm_storage_template(TPMT_PUBLIC *out);

/* EVP_PKEY (keyx libctx) holding the public point of a TPM ECC public area; NULL on error. */
EVP_PKEY *tpm_ec_public(OSSL_LIB_CTX *libctx, const tpm_curve *c, const TPMS_ECC_POINT *pt);
/* x and y of pk into pt, each left-padded to the field size of c. 0 if they do not fit. */
int tpm_ec_point(const EVP_PKEY *pk, const tpm_curve *c, TPMS_ECC_POINT *pt);

#endif
