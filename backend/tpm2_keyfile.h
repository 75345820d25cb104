/* TSS2 PRIVATE KEY files (the key file format of tpm2-openssl, openssl_tpm2_engine and
 * tpm2-tss-engine): the DER of TPMKey, a SEQUENCE of
 *   type        OBJECT IDENTIFIER (2.23.133.10.1.3: a loadable key),
 *   emptyAuth   [0] EXPLICIT BOOLEAN OPTIONAL,
 *   policy      [1] EXPLICIT SEQUENCE OF TPMPolicy OPTIONAL,
 *   secret      [2] EXPLICIT OCTET STRING OPTIONAL,
 *   authPolicy  [3] EXPLICIT SEQUENCE OF TPMAuthPolicy OPTIONAL,
 *   description [4] EXPLICIT UTF8String OPTIONAL,
 *   rsaParent   [5] EXPLICIT BOOLEAN OPTIONAL,
 *   parent      INTEGER (a TPM handle),
 *   pubkey      OCTET STRING (TPM2B_PUBLIC),
 *   privkey     OCTET STRING (TPM2B_PRIVATE).
 * keyx loads keys without a password or policy only. */
#ifndef KEYX_BACKEND_TPM2_KEYFILE_H
#define KEYX_BACKEND_TPM2_KEYFILE_H

#include <stddef.h>

#include <tss2/tss2_tpm2_types.h>

struct keyx_provctx;

typedef struct tpm_keyfile {
    TPM2_HANDLE parent; /* TPM2_RH_OWNER or a persistent handle */
    TPM2B_PUBLIC pub;
    TPM2B_PRIVATE priv; /* the sensitive part, encrypted to the parent */
} tpm_keyfile;

/* Parses and checks der: 1 with *out filled, else 0 with an error raised that says why keyx
 * cannot load the file (not a TSS2 key, an importable or sealed object, a password, a policy). */
int tpm_keyfile_parse(struct keyx_provctx *p, const unsigned char *der, size_t len,
                      tpm_keyfile *out);

#endif
