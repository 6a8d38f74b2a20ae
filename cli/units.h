/* Sizes and durations on the command line: "80GiB" -> bytes, bytes -> "85.90 GB", the size as
 * given, seconds -> "412.3 ms". */
#ifndef MPS_CLI_UNITS_H
#define MPS_CLI_UNITS_H

#include <stddef.h>
#include <stdint.h>

/* "80GiB", "40GB", "512MiB", "1.5TB", "1000B"; K, M, G, T alone mean KiB .. TiB. -1 if not a size. */
int cli_parse_size(const char *text, int64_t *out);
/* The size as the user wrote it, with the unit spelled out and spaced: "80GiB" -> "80 GiB",
 * "80G" -> "80 GiB", "40GB" -> "40 GB". text must be accepted by cli_parse_size. */
const char *cli_size_label(char *buf, size_t size, const char *text);
/* Human-readable bytes: "85.90 GB" (binary 0) or "80.00 GiB" (binary 1). */
const char *cli_fmt_bytes(char *buf, size_t size, int64_t bytes, int binary);
/* A duration: "1.25 s", "412.3 ms", "3.4 us". */
const char *cli_fmt_seconds(char *buf, size_t size, double seconds);

#endif
