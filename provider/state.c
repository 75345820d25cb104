/* keyx's state as provider parameters: see state.h. */
#include <stdio.h>
#include <string.h>

#include <openssl/params.h>

#include "backend/router.h"
#include "provider/audit.h"
#include "provider/errors.h"
#include "provider/provctx.h"
#include "provider/state.h"

#define STATE_BYTES 2048 /* a backend's state: its device, its down mark, its last error */

static int listed(const keyx_provctx *p, keyx_backend_kind kind)
{
    for (size_t i = 0; i < p->cfg.nbackends; i++)
        if (p->cfg.backends[i] == kind)
            return 1;
    return 0;
}

static int built(keyx_backend_kind kind)
{
    switch (kind) {
    case KEYX_BACKEND_SOFTWARE:
        return 1;
    case KEYX_BACKEND_TPM:
#ifdef KEYX_HAVE_TPM
        return 1;
#else
        return 0;
#endif
    case KEYX_BACKEND_PKCS11:
#ifdef KEYX_HAVE_PKCS11
        return 1;
#else
        return 0;
#endif
    default:
        return 0;
    }
}

static void describe_backend(keyx_provctx *p, keyx_backend_kind kind, char *buf, size_t len)
{
    /* A backend not listed may still be open: for keys loaded by URI, or (software) as the holder
     * of imported keys. */
    static const char unlisted[] = "not in backends, serves keys loaded by URI or imported: ";
    size_t n = listed(p, kind) ? 0 : sizeof(unlisted) - 1;

    if (!built(kind))
        snprintf(buf, len, "not built into this keyx");
    else if (p->router == NULL && !p->config_read)
        snprintf(buf, len, "not opened: keyx refuses to serve (see keyx-refusal)");
    else if (p->router == NULL)
        snprintf(buf, len, "%s",
                 n == 0 ? "not opened: keyx refuses to serve (see keyx-refusal)"
                        : "not in backends");
    else if (len <= n || !keyx_router_describe(p->router, kind, buf + n, len - n))
        snprintf(buf, len, "not in backends");
    else
        memcpy(buf, unlisted, n);
}

static void describe_audit(const keyx_provctx *p, char *buf, size_t len)
{
    if (p->audit != NULL)
        snprintf(buf, len, "%s", keyx_audit_name(p->audit));
    else if (!p->config_read)
        snprintf(buf, len, "not open: keyx refuses to serve (see keyx-refusal)");
    else if (p->cfg.audit_log != NULL)
        snprintf(buf, len, "not open: keyx refuses to serve (audit-log = %s)", p->cfg.audit_log);
    else
        snprintf(buf, len, "off (audit-log is not set)");
}

static void describe_backends(const keyx_provctx *p, char *buf, size_t len)
{
    buf[0] = '\0';
    if (!p->config_read) {
        snprintf(buf, len, "unknown: keyx could not read its configuration (see keyx-refusal)");
        return;
    }
    for (size_t i = 0; i < p->cfg.nbackends; i++) {
        size_t used = strlen(buf);

        snprintf(buf + used, len - used, "%s%s", i ? ", " : "",
                 keyx_backend_kind_name(p->cfg.backends[i]));
    }
}

static int set(keyx_provctx *p, OSSL_PARAM *param, const char *value)
{
    if (OSSL_PARAM_set_utf8_string(param, value))
        return 1;
    KEYX_ERR(p, KEYX_R_PARAM_BUFFER,
             "parameter %s: pass a UTF-8 string buffer of at least %zu bytes (or a NULL buffer to "
             "learn the size)",
             param->key, strlen(value) + 1);
    return 0;
}

int keyx_state_get_params(keyx_provctx *p, OSSL_PARAM params[])
{
    static const struct {
        const char *name;
        keyx_backend_kind kind;
    } backends[] = {
        {KEYX_STATE_SOFTWARE, KEYX_BACKEND_SOFTWARE},
        {KEYX_STATE_TPM, KEYX_BACKEND_TPM},
        {KEYX_STATE_PKCS11, KEYX_BACKEND_PKCS11},
    };
    char buf[STATE_BYTES];
    OSSL_PARAM *q;

    if ((q = OSSL_PARAM_locate(params, KEYX_STATE_BACKENDS)) != NULL) {
        describe_backends(p, buf, sizeof(buf));
        if (!set(p, q, buf))
            return 0;
    }
    for (size_t i = 0; i < sizeof(backends) / sizeof(backends[0]); i++)
        if ((q = OSSL_PARAM_locate(params, backends[i].name)) != NULL) {
            describe_backend(p, backends[i].kind, buf, sizeof(buf));
            if (!set(p, q, buf))
                return 0;
        }
    if ((q = OSSL_PARAM_locate(params, KEYX_STATE_AUDIT)) != NULL) {
        describe_audit(p, buf, sizeof(buf));
        if (!set(p, q, buf))
            return 0;
    }
    if ((q = OSSL_PARAM_locate(params, KEYX_STATE_REFUSAL)) != NULL &&
        !set(p, q, p->refusal[0] != '\0' ? p->refusal : "none"))
        return 0;
    return 1;
}
