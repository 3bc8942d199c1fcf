#!/usr/bin/env python3
"""Packages the built wasm filter as an OCI image layout, without a container engine.

The image is the "compat" variant of the Wasm image specification
(github.com/solo-io/wasm, spec/spec-compat.md), the one Envoy Gateway's image fetcher
(internal/wasm/imagefetcher.go, extractOCIStandardImage) and Istio load: a single
`application/vnd.oci.image.layer.v1.tar+gzip` layer holding `plugin.wasm`, and the
manifest annotation `module.wasm.image/variant: compat`. It is what `FROM scratch` +
`COPY plugin.wasm` builds (filter/Dockerfile), written directly.

The layout is reproducible: the same wasm always gives the same digests (fixed owner,
mode and mtime in the tar, no timestamp or name in the gzip header, canonical JSON).
Push it with `skopeo copy --preserve-digests oci:<dir>:<tag> docker://<registry>/filter:<tag>`.

Usage: tools/oci_image.py [--wasm FILE] [--out DIR] [--tag TAG]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import shutil
import sys
import tarfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WASM = ROOT / "target/wasm32-wasip1/release/modelgate_filter.wasm"
DEFAULT_OUT = ROOT / "target/images/filter"

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
# The file name the fetchers look for in the layer (spec-compat.md).
PLUGIN_NAME = "plugin.wasm"
VARIANT = {"module.wasm.image/variant": "compat"}
REF_NAME = "org.opencontainers.image.ref.name"


def workspace_version() -> str:
    with open(ROOT / "Cargo.toml", "rb") as f:
        return tomllib.load(f)["workspace"]["package"]["version"]


def canonical_json(value: dict) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(wasm: bytes) -> bytes:
    """The uncompressed layer: one regular file, owned by root, read-only for others, at the epoch."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(PLUGIN_NAME)
        info.size, info.mode, info.mtime = len(wasm), 0o644, 0
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        tar.addfile(info, io.BytesIO(wasm))
    return out.getvalue()


def image_blobs(wasm: bytes, tag: str) -> tuple[dict[str, bytes], bytes]:
    """The image's blobs by digest, and the layout's index.json."""
    tar = layer_tar(wasm)
    layer = gzip.compress(tar, compresslevel=9, mtime=0)
    # Go's names for the platform, as the image spec asks: the module runs wherever Envoy does.
    config = canonical_json({
        "architecture": "wasm",
        "os": "wasip1",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [sha256(tar)]},
    })
    manifest = canonical_json({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": sha256(config), "size": len(config)},
        "layers": [{"mediaType": LAYER_TYPE, "digest": sha256(layer), "size": len(layer)}],
        "annotations": VARIANT,
    })
    index = canonical_json({
        "schemaVersion": 2,
        "mediaType": INDEX_TYPE,
        "manifests": [{
            "mediaType": MANIFEST_TYPE,
            "digest": sha256(manifest),
            "size": len(manifest),
            "annotations": {REF_NAME: tag},
        }],
    })
    blobs = {sha256(blob): blob for blob in (layer, config, manifest)}
    return blobs, index


def write_layout(out: Path, blobs: dict[str, bytes], index: bytes) -> None:
    """Writes the layout afresh, so no blob of an earlier build lingers."""
    if out.exists():
        if not (out / "oci-layout").is_file():
            sys.exit(f"{out} exists and is no OCI image layout; not overwriting it")
        shutil.rmtree(out)
    (out / "blobs/sha256").mkdir(parents=True)
    for digest, blob in blobs.items():
        (out / "blobs/sha256" / digest.removeprefix("sha256:")).write_bytes(blob)
    (out / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": "1.0.0"}))
    (out / "index.json").write_bytes(index)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wasm", type=Path, default=DEFAULT_WASM, help="the built filter (make build)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the OCI image layout to write")
    parser.add_argument("--tag", default=None, help="the image's tag (default: the workspace version)")
    args = parser.parse_args()
    if not args.wasm.is_file():
        sys.exit(f"{args.wasm} not found: run `make build` first")
    wasm = args.wasm.read_bytes()
    tag = args.tag or workspace_version()
    blobs, index = image_blobs(wasm, tag)
    write_layout(args.out, blobs, index)
    manifest_digest = json.loads(index)["manifests"][0]["digest"]
    print(f"wasm OCI image layout: {args.out} (tag {tag})")
    print(f"  manifest digest: {manifest_digest}")
    print(f"  wasm sha256:     {hashlib.sha256(wasm).hexdigest()}  (an EnvoyExtensionPolicy's HTTP source)")
    print(f"  push: skopeo copy --preserve-digests oci:{args.out}:{tag} docker://ghcr.io/modelgate/filter:{tag}")


if __name__ == "__main__":
    main()
