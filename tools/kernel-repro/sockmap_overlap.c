// SPDX-License-Identifier: GPL-2.0
/*
 * sockmap_overlap.c - a sockmap stream_verdict redirect forwards bytes twice
 * when the receive queue holds an skb whose head was already consumed.
 *
 * For a TCP socket in a SOCKMAP with a stream_verdict program (and no stream
 * parser), received data goes sk_psock_verdict_data_ready() -> tcp_read_skb()
 * -> sk_psock_verdict_recv(), which hands every queued skb to the program
 * whole. TCP queues some skbs untrimmed: tcp_data_queue() keeps a segment with
 * seq < rcv_nxt < end_seq as is ("partial packet"), and tcp_recvmsg() skips its
 * old head with copied_seq - TCP_SKB_CB(skb)->seq. tcp_read_skb() does not, so
 * a redirect sends the old head to the destination a second time.
 *
 * Setup, all on 127.0.0.1: connections A<->B and C<->D; a SOCKMAP holds
 * C (key 0) and B (key 1); the verdict program redirects every skb to the
 * egress of map[0], so whatever A sends to B comes out of C and is read on D.
 * A sends FIRST bytes; then a raw socket injects, on A's behalf, one segment
 * that repeats A's last REPEATED bytes and carries the next FRESH bytes;
 * then A sends the rest normally, which again overlaps the FRESH bytes B has.
 * D must receive A's stream exactly once. A control run reads B directly
 * (no sockmap) to show that the injected segment itself is fine.
 *
 * Build: gcc -O2 -Wall -o sockmap_overlap sockmap_overlap.c
 * Run as root (TCP_REPAIR, raw socket, BPF): sudo ./sockmap_overlap
 * Exit: 0 not affected, 1 affected, 2 setup error.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/bpf.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

enum { FIRST = 3000, REPEATED = 1200, FRESH = 700, SECOND = 2500 };
enum { TOTAL = FIRST + SECOND, CAP = 4 * TOTAL };
#define WAIT_MS 5000  /* bound for every wait */
#define QUIET_MS 300  /* "no more bytes" after this long */

/* Every fd we open, closed at exit on every path. */
static int fds[16];
static int nfds;

static void close_all(void)
{
	while (nfds > 0)
		close(fds[--nfds]);
}

static int track(int fd)
{
	if (fd >= 0 && nfds < (int)(sizeof(fds) / sizeof(fds[0])))
		fds[nfds++] = fd;
	return fd;
}

static void untrack_close(int fd)
{
	for (int i = 0; i < nfds; i++)
		if (fds[i] == fd) {
			fds[i] = fds[--nfds];
			break;
		}
	close(fd);
}

/* Setup errors: message (with errno) and exit 2. */
static void fail(const char *fmt, ...)
{
	int err = errno;
	va_list ap;

	fprintf(stderr, "setup error: ");
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	if (err)
		fprintf(stderr, ": %s", strerror(err));
	fputc('\n', stderr);
	exit(2);
}

/* Byte i names its own offset (mod 252), so a repeat shows where it is. */
static char pattern(size_t i)
{
	return "0123456789abcdefghijklmnopqrstuvwxyz"[(i / 7) % 36];
}

static long now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000L + ts.tv_nsec / 1000000;
}

/* A connected pair on 127.0.0.1: *client connect()ed, *server accept()ed. */
static void tcp_pair(int *client, int *server)
{
	struct sockaddr_in addr = { .sin_family = AF_INET,
				    .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t len = sizeof(addr);
	int lfd = track(socket(AF_INET, SOCK_STREAM, 0));

	if (lfd < 0)
		fail("socket");
	if (bind(lfd, (struct sockaddr *)&addr, sizeof(addr)) ||
	    getsockname(lfd, (struct sockaddr *)&addr, &len) || listen(lfd, 1))
		fail("bind/listen");
	*client = track(socket(AF_INET, SOCK_STREAM, 0));
	if (*client < 0 || connect(*client, (struct sockaddr *)&addr, sizeof(addr)))
		fail("connect");
	*server = track(accept(lfd, NULL, NULL)); /* loopback: already queued */
	if (*server < 0)
		fail("accept");
	untrack_close(lfd);
}

static void send_all(int fd, size_t from, size_t len)
{
	char buf[TOTAL];

	for (size_t i = 0; i < len; i++)
		buf[i] = pattern(from + i);
	for (size_t off = 0; off < len;) {
		ssize_t n = send(fd, buf + off, len - off, 0);
		if (n <= 0)
			fail("send");
		off += n;
	}
}

/*
 * Reads fd into buf until *have >= min; then, if quiet_ms > 0, goes on until
 * nothing arrives for quiet_ms. Never longer than WAIT_MS in all.
 */
static void read_stream(int fd, char *buf, size_t *have, size_t min, int quiet_ms)
{
	long deadline = now_ms() + WAIT_MS;

	for (;;) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		long left = deadline - now_ms();
		int timeout = *have >= min ? quiet_ms : (int)left;
		ssize_t n;

		if (left <= 0 || (*have >= min && quiet_ms == 0))
			return;
		if (timeout > left)
			timeout = left;
		if (poll(&p, 1, timeout) < 0)
			fail("poll");
		if (!(p.revents & (POLLIN | POLLHUP | POLLERR)))
			return; /* timed out */
		n = recv(fd, buf + *have, CAP - *have, 0);
		if (n < 0)
			fail("recv");
		if (n == 0)
			return; /* peer closed */
		*have += n;
		if (*have == CAP)
			return;
	}
}

/* ---- A's sequence numbers, via TCP_REPAIR (needs CAP_NET_ADMIN) ---- */

static void set_tcp(int fd, int opt, int val, const char *what)
{
	if (setsockopt(fd, IPPROTO_TCP, opt, &val, sizeof(val)))
		fail("setsockopt %s", what);
}

static uint32_t get_tcp(int fd, int opt, const char *what)
{
	uint32_t val = 0;
	socklen_t len = sizeof(val);

	if (getsockopt(fd, IPPROTO_TCP, opt, &val, &len))
		fail("getsockopt %s", what);
	return val;
}

static void seq_state(int fd, uint32_t *snd_nxt, uint32_t *rcv_nxt, uint32_t *tsval)
{
	set_tcp(fd, TCP_REPAIR, TCP_REPAIR_ON, "TCP_REPAIR (run as root)");
	set_tcp(fd, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE, "TCP_REPAIR_QUEUE");
	*snd_nxt = get_tcp(fd, TCP_QUEUE_SEQ, "TCP_QUEUE_SEQ send");
	set_tcp(fd, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE, "TCP_REPAIR_QUEUE");
	*rcv_nxt = get_tcp(fd, TCP_QUEUE_SEQ, "TCP_QUEUE_SEQ recv");
	*tsval = get_tcp(fd, TCP_TIMESTAMP, "TCP_TIMESTAMP"); /* passes PAWS at B */
	/* Leave repair mode without sending a window probe. */
	set_tcp(fd, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP, "TCP_REPAIR off");
}

/* ---- one hand-made segment through a raw socket ---- */

/* RFC 1071 checksum of a..a+alen followed by b..b+blen (alen even). */
static uint16_t csum2(const uint8_t *a, size_t alen, const uint8_t *b, size_t blen)
{
	uint32_t sum = 0;

	for (size_t i = 0; i + 1 < alen; i += 2)
		sum += (a[i] << 8) | a[i + 1];
	for (size_t i = 0; i < blen; i += 2)
		sum += (b[i] << 8) | (i + 1 < blen ? b[i + 1] : 0);
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return htons(~sum);
}

/*
 * From A to B: seq = snd_nxt - REPEATED, ACK|PSH, NOP NOP TS(tsval, 0),
 * payload = A's last REPEATED bytes + the FRESH bytes A will send next.
 * B's rcv_nxt == A's snd_nxt, so B sees seq < rcv_nxt < end_seq and queues
 * the skb whole (tcp_data_queue "partial packet").
 */
static void send_overlap(int a)
{
	enum { IPH = 20, TCPH = 32, PAY = REPEATED + FRESH };
	uint8_t pkt[IPH + TCPH + PAY] = { 0 }, *ip = pkt, *tcp = pkt + IPH;
	struct sockaddr_in src, dst;
	socklen_t len = sizeof(src);
	uint32_t snd_nxt, rcv_nxt, tsval, v;
	uint16_t s;
	uint8_t pseudo[12];
	int raw;

	if (getsockname(a, (struct sockaddr *)&src, &len))
		fail("getsockname");
	len = sizeof(dst);
	if (getpeername(a, (struct sockaddr *)&dst, &len))
		fail("getpeername");
	seq_state(a, &snd_nxt, &rcv_nxt, &tsval);

	memcpy(tcp + 0, &src.sin_port, 2);
	memcpy(tcp + 2, &dst.sin_port, 2);
	v = htonl(snd_nxt - REPEATED); memcpy(tcp + 4, &v, 4);
	v = htonl(rcv_nxt); memcpy(tcp + 8, &v, 4);
	tcp[12] = (TCPH / 4) << 4;
	tcp[13] = 0x18; /* ACK | PSH */
	tcp[14] = tcp[15] = 0xff; /* window */
	tcp[20] = tcp[21] = 1; /* NOP NOP */
	tcp[22] = 8; tcp[23] = 10; /* timestamps: TSval, TSecr 0 */
	v = htonl(tsval); memcpy(tcp + 24, &v, 4);
	for (size_t i = 0; i < PAY; i++)
		tcp[TCPH + i] = pattern(FIRST - REPEATED + i);
	memcpy(pseudo, &src.sin_addr, 4);
	memcpy(pseudo + 4, &dst.sin_addr, 4);
	pseudo[8] = 0; pseudo[9] = IPPROTO_TCP;
	s = htons(TCPH + PAY); memcpy(pseudo + 10, &s, 2);
	s = csum2(pseudo, sizeof(pseudo), tcp, TCPH + PAY); memcpy(tcp + 16, &s, 2);

	ip[0] = 0x45;
	s = htons(sizeof(pkt)); memcpy(ip + 2, &s, 2);
	ip[6] = 0x40; /* DF; id 0 is filled in by the kernel */
	ip[8] = 64; ip[9] = IPPROTO_TCP;
	memcpy(ip + 12, &src.sin_addr, 4);
	memcpy(ip + 16, &dst.sin_addr, 4);
	s = csum2(ip, IPH, NULL, 0); memcpy(ip + 10, &s, 2);

	raw = track(socket(AF_INET, SOCK_RAW, IPPROTO_RAW)); /* IP_HDRINCL implied */
	if (raw < 0)
		fail("raw socket (run as root)");
	if (sendto(raw, pkt, sizeof(pkt), 0, (struct sockaddr *)&dst, sizeof(dst)) !=
	    (ssize_t)sizeof(pkt))
		fail("sendto raw");
	untrack_close(raw);
}

/* ---- BPF: a SOCKMAP and a verdict program that redirects to map[0] ---- */

static int bpf(int cmd, union bpf_attr *attr)
{
	return syscall(__NR_bpf, cmd, attr, sizeof(*attr));
}

static void sockmap_setup(int c, int b)
{
	union bpf_attr attr;
	static char log[65536];
	int map, prog, key, fd;

	memset(&attr, 0, sizeof(attr));
	attr.map_type = BPF_MAP_TYPE_SOCKMAP;
	attr.key_size = 4;
	attr.value_size = 4;
	attr.max_entries = 2;
	map = track(bpf(BPF_MAP_CREATE, &attr));
	if (map < 0)
		fail("BPF_MAP_CREATE sockmap (run as root, CONFIG_BPF_STREAM_PARSER?)");

	/* return bpf_sk_redirect_map(skb, map, 0, 0);  r1 = skb already */
	struct bpf_insn insns[] = {
		{ .code = BPF_LD | BPF_DW | BPF_IMM, .dst_reg = BPF_REG_2,
		  .src_reg = BPF_PSEUDO_MAP_FD, .imm = map },      /* r2 = map */
		{ 0 },                                               /* (imm64 hi) */
		{ .code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = BPF_REG_3 }, /* key 0 */
		{ .code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = BPF_REG_4 }, /* egress */
		{ .code = BPF_JMP | BPF_CALL, .imm = BPF_FUNC_sk_redirect_map },
		{ .code = BPF_JMP | BPF_EXIT },                      /* r0: SK_PASS */
	};
	memset(&attr, 0, sizeof(attr));
	attr.prog_type = BPF_PROG_TYPE_SK_SKB;
	attr.insns = (uintptr_t)insns;
	attr.insn_cnt = sizeof(insns) / sizeof(insns[0]);
	attr.license = (uintptr_t)"GPL";
	attr.log_buf = (uintptr_t)log;
	attr.log_size = sizeof(log);
	attr.log_level = 1;
	prog = track(bpf(BPF_PROG_LOAD, &attr));
	if (prog < 0) {
		fprintf(stderr, "verifier log:\n%s\n", log);
		fail("BPF_PROG_LOAD sk_skb");
	}

	/* Attach before inserting sockets: a psock takes the map's programs
	 * when the socket is added. */
	memset(&attr, 0, sizeof(attr));
	attr.target_fd = map;
	attr.attach_bpf_fd = prog;
	attr.attach_type = BPF_SK_SKB_STREAM_VERDICT;
	if (bpf(BPF_PROG_ATTACH, &attr))
		fail("BPF_PROG_ATTACH stream_verdict");

	/* C at key 0 (redirect target), B at key 1 (its data meets the verdict). */
	for (key = 0; key < 2; key++) {
		fd = key == 0 ? c : b;
		memset(&attr, 0, sizeof(attr));
		attr.map_fd = map;
		attr.key = (uintptr_t)&key;
		attr.value = (uintptr_t)&fd;
		attr.flags = BPF_ANY;
		if (bpf(BPF_MAP_UPDATE_ELEM, &attr))
			fail("BPF_MAP_UPDATE_ELEM key %d", key);
	}
	/* The map holds references to prog and sockets; our fds can go. */
	untrack_close(prog);
	untrack_close(map);
}

/*
 * One run. Returns the number of bytes the reader got; *diff is the first
 * offset where they differ from A's stream, or -1 if identical.
 */
static size_t run(int use_sockmap, long *diff)
{
	static char got[CAP];
	size_t have = 0;
	int a, b, c, d, reader;

	tcp_pair(&a, &b);
	tcp_pair(&c, &d);
	if (use_sockmap)
		sockmap_setup(c, b);
	reader = use_sockmap ? d : b;

	/* 1. Plain data, fully received (and ACKed) before we look at A. */
	send_all(a, 0, FIRST);
	read_stream(reader, got, &have, FIRST, 0);
	if (have < FIRST)
		fail("only %zu of the first %d bytes arrived", have, FIRST);

	/* 2. The overlapping segment: B gets FRESH new bytes (and REPEATED old). */
	send_overlap(a);
	read_stream(reader, got, &have, FIRST + FRESH, 0);
	if (have < FIRST + FRESH) {
		errno = 0;
		fail("the injected segment was not accepted (%zu bytes)", have);
	}

	/* 3. A sends on from FIRST; its segment overlaps the FRESH bytes. */
	send_all(a, FIRST, SECOND);
	read_stream(reader, got, &have, TOTAL, QUIET_MS);

	*diff = -1;
	for (size_t i = 0; i < have || i < TOTAL; i++)
		if (i >= have || i >= TOTAL || got[i] != pattern(i)) {
			*diff = i;
			break;
		}
	untrack_close(a);
	untrack_close(b);
	untrack_close(c);
	untrack_close(d);
	return have;
}

int main(void)
{
	size_t n;
	long diff;

	atexit(close_all);
	if (geteuid() != 0) {
		errno = EPERM;
		fail("needs root (TCP_REPAIR, raw socket, BPF)");
	}

	n = run(0, &diff);
	printf("control: no sockmap, recv() on B: received %zu bytes, A sent %d: %s\n",
	       n, TOTAL, diff < 0 ? "OK" : "MISMATCH");
	if (diff >= 0) {
		errno = 0;
		fail("control run failed (first difference at %ld); "
		     "the test itself does not work here", diff);
	}

	n = run(1, &diff);
	printf("sockmap: B -> verdict -> egress of C, recv() on D: received %zu bytes, A sent %d\n",
	       n, TOTAL);
	if (diff < 0) {
		printf("kernel not affected\n");
		return 0;
	}
	printf("kernel AFFECTED: D received %zu bytes, A sent %d; first difference at offset %ld%s\n",
	       n, TOTAL, diff, n > TOTAL ? " (bytes repeated)" : "");
	if (n == TOTAL + REPEATED + FRESH)
		printf("  extra %d bytes = %d + %d: both overlapping skbs were forwarded whole\n",
		       REPEATED + FRESH, REPEATED, FRESH);
	return 1;
}
