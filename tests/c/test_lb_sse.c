/*
 * C-level tests for csrc/lb_sse.c, run under ASan/UBSan by tests/test_c_build.py.
 *
 * Every case runs whole, one byte at a time, in 3-byte chunks, and again on a
 * reset (reused) splitter. Each chunk is copied into a heap block of exactly
 * its size, so a read past the chunk hits ASan's redzone; and each case is run
 * once more with its input at the very end of a page whose next page is
 * PROT_NONE (whole, and byte by byte against the guard), so a read past the
 * end faults even without ASan.
 *
 * Events are compared in a serialized form: type 0x1F data 0x1F id 0x1E.
 */
#define _DEFAULT_SOURCE
#include "lb_sse.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static int failures = 0;
static int checks = 0;

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        checks++;                                                                                  \
        if (!(cond)) {                                                                             \
            failures++;                                                                            \
            fprintf(stderr, "%s:%d: check failed: %s: ", __FILE__, __LINE__, #cond);               \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fputc('\n', stderr);                                                                   \
        }                                                                                          \
    } while (0)

struct sink {
    unsigned char buf[8192];
    size_t len;
    long err; /* 0, or the first negative lb_sse_feed result */
};

static void put(struct sink *k, const unsigned char *p, size_t n)
{
    if (n > sizeof k->buf - k->len) {
        fprintf(stderr, "sink overflow\n");
        exit(2);
    }
    memcpy(k->buf + k->len, p, n);
    k->len += n;
}

/* Feed one chunk from `buf` and append its events to `k`. */
static void feed(lb_sse *s, const unsigned char *buf, size_t len, struct sink *k)
{
    long n, i;
    const size_t *r;
    const unsigned char *out;
    size_t out_len;

    if (k->err)
        return;
    n = lb_sse_feed(s, buf, len);
    if (n < 0) {
        k->err = n;
        return;
    }
    r = lb_sse_records(s);
    out = lb_sse_out(s);
    out_len = lb_sse_out_len(s);
    for (i = 0; i < n; i++, r += LB_SSE_FIELDS) {
        int f;
        for (f = 0; f < LB_SSE_FIELDS; f += 2)
            CHECK(r[f] <= out_len && r[f + 1] <= out_len - r[f], "record %ld field %d outside out", i, f);
        if (r[3])
            put(k, out + r[2], r[3]);
        else
            put(k, (const unsigned char *)"message", 7);
        put(k, (const unsigned char *)"\x1f", 1);
        put(k, out + r[0], r[1]);
        put(k, (const unsigned char *)"\x1f", 1);
        put(k, out + r[4], r[5]);
        put(k, (const unsigned char *)"\x1e", 1);
    }
}

/* Feed `in` in chunks of `step` bytes (0: whole), each copied to an exact heap block. */
static void feed_chunks(lb_sse *s, const unsigned char *in, size_t len, size_t step, struct sink *k)
{
    size_t off = 0;
    if (step == 0)
        step = len ? len : 1;
    do {
        size_t n = len - off < step ? len - off : step;
        unsigned char *copy = malloc(n ? n : 1);
        if (copy == NULL)
            exit(2);
        if (n)
            memcpy(copy, in + off, n);
        feed(s, copy, n, k);
        free(copy);
        off += n;
    } while (off < len);
}

struct tcase {
    const char *name;
    const char *in;
    size_t in_len;
    const char *want; /* serialized events */
    size_t want_len;
    long err;         /* expected error (0: none) */
    size_t max_event; /* 0: 1 MiB */
    long long retry;  /* expected lb_sse_retry after the stream */
};

#define S(lit) lit, sizeof(lit) - 1
#define E(type, data, id) type "\x1f" data "\x1f" id "\x1e"

static const struct tcase cases[] = {
    {"lf", S("data: a\n\n"), S(E("message", "a", "")), 0, 0, -1},
    {"crlf", S("data: a\r\ndata: b\r\n\r\n"), S(E("message", "a\nb", "")), 0, 0, -1},
    {"cr", S("data: a\rdata: b\r\r"), S(E("message", "a\nb", "")), 0, 0, -1},
    {"cr-at-end", S("data: a\n\r"), S(E("message", "a", "")), 0, 0, -1},
    {"bom", S("\xef\xbb\xbf" "data: a\n\n"), S(E("message", "a", "")), 0, 0, -1},
    {"bom-twice", S("\xef\xbb\xbf\xef\xbb\xbf" "data: a\n\ndata: b\n\n"), S(E("message", "b", "")), 0, 0, -1},
    {"bom-partial", S("\xef\xbb" "data: a\n\ndata: b\n\n"), S(E("message", "b", "")), 0, 0, -1},
    {"bom-only", S("\xef\xbb\xbf"), S(""), 0, 0, -1},
    {"bom-prefix-only", S("\xef\xbb"), S(""), 0, 0, -1},
    {"comments", S(": ping\n\n:\ndata: a\n:x\n\n"), S(E("message", "a", "")), 0, 0, -1},
    {"colonless", S("data\ndata\n\nevent\ndata:x\n\n"), S(E("message", "\n", "") E("message", "x", "")), 0, 0, -1},
    {"one-space", S("data:  a\ndata:b\n\n"), S(E("message", " a\nb", "")), 0, 0, -1},
    {"type-and-id",
     S("id: 1\nevent: t\ndata: a\n\ndata: b\n\nid: \x00x\nid: 2\nevent: e\n\nerror: {}\n\n"),
     S(E("t", "a", "1") E("message", "b", "1") E("error", "{}", "2")), 0, 0, -1},
    {"retry", S("retry: 10\nretry: 1x\nretry:\n"), S(""), 0, 0, 10},
    {"retry-huge", S("retry: 99999999999999999999999\n"), S(""), 0, 0, 9223372036854775807LL},
    {"nul-in-data", S("data: a\x00" "b\n\n"), S(E("message", "a\x00" "b", "")), 0, 0, -1},
    {"unfinished", S("data: a\n\ndata: b\n"), S(E("message", "a", "")), 0, 0, -1},
    {"llama-old-error",
     S("error: {\"error\":{\"code\":500}}\n\ndata: [DONE]\n\n"),
     S(E("error", "{\"error\":{\"code\":500}}", "") E("message", "[DONE]", "")), 0, 0, -1},
    {"u2028", S("data: a\xe2\x80\xa8" "b\n\n"), S(E("message", "a\xe2\x80\xa8" "b", "")), 0, 0, -1},
    {"event-too-long", S("data: 0123456789\n\n"), S(""), LB_SSE_ERR_EVENT_TOO_LONG, 4, -1},
    {"many-lines-too-long", S("data\ndata\ndata\ndata\ndata\ndata\n\n"), S(""), LB_SSE_ERR_EVENT_TOO_LONG, 4, -1},
    {"data-at-limit", S("data: 0123\n\n"), S(E("message", "0123", "")), 0, 4, -1},
    {"unfinished-line-too-long",
     S("data: ok\n\n:"
       "0123456789012345678901234567890123456789012345678901234567890123456789"),
     S(""), LB_SSE_ERR_LINE_TOO_LONG, 4, -1},
};

static void check_result(const struct tcase *c, const char *how, lb_sse *s, const struct sink *k)
{
    if (c->err) {
        CHECK(k->err == c->err, "%s/%s: error %ld, want %ld", c->name, how, k->err, c->err);
        /* sticky until reset */
        CHECK(lb_sse_feed(s, (const unsigned char *)"\n", 1) == LB_SSE_ERR_FAILED, "%s/%s: not sticky",
              c->name, how);
        return;
    }
    CHECK(k->err == 0, "%s/%s: unexpected error %ld", c->name, how, k->err);
    /* When a case fails, events of earlier chunks were delivered: only
     * successful runs are compared byte for byte. */
    CHECK(k->len == c->want_len && memcmp(k->buf, c->want, c->want_len) == 0, "%s/%s: events differ (%zu bytes, want %zu)",
          c->name, how, k->len, c->want_len);
    CHECK(lb_sse_retry(s) == c->retry, "%s/%s: retry %lld, want %lld", c->name, how, lb_sse_retry(s), c->retry);
    CHECK(lb_sse_bytes_fed(s) == c->in_len, "%s/%s: bytes_fed %llu", c->name, how, lb_sse_bytes_fed(s));
}

static void run_case(const struct tcase *c)
{
    static const size_t steps[] = {0, 1, 3};
    static const char *names[] = {"whole", "bytewise", "3-byte"};
    size_t max = c->max_event ? c->max_event : (size_t)1 << 20;
    lb_sse *s = lb_sse_new(max);
    size_t i;
    int round;

    if (s == NULL)
        exit(2);
    for (round = 0; round < 2; round++) { /* round 1 reuses the splitter after reset */
        for (i = 0; i < sizeof steps / sizeof steps[0]; i++) {
            struct sink k;
            k.len = 0;
            k.err = 0;
            lb_sse_reset(s);
            feed_chunks(s, (const unsigned char *)c->in, c->in_len, steps[i], &k);
            check_result(c, names[i], s, &k);
        }
    }
    lb_sse_free(s);
}

/* The input ends exactly where a PROT_NONE page begins. */
static void run_case_guard(const struct tcase *c, unsigned char *page, size_t pagesize)
{
    size_t max = c->max_event ? c->max_event : (size_t)1 << 20;
    unsigned char *in = page + pagesize - c->in_len;
    lb_sse *s = lb_sse_new(max);
    struct sink k;
    size_t i;

    if (s == NULL || c->in_len > pagesize)
        exit(2);
    memcpy(in, c->in, c->in_len);

    k.len = 0;
    k.err = 0;
    feed(s, in, c->in_len, &k);
    check_result(c, "guard-whole", s, &k);

    /* Byte by byte, every byte moved to the last byte before the guard. */
    lb_sse_reset(s);
    k.len = 0;
    k.err = 0;
    for (i = 0; i < c->in_len; i++) {
        page[pagesize - 1] = (unsigned char)c->in[i];
        feed(s, page + pagesize - 1, 1, &k);
    }
    feed(s, page + pagesize, 0, &k); /* an empty chunk right at the guard */
    check_result(c, "guard-bytewise", s, &k);
    lb_sse_free(s);
}

static void test_api(void)
{
    lb_sse *s;
    long n;
    CHECK(lb_sse_new(0) == NULL, "max_event_bytes 0 must be refused");
    s = lb_sse_new(64);
    if (s == NULL)
        exit(2);
    CHECK(lb_sse_retry(s) == -1, "fresh retry");
    CHECK(lb_sse_pending(s) == 0, "fresh pending");
    n = lb_sse_feed(s, (const unsigned char *)"\xef\xbb", 2);
    CHECK(n == 0 && lb_sse_pending(s) == 2, "partial BOM is pending (%zu)", lb_sse_pending(s));
    n = lb_sse_feed(s, (const unsigned char *)"\xbf" "data: abc\ndata", 15);
    CHECK(n == 0 && lb_sse_pending(s) == 8, "pending data + line (%zu)", lb_sse_pending(s));
    n = lb_sse_feed(s, (const unsigned char *)"\r", 1);
    CHECK(n == 0, "CR");
    n = lb_sse_feed(s, (const unsigned char *)"", 0);
    CHECK(n == 0, "empty chunk");
    n = lb_sse_feed(s, (const unsigned char *)"\n\n", 2);
    CHECK(n == 1, "CRLF across chunks then blank line: %ld", n);
    if (n == 1) {
        const size_t *r = lb_sse_records(s);
        CHECK(r[1] == 4 && memcmp(lb_sse_out(s) + r[0], "abc\n", 4) == 0, "data");
        CHECK(r[3] == 0 && r[5] == 0, "default type, empty id");
    }
    CHECK(lb_sse_bytes_fed(s) == 20, "bytes fed %llu", lb_sse_bytes_fed(s));
    lb_sse_reset(s);
    CHECK(lb_sse_bytes_fed(s) == 0 && lb_sse_pending(s) == 0 && lb_sse_retry(s) == -1, "reset");
    lb_sse_free(s);
    lb_sse_free(NULL);
}

int main(void)
{
    size_t i, pagesize = (size_t)sysconf(_SC_PAGESIZE);
    unsigned char *pages = mmap(NULL, 2 * pagesize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (pages == MAP_FAILED || mprotect(pages + pagesize, pagesize, PROT_NONE) != 0) {
        perror("mmap/mprotect");
        return 2;
    }
    test_api();
    for (i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        run_case(&cases[i]);
        run_case_guard(&cases[i], pages, pagesize);
    }
    munmap(pages, 2 * pagesize);
    if (failures) {
        fprintf(stderr, "%d of %d checks failed\n", failures, checks);
        return 1;
    }
    printf("%zu cases, %d checks passed\n", sizeof cases / sizeof cases[0], checks);
    return 0;
}
