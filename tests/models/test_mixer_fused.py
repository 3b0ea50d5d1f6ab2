"""The fused CPU mixer path (conv + bidirectional scan + gate kernels in the [B, L, E] layout)
agrees with the pure-torch composition around the sequential reference scan, forward and
backward, and its building blocks agree with plain torch."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from retrieval.models.ssm import selective_scan_ref
from retrieval.models.ssm.cpu import ScanDirection, conv_silu, scan_directions
from retrieval.models.videomamba import BiMambaMixer

ATOL, RTOL = 2e-5, 1e-4
GATOL, GRTOL = 1e-4, 1e-4


def _randomise(mixer: BiMambaMixer, seed: int) -> None:
    """Move every parameter off its init (D = 1, A = 1..N) so each one matters in the test."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            if name.startswith(("A_log", "A_b_log")):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
            elif name.startswith(("D", "D_b")):
                p.copy_(torch.randn(p.shape, generator=g))
            elif "bias" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5))


def _run(mixer, x, backend):
    mixer.scan_backend = backend
    x = x.detach().clone().requires_grad_(True)
    y = mixer(x)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    params = [p for _, p in mixer.named_parameters()]
    # allow_unused: with one token, a masked backward scan reads nothing, so A_b_log has no effect
    grads = torch.autograd.grad((y * w).sum(), [x, *params], allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip([x, *params], grads)]
    return y, dict(zip(["input", *[n for n, _ in mixer.named_parameters()]], grads))


def _compare(mixer, x):
    y_ref, g_ref = _run(mixer, x, "ref")
    y, g = _run(mixer, x, "cpu")
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=RTOL)
    for k in g_ref:
        torch.testing.assert_close(g[k], g_ref[k], atol=GATOL, rtol=GRTOL, msg=lambda m: f"grad {k}: {m}")


@pytest.mark.parametrize("L", [1, 2, 37, 65, 130])
@pytest.mark.parametrize("mask_backward,elemental", [(False, False), (True, False), (False, True), (True, True)])
def test_mixer_fused_matches_reference(L, mask_backward, elemental):
    torch.manual_seed(L)
    mixer = BiMambaMixer(12, mask_backward=mask_backward, elemental_residual=elemental)   # d_inner 24: 1.5 blocks
    _randomise(mixer, L)
    _compare(mixer, torch.randn(2, L, 12))


@pytest.mark.parametrize("L", [1, 37, 130])
@pytest.mark.parametrize("layout,scan_input,mask_backward", [("v1", "raw", True), ("v2", "raw", False),
                                                              ("v1", "conv", True), ("v2", "conv", True),
                                                              ("v1", "raw", False)])
def test_mixer_fused_matches_reference_pro_layouts(L, layout, scan_input, mask_backward):
    """VideoMambaPro's layouts (v1: shared conv/x_proj/dt_proj/D) and the raw scan input, with the
    elemental residual: the fused kernels agree with the composition, forward and backward."""
    torch.manual_seed(L)
    mixer = BiMambaMixer(12, layout=layout, scan_input=scan_input, mask_backward=mask_backward,
                         elemental_residual=True)
    assert hasattr(mixer, "conv1d_b") == (layout == "v2") and hasattr(mixer, "A_b_log")
    _randomise(mixer, L)
    _compare(mixer, torch.randn(2, L, 12))


@pytest.mark.parametrize("d_model,d_state,d_conv,batch", [(8, 16, 4, 1), (16, 16, 4, 3), (20, 8, 4, 2),
                                                          (6, 5, 3, 2), (24, 4, 2, 1), (8, 1, 4, 1)])
def test_mixer_fused_widths_and_sizes(d_model, d_state, d_conv, batch):
    torch.manual_seed(d_model)
    mixer = BiMambaMixer(d_model, d_state=d_state, d_conv=d_conv, mask_backward=True, elemental_residual=True)
    _randomise(mixer, d_model)
    _compare(mixer, torch.randn(batch, 71, d_model))


def test_mixer_fused_without_gate():
    torch.manual_seed(5)
    mixer = BiMambaMixer(16, gate=False)
    _randomise(mixer, 5)
    _compare(mixer, torch.randn(2, 45, 16))


def test_mixer_fused_is_the_default_on_cpu_and_no_grad_matches():
    torch.manual_seed(6)
    mixer = BiMambaMixer(16, mask_backward=True).eval()
    _randomise(mixer, 6)
    x = torch.randn(1, 99, 16)
    with torch.no_grad():
        y_auto = mixer(x)                              # scan_backend="auto" -> fused on CPU
        mixer.scan_backend = "ref"
        y_ref = mixer(x)
    torch.testing.assert_close(y_auto, y_ref, atol=ATOL, rtol=RTOL)


def test_mixer_falls_back_to_the_torch_composition(monkeypatch):
    import retrieval.models.videomamba as vm

    torch.manual_seed(7)
    mixer = BiMambaMixer(8)
    x = torch.randn(1, 20, 8)
    with torch.no_grad():
        y_fused = mixer(x)
        monkeypatch.setattr(vm, "fused_mixer_available", lambda *a, **k: False)
        assert not mixer._use_fused(x)
        y_comp = mixer(x)
    torch.testing.assert_close(y_fused, y_comp, atol=ATOL, rtol=RTOL)
    # CUDA (or any non-CPU) tensors never take the CPU kernels
    assert not mixer._use_fused(torch.empty(1, 2, 8, device="meta"))


def test_state_dict_keys_unchanged():
    keys = set(BiMambaMixer(8).state_dict())
    expected = {"in_proj.weight", "out_proj.weight"}
    for sfx in ("", "_b"):
        expected |= {f"conv1d{sfx}.weight", f"conv1d{sfx}.bias", f"x_proj{sfx}.weight", f"dt_proj{sfx}.weight",
                     f"dt_proj{sfx}.bias", f"A{sfx}_log", f"D{sfx}"}
    assert keys == expected


# -- building blocks ----------------------------------------------------------------------------

@pytest.mark.parametrize("L,E,K", [(1, 5, 4), (3, 16, 4), (70, 37, 4), (300, 24, 4), (130, 32, 3), (9, 20, 1)])
def test_conv_silu_matches_torch(L, E, K):
    g = torch.Generator().manual_seed(L * E)
    xz = torch.randn(2, L, 2 * E, generator=g)
    x = xz[..., :E]                                   # a strided view, as in the mixer
    wf, wb = torch.randn(E, 1, K, generator=g), torch.randn(E, 1, K, generator=g)
    bf, bb = torch.randn(E, generator=g), torch.randn(E, generator=g)
    ts = [t.requires_grad_(True) for t in (x, wf, bf, wb, bb)]

    def ref(x, wf, bf, wb, bb):
        xt = x.transpose(1, 2)
        yf = F.silu(F.conv1d(xt, wf, bf, padding=K - 1, groups=E)[..., :L])
        yb = F.silu(F.conv1d(xt.flip(-1), wb, bb, padding=K - 1, groups=E)[..., :L]).flip(-1)
        return yf.transpose(1, 2), yb.transpose(1, 2)

    out_ref, out = ref(*ts), conv_silu(*ts)
    wts = [torch.randn(o.shape, generator=g) for o in out_ref]
    loss = lambda o: sum((a * w).sum() for a, w in zip(o, wts))  # noqa: E731
    g_ref = torch.autograd.grad(loss(out_ref), ts)
    g_new = torch.autograd.grad(loss(out), ts)
    for a, b in zip(out, out_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_new, g_ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_conv_silu_single_branch_equals_the_forward_branch():
    """The v1 layout's one conv (no backward branch) gives the two-branch call's forward output,
    across position tiles (L > 256) and a partial channel block."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 600, 2 * 21, generator=g)[..., :21]
    wf, wb = torch.randn(21, 1, 4, generator=g), torch.randn(21, 1, 4, generator=g)
    bf, bb = torch.randn(21, generator=g), torch.randn(21, generator=g)
    with torch.no_grad():
        one, none = conv_silu(x, wf, bf)
        both, _ = conv_silu(x, wf, bf, wb, bb)
        ref = F.silu(F.conv1d(x.transpose(1, 2), wf, bf, padding=3, groups=21)[..., :600]).transpose(1, 2)
    assert none is None
    assert torch.equal(one, both)
    torch.testing.assert_close(one, ref, atol=1e-5, rtol=1e-5)


def _dir_inputs(b, L, E, N, seed, h0=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    ts = dict(u=r(b, L, E), dpre=r(b, L, E) * 0.5, B=r(b, L, N), C=r(b, L, N),
              A=-(torch.rand(E, N, generator=g) * 2 + 0.05), D=r(E), bias=r(E) * 0.1,
              h0=r(b, E, N) if h0 else None)
    return {k: (v.requires_grad_(True) if v is not None else None) for k, v in ts.items()}


def _ref_direction(ts, reverse, mask_diag, elemental, z=None):
    """The same direction through selective_scan_ref ([B, D, L] layout, flipped when reversed)."""
    def lay(t):  # [B, L, X] -> [B, X, L], in scan order
        t = t.transpose(1, 2)
        return t.flip(-1) if reverse else t
    u = lay(ts["u"])
    h0 = ts["h0"]
    if h0 is None and elemental:
        h0 = u[..., 0].unsqueeze(-1).expand(-1, -1, ts["A"].shape[1])
    out, last = selective_scan_ref(u, lay(ts["dpre"]), ts["A"], lay(ts["B"]), lay(ts["C"]), ts["D"],
                                   None if z is None else lay(z), ts["bias"], True, True,
                                   initial_state=h0, mask_diag=mask_diag)
    out = out.flip(-1) if reverse else out
    return out.transpose(1, 2), last


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("mask_diag", [False, True])
@pytest.mark.parametrize("h0_mode", ["none", "tensor", "elemental"])
def test_scan_direction_matches_reference(reverse, mask_diag, h0_mode):
    ts = _dir_inputs(2, 77, 21, 16, seed=11, h0=h0_mode == "tensor")
    z = torch.randn(2, 77, 21, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    _check_direction(ts, z, reverse, mask_diag, h0_mode == "elemental", seed=4)


def _check_direction(ts, z, reverse, mask_diag, elemental, seed):
    """One direction through scan_directions against the reference: output, last state, and the
    gradients of every input."""
    out_ref, last_ref = _ref_direction(ts, reverse, mask_diag, elemental, z)
    d = ScanDirection(ts["u"], ts["dpre"], ts["B"], ts["C"], ts["A"], ts["D"], ts["bias"], ts["h0"],
                      reverse=reverse, mask_diag=mask_diag, elemental=elemental)
    out, (last,) = scan_directions([d], z)
    torch.testing.assert_close(out, out_ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(last, last_ref, atol=ATOL, rtol=RTOL)
    leaves = [v for v in ts.values() if v is not None] + [z]
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    g_ref = torch.autograd.grad((out_ref * w).sum() + 0.3 * last_ref.sum(), leaves)
    g_new = torch.autograd.grad((out * w).sum() + 0.3 * last.sum(), leaves)
    names = [k for k, v in ts.items() if v is not None] + ["z"]
    for k, a, b in zip(names, g_new, g_ref):
        torch.testing.assert_close(a, b, atol=GATOL, rtol=GRTOL, msg=lambda m: f"grad {k}: {m}")


@pytest.mark.parametrize("E,N", [(37, 16), (9, 12), (37, 3), (24, 2), (8, 24), (17, 64), (5, 1)])
@pytest.mark.parametrize("reverse,mask_diag", [(False, False), (True, True)])
def test_scan_state_counts_and_partial_blocks(E, N, reverse, mask_diag):
    """d_state other than 16 (the state loop runs in groups of 8, 4, 2 and 1 states where a block
    is split into 8-channel halves) and channel counts that are not a multiple of the 16-channel
    block, over two chunks of steps, forward and backward."""
    ts = _dir_inputs(2, 130, E, N, seed=E * N, h0=mask_diag)
    z = torch.randn(2, 130, E, generator=torch.Generator().manual_seed(N)).requires_grad_(True)
    _check_direction(ts, z, reverse, mask_diag, False, seed=5)


def test_two_directions_sum_then_gate():
    f = _dir_inputs(1, 40, 18, 8, seed=1)
    bk = _dir_inputs(1, 40, 18, 8, seed=2)
    z = torch.randn(1, 40, 18, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out, _ = scan_directions([ScanDirection(**{k: v for k, v in f.items()}),
                                  ScanDirection(**{k: v for k, v in bk.items()}, reverse=True, mask_diag=True)], z)
        a, _ = _ref_direction(f, False, False, False)
        b, _ = _ref_direction(bk, True, True, False)
    torch.testing.assert_close(out, (a + b) * F.silu(z), atol=ATOL, rtol=RTOL)


def test_only_last_state_gradient():
    ts = _dir_inputs(1, 70, 16, 16, seed=9, h0=True)
    out, (last,) = scan_directions([ScanDirection(ts["u"], ts["dpre"], ts["B"], ts["C"], ts["A"], h0=ts["h0"])])
    _, last_ref = _ref_direction({**ts, "D": None, "bias": None}, False, False, False)
    leaves = [ts[k] for k in ("u", "dpre", "B", "C", "A", "h0")]
    g_new = torch.autograd.grad(last.sum(), leaves)
    g_ref = torch.autograd.grad(last_ref.sum(), leaves, allow_unused=True)  # the last state does not read C
    for a, b in zip(g_new, g_ref):
        torch.testing.assert_close(a, b if b is not None else torch.zeros_like(a), atol=GATOL, rtol=GRTOL)


def test_long_sequence_forward_error():
    ts = _dir_inputs(1, 1569, 32, 16, seed=5)
    z = torch.randn(1, 1569, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref, _ = _ref_direction(ts, True, True, True, z)
        out, _ = scan_directions([ScanDirection(ts["u"], ts["dpre"], ts["B"], ts["C"], ts["A"], ts["D"], ts["bias"],
                                                reverse=True, mask_diag=True, elemental=True)], z)
    assert (out - ref).abs().max() < 1e-4


def test_non_finite_inputs_propagate():
    ts = _dir_inputs(1, 5, 16, 16, seed=8)
    with torch.no_grad():
        ts["u"][0, 2, 3] = float("nan")
        out, _ = scan_directions([ScanDirection(ts["u"], ts["dpre"], ts["B"], ts["C"], ts["A"], ts["D"], ts["bias"])])
    assert torch.isnan(out[0, 2:, 3]).all() and torch.isfinite(out[0, :2]).all()


def test_kernels_share_torchs_openmp_runtime():
    code = ("import torch\nfrom retrieval.models.ssm.cpu import load_kernel, openmp_runtimes\n"
            "before = openmp_runtimes()\nload_kernel()\nafter = openmp_runtimes()\n"
            "assert len(after) <= max(1, len(before)), (before, after)\nprint(after)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("b,E,threads", [(5, 16, 2), (3, 40, 2), (2, 100, 3), (1, 8, 4)])
def test_work_split_over_threads_and_batches(b, E, threads):
    """Items (batch, 16-channel block) split over threads mid-batch; both directions, gradients."""
    f = _dir_inputs(b, 70, E, 16, seed=b * E)
    bk = _dir_inputs(b, 70, E, 16, seed=b * E + 1)
    z = torch.randn(b, 70, E, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, _ = scan_directions([ScanDirection(**f), ScanDirection(**bk, reverse=True, mask_diag=True, elemental=True)], z)
        leaves = [v for v in (*f.values(), *bk.values()) if v is not None] + [z]
        g_new = torch.autograd.grad(out.square().sum(), leaves)
    finally:
        torch.set_num_threads(prev)
    a, _ = _ref_direction(f, False, False, False)
    c, _ = _ref_direction(bk, True, True, True)
    ref = (a + c) * F.silu(z)
    g_ref = torch.autograd.grad(ref.square().sum(), leaves)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    for x, y in zip(g_new, g_ref):
        torch.testing.assert_close(x, y, atol=5 * GATOL, rtol=GRTOL)


@pytest.mark.parametrize("softplus", [True, False])
def test_state_exponent_clamp_follows_the_block(softplus):
    """The state loop drops exp's upper clamp only for a 16-channel block whose delta * A cannot be
    positive (softplus delta, every A <= 0). A block with one positive A (or delta without softplus)
    keeps it: a step with delta * A far past exp's range saturates at 2^126 instead of wrapping
    the exponent, while the other lanes, and the other block, still equal the reference."""
    E, N, L = 32, 16, 24
    ts = _dir_inputs(1, L, E, N, seed=3)
    with torch.no_grad():
        ts["A"][5, 7] = 1.0                    # channel 5 (first block), state 7: growth
        ts["dpre"][0, 10, 5] = 150.0           # delta ~150 at step 10: delta * A * log2(e) ~ 216
    out, _ = scan_directions([ScanDirection(ts["u"], ts["dpre"], ts["B"], ts["C"], ts["A"], ts["D"], None,
                                            softplus=softplus)])
    ref = selective_scan_ref(ts["u"].transpose(1, 2), ts["dpre"].transpose(1, 2), ts["A"], ts["B"].transpose(1, 2),
                             ts["C"].transpose(1, 2), ts["D"], None, None, softplus).transpose(1, 2)
    big = out[0, 10, 5].abs().item()
    assert big > 1e30 or not torch.isfinite(out[0, 10, 5]), big
    keep = torch.ones(E, dtype=torch.bool)
    keep[5] = False
    torch.testing.assert_close(out[..., keep], ref[..., keep], atol=2e-5, rtol=1e-4)
    if not softplus:   # without softplus a negative delta makes delta * A > 0 in any lane
        return
    torch.testing.assert_close(out[:, :10, 5], ref[:, :10, 5], atol=2e-5, rtol=1e-4)


def test_kernel_math_against_float64():
    """The scan's own exp (its state loop's), softplus and sigmoid, as this machine's build computes
    them, against float64: 2^x to 2.5e-7 relative (the AVX and AVX-512 builds' degree-5 polynomials;
    1e-7 for the others'), softplus and sigmoid to 1e-6 plus their argument's rounding; 2^x
    saturates at 2^-126 below and does not wrap above (2^126 or more, +inf on AVX-512)."""
    from retrieval.models.ssm.cpu import kernel_math

    x = torch.linspace(-125.9, 125.9, 200_001)
    exact = torch.exp2(x.double())
    for bounded in (False, True):
        got = kernel_math("exp2", x, bounded=bounded).double()
        assert ((got - exact).abs() / exact).max().item() <= 2.5e-7
    low = kernel_math("exp2", torch.tensor([-126.5, -150.0, -1e4]))
    assert torch.all(low >= 0) and torch.all(low <= 2.0 ** -125)
    # above: the AVX/SSE builds clamp at 2^126; AVX-512's VSCALEFPS gives 2^127, then +inf
    high = kernel_math("exp2", torch.tensor([127.0, 300.0, 1e4]))
    assert torch.all(high >= 2.0 ** 126) and not torch.isnan(high).any()
    assert torch.isnan(kernel_math("exp2", torch.tensor([float("nan")]))).all()
    # softplus and sigmoid take exp(y) as 2^(y log2(e)): rounding that product to fp32 costs up to
    # ~6e-8 |y| relative, on top of the polynomial's, the reciprocal estimate's and the final sums' ~1e-6
    y = torch.linspace(-80.0, 80.0, 200_001)
    bound = 1e-6 + 6e-8 * y.abs().double()
    for fn, ref in (("softplus", F.softplus(y.double())), ("sigmoid", torch.sigmoid(y.double()))):
        got = kernel_math(fn, y).double()
        assert ((got - ref).abs() / ref / bound).max().item() <= 1.0, fn
    with pytest.raises(ValueError, match="fn must be"):
        kernel_math("tanh", y)


def test_bad_shapes_and_devices_are_refused():
    ts = _dir_inputs(1, 10, 16, 16, seed=0)
    with pytest.raises(ValueError, match="B must have shape"):
        scan_directions([ScanDirection(ts["u"], ts["dpre"], ts["B"][:, :5], ts["C"], ts["A"])])
    with pytest.raises(ValueError, match="z must have shape"):
        scan_directions([ScanDirection(ts["u"], ts["dpre"], ts["B"], ts["C"], ts["A"])], torch.zeros(1, 10, 3))
    with pytest.raises(ValueError, match="CPU"):
        scan_directions([ScanDirection(ts["u"].to("meta"), ts["dpre"], ts["B"], ts["C"], ts["A"])])
    with pytest.raises(ValueError, match="weight"):
        conv_silu(ts["u"], torch.zeros(3, 1, 4), None)


@pytest.mark.parametrize("reverse,mask_diag,elemental", [(False, False, False), (True, True, True), (True, False, True)])
@pytest.mark.parametrize("E", [16, 21, 40])
def test_time_major_layout_matches_row_major(reverse, mask_diag, elemental, E):
    """[B, E, L] inputs/outputs (the selective_scan API's layout) give the row-major results."""
    ts = _dir_inputs(2, 83, E, 16, seed=E)
    z = torch.randn(2, 83, E, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    kw = dict(reverse=reverse, mask_diag=mask_diag, elemental=elemental)
    rows, _ = scan_directions([ScanDirection(ts["u"], ts["dpre"], ts["B"], ts["C"], ts["A"], ts["D"], ts["bias"], **kw)], z)
    tmaj, _ = scan_directions([ScanDirection(ts["u"].transpose(1, 2), ts["dpre"].transpose(1, 2), ts["B"], ts["C"],
                                             ts["A"], ts["D"], ts["bias"], **kw)], z.transpose(1, 2), time_major=True)
    assert tmaj.shape == (2, E, 83)
    torch.testing.assert_close(tmaj.transpose(1, 2), rows, atol=1e-6, rtol=1e-6)
    leaves = [ts[k] for k in ("u", "dpre", "B", "C", "A", "D", "bias")] + [z]
    w = torch.randn(rows.shape, generator=torch.Generator().manual_seed(2))
    g_rows = torch.autograd.grad((rows * w).sum(), leaves)
    g_tmaj = torch.autograd.grad((tmaj.transpose(1, 2) * w).sum(), leaves)
    for a, b in zip(g_tmaj, g_rows):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shape", [(1, 384, 197), (2, 5, 37), (3, 17, 33), (1, 16, 16), (1, 1, 7)])
def test_transpose12(shape):
    from retrieval.models.ssm.cpu import transpose12

    x = torch.randn(*shape)
    assert torch.equal(transpose12(x), x.transpose(1, 2).contiguous())
    xv = torch.randn(shape[0], shape[1] * 2, shape[2])[:, ::2]          # rows with a gap between them
    assert torch.equal(transpose12(xv), xv.transpose(1, 2).contiguous())


@pytest.mark.parametrize("arch,path", [("-march=x86-64-v3", "avx2"), ("-march=sandybridge", "avx"),
                                       ("-march=x86-64", "sse2"), ("-march=x86-64 -DVTR_GENERIC_VECTORS", "generic")])
def test_portable_build_without_avx512(tmp_path, arch, path):
    """The non-AVX-512 code paths: build for AVX2 (x86-64-v3: 8-channel halves, AVX masked loads),
    for AVX without AVX2 (the halves' integer lane operations as 128-bit pairs), for the x86-64 baseline (SSE2) and with the generic vector code of non-x86 machines, and
    check each against the reference (one compile each)."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 ISA levels")
    code = """
import torch
from retrieval.models.videomamba import BiMambaMixer
from retrieval.models.ssm import selective_scan, selective_scan_ref
torch.manual_seed(0)
m = BiMambaMixer(12, mask_backward=True, elemental_residual=True)
with torch.no_grad():
    m.A_log.add_(0.3 * torch.randn_like(m.A_log)); m.D_b.copy_(torch.randn_like(m.D_b))
x = torch.randn(2, 70, 12, requires_grad=True)
y = m(x); g = torch.autograd.grad(y.square().sum(), [x, *m.parameters()])
m.scan_backend = "ref"
y2 = m(x); g2 = torch.autograd.grad(y2.square().sum(), [x, *m.parameters()])
torch.testing.assert_close(y, y2, atol=2e-5, rtol=1e-4)
for a, b in zip(g, g2):
    torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)
u = torch.randn(1, 20, 77); dl = torch.randn(1, 20, 77); A = -torch.rand(20, 16) - 0.1
B = torch.randn(1, 16, 77); C = torch.randn(1, 16, 77); z = torch.randn(1, 20, 77)
torch.testing.assert_close(selective_scan(u, dl, A, B, C, None, z, None, True, backend="cpu"),
                           selective_scan_ref(u, dl, A, B, C, None, z, None, True), atol=2e-5, rtol=1e-4)
for E, N in ((37, 12), (9, 3)):   # partial blocks, state groups of 8 + 4 and 2 + 1, masked, h0
    u = torch.randn(2, E, 90, requires_grad=True); dl = torch.randn(2, E, 90); A = -torch.rand(E, N) - 0.1
    B = torch.randn(2, N, 90); C = torch.randn(2, N, 90); h0 = torch.randn(2, E, N)
    args = (dl.flip(-1), A, B.flip(-1), C.flip(-1), torch.randn(E), None, torch.randn(E), True, True)
    o1, l1 = selective_scan(u.flip(-1), *args, initial_state=h0, mask_diag=True, backend="cpu")
    o2, l2 = selective_scan_ref(u.flip(-1), *args, initial_state=h0, mask_diag=True)
    torch.testing.assert_close(o1, o2, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(l1, l2, atol=2e-5, rtol=1e-4)
    for a, b in zip(torch.autograd.grad(o1.square().sum(), u), torch.autograd.grad(o2.square().sum(), u)):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)
from retrieval.models.ssm.cpu import vector_path
print("ok", vector_path())
"""
    env = dict(__import__("os").environ, VTR_KERNEL_ARCH_FLAGS=arch, VTR_CACHE_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == path, "the build did not take its flags (the loader fell back without them)"


@pytest.mark.parametrize("R,time_major", [(12, False), (5, False), (1, True), (7, True)])
def test_fused_dt_projection_matches_given_dpre(R, time_major):
    ts = _dir_inputs(2, 70, 21, 16, seed=R)
    g = torch.Generator().manual_seed(R)
    dt = torch.randn(2, 70, R + 3, generator=g)[..., :R].requires_grad_(True)     # a strided view, as in the mixer
    W = (torch.randn(21, R, generator=g) * R ** -0.5).requires_grad_(True)
    tm = (lambda t: t.transpose(1, 2)) if time_major else (lambda t: t)  # noqa: E731
    common = dict(D=ts["D"], bias=ts["bias"], reverse=True, mask_diag=True)
    ref, _ = scan_directions([ScanDirection(tm(ts["u"]), tm(dt @ W.t()), ts["B"], ts["C"], ts["A"], **common)],
                             time_major=time_major)
    out, _ = scan_directions([ScanDirection(tm(ts["u"]), None, ts["B"], ts["C"], ts["A"], dt=dt, dt_weight=W, **common)],
                             time_major=time_major)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    leaves = [ts["u"], dt, W, ts["B"], ts["C"], ts["A"], ts["D"], ts["bias"]]
    for a, b in zip(torch.autograd.grad(out.square().sum(), leaves), torch.autograd.grad(ref.square().sum(), leaves)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="either dpre or both"):
        scan_directions([ScanDirection(ts["u"], ts["dpre"], ts["B"], ts["C"], ts["A"], dt=dt, dt_weight=W)])


def test_hooks_behave_as_in_the_torch_composition():
    """x_proj is called as a module on both paths (its hooks fire); dt_proj's weight is used
    directly on both (as in mamba-ssm); a hooked conv sends the mixer down the composition."""
    torch.manual_seed(9)
    mixer = BiMambaMixer(8, mask_backward=True).eval()
    _randomise(mixer, 9)
    x = torch.randn(1, 30, 8)
    with torch.no_grad():
        seen = []
        h1 = mixer.x_proj_b.register_forward_hook(lambda m, i, o: (seen.append("x_proj_b"), o.mul(1.5))[1])
        out = mixer(x)
        mixer.scan_backend = "ref"
        ref = mixer(x)
        mixer.scan_backend = "auto"
        h1.remove()
        assert seen == ["x_proj_b", "x_proj_b"]
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
        assert not torch.allclose(out, mixer(x))
        h3 = mixer.conv1d.register_forward_hook(lambda m, i, o: None)
        assert not mixer._use_fused(x)
        h3.remove()
        assert mixer._use_fused(x)
