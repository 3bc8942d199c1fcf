"""The wasm filter's OCI image, as an operator pushes it and Envoy Gateway pulls it: a valid OCI
image layout (every digest and size true, the media types and the config the image spec asks
for), the same bytes from two builds, and a layer that unpacks, the way Envoy Gateway's image
fetcher unpacks it (internal/wasm/imagefetcher.go), into exactly the filter `make build` built.
With buildah at hand, filter/Dockerfile's image is unpacked the same way."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WASM = ROOT / "target/wasm32-wasip1/release/modelgate_filter.wasm"
BUILDER = ROOT / "tools/oci_image.py"

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
# The only layer type Envoy Gateway's fetcher takes from an OCI manifest of the compat variant.
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def build(out: Path, *extra: str) -> str:
    assert WASM.is_file(), f"{WASM} missing: run `make build` first"
    done = subprocess.run([sys.executable, str(BUILDER), "--out", str(out), *extra],
                          capture_output=True, text=True, check=True)
    return done.stdout


def blob(layout: Path, descriptor: dict) -> bytes:
    """A descriptor's blob, checked against the digest and size the descriptor promises."""
    algorithm, hex_digest = descriptor["digest"].split(":")
    assert algorithm == "sha256"
    data = (layout / "blobs/sha256" / hex_digest).read_bytes()
    assert hashlib.sha256(data).hexdigest() == hex_digest, descriptor
    assert len(data) == descriptor["size"], descriptor
    return data


def image_manifest(layout: Path, tag: str) -> dict:
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((layout / "index.json").read_text())
    assert index["schemaVersion"] == 2
    [entry] = [m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == tag]
    assert entry["mediaType"] == MANIFEST
    manifest = json.loads(blob(layout, entry))
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == MANIFEST
    return manifest


def plugin_as_envoy_gateway_reads_it(layout: Path, manifest: dict) -> bytes:
    """The fetcher's compat path: the last layer, of the OCI gzip type, ungzipped, and the first tar
    entry whose base name is plugin.wasm. Its config must name the layer's uncompressed digest."""
    layer_descriptor = manifest["layers"][-1]
    assert layer_descriptor["mediaType"] == OCI_LAYER
    layer = blob(layout, layer_descriptor)
    tar = gzip.decompress(layer)
    config = json.loads(blob(layout, manifest["config"]))
    assert manifest["config"]["mediaType"] == CONFIG
    assert config["architecture"] and config["os"]
    assert config["rootfs"] == {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(tar).hexdigest()]}
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        for member in archive:
            if os.path.basename(member.name) == "plugin.wasm":
                return archive.extractfile(member).read()
    pytest.fail("no plugin.wasm in the layer")


def test_the_layout_is_valid_and_holds_the_built_filter(tmp_path):
    layout = tmp_path / "filter"
    printed = build(layout, "--tag", "1.2.3")
    wasm = WASM.read_bytes()
    manifest = image_manifest(layout, "1.2.3")
    assert len(manifest["layers"]) == 1
    assert manifest["annotations"]["module.wasm.image/variant"] == "compat"
    assert plugin_as_envoy_gateway_reads_it(layout, manifest) == wasm
    # Nothing but the blobs the layout describes.
    index = json.loads((layout / "index.json").read_text())
    described = [*index["manifests"], manifest["config"], *manifest["layers"]]
    assert {p.name for p in (layout / "blobs/sha256").iterdir()} == {d["digest"].split(":")[1] for d in described}
    # The digest an EnvoyExtensionPolicy's HTTP source names.
    assert hashlib.sha256(wasm).hexdigest() in printed


def test_two_builds_are_byte_identical(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    build(first)
    build(second)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    # The default tag is the workspace's version, the one the manifests name.
    assert image_manifest(first, "0.1.0")


def test_a_build_replaces_an_earlier_layout_but_nothing_else(tmp_path):
    layout = tmp_path / "filter"
    build(layout)
    stale = layout / "blobs/sha256" / ("0" * 64)
    stale.write_bytes(b"old")
    build(layout)
    assert not stale.exists()
    other = tmp_path / "not-a-layout"
    other.mkdir()
    (other / "keep").write_text("mine")
    refused = subprocess.run([sys.executable, str(BUILDER), "--out", str(other)], capture_output=True, text=True)
    assert refused.returncode != 0 and "no OCI image layout" in refused.stderr
    assert (other / "keep").read_text() == "mine"


@pytest.mark.skipif(shutil.which("buildah") is None or os.geteuid() != 0,
                    reason="buildah (run as root, daemonless) is not available")
def test_the_dockerfile_builds_the_same_plugin(tmp_path):
    storage = ["--root", str(tmp_path / "root"), "--runroot", str(tmp_path / "run"), "--storage-driver", "vfs"]
    tag = "localhost/modelgate-filter-test:0.1.0"
    subprocess.run(["buildah", *storage, "build", "--isolation", "chroot", "--quiet",
                    "-f", "filter/Dockerfile", "-t", tag, "."], cwd=ROOT, check=True, capture_output=True)
    layout = tmp_path / "pushed"
    subprocess.run(["buildah", *storage, "push", tag, f"oci:{layout}:0.1.0"], check=True, capture_output=True)
    manifest = image_manifest(layout, "0.1.0")
    assert plugin_as_envoy_gateway_reads_it(layout, manifest) == WASM.read_bytes()
