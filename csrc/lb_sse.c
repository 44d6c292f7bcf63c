/*
 * lb_sse: see lb_sse.h for the contract.
 *
 * Layout of the output buffer during a feed:
 *
 *   out[0 .. data_start)        completed events of this batch (data, then
 *                               type and id copies when they are non-empty)
 *   out[data_start .. out_len)  the data of the event being built, each data
 *                               line followed by LF
 *
 * At the start of the next feed the event being built is moved to the front,
 * so the buffer never holds more than one chunk's events plus one event.
 * Complete lines are parsed in place from the caller's chunk; only a line cut
 * by the end of a chunk is copied into the line buffer.
 */
#include "lb_sse.h"
#include "lb_json.h"

#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

struct lb_sse {
    size_t max_event;

    unsigned char *out; /* see above */
    size_t out_len, out_cap, data_start;

    size_t *recs; /* LB_SSE_FIELDS per event */
    size_t n_recs, recs_cap;

    unsigned char *line; /* a line cut by the end of a chunk */
    size_t line_len, line_cap;

    unsigned char *type; /* event type buffer of the event being built */
    size_t type_len, type_cap;

    unsigned char *id; /* last event id buffer (persists across events) */
    size_t id_len, id_cap;

    long long retry;
    unsigned long long fed;
    int bom_pos; /* bytes of a leading BOM matched so far; 3 once decided */
    int after_cr; /* the last byte seen was CR: an LF next is part of it */
    int failed;
    int batch_id_ok; /* batch_id_off holds a copy of id in this batch */
    size_t batch_id_off;

    lb_sse_fast fast; /* the content fast path's view of the last batch */
    unsigned char *text;
    size_t text_cap;
    long *marks;
    size_t marks_cap;
};

static const unsigned char BOM[3] = {0xEF, 0xBB, 0xBF};

/* Make room for `need` bytes in *buf; doubling, never past `limit`. */
static int grow(unsigned char **buf, size_t *cap, size_t need, size_t limit)
{
    size_t cap2;
    unsigned char *p;
    if (need > limit)
        return -1;
    if (need <= *cap)
        return 0;
    cap2 = *cap ? *cap : 256;
    while (cap2 < need)
        cap2 = (cap2 > limit / 2) ? limit : cap2 * 2;
    p = realloc(*buf, cap2);
    if (p == NULL)
        return -1;
    *buf = p;
    *cap = cap2;
    return 0;
}

/* Set a buffer's content to bytes v[0..n), bounded by limit. */
static int set_buf(unsigned char **buf, size_t *len, size_t *cap, const unsigned char *v, size_t n,
                   size_t limit)
{
    if (grow(buf, cap, n, limit) != 0)
        return -1;
    if (n)
        memcpy(*buf, v, n);
    *len = n;
    return 0;
}

lb_sse *lb_sse_new(size_t max_event_bytes)
{
    lb_sse *s;
    if (max_event_bytes == 0 || max_event_bytes > (SIZE_MAX / 4) - LB_SSE_LINE_SLACK)
        return NULL;
    s = calloc(1, sizeof *s);
    if (s == NULL)
        return NULL;
    s->max_event = max_event_bytes;
    s->retry = -1;
    return s;
}

void lb_sse_free(lb_sse *s)
{
    if (s == NULL)
        return;
    free(s->out);
    free(s->recs);
    free(s->line);
    free(s->type);
    free(s->id);
    free(s->text);
    free(s->marks);
    free(s);
}

void lb_sse_reset(lb_sse *s)
{
    s->out_len = s->data_start = 0;
    s->n_recs = 0;
    s->line_len = s->type_len = s->id_len = 0;
    s->retry = -1;
    s->fed = 0;
    s->bom_pos = 0;
    s->after_cr = 0;
    s->failed = 0;
    s->batch_id_ok = 0;
    s->fast.n_fast = s->fast.text_len = 0;
}

/* Limit for the output buffer: it holds one chunk's events, so it may grow
 * past max_event; it is bounded by what was fed. SIZE_MAX/2 only guards
 * the arithmetic. */
#define OUT_LIMIT (SIZE_MAX / 2)

static int append_out(lb_sse *s, const unsigned char *v, size_t n)
{
    if (n > OUT_LIMIT - s->out_len)
        return LB_SSE_ERR_NOMEM;
    if (grow(&s->out, &s->out_cap, s->out_len + n, OUT_LIMIT) != 0)
        return LB_SSE_ERR_NOMEM;
    if (n)
        memcpy(s->out + s->out_len, v, n);
    s->out_len += n;
    return 0;
}

static int dispatch(lb_sse *s)
{
    size_t *r;
    size_t data_len, type_off, id_off;
    int rc;

    if (s->out_len == s->data_start) { /* empty data buffer: no event */
        s->type_len = 0;
        return 0;
    }
    data_len = s->out_len - s->data_start - 1; /* drop the last LF */
    type_off = s->out_len;
    if ((rc = append_out(s, s->type, s->type_len)) != 0)
        return rc;
    if (s->batch_id_ok) {
        id_off = s->batch_id_off;
    } else {
        id_off = s->out_len;
        if ((rc = append_out(s, s->id, s->id_len)) != 0)
            return rc;
        s->batch_id_off = id_off;
        s->batch_id_ok = 1;
    }

    if (s->n_recs == s->recs_cap) {
        size_t cap2 = s->recs_cap ? s->recs_cap * 2 : 64;
        size_t *p;
        if (cap2 > SIZE_MAX / (LB_SSE_FIELDS * sizeof(size_t)))
            return LB_SSE_ERR_NOMEM;
        p = realloc(s->recs, cap2 * LB_SSE_FIELDS * sizeof(size_t));
        if (p == NULL)
            return LB_SSE_ERR_NOMEM;
        s->recs = p;
        s->recs_cap = cap2;
    }
    r = s->recs + s->n_recs * LB_SSE_FIELDS;
    r[0] = s->data_start;
    r[1] = data_len;
    r[2] = type_off;
    r[3] = s->type_len;
    r[4] = id_off;
    r[5] = s->id_len;
    s->n_recs++;

    s->data_start = s->out_len;
    s->type_len = 0;
    return 0;
}

static int append_data(lb_sse *s, const unsigned char *v, size_t n)
{
    size_t have = s->out_len - s->data_start; /* includes one LF per earlier line */
    /* The event's data is have + n bytes once joined (the trailing LF is dropped). */
    if (n > s->max_event || have > s->max_event - n)
        return LB_SSE_ERR_EVENT_TOO_LONG;
    if (append_out(s, v, n) != 0)
        return LB_SSE_ERR_NOMEM;
    return append_out(s, (const unsigned char *)"\n", 1);
}

static int field_is(const unsigned char *f, size_t n, const char *name, size_t name_len)
{
    return n == name_len && memcmp(f, name, n) == 0;
}

static int process_line(lb_sse *s, const unsigned char *line, size_t n)
{
    const unsigned char *colon, *value;
    size_t flen, vlen;

    if (n == 0)
        return dispatch(s);
    if (line[0] == ':')
        return 0; /* comment (llama-server's keep-alive ping) */

    colon = memchr(line, ':', n);
    if (colon != NULL) {
        flen = (size_t)(colon - line);
        value = colon + 1;
        vlen = n - flen - 1;
        if (vlen > 0 && value[0] == ' ') {
            value++;
            vlen--;
        }
    } else {
        flen = n;
        value = line + n;
        vlen = 0;
    }

    if (field_is(line, flen, "data", 4))
        return append_data(s, value, vlen);
    if (field_is(line, flen, "event", 5)) {
        if (vlen > s->max_event)
            return LB_SSE_ERR_EVENT_TOO_LONG;
        if (set_buf(&s->type, &s->type_len, &s->type_cap, value, vlen, s->max_event + LB_SSE_LINE_SLACK) != 0)
            return LB_SSE_ERR_NOMEM;
        return 0;
    }
    if (field_is(line, flen, "id", 2)) {
        if (memchr(value, 0, vlen) != NULL)
            return 0; /* an id containing NUL is ignored */
        if (vlen > s->max_event)
            return LB_SSE_ERR_EVENT_TOO_LONG;
        if (set_buf(&s->id, &s->id_len, &s->id_cap, value, vlen, s->max_event) != 0)
            return LB_SSE_ERR_NOMEM;
        s->batch_id_ok = 0;
        return 0;
    }
    if (field_is(line, flen, "retry", 5)) {
        long long ms = 0;
        size_t i;
        if (vlen == 0)
            return 0;
        for (i = 0; i < vlen; i++) {
            if (value[i] < '0' || value[i] > '9')
                return 0; /* not all digits: ignored */
            if (ms <= (LLONG_MAX - (value[i] - '0')) / 10)
                ms = ms * 10 + (value[i] - '0');
            else
                ms = LLONG_MAX; /* saturate rather than overflow */
        }
        s->retry = ms;
        return 0;
    }
    if (field_is(line, flen, "error", 5)) {
        /* llama.cpp extension (llama-server before 2025-09): "error: {json}". */
        if (set_buf(&s->type, &s->type_len, &s->type_cap, (const unsigned char *)"error", 5,
                    s->max_event + LB_SSE_LINE_SLACK) != 0)
            return LB_SSE_ERR_NOMEM;
        return append_data(s, value, vlen);
    }
    return 0; /* unknown field: ignored */
}

static long fail(lb_sse *s, int rc)
{
    s->failed = 1;
    s->n_recs = 0;
    return rc;
}

/* Keep a cut line for the next chunk. */
static int carry(lb_sse *s, const unsigned char *p, size_t n)
{
    size_t limit = s->max_event + LB_SSE_LINE_SLACK;
    if (n > limit || s->line_len > limit - n)
        return LB_SSE_ERR_LINE_TOO_LONG;
    if (grow(&s->line, &s->line_cap, s->line_len + n, limit) != 0)
        return LB_SSE_ERR_NOMEM;
    if (n) {
        memcpy(s->line + s->line_len, p, n);
        s->line_len += n;
    }
    return 0;
}

/* First CR or LF in [p, end), or end. Two memchr passes (vectorized in
 * libc) beat one byte loop: lines are long and CR is rare. */
static const unsigned char *find_eol(const unsigned char *p, const unsigned char *end)
{
    const unsigned char *lf = memchr(p, '\n', (size_t)(end - p));
    const unsigned char *lim = lf ? lf : end;
    const unsigned char *cr = memchr(p, '\r', (size_t)(lim - p));
    return cr ? cr : lim;
}

long lb_sse_feed(lb_sse *s, const unsigned char *buf, size_t len)
{
    const unsigned char *p = buf, *end = len ? buf + len : buf;
    int rc;

    if (s->failed)
        return LB_SSE_ERR_FAILED;

    /* Start a new batch: move the event being built to the front. */
    if (s->data_start > 0) {
        size_t keep = s->out_len - s->data_start;
        memmove(s->out, s->out + s->data_start, keep);
        s->out_len = keep;
        s->data_start = 0;
    }
    s->n_recs = 0;
    s->batch_id_ok = 0;
    s->fed += len;

    /* One leading BOM is dropped, even when it arrives one byte at a time. */
    while (s->bom_pos < 3 && p < end) {
        if (*p == BOM[s->bom_pos]) {
            s->bom_pos++;
            p++;
            continue;
        }
        /* Not a BOM after all: the bytes matched so far are ordinary text. */
        if (s->bom_pos > 0 && (rc = carry(s, BOM, (size_t)s->bom_pos)) != 0)
            return fail(s, rc);
        s->bom_pos = 3;
    }

    if (s->after_cr && p < end) {
        s->after_cr = 0;
        if (*p == '\n')
            p++; /* the LF of a CRLF split across chunks */
    }

    while (p < end) {
        const unsigned char *eol = find_eol(p, end);
        if (eol == end) {
            if ((rc = carry(s, p, (size_t)(end - p))) != 0)
                return fail(s, rc);
            break;
        }
        if (s->line_len > 0) {
            if ((rc = carry(s, p, (size_t)(eol - p))) != 0)
                return fail(s, rc);
            rc = process_line(s, s->line, s->line_len);
            s->line_len = 0;
        } else if ((size_t)(eol - p) > s->max_event + LB_SSE_LINE_SLACK) {
            rc = LB_SSE_ERR_LINE_TOO_LONG;
        } else {
            rc = process_line(s, p, (size_t)(eol - p));
        }
        if (rc != 0)
            return fail(s, rc);
        p = eol + 1;
        if (*eol == '\r') {
            if (p == end)
                s->after_cr = 1;
            else if (*p == '\n')
                p++;
        }
    }
    if (s->n_recs > (size_t)LONG_MAX)
        return fail(s, LB_SSE_ERR_NOMEM);
    return (long)s->n_recs;
}

long lb_sse_feed_fast(lb_sse *s, const unsigned char *buf, size_t len)
{
    long n = lb_sse_feed(s, buf, len);
    size_t i, text_len = 0, n_fast = 0;

    s->fast.n_fast = s->fast.text_len = 0;
    if (n <= 0)
        return n;
    /* Every extracted content is no longer than its event's data, so room
     * for the batch's output bytes is room for all of them. */
    if (grow(&s->text, &s->text_cap, s->data_start, OUT_LIMIT) != 0)
        return fail(s, LB_SSE_ERR_NOMEM);
    if (s->marks_cap < (size_t)n) {
        long *p;
        if ((size_t)n > SIZE_MAX / sizeof(long))
            return fail(s, LB_SSE_ERR_NOMEM);
        p = realloc(s->marks, (size_t)n * sizeof(long));
        if (p == NULL)
            return fail(s, LB_SSE_ERR_NOMEM);
        s->marks = p;
        s->marks_cap = (size_t)n;
    }
    for (i = 0; i < (size_t)n; i++) {
        const size_t *r = s->recs + i * LB_SSE_FIELDS;
        size_t clen = 0, j;
        long cps = 0;
        s->marks[i] = -1;
        if (r[3] != 0) /* typed events ("error", …) go to the general decoder */
            continue;
        if (!lb_json_chunk_content(s->out + r[0], r[1], s->text + text_len, &clen))
            continue;
        for (j = 0; j < clen; j++) /* code points: bytes that are not 10xxxxxx */
            cps += (s->text[text_len + j] & 0xC0) != 0x80;
        s->marks[i] = cps;
        text_len += clen;
        n_fast++;
    }
    s->fast.n_fast = n_fast;
    s->fast.text_len = text_len;
    s->fast.text = (const char *)s->text;
    s->fast.marks = s->marks;
    return n;
}

const lb_sse_fast *lb_sse_fast_info(const lb_sse *s)
{
    return &s->fast;
}

const size_t *lb_sse_records(const lb_sse *s)
{
    return s->recs;
}

const unsigned char *lb_sse_out(const lb_sse *s)
{
    return s->out;
}

size_t lb_sse_out_len(const lb_sse *s)
{
    return s->data_start;
}

long long lb_sse_retry(const lb_sse *s)
{
    return s->retry;
}

size_t lb_sse_pending(const lb_sse *s)
{
    return s->line_len + (s->out_len - s->data_start) + (s->bom_pos < 3 ? (size_t)s->bom_pos : 0);
}

unsigned long long lb_sse_bytes_fed(const lb_sse *s)
{
    return s->fed;
}
