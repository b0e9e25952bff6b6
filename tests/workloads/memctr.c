/*
 * memctr: the end-to-end test workload (a memhog with a counter, as in UMS IV).
 *
 *   memctr [MiB [PROCS]]      touch MiB of random memory, then tick forever;
 *                             with PROCS > 1, also fork PROCS-1 idle children
 *                             (the workload is then PROCS processes in all)
 *   memctr spawn-orphans K    also fork K children that each leave an orphan
 *
 * MEMCTR_COMPRESSIBLE=1: every 8-byte word of the memory keeps only its
 * low 16 random bits (the rest zero), initially and when rewritten, so the
 * memory compresses (zstd: about 3 to 4 times); checksums work the same.
 *
 * MEMCTR_WRITE_MIB_S=N: a writer. Every tick rewrites the next N/10 MiB of
 * the memory (in order, wrapping around), each word with a value that
 * depends on its index and how often it was written, so the whole memory
 * can be recomputed from (seed, words written). On SIGUSR1 it then prints
 * `expect <16 hex>` (the checksum the memory must have) after `sum`: equal
 * when no page was lost or stale, e.g. across a migration.
 *
 * Lines on stdout (each flushed at once, stdout is usually a pipe):
 *   env FOO=<value|unset>  cwd <dir>  uid <u> gid <g>
 *   sum <16 hex>           checksum of the memory (again on every SIGUSR1)
 *   file <path> <content>  when MEMCTR_FILE is set
 *   tick <n> <unix ms>     every 100 ms, n = 1, 2, 3, ...
 *   orphans-done           when all K orphans of spawn-orphans were reaped
 *   term                   on SIGTERM, then exit with MEMCTR_EXIT_CODE (0)
 *
 * Ticks follow absolute CLOCK_MONOTONIC deadlines, so they do not drift. A
 * checkpoint/restore can make that clock jump (frozen for a while, or a
 * different host): missed ticks are skipped rather than printed in a burst,
 * and a deadline that lies too far in the future is pulled back to now.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define TICK_NS 100000000LL

static volatile sig_atomic_t got_usr1;
static volatile sig_atomic_t got_term;

static void on_signal(int sig)
{
	if (sig == SIGUSR1)
		got_usr1 = 1;
	else if (sig == SIGTERM)
		got_term = 1;
}

static uint64_t xorshift64(uint64_t *s)
{
	uint64_t x = *s;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return *s = x;
}

static uint64_t random_seed(void)
{
	uint64_t seed = 0;
	int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
	if (fd >= 0) {
		if (read(fd, &seed, sizeof seed) != (ssize_t)sizeof seed)
			seed = 0;
		close(fd);
	}
	if (seed == 0) {
		struct timespec ts;
		clock_gettime(CLOCK_REALTIME, &ts);
		seed = ((uint64_t)ts.tv_sec << 32) ^ (uint64_t)ts.tv_nsec ^ ((uint64_t)getpid() << 16);
	}
	return seed ? seed : 0x9e3779b97f4a7c15ULL;
}

/* FNV-1a style mixing over 8-byte words: fast and order-sensitive. */
static uint64_t checksum(const uint64_t *words, size_t n)
{
	uint64_t h = 0xcbf29ce484222325ULL;
	for (size_t i = 0; i < n; i++) {
		h ^= words[i];
		h *= 0x100000001b3ULL;
	}
	return h;
}

/* MEMCTR_COMPRESSIBLE: the bits of each word that vary. */
static uint64_t word_mask = ~0ULL;

static uint64_t splitmix(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return x ^ (x >> 31);
}

/* The value word i holds after being rewritten `times` (>= 1) times. */
static uint64_t written(uint64_t seed, size_t i, uint64_t times)
{
	return splitmix(seed ^ ((uint64_t)i * 0xff51afd7ed558ccdULL) ^ (times << 40)) & word_mask;
}

/* The checksum the memory must have after `total` words were rewritten. */
static uint64_t expected(uint64_t seed, size_t n, uint64_t total)
{
	uint64_t h = 0xcbf29ce484222325ULL, state = seed;
	uint64_t passes = n ? total / n : 0, partial = n ? total % n : 0;
	for (size_t i = 0; i < n; i++) {
		uint64_t initial = xorshift64(&state) & word_mask;
		uint64_t times = passes + (i < partial ? 1 : 0);
		h ^= times ? written(seed, i, times) : initial;
		h *= 0x100000001b3ULL;
	}
	return h;
}

static int64_t now_ns(clockid_t clk)
{
	struct timespec ts;
	clock_gettime(clk, &ts);
	return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Reap every exited child (memctr may be PID 1 of a pid namespace). */
static long reap_all(void)
{
	long n = 0;
	for (;;) {
		pid_t p = waitpid(-1, NULL, WNOHANG);
		if (p > 0) {
			n++;
			continue;
		}
		if (p < 0 && errno == EINTR)
			continue;
		return n;
	}
}

static void spawn_orphans(long k)
{
	for (long i = 0; i < k; i++) {
		pid_t child = fork();
		if (child < 0) {
			perror("fork");
			exit(1);
		}
		if (child == 0) {
			pid_t grandchild = fork();
			if (grandchild == 0) {
				struct timespec d = { 0, 200000000L };
				while (nanosleep(&d, &d) < 0 && errno == EINTR)
					;
				_exit(0);
			}
			_exit(grandchild < 0 ? 1 : 0);
		}
	}
}

/* Children that only sleep: a workload of several processes (UMS Fig. 6).
 * They end with the pid namespace when memctr, its init, ends. */
static void spawn_idle(long k)
{
	for (long i = 0; i < k; i++) {
		pid_t child = fork();
		if (child < 0) {
			perror("fork");
			exit(1);
		}
		if (child == 0) {
			signal(SIGTERM, SIG_DFL);
			signal(SIGUSR1, SIG_DFL);
			prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
			for (;;)
				pause();
		}
	}
	if (k > 0)
		printf("procs %ld\n", k + 1);
}

int main(int argc, char **argv)
{
	long mib = 0, orphans = 0, procs = 1;
	const char *env_mib = getenv("MEMCTR_MIB");

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (getenv("MEMCTR_COMPRESSIBLE") && strcmp(getenv("MEMCTR_COMPRESSIBLE"), "0") != 0)
		word_mask = 0xffffULL;
	if (env_mib)
		mib = strtol(env_mib, NULL, 10);
	if (argc > 1 && strcmp(argv[1], "spawn-orphans") == 0) {
		orphans = argc > 2 ? strtol(argv[2], NULL, 10) : 1;
	} else if (argc > 1) {
		char *end;
		mib = strtol(argv[1], &end, 10);
		if (argc > 2 && !*end)
			procs = strtol(argv[2], &end, 10);
		if (*end || mib < 0 || procs < 1 || argc > 3) {
			fprintf(stderr, "usage: memctr [MiB [PROCS]] | memctr spawn-orphans K\n");
			return 2;
		}
	}

	/* Outside a pid namespace the orphans would go to the host's init:
	 * being a subreaper makes spawn-orphans behave the same everywhere. */
	if (orphans > 0)
		prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);

	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGUSR1, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);

	const char *foo = getenv("FOO");
	char cwd[4096];
	printf("env FOO=%s\n", foo ? foo : "unset");
	printf("cwd %s\n", getcwd(cwd, sizeof cwd) ? cwd : "?");
	printf("uid %u gid %u\n", (unsigned)getuid(), (unsigned)getgid());

	size_t nwords = (size_t)mib * (1024 * 1024 / sizeof(uint64_t));
	uint64_t *mem = NULL;
	uint64_t state = random_seed();
	const uint64_t seed = state;
	const char *env_rate = getenv("MEMCTR_WRITE_MIB_S");
	size_t per_tick = env_rate ? (size_t)strtol(env_rate, NULL, 10) * (1024 * 1024 / sizeof(uint64_t)) / 10 : 0;
	uint64_t total_written = 0;
	if (nwords) {
		mem = mmap(NULL, nwords * sizeof *mem, PROT_READ | PROT_WRITE,
			   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (mem == MAP_FAILED) {
			perror("mmap");
			return 1;
		}
		for (size_t i = 0; i < nwords; i++)
			mem[i] = xorshift64(&state) & word_mask;
	}
	printf("sum %016" PRIx64 "\n", checksum(mem, nwords));

	const char *path = getenv("MEMCTR_FILE");
	if (path && *path) {
		char content[128];
		snprintf(content, sizeof content, "written-by-%d-%016" PRIx64, (int)getpid(),
			 xorshift64(&state));
		FILE *f = fopen(path, "w");
		if (!f || fprintf(f, "%s\n", content) < 0 || fclose(f) != 0) {
			fprintf(stderr, "memctr: write %s: %s\n", path, strerror(errno));
			return 1;
		}
		printf("file %s %s\n", path, content);
	}

	long reaped = 0;
	int orphans_reported = 0;
	if (orphans > 0)
		spawn_orphans(orphans);
	spawn_idle(procs - 1);

	uint64_t n = 0;
	int64_t deadline = now_ns(CLOCK_MONOTONIC) + TICK_NS;
	for (;;) {
		struct timespec ts = { deadline / 1000000000LL, deadline % 1000000000LL };
		int rc = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);

		if (got_term) {
			const char *code = getenv("MEMCTR_EXIT_CODE");
			printf("term\n");
			fflush(stdout);
			return code ? atoi(code) : 0;
		}
		if (got_usr1) {
			got_usr1 = 0;
			printf("sum %016" PRIx64 "\n", checksum(mem, nwords));
			if (per_tick)
				printf("expect %016" PRIx64 "\n", expected(seed, nwords, total_written));
		}
		reaped += reap_all();
		if (orphans > 0 && !orphans_reported && reaped >= 2 * orphans) {
			orphans_reported = 1;
			printf("orphans-done\n");
		}
		if (rc == EINTR)
			continue;

		printf("tick %" PRIu64 " %" PRId64 "\n", ++n, now_ns(CLOCK_REALTIME) / 1000000);
		for (size_t k = 0; nwords && k < per_tick; k++, total_written++) {
			size_t i = total_written % nwords;
			mem[i] = written(seed, i, total_written / nwords + 1);
		}

		int64_t now = now_ns(CLOCK_MONOTONIC);
		deadline += TICK_NS;
		if (deadline <= now) /* late (frozen, restored): skip missed ticks */
			deadline += ((now - deadline) / TICK_NS + 1) * TICK_NS;
		else if (deadline > now + TICK_NS) /* clock went back: restart grid */
			deadline = now + TICK_NS;
	}
}
