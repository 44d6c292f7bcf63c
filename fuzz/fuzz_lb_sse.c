/*
 * libFuzzer harness for csrc/lb_sse.c (built by fuzz/run.sh).
 *
 * Input: [m0 m1] [s0 s1 s2 s3] stream...
 *   m0 == 0xFF       max_event_bytes = 1 MiB (no bound is reached)
 *   otherwise        max_event_bytes = 1 + ((m0 << 8 | m1) % 600)
 *   s0..s3           seed of the chunk sizes
 *
 * The stream is parsed five ways:
 *   whole     one chunk, fresh splitter
 *   chunked   random chunks (empty ones included), fresh splitter
 *   bytewise  one byte at a time (streams up to 4 KiB)
 *   primed    one chunk, on a splitter that parsed another stream and was reset
 *   unbound   one chunk, max_event_bytes 16 MiB (never fails on fuzz-sized input)
 * and it aborts unless:
 *   - all bounded runs fail with the same error, or none fails;
 *   - no run fails with LB_SSE_ERR_NOMEM (nothing here is big);
 *   - without a failure all runs give the same events (type, data, id bytes),
 *     the same retry and the same pending byte count;
 *   - with a failure the events a run delivered before it are a prefix of the
 *     unbound run's events, and the next feed returns LB_SSE_ERR_FAILED;
 *   - every record lies inside lb_sse_out_len(), and lb_sse_out_len() stays
 *     within a small multiple of (chunk + max_event_bytes);
 *   - lb_sse_bytes_fed() is the stream length.
 * Each chunk is copied into a heap block of exactly its size, so ASan sees a
 * read past its end.
 */
#include "lb_sse.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct run {
    unsigned char *ev; /* serialized events: len type, len data, len id (size_t each), then the bytes */
    size_t ev_len, ev_cap;
    long err;
    long long retry;
    size_t pending;
};

static void die(const char *what, const struct run *a, const struct run *b)
{
    fprintf(stderr, "lb_sse fuzz: %s\n", what);
    if (a)
        fprintf(stderr, "  a: err %ld, %zu event bytes, retry %lld, pending %zu\n", a->err, a->ev_len, a->retry,
                a->pending);
    if (b)
        fprintf(stderr, "  b: err %ld, %zu event bytes, retry %lld, pending %zu\n", b->err, b->ev_len, b->retry,
                b->pending);
    abort();
}

static void put(struct run *r, const void *p, size_t n)
{
    if (n > r->ev_cap - r->ev_len) {
        size_t cap = r->ev_cap ? r->ev_cap : 1024;
        while (cap - r->ev_len < n)
            cap *= 2;
        r->ev = realloc(r->ev, cap);
        if (r->ev == NULL)
            die("harness out of memory", NULL, NULL);
        r->ev_cap = cap;
    }
    if (n)
        memcpy(r->ev + r->ev_len, p, n);
    r->ev_len += n;
}

static void feed(lb_sse *s, size_t max, const unsigned char *data, size_t len, struct run *r)
{
    unsigned char *copy;
    const size_t *rec;
    const unsigned char *out;
    size_t out_len;
    long n, i;

    if (r->err)
        return;
    copy = malloc(len ? len : 1);
    if (copy == NULL)
        die("harness out of memory", NULL, NULL);
    if (len)
        memcpy(copy, data, len);
    n = lb_sse_feed_fast(s, copy, len);
    free(copy);
    if (n < 0) {
        r->err = n;
        if (lb_sse_feed(s, (const unsigned char *)"\n\n", 2) != LB_SSE_ERR_FAILED)
            die("failure is not sticky", r, NULL);
        return;
    }
    rec = lb_sse_records(s);
    out = lb_sse_out(s);
    out_len = lb_sse_out_len(s);
    if (n > 0 && out_len > 4 * (max + LB_SSE_LINE_SLACK) + 2 * len)
        die("output buffer out of proportion to the chunk", r, NULL);
    const lb_sse_fast *fi = lb_sse_fast_info(s);
    size_t tpos = 0, nf = 0;
    for (i = 0; i < n; i++, rec += LB_SSE_FIELDS) {
        int f;
        /* The content fast path: marks count code points of the contents
         * concatenated in text, only untyped events have one, and each
         * extracted content joins its event's output (chunked == whole). */
        long m = fi->marks[i], cps = 0;
        size_t b = 0;
        if (m >= 0) {
            if (m == 0 || rec[3] != 0)
                die("fast mark on a typed event or of zero length", r, NULL);
            while (tpos + b < fi->text_len) {
                int cont = ((unsigned char)fi->text[tpos + b] & 0xC0) == 0x80;
                if (!cont && cps == m)
                    break;
                cps += !cont;
                b++;
            }
            if (cps != m || b > rec[1])
                die("fast mark does not match the text", r, NULL);
            put(r, fi->text + tpos, b);
            tpos += b;
            nf++;
        }
        for (f = 0; f < LB_SSE_FIELDS; f += 2)
            if (rec[f] > out_len || rec[f + 1] > out_len - rec[f])
                die("record outside lb_sse_out_len", r, NULL);
        put(r, &rec[3], sizeof(size_t));
        put(r, &rec[1], sizeof(size_t));
        put(r, &rec[5], sizeof(size_t));
        put(r, out + rec[2], rec[3]);
        put(r, out + rec[0], rec[1]);
        put(r, out + rec[4], rec[5]);
    }
    if (nf != fi->n_fast || tpos != fi->text_len)
        die("fast path counts do not add up", r, NULL);
}

static void finish(lb_sse *s, size_t len, struct run *r)
{
    if (r->err == LB_SSE_ERR_NOMEM)
        die("LB_SSE_ERR_NOMEM on a small input", r, NULL);
    if (!r->err && lb_sse_bytes_fed(s) != len)
        die("bytes_fed is not the stream length", r, NULL);
    r->retry = lb_sse_retry(s);
    r->pending = r->err ? 0 : lb_sse_pending(s);
}

static uint32_t next(uint32_t *x)
{
    /* xorshift32 */
    *x ^= *x << 13;
    *x ^= *x >> 17;
    *x ^= *x << 5;
    return *x;
}

static void run_whole(lb_sse *s, size_t max, const unsigned char *d, size_t n, struct run *r)
{
    feed(s, max, d, n, r);
    finish(s, n, r);
}

static void same(const struct run *a, const struct run *b, const char *what)
{
    if (a->err != b->err)
        die(what, a, b);
    if (a->err)
        return;
    if (a->ev_len != b->ev_len || (a->ev_len && memcmp(a->ev, b->ev, a->ev_len) != 0) || a->retry != b->retry ||
        a->pending != b->pending)
        die(what, a, b);
}

static void prefix_of(const struct run *a, const struct run *full, const char *what)
{
    if (a->ev_len > full->ev_len || (a->ev_len && memcmp(a->ev, full->ev, a->ev_len) != 0))
        die(what, a, full);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* short values first: they grow the buffers even under max_event_bytes 1 */
    static const unsigned char prime[] =
        "event: t\nid: i\ndata: x\n\nevent: primed-type\nid: primed-id\ndata: y\n\nretry: 5\nevent: z\n\r";
    struct run whole = {0}, chunked = {0}, bytewise = {0}, primed = {0}, unbound = {0};
    const unsigned char *stream;
    size_t len, max, off;
    uint32_t seed;
    lb_sse *s;

    if (size < 6)
        return 0;
    max = data[0] == 0xFF ? (size_t)1 << 20 : 1 + (((size_t)data[0] << 8 | data[1]) % 600);
    seed = (uint32_t)data[2] << 24 | (uint32_t)data[3] << 16 | (uint32_t)data[4] << 8 | data[5];
    if (seed == 0)
        seed = 0x9e3779b9u;
    stream = data + 6;
    len = size - 6;

    s = lb_sse_new((size_t)16 << 20);
    if (s == NULL)
        die("lb_sse_new", NULL, NULL);
    run_whole(s, (size_t)16 << 20, stream, len, &unbound);
    lb_sse_free(s);
    if (unbound.err)
        die("the unbound run failed", &unbound, NULL);

    s = lb_sse_new(max);
    if (s == NULL)
        die("lb_sse_new", NULL, NULL);
    run_whole(s, max, stream, len, &whole);
    lb_sse_free(s);

    s = lb_sse_new(max);
    if (s == NULL)
        die("lb_sse_new", NULL, NULL);
    for (off = 0; off < len;) {
        uint32_t x = next(&seed);
        size_t step = (x & 3) == 0 ? 0 : (x & 3) == 1 ? 1 + (x >> 8) % 4 : (x & 3) == 2 ? 1 + (x >> 8) % 64 : 1 + (x >> 8) % 1024;
        if (step > len - off)
            step = len - off;
        feed(s, max, stream + off, step, &chunked);
        off += step;
    }
    finish(s, len, &chunked);
    lb_sse_free(s);

    if (len <= 4096) {
        s = lb_sse_new(max);
        if (s == NULL)
            die("lb_sse_new", NULL, NULL);
        for (off = 0; off < len; off++)
            feed(s, max, stream + off, 1, &bytewise);
        finish(s, len, &bytewise);
        lb_sse_free(s);
    }

    s = lb_sse_new(max);
    if (s == NULL)
        die("lb_sse_new", NULL, NULL);
    {
        struct run scratch = {0};
        feed(s, max, prime, sizeof prime - 1, &scratch);
        free(scratch.ev);
    }
    lb_sse_reset(s);
    run_whole(s, max, stream, len, &primed);
    lb_sse_free(s);

    same(&whole, &chunked, "whole and chunked differ");
    if (len <= 4096)
        same(&whole, &bytewise, "whole and bytewise differ");
    same(&whole, &primed, "fresh and reset splitters differ");
    if (whole.err) {
        prefix_of(&chunked, &unbound, "chunked events before the failure are not a prefix");
        prefix_of(&bytewise, &unbound, "bytewise events before the failure are not a prefix");
    } else {
        same(&whole, &unbound, "the bound changed the events");
    }

    free(whole.ev);
    free(chunked.ev);
    free(bytewise.ev);
    free(primed.ev);
    free(unbound.ev);
    return 0;
}
