/* Calls into a backend. Each marks the thread as inside a backend, so that a library the backend
 * uses (SoftHSM's or the TSS's own libcrypto) that comes back into keyx through an application
 * configured with ?provider=keyx is refused at once instead of recursing or deadlocking. */
#ifndef KEYX_BACKEND_CALL_H
#define KEYX_BACKEND_CALL_H

#include "backend/backend.h"

/* Each returns what the backend returned (1, 0 or KEYX_BACKEND_DOWN, see backend.h). */
int keyx_backend_generate(keyx_backend *be, const keyx_keyspec *spec, void **handle,
                          EVP_PKEY **pub);
int keyx_backend_import(keyx_backend *be, EVP_PKEY *key, void **handle, EVP_PKEY **pub);
int keyx_backend_load(keyx_backend *be, const char *locator, void **handle, EVP_PKEY **pub);
/* be->ops->load_deferred (the caller checks it is there). */
int keyx_backend_load_deferred(keyx_backend *be, const char *locator, EVP_PKEY *recorded,
                               void **handle, EVP_PKEY **pub);
int keyx_backend_derive(keyx_backend *be, void *handle, const keyx_peer *peer,
                        unsigned char *secret, size_t secretlen);
/* 1, 0, KEYX_RSA_DECRYPT_ERROR or KEYX_BACKEND_DOWN; 0 with an error when the backend has no
 * rsa_decrypt. */
int keyx_backend_rsa_decrypt(keyx_backend *be, void *handle, const keyx_rsa_op *op,
                             const unsigned char *in, size_t inlen, unsigned char *out,
                             size_t *outlen);
void keyx_backend_free(keyx_backend *be, void *handle);
/* The optional operations: 0 with an error naming the backend when it lacks them. */
int keyx_backend_locator(keyx_backend *be, void *handle, char **out);
int keyx_backend_load_encoded(keyx_backend *be, const char *format, const unsigned char *der,
                              size_t len, void **handle, EVP_PKEY **pub);
int keyx_backend_objects(keyx_backend *be, const char *locator, int kinds, keyx_object **out,
                         size_t *n);
int keyx_backend_sign_check(keyx_backend *be, void *handle, const keyx_sign_op *op);
int keyx_backend_sign(keyx_backend *be, void *handle, const keyx_sign_op *op,
                      const unsigned char *dgst, size_t dlen, unsigned char *sig, size_t *siglen);

/* At keyx's entry points: 0 with KEYX_R_RECURSION raised when called from inside a backend. */
int keyx_check_not_reentered(const struct keyx_provctx *p, const char *what);

#endif
