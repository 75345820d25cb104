/* TPM ECC keys and OpenSSL keys: the curves keyx serves through the TPM, TPM2B_PUBLIC areas for
 * the keys it creates or loads, and the conversions between TPM points and EVP_PKEYs. */
#ifndef KEYX_BACKEND_TPM2_PUBKEY_H
#define KEYX_BACKEND_TPM2_PUBKEY_H

#include <stddef.h>
#include <stdint.h>

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
/* The same as a copy of domain (c's named-group parameters from keyx's domain cache, NULL: none)
 * with the point set: no EC_GROUP built from the curve's name, which costs more instructions than
 * the rest of a TPM key generation on the client side. */
EVP_PKEY *tpm_ec_public_from(const EVP_PKEY *domain, OSSL_LIB_CTX *libctx, const tpm_curve *c,
                             const TPMS_ECC_POINT *pt);
/* x and y of pk into pt, each left-padded to the field size of c. 0 if they do not fit. */
int tpm_ec_point(const EVP_PKEY *pk, const tpm_curve *c, TPMS_ECC_POINT *pt);
/* x and y from an uncompressed point encoding (0x04 || x || y) of c's size; 0 otherwise. */
int tpm_ec_point_decode(const unsigned char *enc, size_t len, const tpm_curve *c,
                        TPMS_ECC_POINT *pt);

/* The public area of an RSA decrypt key of bits with public exponent (65537 written as 0), no
 * scheme (chosen per TPM2_RSA_Decrypt) and the attributes of tpm_ecdh_template. */
void tpm_rsa_template(size_t bits, uint32_t exponent, int internal, TPMT_PUBLIC *out);
/* EVP_PKEY (keyx libctx) holding the RSA public key of a TPM public area; NULL on error. */
EVP_PKEY *tpm_rsa_public(OSSL_LIB_CTX *libctx, const TPMT_PUBLIC *area);
/* The TPM2_LoadExternal public area (internal = 0) of RSA key pk (2048/3072/4096, e < 2^32) and,
 * if prime is not NULL, its first prime (the TPM's sensitive part). 0 if it does not fit. */
int tpm_rsa_area(const EVP_PKEY *pk, TPMT_PUBLIC *area, TPM2B_PRIVATE_KEY_RSA *prime);

#endif
