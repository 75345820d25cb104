/* Fail closed: when keyx cannot serve as openssl.cnf configures it (a bad or unknown key, an audit
 * log it cannot open, a listed backend it cannot open), it still loads, so that OpenSSL does not
 * carry on with the default provider in its place, and refuses every operation with the reason. */
#ifndef KEYX_PROVIDER_FAIL_CLOSED_H
#define KEYX_PROVIDER_FAIL_CLOSED_H

struct keyx_provctx;

/* Called by init after a failure: keeps the reason raised last (keyx's own error detail) for the
 * refusals, prints it once on stderr, and takes init's errors off the application's queue
 * (init set a mark). */
void keyx_fail_closed_enter(struct keyx_provctx *p);

/* 1 with a KEYX_R_NOT_CONFIGURED error raised when keyx refuses to serve; 0 when it serves.
 * Every entry point that makes a key or an operation context asks first. */
int keyx_refused(const struct keyx_provctx *p);

#endif
