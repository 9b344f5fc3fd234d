"""Reading the golden vectors (spec/celo2.md §8) with python3-msgpack, and writing a theta
tree back as published-layout bytes (what Celo2(theta=...) takes)."""
import msgpack
import numpy as np


def _ext(code, data):
    if code in (1, 3):  # flax ndarray / numpy scalar: (shape, dtype name, raw C-order bytes)
        shape, dtype, buf = msgpack.unpackb(data, raw=False)
        return np.frombuffer(buf, dtype=dtype).reshape(shape).astype(np.float32)
    return msgpack.ExtType(code, data)


def load(path):
    with open(path, "rb") as f:
        return msgpack.unpackb(f.read(), ext_hook=_ext, raw=False, strict_map_key=False)


def _default(obj):
    if isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj, dtype=np.float32)
        return msgpack.ExtType(1, msgpack.packb([list(a.shape), "float32", a.tobytes()]))
    raise TypeError(f"cannot encode {type(obj).__name__}")


def theta_bytes(theta_tree):
    return msgpack.packb(theta_tree, default=_default, use_bin_type=True)


def rel_error(got, want):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    rms = np.sqrt(np.mean(want * want)) if want.size else 0.0
    return float(np.max(np.abs(got - want))) / max(rms, 1e-30) if want.size else 0.0
