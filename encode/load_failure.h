/* Why a key file of keyx's could not be loaded, kept in the thread for the PEM decoder above the
 * file's decoder. OpenSSL 3.0's file: store (openssl -in, -key, -inkey) runs the file's decoders
 * inside ossl_store_handle_load_result, which pops their errors and raises only "unsupported";
 * keyx's PEM decoder runs outside that mark, so it raises the cause again there. */
#ifndef KEYX_ENCODE_LOAD_FAILURE_H
#define KEYX_ENCODE_LOAD_FAILURE_H

#include <openssl/core.h>

#include "provider/errors.h"

/* Forgets any earlier failure; errors keyx raises from here on may be the cause. */
void keyx_load_failure_begin(void);

/* Raises reason/msg (the key file's failure) after noting it and the cause, the last error keyx
 * raised since keyx_load_failure_begin(), if any. */
void keyx_load_failure_raise(const struct keyx_provctx *p, const char *file, int line,
                             const char *func, int reason, const char *msg);

/* The reason of the cause raised since keyx_load_failure_begin(), or fallback when none was: the
 * file's failure line then names the cause's reason too. */
int keyx_load_failure_cause_reason(int fallback);

/* The cause raised since keyx_load_failure_begin(): 1 with *out, 0 when none was. */
int keyx_load_failure_cause(keyx_error_copy *out);

/* 1 when a failure was noted since keyx_load_failure_begin(). */
int keyx_load_failure_noted(void);

/* Raises the noted cause and failure again, and forgets them. */
void keyx_load_failure_raise_again(const struct keyx_provctx *p);

/* Hands a key file's DER (with its structure name) to the next decoders, data_cb's result. When
 * the key file's decoder below fails to load the key, its errors may have been dropped by OpenSSL
 * 3.0's file: store: the cause and failure are raised again here, once, in their place. */
int keyx_load_failure_hand_on(const struct keyx_provctx *p, const unsigned char *der, size_t len,
                              const char *structure, OSSL_CALLBACK *data_cb, void *data_cbarg);

#define KEYX_LOAD_FAILURE(p, reason, msg)                                                          \
    keyx_load_failure_raise((p), OPENSSL_FILE, OPENSSL_LINE, OPENSSL_FUNC, (reason), (msg))

#endif
