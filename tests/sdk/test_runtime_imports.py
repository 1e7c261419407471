"""The runtime installs and imports without torch (ARCHITECTURE.md: sdk never imports torch at import)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from .conftest import ROOT, SPACE, server_in_thread

# A meta-path hook that makes `import torch` (and training/export) fail outright in the subprocess,
# so a lazy import buried in a code path is caught too, not only one at module import.
BLOCK = textwrap.dedent("""
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "timm", "torchvision", "training", "export"):
                raise ImportError(f"blocked import of {name}")
    sys.meta_path.insert(0, Block())
""")


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_import_sdk_does_not_import_torch():
    code = "import sys, sdk, sdk.preprocess, sdk.cli; bad = [m for m in ('torch', 'timm', 'training') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_runtime_modules_import_without_torch():
    proc = run("""
        import sdk.embedder, sdk.index, sdk.rerank, sdk.server, sdk.client, sdk.ingest, sdk.cli_serve
        from sdk import Embedder, GalleryIndex, Client
        print("ok")
    """)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_client_and_embedder_never_import_torch(tiny_bundle, ukbench_dir, tmp_path):
    """Embed on the 'device' and talk to a real server with torch impossible to import."""
    from sdk.server import ServerConfig

    photo = sorted(ukbench_dir.glob("*.jpg"))[0]
    with server_in_thread(ServerConfig(bundle=tiny_bundle, index=tmp_path / "index")) as (url, _):
        proc = run(f"""
            import sys
            import numpy as np
            from sdk import Client, Embedder
            emb = Embedder.from_bundle({str(tiny_bundle)!r}, multiscale=True)
            v = emb.embed_one({str(photo)!r})
            with Client({url!r}, embedder=emb) as c:
                assert c.space == {SPACE!r}
                c.add(["g0"], Embedder.from_bundle({str(tiny_bundle)!r}, role="gallery").embed([{str(photo)!r}]))
                c.add(["g1"], images=[{str(photo)!r}])
                hits = c.search_image({str(photo)!r}, k=2)
                hits2 = c.search_image({str(photo)!r}, k=2, on_device=False, rerank="diffusion")
                c.delete("g1")
            assert len(hits) == 2 and len(hits2) == 2
            loaded = [m for m in ("torch", "timm", "torchvision", "training", "export") if m in sys.modules]
            print("loaded:", loaded)
            sys.exit(1 if loaded else 0)
        """)
    assert proc.returncode == 0 and "loaded: []" in proc.stdout, proc.stdout + proc.stderr
