"""kasmina's dropout masks in NumPy (docs/training.md#dropout-masks; daemon/nn/kmath.h).

An independent implementation from the written definition, used by the golden generators
(gen_backward_nn.py, gen_train_tf.py) to build PyTorch references that drop exactly the elements
kasmina drops: Philox4x32-10 (Random123's philox4x32, 10 rounds) with key (low, high 32 bits of
the seed) and counter (low 32 bits of b, site + 2^16 * (b >> 32), low, high 32 bits of the step)
for the block b = n >> 2 of element n, which takes output word n & 3; the element is kept when
(word >> 8) >= ceil(p * 2^24) and then multiplied by float32(1 / (1 - p)).
"""
import math

import numpy as np

M0, M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
W0, W1 = 0x9E3779B9, 0xBB67AE85
MASK32 = np.uint64(0xFFFFFFFF)
S32 = np.uint64(32)


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 of counter arrays (uint64 holding 32-bit values) under key (k0, k1)."""
    c = [np.asarray(x, dtype=np.uint64) & MASK32 for x in (c0, c1, c2, c3)]
    for r in range(10):
        if r:
            k0 = (k0 + W0) & 0xFFFFFFFF
            k1 = (k1 + W1) & 0xFFFFFFFF
        p0 = M0 * c[0]  # < 2^64: exact in uint64
        p1 = M1 * c[2]
        c = [((p1 >> S32) ^ c[1] ^ np.uint64(k0)) & MASK32, p1 & MASK32,
             ((p0 >> S32) ^ c[3] ^ np.uint64(k1)) & MASK32, p0 & MASK32]
    return c


def self_test():
    """Random123's known-answer vectors for philox4x32_10."""
    kat = [((0, 0, 0, 0), (0, 0), (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
           ((0xffffffff,) * 4, (0xffffffff,) * 2, (0x408f276d, 0x41c83b0e, 0xa20bc7c6,
                                                   0x6d5451fd)),
           ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0),
            (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1))]
    for ctr, key, want in kat:
        got = tuple(int(w) for w in philox4x32_10(*ctr, *key))
        assert got == want, (ctr, key, [hex(w) for w in got])


def factors(seed, step, site, n, p):
    """float32 factors of elements 0 .. n-1: float32(1 / (1 - p)) kept, 0 dropped."""
    assert 0.0 <= p < 1.0 and 0 <= site < 1 << 16
    idx = np.arange(n, dtype=np.uint64)
    blk = idx >> np.uint64(2)
    w = philox4x32_10(blk & MASK32, np.uint64(site) | ((blk >> S32) << np.uint64(16)),
                      np.uint64(step & 0xFFFFFFFF), np.uint64(step >> 32),
                      seed & 0xFFFFFFFF, seed >> 32)
    lane = (idx & np.uint64(3)).astype(np.int64)
    word = np.choose(lane, w)
    thr = math.ceil(p * 16777216.0)
    keep = (word >> np.uint64(8)) >= np.uint64(thr)
    scale = np.float32(1.0 / (1.0 - p))
    return np.where(keep, scale, np.float32(0.0)).astype(np.float32)


self_test()
