/*
 * feistel.h: a keyed pseudo-random permutation pi of [0, n), the shared random selections of
 * random-k (kernels/randk.cu, csrc/randk.c) and of the sketch's subsampling (kernels/sketch.cu,
 * csrc/sketch.c).  {pi(0), ..., pi(k-1)} are exactly k distinct indices; each pi(j) is computed
 * on its own (O(k) work for k indices, any thread layout) in integer arithmetic only, so CPU and
 * GPU agree bit for bit.
 *
 * Permutation of [0, 2^bits), bits <= 62: an unbalanced Feistel network (Luby & Rackoff, SIAM J.
 * Comput. 1988).  x = L * 2^wr + R with wl = floor(bits / 2) bits in L and wr = bits - wl in R;
 * round r maps (L, R) to (R, (L xor F_r(R)) mod 2^wl) and swaps the widths (the round counts are
 * even, which restores them).  F_r(R) is word 0 of hvdc_stream_block(seed, step, tensor_id,
 * (r + 1) * 2^32 + R): the key's Philox stream at blocks >= 2^32, which no element index below
 * 2^34 uses (so a codec may also draw per-element words from the same key).
 *
 * Rounds: hvdc_feistel_rounds(bits) = max(6, 32 - 4 bits).  Feistel networks on small halves
 * need many rounds to look random: with 4 rounds the 2-subsets of [0, 5) came out with chi^2
 * z-scores of ~300 over 12,000 keys, and cycle walking skewed even the marginals of [0, 9) (z ~
 * 26); with this schedule every size tested (n = 2 .. 300: subset or pair co-inclusion counts and
 * marginals over 12,000 - 20,000 keys; tests/codecs/test_randk.py keeps a few) is within noise.  Large
 * domains, where rounds cost, get 6.
 *
 * [0, n) for 2^(bits-1) < n <= 2^bits: cycle walking (Black & Rogaway, CT-RSA 2002): apply the
 * permutation until the value is below n; it terminates (the cycle through j < n returns to j)
 * after fewer than 2 applications on average.
 */
#ifndef HVDC_FEISTEL_H
#define HVDC_FEISTEL_H
#include "hvdc_common.h"

HVDC_FN int hvdc_feistel_rounds(int bits)
{
    return bits > 6 ? 6 : 32 - 4 * bits;
}

/* The new right half of round r: (L xor F_r(R)) mod 2^wl. */
HVDC_FN hvdc_u64 hvdc_feistel_half(hvdc_u64 left, hvdc_u64 right, int r, int wl, hvdc_u64 seed,
                                   hvdc_u32 step, hvdc_u32 tensor_id)
{
    hvdc_u32 f = hvdc_stream_block(seed, step, tensor_id, ((hvdc_u64)(r + 1) << 32) | right).v[0];
    return (left ^ f) & (((hvdc_u64)1 << wl) - 1u);
}

HVDC_FN hvdc_u64 hvdc_feistel(hvdc_u64 x, int bits, hvdc_u64 seed, hvdc_u32 step, hvdc_u32 tensor_id)
{
    int wl = bits / 2, wr = bits - wl, rounds = hvdc_feistel_rounds(bits);
    hvdc_u64 left = x >> wr, right = x & (((hvdc_u64)1 << wr) - 1u);
    for (int r = 0; r < rounds; ++r) {
        hvdc_u64 next = hvdc_feistel_half(left, right, r, wl, seed, step, tensor_id);
        int w = wl;
        left = right;
        right = next;
        wl = wr;
        wr = w;
    }
    return (left << wr) | right;
}

/* bits = ceil(log2 n) of the domain that holds [0, n) (0 for n = 1): permutation_bits of
 * hvd_compress/codecs/randk.py. */
HVDC_FN int hvdc_perm_bits(hvdc_i64 n)
{
    int bits = 0;
    while (((hvdc_i64)1 << bits) < n) ++bits;
    return bits;
}

/* pi(j) for j < n <= 2^bits (bits = ceil(log2 n); 0 for n = 1). */
HVDC_FN hvdc_i64 hvdc_perm_index(hvdc_i64 j, hvdc_i64 n, int bits, hvdc_u64 seed, hvdc_u32 step,
                                 hvdc_u32 tensor_id)
{
    hvdc_u64 x = (hvdc_u64)j;
    do x = hvdc_feistel(x, bits, seed, step, tensor_id); while (x >= (hvdc_u64)n);
    return (hvdc_i64)x;
}

#endif /* HVDC_FEISTEL_H */
