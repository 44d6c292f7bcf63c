/*
 * lb_sse: a sans-IO server-sent-events splitter.
 *
 * Bytes in, complete events out. It implements the WHATWG "interpreting an
 * event stream" rules (LF, CR and CRLF line ends, one leading BOM, comments,
 * fields without a colon, one space stripped after the colon, data lines
 * joined with LF, event type reset after dispatch, last event id persisting,
 * retry only when all digits) plus one llama.cpp extension: a line whose
 * field is "error" acts as "event: error" followed by "data: <value>".
 *
 * One lb_sse_feed() call per network chunk returns every event completed by
 * that chunk as a batch: LB_SSE_FIELDS size_t values per event, offsets into
 * one output byte buffer. Nothing is allocated per event; buffers grow by
 * doubling and are bounded by max_event_bytes. Text is left as bytes: the
 * caller decodes UTF-8 (with replacement) only what it uses.
 *
 * This header is also the cffi cdef: keep it free of preprocessor logic
 * other than the include guard, the includes and plain integer #defines.
 */
#ifndef LB_SSE_H
#define LB_SSE_H

#include <stddef.h>

#define LB_SSE_FIELDS 6 /* per event: data_off, data_len, type_off, type_len, id_off, id_len */

#define LB_SSE_ERR_LINE_TOO_LONG -1  /* a line grew past max_event_bytes + LB_SSE_LINE_SLACK */
#define LB_SSE_ERR_EVENT_TOO_LONG -2 /* an event's data grew past max_event_bytes */
#define LB_SSE_ERR_NOMEM -3          /* an allocation failed */
#define LB_SSE_ERR_FAILED -4         /* an earlier call failed; reset before feeding again */
#define LB_SSE_LINE_SLACK 64         /* room for a field name and the colon on top of the value */

typedef struct lb_sse lb_sse;

/* A new splitter, or NULL when out of memory. max_event_bytes >= 1. */
lb_sse *lb_sse_new(size_t max_event_bytes);
void lb_sse_free(lb_sse *s);
/* Back to the state of a new splitter (start of stream), keeping its buffers. */
void lb_sse_reset(lb_sse *s);

/*
 * Feed one chunk (len may be 0). Returns the number of events completed by
 * it (>= 0) or a negative LB_SSE_ERR_*. The events are read with
 * lb_sse_records() and lb_sse_out(); both stay valid until the next call to
 * lb_sse_feed, lb_sse_reset or lb_sse_free. An event with type_len 0 has the
 * default type "message"; id_len 0 means the last event id is empty.
 */
long lb_sse_feed(lb_sse *s, const unsigned char *buf, size_t len);
const size_t *lb_sse_records(const lb_sse *s);
const unsigned char *lb_sse_out(const lb_sse *s);
/* Bytes of output referenced by the last batch's records. */
size_t lb_sse_out_len(const lb_sse *s);

/*
 * The content fast path. lb_sse_feed_fast() is lb_sse_feed() followed by
 * lb_json_chunk_content() on every untyped event of the batch: the contents
 * of the events of the common chat-chunk shape are unescaped into one UTF-8
 * text, so the caller decodes one string per chunk instead of one JSON
 * document per event. marks[i] is event i's content length in code points
 * (>= 1), or -1 when the event needs the general decoder (read it through
 * lb_sse_records()/lb_sse_out() as usual). The struct lives inside the
 * splitter (its address never changes); its pointers and values are valid
 * until the next feed, reset or free.
 */
typedef struct lb_sse_fast {
    size_t n_fast;             /* events whose content was extracted */
    size_t text_len;           /* bytes in text */
    const char *text;          /* their contents, concatenated in event order */
    const long *marks;         /* one per event: code points, or -1 */
} lb_sse_fast;

long lb_sse_feed_fast(lb_sse *s, const unsigned char *buf, size_t len);
const lb_sse_fast *lb_sse_fast_info(const lb_sse *s);

/* The last valid retry field in milliseconds, or -1 when none was seen. */
long long lb_sse_retry(const lb_sse *s);
/* Bytes held for an unfinished line or event (what end of stream would drop). */
size_t lb_sse_pending(const lb_sse *s);
/* Bytes fed since the start of the stream (for error messages). */
unsigned long long lb_sse_bytes_fed(const lb_sse *s);

#endif
