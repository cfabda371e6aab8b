/* SPDX-License-Identifier: MIT */
/*
 * Unit tests of qmp/: the QMP server in-process, over a real UNIX socket,
 * with a fake event loop (poll(2) over the fds the server asked to watch).
 * Protocol and error texts as QEMU's (checked against qemu-storage-daemon by
 * integration.qmp); hostile input: garbage, huge and split messages, a
 * client that never reads; events; socket ownership; no fd leaks; slow
 * commands (qmp_server_defer): replies in order, clients that leave meanwhile.
 */
#include <CUnit/Basic.h>
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "qmp.h"
#include "testutil.h"

/* ---- a fake loop ---- */

#define MAXW 128
static struct {
	int fd;
	unsigned events;
	qmp_watch_cb *cb;
	void *arg;
	bool on;
} W[MAXW];

static int f_watch(void *opaque, int fd, unsigned events, qmp_watch_cb *cb, void *arg)
{
	for (int i = 0; i < MAXW; i++) {
		if (!W[i].on) {
			W[i] = (typeof(W[0])){fd, events, cb, arg, true};
			return 0;
		}
	}
	return -ENOMEM;
}

static void f_unwatch(void *opaque, int fd)
{
	for (int i = 0; i < MAXW; i++) {
		if (W[i].on && W[i].fd == fd) {
			W[i].on = false;
			return;
		}
	}
}

static struct qmp_loop_ops loop_ops = {f_watch, f_unwatch, NULL};

/* Run ready callbacks until nothing is ready (at most @rounds rounds). */
static void pump(int rounds)
{
	while (rounds-- > 0) {
		struct pollfd p[MAXW];
		int idx[MAXW], n = 0, ready = 0;

		for (int i = 0; i < MAXW; i++) {
			if (W[i].on) {
				p[n] = (struct pollfd){W[i].fd, (short)W[i].events, 0};
				idx[n++] = i;
			}
		}
		if (poll(p, (nfds_t)n, 0) <= 0)
			return;
		for (int k = 0; k < n; k++) {
			int i = idx[k];

			if (p[k].revents && W[i].on && W[i].fd == p[k].fd) {
				ready++;
				W[i].cb(W[i].arg);
			}
		}
		if (!ready)
			return;
	}
}

/* ---- commands ---- */

static int h_echo(void *opaque, json_t *args, json_t **ret, char *err, size_t errlen)
{
	*ret = json_deep_copy(args);
	return 0;
}

static int h_fail(void *opaque, json_t *args, json_t **ret, char *err, size_t errlen)
{
	snprintf(err, errlen, "it failed: %s", json_string_value(json_object_get(args, "why")));
	return -EIO;
}

/* Slow commands: "slow" keeps its reply in held[] for the test to give. */
static struct qmp_pending *held[4];
static int nheld;

static struct qmp_server *srv;

static int a_slow(void *opaque, json_t *args, json_t **ret, char *err, size_t errlen)
{
	CU_ASSERT_FATAL(nheld < 4);
	held[nheld] = qmp_server_defer(srv);
	CU_ASSERT_FATAL(held[nheld] != NULL);
	CU_ASSERT(qmp_server_defer(srv) == NULL); /* once */
	nheld++;
	return QMP_PENDING;
}

/* A handler that deferred may still answer at once, with a value or an error... */
static int a_now(void *opaque, json_t *args, json_t **ret, char *err, size_t errlen)
{
	CU_ASSERT(qmp_server_defer(srv) != NULL);
	if (json_object_get(args, "why")) {
		snprintf(err, errlen, "refused: %s",
			 json_string_value(json_object_get(args, "why")));
		return -EBUSY;
	}
	*ret = json_pack("{s:s}", "now", "yes");
	return 0;
}

/* ...or complete its qmp_pending before it returns QMP_PENDING. */
static int a_inline(void *opaque, json_t *args, json_t **ret, char *err, size_t errlen)
{
	qmp_pending_return(qmp_server_defer(srv), json_pack("{s:s}", "inline", "yes"));
	return QMP_PENDING;
}

static const struct qmp_command cmds[] = {
    {"echo", {{"s", QMP_STR, false}, {"i", QMP_INT, true}, {"b", QMP_BOOL, true}, {NULL}}, h_echo},
    {"fail", {{"why", QMP_STR, false}, {NULL}}, h_fail},
    {"slow", {{NULL}}, a_slow},
    {"now", {{"why", QMP_STR, true}, {NULL}}, a_now},
    {"inline", {{NULL}}, a_inline},
    {NULL},
};

static char dir[256], path[300];

static void start(void)
{
	json_t *v = json_pack("{s:i}", "x", 1);

	memset(W, 0, sizeof(W));
	snprintf(path, sizeof(path), "%s/q.sock", dir);
	CU_ASSERT_FATAL(qmp_server_init(&srv, path, &loop_ops, cmds, v, NULL) == 0);
	json_decref(v);
}

static int client(void)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	memcpy(sa.sun_path, path, strlen(path) + 1);
	CU_ASSERT_FATAL(connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0);
	pump(4);
	return fd;
}

/* Read one line (reply) from @fd, pumping the server; NULL on EOF. */
static json_t *get(int fd)
{
	static char buf[1 << 20];
	size_t len = 0;

	for (int tries = 0; tries < 500; tries++) {
		ssize_t n;

		pump(2);
		n = recv(fd, buf + len, 1, MSG_DONTWAIT);
		if (n == 0 || (n < 0 && errno == ECONNRESET))
			return NULL;
		if (n < 0) {
			CU_ASSERT_FATAL(errno == EAGAIN);
			continue;
		}
		tries = 0;
		len++;
		CU_ASSERT_FATAL(len < sizeof(buf));
		if (buf[len - 1] == '\n') {
			json_t *j = json_loadb(buf, len, 0, NULL);

			CU_ASSERT_FATAL(j != NULL);
			CU_ASSERT(len >= 2 && buf[len - 2] == '\r');
			return j;
		}
	}
	CU_FAIL_FATAL("no reply");
	return NULL;
}

static void put(int fd, const char *s)
{
	CU_ASSERT_FATAL(send(fd, s, strlen(s), MSG_NOSIGNAL) == (ssize_t)strlen(s));
}

static void expect_err(int fd, const char *cls, const char *desc)
{
	json_t *r = get(fd), *e = json_object_get(r, "error");

	CU_ASSERT_FATAL(e != NULL);
	CU_ASSERT_STRING_EQUAL(json_string_value(json_object_get(e, "class")), cls);
	if (!strstr(json_string_value(json_object_get(e, "desc")), desc))
		fprintf(stderr, "desc '%s' lacks '%s'\n",
			json_string_value(json_object_get(e, "desc")), desc);
	CU_ASSERT(strstr(json_string_value(json_object_get(e, "desc")), desc) != NULL);
	json_decref(r);
}

static int negotiated(void)
{
	int fd = client();
	json_t *g = get(fd), *r;

	CU_ASSERT(json_is_array(json_object_get(json_object_get(g, "QMP"), "capabilities")));
	json_decref(g);
	put(fd, "{\"execute\": \"qmp_capabilities\"}\n");
	r = get(fd);
	CU_ASSERT(json_is_object(json_object_get(r, "return")));
	json_decref(r);
	return fd;
}

static void test_protocol(void)
{
	int base = tu_count_fds(), fd;
	json_t *r;

	start();
	fd = client();
	r = get(fd);
	CU_ASSERT(json_integer_value(json_object_get(
		      json_object_get(json_object_get(r, "QMP"), "version"), "x")) == 1);
	json_decref(r);
	put(fd, "{\"execute\": \"echo\", \"arguments\": {\"s\": \"a\"}}");
	expect_err(fd, "CommandNotFound", "Expecting capabilities negotiation");
	put(fd, "{\"execute\": \"qmp_capabilities\", \"id\": [1]}");
	r = get(fd);
	{
		json_t *want = json_pack("[i]", 1);

		CU_ASSERT(json_equal(json_object_get(r, "id"), want));
		json_decref(want);
	}
	json_decref(r);
	put(fd, "{\"execute\": \"qmp_capabilities\"}");
	expect_err(fd, "CommandNotFound", "already complete");
	put(fd, "{\"execute\": \"echo\", \"arguments\": {\"s\": \"x\", \"i\": -5, \"b\": true}, "
		"\"id\": \"q\"}");
	r = get(fd);
	CU_ASSERT_STRING_EQUAL(json_string_value(json_object_get(r, "id")), "q");
	CU_ASSERT(json_integer_value(json_object_get(json_object_get(r, "return"), "i")) == -5);
	json_decref(r);
	put(fd, "{\"execute\": \"echo\", \"arguments\": {\"s\": 1}}");
	expect_err(fd, "GenericError", "Invalid parameter type for 's', expected: string");
	put(fd, "{\"execute\": \"echo\", \"arguments\": {\"s\": \"a\", \"i\": 1.5}}");
	expect_err(fd, "GenericError", "Invalid parameter type for 'i', expected: integer");
	put(fd, "{\"execute\": \"echo\", \"arguments\": {\"s\": \"a\", \"b\": 0}}");
	expect_err(fd, "GenericError", "Invalid parameter type for 'b', expected: boolean");
	put(fd, "{\"execute\": \"echo\"}");
	expect_err(fd, "GenericError", "Parameter 's' is missing");
	put(fd, "{\"execute\": \"echo\", \"arguments\": {\"s\": \"a\", \"z\": 1}}");
	expect_err(fd, "GenericError", "Parameter 'z' is unexpected");
	put(fd, "{\"execute\": \"fail\", \"arguments\": {\"why\": \"because\"}}");
	expect_err(fd, "GenericError", "it failed: because");
	put(fd, "{\"execute\": \"nope\"}");
	expect_err(fd, "CommandNotFound", "The command nope has not been found");
	put(fd, "\"str\"");
	expect_err(fd, "GenericError", "JSON parse error");
	put(fd, "{\"execute\": \"echo\", \"arguments\": {\"s\": \"a\"}, \"x\": 1}");
	expect_err(fd, "GenericError", "QMP input member 'x' is unexpected");
	put(fd, "{\"arguments\": {}}");
	expect_err(fd, "GenericError", "QMP input lacks member 'execute'");
	/* Two in one write; one over three writes. */
	put(fd, "{\"execute\": \"echo\", \"arguments\": {\"s\": \"1\"}, \"id\": 1}  \r\n\t"
		"{\"execute\": \"echo\", \"arguments\": {\"s\": \"2\"}, \"id\": 2}");
	r = get(fd);
	CU_ASSERT(json_integer_value(json_object_get(r, "id")) == 1);
	json_decref(r);
	r = get(fd);
	CU_ASSERT(json_integer_value(json_object_get(r, "id")) == 2);
	json_decref(r);
	put(fd, "{\"execute\": \"ec");
	pump(3);
	put(fd, "ho\", \"arguments\": {\"s\": \"");
	pump(3);
	put(fd, "3\"}, \"id\": 3}");
	r = get(fd);
	CU_ASSERT(json_integer_value(json_object_get(r, "id")) == 3);
	json_decref(r);
	close(fd);
	pump(4);
	CU_ASSERT(qmp_server_clients(srv) == 0);
	qmp_server_exit(srv);
	CU_ASSERT(access(path, F_OK) != 0); /* removed */
	CU_ASSERT(tu_count_fds() == base);
}

static void test_hostile(void)
{
	int base = tu_count_fds(), fd;
	uint64_t rng = 12345;
	const char *pre = "{\"execute\": \"echo\", \"arguments\": {\"s\": \"";
	char *big;
	json_t *r;

	start();
	/* Random bytes from many clients: replies or a close, never a crash. */
	for (int c = 0; c < 50; c++) {
		char buf[512];

		fd = c % 2 ? negotiated() : client();
		for (int m = 0; m < 20; m++) {
			size_t n = 1 + tu_xorshift64(&rng) % sizeof(buf);

			for (size_t i = 0; i < n; i++)
				buf[i] = (char)tu_xorshift64(&rng);
			if (send(fd, buf, n, MSG_NOSIGNAL | MSG_DONTWAIT) < 0)
				break;
			pump(3);
		}
		close(fd);
		pump(3);
	}
	CU_ASSERT(qmp_server_clients(srv) == 0);

	/* Exactly the cap without an end: an error, then the connection is
	 * closed (exactly: more unread input would make the close a reset). */
	fd = negotiated();
	big = malloc(QMP_MAX_MSG + 100);
	memset(big, ' ', QMP_MAX_MSG + 100);
	memcpy(big, pre, strlen(pre));
	memset(big + strlen(pre), 'a', QMP_MAX_MSG);
	CU_ASSERT(send(fd, big, QMP_MAX_MSG, MSG_NOSIGNAL) > 0);
	free(big);
	expect_err(fd, "GenericError", "too large");
	CU_ASSERT(get(fd) == NULL);
	close(fd);

	/* Not reading: the server stops reading too and catches up later. */
	fd = negotiated();
	for (int i = 0; i < 3000; i++) {
		const char *m = "{\"execute\": \"echo\", \"arguments\": {\"s\": \"xxxxxxxxxxxxxxxx"
				"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"}}";

		if (send(fd, m, strlen(m), MSG_NOSIGNAL | MSG_DONTWAIT) < 0) {
			CU_ASSERT(errno == EAGAIN);
			break;
		}
		pump(1);
	}
	pump(5);
	CU_ASSERT(qmp_server_clients(srv) == 1);
	for (int i = 0; i < 10; i++) {
		r = get(fd);
		CU_ASSERT(json_object_get(r, "return") != NULL);
		json_decref(r);
	}
	close(fd);
	pump(5);
	CU_ASSERT(qmp_server_clients(srv) == 0);
	qmp_server_exit(srv);
	CU_ASSERT(tu_count_fds() == base);
}

static void test_events_and_socket(void)
{
	struct qmp_server *other;
	int a, b;
	json_t *r;

	start();
	a = negotiated();
	b = client();
	json_decref(get(b)); /* greeting */
	qmp_server_event(srv, "SHUTDOWN", json_pack("{s:b}", "guest", 0));
	r = get(a);
	CU_ASSERT_STRING_EQUAL(json_string_value(json_object_get(r, "event")), "SHUTDOWN");
	CU_ASSERT(json_is_integer(json_object_get(json_object_get(r, "timestamp"), "seconds")));
	json_decref(r);
	/* b did not negotiate: no event; its next reply is to its command. */
	put(b, "{\"execute\": \"qmp_capabilities\", \"id\": 9}");
	r = get(b);
	CU_ASSERT(json_integer_value(json_object_get(r, "id")) == 9);
	json_decref(r);
	/* A live socket is refused. */
	CU_ASSERT(qmp_server_init(&other, path, &loop_ops, cmds, NULL, NULL) == -EADDRINUSE);
	close(a);
	close(b);
	qmp_server_exit(srv);
	/* A stale socket file (nobody listening) is replaced. */
	{
		struct sockaddr_un sa = {.sun_family = AF_UNIX};
		int fd = socket(AF_UNIX, SOCK_STREAM, 0);
		struct stat st;

		memcpy(sa.sun_path, path, strlen(path) + 1);
		CU_ASSERT(bind(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0);
		close(fd);
		start();
		CU_ASSERT(stat(path, &st) == 0 && (st.st_mode & 0777) == 0600);
		qmp_server_exit(srv);
	}
}

/* Nothing to read from @fd now (pumping the server meanwhile). */
static bool silent(int fd)
{
	char ch;

	pump(5);
	return recv(fd, &ch, 1, MSG_DONTWAIT | MSG_PEEK) < 0 && errno == EAGAIN;
}

static json_int_t reply_id(json_t *r)
{
	json_int_t id = json_integer_value(json_object_get(r, "id"));

	json_decref(r);
	return id;
}

/*
 * Message boundaries are found incrementally: brackets and quotes inside
 * strings (and escaped quotes) do not end a message; one sent a byte at a
 * time is answered once complete; a byte that cannot be JSON gets its error
 * at once, without waiting for more input; an unclosed nesting deeper than
 * the buffer is "too large".
 */
static void test_boundaries(void)
{
	const char *m = "{\"execute\": \"echo\", \"arguments\": {\"s\": \"}]\\\"{[\"}, "
			"\"id\": [1, {\"a\": \"]\"}]}";
	int fd;
	json_t *r;
	char *deep;

	start();
	fd = negotiated();
	for (const char *p = m; *p; p++) {
		CU_ASSERT_FATAL(send(fd, p, 1, MSG_NOSIGNAL) == 1);
		pump(1);
		if (p[1] && (p - m) % 16 == 0)
			CU_ASSERT(silent(fd)); /* nothing answered before the end */
	}
	r = get(fd);
	CU_ASSERT(json_object_get(r, "return") != NULL);
	CU_ASSERT(json_is_array(json_object_get(r, "id")));
	json_decref(r);

	put(fd, "{bad json"); /* no newline, no closing brace: answered anyway */
	expect_err(fd, "GenericError", "JSON parse error");
	put(fd, "\n{\"execute\": \"echo\", \"arguments\": {\"s\": \"a\x01");
	expect_err(fd, "GenericError", "JSON parse error");
	put(fd, "\n123 \n{\"execute\": \"echo\", \"arguments\": {\"s\": \"x\"}, \"id\": 5}");
	expect_err(fd, "GenericError", "JSON parse error");
	r = get(fd);
	CU_ASSERT_EQUAL(json_integer_value(json_object_get(r, "id")), 5);
	json_decref(r);

	deep = malloc(QMP_MAX_MSG + 16);
	CU_ASSERT_FATAL(deep != NULL);
	memset(deep, '[', QMP_MAX_MSG + 15);
	deep[QMP_MAX_MSG + 15] = '\0';
	send(fd, deep, QMP_MAX_MSG + 15, MSG_NOSIGNAL | MSG_DONTWAIT);
	expect_err(fd, "GenericError", "too large");
	CU_ASSERT(get(fd) == NULL); /* closed */
	free(deep);
	close(fd);
	qmp_server_exit(srv);
	srv = NULL;
}

static void test_async(void)
{
	int base = tu_count_fds(), a, b;
	json_t *r;

	start();
	nheld = 0;
	a = negotiated();
	b = negotiated();
	/* A slow command holds a's later commands, not b's, nor the events. */
	put(a, "{\"execute\": \"slow\", \"id\": 1}"
	       "{\"execute\": \"echo\", \"arguments\": {\"s\": \"x\"}, \"id\": 2}");
	CU_ASSERT(silent(a));
	CU_ASSERT_FATAL(nheld == 1);
	CU_ASSERT(qmp_pending_connected(held[0]));
	put(a, "{\"execute\": \"echo\", \"arguments\": {\"s\": \"y\"}, \"id\": 3}");
	CU_ASSERT(silent(a));
	put(b, "{\"execute\": \"echo\", \"arguments\": {\"s\": \"z\"}, \"id\": 7}");
	CU_ASSERT(reply_id(get(b)) == 7);
	qmp_server_event(srv, "JOB_STATUS_CHANGE", json_pack("{s:s}", "id", "j"));
	r = get(a);
	CU_ASSERT_STRING_EQUAL(json_string_value(json_object_get(r, "event")), "JOB_STATUS_CHANGE");
	json_decref(r);
	json_decref(get(b));
	CU_ASSERT(silent(a));
	/* The reply, then the held commands' replies, in order. */
	qmp_pending_return(held[0], json_pack("{s:i}", "done", 1));
	r = get(a);
	CU_ASSERT(json_integer_value(json_object_get(json_object_get(r, "return"), "done")) == 1);
	CU_ASSERT(reply_id(r) == 1);
	CU_ASSERT(reply_id(get(a)) == 2);
	CU_ASSERT(reply_id(get(a)) == 3);

	/* An error later; a slow command behind a slow command. */
	nheld = 0;
	put(a, "{\"execute\": \"slow\", \"id\": 10}{\"execute\": \"slow\", \"id\": 11}"
	       "{\"execute\": \"now\", \"id\": 12}");
	CU_ASSERT(silent(a));
	CU_ASSERT_FATAL(nheld == 1);
	qmp_pending_error(held[0], "Snapshot with name '%s' already exists", "s1");
	r = get(a);
	CU_ASSERT_STRING_EQUAL(
	    json_string_value(json_object_get(json_object_get(r, "error"), "desc")),
	    "Snapshot with name 's1' already exists");
	CU_ASSERT(reply_id(r) == 10);
	CU_ASSERT(silent(a));
	CU_ASSERT_FATAL(nheld == 2);
	qmp_pending_return(held[1], NULL);
	r = get(a);
	CU_ASSERT(json_is_object(json_object_get(r, "return")));
	CU_ASSERT(reply_id(r) == 11);
	r = get(a);
	CU_ASSERT_STRING_EQUAL(
	    json_string_value(json_object_get(json_object_get(r, "return"), "now")), "yes");
	CU_ASSERT(reply_id(r) == 12);

	/* Answered at once: a value, an error, completed inside the handler. */
	put(a, "{\"execute\": \"now\", \"arguments\": {\"why\": \"busy\"}, \"id\": 20}"
	       "{\"execute\": \"inline\", \"id\": 21}"
	       "{\"execute\": \"echo\", \"arguments\": {\"s\": \"x\"}, \"id\": 22}");
	r = get(a);
	CU_ASSERT_STRING_EQUAL(
	    json_string_value(json_object_get(json_object_get(r, "error"), "desc")),
	    "refused: busy");
	CU_ASSERT(reply_id(r) == 20);
	r = get(a);
	CU_ASSERT_STRING_EQUAL(
	    json_string_value(json_object_get(json_object_get(r, "return"), "inline")), "yes");
	CU_ASSERT(reply_id(r) == 21);
	CU_ASSERT(reply_id(get(a)) == 22);

	/* The client leaves while its reply is pending: the reply goes
	 * nowhere (ASan would see a use after free), the others go on. */
	nheld = 0;
	put(a, "{\"execute\": \"slow\", \"id\": 30}{\"execute\": \"echo\", \"arguments\": "
	       "{\"s\": \"x\"}, \"id\": 31}");
	CU_ASSERT(silent(a));
	CU_ASSERT_FATAL(nheld == 1);
	close(a);
	pump(5);
	/* Not watched while pending: the close is seen when the reply is sent. */
	qmp_pending_return(held[0], json_pack("{s:s}", "late", "yes"));
	pump(5);
	CU_ASSERT(qmp_server_clients(srv) == 1);
	put(b, "{\"execute\": \"echo\", \"arguments\": {\"s\": \"z\"}, \"id\": 8}");
	CU_ASSERT(reply_id(get(b)) == 8);

	/* Deferring outside a handler is refused. */
	CU_ASSERT(qmp_server_defer(srv) == NULL);
	/* The server exits with a reply pending: the handle stays valid. */
	nheld = 0;
	put(b, "{\"execute\": \"slow\", \"id\": 40}");
	CU_ASSERT(silent(b));
	CU_ASSERT_FATAL(nheld == 1);
	qmp_server_exit(srv);
	CU_ASSERT(!qmp_pending_connected(held[0]));
	qmp_pending_error(held[0], "too late");
	close(b);
	CU_ASSERT(tu_count_fds() == base);
}

int main(void)
{
	CU_pSuite s;
	unsigned fails;

	if (tu_mkdtemp(dir, sizeof(dir), "qmp") < 0)
		return 1;
	if (CU_initialize_registry() != CUE_SUCCESS)
		return 1;
	s = CU_add_suite("qmp", NULL, NULL);
	CU_add_test(s, "protocol, schema checks, framing", test_protocol);
	CU_add_test(s, "hostile clients: garbage, oversized, not reading", test_hostile);
	CU_add_test(s, "events, socket ownership and mode", test_events_and_socket);
	CU_add_test(s, "slow commands: pending replies, order, leaving clients", test_async);
	CU_add_test(s, "message boundaries found incrementally", test_boundaries);
	fails = tu_cunit_run();
	rmdir(dir);
	return fails ? 1 : 0;
}
