"""kasmina_client without a server: Tensor <-> numpy for every dtype, validation, enum names."""
import sys
import unittest

import numpy as np

import kasmina_client as kc
from kasmina_client import pb


class TensorTest(unittest.TestCase):
    def test_round_trip_keeps_dtype_shape_and_values(self):
        for a in (np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 7.5,
                  np.array([[1, -2], [3, 2**40]], dtype=np.int64),
                  np.array([5, -6, 7], dtype=np.int32),
                  np.array([[0.5, -1.25]], dtype=np.float16),
                  np.float32(3.0)):
            t = kc.tensor_from_numpy(a)
            b = kc.tensor_to_numpy(t)
            self.assertEqual(b.dtype, np.asarray(a).dtype)
            self.assertEqual(b.shape, np.asarray(a).shape)
            np.testing.assert_array_equal(b, a)

    def test_wire_layout_is_little_endian_row_major(self):
        t = kc.tensor_from_numpy(np.array([[1, 2], [3, 4]], dtype=np.float32).T)
        self.assertEqual(t.dtype, pb.DTYPE_F32)
        self.assertEqual(list(t.shape), [2, 2])
        self.assertEqual(np.frombuffer(t.data, "<f4").tolist(), [1, 3, 2, 4])
        big = np.array([1, 2], dtype=">i4")
        self.assertEqual(kc.tensor_from_numpy(big).data, np.array([1, 2], "<i4").tobytes())

    def test_default_dtype_mapping(self):
        self.assertEqual(kc.tensor_from_numpy(np.zeros(2, np.float64)).dtype, pb.DTYPE_F32)
        self.assertEqual(kc.tensor_from_numpy(np.zeros(2, np.uint8)).dtype, pb.DTYPE_I64)
        self.assertEqual(kc.tensor_from_numpy([1, 2, 3]).dtype, pb.DTYPE_I64)
        self.assertEqual(kc.tensor_from_numpy([1.0]).dtype, pb.DTYPE_F32)
        self.assertEqual(kc.tensor_from_numpy(np.zeros(2), dtype="i32").dtype, pb.DTYPE_I32)

    def test_bf16_rounds_to_nearest_even(self):
        a = np.array([1.0, 1.00390625, 1.01171875, -2.5, np.inf, np.nan], np.float32)
        t = kc.tensor_from_numpy(a, dtype="bf16")
        self.assertEqual(t.dtype, pb.DTYPE_BF16)
        self.assertEqual(len(t.data), 2 * a.size)
        b = kc.tensor_to_numpy(t)
        self.assertEqual(b.dtype, np.float32)
        np.testing.assert_array_equal(b[:5], [1.0, 1.0, 1.015625, -2.5, np.inf])
        self.assertTrue(np.isnan(b[5]))

    def test_bad_tensors_are_rejected(self):
        with self.assertRaises(ValueError):
            kc.tensor_to_numpy(pb.Tensor(dtype=pb.DTYPE_F32, shape=[2, 2], data=b"\0" * 12))
        with self.assertRaises(ValueError):
            kc.tensor_to_numpy(pb.Tensor(dtype=pb.DTYPE_UNSPECIFIED, shape=[1], data=b"\0" * 4))
        with self.assertRaises(ValueError):
            kc.tensor_to_numpy(pb.Tensor(dtype=pb.DTYPE_I32, shape=[-1], data=b""))
        with self.assertRaises(ValueError):
            kc.tensor_from_numpy(np.zeros(2, np.complex64))
        with self.assertRaises(ValueError):
            kc.tensor_from_numpy(np.zeros(2), dtype="f64")

    def test_empty_and_scalar_tensors(self):
        t = kc.tensor_from_numpy(np.zeros((0, 3), np.float32))
        self.assertEqual(kc.tensor_to_numpy(t).shape, (0, 3))
        t = pb.Tensor(dtype=pb.DTYPE_F32, data=np.float32(2).tobytes())
        self.assertEqual(kc.tensor_to_numpy(t).shape, ())


class EnumTest(unittest.TestCase):
    def test_names(self):
        self.assertEqual(kc._stage("training"), pb.STAGE_TRAINING)
        self.assertEqual(kc._stage(None), pb.STAGE_UNKNOWN)
        self.assertEqual(kc._stage("next"), pb.STAGE_UNKNOWN)
        self.assertEqual(kc._curve("cosine"), pb.ALPHA_CURVE_COSINE)
        self.assertEqual(kc._algorithm("GATE"), pb.ALPHA_ALGORITHM_GATE)
        self.assertEqual(kc._gate("G3"), pb.GATE_G3)
        self.assertEqual(kc.stage_name(pb.STAGE_HOLDING), "HOLDING")
        with self.assertRaises(ValueError):
            kc._stage("shadowing")

    def test_default_target(self):
        import os
        old = os.environ.pop("KASMINA_ADDR", None)
        try:
            os.environ["KASMINA_ADDR"] = "/tmp/x.sock"
            self.assertEqual(kc.default_target(), "unix:/tmp/x.sock")
            os.environ["KASMINA_ADDR"] = "localhost:1"
            self.assertEqual(kc.default_target(), "localhost:1")
        finally:
            os.environ.pop("KASMINA_ADDR", None)
            if old is not None:
                os.environ["KASMINA_ADDR"] = old

    def test_errors_carry_status_and_kasmina_code(self):
        import grpc
        e = kc.KasminaError(grpc.StatusCode.NOT_FOUND, "model 'x' does not exist.", "KSM_ENOMODEL",
                            "GetModel")
        self.assertIn("KSM_ENOMODEL", str(e))
        self.assertEqual(e.code, grpc.StatusCode.NOT_FOUND)


if __name__ == "__main__":
    sys.exit(0 if unittest.main(exit=False, verbosity=1).result.wasSuccessful() else 1)
