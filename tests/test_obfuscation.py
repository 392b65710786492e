import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tempo.core import obfuscation as ob
from tempo.core.keys import KeySpace, axis_keygen, keygen
from tempo.core.verify import rounding_bound

BACKENDS = ["c", "torch"] if ob.kernel_available() else ["torch"]
KEY_SPACES = [KeySpace(), KeySpace("int", 1024, True), KeySpace("continuous", 100)]
dims = st.one_of(st.integers(1, 4), st.integers(5, 70), st.sampled_from([127, 128, 129, 255]))


def assert_close_to_product(got, a, b, want, slack=4.0):
    """Within the rigorous rounding bound of an honest product (the verifier's own bound)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    tol = rounding_bound(a, b, slack=slack).unsqueeze(-1)
    assert bool(((got - want).abs() <= tol).all()), float(((got - want).abs() / tol).max())


def test_kernel_is_built_when_ci_requires_it():
    # CI sets TEMPO_REQUIRE_KERNEL=1: a silent fallback would hide a broken C build.
    if os.environ.get("TEMPO_REQUIRE_KERNEL") == "1":
        assert ob.kernel_available()
        assert ob.default_backend() == "c"


@given(
    m=dims,
    n=dims,
    p=dims,
    batch=st.sampled_from([(), (1,), (3,), (2, 2)]),
    per_slice=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    space=st.sampled_from(KEY_SPACES),
    backend=st.sampled_from(BACKENDS),
)
def test_forward_round_trip_equals_plain_product(m, n, p, batch, per_slice, dtype, space, backend):
    a = torch.randn(*batch, m, n, dtype=dtype)
    b = torch.randn(*batch, n, p, dtype=dtype)
    sk = keygen(m, n, p, batch_shape=batch if per_slice else (), key_space=space)
    a_enc, b_enc = ob.encrypt(sk, a, b, backend=backend)
    c = ob.decrypt(sk, a_enc @ b_enc, backend=backend)
    assert_close_to_product(c, a, b, a @ b)


@given(
    m=dims,
    n=dims,
    p=dims,
    batch=st.sampled_from([(), (2,), (2, 3)]),
    per_slice=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    space=st.sampled_from(KEY_SPACES),
    backend=st.sampled_from(BACKENDS),
)
def test_backward_key_shift_reuse_gives_autograd_gradients(m, n, p, batch, per_slice, dtype, space, backend):
    a = torch.randn(*batch, m, n, dtype=dtype, requires_grad=True)
    b = torch.randn(*batch, n, p, dtype=dtype, requires_grad=True)
    sk = keygen(m, n, p, batch_shape=batch if per_slice else (), key_space=space)
    with torch.no_grad():
        a_enc, b_enc = ob.encrypt(sk, a, b, backend=backend)
    c = a @ b
    grad_c = torch.randn_like(c)
    c.backward(grad_c)
    with torch.no_grad():
        d_enc = ob.encrypt_grad(sk, grad_c, backend=backend)  # the only backward encryption
        t1, t2 = b_enc @ d_enc, d_enc @ a_enc  # the relay, with A', B' kept from forward
        da, db = ob.decrypt_grads(sk, t1, t2, backend=backend)
    assert_close_to_product(da, grad_c, b.detach().mT, a.grad)
    assert_close_to_product(db, a.detach().mT, grad_c, b.grad)


@given(
    rows=dims,
    cols=dims,
    dtype=st.sampled_from([torch.float32, torch.float64]),
    space=st.sampled_from(KEY_SPACES),
)
def test_unmask_inverts_mask_and_backends_are_bit_identical(rows, cols, dtype, space):
    x = torch.randn(rows, cols, dtype=dtype)
    r, s = axis_keygen(rows, (), space), axis_keygen(cols, (), space)
    masked = {be: ob.mask(x, r, s, backend=be) for be in BACKENDS}
    for be in BACKENDS:
        assert torch.equal(masked[be], masked[BACKENDS[0]])
        back = ob.unmask(masked[be], r, s, backend=be)
        assert torch.allclose(back, x, rtol=8 * torch.finfo(dtype).eps, atol=0)


KERNEL = pytest.mark.skipif(not ob.kernel_available(), reason="the C kernel is not built")
ROLES = ["mask", "unmask", "mask-t", "unmask-t"]


def _kernel_paths_agree(x, row_key, col_key):
    """Every role, through each kernel path (transposed tiles on and off), equals the fallback."""
    want = {role: ob._keyed_gather(x, row_key, col_key, role, None, "torch") for role in ROLES}
    before = ob._kernel.use_tiles(True)
    try:
        for tiles in (True, False):
            ob._kernel.use_tiles(tiles)
            for role in ROLES:
                got = ob._keyed_gather(x, row_key, col_key, role, None, "c")
                assert torch.equal(got, want[role]), (role, tiles)
    finally:
        ob._kernel.use_tiles(before)


@KERNEL
@given(
    rows=st.one_of(st.integers(1, 40), st.sampled_from([63, 64, 65])),
    cols=st.one_of(st.integers(1, 40), st.sampled_from([255, 256, 257])),
    batch=st.sampled_from([(), (1,), (3,), (2, 2)]),
    per_slice=st.booleans(),
    row_step=st.sampled_from([1, 2]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_kernel_paths_are_bit_identical_to_the_fallback(rows, cols, batch, per_slice, row_step, dtype):
    # The float32 tile path takes groups of 8 rows of one slice: shapes here cut groups at
    # slice ends and leave column tails (cols % 8); row_step 2 gives rows that are not adjacent.
    x = torch.randn(*batch, rows * row_step, cols, dtype=dtype)[..., ::row_step, :]
    keys = batch if per_slice else ()
    _kernel_paths_agree(x, axis_keygen(rows, keys), axis_keygen(cols, keys))


@KERNEL
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("shape", [(4096, 24), (3, 181, 133), (70, 1030), (40, 2050)])
def test_kernel_thread_shares_cover_every_row(threads, shape):
    # Above 2**16 elements the rows are shared among threads (shares start on multiples of 8).
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        batch = shape[:-2]
        x = torch.randn(*shape)
        _kernel_paths_agree(x, axis_keygen(shape[-2], batch), axis_keygen(shape[-1]))
    finally:
        torch.set_num_threads(before)


@KERNEL
def test_kernel_reports_its_tile_path():
    assert isinstance(ob._kernel.has_tiles(), bool)
    before = ob._kernel.use_tiles(False)
    assert ob._kernel.use_tiles(before) is False


def test_mask_matches_the_definition_elementwise():
    x = torch.randn(6, 5, dtype=torch.float64)
    r, s = axis_keygen(6), axis_keygen(5)
    got = ob.mask(x, r, s)
    for i in range(6):
        for j in range(5):
            want = r.coef[i] / s.coef[j] * x[r.perm[i], s.perm[j]]
            assert torch.isclose(got[i, j], want, rtol=1e-15)


def test_masking_hides_the_layout():
    x = torch.arange(64 * 64, dtype=torch.float32).reshape(64, 64)
    masked = ob.mask(x, axis_keygen(64), axis_keygen(64))
    assert not torch.equal(masked, x)
    assert not torch.equal(torch.sort(masked.flatten()).values, torch.sort(x.flatten()).values)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_operand_streams_and_round_trips(backend):
    # Above 1 MiB the kernel writes encrypted operands with streaming stores.
    a = torch.randn(600, 700)
    b = torch.randn(700, 33)
    sk = keygen(600, 700, 33)
    out_a, out_b = torch.empty_like(a), torch.empty_like(b)
    a_enc, b_enc = ob.encrypt(sk, a, b, out_a=out_a, out_b=out_b, backend=backend)
    assert a_enc.data_ptr() == out_a.data_ptr() and b_enc.data_ptr() == out_b.data_ptr()
    assert_close_to_product(ob.decrypt(sk, a_enc @ b_enc, backend=backend), a, b, a @ b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    base = torch.randn(9, 14)
    x = base[:, ::2]  # column stride 2
    y = base.T  # a transpose
    r7, r9, r14 = axis_keygen(7), axis_keygen(9), axis_keygen(14)
    assert torch.equal(ob.mask(x, r9, r7, backend=backend), ob.mask(x.contiguous(), r9, r7, backend=backend))
    assert torch.equal(ob.mask(y, r14, r9, backend=backend), ob.mask(y.contiguous(), r14, r9, backend=backend))
    batched = torch.randn(3, 9, 14).transpose(0, 1)  # leading dims not collapsible
    k3 = axis_keygen(3)
    assert torch.equal(
        ob.mask(batched, k3, r14, backend=backend), ob.mask(batched.contiguous(), k3, r14, backend=backend)
    )


def test_decrypt_grads_returns_gradients_in_parameter_shape():
    sk = keygen(4, 6, 3)
    t1, t2 = torch.randn(6, 4), torch.randn(3, 6)
    da, db = ob.decrypt_grads(sk, t1, t2)
    assert da.shape == (4, 6) and db.shape == (6, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_are_refused_with_clear_errors(backend):
    sk = keygen(4, 5, 6)
    a, b = torch.randn(4, 5), torch.randn(5, 6)
    with pytest.raises(ValueError, match="A has shape"):
        ob.encrypt(sk, torch.randn(5, 4), b, backend=backend)
    with pytest.raises(ValueError, match="B has shape"):
        ob.encrypt(sk, a, torch.randn(5, 7), backend=backend)
    with pytest.raises(ValueError, match="C' has shape"):
        ob.decrypt(sk, torch.randn(4, 5), backend=backend)
    with pytest.raises(ValueError, match="dL/dC"):
        ob.encrypt_grad(sk, torch.randn(6, 4), backend=backend)
    with pytest.raises(ValueError, match="T1'"):
        ob.decrypt_grads(sk, torch.randn(4, 5), torch.randn(6, 5), backend=backend)
    with pytest.raises(ValueError, match="matrices"):
        ob.mask(torch.randn(4), sk.m, sk.n, backend=backend)
    with pytest.raises(TypeError, match="floating"):
        ob.mask(torch.ones(4, 5, dtype=torch.int64), sk.m, sk.n, backend=backend)
    with pytest.raises(ValueError, match="output buffer"):
        ob.mask(a, sk.m, sk.n, out=torch.empty(5, 4), backend=backend)
    with pytest.raises(ValueError, match="output buffer"):
        ob.mask(a, sk.m, sk.n, out=torch.empty(4, 5, dtype=torch.float64), backend=backend)
    with pytest.raises(ValueError, match="contiguous"):
        ob.mask(a, sk.m, sk.n, out=torch.empty(5, 4).T, backend=backend)
    with pytest.raises(ValueError, match="overlap"):
        ob.mask(a, sk.m, sk.n, out=a, backend=backend)
    per_slice = keygen(4, 5, 6, batch_shape=(2,))
    with pytest.raises(ValueError, match="batch shape"):
        ob.mask(torch.randn(3, 4, 5), per_slice.m, per_slice.n, backend=backend)


def test_unknown_backend_is_refused(monkeypatch):
    with pytest.raises(ValueError, match="backend"):
        ob.mask(torch.randn(2, 2), axis_keygen(2), axis_keygen(2), backend="gpu")
    monkeypatch.setenv("TEMPO_OBFUSCATION_BACKEND", "fast")
    with pytest.raises(ValueError, match="TEMPO_OBFUSCATION_BACKEND"):
        ob.default_backend()
    monkeypatch.setenv("TEMPO_OBFUSCATION_BACKEND", "torch")
    assert ob.default_backend() == "torch"


def test_empty_matrices():
    sk = keygen(3, 1, 2)
    out = ob.mask(torch.randn(0, 3, 1), sk.m, sk.n)
    assert out.shape == (0, 3, 1)
