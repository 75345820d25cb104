#include <string.h>

#include <openssl/bio.h>
#include <openssl/core_dispatch.h>

#include "encode/core_bio.h"
#include "provider/errors.h"

void keyx_core_bio_init(keyx_provctx *p, const OSSL_DISPATCH *in)
{
    for (; in->function_id != 0; in++) {
        if (in->function_id == OSSL_FUNC_BIO_READ_EX)
            p->core_bio_read_ex = OSSL_FUNC_BIO_read_ex(in);
        else if (in->function_id == OSSL_FUNC_BIO_WRITE_EX)
            p->core_bio_write_ex = OSSL_FUNC_BIO_write_ex(in);
        else if (in->function_id == OSSL_FUNC_BIO_GETS)
            p->core_bio_gets = OSSL_FUNC_BIO_gets(in);
    }
}

/* Key files are small: a reference file is well under 4 KB, a TSS2 file under 8 KB. A larger
 * input is no key of ours and is not read whole into memory. */
#define KEYX_MAX_KEY_FILE (256 * 1024)

BIO *keyx_core_bio_read_all(keyx_provctx *p, OSSL_CORE_BIO *in)
{
    BIO *mem = BIO_new(BIO_s_mem());
    unsigned char buf[4096];
    size_t got = 0, total = 0;

    if (mem == NULL || p->core_bio_read_ex == NULL) {
        BIO_free(mem);
        KEYX_ERR(p, KEYX_R_INTERNAL, "cannot read the input: no core BIO functions");
        return NULL;
    }
    while (total < KEYX_MAX_KEY_FILE && p->core_bio_read_ex(in, buf, sizeof(buf), &got) &&
           got > 0) {
        if (BIO_write(mem, buf, (int)got) != (int)got) {
            BIO_free(mem);
            KEYX_ERR(p, KEYX_R_INTERNAL, "out of memory");
            return NULL;
        }
        total += got;
    }
    return mem;
}

#define PEM_LINE 1024

BIO *keyx_core_bio_read_pem_block(keyx_provctx *p, OSSL_CORE_BIO *in)
{
    BIO *mem;
    char line[PEM_LINE];
    size_t total = 0;
    int n, begun = 0;

    if (p->core_bio_gets == NULL || (mem = BIO_new(BIO_s_mem())) == NULL)
        return NULL;
    /* Line by line (fgets on a file): the END line is read, nothing after it. */
    while (total < KEYX_MAX_KEY_FILE && (n = p->core_bio_gets(in, line, sizeof(line))) > 0) {
        total += (size_t)n;
        if (!begun && strncmp(line, "-----BEGIN ", 11) != 0)
            continue; /* text before the block, as PEM readers allow */
        begun = 1;
        if (BIO_write(mem, line, n) != n)
            break;
        if (strncmp(line, "-----END ", 9) == 0)
            return mem;
    }
    BIO_free(mem);
    return NULL;
}

/* Exactly n bytes of in into mem. */
static int read_exact(keyx_provctx *p, OSSL_CORE_BIO *in, BIO *mem, size_t n)
{
    unsigned char buf[4096];
    size_t got;

    while (n > 0) {
        size_t want = n < sizeof(buf) ? n : sizeof(buf);

        if (!p->core_bio_read_ex(in, buf, want, &got) || got == 0 ||
            BIO_write(mem, buf, (int)got) != (int)got)
            return 0;
        n -= got;
    }
    return 1;
}

BIO *keyx_core_bio_read_der_element(keyx_provctx *p, OSSL_CORE_BIO *in)
{
    BIO *mem = BIO_new(BIO_s_mem());
    unsigned char hdr[2 + sizeof(size_t)];
    size_t len, nlen = 0;

    if (mem == NULL || p->core_bio_read_ex == NULL || !read_exact(p, in, mem, 2) ||
        BIO_read(mem, hdr, 2) != 2 || hdr[0] != 0x30) /* key files are SEQUENCEs */
        goto none;
    len = hdr[1];
    if (len & 0x80) {
        nlen = len & 0x7f;
        if (nlen == 0 || nlen > 3 || !read_exact(p, in, mem, nlen) ||
            BIO_read(mem, hdr + 2, (int)nlen) != (int)nlen)
            goto none;
        len = 0;
        for (size_t i = 0; i < nlen; i++)
            len = len << 8 | hdr[2 + i];
    }
    if (len > KEYX_MAX_KEY_FILE || BIO_write(mem, hdr, (int)(2 + nlen)) != (int)(2 + nlen) ||
        !read_exact(p, in, mem, len))
        goto none;
    return mem;
none:
    BIO_free(mem);
    return NULL;
}

int keyx_core_bio_write_mem(keyx_provctx *p, OSSL_CORE_BIO *out, BIO *mem)
{
    char *data = NULL;
    long len = BIO_get_mem_data(mem, &data);
    size_t written = 0;

    if (p->core_bio_write_ex == NULL || len < 0 ||
        !p->core_bio_write_ex(out, data, (size_t)len, &written) || written != (size_t)len) {
        KEYX_ERR(p, KEYX_R_INTERNAL, "cannot write the encoded key to the output");
        return 0;
    }
    return 1;
}
