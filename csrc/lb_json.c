/*
 * lb_json: see lb_json.h for the contract.
 *
 * A recursive-descent validator over in[0..n). Every scanning function takes
 * the current position p and the end of the input, and returns the position
 * just after what it consumed, or NULL when the input is not valid JSON, not
 * the chunk shape, or past a conservative limit (the caller then returns 0).
 * The three objects on the path (top level, choices[0], its delta) get their
 * own functions; every other value is checked by skip_value(), whose
 * recursion is bounded by LB_JSON_MAX_DEPTH.
 *
 * Strings are scanned eight bytes at a time while no byte is special (a
 * quote, a backslash, a control character or a non-ASCII byte); the special
 * bytes are then handled one by one: UTF-8 sequences are checked against
 * Unicode's table of well-formed byte sequences, escapes are decoded (only
 * the content string is written anywhere).
 */
#include "lb_json.h"

#include <limits.h>
#include <stdint.h>
#include <string.h>

typedef const unsigned char *pos;

#define ONES UINT64_C(0x0101010101010101)
#define HIGHS UINT64_C(0x8080808080808080)

/* Index of the first flagged byte of a special8() result, where the byte
 * order and a count-trailing-zeros builtin are known; elsewhere (or with
 * -DLB_JSON_NO_CTZ) the byte loop after the word loop finds it. */
#if defined(__GNUC__) && defined(__BYTE_ORDER__) && defined(__ORDER_LITTLE_ENDIAN__) && !defined(LB_JSON_NO_CTZ)
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ && ULLONG_MAX == UINT64_MAX
#define LB_FIRST_FLAGGED(m) ((size_t)__builtin_ctzll(m) / 8)
#endif
#endif

static pos skip_ws(pos p, pos end)
{
    while (p < end && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t'))
        p++;
    return p;
}

/* Nonzero when one of the 8 bytes in v is a quote, a backslash, below 0x20
 * or at or above 0x80: the high bit of each such byte is set. A borrow can
 * also mark bytes above one that really matched, never below, so the lowest
 * flagged byte (in memory order) is the first special one. */
static uint64_t special8(uint64_t v)
{
    uint64_t q = v ^ (ONES * 0x22u); /* '"' */
    uint64_t b = v ^ (ONES * 0x5Cu); /* '\\' */
    return (((v - ONES * 0x20u) & ~v) | ((q - ONES) & ~q) | ((b - ONES) & ~b) | v) & HIGHS;
}

static int plain(unsigned c)
{
    return c >= 0x20u && c < 0x80u && c != '"' && c != '\\';
}

/* One well-formed UTF-8 sequence of 2 to 4 bytes starting at p (p[0] >= 0x80). */
static pos utf8_seq(pos p, pos end)
{
    unsigned c = p[0], lo = 0x80u, hi = 0xBFu;
    size_t left = (size_t)(end - p);

    if (c >= 0xC2u && c <= 0xDFu) {
        if (left < 2 || (p[1] & 0xC0u) != 0x80u)
            return NULL;
        return p + 2;
    }
    if (c >= 0xE0u && c <= 0xEFu) {
        if (c == 0xE0u)
            lo = 0xA0u; /* no overlong forms */
        else if (c == 0xEDu)
            hi = 0x9Fu; /* no surrogates */
        if (left < 3 || p[1] < lo || p[1] > hi || (p[2] & 0xC0u) != 0x80u)
            return NULL;
        return p + 3;
    }
    if (c >= 0xF0u && c <= 0xF4u) {
        if (c == 0xF0u)
            lo = 0x90u; /* no overlong forms */
        else if (c == 0xF4u)
            hi = 0x8Fu; /* nothing above U+10FFFF */
        if (left < 4 || p[1] < lo || p[1] > hi || (p[2] & 0xC0u) != 0x80u || (p[3] & 0xC0u) != 0x80u)
            return NULL;
        return p + 4;
    }
    return NULL; /* a continuation byte, C0, C1 or F5..FF */
}

/* Four hex digits at p (the caller checked they are in bounds). */
static int hex4(pos p, unsigned *out)
{
    unsigned v = 0, c, d;
    int i;
    for (i = 0; i < 4; i++) {
        c = p[i];
        if (c >= 0x30u && c <= 0x39u)
            d = c - 0x30u;
        else if ((c | 0x20u) >= 0x61u && (c | 0x20u) <= 0x66u)
            d = (c | 0x20u) - 0x61u + 10u;
        else
            return 0;
        v = (v << 4) | d;
    }
    *out = v;
    return 1;
}

/* One escape at p (p[0] is the backslash). Writes its UTF-8 at *q when q is
 * not NULL. Lone or misordered surrogates are rejected. */
static pos escape(pos p, pos end, unsigned char **q)
{
    unsigned cp, lo;
    unsigned char c, *w;

    if (end - p < 2)
        return NULL;
    switch (p[1]) {
    case '"': c = '"'; break;
    case '\\': c = '\\'; break;
    case '/': c = '/'; break;
    case 'b': c = 0x08; break;
    case 'f': c = 0x0C; break;
    case 'n': c = 0x0A; break;
    case 'r': c = 0x0D; break;
    case 't': c = 0x09; break;
    case 'u':
        if (end - p < 6 || !hex4(p + 2, &cp))
            return NULL;
        p += 6;
        if (cp >= 0xDC00u && cp <= 0xDFFFu)
            return NULL; /* a low surrogate first */
        if (cp >= 0xD800u && cp <= 0xDBFFu) {
            if (end - p < 6 || p[0] != '\\' || p[1] != 'u' || !hex4(p + 2, &lo) || lo < 0xDC00u ||
                lo > 0xDFFFu)
                return NULL; /* a high surrogate without its low half */
            p += 6;
            cp = 0x10000u + ((cp - 0xD800u) << 10) + (lo - 0xDC00u);
        }
        if (q != NULL) {
            w = *q;
            if (cp < 0x80u) {
                *w++ = (unsigned char)cp;
            } else if (cp < 0x800u) {
                *w++ = (unsigned char)(0xC0u | (cp >> 6));
                *w++ = (unsigned char)(0x80u | (cp & 0x3Fu));
            } else if (cp < 0x10000u) {
                *w++ = (unsigned char)(0xE0u | (cp >> 12));
                *w++ = (unsigned char)(0x80u | ((cp >> 6) & 0x3Fu));
                *w++ = (unsigned char)(0x80u | (cp & 0x3Fu));
            } else {
                *w++ = (unsigned char)(0xF0u | (cp >> 18));
                *w++ = (unsigned char)(0x80u | ((cp >> 12) & 0x3Fu));
                *w++ = (unsigned char)(0x80u | ((cp >> 6) & 0x3Fu));
                *w++ = (unsigned char)(0x80u | (cp & 0x3Fu));
            }
            *q = w;
        }
        return p;
    default:
        return NULL;
    }
    if (q != NULL)
        *(*q)++ = c;
    return p + 2;
}

/*
 * A string whose opening quote is just before p; returns the position after
 * its closing quote. When dst is not NULL the unescaped bytes go to dst and
 * their count to *len (never more than the bytes consumed). *esc is set when
 * the string has an escape.
 */
static pos scan_string(pos p, pos end, unsigned char *dst, size_t *len, int *esc)
{
    unsigned char *q = dst;
    pos run = p; /* start of the bytes not yet copied to dst */
    uint64_t v, m;
    unsigned c;

    for (;;) {
        while ((size_t)(end - p) >= 8) {
            memcpy(&v, p, 8);
            m = special8(v);
            if (m) {
#ifdef LB_FIRST_FLAGGED
                p += LB_FIRST_FLAGGED(m);
#endif
                break;
            }
            p += 8;
        }
        while (p < end && plain(*p))
            p++;
        if (p >= end)
            return NULL;
        c = *p;
        if (c == '"') {
            if (dst != NULL) {
                memcpy(q, run, (size_t)(p - run));
                q += p - run;
                *len = (size_t)(q - dst);
            }
            return p + 1;
        }
        if (c == '\\') {
            *esc = 1;
            if (dst != NULL) {
                memcpy(q, run, (size_t)(p - run));
                q += p - run;
                p = escape(p, end, &q);
            } else {
                p = escape(p, end, NULL);
            }
            if (p == NULL)
                return NULL;
            run = p;
            continue;
        }
        if (c < 0x20u)
            return NULL; /* a raw control character */
        p = utf8_seq(p, end);
        if (p == NULL)
            return NULL;
    }
}

/*
 * A number at p (strict JSON grammar). Conservative limits: at most
 * LB_JSON_MAX_INT_DIGITS digits before the point, and no chance of reaching
 * 1e308 (integer digits + exponent <= 308), so that no parser overflows.
 */
static pos scan_number(pos p, pos end)
{
    pos s;
    size_t int_digits = 0;
    unsigned long ex = 0;
    int neg_ex = 0;

    if (*p == '-')
        p++;
    if (p >= end)
        return NULL;
    if (*p == '0') {
        p++;
    } else if (*p >= '1' && *p <= '9') {
        s = p;
        while (p < end && *p >= '0' && *p <= '9')
            p++;
        int_digits = (size_t)(p - s);
        if (int_digits > LB_JSON_MAX_INT_DIGITS)
            return NULL;
    } else {
        return NULL;
    }
    if (p < end && *p == '.') {
        s = ++p;
        while (p < end && *p >= '0' && *p <= '9')
            p++;
        if (p == s)
            return NULL;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < end && (*p == '+' || *p == '-'))
            neg_ex = *p++ == '-';
        s = p;
        while (p < end && *p >= '0' && *p <= '9') {
            if (ex < 100000u)
                ex = ex * 10u + (unsigned long)(*p - '0');
            p++;
        }
        if (p == s)
            return NULL;
        if (!neg_ex && int_digits + ex > 308u)
            return NULL;
    }
    return p;
}

static pos literal(pos p, pos end, const char *word, size_t len)
{
    if ((size_t)(end - p) < len || memcmp(p, word, len) != 0)
        return NULL;
    return p + len;
}

static pos skip_value(pos p, pos end, unsigned depth);

/* An object or array at p ('{' or '['); depth counts it. */
static pos skip_container(pos p, pos end, unsigned depth)
{
    int obj = *p == '{';
    unsigned char close = obj ? '}' : ']';
    int esc;

    if (depth > LB_JSON_MAX_DEPTH)
        return NULL;
    p = skip_ws(p + 1, end);
    if (p < end && *p == close)
        return p + 1;
    for (;;) {
        if (obj) {
            if (p >= end || *p != '"')
                return NULL;
            p = scan_string(p + 1, end, NULL, NULL, &esc);
            if (p == NULL)
                return NULL;
            p = skip_ws(p, end);
            if (p >= end || *p != ':')
                return NULL;
            p = skip_ws(p + 1, end);
        }
        p = skip_value(p, end, depth);
        if (p == NULL)
            return NULL;
        p = skip_ws(p, end);
        if (p >= end)
            return NULL;
        if (*p == close)
            return p + 1;
        if (*p != ',')
            return NULL;
        p = skip_ws(p + 1, end);
    }
}

/* Any JSON value at p, inside `depth` open containers. */
static pos skip_value(pos p, pos end, unsigned depth)
{
    int esc;
    if (p >= end)
        return NULL;
    switch (*p) {
    case '"': return scan_string(p + 1, end, NULL, NULL, &esc);
    case '{':
    case '[': return skip_container(p, end, depth + 1);
    case 't': return literal(p, end, "true", 4);
    case 'f': return literal(p, end, "false", 5);
    case 'n': return literal(p, end, "null", 4);
    default: return scan_number(p, end);
    }
}

/* The keys seen so far in one object on the path, for duplicate checks. */
struct keys {
    pos at[LB_JSON_MAX_KEYS];
    size_t len[LB_JSON_MAX_KEYS];
    unsigned n;
};

/*
 * A member name of an object on the path at p (which must be its opening
 * quote), then the colon. Returns the position of the value; the raw name is
 * (*k, *klen). Fails on a backslash in the name (names are compared as raw
 * bytes), a duplicate, or too many members.
 */
static pos path_key(pos p, pos end, struct keys *ks, pos *k, size_t *klen)
{
    int esc = 0;
    unsigned i;
    size_t len;

    if (p >= end || *p != '"')
        return NULL;
    *k = ++p;
    p = scan_string(p, end, NULL, NULL, &esc);
    if (p == NULL || esc)
        return NULL;
    len = (size_t)(p - 1 - *k);
    for (i = 0; i < ks->n; i++)
        if (ks->len[i] == len && memcmp(ks->at[i], *k, len) == 0)
            return NULL;
    if (ks->n == LB_JSON_MAX_KEYS)
        return NULL;
    ks->at[ks->n] = *k;
    ks->len[ks->n] = len;
    ks->n++;
    *klen = len;
    p = skip_ws(p, end);
    if (p >= end || *p != ':')
        return NULL;
    return skip_ws(p + 1, end);
}

/* After a member's value: returns the position of the next name, or
 * *done = 1 and the position after the closing brace. */
static pos next_member(pos p, pos end, int *done)
{
    p = skip_ws(p, end);
    if (p >= end)
        return NULL;
    if (*p == '}') {
        *done = 1;
        return p + 1;
    }
    if (*p != ',')
        return NULL;
    return skip_ws(p + 1, end);
}

#define KEY_IS(k, klen, lit) ((klen) == sizeof(lit) - 1 && memcmp((k), (lit), sizeof(lit) - 1) == 0)

/* The delta at p: exactly {"content": "<non-empty>"}, unescaped into dst. */
static pos parse_delta(pos p, pos end, unsigned char *dst, size_t *dst_len)
{
    int esc = 0;
    if (p >= end || *p != '{')
        return NULL;
    p = skip_ws(p + 1, end);
    p = literal(p, end, "\"content\"", 9);
    if (p == NULL)
        return NULL;
    p = skip_ws(p, end);
    if (p >= end || *p != ':')
        return NULL;
    p = skip_ws(p + 1, end);
    if (p >= end || *p != '"')
        return NULL;
    p = scan_string(p + 1, end, dst, dst_len, &esc);
    if (p == NULL || *dst_len == 0)
        return NULL;
    p = skip_ws(p, end);
    if (p >= end || *p != '}')
        return NULL;
    return p + 1;
}

/* The value of choices[0]."index" at p: the integer 0 (also written -0) or
 * null, which both name the first choice; anything else (another choice, or
 * 0.0, false ...) is left to Python. */
static pos index_zero(pos p, pos end)
{
    if (p < end && *p == 'n')
        return literal(p, end, "null", 4);
    if (p < end && *p == '-')
        p++;
    if (p >= end || *p != '0')
        return NULL;
    p++;
    if (p < end && ((*p >= '0' && *p <= '9') || *p == '.' || *p == 'e' || *p == 'E'))
        return NULL;
    return p;
}

/* choices[0] at p: an object with a delta, finish_reason and logprobs
 * absent or null, and index absent, null or 0. */
static pos parse_choice(pos p, pos end, unsigned char *dst, size_t *dst_len)
{
    struct keys ks;
    pos k;
    size_t klen;
    int done = 0, have_delta = 0;

    if (p >= end || *p != '{')
        return NULL;
    ks.n = 0;
    p = skip_ws(p + 1, end);
    while (!done) {
        p = path_key(p, end, &ks, &k, &klen);
        if (p == NULL)
            return NULL;
        if (KEY_IS(k, klen, "delta")) {
            p = parse_delta(p, end, dst, dst_len);
            have_delta = 1;
        } else if (KEY_IS(k, klen, "finish_reason") || KEY_IS(k, klen, "logprobs")) {
            /* a finish or log-probabilities: the general decoder carries them */
            p = literal(p, end, "null", 4);
        } else if (KEY_IS(k, klen, "index")) {
            /* another choice (n > 1) is the general decoder's: it keeps them apart */
            p = index_zero(p, end);
        } else {
            p = skip_value(p, end, 3);
        }
        if (p == NULL)
            return NULL;
        p = next_member(p, end, &done);
        if (p == NULL)
            return NULL;
    }
    return have_delta ? p : NULL;
}

/* The value of "choices" at p: an array of exactly one element that fits
 * (a chunk with several choices is the general decoder's). */
static pos parse_choices(pos p, pos end, unsigned char *dst, size_t *dst_len)
{
    if (p >= end || *p != '[')
        return NULL;
    p = parse_choice(skip_ws(p + 1, end), end, dst, dst_len);
    if (p == NULL)
        return NULL;
    p = skip_ws(p, end);
    if (p >= end || *p != ']')
        return NULL;
    return p + 1;
}

int lb_json_chunk_content(const unsigned char *in, size_t n, unsigned char *dst, size_t *dst_len)
{
    pos p, end, k;
    struct keys ks;
    size_t klen;
    int done = 0, have_choices = 0;

    if (in == NULL || n == 0)
        return 0; /* (and no arithmetic on a null pointer) */
    end = in + n;
    p = skip_ws(in, end);
    if (p >= end || *p != '{')
        return 0;
    ks.n = 0;
    p = skip_ws(p + 1, end);
    while (!done) {
        p = path_key(p, end, &ks, &k, &klen);
        if (p == NULL)
            return 0;
        if (KEY_IS(k, klen, "choices")) {
            p = parse_choices(p, end, dst, dst_len);
            have_choices = 1;
        } else if (KEY_IS(k, klen, "error") || KEY_IS(k, klen, "usage") || KEY_IS(k, klen, "timings")) {
            return 0;
        } else {
            p = skip_value(p, end, 1);
        }
        if (p == NULL)
            return 0;
        p = next_member(p, end, &done);
        if (p == NULL)
            return 0;
    }
    return have_choices && skip_ws(p, end) == end;
}
