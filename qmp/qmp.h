/* SPDX-License-Identifier: MIT */
/*
 * qmp/ — a QMP (QEMU Machine Protocol) server on a UNIX socket.
 *
 * Knows nothing of vhost, blk, images or io_uring: the program gives it a
 * way to watch fds (its event loop), a table of commands and their
 * handlers, and the version object of the greeting. JSON is parsed and
 * written with jansson.
 *
 * Protocol, as QEMU speaks it:
 *  - on connect the server sends {"QMP": {"version": V, "capabilities": []}};
 *  - until the client sent {"execute": "qmp_capabilities"}, every other
 *    command gets a CommandNotFound error;
 *  - {"execute": NAME, "arguments": {...}, "id": ANY} gets
 *    {"return": R, "id": ANY} or {"error": {"class": C, "desc": TEXT}, "id": ANY};
 *  - replies are written in order, one JSON object per line ("\r\n");
 *  - a slow command may answer later (qmp_server_defer, below): until it has,
 *    that client's next commands wait unread and unparsed, so its replies
 *    keep the order of its commands (QEMU answers a monitor in order);
 *    other clients and events are not held up.
 * Input is a byte stream of JSON objects (no framing beyond JSON itself);
 * where each ends is found incrementally (every byte scanned once), so a
 * message that arrives a byte at a time costs no more than one that does not.
 * Malformed JSON, a non-object, unknown members, unknown commands and
 * arguments of the wrong type get a GenericError/CommandNotFound reply; a
 * message over QMP_MAX_MSG bytes gets an error and the connection is closed;
 * so is a client that lets more than QMP_MAX_OUT bytes of replies pile up.
 * Every socket is non-blocking: nothing here ever waits.
 *
 * Threading: one thread, the one whose loop the watch hooks belong to.
 */
#ifndef VQCOW_QMP_H
#define VQCOW_QMP_H

#include <stdbool.h>
#include <stddef.h>

#include <jansson.h>

#define QMP_MAX_MSG     (64 * 1024)   /* largest input message (bytes) */
#define QMP_MAX_OUT     (1024 * 1024) /* largest backlog of unsent replies */
#define QMP_MAX_CLIENTS 32            /* connections at once; more are closed */
#define QMP_MAX_ARGS    16

typedef void qmp_watch_cb(void *arg);

/* The event loop: call @cb(@arg) whenever @fd is ready for @events (POLLIN or POLLOUT). */
struct qmp_loop_ops {
	int (*watch)(void *opaque, int fd, unsigned events, qmp_watch_cb *cb, void *arg);
	/* Stop watching @fd; @cb is never called again for that watch. */
	void (*unwatch)(void *opaque, int fd);
	void *opaque;
};

enum qmp_type {
	QMP_STR = 1,
	QMP_INT, /* a JSON integer */
	QMP_BOOL,
	QMP_INT_LIST, /* a JSON array of integers (QAPI ['uint64'], ['int']) */
	QMP_LIST,     /* a JSON array; the handler checks its elements */
};

struct qmp_arg {
	const char *name; /* NULL ends the list */
	enum qmp_type type;
	bool optional;
};

/*
 * A command handler. @args is the (type-checked) arguments object, never
 * NULL. Returns 0 and sets *@ret to a new reference (NULL = {}), or -errno
 * with a message in @err (sent as a GenericError).
 */
typedef int qmp_handler_fn(void *opaque, json_t *args, json_t **ret, char *err, size_t errlen);

/*
 * The reply a slow command owes its client, from qmp_server_defer() until
 * qmp_pending_return() or qmp_pending_error(), which free it.
 */
struct qmp_pending;

/* What a handler returns when it took its reply with qmp_server_defer(). */
#define QMP_PENDING 1

struct qmp_command {
	const char *name; /* NULL ends the table */
	struct qmp_arg args[QMP_MAX_ARGS + 1];
	qmp_handler_fn *handler;
};

struct qmp_server;

/*
 * Slow commands (quiesce an image, flush, write tables): a handler that
 * cannot answer now calls qmp_server_defer() and returns QMP_PENDING, then
 * replies exactly once, later, from the loop's thread, with
 * qmp_pending_return() or qmp_pending_error() (it may also do so before it
 * returns). NULL: out of memory, or not called from a handler (then return
 * -ENOMEM). A handler that defers and still returns 0 or -errno has that
 * sent at once and must forget the handle.
 *
 * Until the reply, the client's later commands wait (they are not even read)
 * so its replies keep its commands' order; events are still sent to it, and
 * other clients go on. A client that disconnects, or a server that exits,
 * meanwhile leaves the handle valid: the command runs to its end and its
 * reply is dropped (QEMU finishes a command whose monitor went away, too).
 */
struct qmp_pending *qmp_server_defer(struct qmp_server *s);

/* Reply {"return": @ret} (consumed; NULL = {}) and free @p. */
void qmp_pending_return(struct qmp_pending *p, json_t *ret);

/* Reply a GenericError with the message and free @p. */
void qmp_pending_error(struct qmp_pending *p, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Is the client still there to read the reply? (Work may go on regardless.) */
bool qmp_pending_connected(const struct qmp_pending *p);

/*
 * Listen on @path (a UNIX socket created with mode 0600; a stale socket left
 * by a dead process is replaced, a live one is -EADDRINUSE). @cmds and
 * @version (borrowed: the server takes its own reference) must outlive the
 * server; @opaque goes to the handlers, @loop->opaque to the loop hooks. 0 or -errno.
 */
int qmp_server_init(struct qmp_server **sp, const char *path, const struct qmp_loop_ops *loop,
		    const struct qmp_command *cmds, json_t *version, void *opaque);

/*
 * The same over @fd, a socket already listening (systemd socket activation,
 * vqcowd --qmp-fd): made non-blocking and close-on-exec, closed by
 * qmp_server_exit() (which unlinks nothing). 0, -ENOTCONN (not a listening
 * stream socket) or -errno; on error @fd stays the caller's.
 */
int qmp_server_init_fd(struct qmp_server **sp, int fd, const struct qmp_loop_ops *loop,
		       const struct qmp_command *cmds, json_t *version, void *opaque);

/* Close every connection and the listening socket, unlink @path if it is still ours. */
void qmp_server_exit(struct qmp_server *s);

/*
 * Send an event to every client past capabilities negotiation:
 * {"timestamp": {"seconds", "microseconds"}, "event": @name, "data": @data}
 * (@data consumed; NULL = no data member). Never blocks: a client that does
 * not read gets it queued (within QMP_MAX_OUT).
 */
void qmp_server_event(struct qmp_server *s, const char *name, json_t *data);

/* Connections open now (tests, logs). */
unsigned qmp_server_clients(const struct qmp_server *s);

#endif /* VQCOW_QMP_H */
