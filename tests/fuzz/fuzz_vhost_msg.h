/* SPDX-License-Identifier: MIT */
/*
 * Input encoding of fuzz_vhost_msg (also written by mkcorpus.py). An input is
 * a sequence of records, each starting with a control byte:
 *
 *   ctl bit 7 clear: a vhost-user message.
 *       bits 0-3  number of fds sent with it (0-15; more than 8 is malformed)
 *       bits 4-6  kind of those fds: 0 as the message type needs (memfd for
 *                 SET_MEM_TABLE/ADD_MEM_REG/REM_MEM_REG, a pipe for
 *                 SET_BACKEND_REQ_FD, else an eventfd), 1 memfd (the guest
 *                 memory), 2 eventfd (signalled), 3 pipe read end, 4+ /dev/null
 *       then the 12-byte header (u32 request, u32 flags, u32 size; little
 *       endian) and `size` payload bytes (fewer if the input ends), sent with
 *       one sendmsg() carrying the fds.
 *   ctl bit 7 set: an action, ctl & 0x7f:
 *       0 push every element the device holds (used length 0)
 *       1 push the oldest held element; u32 used length follows
 *       2 guest memory write: u32 offset (mod FVM_MEM_SIZE), u16 length, bytes
 *       3 raw bytes to the socket (no fds): u16 length, bytes
 *       4 disconnect (complete what is held, wait for the reap) and reconnect
 *       other: nothing (just run the loop)
 * After each record the event loop runs and replies are read and dropped.
 * The guest memory is one memfd of FVM_MEM_SIZE bytes, zeroed per input; a
 * region refers to it by mmap_offset.
 */
#ifndef VQCOW_FUZZ_VHOST_MSG_H
#define VQCOW_FUZZ_VHOST_MSG_H

#define FVM_MEM_SIZE (256u * 1024)
#define FVM_MAX_FDS  15

#define FVM_ACTION    0x80u
#define FVM_NFDS_MASK 0x0fu

enum {
	FVM_FD_AUTO = 0,
	FVM_FD_MEMFD = 1,
	FVM_FD_EVENTFD = 2,
	FVM_FD_PIPE = 3,
};

enum {
	FVM_A_PUSH_ALL = 0,
	FVM_A_PUSH_ONE = 1,
	FVM_A_GUEST_WRITE = 2,
	FVM_A_RAW = 3,
	FVM_A_RECONNECT = 4,
};

/* vhost-user request numbers the harness needs (vhost-user.rst) */
enum {
	FVM_SET_MEM_TABLE = 5,
	FVM_SET_BACKEND_REQ_FD = 21,
	FVM_ADD_MEM_REG = 37,
	FVM_REM_MEM_REG = 38,
};

#endif /* VQCOW_FUZZ_VHOST_MSG_H */
