"""Every selective-scan implementation against mamba_ssm's `selective_scan_ref`, transcribed in torch.

Tolerances are mamba_ssm's own test tolerances for float32 (outputs rtol 6e-4 / atol 2e-3,
gradients the same); bfloat16 inputs with a float32 state are held to bfloat16's resolution.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kernels import IMPLS, selective_scan, selective_state_update, ssm_pallas, ssm_xla

RTOL, ATOL = 6e-4, 2e-3
# "pallas" on a CPU is "pallas_gpu" in interpret mode: checked once below, not again per case
CHECKED = [i for i in IMPLS if i not in ("reference", "pallas")]


def selective_scan_ref_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             initial_state=None, reset=None):
    """mamba_ssm.ops.selective_scan_interface.selective_scan_ref, layout [b, d, l], plus our
    initial_state and reset. Returns (out, last_state)."""
    dtype_in = u.dtype
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, dstate = u.shape[0], A.shape[0], A.shape[1]
    x = A.new_zeros((batch, dim, dstate)) if initial_state is None else initial_state.float()
    ys = []
    delta_a = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    delta_b_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B.float(), u)
    for i in range(u.shape[2]):
        if reset is not None:
            x = x * (~reset[:, i]).float()[:, None, None]
        x = delta_a[:, :, i] * x + delta_b_u[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i].float()))
    out = torch.stack(ys, dim=2)
    out = out if D is None else out + u * D[:, None]
    if z is not None:
        out = out * F.silu(z.float())
    return out.to(dtype_in), x


def make_inputs(seed, b=2, length=37, d=12, n=16, with_d=True, with_z=True, with_bias=True, with_h0=False,
                with_reset=False):
    r = np.random.RandomState(seed)
    x = dict(
        u=r.randn(b, length, d), delta=0.5 * r.randn(b, length, d),
        A=-np.exp(0.5 * r.randn(d, n)), B=r.randn(b, length, n), C=r.randn(b, length, n),
        D=r.randn(d) if with_d else None, z=r.randn(b, length, d) if with_z else None,
        delta_bias=0.3 * r.randn(d) if with_bias else None,
        initial_state=r.randn(b, d, n) if with_h0 else None,
    )
    x = {k: (None if v is None else v.astype(np.float32)) for k, v in x.items()}
    x["reset"] = (r.rand(b, length) < 0.1) if with_reset else None
    return x


def run_torch(x, softplus=True, grad_out=None):
    t = {k: (None if v is None else torch.tensor(v, requires_grad=v.dtype != bool)) for k, v in x.items()}
    tr = lambda a: None if a is None else a.transpose(1, 2)  # noqa: E731  [b, l, d] -> [b, d, l]
    out, last = selective_scan_ref_torch(tr(t["u"]), tr(t["delta"]), t["A"], tr(t["B"]), tr(t["C"]), t["D"],
                                         tr(t["z"]), t["delta_bias"], softplus, t["initial_state"], t["reset"])
    out = out.transpose(1, 2)
    grads = None
    if grad_out is not None:
        (out * torch.tensor(grad_out)).sum().backward()
        grads = {k: v.grad.numpy() for k, v in t.items() if v is not None and v.requires_grad}
    return out.detach().numpy(), last.detach().numpy(), grads


def run_jax(x, impl, softplus=True, grad_out=None):
    diff = {k: jnp.asarray(v) for k, v in x.items() if v is not None and v.dtype != bool}
    reset = None if x["reset"] is None else jnp.asarray(x["reset"])

    def f(args):
        return selective_scan(args["u"], args["delta"], args["A"], args["B"], args["C"], D=args.get("D"),
                              z=args.get("z"), delta_bias=args.get("delta_bias"), delta_softplus=softplus,
                              initial_state=args.get("initial_state"), return_final_state=True, reset=reset,
                              impl=impl)

    y, last = f(diff)
    grads = None
    if grad_out is not None:
        grads = jax.grad(lambda a: jnp.sum(f(a)[0] * grad_out))(diff)
        grads = {k: np.asarray(v) for k, v in grads.items()}
    return np.asarray(y), np.asarray(last), grads


CASES = {
    "full": {},
    "length_1": dict(length=1),
    "d_state_1": dict(n=1),
    "odd_d_inner": dict(d=7, length=50),
    "no_optional": dict(with_d=False, with_z=False, with_bias=False),
    "initial_state": dict(with_h0=True),
    "reset": dict(with_reset=True, with_h0=True),
}


def test_reference_equals_mamba_ssm_formula():
    for name, kw in CASES.items():
        x = make_inputs(1, **kw)
        g = np.random.RandomState(2).randn(*x["u"].shape).astype(np.float32)
        y_t, h_t, g_t = run_torch(x, grad_out=g)
        y_j, h_j, g_j = run_jax(x, "reference", grad_out=g)
        np.testing.assert_allclose(y_j, y_t, rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(h_j, h_t, rtol=1e-5, atol=1e-5, err_msg=name)
        for k in g_t:
            np.testing.assert_allclose(g_j[k], g_t[k], rtol=1e-4, atol=1e-4, err_msg=f"{name} d{k}")


@pytest.mark.parametrize("impl", CHECKED)
@pytest.mark.parametrize("case", sorted(CASES))
def test_impl_matches_reference_forward_and_gradients(impl, case):
    x = make_inputs(3, **CASES[case])
    g = np.random.RandomState(4).randn(*x["u"].shape).astype(np.float32)
    y_r, h_r, g_r = run_jax(x, "reference", grad_out=g)
    y, h, grads = run_jax(x, impl, grad_out=g)
    np.testing.assert_allclose(y, y_r, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(h, h_r, rtol=RTOL, atol=ATOL)
    for k in g_r:
        np.testing.assert_allclose(grads[k], g_r[k], rtol=RTOL, atol=ATOL, err_msg=f"d{k}")


@pytest.mark.parametrize("impl", CHECKED)
def test_bfloat16_inputs_with_float32_state(impl):
    x = make_inputs(5, length=64)
    y32, h32, _ = run_jax(x, "reference")
    x16 = {k: (v.astype(jnp.bfloat16) if k in ("u", "delta", "B", "C", "z") and v is not None else v)
           for k, v in x.items()}
    y16, h16, _ = run_jax(x16, impl)
    assert y16.dtype == jnp.bfloat16 and h16.dtype == np.float32
    scale = np.abs(y32).max()
    assert np.abs(y16.astype(np.float32) - y32).max() <= 3e-2 * scale  # a few bf16 ulps of the range


@pytest.mark.parametrize("impl", ["scan", "pallas_tpu", "pallas_gpu"])
def test_bfloat16_gradients_with_reset(impl):
    """Gradients of every input from bf16 activations (float32 state inside), odd length and width,
    against the float32 reference run on the same bf16-rounded values."""
    x = make_inputs(15, length=41, d=9, with_h0=True, with_reset=True)
    x16 = {k: (v.astype(jnp.bfloat16) if k in ("u", "delta", "B", "C", "z") and v is not None else v)
           for k, v in x.items()}
    x32 = {k: (np.asarray(v, np.float32) if v is not None and v.dtype == jnp.bfloat16 else v) for k, v in x16.items()}
    g = np.random.RandomState(16).randn(*x["u"].shape).astype(np.float32)
    _, _, g_ref = run_jax(x32, "reference", grad_out=g)
    _, _, g16 = run_jax(x16, impl, grad_out=g)
    for k, want in g_ref.items():
        got = np.asarray(g16[k], np.float32)
        # the bf16 inputs' gradients are rounded to bf16 (2^-8 relative): a few ulps of each one's scale
        assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max(), k


@pytest.mark.parametrize("impl", CHECKED)
def test_reset_separates_packed_documents(impl):
    """Two documents packed in one row give exactly what each gives alone."""
    x = make_inputs(6, b=1, length=30, with_h0=False)
    cut = 17
    reset = np.zeros((1, 30), bool)
    reset[0, cut] = True
    packed = dict(x, reset=reset)
    y, _, _ = run_jax(packed, impl)
    part = lambda s: {k: (v[:, s] if v is not None and v.ndim == 3 and v.shape[1] == 30 else v)  # noqa: E731
                      for k, v in x.items()}
    y_a, _, _ = run_jax(part(slice(0, cut)), impl)
    y_b, _, _ = run_jax(part(slice(cut, 30)), impl)
    np.testing.assert_allclose(y, np.concatenate([y_a, y_b], axis=1), rtol=1e-5, atol=1e-5)


def test_pallas_on_cpu_is_the_gpu_kernel_interpreted():
    x = make_inputs(14, length=20)
    y_r, h_r, _ = run_jax(x, "reference")
    y, h, _ = run_jax(x, "pallas")
    np.testing.assert_allclose(y, y_r, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(h, h_r, rtol=RTOL, atol=ATOL)
    assert ssm_pallas.default_family() == "gpu"


def test_state_update_equals_scan_of_length_one():
    x = make_inputs(7, length=1, with_h0=True)
    y_scan, h_scan, _ = run_jax(x, "reference")
    y, h = selective_state_update(jnp.asarray(x["initial_state"]), x["u"][:, 0], x["delta"][:, 0], x["A"],
                                  x["B"][:, 0], x["C"][:, 0], D=x["D"], z=x["z"][:, 0], dt_bias=x["delta_bias"],
                                  dt_softplus=True)
    np.testing.assert_allclose(np.asarray(y), y_scan[:, 0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(h), h_scan, rtol=1e-6, atol=1e-6)


def test_state_updates_chain_to_the_full_scan():
    x = make_inputs(8, length=9, with_h0=True)
    y_scan, h_scan, _ = run_jax(x, "scan")
    h = jnp.asarray(x["initial_state"])
    for t in range(9):
        y, h = selective_state_update(h, x["u"][:, t], x["delta"][:, t], x["A"], x["B"][:, t], x["C"][:, t],
                                      D=x["D"], z=x["z"][:, t], dt_bias=x["delta_bias"], dt_softplus=True)
        np.testing.assert_allclose(np.asarray(y), y_scan[:, t], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(h), h_scan, rtol=1e-5, atol=1e-5)


def _temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_fused_scan_never_holds_a_full_state_tensor():
    """Forward and forward+backward of `scan` use far less scratch than one [b, L, d, n] f32 tensor."""
    b, length, d, n = 2, 1024, 64, 16
    full = b * length * d * n * 4
    x = make_inputs(9, b=b, length=length, d=d, n=n)
    args = [jnp.asarray(x[k]) for k in ("u", "delta", "A", "B", "C")]

    def fwd(u, dl, A, B, C):
        return selective_scan(u, dl, A, B, C, delta_softplus=True, impl="scan")

    def fwd_bwd(u, dl, A, B, C):
        return jax.grad(lambda *a: jnp.sum(fwd(*a)), argnums=(0, 1, 2, 3, 4))(u, dl, A, B, C)

    # What remains is O(b*L*d): transposed copies of the inputs and their gradients (each 1/16 of
    # `full` at n=16) plus O(sqrt(L)) chunk states; a single [b, L, d, n] buffer would exceed these.
    assert _temp_bytes(fwd, *args) < full / 4
    assert _temp_bytes(fwd_bwd, *args) < full / 2
    assert _temp_bytes(lambda *a: selective_scan(*a, impl="reference"), *args) >= full  # the check can fail


def test_bad_shapes_and_impl_are_named():
    x = make_inputs(10)
    with pytest.raises(ValueError, match="impl='cuda'"):
        selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], impl="cuda")
    with pytest.raises(ValueError, match="shape mismatch"):
        selective_scan(x["u"], x["delta"], x["A"][:, :3], x["B"], x["C"])
    with pytest.raises(ValueError, match="initial_state"):
        selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], initial_state=np.zeros((1, 1, 1), np.float32))


@pytest.mark.parametrize("name, fn", [
    ("scan", lambda *a: ssm_xla.scan_fused(*a, chunk=5)),
    ("chunked", lambda *a: ssm_xla.scan_chunked(*a, chunk=8)),
    ("pallas_gpu", lambda *a: ssm_pallas.scan_pallas(*a, family="gpu", chunk=8, tile=4)),
    ("pallas_tpu", lambda *a: ssm_pallas.scan_pallas(*a, family="tpu", chunk=8, tile=128)),
])
@pytest.mark.parametrize("d", [12, 7, 260])
def test_many_chunks_and_tiles_with_padding(name, fn, d):
    """Several chunks (length 45 is no multiple of the chunk) and several d-tiles (7 pads to 8
    channels of GPU tiles of 4; 260 to three TPU tiles of 128), n = 4 (a TPU state of 4 sublanes)."""
    _outputs_and_gradients_equal_the_reference(fn, make_inputs(11, length=45, d=d, n=4, with_h0=True,
                                                                with_reset=True), name)


def _outputs_and_gradients_equal_the_reference(fn, x, name):
    """fn(u, softplus(delta), A, B, C, h0, reset): y, h_last and the gradients of a random projection of both
    with respect to u, dt, A, B, C and h0 equal scan_reference's."""
    u, dt, A, B, C, h0 = (jnp.asarray(x[k]) for k in ("u", "delta", "A", "B", "C", "initial_state"))
    args = (u, jax.nn.softplus(dt), A, B, C, h0)
    reset = jnp.asarray(x["reset"])
    g = jnp.asarray(np.random.RandomState(12).randn(*x["u"].shape).astype(np.float32))
    gh = jnp.asarray(np.random.RandomState(13).randn(*x["initial_state"].shape).astype(np.float32))

    def loss(impl_fn, args):
        y, h = impl_fn(*args, reset)
        return jnp.sum(y * g) + jnp.sum(h * gh)

    y_r, h_r = ssm_xla.scan_reference(*args, reset)
    y, h = fn(*args, reset)
    np.testing.assert_allclose(y, y_r, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(h, h_r, rtol=RTOL, atol=ATOL)
    grads_r = jax.grad(lambda a: loss(ssm_xla.scan_reference, a))(args)
    grads = jax.grad(lambda a: loss(fn, a))(args)
    for k, gr, gi in zip("u dt A B C h0".split(), grads_r, grads, strict=True):
        np.testing.assert_allclose(gi, gr, rtol=RTOL, atol=ATOL, err_msg=f"{name} d{k}")


def test_the_fused_scan_backward_gives_the_reference_gradients_with_resets_and_h0():
    """The fused scan's hand-written backward (its own sums over the batch and the state axis): the reference's
    gradients, resets and h0 included, over chunks that do not divide the length."""
    _outputs_and_gradients_equal_the_reference(lambda *a: ssm_xla.scan_fused(*a, chunk=5),
                                               make_inputs(14, length=23, d=9, n=4, with_h0=True, with_reset=True),
                                               "scan, chunk 5")
