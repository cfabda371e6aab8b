/* SPDX-License-Identifier: MIT */
/*
 * qcow2/prefetch.c — background L2 prefetch after open.
 *
 * When the L2 cache covers every L2 table the L1 table references, whole
 * tables are read in large background reads (host-adjacent tables coalesced
 * into reads of up to 1 MiB, at most 4 in flight) and their slices inserted
 * into the L2 cache as clean READY entries where nothing is cached yet
 * (q2_cache_insert never evicts and never replaces).
 *
 * Invariant: prefetched data is never newer-looking than the disk. A slice
 * can change on disk (write-back) and leave the cache while such a read is
 * in flight, so the read's data is used only if the cache generation (bumped
 * whenever a slice leaves the hash, and on q2_cache_new) is unchanged and the
 * L1 entry still points at the table; otherwise it is dropped (always safe:
 * the slice is then loaded on demand). Errors are logged once and ignored.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define PF_READS     4
#define PF_MAX_BYTES (1u << 20)

struct q2_pf_tab {
	uint64_t off; /* host offset of the L2 table */
	uint32_t l1i; /* the L1 entry that pointed at it */
};

struct q2_pf_read {
	struct io_cmd cmd;
	struct q2_pf *pf;
	uint8_t *buf;  /* max_tabs clusters */
	size_t first;  /* index in pf->tab */
	uint32_t ntab; /* tables read */
	uint64_t gen;  /* l2c.gen when the read was issued */
	bool busy;
};

struct q2_pf {
	struct qcow2 *q;
	struct q2_pf_tab *tab; /* sorted by host offset, no duplicates */
	size_t ntab, next;
	uint32_t max_tabs; /* per read */
	unsigned inflight;
	bool stop, logged;
	uint64_t t0_ns; /* CLOCK_MONOTONIC at the start, for the closing log line */
	struct q2_pf_read rd[PF_READS];
};

static int pf_tab_cmp(const void *a, const void *b)
{
	const struct q2_pf_tab *x = a, *y = b;

	if (x->off != y->off)
		return x->off < y->off ? -1 : 1;
	return x->l1i < y->l1i ? -1 : x->l1i > y->l1i;
}

/* The L2 table offset of L1 entry @i if it is usable, else 0 (as mapping.c validates it). */
static uint64_t pf_l1_table(const struct qcow2 *q, uint32_t i)
{
	uint64_t off;

	if (q2_l1_check(q, i, &off) || !off)
		return 0;
	if (off > q->file->size || q->cs > q->file->size - off)
		return 0; /* never read past the end of the file */
	return off;
}

/* Buffers and the table list are freed once the prefetch has ended. */
static void pf_release(struct q2_pf *pf)
{
	for (unsigned i = 0; i < PF_READS; i++) {
		io_free_aligned(pf->rd[i].buf);
		pf->rd[i].buf = NULL;
	}
	free(pf->tab);
	pf->tab = NULL;
	pf->ntab = pf->next = 0;
	pf->stop = true;
}

static void pf_done(struct io_cmd *cmd, int res);

static void pf_issue(struct q2_pf *pf)
{
	struct qcow2 *q = pf->q;

	for (unsigned i = 0; i < PF_READS && !pf->stop && pf->next < pf->ntab; i++) {
		struct q2_pf_read *rd = &pf->rd[i];
		size_t first = pf->next;
		uint32_t n = 1;

		if (rd->busy || !rd->buf)
			continue;
		while (first + n < pf->ntab && n < pf->max_tabs &&
		       pf->tab[first + n].off == pf->tab[first + n - 1].off + q->cs)
			n++;
		pf->next = first + n;
		rd->first = first;
		rd->ntab = n;
		rd->gen = q->l2c.gen;
		rd->busy = true;
		rd->cmd.done = pf_done;
		rd->cmd.priv = rd;
		pf->inflight++;
		io_read(q->loop, &rd->cmd, q->file, rd->buf, (size_t)n << q->cb,
			pf->tab[first].off);
	}
	if (!pf->inflight && (pf->stop || pf->next >= pf->ntab)) {
		Q2_LOG(q, INFO, "L2 prefetch %s: %llu slices from %zu tables in %llu ms",
		       pf->next >= pf->ntab && !pf->stop ? "done" : "stopped",
		       (unsigned long long)q->n_l2_prefetched, pf->next,
		       (unsigned long long)((q2_now_ns() - pf->t0_ns) / 1000000u));
		pf_release(pf);
	}
}

static void pf_insert(struct q2_pf *pf, struct q2_pf_read *rd)
{
	struct qcow2 *q = pf->q;
	struct q2_cache *c = &q->l2c;

	if (rd->gen != c->gen)
		return; /* a slice left the cache meanwhile: the data may be stale */
	for (uint32_t k = 0; k < rd->ntab; k++) {
		const struct q2_pf_tab *t = &pf->tab[rd->first + k];

		if (pf_l1_table(q, t->l1i) != t->off)
			continue; /* the L1 entry moved: the table may be free now */
		for (uint64_t o = 0; o < q->cs; o += c->slice_size) {
			int ret =
			    q2_cache_insert(c, t->off + o, rd->buf + ((uint64_t)k << q->cb) + o);

			if (ret < 0) {
				pf->stop = true; /* full (or out of memory): load on demand */
				return;
			}
			q->n_l2_prefetched += (uint64_t)ret;
		}
	}
}

static void pf_done(struct io_cmd *cmd, int res)
{
	struct q2_pf_read *rd = cmd->priv;
	struct q2_pf *pf = rd->pf;
	struct qcow2 *q = pf->q;
	uint64_t len = (uint64_t)rd->ntab << q->cb;

	rd->busy = false;
	pf->inflight--;
	if (res < 0 || (uint64_t)res != len) {
		if (!pf->logged)
			Q2_LOG(q, WARN,
			       "prefetching L2 tables at 0x%llx failed: %s (loading on demand)",
			       (unsigned long long)pf->tab[rd->first].off,
			       res < 0 ? strerror(-res) : "short read");
		pf->logged = true;
	} else if (!pf->stop) {
		pf_insert(pf, rd);
	}
	pf_issue(pf);
}

int q2_l2_prefetch_start(struct qcow2 *q)
{
	struct q2_pf *pf;
	size_t n = 0, j = 0, nreads = 0;
	uint64_t need;

	for (uint32_t i = 0; i < q->l1_size; i++)
		if (pf_l1_table(q, i))
			n++;
	need = (uint64_t)n << q->cb;
	if (!n || (uint64_t)q->l2c.soft_max * q->l2c.slice_size < need)
		return 0; /* nothing to read, or the cache cannot hold it all */
	pf = calloc(1, sizeof(*pf));
	if (!pf)
		return -ENOMEM;
	pf->q = q;
	pf->tab = malloc(n * sizeof(*pf->tab));
	if (!pf->tab)
		goto free_pf;
	for (uint32_t i = 0; i < q->l1_size; i++) {
		uint64_t off = pf_l1_table(q, i);

		if (off)
			pf->tab[j++] = (struct q2_pf_tab){off, i};
	}
	qsort(pf->tab, n, sizeof(*pf->tab), pf_tab_cmp);
	/* two L1 entries on one table (corrupt image): read it once */
	j = 0;
	for (size_t i = 0; i < n; i++)
		if (!j || pf->tab[j - 1].off != pf->tab[i].off)
			pf->tab[j++] = pf->tab[i];
	pf->ntab = j;
	pf->max_tabs = q->cs >= PF_MAX_BYTES ? 1 : (uint32_t)(PF_MAX_BYTES >> q->cb);
	/* number of reads (bounded by PF_READS) decides how many buffers we need */
	for (size_t i = 0; i < pf->ntab && nreads < PF_READS; nreads++) {
		uint32_t k = 1;

		while (i + k < pf->ntab && k < pf->max_tabs &&
		       pf->tab[i + k].off == pf->tab[i + k - 1].off + q->cs)
			k++;
		i += k;
	}
	for (size_t i = 0; i < nreads; i++) {
		pf->rd[i].pf = pf;
		pf->rd[i].buf = io_alloc_aligned((size_t)pf->max_tabs << q->cb);
		if (!pf->rd[i].buf)
			goto free_bufs;
	}
	q->pf = pf;
	pf->t0_ns = q2_now_ns();
	pf_issue(pf);
	return 0;

free_bufs:
	pf_release(pf);
free_pf:
	free(pf->tab);
	free(pf);
	return -ENOMEM;
}

void q2_l2_prefetch_stop(struct qcow2 *q)
{
	if (q->pf)
		q->pf->stop = true;
}

bool q2_l2_prefetch_busy(const struct qcow2 *q)
{
	return q->pf && q->pf->inflight;
}

void q2_l2_prefetch_exit(struct qcow2 *q)
{
	if (!q->pf)
		return;
	pf_release(q->pf);
	free(q->pf);
	q->pf = NULL;
}
