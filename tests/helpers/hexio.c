#include <stdio.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/err.h>

#include "hexio.h"

void print_hex(const unsigned char *buf, size_t len)
{
    for (size_t i = 0; i < len; i++)
        printf("%02x", buf[i]);
    if (len == 0)
        fputc('-', stdout);
}

void print_errors(const char *stage)
{
    unsigned long e;
    const char *data = NULL;
    int flags = 0, n = 0;

    printf("err %s:", stage);
    while ((e = ERR_get_error_all(NULL, NULL, NULL, &data, &flags)) != 0) {
        const char *lib = ERR_lib_error_string(e), *reason = ERR_reason_error_string(e);

        printf("%s %s:", n > 0 ? " |" : "", lib != NULL ? lib : "?");
        if (reason != NULL)
            printf("%s", reason);
        else
            printf("reason(%d)", ERR_GET_REASON(e));
        if ((flags & ERR_TXT_STRING) != 0 && data != NULL && *data != '\0') {
            fputc(':', stdout);
            for (const char *c = data; *c != '\0'; c++)
                fputc(*c == '\n' || *c == '\r' ? ' ' : *c, stdout);
        }
        n++;
    }
    if (n == 0)
        printf(" (no error recorded)");
}

static int hexval(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

unsigned char *unhex(const char *s, size_t *len)
{
    size_t n = strcmp(s, "-") == 0 ? 0 : strlen(s);
    unsigned char *buf;

    if (n % 2 != 0 || (buf = OPENSSL_malloc(n / 2 + 1)) == NULL)
        return NULL;
    for (size_t i = 0; i < n / 2; i++) {
        int hi = hexval((unsigned char)s[2 * i]), lo = hexval((unsigned char)s[2 * i + 1]);

        if (hi < 0 || lo < 0) {
            OPENSSL_free(buf);
            return NULL;
        }
        buf[i] = (unsigned char)(hi << 4 | lo);
    }
    *len = n / 2;
    return buf;
}
