// kmt-load: module syscalls for the kmodmon VM tests, with nothing in between.
//   kmt-load finit FILE [FLAGS]     finit_module(open(FILE), "", FLAGS)
//   kmt-load init FILE              init_module(contents of FILE, "")
//   kmt-load bench finit|init FILE NAME ROUNDS
//                                   ROUNDS × (load, delete_module(NAME)); prints each load's
//                                   duration in ns (CLOCK_MONOTONIC), one per line
// Exit code: 0, or the failing call's errno.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static int do_finit(const char *path, int flags)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return errno;
	long r = syscall(SYS_finit_module, fd, "", flags);
	int e = r ? errno : 0;
	close(fd);
	return e;
}

static int do_init(const char *path)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) < 0)
		return errno;
	char *buf = malloc(st.st_size);
	if (!buf)
		return ENOMEM;
	ssize_t got = 0;
	while (got < st.st_size) {
		ssize_t n = read(fd, buf + got, st.st_size - got);
		if (n <= 0)
			return n < 0 ? errno : EIO;
		got += n;
	}
	close(fd);
	long r = syscall(SYS_init_module, buf, (unsigned long)st.st_size, "");
	int e = r ? errno : 0;
	free(buf);
	return e;
}

static long long now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1000000000LL + t.tv_nsec;
}

int main(int argc, char **argv)
{
	if (argc >= 3 && !strcmp(argv[1], "finit")) {
		int e = do_finit(argv[2], argc > 3 ? atoi(argv[3]) : 0);
		printf("finit_module %s: %s\n", argv[2], e ? strerror(e) : "ok");
		return e;
	}
	if (argc == 3 && !strcmp(argv[1], "init")) {
		int e = do_init(argv[2]);
		printf("init_module %s: %s\n", argv[2], e ? strerror(e) : "ok");
		return e;
	}
	if (argc == 6 && !strcmp(argv[1], "bench")) {
		int rounds = atoi(argv[5]);
		for (int i = 0; i < rounds; i++) {
			long long t0 = now_ns();
			int e = !strcmp(argv[2], "init") ? do_init(argv[3]) : do_finit(argv[3], 0);
			long long t1 = now_ns();
			if (e) {
				fprintf(stderr, "load %s: %s\n", argv[3], strerror(e));
				return e;
			}
			printf("%lld\n", t1 - t0);
			if (syscall(SYS_delete_module, argv[4], O_NONBLOCK)) {
				fprintf(stderr, "delete_module %s: %s\n", argv[4], strerror(errno));
				return errno;
			}
		}
		return 0;
	}
	fprintf(stderr, "usage: kmt-load finit FILE [FLAGS] | init FILE | bench finit|init FILE NAME ROUNDS\n");
	return 2;
}
