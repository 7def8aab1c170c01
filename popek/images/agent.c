/* popek-agent: Popek's guest agent. Listens on AF_VSOCK port 52 (or, for tests on the host, a Unix socket given
 * with --unix PATH) and serves each connection in a forked child: one request per connection, EXEC (run a
 * command, stream its stdout/stderr, forward stdin and signals, report its exit status), REFRESH (wall clock,
 * entropy, hostname) or PING. The wire protocol is defined and documented in popek/agent.py; the numbers below
 * must match it. Built static (gcc -static -Os) by popek/images/agent.py. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <linux/vm_sockets.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define AGENT_PORT 52
#define AGENT_VERSION "popek-agent 1"
#define HDR 5                    /* type u8, length u32 little endian */
#define MAX_PAYLOAD (1u << 20)   /* popek.agent.MAX_PAYLOAD */
#define OUT_CHUNK 65536          /* bytes of command output per STDOUT/STDERR frame at most */

enum { REQ_EXEC = 0x01, REQ_STDIN = 0x02, REQ_STDIN_EOF = 0x03, REQ_SIGNAL = 0x04, REQ_REFRESH = 0x05,
       REQ_PING = 0x06 };
enum { RSP_STDOUT = 0x81, RSP_STDERR = 0x82, RSP_EXIT = 0x83, RSP_ERROR = 0x84, RSP_OK = 0x85 };
enum { EXEC_STDIN = 1, EXEC_CLEAR_ENV = 2, EXEC_CWD = 4 };
enum { REFRESH_CLOCK = 1, REFRESH_ENTROPY = 2, REFRESH_HOSTNAME = 4 };

extern char **environ;

static int conn = -1;
static unsigned char inbuf[HDR + MAX_PAYLOAD];
static size_t inlen;
static unsigned char outbuf[HDR + OUT_CHUNK];
static pid_t child = -1;

static void put32(unsigned char *p, uint32_t v) { p[0] = v; p[1] = v >> 8; p[2] = v >> 16; p[3] = v >> 24; }
static uint32_t get32(const unsigned char *p) { return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24; }

/* The host is gone (or broke the protocol): take the command's process group with us. */
static void die_with_child(void)
{
	if (child > 0) {
		kill(-child, SIGKILL);
		kill(child, SIGKILL);  /* in case it has not made its own group yet */
		waitpid(child, NULL, 0);
	}
	_exit(0);
}

static void write_all(const unsigned char *p, size_t n)
{
	while (n) {
		ssize_t w = write(conn, p, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			die_with_child();
		p += w;
		n -= w;
	}
}

static void send_frame(int type, const void *data, size_t len)
{
	unsigned char small[HDR + 256];
	if (len <= 256) {  /* one write for the small responses */
		small[0] = type;
		put32(small + 1, len);
		memcpy(small + HDR, data, len);
		write_all(small, HDR + len);
		return;
	}
	unsigned char h[HDR] = {type};
	put32(h + 1, len);
	write_all(h, HDR);
	write_all(data, len);
}

static void send_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void send_error(const char *fmt, ...)
{
	char msg[256];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	send_frame(RSP_ERROR, msg, n < 0 ? 0 : n >= (int)sizeof msg ? sizeof msg - 1 : (size_t)n);
}

static void send_u32(int type, uint32_t v)
{
	unsigned char b[4];
	put32(b, v);
	send_frame(type, b, 4);
}

/* Length of the complete frame at the start of inbuf, 0 if more bytes are needed; a hostile length ends us. */
static size_t frame_ready(void)
{
	if (inlen < HDR)
		return 0;
	uint32_t len = get32(inbuf + 1);
	if (len > MAX_PAYLOAD) {
		send_error("frame of %u bytes is longer than the %u the protocol allows", len, MAX_PAYLOAD);
		die_with_child();
	}
	return inlen >= HDR + len ? HDR + len : 0;
}

/* Read what the socket has into inbuf; EOF or an error means the host is gone. */
static void fill(void)
{
	ssize_t n;
	do
		n = read(conn, inbuf + inlen, sizeof inbuf - inlen);
	while (n < 0 && errno == EINTR);
	if (n <= 0)
		die_with_child();
	inlen += n;
}

static void consume(size_t n)
{
	memmove(inbuf, inbuf + n, inlen - n);
	inlen -= n;
}

/* A cursor over a request payload: u32 and length-prefixed strings, bounds-checked. */
struct cursor { const unsigned char *p; size_t left; int bad; };

static uint32_t take32(struct cursor *c)
{
	if (c->left < 4) {
		c->bad = 1;
		return 0;
	}
	uint32_t v = get32(c->p);
	c->p += 4;
	c->left -= 4;
	return v;
}

static uint64_t take64(struct cursor *c)
{
	uint64_t lo = take32(c);
	return lo | (uint64_t)take32(c) << 32;
}

/* A NUL-terminated copy of the next string (no NUL inside allowed), or NULL with c->bad set. */
static char *take_str(struct cursor *c, int allow_empty)
{
	uint32_t len = take32(c);
	if (c->bad || len > c->left || (!len && !allow_empty) || memchr(c->p, 0, len)) {
		c->bad = 1;
		return NULL;
	}
	char *s = malloc(len + 1);
	if (!s) {
		c->bad = 1;
		return NULL;
	}
	memcpy(s, c->p, len);
	s[len] = 0;
	c->p += len;
	c->left -= len;
	return s;
}

static void set_nonblock(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

static uint32_t wait_status(int st)
{
	return WIFSIGNALED(st) ? 128 + WTERMSIG(st) : WEXITSTATUS(st);
}

/* Read one chunk of command output from *fd into a STDOUT/STDERR frame; at EOF close it. nonblocking reads
 * stop at EAGAIN. Returns 1 if something was sent. */
static int pump(int *fd, int type)
{
	ssize_t n = read(*fd, outbuf + HDR, OUT_CHUNK);
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return 0;
	if (n <= 0) {
		close(*fd);
		*fd = -1;
		return 0;
	}
	outbuf[0] = type;
	put32(outbuf + 1, n);
	write_all(outbuf, HDR + n);
	return 1;
}

/* Write pending stdin to the command's pipe (non-blocking); close the pipe once the host's EOF is reached. A
 * command that closed its stdin gets nothing more (the rest is dropped). */
static void feed(int *ifd, unsigned char *pending, size_t *npending, int eof)
{
	if (*ifd < 0) {
		*npending = 0;
		return;
	}
	if (*npending) {
		ssize_t w = write(*ifd, pending, *npending);
		if (w > 0) {
			memmove(pending, pending + w, *npending - w);
			*npending -= w;
		} else if (w < 0 && errno != EAGAIN && errno != EINTR) {
			*npending = 0;
			eof = 1;
		}
	}
	if (!*npending && eof) {
		close(*ifd);
		*ifd = -1;
	}
}

/* The command's environment: ours with the request's KEY=VALUE entries replacing or adding, or only those. */
static char **merged_env(char **envv, uint32_t envc, int clear)
{
	if (clear)
		return envv;
	size_t n = 0;
	while (environ[n])
		n++;
	char **out = calloc(n + envc + 1, sizeof *out);
	if (!out)
		return environ;
	size_t k = 0;
	for (size_t i = 0; i < n; i++) {
		const char *eq = strchr(environ[i], '=');
		size_t klen = eq ? (size_t)(eq - environ[i]) + 1 : strlen(environ[i]);
		int replaced = 0;
		for (uint32_t j = 0; j < envc && !replaced; j++)
			replaced = !strncmp(envv[j], environ[i], klen);
		if (!replaced)
			out[k++] = environ[i];
	}
	for (uint32_t j = 0; j < envc; j++)
		out[k++] = envv[j];
	return out;
}

/* Start argv in its own session with stdin/stdout/stderr on the given fds; report a failed chdir or exec as
 * {1 or 2, errno} on the close-on-exec pipe report_fd. vfork: no copy of our page tables and no copy-on-write
 * faults afterwards (each is emulated guest-kernel work on an emulating KVM); the child only makes system calls on
 * its own fd table, signal state and cwd, then execs or _exits, writing no memory of ours. */
static pid_t __attribute__((noinline)) spawn(char **argv, char **envp, const char *cwd, int in, int out, int err,
                                             int report_fd)
{
	pid_t pid = vfork();
	if (pid != 0)
		return pid;
	sigset_t none;
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	signal(SIGPIPE, SIG_DFL);  /* ignored dispositions survive exec; a shell's background job (the init starts */
	signal(SIGINT, SIG_DFL);   /* us with &) ignores SIGINT and SIGQUIT, which SIGNAL must be able to deliver */
	signal(SIGQUIT, SIG_DFL);
	setsid();                  /* its own process group, so SIGNAL and a lost host reach all of it */
	dup2(in, 0);
	dup2(out, 1);
	dup2(err, 2);
	int failure[2] = {1, 0};
	if (!cwd || !chdir(cwd)) {
		execvpe(argv[0], argv, envp);
		failure[0] = 2;
	}
	failure[1] = errno;
	if (write(report_fd, failure, sizeof failure) < 0)
		_exit(127);
	_exit(127);
}

static void serve_exec(const unsigned char *payload, uint32_t len)
{
	struct cursor c = {payload, len, 0};
	uint32_t flags = take32(&c), argc = take32(&c), envc = take32(&c);
	if (c.bad || argc == 0 || argc > len / 4 || envc > len / 4) {
		send_error("malformed EXEC request (flags, argc >= 1, envc, then the strings)");
		return;
	}
	char **argv = calloc(argc + 1, sizeof *argv), **envv = calloc(envc + 1, sizeof *envv), *cwd = NULL;
	if (!argv || !envv) {
		send_error("out of memory");
		return;
	}
	for (uint32_t i = 0; i < argc && !c.bad; i++)
		argv[i] = take_str(&c, 1);
	for (uint32_t i = 0; i < envc && !c.bad; i++) {
		envv[i] = take_str(&c, 0);
		if (envv[i] && !strchr(envv[i], '='))
			c.bad = 1;
	}
	if (flags & EXEC_CWD && !c.bad)
		cwd = take_str(&c, 0);
	if (c.bad || c.left || flags & ~(EXEC_STDIN | EXEC_CLEAR_ENV | EXEC_CWD)) {
		send_error("malformed EXEC request (a string overruns the payload, holds a NUL, an environment entry "
		           "lacks '=', unknown flags or trailing bytes)");
		return;
	}
	consume(HDR + len);  /* the strings are copied: what follows in inbuf is STDIN/SIGNAL */

	int in[2] = {-1, -1}, out[2], err[2], st[2];
	if ((flags & EXEC_STDIN && pipe2(in, O_CLOEXEC)) || pipe2(out, O_CLOEXEC) || pipe2(err, O_CLOEXEC) ||
	    pipe2(st, O_CLOEXEC)) {
		send_error("pipe: %s", strerror(errno));
		return;
	}
	sigset_t chld;
	sigemptyset(&chld);
	sigaddset(&chld, SIGCHLD);
	sigprocmask(SIG_BLOCK, &chld, NULL);
	int sfd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
	char **envp = merged_env(envv, envc, flags & EXEC_CLEAR_ENV);
	int null = flags & EXEC_STDIN ? -1 : open("/dev/null", O_RDONLY | O_CLOEXEC);
	child = spawn(argv, envp, cwd, flags & EXEC_STDIN ? in[0] : null, out[1], err[1], st[1]);
	if (child < 0) {
		send_error("vfork: %s", strerror(errno));
		return;
	}
	if (null >= 0)
		close(null);
	close(out[1]);
	close(err[1]);
	close(st[1]);
	if (flags & EXEC_STDIN)
		close(in[0]);
	int failure[2];
	ssize_t n;
	do
		n = read(st[0], failure, sizeof failure);
	while (n < 0 && errno == EINTR);
	close(st[0]);
	if (n == sizeof failure) {
		int status;
		waitpid(child, &status, 0);
		child = -1;
		if (failure[0] == 1)
			send_error("cannot change directory to %s: %s", cwd, strerror(failure[1]));
		else
			send_error("cannot execute %s: %s", argv[0], strerror(failure[1]));
		send_u32(RSP_EXIT, 127);
		return;
	}
	int ofd = out[0], efd = err[0], ifd = in[1], stdin_eof = 0, exited = 0, status = 0;
	set_nonblock(ofd);
	set_nonblock(efd);
	if (ifd >= 0)
		set_nonblock(ifd);
	static unsigned char pending[MAX_PAYLOAD + HDR];  /* stdin not yet taken by the command */
	size_t npending = 0;

	while (!exited) {
		size_t f;  /* requests already buffered first: poll would not report them */
		while (!npending && (f = frame_ready())) {
			int type = inbuf[0];
			uint32_t plen = f - HDR, arg = plen == 4 ? get32(inbuf + HDR) : 0;
			if (type == REQ_STDIN) {
				if (ifd >= 0 && !stdin_eof) {
					memcpy(pending, inbuf + HDR, plen);
					npending = plen;
				}
			} else if (type == REQ_STDIN_EOF) {
				stdin_eof = 1;
			} else if (type == REQ_SIGNAL && arg >= 1 && arg < (uint32_t)NSIG) {
				kill(-child, arg);
			} else {
				send_error("unexpected request type 0x%02x (length %u) while a command runs", type, plen);
				die_with_child();
			}
			consume(f);
			feed(&ifd, pending, &npending, stdin_eof);  /* usually the pipe has room at once */
		}
		struct pollfd p[5] = {
			{npending ? -1 : conn, POLLIN, 0}, {ofd, POLLIN, 0}, {efd, POLLIN, 0}, {sfd, POLLIN, 0},
			{npending ? ifd : -1, POLLOUT, 0},
		};
		if (poll(p, 5, -1) < 0) {
			if (errno == EINTR)
				continue;
			die_with_child();
		}
		if (p[1].revents)
			pump(&ofd, RSP_STDOUT);
		if (p[2].revents)
			pump(&efd, RSP_STDERR);
		if (p[4].revents)
			feed(&ifd, pending, &npending, stdin_eof);
		if (p[0].revents)
			fill();
		if (p[3].revents) {
			struct signalfd_siginfo si;
			while (read(sfd, &si, sizeof si) == sizeof si)
				;
			if (waitpid(child, &status, WNOHANG) == child)
				exited = 1;
		}
	}
	/* Everything the command wrote before it ended is in the pipes: send it, then the status. */
	while (ofd >= 0 && pump(&ofd, RSP_STDOUT))
		;
	while (efd >= 0 && pump(&efd, RSP_STDERR))
		;
	child = -1;
	send_u32(RSP_EXIT, wait_status(status));
}

static void serve_refresh(const unsigned char *payload, uint32_t len)
{
	struct cursor c = {payload, len, 0};
	uint32_t flags = take32(&c);
	uint64_t ns = take64(&c);
	uint32_t elen = take32(&c);
	if (c.bad || elen > c.left) {
		send_error("malformed REFRESH request");
		return;
	}
	const unsigned char *entropy = c.p;
	c.p += elen;
	c.left -= elen;
	char *host = take_str(&c, 1);
	if (c.bad || c.left || flags & ~(REFRESH_CLOCK | REFRESH_ENTROPY | REFRESH_HOSTNAME)) {
		send_error("malformed REFRESH request");
		return;
	}
	if (flags & REFRESH_CLOCK) {
		struct timespec ts = {ns / 1000000000u, ns % 1000000000u};
		if (clock_settime(CLOCK_REALTIME, &ts)) {
			send_error("cannot set the wall clock: %s", strerror(errno));
			return;
		}
	}
	if (flags & REFRESH_ENTROPY && elen) {
		struct rand_pool_info *r = malloc(sizeof *r + elen + 4);
		int fd = open("/dev/random", O_WRONLY | O_CLOEXEC);
		if (!r || fd < 0) {
			send_error("cannot open /dev/random: %s", strerror(errno));
			return;
		}
		r->entropy_count = elen * 8;
		r->buf_size = elen;
		memcpy(r->buf, entropy, elen);
		if (ioctl(fd, RNDADDENTROPY, r)) {
			send_error("RNDADDENTROPY: %s", strerror(errno));
			return;
		}
		/* The CRNG reseeds from the pool only now and then: without this a restored snapshot's clones would
		 * read the same /dev/urandom bytes until then. */
		if (ioctl(fd, RNDRESEEDCRNG)) {
			send_error("RNDRESEEDCRNG: %s", strerror(errno));
			return;
		}
		close(fd);
	}
	if (flags & REFRESH_HOSTNAME && sethostname(host, strlen(host))) {
		send_error("cannot set the hostname to %s: %s", host, strerror(errno));
		return;
	}
	send_frame(RSP_OK, NULL, 0);
}

static void serve(void)
{
	size_t f;
	while (!(f = frame_ready()))
		fill();
	int type = inbuf[0];
	uint32_t len = f - HDR;
	if (type == REQ_EXEC)
		serve_exec(inbuf + HDR, len);
	else if (type == REQ_REFRESH)
		serve_refresh(inbuf + HDR, len);
	else if (type == REQ_PING)
		send_frame(RSP_OK, AGENT_VERSION, strlen(AGENT_VERSION));
	else
		send_error("the first request must be EXEC, REFRESH or PING, not type 0x%02x", type);
}

static int listen_on(const char *unix_path, unsigned port)
{
	int s;
	if (unix_path) {
		struct sockaddr_un a = {.sun_family = AF_UNIX};
		if (strlen(unix_path) >= sizeof a.sun_path) {
			fprintf(stderr, "popek-agent: socket path too long: %s\n", unix_path);
			return -1;
		}
		strcpy(a.sun_path, unix_path);
		s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 16)) {
			fprintf(stderr, "popek-agent: cannot listen on %s: %s\n", unix_path, strerror(errno));
			return -1;
		}
	} else {
		struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_port = port, .svm_cid = VMADDR_CID_ANY};
		s = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 16)) {
			fprintf(stderr, "popek-agent: cannot listen on vsock port %u: %s\n", port, strerror(errno));
			return -1;
		}
	}
	return s;
}

int main(int argc, char **argv)
{
	const char *unix_path = NULL;
	unsigned port = AGENT_PORT;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--unix") && i + 1 < argc)
			unix_path = argv[++i];
		else if (!strcmp(argv[i], "--port") && i + 1 < argc)
			port = strtoul(argv[++i], NULL, 10);
		else {
			fprintf(stderr, "usage: popek-agent [--port N | --unix PATH]\n");
			return 2;
		}
	}
	int s = listen_on(unix_path, port);
	if (s < 0)
		return 1;
	signal(SIGPIPE, SIG_IGN);
	signal(SIGCHLD, SIG_IGN);  /* connection handlers are reaped by the kernel */
	for (;;) {
		conn = accept4(s, NULL, NULL, SOCK_CLOEXEC);
		if (conn < 0) {
			if (errno != EINTR && errno != ECONNABORTED)
				sleep(1);
			continue;
		}
		pid_t pid = fork();
		if (pid == 0) {
			close(s);
			signal(SIGCHLD, SIG_DFL);
			serve();
			_exit(0);
		}
		close(conn);
	}
}
