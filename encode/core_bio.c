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
    while (total < KEYX_MAX_KEY_FILE && p->core_bio_read_ex(in, buf, sizeof(buf), &got) && got > 0) {
        if (BIO_write(mem, buf, (int)got) != (int)got) {
            BIO_free(mem);
            KEYX_ERR(p, KEYX_R_INTERNAL, "out of memory");
            return NULL;
        }
        total += got;
    }
    return mem;
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
