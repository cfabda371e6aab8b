/* SPDX-License-Identifier: MIT */
/*
 * src/sandbox.h — vqcowd's seccomp allow-list (libseccomp).
 *
 * Installed once start-up is over (image and backing files open, socket
 * listening, capabilities dropped): from then on the daemon only serves, and
 * the filter allows exactly what serving needs (see sandbox.c for the list
 * and why each call is there). Any other system call is stopped: the calling
 * thread gets SIGSYS, whose handler writes one line naming the call's number
 * and ends the process with exit status 159 (128 + SIGSYS).
 */
#ifndef VQCOW_SRC_SANDBOX_H
#define VQCOW_SRC_SANDBOX_H

#define SANDBOX_EXIT_STATUS 159

/*
 * Install the filter (and the SIGSYS handler). 0, or -errno with a message in
 * @err (the daemon then refuses to run unprotected; --no-seccomp is the
 * explicit opt-out).
 */
int sandbox_install(char *err, unsigned errlen);

#endif /* VQCOW_SRC_SANDBOX_H */
