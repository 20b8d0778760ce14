/* SHA-256 (FIPS 180-4) for the VTL0 test guest's measured boot: freestanding, no
 * tables but the round constants, streaming so the image can be hashed in place. */
#ifndef VTL0_SHA256_H
#define VTL0_SHA256_H

#include <stdint.h>

#define SHA256_DIGEST_SIZE 32u

struct sha256 {
    uint32_t h[8];
    uint64_t length;        /* bytes hashed so far */
    uint8_t block[64];      /* the partial block */
    uint32_t fill;          /* bytes in it */
};

void sha256_init(struct sha256 *s);
void sha256_update(struct sha256 *s, const uint8_t *data, uint64_t n);
void sha256_final(struct sha256 *s, uint8_t digest[SHA256_DIGEST_SIZE]);

#endif
