/*
 * fsync_ceiling: the disk's durable-write ceiling for a mail queue.
 *
 * Each of N writers (threads) loops:
 *     open(tmp/wI-K, O_CREAT|O_EXCL) ; write(2 KB) ; fsync(file) ; close
 *     rename(tmp/wI-K -> done/wI-K) ; fsync(done/)
 * i.e. the minimum a spool must do to make one small message durable and visible
 * (one data fsync, one directory fsync). Runs for SECONDS seconds (or until
 * MAX_OPS ops in total), then prints "writers=N ops=M seconds=S ops_per_sec=R"
 * and removes its files.
 *
 * Usage: fsync_ceiling DIR WRITERS SECONDS [SIZE_BYTES] [MAX_OPS]
 * Build: gcc -O2 -pthread -o fsync_ceiling fsync_ceiling.c
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static char tmpdir[4096], donedir[4096];
static size_t size = 2048;
static double seconds;
static long max_ops;
static atomic_long total;
static atomic_int stop;
static double t0;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what, const char *path) {
    fprintf(stderr, "fsync_ceiling: %s %s: %s\n", what, path, strerror(errno));
    exit(1);
}

static void *writer(void *arg) {
    long id = (long)arg;
    char *buf = malloc(size);
    memset(buf, 'x', size);
    char from[8192], to[8192];
    int dfd = open(donedir, O_RDONLY | O_DIRECTORY);
    if (dfd < 0) die("open", donedir);
    for (long k = 0; !atomic_load(&stop); k++) {
        snprintf(from, sizeof from, "%s/w%ld-%ld", tmpdir, id, k);
        snprintf(to, sizeof to, "%s/w%ld-%ld", donedir, id, k);
        int fd = open(from, O_WRONLY | O_CREAT | O_EXCL, 0600);
        if (fd < 0) die("open", from);
        if (write(fd, buf, size) != (ssize_t)size) die("write", from);
        if (fsync(fd) < 0) die("fsync", from);
        close(fd);
        if (rename(from, to) < 0) die("rename", from);
        if (fsync(dfd) < 0) die("fsync", donedir);
        long n = atomic_fetch_add(&total, 1) + 1;
        if ((max_ops && n >= max_ops) || now() - t0 >= seconds) atomic_store(&stop, 1);
    }
    close(dfd);
    free(buf);
    return NULL;
}

static void wipe(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    char p[8192];
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
        unlink(p);
    }
    closedir(d);
    rmdir(dir);
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s DIR WRITERS SECONDS [SIZE_BYTES] [MAX_OPS]\n", argv[0]);
        return 2;
    }
    const char *dir = argv[1];
    int n = atoi(argv[2]);
    seconds = atof(argv[3]);
    if (argc > 4) size = strtoul(argv[4], NULL, 10);
    if (argc > 5) max_ops = atol(argv[5]);
    if (n < 1 || seconds <= 0) return 2;
    mkdir(dir, 0700);
    snprintf(tmpdir, sizeof tmpdir, "%s/tmp", dir);
    snprintf(donedir, sizeof donedir, "%s/done", dir);
    if (mkdir(tmpdir, 0700) < 0 && errno != EEXIST) die("mkdir", tmpdir);
    if (mkdir(donedir, 0700) < 0 && errno != EEXIST) die("mkdir", donedir);
    pthread_t *th = calloc(n, sizeof *th);
    t0 = now();
    for (long i = 0; i < n; i++) pthread_create(&th[i], NULL, writer, (void *)i);
    for (int i = 0; i < n; i++) pthread_join(th[i], NULL);
    double el = now() - t0;
    long ops = atomic_load(&total);
    printf("writers=%d ops=%ld seconds=%.3f ops_per_sec=%.1f\n", n, ops, el, ops / el);
    wipe(tmpdir);
    wipe(donedir);
    return 0;
}
