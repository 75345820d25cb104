/* What the libFuzzer harnesses of tests/fuzz share: a stand-alone provider context for the
 * parsers called directly, and a library context with keyx loaded as a built-in provider for the
 * targets that go through OpenSSL's API. */
#ifndef KEYX_TESTS_FUZZ_HARNESS_H
#define KEYX_TESTS_FUZZ_HARNESS_H

#include <stddef.h>
#include <stdint.h>

#include <openssl/types.h>

#include "provider/provctx.h"

/* A provider context with no core behind it, for calling keyx's parsers directly: its errors
 * are formatted (every argument is read, as the core would) and dropped. */
keyx_provctx *fuzz_bare_provctx(void);

/* keyx (built in, `backends = software`) and the default provider in one library context, made
 * once per process. The tpm backend's TCTI and the pkcs11 module name devices that do not
 * exist, so that a key naming either fails at once, never hangs or touches a real device. */
OSSL_LIB_CTX *fuzz_keyx_libctx(void);

/* The input as a NUL-terminated string (OPENSSL_free it); NULL when it holds a NUL. */
char *fuzz_strndup(const uint8_t *data, size_t size);

/* Reads and drops the thread's OpenSSL error queue (every error's text is formatted). */
void fuzz_drain_errors(void);

/* stderr off (to /dev/null) and back on around calls that warn there on purpose (a literal PIN
 * in the configuration), so that a fuzzing run's log stays readable. Sanitizer reports and
 * fuzz_fail() always reach the real stderr. */
void fuzz_stderr_off(void);
void fuzz_stderr_on(void);

/* Aborts with a message: a property the fuzzer found broken (libFuzzer saves the input). */
void fuzz_fail(const char *what) __attribute__((noreturn));

#endif
