/*
 * clockmon: prints the clocks a server uses for timeouts and expiry.
 *
 *   clockmon            every 100 ms: `clock <n> <monotonic ms> <boottime ms> <realtime ms>`
 *
 * n counts lines from 1. A server that measures time with CLOCK_MONOTONIC or
 * CLOCK_BOOTTIME (timeouts, leases, rate limits) breaks when they go backwards
 * or leap by days at a migration; the clock tests read these lines on both
 * sides of a move.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <time.h>
#include <unistd.h>

static long long ms(clockid_t c)
{
	struct timespec t;
	clock_gettime(c, &t);
	return t.tv_sec * 1000LL + t.tv_nsec / 1000000;
}

int main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	for (unsigned long long n = 1;; n++) {
		printf("clock %llu %lld %lld %lld\n", n, ms(CLOCK_MONOTONIC), ms(CLOCK_BOOTTIME), ms(CLOCK_REALTIME));
		usleep(100000);
	}
}
