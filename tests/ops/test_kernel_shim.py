"""Our dispatcher's kernel branch, on CPU, through the REAL stock wrappers of the pinned mamba-ssm / causal-conv1d.

`kernel_shim` stands in for the compiled extensions (their exact argument lists, returns, in-place writes and checks,
computed with our reference ops), so argument-order, layout, dtype and API-version mistakes between our code and the
pinned wrappers fail here instead of on a GPU. Each test compares output and every gradient with the reference path.
Skipped with a reason when the pinned Python sources are not installed (scripts/install.sh installs them).
"""

import inspect
import re
import sys
import tarfile
from pathlib import Path

import kernel_shim
import pytest
import torch

from arm_platform import ops
from arm_platform.config import ModelConfig
from arm_platform.models import build_model
from arm_platform.models.mixer import Mamba
from arm_platform.ops import _kernels

FP32_TOL = (2e-5, 2e-6)  # (rtol, atol x max|ref|): same fp32 math in another order
BF16_TOL = (1e-2, 8e-3)  # bf16 activations; the kernels compute conv/scan in fp32, our ref conv in bf16
TINY = ModelConfig(
    name="arm_shim", embed_dim=16, depth=2, img_size=32, patch_size=8, cluster_size=2,
    decoder_dim=16, decoder_depth=1, decoder_head_dim=8, num_classes=5,
)  # fmt: skip


@pytest.fixture
def shim(monkeypatch):
    """The probed stock wrappers over the stand-ins, CPU routed to them; the probe cache is cleared afterwards."""
    ns = kernel_shim.install(monkeypatch)
    kernel_shim.CALLS.clear()
    yield ns
    _kernels.load_kernels.cache_clear()


def _excite(module: torch.nn.Module) -> torch.nn.Module:
    """Weaken the D skip (init 1) and grow B, C so the scan dominates the output: swapped arguments then show."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 2)
            if leaf[-1].startswith("D"):
                p.uniform_(-0.3, 0.3)
            elif len(leaf) > 1 and leaf[-2].startswith("x_proj"):
                p.mul_(3)
    return module


def _run(backend, fn, leaves, autocast=False):
    """(output, grads of `leaves`) of fn() under `backend`, with a fixed random output gradient."""
    ops.set_backend(backend)
    ctx = kernel_shim.gpu_style_bf16_autocast() if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        out = fn()
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    return out, torch.autograd.grad(out, leaves, grad_out, allow_unused=True)


def _compare(got, want, names, tol, assert_close):
    """Kernel-branch (got) vs reference (want) outputs and grads; atol scales with each reference's magnitude."""
    rtol, atol = tol
    (out_k, grads_k), (out_r, grads_r) = got, want
    assert out_k.dtype == out_r.dtype
    assert_close(out_k, out_r, rtol, atol * max(1.0, out_r.abs().max().item()), "out")
    for name, g, w in zip(names, grads_k, grads_r, strict=True):
        assert (g is None) == (w is None), name
        if w is not None:
            assert g.dtype == w.dtype, name
            assert_close(g, w, rtol, atol * max(1.0, w.abs().max().item()), name)


def test_probe_returns_the_stock_wrappers(shim):
    """load_kernels() found the pinned Python wrappers (bare mamba_ssm package if its __init__ fails) and CPU maps to
    the kernel branch."""
    interface = sys.modules["mamba_ssm.ops.selective_scan_interface"]
    assert shim.mamba_inner_fn is interface.mamba_inner_fn
    assert shim.selective_scan_fn is interface.selective_scan_fn
    assert shim.causal_conv1d_fn.__module__ == "causal_conv1d.causal_conv1d_interface"
    assert ops.active_backend("cpu") == "kernel"


@pytest.mark.parametrize(("has_D", "has_z"), [(True, True), (False, False)])
def test_selective_scan_kernel_branch_matches_ref(shim, assert_close, has_D, has_z):
    """ops.selective_scan -> stock selective_scan_fn -> selective_scan_cuda.fwd/bwd equals the reference."""
    b, d, n, length = 2, 6, 4, 11
    u, delta, z = torch.randn(b, d, length), 0.5 * torch.randn(b, d, length), torch.randn(b, d, length)
    A, B, C = -0.5 - torch.rand(d, n), torch.randn(b, n, length), torch.randn(b, n, length)
    D, bias = torch.randn(d), 0.3 * torch.randn(d)
    inputs = [u, delta, A, B, C, D if has_D else None, z if has_z else None, bias]
    leaves = [t.requires_grad_() for t in inputs if t is not None]

    def fn():
        return ops.selective_scan(*inputs, delta_softplus=True)

    _compare(_run("kernel", fn, leaves), _run("ref", fn, leaves), range(len(leaves)), FP32_TOL, assert_close)
    assert kernel_shim.CALLS["selective_scan_cuda.fwd"] == kernel_shim.CALLS["selective_scan_cuda.bwd"] == 1


def test_causal_conv1d_kernel_branch_matches_ref(shim, assert_close):
    """ops.causal_conv1d -> stock causal_conv1d_fn -> causal_conv1d_cuda.causal_conv1d_fwd/bwd equals the reference."""
    x, weight, bias = (torch.randn(*s, requires_grad=True) for s in ((2, 8, 13), (8, 4), (8,)))

    def fn():
        return ops.causal_conv1d(x, weight, bias, activation="silu")

    _compare(_run("kernel", fn, [x, weight, bias]), _run("ref", fn, [x, weight, bias]), "xwb", FP32_TOL, assert_close)
    assert kernel_shim.CALLS["causal_conv1d_cuda.causal_conv1d_bwd"] == 1


@pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning")  # custom_bwd re-entering CUDA autocast
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("bimamba_type", ["none", "v3"], ids=["pretrain", "finetune"])
def test_mixer_kernel_branch_matches_ref(shim, assert_close, bimamba_type, autocast):
    """The ARM mixers: pretrain ("none": stock mamba_inner_fn with out_proj) and finetune ("v3": 4 directions of conv
    + selective_scan_fn) give the reference output and the gradients of the input and every parameter."""
    mixer = _excite(Mamba(16, d_state=4, bimamba_type=bimamba_type))
    x = torch.randn(2, 17, 16, requires_grad=True)  # 17 = 4 x 4 patch tokens + cls, as v3 needs
    named = [("input", x), *mixer.named_parameters()]
    leaves = [t for _, t in named]
    got = _run("kernel", lambda: mixer(x), leaves, autocast)
    want = _run("ref", lambda: mixer(x), leaves, autocast)
    _compare(got, want, [n for n, _ in named], BF16_TOL if autocast else FP32_TOL, assert_close)
    assert got[0].dtype == (torch.bfloat16 if autocast else torch.float32)
    directions = 1 if bimamba_type == "none" else 4
    assert kernel_shim.CALLS["selective_scan_cuda.bwd"] == directions
    assert kernel_shim.CALLS["causal_conv1d_cuda.causal_conv1d_bwd"] == directions


@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_tiny_model_kernel_branch_matches_ref(shim, assert_close, kind):
    """A whole tiny ARM model (pretrain loss / finetune logits) and all its parameter grads, fp32."""
    model = _excite(build_model(TINY, kind))
    imgs = torch.randn(2, 3, 32, 32)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def fn():
        out = model(imgs)
        return out["loss"] if kind == "pretrain" else out

    _compare(_run("kernel", fn, [p for _, p in named]), _run("ref", fn, [p for _, p in named]),
             [n for n, _ in named], FP32_TOL, assert_close)  # fmt: skip
    assert kernel_shim.CALLS["selective_scan_cuda.fwd"] > 0


def test_stand_ins_enforce_the_bindings_checks(shim):
    """What the real kernels reject, the stand-ins reject: D not fp32, B/C dtype != u's, 3-D B passed to the binding."""
    u, delta = torch.randn(1, 4, 5, dtype=torch.bfloat16), torch.randn(1, 4, 5, dtype=torch.bfloat16)
    A, B = -torch.rand(4, 2), torch.randn(1, 2, 5, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="D in fp32"):
        shim.selective_scan_fn(u, delta, A, B, B, D=torch.ones(4, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="B in u's dtype"):
        shim.selective_scan_fn(u, delta, A, B.float(), B)
    scan_cuda = sys.modules["selective_scan_cuda"]
    with pytest.raises(RuntimeError, match=r"B of shape \(1, 2, 2, 5\)"):  # the binding wants (B, G, N, L)
        scan_cuda.fwd(u, delta, A, B, B[:, None], None, None, None, False)
    with pytest.raises(RuntimeError, match="bias in weight's dtype"):
        shim.causal_conv1d_fn(u, torch.randn(4, 4), torch.randn(4, dtype=torch.bfloat16), activation="silu")


def test_missing_or_other_version_sources_skip_with_reason(monkeypatch):
    """Without the pinned sources (or with other versions) the shim tests skip and say why."""

    def missing(dist):
        raise kernel_shim.importlib.metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(kernel_shim.importlib.metadata, "version", missing)
    with pytest.raises(pytest.skip.Exception, match=r"mamba-ssm==2\.3\.2\.post1 Python sources not installed"):
        kernel_shim.require_pinned_sources()
    monkeypatch.setattr(kernel_shim.importlib.metadata, "version", lambda dist: "0.0.1")
    with pytest.raises(pytest.skip.Exception, match="follows mamba-ssm==2.3.2.post1, found 0.0.1"):
        kernel_shim.require_pinned_sources()


@pytest.mark.filterwarnings("ignore:torch.get_autocast_gpu_dtype:DeprecationWarning")
def test_gpu_style_autocast_is_what_mamba_inner_fn_reads():
    """Inside: the no-argument autocast queries mamba_inner_fn uses say bf16, CPU ops cast; outside: restored."""
    with kernel_shim.gpu_style_bf16_autocast():
        assert torch.is_autocast_enabled() and torch.get_autocast_gpu_dtype() == torch.bfloat16
        assert torch.nn.functional.linear(torch.randn(2, 3), torch.randn(4, 3)).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled() and not torch.is_autocast_enabled("cpu")


BINDINGS = {  # sdist file -> its C++ binding source, as compiled into the extension module named by the key
    "selective_scan_cuda": ("mamba_ssm-{v}.tar.gz", "mamba-ssm", "csrc/selective_scan/selective_scan.cpp"),
    "causal_conv1d_cuda": ("causal_conv1d-{v}.tar.gz", "causal-conv1d", "csrc/causal_conv1d.cpp"),
}


def _cpp_bindings(source: str) -> dict[str, list[str]]:
    """{python name: C++ parameter names} of every m.def("name", &function) in a pybind11 binding source."""
    out = {}
    for py_name, function in re.findall(r'm\.def\("(\w+)", &(\w+)', source):
        params = re.search(rf"\n{function}\(([^)]*)\)\s*{{", source)[1]
        out[py_name] = [re.findall(r"(\w+)\s*$", p.strip())[0] for p in params.split(",")]
    return out


@pytest.mark.parametrize("module", sorted(BINDINGS))
def test_stand_ins_have_the_pinned_bindings_names_and_parameters(module):
    """Same exported functions, same parameters in the same order as the pinned C++ bindings (read from the sdists
    in .whl/; locally also checked against the compiled modules' pybind signatures)."""
    pattern, dist, member = BINDINGS[module]
    sdist = Path(__file__).resolve().parents[2] / ".whl" / pattern.format(v=kernel_shim.pinned_versions()[dist])
    if not sdist.is_file():
        pytest.skip(f"{sdist.name} not in .whl/ (scripts/install.sh downloads it)")
    with tarfile.open(sdist) as tar:
        source = tar.extractfile(f"{sdist.name.removesuffix('.tar.gz')}/{member}").read().decode()
    fake = kernel_shim.modules()[module]
    bindings = _cpp_bindings(source)
    assert sorted(bindings) == sorted(n for n in vars(fake) if not n.startswith("_"))
    for name, params in bindings.items():
        assert list(inspect.signature(getattr(fake, name)).parameters) == params, name
