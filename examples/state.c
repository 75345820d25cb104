/* keyx example: keyx's state, as a monitoring probe reads it.
 *
 * `openssl list -providers -verbose` prints the names of keyx's state parameters but not their
 * values; this program prints the values, for the keyx that openssl.cnf (OPENSSL_CONF) loads.
 * In a long-running program the same call shows what that process has seen of its devices
 * (docs/guide.md, "State of the backends"). Exit status 1 when keyx is not loaded, 2 when it
 * refuses to serve.
 *
 * usage: keyx-state-example
 */
#include <stdio.h>

#include <openssl/err.h>
#include <openssl/params.h>
#include <openssl/provider.h>

static const char *const names[] = {"keyx-backends",    "keyx-backend-software",
                                    "keyx-backend-tpm", "keyx-backend-pkcs11",
                                    "keyx-audit",       "keyx-refusal"};
#define N (sizeof(names) / sizeof(names[0]))

int main(void)
{
    static char values[N][2048];
    OSSL_PARAM params[N + 2];
    int status = 0;
    /* The keyx openssl.cnf activated (loading an active provider only takes a reference). */
    OSSL_PROVIDER *keyx = OSSL_PROVIDER_load(NULL, "keyx");

    if (keyx == NULL) {
        fprintf(stderr, "keyx is not loaded: check OPENSSL_CONF and OPENSSL_MODULES\n");
        ERR_print_errors_fp(stderr);
        return 1;
    }
    for (size_t i = 0; i < N; i++)
        params[i] = OSSL_PARAM_construct_utf8_string(names[i], values[i], sizeof(values[i]));
    params[N] = OSSL_PARAM_construct_int("status", &status);
    params[N + 1] = OSSL_PARAM_construct_end();
    if (!OSSL_PROVIDER_get_params(keyx, params)) {
        ERR_print_errors_fp(stderr);
        OSSL_PROVIDER_unload(keyx);
        return 1;
    }
    printf("status: %s\n", status ? "active" : "inactive");
    for (size_t i = 0; i < N; i++)
        printf("%s: %s\n", names[i], values[i]);
    OSSL_PROVIDER_unload(keyx);
    return status ? 0 : 2;
}
