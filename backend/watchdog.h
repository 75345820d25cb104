/* A time limit on calls into a device reached over a socket (a network HSM's PKCS#11 module,
 * p11-kit's RPC client): such a module blocks in read() for as long as its server does not
 * answer, and has no timeout of its own. A call that takes longer than its limit has its
 * blocking socket cut (shutdown(2) on the socket its thread waits on): the module then fails the
 * call as if the server had died (CKR_DEVICE_ERROR), and the caller fails over or fails. One
 * watchdog thread per process, started at the first watched call, stopped when the last user
 * releases it. Linux only (it reads /proc/self/task/TID/syscall). */
#ifndef KEYX_BACKEND_WATCHDOG_H
#define KEYX_BACKEND_WATCHDOG_H

/* A user (a backend instance with a time limit) holds the watchdog; the last release stops and
 * joins its thread, before the code it runs can be unloaded. */
void keyx_watchdog_hold(void);
void keyx_watchdog_release(void);

/* Watches the calling thread for limit_ms from now. Returns a ticket for keyx_watchdog_end, -1
 * when not watched (limit 0, or more watched threads than the watchdog has room for). Nested
 * begins of one thread are one watch (the outer one). */
int keyx_watchdog_begin(unsigned int limit_ms);
/* Ends the watch. Returns how many times the call's socket was cut. */
int keyx_watchdog_end(int ticket);

/* After its time was up, the calling thread's call moves on to another device (the next token
 * of a failover set): that one gets the whole limit again. No-op for a call that was not cut. */
void keyx_watchdog_renew(void);

/* Whether the calling thread's current watched call had its socket cut (so its device error is
 * a timeout), and the limit it had. */
int keyx_watchdog_cut(unsigned int *limit_ms);

#endif
