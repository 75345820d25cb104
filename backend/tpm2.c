/* Placeholder until the tpm backend lands: listing it in backends fails with a clear error. */
#include "backend/backend.h"
#include "provider/errors.h"
#include "provider/provctx.h"

static int stub_open(keyx_provctx *p, void **state)
{
    *state = NULL;
    KEYX_ERR(p, KEYX_R_BACKEND_UNAVAILABLE, "the tpm backend is not implemented yet");
    return 0;
}

static void stub_close(void *state)
{
    (void)state;
}

const keyx_backend_ops keyx_tpm_backend = {
    .name = "tpm",
    .open = stub_open,
    .close = stub_close,
};
