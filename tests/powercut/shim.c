/*
 * powercut recorder: an LD_PRELOAD shim that logs every file-system operation postern makes
 * under one directory, so tests/it/powercut/ can rebuild the states a power cut could leave.
 *
 * Environment:
 *   POWERCUT_LOG   log file (appended; several processes may share it)
 *   POWERCUT_ROOT  absolute directory whose files are recorded (nothing outside it is)
 *
 * Each record is one text line "<op> <pid> <comm> <fields...>\n", and a write record is
 * followed by its bytes. Ops (ino = inode number, paths absolute, fields space-separated and
 * the path always last):
 *   C ino path        a file was created (open/openat/creat with O_CREAT made it)
 *   D ino path        a directory was created
 *   T ino len         the file was truncated or extended (ftruncate, O_TRUNC)
 *   W ino off len     len bytes written at off; the bytes follow the newline
 *   Z ino off len     len zero bytes written at off (no payload)
 *   F ino             fsync or fdatasync of a file or directory (a durability barrier)
 *   Q ino             sync_file_range (NOT a barrier: it does not flush the disk cache)
 *   K ino off len m   fallocate with mode m
 *   R ino from\tto    rename (ino of the moved object)
 *   U ino path        unlink
 *   X 0 path          rmdir
 *   L ino from\tto    link
 *   Y                 sync()/syncfs() (barrier for everything)
 *   A id              the process sent an SMTP reply "250 ... queued as <id>" (logged before
 *                     the bytes reach the socket, so a crash after it counts as acknowledged)
 *
 * One lock (a mutex plus flock on the log, for several processes) is held around each
 * recorded operation and its log record, so the log order is the order the kernel saw.
 * Calls that fail are not logged. Writes to other files and sockets pass straight through,
 * apart from the look for "queued as" in socket writes.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#define MAX_FD 65536

static int log_fd = -1;
static char root[PATH_MAX];
static size_t root_len;
static pthread_mutex_t mu = PTHREAD_RECURSIVE_MUTEX_INITIALIZER_NP;
/* fd -> inode + 1 for tracked files (0: not tracked) */
static unsigned long long tracked[MAX_FD];
static __thread int in_shim;

#define REAL(name) static __typeof__(name) *real_##name
REAL(open);
REAL(open64);
REAL(openat);
REAL(openat64);
REAL(creat);
REAL(creat64);
REAL(write);
REAL(pwrite);
REAL(pwrite64);
REAL(writev);
REAL(pwritev);
REAL(pwritev64);
REAL(fsync);
REAL(fdatasync);
REAL(sync_file_range);
REAL(ftruncate);
REAL(ftruncate64);
REAL(fallocate);
REAL(fallocate64);
REAL(rename);
REAL(renameat);
REAL(renameat2);
REAL(unlink);
REAL(unlinkat);
REAL(rmdir);
REAL(link);
REAL(linkat);
REAL(mkdir);
REAL(mkdirat);
REAL(close);
REAL(send);
REAL(sendto);
REAL(sendmsg);
REAL(sync);
REAL(syncfs);

static void *next(const char *n) {
    void *p = dlsym(RTLD_NEXT, n);
    return p;
}

__attribute__((constructor)) static void init(void) {
#define R(n) real_##n = next(#n)
    R(open); R(open64); R(openat); R(openat64); R(creat); R(creat64);
    R(write); R(pwrite); R(pwrite64); R(writev); R(pwritev); R(pwritev64);
    R(fsync); R(fdatasync); R(sync_file_range); R(ftruncate); R(ftruncate64);
    R(fallocate); R(fallocate64); R(rename); R(renameat); R(renameat2);
    R(unlink); R(unlinkat); R(rmdir); R(link); R(linkat); R(mkdir); R(mkdirat);
    R(close); R(send); R(sendto); R(sendmsg); R(sync); R(syncfs);
#undef R
    const char *l = getenv("POWERCUT_LOG");
    const char *r = getenv("POWERCUT_ROOT");
    if (!l || !r || strlen(r) + 2 >= sizeof root)
        return;
    log_fd = (int)syscall(SYS_openat, AT_FDCWD, l, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    strcpy(root, r);
    root_len = strlen(root);
    while (root_len > 1 && root[root_len - 1] == '/')
        root[--root_len] = 0;
}

static void raw_write_all(const void *buf, size_t len) {
    const char *p = buf;
    while (len > 0) {
        ssize_t n = syscall(SYS_write, log_fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            abort(); /* a log with holes would make every later state wrong */
        p += n;
        len -= (size_t)n;
    }
}

/* The lock is taken before the operation and released after its record is written. */
static void lock(void) {
    pthread_mutex_lock(&mu);
    while (flock(log_fd, LOCK_EX) != 0 && errno == EINTR) {
    }
}
static void unlock(void) {
    flock(log_fd, LOCK_UN);
    pthread_mutex_unlock(&mu);
}

static void record(const char *op, const char *fields, const void *payload, size_t plen) {
    char comm[17] = {0};
    prctl(PR_GET_NAME, comm, 0, 0, 0);
    for (char *c = comm; *c; c++)
        if (*c == ' ' || *c == '\t' || *c == '\n')
            *c = '_';
    char head[PATH_MAX * 2 + 256];
    int n = snprintf(head, sizeof head, "%s %d %s %s\n", op, (int)getpid(), comm[0] ? comm : "-", fields);
    if (n < 0 || (size_t)n >= sizeof head)
        abort();
    /* one buffer for head and payload keeps a record whole in O_APPEND mode */
    if (plen == 0) {
        raw_write_all(head, (size_t)n);
        return;
    }
    char *all = malloc((size_t)n + plen);
    if (!all)
        abort();
    memcpy(all, head, (size_t)n);
    memcpy(all + n, payload, plen);
    raw_write_all(all, (size_t)n + plen);
    free(all);
}

/* Absolute, lexically normalised path of (dirfd, path); empty on failure. */
static void abspath(int dirfd, const char *path, char *out) {
    char buf[PATH_MAX * 2];
    out[0] = 0;
    if (!path)
        return;
    if (path[0] == '/') {
        snprintf(buf, sizeof buf, "%s", path);
    } else {
        char base[PATH_MAX];
        if (dirfd == AT_FDCWD) {
            if (!getcwd(base, sizeof base))
                return;
        } else {
            char link[64];
            snprintf(link, sizeof link, "/proc/self/fd/%d", dirfd);
            ssize_t n = readlink(link, base, sizeof base - 1);
            if (n <= 0)
                return;
            base[n] = 0;
        }
        snprintf(buf, sizeof buf, "%s/%s", base, path);
    }
    /* normalise: drop "." and empty components, resolve ".." lexically */
    char *parts[512];
    int np = 0;
    char *save = NULL;
    for (char *t = strtok_r(buf, "/", &save); t; t = strtok_r(NULL, "/", &save)) {
        if (strcmp(t, ".") == 0)
            continue;
        if (strcmp(t, "..") == 0) {
            if (np > 0)
                np--;
            continue;
        }
        if (np < 512)
            parts[np++] = t;
    }
    size_t o = 0;
    for (int i = 0; i < np; i++) {
        int w = snprintf(out + o, PATH_MAX - o, "/%s", parts[i]);
        if (w < 0 || (size_t)w >= PATH_MAX - o) {
            out[0] = 0;
            return;
        }
        o += (size_t)w;
    }
    if (o == 0)
        strcpy(out, "/");
}

static int under_root(const char *p) {
    return log_fd >= 0 && p[0] && strncmp(p, root, root_len) == 0 && (p[root_len] == 0 || p[root_len] == '/');
}

static unsigned long long ino_of_fd(int fd) {
    struct stat st;
    if (fstat(fd, &st) != 0)
        return 0;
    return (unsigned long long)st.st_ino;
}

static unsigned long long ino_of_path(const char *p) {
    struct stat st;
    if (lstat(p, &st) != 0)
        return 0;
    return (unsigned long long)st.st_ino;
}

/* The inode of a tracked fd, or 0 (untracked, or the fd now names something else). */
static unsigned long long fd_ino(int fd) {
    if (log_fd < 0 || fd < 0 || fd >= MAX_FD || tracked[fd] == 0)
        return 0;
    unsigned long long ino = tracked[fd] - 1;
    if (ino_of_fd(fd) != ino) {
        tracked[fd] = 0;
        return 0;
    }
    return ino;
}

static int do_open(int dirfd, const char *path, int flags, mode_t mode, int how) {
    char p[PATH_MAX];
    if (in_shim || log_fd < 0) {
        goto passthrough;
    }
    abspath(dirfd, path, p);
    if (!under_root(p))
        goto passthrough;
    in_shim = 1;
    lock();
    int existed = 1;
    if (flags & O_CREAT) {
        struct stat st;
        existed = lstat(p, &st) == 0;
    }
    int fd;
    switch (how) {
    case 0: fd = real_open(path, flags, mode); break;
    case 1: fd = real_open64(path, flags, mode); break;
    case 2: fd = real_openat(dirfd, path, flags, mode); break;
    default: fd = real_openat64(dirfd, path, flags, mode); break;
    }
    int saved = errno;
    if (fd >= 0) {
        struct stat st;
        if (fstat(fd, &st) == 0) {
            char f[PATH_MAX + 64];
            if (!existed) {
                snprintf(f, sizeof f, "%llu %s", (unsigned long long)st.st_ino, p);
                record("C", f, NULL, 0);
            } else if ((flags & O_TRUNC) && S_ISREG(st.st_mode) && (flags & O_ACCMODE) != O_RDONLY) {
                snprintf(f, sizeof f, "%llu 0", (unsigned long long)st.st_ino);
                record("T", f, NULL, 0);
            }
            if (fd < MAX_FD)
                tracked[fd] = (unsigned long long)st.st_ino + 1;
        }
    }
    unlock();
    in_shim = 0;
    errno = saved;
    return fd;
passthrough:
    switch (how) {
    case 0: return real_open(path, flags, mode);
    case 1: return real_open64(path, flags, mode);
    case 2: return real_openat(dirfd, path, flags, mode);
    default: return real_openat64(dirfd, path, flags, mode);
    }
}

#define MODE_ARG                                                  \
    mode_t mode = 0;                                              \
    if ((flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE) {                        \
        va_list ap;                                               \
        va_start(ap, flags);                                      \
        mode = (mode_t)va_arg(ap, int);                           \
        va_end(ap);                                               \
    }

int open(const char *path, int flags, ...) { MODE_ARG return do_open(AT_FDCWD, path, flags, mode, 0); }
int open64(const char *path, int flags, ...) { MODE_ARG return do_open(AT_FDCWD, path, flags, mode, 1); }
int openat(int d, const char *path, int flags, ...) { MODE_ARG return do_open(d, path, flags, mode, 2); }
int openat64(int d, const char *path, int flags, ...) { MODE_ARG return do_open(d, path, flags, mode, 3); }
int creat(const char *path, mode_t mode) { return do_open(AT_FDCWD, path, O_CREAT | O_WRONLY | O_TRUNC, mode, 0); }
int creat64(const char *path, mode_t mode) { return do_open(AT_FDCWD, path, O_CREAT | O_WRONLY | O_TRUNC, mode, 1); }

int close(int fd) {
    if (fd >= 0 && fd < MAX_FD && tracked[fd]) {
        /* under the lock, so an fd number reused by another thread is not mislabelled */
        lock();
        tracked[fd] = 0;
        int r = real_close(fd);
        int saved = errno;
        unlock();
        errno = saved;
        return r;
    }
    return real_close(fd);
}

static int all_zero(const char *p, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (p[i])
            return 0;
    return 1;
}

static void record_write(unsigned long long ino, long long off, const void *buf, size_t n) {
    char f[128];
    snprintf(f, sizeof f, "%llu %lld %zu", ino, off, n);
    if (all_zero(buf, n))
        record("Z", f, NULL, 0);
    else
        record("W", f, buf, n);
}

/* Look for "queued as <id>" in bytes going to a socket. */
static void look_for_ack(int fd, const void *buf, size_t n) {
    if (log_fd < 0 || n < 14 || in_shim)
        return;
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISSOCK(st.st_mode))
        return;
    const char *p = buf, *end = p + n;
    const char *needle = "queued as ";
    size_t nl = strlen(needle);
    int locked = 0;
    while (p + nl <= end) {
        const char *hit = memmem(p, (size_t)(end - p), needle, nl);
        if (!hit)
            break;
        const char *id = hit + nl;
        const char *e = id;
        while (e < end && ((*e >= '0' && *e <= '9') || (*e >= 'A' && *e <= 'Z') || (*e >= 'a' && *e <= 'z')))
            e++;
        /* only a final "250 " reply line counts */
        const char *line = hit;
        while (line > (const char *)buf && line[-1] != '\n')
            line--;
        if (e > id && e - id < 64 && end - line >= 4 && memcmp(line, "250 ", 4) == 0) {
            if (!locked) {
                in_shim = 1;
                lock();
                locked = 1;
            }
            char f[80];
            snprintf(f, sizeof f, "%.*s", (int)(e - id), id);
            record("A", f, NULL, 0);
        }
        p = e > hit ? e : hit + 1;
    }
    if (locked) {
        unlock();
        in_shim = 0;
    }
}

/* Where a write(2) or writev(2) on fd lands. */
static long long cur_off(int fd) {
    int fl = fcntl(fd, F_GETFL);
    return (long long)((fl >= 0 && (fl & O_APPEND)) ? lseek(fd, 0, SEEK_END) : lseek(fd, 0, SEEK_CUR));
}

/* A write of any kind to a tracked fd: run `call` under the lock, then `rec` (which sees
 * ino, off and r) if it wrote anything, and return its result. */
#define TRACKED_WRITE(fd, offset, call, rec)    \
    if (!in_shim && fd_ino(fd)) {                \
        in_shim = 1;                             \
        lock();                                  \
        unsigned long long ino = fd_ino(fd);     \
        long long off = (offset);                \
        ssize_t r = call;                        \
        int saved = errno;                       \
        if (r > 0 && ino)                        \
            rec;                                 \
        unlock();                                \
        in_shim = 0;                             \
        errno = saved;                           \
        return r;                                \
    }

/* Vectored writes: logged as one write record per iovec, in order. */
static void record_iov(unsigned long long ino, long long off, const struct iovec *iov, int cnt, ssize_t r) {
    size_t left = (size_t)r;
    for (int i = 0; i < cnt && left > 0; i++) {
        size_t n = iov[i].iov_len < left ? iov[i].iov_len : left;
        if (n)
            record_write(ino, off, iov[i].iov_base, n);
        off += (long long)n;
        left -= n;
    }
}

ssize_t write(int fd, const void *buf, size_t n) {
    TRACKED_WRITE(fd, cur_off(fd), real_write(fd, buf, n), record_write(ino, off, buf, (size_t)r))
    look_for_ack(fd, buf, n);
    return real_write(fd, buf, n);
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t o) {
    TRACKED_WRITE(fd, o, real_pwrite(fd, buf, n, o), record_write(ino, off, buf, (size_t)r))
    return real_pwrite(fd, buf, n, o);
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off_t o) {
    TRACKED_WRITE(fd, o, real_pwrite64(fd, buf, n, o), record_write(ino, off, buf, (size_t)r))
    return real_pwrite64(fd, buf, n, o);
}

ssize_t writev(int fd, const struct iovec *iov, int cnt) {
    TRACKED_WRITE(fd, cur_off(fd), real_writev(fd, iov, cnt), record_iov(ino, off, iov, cnt, r))
    for (int i = 0; i < cnt && !in_shim; i++)
        look_for_ack(fd, iov[i].iov_base, iov[i].iov_len);
    return real_writev(fd, iov, cnt);
}

ssize_t pwritev(int fd, const struct iovec *iov, int cnt, off_t o) {
    TRACKED_WRITE(fd, o, real_pwritev(fd, iov, cnt, o), record_iov(ino, off, iov, cnt, r))
    return real_pwritev(fd, iov, cnt, o);
}

ssize_t pwritev64(int fd, const struct iovec *iov, int cnt, off_t o) {
    TRACKED_WRITE(fd, o, real_pwritev64(fd, iov, cnt, o), record_iov(ino, off, iov, cnt, r))
    return real_pwritev64(fd, iov, cnt, o);
}

ssize_t send(int fd, const void *buf, size_t n, int flags) {
    look_for_ack(fd, buf, n);
    return real_send(fd, buf, n, flags);
}
ssize_t sendto(int fd, const void *buf, size_t n, int flags, const struct sockaddr *a, socklen_t al) {
    look_for_ack(fd, buf, n);
    return real_sendto(fd, buf, n, flags, a, al);
}
ssize_t sendmsg(int fd, const struct msghdr *m, int flags) {
    for (size_t i = 0; m && i < m->msg_iovlen; i++)
        look_for_ack(fd, m->msg_iov[i].iov_base, m->msg_iov[i].iov_len);
    return real_sendmsg(fd, m, flags);
}

/* fd operations with no payload: F, Q, T, K */
#define FD_OP(call, rec, fmt, ...)                                  \
    if (!in_shim && fd_ino(fd)) {                                   \
        in_shim = 1;                                                \
        lock();                                                     \
        unsigned long long ino = fd_ino(fd);                        \
        int r = call;                                               \
        int saved = errno;                                          \
        if (r == 0 && ino) {                                        \
            char f[128];                                            \
            snprintf(f, sizeof f, "%llu" fmt, ino, ##__VA_ARGS__);  \
            record(rec, f, NULL, 0);                                \
        }                                                           \
        unlock();                                                   \
        in_shim = 0;                                                \
        errno = saved;                                              \
        return r;                                                   \
    }                                                               \
    return call;

int fsync(int fd) { FD_OP(real_fsync(fd), "F", "") }
int fdatasync(int fd) { FD_OP(real_fdatasync(fd), "F", "") }
int sync_file_range(int fd, off64_t off, off64_t n, unsigned int fl) { FD_OP(real_sync_file_range(fd, off, n, fl), "Q", "") }
int ftruncate(int fd, off_t len) { FD_OP(real_ftruncate(fd, len), "T", " %lld", (long long)len) }
int ftruncate64(int fd, off64_t len) { FD_OP(real_ftruncate64(fd, len), "T", " %lld", (long long)len) }
int fallocate(int fd, int mode, off_t off, off_t len) { FD_OP(real_fallocate(fd, mode, off, len), "K", " %lld %lld %d", (long long)off, (long long)len, mode) }
int fallocate64(int fd, int mode, off64_t off, off64_t len) { FD_OP(real_fallocate64(fd, mode, off, len), "K", " %lld %lld %d", (long long)off, (long long)len, mode) }

void sync(void) {
    if (log_fd >= 0 && !in_shim) {
        in_shim = 1;
        lock();
        real_sync();
        record("Y", "0", NULL, 0);
        unlock();
        in_shim = 0;
        return;
    }
    real_sync();
}
int syncfs(int fd) {
    if (log_fd >= 0 && !in_shim) {
        in_shim = 1;
        lock();
        int r = real_syncfs(fd);
        int saved = errno;
        if (r == 0)
            record("Y", "0", NULL, 0);
        unlock();
        in_shim = 0;
        errno = saved;
        return r;
    }
    return real_syncfs(fd);
}

/* Path operations: which real call to make. */
enum pathop { P_RENAME, P_UNLINK, P_RMDIR, P_LINK, P_MKDIR };

static int path_op(enum pathop op, int d1, const char *a, int d2, const char *b, int flags, mode_t mode, int how) {
    char pa[PATH_MAX], pb[PATH_MAX];
    pb[0] = 0;
    int track = 0;
    if (!in_shim && log_fd >= 0) {
        abspath(d1, a, pa);
        if (b)
            abspath(d2, b, pb);
        track = under_root(pa) || (b && under_root(pb));
    }
    if (track) {
        in_shim = 1;
        lock();
    }
    unsigned long long ino = track && op != P_MKDIR ? ino_of_path(pa) : 0;
    int r;
    switch (op) {
    case P_RENAME:
        r = how == 0 ? real_rename(a, b) : how == 1 ? real_renameat(d1, a, d2, b) : real_renameat2(d1, a, d2, b, (unsigned)flags);
        break;
    case P_UNLINK:
        if (how == 0)
            r = real_unlink(a);
        else
            r = real_unlinkat(d1, a, flags);
        if (flags & AT_REMOVEDIR)
            op = P_RMDIR;
        break;
    case P_RMDIR: r = real_rmdir(a); break;
    case P_LINK: r = how == 0 ? real_link(a, b) : real_linkat(d1, a, d2, b, flags); break;
    default: r = how == 0 ? real_mkdir(a, mode) : real_mkdirat(d1, a, mode); break;
    }
    int saved = errno;
    if (track) {
        if (r == 0) {
            char f[PATH_MAX * 2 + 64];
            switch (op) {
            case P_RENAME:
                snprintf(f, sizeof f, "%llu %s\t%s", ino, pa, pb);
                record("R", f, NULL, 0);
                break;
            case P_UNLINK:
                snprintf(f, sizeof f, "%llu %s", ino, pa);
                record("U", f, NULL, 0);
                break;
            case P_RMDIR:
                snprintf(f, sizeof f, "%llu %s", ino, pa);
                record("X", f, NULL, 0);
                break;
            case P_LINK:
                snprintf(f, sizeof f, "%llu %s\t%s", ino, pa, pb);
                record("L", f, NULL, 0);
                break;
            default:
                snprintf(f, sizeof f, "%llu %s", ino_of_path(pa), pa);
                record("D", f, NULL, 0);
                break;
            }
        }
        unlock();
        in_shim = 0;
    }
    errno = saved;
    return r;
}

int rename(const char *a, const char *b) { return path_op(P_RENAME, AT_FDCWD, a, AT_FDCWD, b, 0, 0, 0); }
int renameat(int d1, const char *a, int d2, const char *b) { return path_op(P_RENAME, d1, a, d2, b, 0, 0, 1); }
int renameat2(int d1, const char *a, int d2, const char *b, unsigned int fl) { return path_op(P_RENAME, d1, a, d2, b, (int)fl, 0, 2); }
int unlink(const char *a) { return path_op(P_UNLINK, AT_FDCWD, a, AT_FDCWD, NULL, 0, 0, 0); }
int unlinkat(int d, const char *a, int fl) { return path_op(P_UNLINK, d, a, AT_FDCWD, NULL, fl, 0, 1); }
int rmdir(const char *a) { return path_op(P_RMDIR, AT_FDCWD, a, AT_FDCWD, NULL, 0, 0, 0); }
int link(const char *a, const char *b) { return path_op(P_LINK, AT_FDCWD, a, AT_FDCWD, b, 0, 0, 0); }
int linkat(int d1, const char *a, int d2, const char *b, int fl) { return path_op(P_LINK, d1, a, d2, b, fl, 0, 1); }
int mkdir(const char *a, mode_t m) { return path_op(P_MKDIR, AT_FDCWD, a, AT_FDCWD, NULL, 0, m, 0); }
int mkdirat(int d, const char *a, mode_t m) { return path_op(P_MKDIR, d, a, AT_FDCWD, NULL, 0, m, 1); }
