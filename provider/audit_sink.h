/* Where audit lines go: a file, reopened when logrotate (or anyone) has moved or deleted it, or a
 * syslog socket (`audit-log = syslog`: /dev/log, which journald and rsyslog serve; or
 * `syslog:SOCKET`), so that programs of any user can log on a multi-user host. */
#ifndef KEYX_PROVIDER_AUDIT_SINK_H
#define KEYX_PROVIDER_AUDIT_SINK_H

#include <stddef.h>

struct keyx_provctx;
typedef struct keyx_audit_sink keyx_audit_sink;

/* spec: the audit-log value. NULL with a KEYX_R_AUDIT error raised when it cannot be opened. */
keyx_audit_sink *keyx_audit_sink_open(struct keyx_provctx *p, const char *spec);
void keyx_audit_sink_close(keyx_audit_sink *s);

/* One line (a JSON object and its newline) in one write() or one datagram; ok: the event
 * succeeded (syslog severity info, else warning). 1 when written; 0 with errno set. */
int keyx_audit_sink_write(keyx_audit_sink *s, const char *line, size_t len, int ok);

/* The file's path or "syslog at SOCKET", for messages. */
const char *keyx_audit_sink_name(const keyx_audit_sink *s);

#endif
