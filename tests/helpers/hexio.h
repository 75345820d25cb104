/* Output and hex parsing shared by the test drivers (derive.c, wrap.c). */
#ifndef KEYX_TESTS_HEXIO_H
#define KEYX_TESTS_HEXIO_H

#include <stddef.h>

/* Lowercase hex of buf on stdout; "-" when empty. */
void print_hex(const unsigned char *buf, size_t len);
/* "err STAGE: lib:reason:data | ..." for every queued OpenSSL error, earliest first, on the
 * current line (no file or line: the same failure prints the same text). */
void print_errors(const char *stage);
/* Decodes hex ("-" is empty) into a new buffer (OPENSSL_free); NULL on bad input. */
unsigned char *unhex(const char *s, size_t *len);

#endif
