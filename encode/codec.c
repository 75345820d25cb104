#include <stdio.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/params.h>

#include "encode/encode.h"

keyx_codec *keyx_codec_new(void *provctx, keyx_alg alg, keyx_encoding enc)
{
    keyx_codec *c = OPENSSL_zalloc(sizeof(*c));

    if (c != NULL) {
        c->p = provctx;
        c->alg = alg;
        c->enc = enc;
    }
    return c;
}

void keyx_codec_free(void *ctx)
{
    OPENSSL_free(ctx);
}

const OSSL_PARAM *keyx_codec_settable_ctx_params(void *provctx)
{
    static const OSSL_PARAM settable[] = {
        OSSL_PARAM_utf8_string(OSSL_ENCODER_PARAM_CIPHER, NULL, 0),
        OSSL_PARAM_utf8_string(OSSL_ENCODER_PARAM_PROPERTIES, NULL, 0),
        OSSL_PARAM_END,
    };

    (void)provctx;
    return settable;
}

int keyx_codec_set_ctx_params(void *ctx, const OSSL_PARAM params[])
{
    keyx_codec *c = ctx;
    const OSSL_PARAM *p = OSSL_PARAM_locate_const(params, OSSL_ENCODER_PARAM_CIPHER);
    const char *name = NULL;

    if (p == NULL)
        return 1;
    if (!OSSL_PARAM_get_utf8_string_ptr(p, &name))
        return 0;
    /* NULL or "": no encryption */
    return snprintf(c->cipher, sizeof(c->cipher), "%s", name != NULL ? name : "") <
           (int)sizeof(c->cipher);
}
