/* Audit log (JSON lines, one write() per line) and the KEYX_DEBUG trace: one call per event feeds
 * both. */
#ifndef KEYX_PROVIDER_AUDIT_H
#define KEYX_PROVIDER_AUDIT_H

struct keyx_provctx;
typedef struct keyx_audit keyx_audit;

typedef struct keyx_event {
    const char *event;   /* keygen, load, derive, decrypt, sign, encrypt, encapsulate,
                            decapsulate, free, failover, error */
    const char *backend; /* "software", "tpm", "pkcs11"; NULL when none */
    const char *alg;     /* "EC", "X25519", "X448", "DH", "RSA"; NULL when none */
    const char *group;   /* "P-256", "ffdhe2048", ...; NULL when none */
    const char *key;     /* 16 hex digits of SHA-256 of the encoded public key; NULL when none */
    int ephemeral;       /* 1 or 0; -1 leaves the field out */
    int ok;
    const char *error; /* when !ok: what failed, never a secret */
    const char *next;  /* failover: the backend (or token) that serves instead; NULL otherwise */
} keyx_event;

/* Opens (creates, appends) the log at path, mode 0600. NULL with an error raised on failure. */
keyx_audit *keyx_audit_open(struct keyx_provctx *p, const char *path);
void keyx_audit_close(keyx_audit *a);
/* The log's path or "syslog at SOCKET" (provider/state.h). */
const char *keyx_audit_name(const keyx_audit *a);

/* Appends ev to the audit log when it is on, and traces it to stderr when debug is on. */
void keyx_event_emit(const struct keyx_provctx *p, const keyx_event *ev);

/* A free-form KEYX_DEBUG trace line ("keyx: ..." on stderr); no-op when debug is off. */
void keyx_debug(const struct keyx_provctx *p, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

#endif
