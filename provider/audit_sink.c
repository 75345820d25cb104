/* Audit sinks: see audit_sink.h. No locks: a file is swapped under its descriptor with dup2(),
 * which is atomic for concurrent writers and leaves nothing half-done for a fork(). */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1 /* O_CLOEXEC, strerror_r (GNU), localtime_r */
#endif

#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "provider/audit_sink.h"
#include "provider/errors.h"
#include "provider/provctx.h"

#define SYSLOG_PREFIX "syslog"
#define SYSLOG_DEFAULT "/dev/log"
#define AUTHPRIV (10 << 3) /* LOG_AUTHPRIV: security messages, readable by administrators only */
#define SEV_INFO 6
#define SEV_WARNING 4
#define RECHECK_MS 1000 /* how often a writer looks whether the file was moved */

struct keyx_audit_sink {
    int fd;
    int syslog;
    char *path; /* the file, or the syslog socket */
    char name[300];
    struct sockaddr_un addr; /* syslog */
    atomic_llong next_check; /* file: monotonic ms of the next look at the path */
};

static const char *errstr(int err, char *buf, size_t len)
{
#if defined(__GLIBC__) && defined(_GNU_SOURCE)
    return strerror_r(err, buf, len); /* GNU variant: returns the message */
#else
    if (strerror_r(err, buf, len) != 0)
        snprintf(buf, len, "error %d", err);
    return buf;
#endif
}

static long long now_ms(void)
{
    struct timespec ts;

    if (clock_gettime(CLOCK_MONOTONIC_COARSE, &ts) != 0)
        return 0;
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int open_file(const char *path)
{
    return open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
}

keyx_audit_sink *keyx_audit_sink_open(keyx_provctx *p, const char *spec)
{
    keyx_audit_sink *s;
    const char *path = spec;
    int is_syslog = 0, err;
    char ebuf[128];

    if (spec == NULL || spec[0] == '\0') {
        KEYX_ERR(p, KEYX_R_AUDIT, "no audit log path given (audit-log)");
        return NULL;
    }
    if (strcmp(spec, SYSLOG_PREFIX) == 0 || strncmp(spec, SYSLOG_PREFIX ":", 7) == 0) {
        is_syslog = 1;
        path = spec[6] == ':' ? spec + 7 : SYSLOG_DEFAULT;
    }
    if ((s = OPENSSL_zalloc(sizeof(*s))) == NULL || (s->path = OPENSSL_strdup(path)) == NULL) {
        OPENSSL_free(s);
        KEYX_ERR(p, KEYX_R_INTERNAL, "out of memory opening audit log \"%s\"", spec);
        return NULL;
    }
    s->syslog = is_syslog;
    if (is_syslog) {
        if (path[0] == '\0' || strlen(path) >= sizeof(s->addr.sun_path)) {
            keyx_audit_sink_close(s);
            KEYX_ERR(p, KEYX_R_AUDIT, "audit-log = %s: expected syslog or syslog:SOCKET (a path)",
                     spec);
            return NULL;
        }
        s->addr.sun_family = AF_UNIX;
        memcpy(s->addr.sun_path, path, strlen(path) + 1);
        snprintf(s->name, sizeof(s->name), "syslog at %s", path);
        s->fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    } else {
        snprintf(s->name, sizeof(s->name), "%s", path);
        s->fd = open_file(path);
        atomic_store(&s->next_check, now_ms() + RECHECK_MS);
    }
    if (s->fd < 0) {
        err = errno;
        keyx_audit_sink_close(s);
        KEYX_ERR(p, KEYX_R_AUDIT, "cannot open audit log \"%s\": %s", path,
                 errstr(err, ebuf, sizeof(ebuf)));
        return NULL;
    }
    /* A syslog socket nobody serves is a configuration error now, not a lost trail later. */
    if (is_syslog && access(path, W_OK) != 0) {
        err = errno;
        keyx_audit_sink_close(s);
        KEYX_ERR(p, KEYX_R_AUDIT,
                 "cannot reach syslog at \"%s\": %s (is journald or rsyslog running? or give "
                 "audit-log a file)",
                 path, errstr(err, ebuf, sizeof(ebuf)));
        return NULL;
    }
    return s;
}

void keyx_audit_sink_close(keyx_audit_sink *s)
{
    if (s == NULL)
        return;
    if (s->fd >= 0)
        close(s->fd);
    OPENSSL_free(s->path);
    OPENSSL_free(s);
}

const char *keyx_audit_sink_name(const keyx_audit_sink *s)
{
    return s->name;
}

/* logrotate moves the file away (or deletes it) and expects the writer to start a new one at the
 * path; copytruncate needs nothing (O_APPEND writes at the new end). At most once a second one
 * writer looks at the path, and swaps the descriptor under the others with dup2(). */
static void reopen_if_moved(keyx_audit_sink *s)
{
    long long now = now_ms(), due = atomic_load(&s->next_check);
    struct stat at_path, open_file_st;
    int fd, saved = errno;

    if (now < due || !atomic_compare_exchange_strong(&s->next_check, &due, now + RECHECK_MS))
        return;
    if (fstat(s->fd, &open_file_st) == 0 && stat(s->path, &at_path) == 0 &&
        at_path.st_dev == open_file_st.st_dev && at_path.st_ino == open_file_st.st_ino) {
        errno = saved;
        return;
    }
    if ((fd = open_file(s->path)) >= 0) {
        (void)dup2(fd, s->fd);
        close(fd);
    }
    errno = saved;
}

static int write_all(int fd, const char *buf, size_t len)
{
    ssize_t n;

    do {
        n = write(fd, buf, len);
    } while (n < 0 && errno == EINTR);
    if (n >= 0 && (size_t)n != len)
        errno = 0; /* short write */
    return n >= 0 && (size_t)n == len;
}

/* RFC 3164 as glibc's syslog(3) sends it to /dev/log: "<PRI>Mmm dd hh:mm:ss keyx[PID]: MSG". */
static int syslog_send(keyx_audit_sink *s, const char *line, size_t len, int ok)
{
    char dgram[1400];
    struct tm tm;
    time_t t = time(NULL);
    size_t head;
    ssize_t n;
    int h;

    if (len > 0 && line[len - 1] == '\n')
        len--;
    localtime_r(&t, &tm);
    h = snprintf(dgram, sizeof(dgram), "<%d>", AUTHPRIV | (ok ? SEV_INFO : SEV_WARNING));
    if (h < 0)
        return 0;
    head = (size_t)h;
    head += strftime(dgram + head, sizeof(dgram) - head, "%b %e %H:%M:%S ", &tm);
    h = snprintf(dgram + head, sizeof(dgram) - head, "keyx[%ld]: ", (long)getpid());
    if (h < 0)
        return 0;
    head += (size_t)h;
    if (len > sizeof(dgram) - head)
        len = sizeof(dgram) - head;
    memcpy(dgram + head, line, len);
    do {
        n = sendto(s->fd, dgram, head + len, MSG_NOSIGNAL, (struct sockaddr *)&s->addr,
                   (socklen_t)sizeof(s->addr));
    } while (n < 0 && errno == EINTR);
    return n >= 0;
}

int keyx_audit_sink_write(keyx_audit_sink *s, const char *line, size_t len, int ok)
{
    if (s->syslog)
        return syslog_send(s, line, len, ok);
    reopen_if_moved(s);
    return write_all(s->fd, line, len);
}
