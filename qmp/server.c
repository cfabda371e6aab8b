/* SPDX-License-Identifier: MIT */
/*
 * The QMP server: listening socket, connections, framing, dispatch (qmp.h).
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include "qmp.h"
#include "util.h"
#include "vlog.h"

/*
 * Where the next message in the input ends, found incrementally: each byte
 * is looked at once however the message arrives (a message sent one byte at
 * a time must not be parsed again from its start at every byte: that is
 * quadratic, and the loop that serves the guest would pay for it).
 */
struct scan {
	size_t pos;     /* bytes of the current message scanned */
	unsigned depth; /* open { and [ outside strings */
	bool in_str, esc, tok;
};

struct client {
	struct qmp_server *s;
	int fd;
	bool negotiated;
	bool closing;                /* close once the output is sent */
	unsigned watching;           /* events watched now (0 = none) */
	bool busy;                   /* inside client_ready: it rewatches or closes at its end */
	struct qmp_pending *pending; /* a reply owed by a slow command: input waits */
	char in[QMP_MAX_MSG];        /* unparsed input */
	size_t in_len;
	struct scan scan; /* how far in[] is known to hold no complete message */
	char *out;        /* unsent replies */
	size_t out_len, out_cap;
	struct client *next;
};

struct qmp_pending {
	struct client *c; /* NULL once the client is gone */
	json_t *id;
};

struct qmp_server {
	int fd;
	char *path;
	struct util_sock sock; /* unlinked at exit only while the path names it */
	const struct qmp_loop_ops *loop;
	const struct qmp_command *cmds;
	json_t *version;
	void *opaque;
	struct client *clients;
	unsigned nclients;
	/* While a handler runs: its client, the command's id, the reply it deferred. */
	struct client *cur;
	json_t *cur_id;
	struct qmp_pending *deferred;
	bool replied; /* ...and answered it already */
};

static void client_close(struct client *c)
{
	struct qmp_server *s = c->s;

	if (c->watching)
		s->loop->unwatch(s->loop->opaque, c->fd);
	if (c->pending)
		c->pending->c = NULL; /* its owner replies into the void */
	close(c->fd);
	for (struct client **p = &s->clients; *p; p = &(*p)->next) {
		if (*p == c) {
			*p = c->next;
			break;
		}
	}
	s->nclients--;
	free(c->out);
	free(c);
}

static void client_ready(void *arg);

/*
 * Watch for room to send when replies wait, else for input unless a reply is
 * pending (the client's next commands wait in the socket meanwhile).
 */
static int client_rewatch(struct client *c)
{
	unsigned want = c->out_len ? POLLOUT : c->pending ? 0 : POLLIN;

	if (c->watching == want)
		return 0;
	if (c->watching)
		c->s->loop->unwatch(c->s->loop->opaque, c->fd);
	c->watching = 0;
	if (!want)
		return 0;
	if (c->s->loop->watch(c->s->loop->opaque, c->fd, want, client_ready, c) < 0)
		return -ENOMEM;
	c->watching = want;
	return 0;
}

/* Send what is queued; -errno when the connection is dead. */
static int client_flush(struct client *c)
{
	while (c->out_len) {
		ssize_t n = send(c->fd, c->out, c->out_len, MSG_DONTWAIT | MSG_NOSIGNAL);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return 0;
			return -errno;
		}
		memmove(c->out, c->out + n, c->out_len - (size_t)n);
		c->out_len -= (size_t)n;
	}
	return 0;
}

/* Queue one reply (consumes @msg). */
static void client_send(struct client *c, json_t *msg)
{
	char *text = json_dumps(msg, 0);
	size_t len;

	json_decref(msg);
	if (!text) {
		c->closing = true;
		return;
	}
	len = strlen(text);
	if (c->out_len + len + 2 > QMP_MAX_OUT) {
		vlog(VLOG_WARN, NULL, "qmp: client does not read its replies; closing it");
		c->closing = true;
		c->out_len = 0;
		free(text);
		return;
	}
	if (c->out_len + len + 2 > c->out_cap) {
		size_t cap = c->out_cap ? c->out_cap : 4096;
		char *p;

		while (cap < c->out_len + len + 2)
			cap *= 2;
		p = realloc(c->out, cap);
		if (!p) {
			c->closing = true;
			free(text);
			return;
		}
		c->out = p;
		c->out_cap = cap;
	}
	memcpy(c->out + c->out_len, text, len);
	memcpy(c->out + c->out_len + len, "\r\n", 2);
	c->out_len += len + 2;
	free(text);
}

static void send_error(struct client *c, json_t *id, const char *cls, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void send_error(struct client *c, json_t *id, const char *cls, const char *fmt, ...)
{
	char desc[512];
	va_list ap;
	json_t *msg;

	va_start(ap, fmt);
	vsnprintf(desc, sizeof(desc), fmt, ap);
	va_end(ap);
	msg = json_pack("{s:{s:s,s:s}}", "error", "class", cls, "desc", desc);
	if (msg && id)
		json_object_set(msg, "id", id);
	if (msg)
		client_send(c, msg);
}

static const char *type_name(enum qmp_type t)
{
	switch (t) {
	case QMP_STR:
		return "string";
	case QMP_INT:
		return "integer";
	case QMP_BOOL:
		return "boolean";
	case QMP_INT_LIST:
	case QMP_LIST:
		return "array";
	}
	return "?";
}

static bool type_ok(enum qmp_type t, json_t *v)
{
	switch (t) {
	case QMP_STR:
		return json_is_string(v);
	case QMP_INT:
		return json_is_integer(v);
	case QMP_BOOL:
		return json_is_boolean(v);
	case QMP_INT_LIST:
	case QMP_LIST:
		return json_is_array(v);
	}
	return false;
}

/* Check @args against the schema of @cmd, as QEMU words it. */
static bool args_ok(struct client *c, json_t *id, const struct qmp_command *cmd, json_t *args)
{
	const char *key;
	json_t *v;

	json_object_foreach(args, key, v)
	{
		const struct qmp_arg *a = cmd->args;

		while (a->name && strcmp(a->name, key) != 0)
			a++;
		if (!a->name) {
			send_error(c, id, "GenericError", "Parameter '%s' is unexpected", key);
			return false;
		}
		if (!type_ok(a->type, v)) {
			send_error(c, id, "GenericError",
				   "Invalid parameter type for '%s', expected: %s", key,
				   type_name(a->type));
			return false;
		}
		for (size_t i = 0; a->type == QMP_INT_LIST && i < json_array_size(v); i++) {
			if (!json_is_integer(json_array_get(v, i))) {
				send_error(
				    c, id, "GenericError",
				    "Invalid parameter type for '%s[%zu]', expected: integer", key,
				    i);
				return false;
			}
		}
	}
	for (const struct qmp_arg *a = cmd->args; a->name; a++) {
		if (!a->optional && !json_object_get(args, a->name)) {
			send_error(c, id, "GenericError", "Parameter '%s' is missing", a->name);
			return false;
		}
	}
	return true;
}

/* One complete JSON value from the client. */
static void dispatch(struct client *c, json_t *req)
{
	struct qmp_server *s = c->s;
	const struct qmp_command *cmd;
	json_t *id, *exec, *args, *v, *ret = NULL, *msg;
	const char *key, *name;
	char err[512];
	int r;

	if (!json_is_object(req)) {
		send_error(c, NULL, "GenericError", "QMP input must be a JSON object");
		return;
	}
	id = json_object_get(req, "id");
	json_object_foreach(req, key, v)
	{
		if (strcmp(key, "execute") != 0 && strcmp(key, "arguments") != 0 &&
		    strcmp(key, "id") != 0) {
			send_error(c, id, "GenericError", "QMP input member '%s' is unexpected",
				   key);
			return;
		}
	}
	exec = json_object_get(req, "execute");
	if (!exec) {
		send_error(c, id, "GenericError", "QMP input lacks member 'execute'");
		return;
	}
	if (!json_is_string(exec)) {
		send_error(c, id, "GenericError", "QMP input member 'execute' must be a string");
		return;
	}
	args = json_object_get(req, "arguments");
	if (args && !json_is_object(args)) {
		send_error(c, id, "GenericError", "QMP input member 'arguments' must be an object");
		return;
	}
	name = json_string_value(exec);
	if (strcmp(name, "qmp_capabilities") == 0) {
		if (c->negotiated) {
			send_error(c, id, "CommandNotFound",
				   "Capabilities negotiation is already complete, command ignored");
			return;
		}
		if (args && json_object_size(args)) {
			/* "enable": [] is the only form we accept (no capabilities). */
			json_t *en = json_object_get(args, "enable");

			if (!en || json_object_size(args) != 1 || !json_is_array(en) ||
			    json_array_size(en)) {
				send_error(c, id, "GenericError",
					   "Capability negotiation: no capabilities offered");
				return;
			}
		}
		c->negotiated = true;
		ret = json_object();
		goto reply;
	}
	if (!c->negotiated) {
		send_error(c, id, "CommandNotFound",
			   "Expecting capabilities negotiation with 'qmp_capabilities'");
		return;
	}
	for (cmd = s->cmds; cmd->name; cmd++) {
		if (strcmp(cmd->name, name) == 0)
			break;
	}
	if (!cmd->name) {
		send_error(c, id, "CommandNotFound", "The command %.200s has not been found", name);
		return;
	}
	if (!args) {
		args = json_object();
		if (!args)
			return;
	} else {
		json_incref(args);
	}
	if (!args_ok(c, id, cmd, args)) {
		json_decref(args);
		return;
	}
	err[0] = '\0';
	s->cur = c;
	s->cur_id = id;
	s->deferred = NULL;
	s->replied = false;
	r = cmd->handler(s->opaque, args, &ret, err, sizeof(err));
	json_decref(args);
	s->cur = NULL;
	if (s->replied) {
		json_decref(ret); /* deferred and answered already */
		return;
	}
	if (s->deferred) {
		struct qmp_pending *p = s->deferred;

		s->deferred = NULL;
		if (r == QMP_PENDING)
			return; /* p belongs to the handler now, and may be gone */
		/* Deferred, then answered at once after all: that answer now. */
		c->pending = NULL;
		p->c = NULL;
		json_decref(p->id);
		free(p);
	} else if (r == QMP_PENDING) {
		vlog(VLOG_ERROR, NULL, "qmp: %s: pending without a deferred reply", name);
		r = -EIO;
	}
	if (r < 0) {
		json_decref(ret);
		send_error(c, id, "GenericError", "%s", err[0] ? err : strerror(-r));
		return;
	}
	if (!ret)
		ret = json_object();
reply:
	msg = json_object();
	if (!msg || !ret || json_object_set_new(msg, "return", ret) < 0) {
		json_decref(msg);
		return;
	}
	if (id)
		json_object_set(msg, "id", id);
	client_send(c, msg);
}

static bool is_space(char ch)
{
	return ch == ' ' || ch == '\t' || ch == '\r' || ch == '\n';
}

/*
 * Scan @c's input from @start (a message's first byte) for the end of that
 * JSON value: an object or array whose brackets close (outside strings), a
 * string's closing quote, or a bare token's end (whitespace or a structural
 * character). Returns the offset just past it, or 0: not there yet. A byte
 * that cannot be JSON there ends it early, so that the parser reports the
 * error at once (as QEMU's lexer does) instead of waiting for more input.
 */
static size_t scan_end(struct client *c, size_t start)
{
	struct scan *sc = &c->scan;

	for (size_t i = start + sc->pos; i < c->in_len; i++, sc->pos++) {
		char ch = c->in[i];

		if (sc->in_str) {
			if ((unsigned char)ch < 0x20)
				return i + 1; /* not allowed in a string: the parser says so now */
			if (sc->esc) {
				sc->esc = false;
			} else if (ch == '\\') {
				sc->esc = true;
			} else if (ch == '"') {
				sc->in_str = false;
				if (!sc->depth)
					return i + 1;
			}
			continue;
		}
		if (sc->tok && !sc->depth &&
		    (is_space(ch) || ch == '{' || ch == '[' || ch == '}' || ch == ']' || ch == '"'))
			return i;
		switch (ch) {
		case '"':
			sc->in_str = true;
			break;
		case '{':
		case '[':
			sc->depth++;
			break;
		case '}':
		case ']':
			if (sc->depth <= 1)
				return i + 1; /* closed, or a stray closer: the parser says which */
			sc->depth--;
			break;
		default:
			if (!is_space(ch) && (!ch || !strchr(",:0123456789+-.eEtrufalsn", ch)))
				return i + 1; /* no JSON has it here: the parser says so now */
			if (!sc->depth && !is_space(ch))
				sc->tok = true;
		}
	}
	return 0;
}

/* Parse and run every complete message in the input buffer. */
static void client_parse(struct client *c)
{
	size_t pos = 0;

	while (!c->closing && !c->pending) {
		json_error_t e;
		json_t *req;
		size_t end;

		if (!c->scan.pos) {
			while (pos < c->in_len && is_space(c->in[pos]))
				pos++;
		}
		if (pos == c->in_len)
			break;
		end = scan_end(c, pos);
		if (!end)
			break; /* wait for the rest; what was scanned stays scanned */
		c->scan = (struct scan){0};
		req = json_loadb(c->in + pos, end - pos, JSON_DISABLE_EOF_CHECK, &e);
		if (req) {
			pos += (size_t)e.position;
			dispatch(c, req);
			json_decref(req);
			continue;
		}
		send_error(c, NULL, "GenericError", "JSON parse error, %s", e.text);
		/* Start again after the line that failed (or drop it all). */
		{
			const char *nl = memchr(c->in + pos, '\n', c->in_len - pos);

			pos = nl ? (size_t)(nl - c->in) + 1 : c->in_len;
		}
	}
	memmove(c->in, c->in + pos, c->in_len - pos);
	c->in_len -= pos;
	if (c->in_len == sizeof(c->in) && !c->closing && !c->pending) {
		send_error(c, NULL, "GenericError", "QMP message too large (over %d bytes)",
			   QMP_MAX_MSG);
		c->closing = true;
	}
}

static void client_ready(void *arg)
{
	struct client *c = arg;
	bool eof = false;

	c->busy = true;
	if (c->out_len && client_flush(c) < 0)
		goto close;
	if (!c->out_len && !c->pending && c->in_len) {
		/* Commands that waited for a pending reply. */
		client_parse(c);
		if (client_flush(c) < 0)
			goto close;
	}
	while (!c->out_len && !c->closing && !c->pending && c->in_len < sizeof(c->in)) {
		ssize_t n = recv(c->fd, c->in + c->in_len, sizeof(c->in) - c->in_len, MSG_DONTWAIT);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			break;
		if (n <= 0) {
			eof = true; /* a half-sent message is dropped with the connection */
			break;
		}
		c->in_len += (size_t)n;
		client_parse(c);
		if (client_flush(c) < 0)
			goto close;
	}
	if (eof || (c->closing && !c->out_len))
		goto close;
	if (client_rewatch(c) < 0)
		goto close;
	c->busy = false;
	return;
close:
	client_close(c);
}

/* The reply of a slow command (consumes @msg; NULL: out of memory). */
static void pending_finish(struct qmp_pending *p, json_t *msg)
{
	struct client *c = p->c;

	if (c && c->s->deferred == p) { /* inside its handler still */
		c->s->deferred = NULL;
		c->s->replied = true;
	}
	if (!c) {
		json_decref(msg);
		goto out;
	}
	c->pending = NULL;
	if (!msg || c->closing) {
		json_decref(msg);
		if (!msg)
			c->closing = true; /* a reply is lost: the client cannot go on */
	} else {
		if (p->id)
			json_object_set(msg, "id", p->id);
		client_send(c, msg);
	}
	/* Not sent from here: the watch for room to send runs client_ready,
	 * which sends it and then the commands that waited, in order, from
	 * the loop rather than from inside whoever completed us. */
	if (!c->busy && ((c->closing && !c->out_len) || client_rewatch(c) < 0))
		client_close(c);
out:
	json_decref(p->id);
	free(p);
}

void qmp_pending_return(struct qmp_pending *p, json_t *ret)
{
	json_t *msg = json_object();

	if (!msg) {
		json_decref(ret);
		pending_finish(p, NULL);
		return;
	}
	if (!ret)
		ret = json_object();
	if (json_object_set_new(msg, "return", ret) < 0) { /* consumes ret */
		json_decref(msg);
		msg = NULL;
	}
	pending_finish(p, msg);
}

void qmp_pending_error(struct qmp_pending *p, const char *fmt, ...)
{
	char desc[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(desc, sizeof(desc), fmt, ap);
	va_end(ap);
	pending_finish(p,
		       json_pack("{s:{s:s,s:s}}", "error", "class", "GenericError", "desc", desc));
}

struct qmp_pending *qmp_server_defer(struct qmp_server *s)
{
	struct qmp_pending *p;

	if (!s->cur || s->deferred)
		return NULL;
	p = calloc(1, sizeof(*p));
	if (!p)
		return NULL;
	p->c = s->cur;
	p->id = json_incref(s->cur_id);
	s->cur->pending = p;
	s->deferred = p;
	return p;
}

bool qmp_pending_connected(const struct qmp_pending *p)
{
	return p->c && !p->c->closing;
}

static void accept_ready(void *arg)
{
	struct qmp_server *s = arg;

	for (;;) {
		int fd = accept4(s->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		struct client *c;
		json_t *greet;

		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			if (errno != EAGAIN && errno != EWOULDBLOCK)
				vlog(VLOG_WARN, NULL, "qmp: accept: %s", strerror(errno));
			return;
		}
		if (s->nclients >= QMP_MAX_CLIENTS) {
			vlog(VLOG_WARN, NULL, "qmp: %d connections open already; closing a new one",
			     QMP_MAX_CLIENTS);
			close(fd);
			continue;
		}
		c = calloc(1, sizeof(*c));
		if (!c) {
			close(fd);
			continue;
		}
		c->s = s;
		c->fd = fd;
		c->next = s->clients;
		s->clients = c;
		s->nclients++;
		greet = json_pack("{s:{s:O,s:[]}}", "QMP", "version", s->version, "capabilities");
		if (greet)
			client_send(c, greet);
		if (!greet || client_flush(c) < 0 || client_rewatch(c) < 0)
			client_close(c);
	}
}

/* A server with no listening socket yet (fd -1, no path). */
static struct qmp_server *server_new(const struct qmp_loop_ops *loop,
				     const struct qmp_command *cmds, json_t *version, void *opaque)
{
	struct qmp_server *s = calloc(1, sizeof(*s));

	if (!s)
		return NULL;
	s->loop = loop;
	s->cmds = cmds;
	s->opaque = opaque;
	s->version = json_incref(version);
	s->fd = -1;
	return s;
}

/* Frees what server_new and the path took; the socket is the caller's. */
static void server_free(struct qmp_server *s)
{
	json_decref(s->version);
	free(s->path);
	free(s);
}

int qmp_server_init(struct qmp_server **sp, const char *path, const struct qmp_loop_ops *loop,
		    const struct qmp_command *cmds, json_t *version, void *opaque)
{
	struct qmp_server *s;
	int ret;

	s = server_new(loop, cmds, version, opaque);
	if (!s)
		return -ENOMEM;
	s->path = strdup(path);
	if (!s->path) {
		ret = -ENOMEM;
		goto fail;
	}
	/* Bound and listening before the path appears: a client that connects
	 * as soon as it sees the file is never refused. */
	ret = util_unix_listen(path, &s->sock);
	if (ret < 0)
		goto fail;
	s->fd = ret;
	ret = loop->watch(loop->opaque, s->fd, POLLIN, accept_ready, s);
	if (ret < 0) {
		util_unix_unlink_own(path, &s->sock);
		goto fail;
	}
	*sp = s;
	return 0;
fail:
	if (s->fd >= 0)
		close(s->fd);
	server_free(s);
	return ret;
}

int qmp_server_init_fd(struct qmp_server **sp, int fd, const struct qmp_loop_ops *loop,
		       const struct qmp_command *cmds, json_t *version, void *opaque)
{
	struct qmp_server *s;
	int ret;

	ret = util_adopt_listener(fd);
	if (ret < 0)
		return ret;
	s = server_new(loop, cmds, version, opaque);
	if (!s)
		return -ENOMEM;
	s->fd = fd;
	ret = loop->watch(loop->opaque, s->fd, POLLIN, accept_ready, s);
	if (ret < 0) {
		server_free(s);
		return ret;
	}
	*sp = s;
	return 0;
}

void qmp_server_exit(struct qmp_server *s)
{
	if (!s)
		return;
	while (s->clients) {
		client_flush(s->clients); /* a last reply (quit) if the socket takes it */
		client_close(s->clients);
	}
	s->loop->unwatch(s->loop->opaque, s->fd);
	close(s->fd);
	if (s->path)
		util_unix_unlink_own(s->path, &s->sock);
	server_free(s);
}

void qmp_server_event(struct qmp_server *s, const char *name, json_t *data)
{
	struct timeval tv;
	json_t *ev;

	if (!s) {
		json_decref(data);
		return;
	}
	gettimeofday(&tv, NULL);
	ev = json_pack("{s:{s:I,s:I},s:s}", "timestamp", "seconds", (json_int_t)tv.tv_sec,
		       "microseconds", (json_int_t)tv.tv_usec, "event", name);
	if (ev && data)
		json_object_set(ev, "data", data);
	json_decref(data);
	if (!ev)
		return;
	for (struct client *c = s->clients, *next; c; c = next) {
		next = c->next;
		if (!c->negotiated || c->closing)
			continue;
		client_send(c, json_incref(ev));
		if (c->busy) {
			/* Sent from inside its own client_ready (a handler's
			 * event): that one sends it and closes if need be. */
			continue;
		}
		if (client_flush(c) < 0 || (c->closing && !c->out_len) || client_rewatch(c) < 0)
			client_close(c);
	}
	json_decref(ev);
}

unsigned qmp_server_clients(const struct qmp_server *s)
{
	return s ? s->nclients : 0;
}
