/*
 * lb_json: a fast path for the common llama-server streaming chunk.
 *
 * It recognizes exactly one shape, the one the Python decoder's short path
 * takes (StreamDecoder.feed): a JSON object whose "choices" is an array of
 * exactly one element; that choices[0] is an object whose "delta" is an
 * object with exactly one member, "content", a string that is non-empty
 * after unescaping; choices[0]."finish_reason" and choices[0]."logprobs" are
 * absent or null (log-probabilities go to the general decoder, which carries
 * them); and choices[0]."index" is absent, null or the integer 0 (0 or -0:
 * a chunk of another choice, n > 1, goes to the general decoder, which keeps
 * the choices apart). Anything else, and anything the scanner is not sure
 * about, returns 0 so that Python handles it.
 *
 * The whole input is validated as strict JSON (RFC 8259: UTF-8 without BOM,
 * no raw control characters, valid escapes and surrogate pairs, number
 * grammar, nothing after the value). A lone surrogate escape (a server that
 * splits an emoji's UTF-16 pair over two chunks) is not strict JSON: it
 * returns 0, and the Python decoder rejoins the halves. On top of that it conservatively
 * returns 0 when:
 *   - the top level has an "error", "usage" or "timings" member;
 *   - the top level, choices[0] or the delta has a duplicate key, a key with a
 *     backslash in it, or more than LB_JSON_MAX_KEYS members;
 *   - nesting is deeper than LB_JSON_MAX_DEPTH containers;
 *   - a number's integer part has more than LB_JSON_MAX_INT_DIGITS digits, or
 *     its magnitude could reach 1e308 (integer digits + exponent > 308), so
 *     that a parser producing doubles could overflow to infinity.
 *
 * No allocation, no global state, never reads outside in[0..n).
 *
 * This header is also a cffi cdef: keep it free of preprocessor logic other
 * than the include guard, the includes and plain integer #defines.
 */
#ifndef LB_JSON_H
#define LB_JSON_H

#include <stddef.h>

#define LB_JSON_MAX_DEPTH 64      /* containers open at once */
#define LB_JSON_MAX_KEYS 32       /* members of each object on the path */
#define LB_JSON_MAX_INT_DIGITS 18 /* digits before the point or exponent */

/*
 * Returns 1 when in[0..n) is exactly one valid JSON value of the common chunk
 * shape (optional JSON whitespace around it); then the content string,
 * unescaped to UTF-8, is in dst[0..*dst_len) and 0 < *dst_len <= n. dst must
 * hold n bytes (an unescaped JSON string is never longer than its escaped
 * form) and must not overlap in. Returns 0 for anything else (also for
 * in == NULL or n == 0); dst and *dst_len are then unspecified.
 */
int lb_json_chunk_content(const unsigned char *in, size_t n, unsigned char *dst, size_t *dst_len);

#endif
