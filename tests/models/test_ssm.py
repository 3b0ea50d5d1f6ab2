"""The fused CPU scan agrees with the sequential reference, forward and backward."""
import pytest
import torch

from retrieval.models.ssm import resolve_backend, selective_scan, selective_scan_ref


def make_inputs(b, d, L, n, dtype=torch.float32, with_z=True, with_D=True, with_bias=True, h0=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    u = r(b, d, L)
    delta = r(b, d, L) * 0.5
    A = -(torch.rand(d, n, generator=g) * 2 + 0.05)
    B, C = r(b, n, L), r(b, n, L)
    D = r(d) if with_D else None
    z = r(b, d, L) if with_z else None
    bias = r(d) * 0.1 if with_bias else None
    init = r(b, d, n) if h0 else None
    ts = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=bias, initial_state=init)
    return {k: (v.to(dtype).requires_grad_(True) if v is not None else None) for k, v in ts.items()}


def run(backend, ts, softplus=True, mask_diag=False):
    out, last = selective_scan(ts["u"], ts["delta"], ts["A"], ts["B"], ts["C"], ts["D"], ts["z"], ts["delta_bias"],
                               softplus, True, initial_state=ts["initial_state"], mask_diag=mask_diag, backend=backend)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype)
    loss = (out * w).float().sum() + 0.5 * last.float().sum()
    leaves = [v for v in ts.values() if v is not None]
    grads = torch.autograd.grad(loss, leaves)
    return out, last, dict(zip([k for k, v in ts.items() if v is not None], grads))



SHAPES = [(1, 4, 1, 16), (2, 8, 37, 16), (1, 6, 129, 16), (3, 5, 20, 5), (2, 3, 50, 8), (1, 2, 7, 1), (2, 16, 64, 4)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask_diag", [False, True])
def test_cpu_matches_reference_fp32(shape, mask_diag):
    ts = make_inputs(*shape, h0=mask_diag)
    ref = run("ref", ts, mask_diag=mask_diag)
    fast = run("cpu", ts, mask_diag=mask_diag)
    torch.testing.assert_close(fast[0], ref[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(fast[1], ref[1], atol=2e-5, rtol=1e-4)
    for k in ref[2]:
        torch.testing.assert_close(fast[2][k], ref[2][k], atol=1e-4, rtol=1e-4, msg=lambda m: f"grad {k}: {m}")


@pytest.mark.parametrize("opts", [dict(with_z=False), dict(with_D=False), dict(with_bias=False),
                                  dict(with_z=False, with_D=False, with_bias=False)])
def test_optional_arguments(opts):
    ts = make_inputs(2, 6, 33, 16, **opts)
    for softplus in (True, False):
        if not softplus:  # raw delta must stay positive for a stable scan
            with torch.no_grad():
                ts["delta"].abs_()
        ref, fast = run("ref", ts, softplus), run("cpu", ts, softplus)
        torch.testing.assert_close(fast[0], ref[0], atol=2e-5, rtol=1e-4)
        for k in ref[2]:
            torch.testing.assert_close(fast[2][k], ref[2][k], atol=1e-4, rtol=1e-4)


def test_bf16_inputs_loose():
    ts = make_inputs(2, 8, 40, 16, dtype=torch.bfloat16)
    ref, fast = run("ref", ts), run("cpu", ts)
    assert fast[0].dtype == torch.bfloat16
    torch.testing.assert_close(fast[0].float(), ref[0].float(), atol=3e-2, rtol=3e-2)
    for k in ref[2]:
        torch.testing.assert_close(fast[2][k].float(), ref[2][k].float(), atol=5e-2, rtol=5e-2)


def test_long_sequence_forward():
    ts = make_inputs(1, 8, 1569, 16)
    with torch.no_grad():
        ref = selective_scan_ref(ts["u"], ts["delta"], ts["A"], ts["B"], ts["C"], ts["D"], ts["z"], ts["delta_bias"], True)
        fast = selective_scan(ts["u"], ts["delta"], ts["A"], ts["B"], ts["C"], ts["D"], ts["z"], ts["delta_bias"], True,
                              backend="cpu")
    assert (fast - ref).abs().max() < 1e-4


def test_mask_diag_drops_the_self_term():
    # with one step from a zero state, the masked read-out has nothing in it but D*u
    ts = make_inputs(1, 3, 1, 16, with_z=False)
    with torch.no_grad():
        out = selective_scan(ts["u"], ts["delta"], ts["A"], ts["B"], ts["C"], ts["D"], None, ts["delta_bias"], True,
                             mask_diag=True, backend="cpu")
    torch.testing.assert_close(out, ts["u"] * ts["D"][:, None])


@pytest.mark.parametrize("backend", ["ref", "cpu"])
def test_masked_first_step_reads_nothing_whatever_the_start_state(backend):
    # VideoMambaPro's selective_scan_ref_sub: y_0 = D u_0 even from a non-zero start state, and
    # y_t = C_t (h_t - delta_t B_t u_t) + D u_t after it
    ts = make_inputs(2, 5, 9, 16, with_z=False, h0=True)
    with torch.no_grad():
        args = (ts["u"], ts["delta"], ts["A"], ts["B"], ts["C"], ts["D"], None, ts["delta_bias"], True)
        out = selective_scan(*args, initial_state=ts["initial_state"], mask_diag=True, backend=backend)
        full = selective_scan(*args, initial_state=ts["initial_state"], backend=backend)
        delta = torch.nn.functional.softplus(ts["delta"] + ts["delta_bias"][:, None])
        h0 = ts["initial_state"]
        h1 = torch.exp(delta[..., 0, None] * ts["A"]) * h0 + (delta[..., 0] * ts["u"][..., 0])[..., None] * ts["B"][:, None, :, 0]
    torch.testing.assert_close(out[..., 0], ts["u"][..., 0] * ts["D"], atol=1e-6, rtol=1e-6)
    # the unmasked read at step 0 is C_0 h_0 + D u_0 (a different number, so the test has teeth)
    unmasked0 = torch.einsum("bdn,bn->bd", h1, ts["C"][..., 0]) + ts["u"][..., 0] * ts["D"]
    torch.testing.assert_close(full[..., 0], unmasked0, atol=1e-5, rtol=1e-5)
    assert (full[..., 0] - out[..., 0]).abs().max() > 1e-2


def test_shape_errors_are_clear():
    ts = make_inputs(1, 4, 10, 16)
    with pytest.raises(ValueError, match=r"B must be \[batch, d_state, length\]"):
        selective_scan(ts["u"], ts["delta"], ts["A"], ts["B"][:, :, :5], ts["C"], backend="cpu")
    with pytest.raises(ValueError, match="unknown selective-scan backend"):
        selective_scan(ts["u"], ts["delta"], ts["A"], ts["B"], ts["C"], backend="gpu")


def test_auto_backend_on_cpu_and_cuda_error():
    assert resolve_backend("auto", torch.device("cpu")) == "cpu"
    ts = make_inputs(1, 4, 10, 16)
    with pytest.raises((RuntimeError, ValueError), match="cuda|CUDA"):
        selective_scan(ts["u"], ts["delta"], ts["A"], ts["B"], ts["C"], backend="cuda")


def test_fused_kernel_builds_here():
    """The fused kernels are the CPU path of every VideoMamba model: the suite fails (rather than
    skipping the kernel tests) on a machine where they cannot be compiled, naming why."""
    from retrieval.models.ssm.cpu import load_kernel

    load_kernel()   # raises KernelUnavailable with the compiler's message
