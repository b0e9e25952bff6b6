/*
 * websrv: a small stateful network workload for the client-facing tests.
 *
 *   websrv [HTTP_PORT [UDP_PORT]]      (defaults 8080 and 5353)
 *
 * TCP: answers every request with a response whose body is
 * "hits <n> pid-start <token>\n" (n counts requests since start, so it must
 * keep counting across a migration). HTTP/1.0 requests get one HTTP/1.0
 * response and a close; HTTP/1.1 requests without "Connection: close" keep
 * the connection open for the next request (keep-alive), until it has been
 * idle for 10 s. Requests are read up to the blank line; a client that sends
 * garbage gets a 400 and a close. "GET /pause-accept" (answered like any
 * other) makes it stop accepting connections for 8 s: new ones wait in the
 * kernel's accept queue, as with a server too busy to accept.
 * UDP: echoes every datagram back to its sender.
 * One process, one poll loop; prints "listening" when ready.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAXC 1024
#define IDLE_S 10

struct conn {
	int fd;
	char buf[4096];
	size_t len;
	time_t last;
};

static time_t now_s(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec;
}

static int listen_on(int type, int port)
{
	int fd = socket(AF_INET, type, 0);
	int one = 1;
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };

	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0) {
		perror("bind");
		exit(1);
	}
	if (type == SOCK_STREAM && listen(fd, 512) < 0) {
		perror("listen");
		exit(1);
	}
	return fd;
}

static void reply(int fd, int keep, const char *status, const char *body)
{
	char out[512];
	int n = snprintf(out, sizeof(out),
			 "HTTP/1.%d %s\r\nContent-Type: text/plain\r\nContent-Length: %zu\r\nConnection: %s\r\n\r\n%s",
			 keep, status, strlen(body), keep ? "keep-alive" : "close", body);
	ssize_t off = 0;
	while (off < n) {
		ssize_t w = write(fd, out + off, n - off);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			break;
		off += w;
	}
}

int main(int argc, char **argv)
{
	int hport = argc > 1 ? atoi(argv[1]) : 8080;
	int uport = argc > 2 ? atoi(argv[2]) : 5353;
	int lfd = listen_on(SOCK_STREAM, hport);
	int ufd = listen_on(SOCK_DGRAM, uport);
	static struct conn c[MAXC];
	unsigned long long hits = 0;
	time_t paused_until = 0;
	char token[32];

	snprintf(token, sizeof(token), "%lx", (unsigned long)time(NULL) ^ (unsigned long)getpid() << 16);
	for (int i = 0; i < MAXC; i++)
		c[i].fd = -1;
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("listening http %d udp %d token %s\n", hport, uport, token);

	for (;;) {
		struct pollfd p[MAXC + 2];
		int map[MAXC + 2], n = 0;

		if (now_s() >= paused_until) {
			p[n].fd = lfd; p[n].events = POLLIN; map[n++] = -1;
		}
		p[n].fd = ufd; p[n].events = POLLIN; map[n++] = -2;
		for (int i = 0; i < MAXC; i++)
			if (c[i].fd >= 0) {
				p[n].fd = c[i].fd; p[n].events = POLLIN; map[n++] = i;
			}
		if (poll(p, n, 1000) < 0) {
			if (errno == EINTR)
				continue;
			perror("poll");
			return 1;
		}
		time_t now = now_s();
		for (int k = 0; k < n; k++) {
			if (!p[k].revents) {
				if (map[k] >= 0 && now - c[map[k]].last >= IDLE_S) {
					close(c[map[k]].fd);
					c[map[k]].fd = -1;
				}
				continue;
			}
			if (map[k] == -1) {
				int fd = accept(lfd, NULL, NULL);
				if (fd < 0)
					continue;
				int slot = -1;
				for (int i = 0; i < MAXC; i++)
					if (c[i].fd < 0) { slot = i; break; }
				if (slot < 0) { close(fd); continue; }
				c[slot].fd = fd;
				c[slot].len = 0;
				c[slot].last = now;
			} else if (map[k] == -2) {
				char d[65536];
				struct sockaddr_in from;
				socklen_t fl = sizeof(from);
				ssize_t r = recvfrom(ufd, d, sizeof(d), 0, (struct sockaddr *)&from, &fl);
				if (r > 0)
					sendto(ufd, d, r, 0, (struct sockaddr *)&from, fl);
			} else {
				struct conn *x = &c[map[k]];
				ssize_t r = read(x->fd, x->buf + x->len, sizeof(x->buf) - 1 - x->len);
				if (r <= 0) {
					close(x->fd);
					x->fd = -1;
					continue;
				}
				x->len += r;
				x->buf[x->len] = 0;
				x->last = now;
				int done = strstr(x->buf, "\r\n\r\n") || strstr(x->buf, "\n\n");
				if (done && strncmp(x->buf, "GET ", 4) == 0) {
					char body[128];
					char *eol = strstr(x->buf, "\r\n");
					int keep = eol && eol - x->buf >= 8 && strncmp(eol - 8, "HTTP/1.1", 8) == 0 &&
						   !strcasestr(x->buf, "connection: close");
					if (strncmp(x->buf, "GET /pause-accept ", 18) == 0)
						paused_until = now + 8;
					snprintf(body, sizeof(body), "hits %llu pid-start %s\n", ++hits, token);
					reply(x->fd, keep, "200 OK", body);
					if (keep) {
						x->len = 0;
						continue;
					}
				} else if (done || x->len >= sizeof(x->buf) - 1 || (x->len >= 4 && strncmp(x->buf, "GET ", 4) != 0)) {
					reply(x->fd, 0, "400 Bad Request", "bad request\n");
				} else {
					continue;
				}
				close(x->fd);
				x->fd = -1;
			}
		}
	}
}
