/* The watchdog of calls into socket-backed devices (see watchdog.h). */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1 /* gettid */
#endif

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "backend/watchdog.h"

#define SLOTS 128     /* threads watched at once */
#define RETRY_MS 100  /* a thread over its limit but not waiting on a socket: looked at again */
#define MAX_POLLED 16 /* sockets of one poll() that are cut */

typedef struct slot {
    int used;
    pid_t tid;
    unsigned int limit_ms;
    long long deadline_ms;
    int cuts;
} slot;

static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake;
    slot s[SLOTS];
    int holders;
    int running, stop;
    long long next_wake; /* when the watchdog wakes next (LLONG_MAX: when told) */
    pthread_t thread;
} W = {.lock = PTHREAD_MUTEX_INITIALIZER, .next_wake = LLONG_MAX};

static pthread_once_t once = PTHREAD_ONCE_INIT;

/* The calling thread's watch: nested begins are one watch. */
static _Thread_local struct {
    int depth;
    int ticket;
} self = {0, -1};

static long long now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void init_wake(void)
{
    pthread_condattr_t a;

    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC); /* deadlines do not move with the clock */
    pthread_cond_init(&W.wake, &a);
    pthread_condattr_destroy(&a);
}

/* fork(): the child has no watchdog thread and none of the other threads it watched. */
static void before_fork(void)
{
    pthread_mutex_lock(&W.lock);
}

static void after_fork_parent(void)
{
    pthread_mutex_unlock(&W.lock);
}

static void after_fork_child(void)
{
    /* The parent's watchdog was waiting on the condition variable: in the child its state still
     * counts that waiter, who does not exist here, and a signal would wait for it for ever. */
    init_wake();
    memset(W.s, 0, sizeof(W.s));
    W.running = 0;
    W.stop = 0;
    W.next_wake = LLONG_MAX;
    if (self.ticket >= 0 && self.depth > 0) { /* the forking thread keeps its watch */
        W.s[self.ticket].used = 1;
        W.s[self.ticket].tid = gettid();
        W.s[self.ticket].deadline_ms = LLONG_MAX;
    }
    pthread_mutex_unlock(&W.lock);
}

static void init_once(void)
{
    init_wake();
    pthread_atfork(before_fork, after_fork_parent, after_fork_child);
}

static int cut_socket(int fd)
{
    int type;
    socklen_t len = sizeof(type);

    /* A module's connection is a stream (unix, TCP, vsock); a datagram socket (syslog, where an
     * audit event may wait) is not one, and neither is anything that is not a socket. */
    if (fd < 0 || getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0 || type != SOCK_STREAM)
        return 0;
    return shutdown(fd, SHUT_RDWR) == 0;
}

/* Cuts the socket thread tid is blocked on, from the system call it is in: the I/O calls take
 * the descriptor first; poll() takes an array in this process's memory, which stays valid while
 * the thread waits in it. Returns the number of sockets cut (0: the thread is running, or waits
 * on something else). */
static int cut_thread(pid_t tid)
{
    char path[64], line[256];
    long nr;
    unsigned long a0, a1;
    ssize_t n;
    int fd, cut = 0;

    snprintf(path, sizeof(path), "/proc/self/task/%d/syscall", (int)tid);
    if ((fd = open(path, O_RDONLY | O_CLOEXEC)) < 0)
        return 0;
    n = read(fd, line, sizeof(line) - 1);
    close(fd);
    if (n <= 0)
        return 0;
    line[n] = '\0';
    if (sscanf(line, "%ld %lx %lx", &nr, &a0, &a1) != 3) /* "running" */
        return 0;
    switch (nr) {
    case SYS_read:
    case SYS_write:
    case SYS_readv:
    case SYS_writev:
    case SYS_recvfrom:
    case SYS_sendto:
    case SYS_recvmsg:
    case SYS_sendmsg:
    case SYS_connect:
        return cut_socket((int)a0);
#ifdef SYS_poll
    case SYS_poll:
#endif
    case SYS_ppoll: {
        const struct pollfd *fds = (const struct pollfd *)a0;

        for (unsigned long i = 0; i < a1 && i < MAX_POLLED; i++)
            cut += cut_socket(fds[i].fd);
        return cut;
    }
    default:
        return 0;
    }
}

static void *watch(void *unused)
{
    (void)unused;
    pthread_mutex_lock(&W.lock);
    while (!W.stop) {
        long long now = now_ms(), next = LLONG_MAX;

        for (int i = 0; i < SLOTS; i++) {
            slot *s = &W.s[i];

            if (!s->used)
                continue;
            if (s->deadline_ms <= now) {
                /* The call's time is up: whatever else it waits on is cut too, until it ends
                 * or moves on to another device (keyx_watchdog_renew). */
                s->cuts += cut_thread(s->tid) > 0;
                s->deadline_ms = now + RETRY_MS;
            }
            if (s->deadline_ms < next)
                next = s->deadline_ms;
        }
        W.next_wake = next;
        if (next == LLONG_MAX) {
            pthread_cond_wait(&W.wake, &W.lock);
        } else {
            struct timespec ts = {(time_t)(next / 1000), (long)(next % 1000) * 1000000L};

            pthread_cond_timedwait(&W.wake, &W.lock, &ts);
        }
    }
    pthread_mutex_unlock(&W.lock);
    return NULL;
}

void keyx_watchdog_hold(void)
{
    pthread_once(&once, init_once);
    pthread_mutex_lock(&W.lock);
    W.holders++;
    pthread_mutex_unlock(&W.lock);
}

void keyx_watchdog_release(void)
{
    int join = 0;

    pthread_mutex_lock(&W.lock);
    if (W.holders > 0 && --W.holders == 0 && W.running) {
        W.stop = 1;
        pthread_cond_signal(&W.wake);
        join = 1;
    }
    pthread_mutex_unlock(&W.lock);
    if (join) {
        pthread_join(W.thread, NULL);
        pthread_mutex_lock(&W.lock);
        W.running = 0;
        W.stop = 0;
        W.next_wake = LLONG_MAX;
        pthread_mutex_unlock(&W.lock);
    }
}

int keyx_watchdog_begin(unsigned int limit_ms)
{
    int ticket = -1;

    if (self.depth++ > 0 || limit_ms == 0)
        return -1;
    pthread_mutex_lock(&W.lock);
    if (W.holders > 0 && !W.running && !W.stop) {
        sigset_t all, old;

        /* the watchdog takes no signal meant for the application's threads */
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        W.running = pthread_create(&W.thread, NULL, watch, NULL) == 0;
        pthread_sigmask(SIG_SETMASK, &old, NULL);
    }
    for (int i = 0; W.running && i < SLOTS; i++)
        if (!W.s[i].used) {
            W.s[i] = (slot){1, gettid(), limit_ms, now_ms() + limit_ms, 0};
            ticket = i;
            /* Woken only for a deadline before the one it sleeps until: with one limit for all
             * calls that is the first call after an idle spell, not every call. */
            if (W.s[i].deadline_ms < W.next_wake)
                pthread_cond_signal(&W.wake);
            break;
        }
    pthread_mutex_unlock(&W.lock);
    self.ticket = ticket;
    return ticket;
}

int keyx_watchdog_end(int ticket)
{
    int cuts = 0;

    if (self.depth > 0)
        self.depth--;
    if (ticket < 0 || ticket >= SLOTS)
        return 0;
    pthread_mutex_lock(&W.lock);
    cuts = W.s[ticket].cuts;
    memset(&W.s[ticket], 0, sizeof(W.s[ticket]));
    pthread_mutex_unlock(&W.lock);
    self.ticket = -1;
    return cuts;
}

void keyx_watchdog_renew(void)
{
    if (self.ticket < 0)
        return;
    pthread_mutex_lock(&W.lock);
    if (W.s[self.ticket].used && W.s[self.ticket].cuts > 0)
        W.s[self.ticket].deadline_ms = now_ms() + W.s[self.ticket].limit_ms;
    pthread_mutex_unlock(&W.lock);
}

int keyx_watchdog_cut(unsigned int *limit_ms)
{
    int cuts = 0;

    if (self.ticket < 0)
        return 0;
    pthread_mutex_lock(&W.lock);
    if (W.s[self.ticket].used && W.s[self.ticket].tid == gettid()) {
        cuts = W.s[self.ticket].cuts;
        if (limit_ms != NULL)
            *limit_ms = W.s[self.ticket].limit_ms;
    }
    pthread_mutex_unlock(&W.lock);
    return cuts;
}
