/* keyx-bench: TPM commands per operation, counted on the wire (see keyx-bench.c, --count-tpm).
 *
 * keyx talks to swtpm on its own socket, so nothing in this process can wrap its calls the way
 * the Cryptoki rows are counted. Instead a loopback proxy stands between every TPM user of the
 * process (keyx's context and the raw ESYS contexts) and swtpm: it relays each command and its
 * response unchanged and counts the command codes it sees. The count is the TPM's view, made
 * independently of the code that is counted. The proxy adds one hop per command, so a run that
 * counts is not timed. */
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "bench.h"

#define CC_BASE 0x100u /* TPM2_CC_FIRST is 0x11F; the codes of TPM 2.0 1.59 end below 0x200 */
#define CC_SLOTS 0x100u
#define TPM_HEADER 10
#define TPM_MAX_MSG 4096

static unsigned long counts[CC_SLOTS + 1]; /* last slot: codes outside the table */
_Static_assert(CC_SLOTS + 1 == TPM_COUNT_SLOTS, "bench.h's slot count");
/* swtpm's TPM port and, one above it, its control port (tpm2-tss's swtpm TCTI sets the
 * locality there when it starts): the proxy listens on two such ports too. */
static struct sockaddr_storage target[2];
static socklen_t target_len;

static const struct {
    unsigned cc;
    const char *name;
} NAMES[] = {
    {0x131, "CreatePrimary"},  {0x153, "Create"},           {0x154, "ECDH_ZGen"},
    {0x157, "Load"},           {0x159, "RSA_Decrypt"},      {0x15D, "Sign"},
    {0x161, "ContextLoad"},    {0x162, "ContextSave"},      {0x165, "FlushContext"},
    {0x173, "ReadPublic"},     {0x176, "StartAuthSession"}, {0x17A, "GetCapability"},
    {0x17B, "GetRandom"},      {0x18A, "TestParms"},        {0x191, "CreateLoaded"},
    {0x163, "ECDH_KeyGen"},    {0x177, "VerifySignature"},  {0x144, "Startup"},
    {0x178, "ECC_Parameters"},
};

const char *tpm_count_name(unsigned cc, char *buf, size_t n)
{
    for (size_t i = 0; i < sizeof(NAMES) / sizeof(NAMES[0]); i++)
        if (NAMES[i].cc == cc)
            return NAMES[i].name;
    snprintf(buf, n, "0x%03X", cc);
    return buf;
}

/* All n bytes read into p (writing: 0) or written from p (1); 0 on EOF or error. */
static int io_full(int fd, uint8_t *p, size_t n, int writing)
{
    while (n > 0) {
        ssize_t r = writing ? write(fd, p, n) : read(fd, p, n);

        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return 0;
        p += r;
        n -= (size_t)r;
    }
    return 1;
}

/* One TPM message (header, then the size it states) from in to out; *cc: bytes 6..9. */
static int relay(int in, int out, uint32_t *cc)
{
    uint8_t msg[TPM_MAX_MSG];
    uint32_t size;

    if (!io_full(in, msg, TPM_HEADER, 0))
        return 0;
    size = (uint32_t)msg[2] << 24 | (uint32_t)msg[3] << 16 | (uint32_t)msg[4] << 8 | msg[5];
    if (size < TPM_HEADER || size > sizeof(msg) ||
        !io_full(in, msg + TPM_HEADER, size - TPM_HEADER, 0))
        return 0;
    if (cc != NULL)
        *cc = (uint32_t)msg[6] << 24 | (uint32_t)msg[7] << 16 | (uint32_t)msg[8] << 8 | msg[9];
    return io_full(out, msg, size, 1);
}

/* A control connection: bytes copied both ways, uncounted, until either side closes. */
static void pipe_both(int a, int b)
{
    struct pollfd fds[2] = {{.fd = a, .events = POLLIN}, {.fd = b, .events = POLLIN}};
    uint8_t buf[TPM_MAX_MSG];

    while (poll(fds, 2, -1) > 0)
        for (int i = 0; i < 2; i++)
            if (fds[i].revents != 0) {
                ssize_t r = read(fds[i].fd, buf, sizeof(buf));

                if (r <= 0 || !io_full(fds[1 - i].fd, buf, (size_t)r, 1))
                    return;
            }
}

/* One client connection: commands relayed to swtpm, responses back, until either side closes
 * (keyx and tpm2-tss's swtpm TCTI connect per command). */
static void *serve(void *arg)
{
    int client = (int)((intptr_t)arg >> 1), ctrl = (int)((intptr_t)arg & 1);
    int server = socket(target[ctrl].ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    uint32_t cc;

    if (server < 0 || connect(server, (struct sockaddr *)&target[ctrl], target_len) != 0)
        ;
    else if (ctrl)
        pipe_both(client, server);
    else
        while (relay(client, server, &cc)) {
            unsigned slot = cc >= CC_BASE && cc < CC_BASE + CC_SLOTS ? cc - CC_BASE : CC_SLOTS;

            __atomic_fetch_add(&counts[slot], 1, __ATOMIC_RELAXED);
            if (!relay(server, client, NULL))
                break;
        }
    if (server >= 0)
        close(server);
    close(client);
    return NULL;
}

/* arg: the listening socket << 1 | 1 for the control port. */
static void *accept_loop(void *arg)
{
    int fd = (int)((intptr_t)arg >> 1), ctrl = (int)((intptr_t)arg & 1);

    for (;;) {
        int c = accept4(fd, NULL, NULL, SOCK_CLOEXEC);
        pthread_t t;

        if (c < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            return NULL;
        }
        if (pthread_create(&t, NULL, serve, (void *)((intptr_t)c << 1 | ctrl)) != 0)
            close(c);
        else
            pthread_detach(t);
    }
}

/* "swtpm:host=H,port=P" (either may be left out: localhost, 2321, as tpm2-tss's swtpm TCTI). */
static int parse_swtpm(const char *tcti, char *host, size_t hn, char *port, size_t pn)
{
    const char *p;

    snprintf(host, hn, "localhost");
    snprintf(port, pn, "2321");
    if (strncmp(tcti, "swtpm", 5) != 0 || (tcti[5] != '\0' && tcti[5] != ':'))
        return 0;
    for (p = tcti[5] == ':' ? tcti + 6 : tcti + 5; *p != '\0';) {
        size_t len = strcspn(p, ",");

        if (strncmp(p, "host=", 5) == 0 && len - 5 < hn)
            snprintf(host, hn, "%.*s", (int)(len - 5), p + 5);
        else if (strncmp(p, "port=", 5) == 0 && len - 5 < pn)
            snprintf(port, pn, "%.*s", (int)(len - 5), p + 5);
        else
            return 0;
        p += len + (p[len] == ',');
    }
    return 1;
}

/* Two listening sockets on consecutive loopback ports (TPM, control) into fd; the first port.
 * The ports are picked below the ephemeral range (as scripts/bench.sh picks swtpm's): after a
 * benchmark run most ephemeral ports are in TIME_WAIT (every TPM command is a connection, closed
 * by the client), and a port in TIME_WAIT cannot be bound even with SO_REUSEADDR. */
static unsigned listen_pair(int fd[2])
{
    unsigned seed = (unsigned)getpid();

    for (int attempt = 0; attempt < 200; attempt++) {
        unsigned port = 10000 + (unsigned)(rand_r(&seed) % 22000);
        int ok = 1;

        for (int i = 0; i < 2; i++) {
            struct sockaddr_in a = {.sin_family = AF_INET,
                                    .sin_port = htons((uint16_t)(port + (unsigned)i)),
                                    .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};

            fd[i] = ok ? socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0) : -1;
            ok = fd[i] >= 0 && bind(fd[i], (struct sockaddr *)&a, sizeof(a)) == 0 &&
                 listen(fd[i], 8) == 0;
        }
        if (ok)
            return port;
        for (int i = 0; i < 2; i++)
            if (fd[i] >= 0)
                close(fd[i]);
    }
    return 0;
}

int tpm_count_start(const char *tcti, char *proxied, size_t n)
{
    char host[256], port[16], ctrl[24];
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *ai = NULL, *ai_ctrl = NULL;
    int fd[2];
    unsigned self;
    pthread_t t;

    if (!parse_swtpm(tcti, host, sizeof(host), port, sizeof(port))) {
        fprintf(stderr,
                "keyx-bench: --count-tpm counts on swtpm's socket: --tpm-tcti must be "
                "swtpm:host=H,port=P, not '%s'\n",
                tcti);
        return -1;
    }
    snprintf(ctrl, sizeof(ctrl), "%ld", strtol(port, NULL, 10) + 1);
    if (getaddrinfo(host, port, &hints, &ai) != 0 ||
        getaddrinfo(host, ctrl, &hints, &ai_ctrl) != 0 || ai->ai_addrlen > sizeof(target[0]) ||
        ai_ctrl->ai_addrlen != ai->ai_addrlen) {
        fprintf(stderr, "keyx-bench: --count-tpm: cannot resolve %s port %s\n", host, port);
        if (ai != NULL)
            freeaddrinfo(ai);
        return 0;
    }
    memcpy(&target[0], ai->ai_addr, ai->ai_addrlen);
    memcpy(&target[1], ai_ctrl->ai_addr, ai_ctrl->ai_addrlen);
    target_len = ai->ai_addrlen;
    freeaddrinfo(ai);
    freeaddrinfo(ai_ctrl);
    if ((self = listen_pair(fd)) == 0) {
        fprintf(stderr, "keyx-bench: --count-tpm: no two consecutive free loopback ports\n");
        return 0;
    }
    for (int i = 0; i < 2; i++) {
        if (pthread_create(&t, NULL, accept_loop, (void *)((intptr_t)fd[i] << 1 | i)) != 0) {
            fprintf(stderr, "keyx-bench: --count-tpm: cannot start the proxy: %s\n",
                    strerror(errno));
            return 0;
        }
        pthread_detach(t);
    }
    snprintf(proxied, n, "swtpm:host=127.0.0.1,port=%u", self);
    return 1;
}

void tpm_count_read(unsigned long out[TPM_COUNT_SLOTS], int reset)
{
    for (unsigned i = 0; i < TPM_COUNT_SLOTS; i++)
        out[i] = reset ? __atomic_exchange_n(&counts[i], 0, __ATOMIC_RELAXED)
                       : __atomic_load_n(&counts[i], __ATOMIC_RELAXED);
}

unsigned tpm_count_cc(unsigned slot)
{
    return slot < CC_SLOTS ? CC_BASE + slot : 0;
}
