/* Audit log and KEYX_DEBUG trace. Each event is formatted in a fixed stack buffer and written with
 * one write(): O_APPEND makes every line land whole, even from several threads or forked
 * processes. No locks and no shared mutable state but the once-only write-failure warning. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1 /* O_CLOEXEC, strerror_r (GNU), gmtime_r, clock_gettime */
#endif

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "provider/audit.h"
#include "provider/audit_sink.h"
#include "provider/errors.h"
#include "provider/provctx.h"

struct keyx_audit {
    keyx_audit_sink *sink; /* a file or syslog (audit_sink.h) */
};

#define LINE_BYTES 1024 /* one audit line or trace line, newline included */
#define FIELD_BYTES 64  /* escaped bytes of any field but `error` (names and ids are short) */

static atomic_int write_warned;

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

/* One write() of the whole line, retried on EINTR only. 1 when all of it was written. */
static int write_line(int fd, const char *buf, size_t len)
{
    ssize_t n;

    do {
        n = write(fd, buf, len);
    } while (n < 0 && errno == EINTR);
    return n >= 0 && (size_t)n == len;
}

/* ---- bounded output ----------------------------------------------------------------------- */

typedef struct outbuf {
    char b[LINE_BYTES];
    size_t len;
} outbuf;

/* Appends what fits; callers size their budgets so that nothing is ever cut here. */
static void put(outbuf *o, const char *s, size_t n)
{
    if (n > sizeof(o->b) - o->len)
        n = sizeof(o->b) - o->len;
    memcpy(o->b + o->len, s, n);
    o->len += n;
}

static void puts_(outbuf *o, const char *s)
{
    put(o, s, strlen(s));
}

/* Length of the well-formed UTF-8 sequence at s (s[0] >= 0x80), 0 if ill-formed (RFC 3629). */
static size_t utf8_len(const unsigned char *s)
{
    unsigned char c = s[0], lo = 0x80, hi = 0xBF;

    if (c >= 0xC2 && c <= 0xDF)
        return (s[1] & 0xC0) == 0x80 ? 2 : 0;
    if (c >= 0xE0 && c <= 0xEF) {
        if (c == 0xE0)
            lo = 0xA0;
        else if (c == 0xED)
            hi = 0x9F; /* no surrogates */
        return (s[1] >= lo && s[1] <= hi && (s[2] & 0xC0) == 0x80) ? 3 : 0;
    }
    if (c >= 0xF0 && c <= 0xF4) {
        if (c == 0xF0)
            lo = 0x90;
        else if (c == 0xF4)
            hi = 0x8F;
        return (s[1] >= lo && s[1] <= hi && (s[2] & 0xC0) == 0x80 && (s[3] & 0xC0) == 0x80) ? 4 : 0;
    }
    return 0;
}

enum esc_mode { ESC_JSON, ESC_TEXT };

/* Escaped form of the character at s into unit[] (at most 6 bytes); returns the bytes of s used.
 * JSON: \" \\ and \u00XX for control characters, \ufffd for ill-formed UTF-8.
 * TEXT (stderr trace): \xNN for control characters and ill-formed UTF-8. */
static size_t esc_unit(enum esc_mode mode, const char *s, char unit[6], size_t *ulen)
{
    static const char hex[] = "0123456789abcdef";
    unsigned char c = (unsigned char)s[0];
    size_t n;

    if (c >= 0x80 && (n = utf8_len((const unsigned char *)s)) > 0) {
        memcpy(unit, s, n);
        *ulen = n;
        return n;
    }
    if (mode == ESC_JSON) {
        if (c >= 0x80) {
            memcpy(unit, "\\ufffd", 6);
            *ulen = 6;
        } else if (c < 0x20 || c == 0x7f) {
            memcpy(unit, "\\u00", 4);
            unit[4] = hex[c >> 4];
            unit[5] = hex[c & 15];
            *ulen = 6;
        } else if (c == '"' || c == '\\') {
            unit[0] = '\\';
            unit[1] = (char)c;
            *ulen = 2;
        } else {
            unit[0] = (char)c;
            *ulen = 1;
        }
    } else if (c < 0x20 || c >= 0x7f) {
        unit[0] = '\\';
        unit[1] = 'x';
        unit[2] = hex[c >> 4];
        unit[3] = hex[c & 15];
        *ulen = 4;
    } else {
        unit[0] = (char)c;
        *ulen = 1;
    }
    return 1;
}

/* Appends s escaped, at most budget bytes (budget >= 3); a longer string is cut at a character
 * boundary and ends with "...". */
static void put_escaped(outbuf *o, enum esc_mode mode, const char *s, size_t budget)
{
    char unit[6];
    size_t total = 0, ulen, used;
    const char *q;

    for (q = s; *q != '\0'; q += used) {
        used = esc_unit(mode, q, unit, &ulen);
        total += ulen;
    }
    if (total <= budget) {
        for (q = s; *q != '\0'; q += used) {
            used = esc_unit(mode, q, unit, &ulen);
            put(o, unit, ulen);
        }
        return;
    }
    total = 0;
    for (q = s; *q != '\0'; q += used) {
        used = esc_unit(mode, q, unit, &ulen);
        if (total + ulen > budget - 3)
            break;
        put(o, unit, ulen);
        total += ulen;
    }
    put(o, "...", 3);
}

static void put_json_field(outbuf *o, const char *name, const char *value, size_t budget)
{
    if (value == NULL)
        return;
    puts_(o, ",\"");
    puts_(o, name);
    puts_(o, "\":\"");
    put_escaped(o, ESC_JSON, value, budget);
    puts_(o, "\"");
}

static void put_text_field(outbuf *o, const char *name, const char *value)
{
    if (value == NULL)
        return;
    puts_(o, " ");
    puts_(o, name);
    puts_(o, "=");
    put_escaped(o, ESC_TEXT, value, FIELD_BYTES);
}

/* ---- audit log ---------------------------------------------------------------------------- */

keyx_audit *keyx_audit_open(struct keyx_provctx *p, const char *path)
{
    keyx_audit *a;
    keyx_audit_sink *sink = keyx_audit_sink_open(p, path);

    if (sink == NULL)
        return NULL;
    if ((a = OPENSSL_zalloc(sizeof(*a))) == NULL) {
        keyx_audit_sink_close(sink);
        KEYX_ERR(p, KEYX_R_INTERNAL, "out of memory opening audit log \"%s\"", path);
        return NULL;
    }
    a->sink = sink;
    return a;
}

void keyx_audit_close(keyx_audit *a)
{
    if (a == NULL)
        return;
    keyx_audit_sink_close(a->sink);
    OPENSSL_free(a);
}

const char *keyx_audit_name(const keyx_audit *a)
{
    return keyx_audit_sink_name(a->sink);
}

static void audit_write(const keyx_audit *a, const keyx_event *ev)
{
    outbuf o;
    struct timespec now;
    struct tm tm;
    char head[96];
    size_t budget;
    int n;

    o.len = 0;
    memset(&tm, 0, sizeof(tm));
    if (clock_gettime(CLOCK_REALTIME, &now) != 0) {
        now.tv_sec = 0;
        now.tv_nsec = 0;
    }
    gmtime_r(&now.tv_sec, &tm);
    n = snprintf(head, sizeof(head), "{\"ts\":\"%04d-%02d-%02dT%02d:%02d:%02d.%03dZ\",\"pid\":%ld",
                 tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                 (int)(now.tv_nsec / 1000000), (long)getpid());
    if (n < 0 || (size_t)n >= sizeof(head))
        return;
    put(&o, head, (size_t)n);
    /* At most ~96 + 6 * (12 + FIELD_BYTES) + 36 bytes so far: error gets the rest (> 500). */
    put_json_field(&o, "event", ev->event, FIELD_BYTES);
    put_json_field(&o, "backend", ev->backend, FIELD_BYTES);
    put_json_field(&o, "alg", ev->alg, FIELD_BYTES);
    put_json_field(&o, "group", ev->group, FIELD_BYTES);
    put_json_field(&o, "key", ev->key, FIELD_BYTES);
    put_json_field(&o, "next", ev->next, FIELD_BYTES);
    if (ev->ephemeral != -1)
        puts_(&o, ev->ephemeral ? ",\"ephemeral\":true" : ",\"ephemeral\":false");
    puts_(&o, ev->ok ? ",\"ok\":true" : ",\"ok\":false");
    if (!ev->ok && ev->error != NULL) {
        /* room for ,"error":" before and "}\n after */
        budget = sizeof(o.b) - o.len - strlen(",\"error\":\"") - strlen("\"}\n");
        put_json_field(&o, "error", ev->error, budget);
    }
    puts_(&o, "}\n");

    if (!keyx_audit_sink_write(a->sink, o.b, o.len, ev->ok) && !atomic_exchange(&write_warned, 1)) {
        char line[LINE_BYTES], ebuf[128];
        int err = errno;

        n = snprintf(line, sizeof(line),
                     "keyx: warning: cannot write audit log \"%s\": %s (further audit write "
                     "failures are not reported)\n",
                     keyx_audit_sink_name(a->sink),
                     err != 0 ? errstr(err, ebuf, sizeof(ebuf)) : "short write");
        if (n > 0)
            write_line(STDERR_FILENO, line, (size_t)n < sizeof(line) ? (size_t)n : sizeof(line));
    }
}

static void trace_event(const keyx_event *ev)
{
    outbuf o;
    char eph[16];

    o.len = 0;
    puts_(&o, "keyx:");
    if (ev->event != NULL) {
        puts_(&o, " ");
        put_escaped(&o, ESC_TEXT, ev->event, FIELD_BYTES);
    }
    put_text_field(&o, "backend", ev->backend);
    put_text_field(&o, "alg", ev->alg);
    put_text_field(&o, "group", ev->group);
    put_text_field(&o, "key", ev->key);
    put_text_field(&o, "next", ev->next);
    if (ev->ephemeral != -1) {
        snprintf(eph, sizeof(eph), " ephemeral=%d", ev->ephemeral ? 1 : 0);
        puts_(&o, eph);
    }
    if (ev->ok) {
        puts_(&o, " ok");
    } else if (ev->error == NULL) {
        puts_(&o, " failed");
    } else {
        puts_(&o, " failed: ");
        put_escaped(&o, ESC_TEXT, ev->error, sizeof(o.b) - o.len - 1);
    }
    puts_(&o, "\n");
    write_line(STDERR_FILENO, o.b, o.len);
}

void keyx_event_emit(const struct keyx_provctx *p, const keyx_event *ev)
{
    int saved = errno; /* emitted on success paths too: leave the caller's errno alone */

    if (p == NULL || ev == NULL)
        return;
    if (p->audit != NULL)
        audit_write(p->audit, ev);
    if (p->cfg.debug)
        trace_event(ev);
    errno = saved;
}

void keyx_debug(const struct keyx_provctx *p, const char *fmt, ...)
{
    char line[LINE_BYTES];
    const size_t pre = 6; /* "keyx: " */
    size_t len;
    va_list ap;
    int n, saved;

    if (p == NULL || !p->cfg.debug || fmt == NULL)
        return;
    saved = errno;
    memcpy(line, "keyx: ", pre);
    va_start(ap, fmt);
    n = vsnprintf(line + pre, sizeof(line) - pre, fmt, ap);
    va_end(ap);
    if (n >= 0) {
        len = pre + (size_t)n;
        if (len > sizeof(line) - 1) {
            /* cut: end with "..." and the newline */
            len = sizeof(line) - 4;
            memcpy(line + len, "...", 3);
            len += 3;
        }
        while (len > pre && line[len - 1] == '\n')
            len--;
        line[len++] = '\n';
        write_line(STDERR_FILENO, line, len);
    }
    errno = saved;
}
