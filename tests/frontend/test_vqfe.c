/* SPDX-License-Identifier: MIT */
/*
 * Unit test of vqfe itself, with the test playing the device: vqfe connects
 * (manual mode) to a socket nobody accepts, and the test reads the chains
 * vqfe built in guest memory and writes used elements by hand.
 *
 * Covered: the descriptor chains of every layout (lengths, flags, header
 * bytes, merged buffers, indirect tables), free-list accounting, slots and
 * -EAGAIN, used elements with a bad id or an excessive length (-EPROTO,
 * nothing freed), completion data copy-back, kick suppression by
 * VRING_USED_F_NO_NOTIFY, memory layout (regions, scratch straddling the
 * boundary, copies across regions).
 */
#include <CUnit/Basic.h>
#include <endian.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "vqfe.h"
#include "testutil.h"

static char sock_path[108];
static int lsock = -1;

static int suite_init(void)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};

	snprintf(sock_path, sizeof(sock_path), "/tmp/vqfe-unit.%d.sock", (int)getpid());
	unlink(sock_path);
	strcpy(sa.sun_path, sock_path);
	lsock = socket(AF_UNIX, SOCK_STREAM, 0);
	if (lsock < 0 || bind(lsock, (struct sockaddr *)&sa, sizeof(sa)) < 0 ||
	    listen(lsock, 16) < 0)
		return -1;
	return 0;
}

static int suite_clean(void)
{
	close(lsock);
	unlink(sock_path);
	return 0;
}

static struct vqfe *open_fe(unsigned regions, unsigned slots)
{
	struct vqfe_opts o;
	struct vqfe *fe = NULL;

	vqfe_opts_init(&o);
	o.manual = true;
	o.num_regions = regions;
	o.queue_size = 16;
	o.slots = slots;
	o.data_size = 8192;
	o.timeout_ms = 200;
	CU_ASSERT_EQUAL_FATAL(vqfe_open(&fe, sock_path, &o), 0);
	return fe;
}

struct seen {
	unsigned n;
	uint64_t addr[300];
	uint32_t len[300];
	uint16_t flags[300];
};

/* Walk the chain at avail slot @k as a device would. */
static void walk(struct vqfe *fe, unsigned k, struct seen *s, uint16_t *headp)
{
	struct vqfe_vq *vq = vqfe_vq(fe, 0);
	struct vring_desc *d = vqfe_vq_desc(vq);
	uint16_t head = le16toh(vqfe_vq_avail(vq)->ring[k % vqfe_vq_size(vq)]);
	struct vring_desc *t = d;
	unsigned i = head, max = vqfe_vq_size(vq);

	*headp = head;
	s->n = 0;
	if (le16toh(d[head].flags) & VRING_DESC_F_INDIRECT) {
		t = vqfe_gpa(fe, le64toh(d[head].addr), le32toh(d[head].len));
		CU_ASSERT_FATAL(t != NULL);
		max = le32toh(d[head].len) / 16;
		i = 0;
	}
	for (;;) {
		CU_ASSERT_FATAL(s->n < max && s->n < 300);
		s->addr[s->n] = le64toh(t[i].addr);
		s->len[s->n] = le32toh(t[i].len);
		s->flags[s->n] = le16toh(t[i].flags) & ~VRING_DESC_F_NEXT;
		s->n++;
		if (!(le16toh(t[i].flags) & VRING_DESC_F_NEXT))
			break;
		i = le16toh(t[i].next);
	}
}

static void push_used(struct vqfe *fe, uint32_t id, uint32_t len)
{
	struct vring_used *u = vqfe_vq_used(vqfe_vq(fe, 0));
	uint16_t idx = le16toh(u->idx);

	u->ring[idx % vqfe_vq_size(vqfe_vq(fe, 0))].id = htole32(id);
	u->ring[idx % vqfe_vq_size(vqfe_vq(fe, 0))].len = htole32(len);
	__atomic_store_n(&u->idx, htole16((uint16_t)(idx + 1)), __ATOMIC_RELEASE);
}

static void t_chains(void)
{
	struct vqfe *fe = open_fe(1, 8);
	struct seen s;
	uint16_t head;
	uint8_t data[4096], hdr[16];
	struct virtio_blk_outhdr want = {htole32(VIRTIO_BLK_T_OUT), htole32(3), htole64(77)};
	struct vqfe_req r;

	for (unsigned i = 0; i < sizeof(data); i++)
		data[i] = (uint8_t)i;
	/* default: header, one data buffer, status */
	r = (struct vqfe_req){
	    .type = VIRTIO_BLK_T_OUT, .ioprio = 3, .sector = 77, .buf = data, .len = 4096};
	CU_ASSERT_EQUAL_FATAL(vqfe_submit(fe, 0, &r), 0);
	walk(fe, 0, &s, &head);
	CU_ASSERT_EQUAL(s.n, 3);
	CU_ASSERT_EQUAL(s.len[0], 16);
	CU_ASSERT_EQUAL(s.flags[0], 0);
	CU_ASSERT_EQUAL(vqfe_mem_read(fe, s.addr[0], hdr, 16), 0);
	CU_ASSERT_EQUAL(memcmp(hdr, &want, 16), 0);
	CU_ASSERT_EQUAL(s.len[1], 4096);
	CU_ASSERT_EQUAL(s.flags[1], 0);
	CU_ASSERT_EQUAL(memcmp(vqfe_gpa(fe, s.addr[1], 4096), data, 4096), 0);
	CU_ASSERT_EQUAL(s.addr[1] % 4096, 0); /* data page aligned */
	CU_ASSERT_EQUAL(s.len[2], 1);
	CU_ASSERT_EQUAL(s.flags[2], VRING_DESC_F_WRITE);
	CU_ASSERT_EQUAL(r.expect_len, 1);
	/* device: status OK, used len 1 */
	*(uint8_t *)vqfe_gpa(fe, s.addr[2], 1) = VIRTIO_BLK_S_OK;
	push_used(fe, head, 1);
	CU_ASSERT_EQUAL(vqfe_reap(fe, 0, NULL, 8), 1);
	CU_ASSERT_EQUAL(r.status, 0);
	CU_ASSERT_FALSE(r.inflight);
	CU_ASSERT_EQUAL(vqfe_vq_inflight(vqfe_vq(fe, 0)), 0);

	/* split header 7+9, IN with 3 segments merged with the status */
	memset(data, 0, sizeof(data));
	r = (struct vqfe_req){.type = VIRTIO_BLK_T_IN,
			      .sector = 5,
			      .buf = data,
			      .len = 1000,
			      .segs = 3,
			      .layout = VQFE_L_HDR_SPLIT | VQFE_L_MERGE};
	CU_ASSERT_EQUAL_FATAL(vqfe_submit(fe, 0, &r), 0);
	walk(fe, 1, &s, &head);
	CU_ASSERT_EQUAL(s.n, 5);
	CU_ASSERT_EQUAL(s.len[0], 7);
	CU_ASSERT_EQUAL(s.len[1], 9);
	CU_ASSERT(s.addr[1] != s.addr[0] + 7); /* really two pieces */
	CU_ASSERT_EQUAL(s.len[2], 334);
	CU_ASSERT_EQUAL(s.len[3], 333);
	CU_ASSERT_EQUAL(s.len[4], 333 + 1);
	CU_ASSERT_EQUAL(s.flags[4], VRING_DESC_F_WRITE);
	CU_ASSERT_EQUAL(s.addr[3], s.addr[2] + 334);
	CU_ASSERT_EQUAL(r.expect_len, 1001);
	/* device writes data and the status (last byte of the last buffer) */
	for (unsigned i = 0; i < 3; i++)
		memset(vqfe_gpa(fe, s.addr[2 + i], s.len[2 + i]), 0x40 + (int)i, s.len[2 + i]);
	*(uint8_t *)vqfe_gpa(fe, s.addr[4] + 333, 1) = VIRTIO_BLK_S_UNSUPP;
	push_used(fe, head, 1001);
	CU_ASSERT_EQUAL(vqfe_reap(fe, 0, NULL, 8), 1);
	CU_ASSERT_EQUAL(r.status, VIRTIO_BLK_S_UNSUPP);
	CU_ASSERT_EQUAL(r.used_len, 1001);
	CU_ASSERT_EQUAL(r.err, 0);
	CU_ASSERT_EQUAL(data[0], 0x40);
	CU_ASSERT_EQUAL(data[334], 0x41);
	CU_ASSERT_EQUAL(data[999], 0x42);

	/* OUT merged header+data, in an indirect table, 16-byte status */
	r = (struct vqfe_req){.type = VIRTIO_BLK_T_OUT,
			      .buf = data,
			      .len = 512,
			      .layout = VQFE_L_MERGE | VQFE_L_INDIRECT | VQFE_L_STATUS_BIG};
	CU_ASSERT_EQUAL_FATAL(vqfe_submit(fe, 0, &r), 0);
	walk(fe, 2, &s, &head);
	CU_ASSERT_EQUAL(s.n, 2);
	CU_ASSERT_EQUAL(s.len[0], 16 + 512);
	CU_ASSERT_EQUAL(s.len[1], 16);
	CU_ASSERT_EQUAL(r.expect_len, 16);
	*(uint8_t *)vqfe_gpa(fe, s.addr[1] + 15, 1) = VIRTIO_BLK_S_IOERR;
	push_used(fe, head, 1);
	CU_ASSERT_EQUAL(vqfe_reap(fe, 0, NULL, 8), 1);
	CU_ASSERT_EQUAL(r.status, VIRTIO_BLK_S_IOERR);
	/* everything back on the free list */
	{
		uint16_t ids[16];

		CU_ASSERT_EQUAL(vqfe_vq_get_desc(vqfe_vq(fe, 0), 16, ids), 0);
		CU_ASSERT_EQUAL(vqfe_vq_get_desc(vqfe_vq(fe, 0), 1, ids), -EAGAIN);
		vqfe_vq_put_desc(vqfe_vq(fe, 0), 16, ids);
	}
	vqfe_close(fe);
}

static void t_bad_used(void)
{
	struct vqfe *fe = open_fe(1, 4);
	struct vqfe_req r[5];
	struct vqfe_req *done[4];
	struct seen s;
	uint16_t head;

	for (int i = 0; i < 4; i++) {
		r[i] = (struct vqfe_req){.type = VIRTIO_BLK_T_FLUSH};
		CU_ASSERT_EQUAL(vqfe_submit(fe, 0, &r[i]), 0);
	}
	/* four slots: a fifth request waits */
	r[4] = (struct vqfe_req){.type = VIRTIO_BLK_T_FLUSH};
	CU_ASSERT_EQUAL(vqfe_submit(fe, 0, &r[4]), -EAGAIN);
	/* an id that is not a head in flight */
	walk(fe, 0, &s, &head);
	push_used(fe, (uint32_t)head + 1, 1);
	CU_ASSERT_EQUAL(vqfe_reap(fe, 0, done, 4), -EPROTO);
	push_used(fe, 1000, 1);
	CU_ASSERT_EQUAL(vqfe_reap(fe, 0, done, 4), -EPROTO);
	CU_ASSERT_EQUAL(vqfe_vq_inflight(vqfe_vq(fe, 0)), 4);
	/* a length beyond the chain's writable bytes: completed, flagged */
	push_used(fe, head, 2);
	CU_ASSERT_EQUAL(vqfe_reap(fe, 0, done, 4), 1);
	CU_ASSERT_PTR_EQUAL(done[0], &r[0]);
	CU_ASSERT_EQUAL(r[0].err, -EPROTO);
	/* the same head again: no longer in flight */
	push_used(fe, head, 1);
	CU_ASSERT_EQUAL(vqfe_reap(fe, 0, done, 4), -EPROTO);
	/* a used index that jumps past the ring */
	{
		struct vring_used *u = vqfe_vq_used(vqfe_vq(fe, 0));

		u->idx = htole16((uint16_t)(le16toh(u->idx) + 100));
		CU_ASSERT_EQUAL(vqfe_reap(fe, 0, done, 4), -EPROTO);
	}
	/* the slot freed by the completed request is usable again */
	CU_ASSERT_EQUAL(vqfe_submit(fe, 0, &r[4]), 0);
	vqfe_close(fe);
}

static void t_kick_suppression(void)
{
	struct vqfe *fe = open_fe(1, 4);
	struct vqfe_vq *vq = vqfe_vq(fe, 0);
	struct vqfe_req r[2] = {{.type = VIRTIO_BLK_T_FLUSH}, {.type = VIRTIO_BLK_T_FLUSH}};

	CU_ASSERT_EQUAL(vqfe_vq_kick(vq, false), 0); /* nothing new: no kick */
	CU_ASSERT_EQUAL(vqfe_vq_kicks(vq), 0);
	CU_ASSERT_EQUAL(vqfe_submit(fe, 0, &r[0]), 0);
	CU_ASSERT_EQUAL(vqfe_vq_kick(vq, false), 0);
	CU_ASSERT_EQUAL(vqfe_vq_kicks(vq), 1);
	vqfe_vq_used(vq)->flags = htole16(VRING_USED_F_NO_NOTIFY);
	CU_ASSERT_EQUAL(vqfe_submit(fe, 0, &r[1]), 0);
	CU_ASSERT_EQUAL(vqfe_vq_kick(vq, false), 0);
	CU_ASSERT_EQUAL(vqfe_vq_kicks(vq), 1);
	CU_ASSERT_EQUAL(vqfe_vq_kick(vq, true), 0);
	CU_ASSERT_EQUAL(vqfe_vq_kicks(vq), 2);
	/* waiting with nothing used times out */
	CU_ASSERT_EQUAL(vqfe_vq_wait(fe, 0, 50), -ETIMEDOUT);
	vqfe_close(fe);
}

static void t_memory(void)
{
	struct vqfe *fe = open_fe(2, 8);
	uint64_t g0, s0, g1, s1, sg;
	size_t ss;
	uint8_t w[8192], r[8192];

	CU_ASSERT_EQUAL(vqfe_region(fe, 0, &g0, &s0), 0);
	CU_ASSERT_EQUAL(vqfe_region(fe, 1, &g1, &s1), 0);
	CU_ASSERT_EQUAL(vqfe_region(fe, 2, &g1, &s1), -EINVAL);
	CU_ASSERT_EQUAL(vqfe_region(fe, 1, &g1, &s1), 0);
	CU_ASSERT_EQUAL(g0, 0);
	CU_ASSERT_EQUAL(g1, s0); /* contiguous guest-physical */
	/* but not contiguous in our address space */
	CU_ASSERT_PTR_NOT_EQUAL((uint8_t *)vqfe_gpa(fe, g0 + s0 - 1, 1) + 1, vqfe_gpa(fe, g1, 1));
	vqfe_scratch(fe, &sg, &ss);
	CU_ASSERT(sg < g1 && sg + ss > g1);
	CU_ASSERT_PTR_NULL(vqfe_gpa(fe, g1 - 4096, 8192)); /* crosses */
	CU_ASSERT_PTR_NULL(vqfe_gpa(fe, g1 + s1, 1));
	for (unsigned i = 0; i < sizeof(w); i++)
		w[i] = (uint8_t)(i * 7);
	CU_ASSERT_EQUAL(vqfe_mem_write(fe, g1 - 4096, w, sizeof(w)), 0);
	CU_ASSERT_EQUAL(vqfe_mem_read(fe, g1 - 4096, r, sizeof(r)), 0);
	CU_ASSERT_EQUAL(memcmp(w, r, sizeof(w)), 0);
	CU_ASSERT_EQUAL(memcmp(vqfe_gpa(fe, g1, 4096), w + 4096, 4096), 0);
	CU_ASSERT_EQUAL(vqfe_mem_write(fe, g1 + s1 - 10, w, 20), -EFAULT);
	/* user addresses are our pointers */
	CU_ASSERT_EQUAL(vqfe_uaddr(fe, g1 + 5), (uint64_t)(uintptr_t)vqfe_gpa(fe, g1 + 5, 1));
	vqfe_close(fe);
}

int main(void)
{
	CU_pSuite s;
	unsigned failed;

	if (CU_initialize_registry() != CUE_SUCCESS)
		return 1;
	s = CU_add_suite("vqfe", suite_init, suite_clean);
	CU_add_test(s, "chains", t_chains);
	CU_add_test(s, "bad_used", t_bad_used);
	CU_add_test(s, "kick_suppression", t_kick_suppression);
	CU_add_test(s, "memory", t_memory);
	failed = tu_cunit_run();
	return failed ? 1 : 0;
}
