#!/usr/bin/python3
"""PyTorch autograd golden fixtures for the backward ops (tests/unit/test_ops_backward.c).

Regenerate (needs Debian's python3-torch; CI does not, it reads the committed files):

    cd <repo> && /usr/bin/python3 tests/golden/gen_backward.py

The output is deterministic (fixed seed, 2 threads); re-running it must leave git clean.

Files written next to this script, in gen_ops.py's format (its Fixture class is reused):

    backward_elem.safetensors  relu/gelu/sigmoid/tanh/clamp01 backward (NaN, the clamp
                               bounds), mul and lerp backward with broadcasting
    backward_misc.safetensors  linear, mean, maxpool2 (ties, NaN, odd sizes), embedding
                               (repeated ids, I64/I32), mean cross-entropy (ignore_index, NaN)

Every case is "op=<op> k=v ..." in the metadata. Roles: the forward inputs the backward op reads,
under their names (x, a, b, w, idx, labels; "y" is the forward output, which sigmoid and tanh
backward take; embedding backward needs no weight), "dy" the gradient
of the output, and the expected gradients under "ref_<name>" (ref_dx, ref_da, ...), each the
.grad PyTorch autograd leaves on the input after y.backward(dy) in float32.
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_ops import Fixture  # noqa: E402


def randn(*shape, scale=1.0):
    return torch.randn(tuple(shape), dtype=torch.float32) * scale

torch.manual_seed(20261207)
torch.set_num_threads(2)


def grads(f, inputs, dy=None):
    """Runs f on leaf copies of inputs (float ones require grad), backpropagates dy (randn
    like the output when None) and returns (y, dy, [grad of each float input])."""
    leaves = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
    y = f(*leaves)
    if dy is None:
        dy = randn(*y.shape)
    y.backward(dy)
    return y.detach(), dy, [t.grad for t in leaves]


# ---- elementwise ----

def elem_fixture():
    fx = Fixture("backward_elem.safetensors")
    fns = {"relu": torch.relu, "gelu": F.gelu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
           "clamp01": lambda t: torch.clamp(t, 0.0, 1.0)}
    for fn, f in fns.items():
        for shape, tag in (((7, 13), "7x13"), ((33,), "33"), ((2, 3, 5, 7), "4d")):
            x = randn(*shape, scale=2.0)
            flat = x.view(-1)
            if fn in ("relu", "clamp01"):
                flat[0], flat[1], flat[2] = 0.0, 1.0, -0.0  # the bounds: inclusive for clamp
                flat[3] = 0.5
            if tag == "7x13":
                flat[5] = float("nan")  # PyTorch: relu/gelu/sigmoid/tanh pass NaN, clamp 0
            y, dy, (dx,) = grads(f, [x])
            roles = {"x": x, "y": y, "dy": dy, "ref_dx": dx}
            fx.case("%s_bw_%s" % (fn, tag), "unary_backward", roles, fn=fn)

    # mul: broadcasting both ways, a 0-d scalar, same shapes
    for name, sa, sb in (("mul_bw_bcast", (4, 1, 13), (7, 1)), ("mul_bw_scalar", (33,), ()),
                         ("mul_bw_same", (5, 7), (5, 7)), ("mul_bw_lead", (3, 1, 7), (2, 3, 5, 7))):
        a, b = randn(*sa), randn(*sb)
        _, dy, (da, db) = grads(lambda p, q: p * q, [a, b])
        fx.case(name, "mul_backward", {"a": a, "b": b, "dy": dy, "ref_da": da, "ref_db": db})

    # lerp: per-sample weight (the blend), 0-d weight, a broadcast start
    for name, sa, sb, sw in (("lerp_bw_per_sample", (2, 3, 7, 5), (2, 3, 7, 5), (2, 1, 1, 1)),
                             ("lerp_bw_scalar_w", (13, 7), (13, 7), ()),
                             ("lerp_bw_bcast_a", (1, 7, 5), (3, 7, 5), (3, 1, 1)),
                             ("lerp_bw_same", (33,), (33,), (33,))):
        a, b = randn(*sa), randn(*sb)
        w = torch.rand(*sw, dtype=torch.float32) if sw else torch.tensor(0.375)
        if name == "lerp_bw_same":
            w = torch.rand(*sw, dtype=torch.float32) * 2.0 - 0.5  # both formula branches
        _, dy, (da, db, dw) = grads(torch.lerp, [a, b, w])
        fx.case(name, "lerp_backward",
                {"a": a, "b": b, "w": w, "dy": dy, "ref_da": da, "ref_db": db, "ref_dw": dw})
    return fx


# ---- linear, reductions, pooling, embedding, losses ----

def misc_fixture():
    fx = Fixture("backward_misc.safetensors")
    for name, xs, n, bias in (("linear_bw_7x13_33", (7, 13), 33, True),
                              ("linear_bw_3d", (2, 5, 13), 7, True),
                              ("linear_bw_nobias", (33, 16), 13, False),
                              ("linear_bw_wide", (40, 24), 61, True)):
        x, w = randn(*xs), randn(n, xs[-1], scale=0.3)
        b = randn(n) if bias else None
        ins = [x, w] + ([b] if bias else [])
        _, dy, gs = grads(lambda *t: F.linear(*t), ins)
        roles = {"x": x, "w": w, "dy": dy, "ref_dx": gs[0], "ref_dw": gs[1]}
        if bias:
            roles["ref_db"] = gs[2]
        fx.case(name, "linear_backward", roles, bias=int(bias))

    for name, xs, b, e, keep in (("mean_bw_hw", (2, 7, 5, 3), 2, 4, 0),
                                 ("mean_bw_tokens", (3, 13, 33), 1, 2, 0),
                                 ("mean_bw_keepdim", (2, 7, 5, 3), 1, 3, 1),
                                 ("mean_bw_all", (7, 13), 0, 2, 0)):
        x = randn(*xs)
        dims = tuple(range(b, e))
        _, dy, (dx,) = grads(lambda t: t.mean(dim=dims, keepdim=bool(keep)), [x])
        fx.case(name, "mean_backward", {"x": x, "dy": dy, "ref_dx": dx}, begin=b, end=e)

    for name, xs, ties in (("maxpool2_bw_odd", (2, 3, 7, 9), False),
                           ("maxpool2_bw_ties_nan", (2, 2, 6, 8), True),
                           ("maxpool2_bw_13", (1, 4, 13, 13), False)):
        x = randn(*xs)
        if ties:
            x = torch.randint(-2, 2, xs).to(torch.float32)  # many ties: the first max wins
            x[0, 0, 0, 1] = float("nan")  # window (0, 0): the NaN
            x[0, 1, 2, 2] = float("nan")  # two NaNs in window (1, 1): the last one
            x[0, 1, 3, 3] = float("nan")
            x[1, 0, 4, 4] = float("-inf")  # a window of -inf only: its first element
            x[1, 0, 4, 5] = float("-inf")
            x[1, 0, 5, 4] = float("-inf")
            x[1, 0, 5, 5] = float("-inf")
        _, dy, (dx,) = grads(lambda t: F.max_pool2d(t, 2, 2), [x])
        fx.case(name, "maxpool2_backward", {"x": x, "dy": dy, "ref_dx": dx})

    for name, v, d, ishape, dt in (("embedding_bw_i64", 13, 33, (4, 7), torch.int64),
                                   ("embedding_bw_i32", 7, 13, (33,), torch.int32),
                                   ("embedding_bw_wide", 11, 260, (2, 5), torch.int64)):
        w = randn(v, d)
        idx = torch.randint(0, v, ishape, dtype=torch.int64)
        idx.view(-1)[1] = idx.view(-1)[0]  # a repeat for sure
        _, dy, (dw, _) = grads(lambda t, i: F.embedding(i, t), [w, idx])
        fx.case(name, "embedding_backward", {"idx": idx.to(dt), "dy": dy, "ref_dw": dw})

    for name, n, c, ign, scale in (("xent_bw_7x13", 7, 13, -100, 1.0),
                                   ("xent_bw_ignore", 6, 33, -100, 1.0),
                                   ("xent_bw_ignore_2_scaled", 9, 5, 2, 0.5),
                                   ("xent_bw_97_nan", 5, 97, -100, 1.0)):
        x = randn(n, c, scale=2.0)
        labels = torch.randint(0, c, (n,), dtype=torch.int64)
        if name == "xent_bw_ignore":
            labels[1] = -100
            labels[4] = -100
        if name == "xent_bw_97_nan":
            x[3, 10] = float("nan")  # the whole row's gradient is NaN
        dy = torch.tensor(scale, dtype=torch.float32)
        _, _, (dx,) = grads(lambda t: F.cross_entropy(t, labels, ignore_index=ign), [x], dy)
        fx.case(name, "cross_entropy_backward", {"x": x, "labels": labels, "ref_dx": dx},
                ignore_index=ign, dloss=scale)

    # add: the position embedding's [T, D] under [B, T, D], broadcasting both ways, a scalar
    for name, sa, sb in (("add_bw_pos", (3, 7, 16), (7, 16)), ("add_bw_bcast", (4, 1, 13), (7, 1)),
                         ("add_bw_scalar", (33,), ()), ("add_bw_same", (5, 7), (5, 7))):
        a, b = randn(*sa), randn(*sb)
        _, dy, (da, db) = grads(lambda p, q: p + q, [a, b])
        fx.case(name, "add_backward", {"a": a, "b": b, "dy": dy, "ref_da": da, "ref_db": db})
    return fx


def main():
    total = 0
    for fx in (elem_fixture(), misc_fixture()):
        total += fx.write()
    print("total %d bytes" % total)
    assert total < 200 * 1024


if __name__ == "__main__":
    main()
