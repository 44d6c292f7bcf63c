/*
 * libFuzzer harness for lb_json_chunk_content (csrc/lb_json.c).
 *
 *   clang -std=c99 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
 *       -I csrc fuzz/fuzz_lb_json.c csrc/lb_json.c -o fuzz/out/fuzz_lb_json
 *   fuzz/out/fuzz_lb_json -max_total_time=60 -max_len=4096 fuzz/corpus-work/lb_json
 *
 * The input is copied into an exactly-sized heap buffer (so ASan sees any
 * read past it) and dst is exactly n bytes (any write past it shows). When
 * the function accepts, the output must be non-empty, no longer than the
 * input, and well-formed UTF-8 (checked here by an independent decoder), and
 * a second call must give the same answer.
 */
#include "lb_json.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Well-formed UTF-8 by decoding: no overlong forms, no surrogates, <= U+10FFFF. */
static int valid_utf8(const unsigned char *s, size_t n)
{
    size_t i = 0, k, need;
    uint32_t cp, min;
    while (i < n) {
        unsigned c = s[i];
        if (c < 0x80u) {
            i++;
            continue;
        }
        if ((c & 0xE0u) == 0xC0u) {
            need = 1;
            cp = c & 0x1Fu;
            min = 0x80u;
        } else if ((c & 0xF0u) == 0xE0u) {
            need = 2;
            cp = c & 0x0Fu;
            min = 0x800u;
        } else if ((c & 0xF8u) == 0xF0u) {
            need = 3;
            cp = c & 0x07u;
            min = 0x10000u;
        } else {
            return 0;
        }
        if (n - i <= need)
            return 0;
        for (k = 1; k <= need; k++) {
            if ((s[i + k] & 0xC0u) != 0x80u)
                return 0;
            cp = (cp << 6) | (s[i + k] & 0x3Fu);
        }
        if (cp < min || cp > 0x10FFFFu || (cp >= 0xD800u && cp <= 0xDFFFu))
            return 0;
        i += need + 1;
    }
    return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    unsigned char *in, *dst, *dst2;
    size_t len = 0, len2 = 0;
    int rc, rc2;

    in = malloc(size ? size : 1);
    dst = malloc(size ? size : 1);
    dst2 = malloc(size ? size : 1);
    if (in == NULL || dst == NULL || dst2 == NULL)
        abort();
    if (size)
        memcpy(in, data, size);

    rc = lb_json_chunk_content(in, size, dst, &len);
    if (rc != 0 && rc != 1)
        abort();
    if (rc == 1) {
        if (len == 0 || len > size || !valid_utf8(dst, len))
            abort();
    }
    rc2 = lb_json_chunk_content(in, size, dst2, &len2);
    if (rc2 != rc || (rc == 1 && (len2 != len || memcmp(dst, dst2, len) != 0)))
        abort();

    free(in);
    free(dst);
    free(dst2);
    return 0;
}
