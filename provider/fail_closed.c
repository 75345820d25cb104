/* Fail closed: see fail_closed.h. */
#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <openssl/err.h>

#include "provider/errors.h"
#include "provider/fail_closed.h"
#include "provider/provctx.h"

static atomic_int printed; /* the stderr line: once per process, not once per library context */

void keyx_fail_closed_enter(keyx_provctx *p)
{
    const char *data = NULL;
    int flags = 0;
    char line[sizeof(p->refusal) + 160];
    int n;

    if (ERR_peek_last_error_data(&data, &flags) != 0 && (flags & ERR_TXT_STRING) && data != NULL &&
        data[0] != '\0')
        snprintf(p->refusal, sizeof(p->refusal), "%s",
                 strncmp(data, "keyx: ", 6) == 0 ? data + 6 : data);
    else
        snprintf(p->refusal, sizeof(p->refusal), "keyx could not start (no detail)");
    ERR_pop_to_mark();
    /* Programs rarely show provider errors at load: stderr names the cause at once, and each
     * refused operation names it again in the application's error queue. One write(), so that
     * the lines of concurrent processes do not interleave. */
    n = snprintf(line, sizeof(line),
                 "keyx: error: %s; keyx refuses every operation until this is fixed "
                 "(no software keys in its place)\n",
                 p->refusal);
    if (n > 0 && !atomic_exchange(&printed, 1)) {
        size_t len = (size_t)n < sizeof(line) ? (size_t)n : sizeof(line) - 1;

        while (write(STDERR_FILENO, line, len) < 0 && errno == EINTR)
            ;
    }
}

int keyx_refused(const keyx_provctx *p)
{
    if (p == NULL || p->refusal[0] == '\0')
        return 0;
    KEYX_ERR(p, KEYX_R_NOT_CONFIGURED, "%s; fix keyx's configuration (openssl.cnf, KEYX_*)",
             p->refusal);
    return 1;
}
