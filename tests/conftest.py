import json
import os
import zlib
import tempfile

# Before transformers is imported anywhere: a private Hub cache and module cache, and no network.
_HOME = tempfile.mkdtemp(prefix="nomic-moe-tests-hf-")
os.environ["HF_HOME"] = _HOME
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # the triton kernels run under triton's interpreter on the CPU (read when a kernel is defined)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

torch.set_num_threads(2)


class Checkpoints:
    """Builds (once per session) published-layout checkpoints and their conversions."""

    def __init__(self, root: Path):
        self.root = root
        self._made = {}

    def source(self, **shape) -> Path:
        from nomic_moe_conversion.synthetic import make_published_checkpoint

        key = json.dumps(shape, sort_keys=True)
        if key not in self._made:
            folder = self.root / f"src{len(self._made)}"
            # the seed follows the shape, not the order of first use: which tests ran first (or alone) changes no weight
            make_published_checkpoint(folder, seed=zlib.crc32(key.encode()) % 10_000, **shape)
            self._made[key] = folder
        return self._made[key]

    def converted(self, **shape) -> Path:
        from nomic_moe_conversion.convert import convert

        src = self.source(**shape)
        out = src.with_name(src.name + "-converted")
        if not out.exists():
            convert(str(src), str(out))
        return out


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    return Checkpoints(tmp_path_factory.mktemp("ckpts"))


def published(folder: Path):
    """(weights, config) of a published-layout checkpoint."""
    return load_file(str(folder / "model.safetensors")), json.loads((folder / "config.json").read_text())


RELEASE_SHAPE = dict(num_experts=4, top_k=2, num_layers=4)
RELEASE_REPO = "testorg/tiny-nomic-moe"


@pytest.fixture(scope="session")
def released_both(ckpts, tmp_path_factory):
    """One release in both layouts (OUT/main ours, OUT/nomic-bert published), shared by the test files."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("sentence_transformers")
    from nomic_moe_conversion.release import release

    out = tmp_path_factory.mktemp("release") / "repo"
    result = release(str(ckpts.source(**RELEASE_SHAPE)), str(out), repo_id=RELEASE_REPO, synthetic=True, layout_name="both")
    return {"main": result.folders["main"], "published": result.folders["nomic-bert"], "result": result, "out": out}


def kernel_built_for(march: str, needs: set):
    """The CPU kernel as a CPU of ``march`` builds it, run on this one: skipped where this CPU lacks one
    of the ``needs`` flags (or there is no compiler), so that another ISA's paths are tested here."""
    from nomic_moe_kernels import small_gemm
    from nomic_moe_modeling.cpu_nomic_moe import cpu_flags

    if small_gemm.compiler() is None:
        pytest.skip("no C compiler here")
    missing = needs - cpu_flags()
    if missing:
        pytest.skip(f"this CPU cannot run {march} code (no {', '.join(sorted(missing))})")
    return small_gemm.SmallGemm(small_gemm.build(march=march))


@pytest.fixture(scope="session")
def avx2_kernel():
    """The CPU kernel as an AVX2-only CPU builds it (8-float vectors, no bf16 or int8 products), run
    on this one: its paths are tested on any x86 CPU, whatever the CPU's own build takes."""
    k = kernel_built_for("haswell", {"avx2", "fma"})
    assert k.layers is not None and k.attention_ok and k.fuses_gelu_float and k.dtypes() == (torch.float32,)
    return k


@pytest.fixture(scope="session")
def vnni_kernel():
    """The CPU kernel as a Cascade Lake or Ice Lake CPU builds it (AVX-512 with VNNI, no AVX512_BF16:
    int8 products, no bf16 ones), run on this one where it can: the common cloud CPUs between the
    AVX2 build and this machine's."""
    k = kernel_built_for("cascadelake", {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"})
    assert k.layers is not None and k.attention_ok and k.dtypes() == (torch.float32, torch.int8)
    return k


@pytest.fixture(params=["native", "avx2"])
def any_kernel(request):
    """The test file's own `kernel` fixture (this CPU's build), then the AVX2 build's: the kernels'
    vector code (attention, GELU, the one call) is written once for both widths."""
    return request.getfixturevalue("kernel" if request.param == "native" else "avx2_kernel")
