#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>

#include <openssl/core_dispatch.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/provider.h>

#include "tests/fuzz/harness.h"

int OSSL_provider_init(const OSSL_CORE_HANDLE *handle, const OSSL_DISPATCH *in,
                       const OSSL_DISPATCH **out, void **provctx);

static void bare_new_error(const OSSL_CORE_HANDLE *handle)
{
    (void)handle;
}

static void bare_set_error_debug(const OSSL_CORE_HANDLE *handle, const char *file, int line,
                                 const char *func)
{
    (void)handle;
    (void)file;
    (void)line;
    (void)func;
}

__attribute__((format(printf, 3, 0))) static void
bare_vset_error(const OSSL_CORE_HANDLE *handle, uint32_t reason, const char *fmt, va_list args)
{
    char detail[1024];

    (void)handle;
    (void)reason;
    vsnprintf(detail, sizeof(detail), fmt, args);
}

static void clear_keyx_env(void);

keyx_provctx *fuzz_bare_provctx(void)
{
    static keyx_provctx p;

    if (!p.initialized)
        clear_keyx_env();
    p.initialized = 1;
    p.core_new_error = bare_new_error;
    p.core_set_error_debug = bare_set_error_debug;
    p.core_vset_error = bare_vset_error;
    return &p;
}

/* Every KEYX_* variable keyx reads (provider/config.c), so that the caller's environment never
 * changes what is fuzzed. */
static const char *const keyx_env[] = {
    "KEYX_BACKENDS",     "KEYX_TPM_TCTI",    "KEYX_TPM_PARENT",     "KEYX_PKCS11_MODULE",
    "KEYX_PKCS11_TOKEN", "KEYX_PKCS11_PIN",  "KEYX_PKCS11_RAW_RSA", "KEYX_TPM_ENCRYPT_SESSIONS",
    "KEYX_TPM_POOL",     "KEYX_PKCS11_POOL", "KEYX_AUDIT_LOG",      "KEYX_EPHEMERAL_MAX_USES",
    "KEYX_DEBUG",
};

static void clear_keyx_env(void)
{
    for (size_t i = 0; i < sizeof(keyx_env) / sizeof(keyx_env[0]); i++)
        unsetenv(keyx_env[i]);
}

OSSL_LIB_CTX *fuzz_keyx_libctx(void)
{
    static OSSL_LIB_CTX *ctx;

    if (ctx != NULL)
        return ctx;
    clear_keyx_env();
    setenv("OPENSSL_CONF", "/dev/null", 1);
    setenv("KEYX_BACKENDS", "software", 1);
    setenv("KEYX_TPM_TCTI", "device:/nonexistent/keyx-fuzz-tpm", 1);
    setenv("KEYX_PKCS11_MODULE", "/nonexistent/keyx-fuzz-pkcs11.so", 1);
    setenv("KEYX_PKCS11_PIN", "env:KEYX_FUZZ_NO_PIN", 1);
    setenv("TSS2_LOG", "all+NONE", 1); /* the TSS's own lines about the missing TPM */
    if ((ctx = OSSL_LIB_CTX_new()) == NULL ||
        OSSL_PROVIDER_add_builtin(ctx, "keyx", OSSL_provider_init) != 1 ||
        OSSL_PROVIDER_load(ctx, "keyx") == NULL || OSSL_PROVIDER_load(ctx, "default") == NULL) {
        ERR_print_errors_fp(stderr);
        fuzz_fail("cannot load keyx and the default provider into a library context");
    }
    return ctx;
}

char *fuzz_strndup(const uint8_t *data, size_t size)
{
    char *s;

    if (memchr(data, 0, size) != NULL || (s = OPENSSL_malloc(size + 1)) == NULL)
        return NULL;
    memcpy(s, data, size);
    s[size] = '\0';
    return s;
}

void fuzz_drain_errors(void)
{
    const char *data = NULL;
    char buf[256];
    unsigned long e;
    int flags = 0;
    static int verbose = -1;

    if (verbose < 0)
        verbose = getenv("KEYX_FUZZ_VERBOSE") != NULL;
    if (verbose)
        ERR_print_errors_fp(stderr); /* reproducing one input: what keyx said */
    while ((e = ERR_get_error_all(NULL, NULL, NULL, &data, &flags)) != 0) {
        ERR_error_string_n(e, buf, sizeof(buf));
        if ((flags & ERR_TXT_STRING) && data != NULL)
            (void)strlen(data);
    }
}

void __sanitizer_set_report_fd(void *fd);

static int real_stderr = -1, dev_null = -1;

static void stderr_init(void)
{
    if (real_stderr >= 0)
        return;
    if ((real_stderr = dup(STDERR_FILENO)) < 0 || (dev_null = open("/dev/null", O_WRONLY)) < 0)
        abort();
    __sanitizer_set_report_fd((void *)(intptr_t)real_stderr);
}

void fuzz_stderr_off(void)
{
    stderr_init();
    dup2(dev_null, STDERR_FILENO);
}

void fuzz_stderr_on(void)
{
    stderr_init();
    dup2(real_stderr, STDERR_FILENO);
}

void fuzz_fail(const char *what)
{
    fuzz_stderr_on();
    fprintf(stderr, "keyx fuzz: property broken: %s\n", what);
    abort();
}
