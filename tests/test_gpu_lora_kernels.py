"""peft_fast's fused LoRA kernels (csrc/lora_kernels.h) on the GPU: each half against an fp32 torch reference built
with the kernels' own dropout bits, at real and odd sizes; the bits' keep rate, independence and reproducibility
under torch.manual_seed; the C++ nodes that take them (LoRA linear, QLoRA's lora_add) against the ATen route and
against references with the same bits; CUDA-graph capture with dropout. `pytest -m gpu` on the device machine."""

import pytest
import torch
from torch import nn

import peft_fast as pf
from peft_fast.ops.extension import _C
from models import lora_fwd_bwd, lora_linear_layer, quantize_linears, rel_err

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not hasattr(_C, "lora_kernels_forward"), reason="peft_fast._C without the kernels")]
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
SHAPES = [(8192, 4096, 4096, 16), (777, 1024, 3000, 64), (1, 4096, 4096, 16), (16, 2048, 2048, 128),
          (100, 520, 264, 12), (300, 64, 8, 1), (2048, 2048, 5632, 32)]
DTYPES = [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
          (torch.float16, torch.float16)]


def keep_of(mask: torch.Tensor, k: int) -> torch.Tensor:
    """The M×K boolean keep mask of the kernels' M×K/8 bytes (bit i of byte j: element 8j + i)."""
    bits = torch.arange(8, device=mask.device, dtype=torch.uint8)
    return ((mask.unsqueeze(-1) >> bits) & 1).reshape(mask.shape[0], k).bool()


def poison_allocator(nbytes: int = 1 << 30) -> None:
    """Leave NaN in the caching allocator's free blocks: an output element a kernel forgets to write stays NaN."""
    block = torch.full((nbytes // 4,), float("nan"), device="cuda")
    del block


def _inputs(m, k, n, r, dt, adt, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=g).to(dt)
    a = (torch.randn(r, k, device="cuda", generator=g) / k**0.5).to(adt)
    b = (torch.randn(n, r, device="cuda", generator=g) / r**0.5).to(adt)
    return x, a, b


def _dropped(x, keep, p, dt):
    """drop(x) as the kernels compute it: in fp32, rounded to the compute dtype."""
    return x.float() if keep is None else (x.float() * keep / (1 - p)).to(dt).float()


def check_forward(m, k, n, r, dt, adt, p, **shape):
    """The forward kernel against an fp32 reference built with its own dropout bits; `shape` forces the rows
    kernel's block_rows / column_splits."""
    x, a, b = _inputs(m, k, n, r, dt, adt)
    s = 2.0 / r**0.5
    bias = torch.randn(n, device="cuda").to(dt)
    addend = torch.randn(m, n, device="cuda").to(dt)
    poison_allocator()
    y, hs, mask, a_copy, b_copy = _C.lora_kernels_forward(x, a, b, s, p, bias, addend, copies=True, **shape)
    assert y.shape == (m, n) and hs.shape == (m, r) and y.dtype == hs.dtype == dt
    # fp32 adapters come back rounded to the compute dtype, every element written (the poison would show), for the
    # backward kernels; adapters already in it come back as themselves
    assert a_copy.dtype == b_copy.dtype == dt and torch.equal(a_copy, a.to(dt)) and torch.equal(b_copy, b.to(dt))
    assert (a_copy.data_ptr() == a.data_ptr()) == (adt == dt)
    keep = keep_of(mask, k) if p > 0 else None
    assert mask.numel() == (m * k // 8 if p > 0 else 0)
    hs_ref = _dropped(x, keep, p, dt) @ a.to(dt).float().t() * s
    assert torch.isfinite(hs).all() and rel_err(hs, hs_ref) < TOL[dt]
    y_ref = hs.float() @ b.to(dt).float().t() + bias.float() + addend.float()
    assert torch.isfinite(y).all() and rel_err(y, y_ref) < TOL[dt]
    # the low-rank term is a clear share of y: a kernel that dropped it would fail above
    assert rel_err(bias.float() + addend.float(), y_ref) > 10 * TOL[dt]


def check_backward(m, k, n, r, dt, adt, p, **shape):
    """Both backward kernels against an fp32 reference (the forward's own bits); `shape` as in check_forward."""
    x, a, b = _inputs(m, k, n, r, dt, adt, seed=1)
    s = 0.5
    _, hs, mask, a_copy, b_copy = _C.lora_kernels_forward(x, a, b, s, p, copies=True)
    keep = keep_of(mask, k) if p > 0 else None
    dy = torch.randn(m, n, device="cuda").to(dt)
    poison_allocator()  # also what the reduce kernel's per-tile counters start from unless they are cleared
    dx, da, db = _C.lora_kernels_backward(dy, x, a, b, hs, mask, s, p, **shape)
    assert da.dtype == db.dtype == adt and dx.dtype == dt
    if adt != dt:  # the node's way: the forward's rounded copies, gradients still in fp32, the same bits
        got = _C.lora_kernels_backward(dy, x, a_copy, b_copy, hs, mask, s, p, fp32_grads=True, **shape)
        assert got[1].dtype == got[2].dtype == torch.float32
        assert all(torch.equal(u, v) for u, v in zip(got, (dx, da, db)))
    gs = (dy.float() @ b.to(dt).float() * s).to(dt).float()
    dx_ref = gs @ a.to(dt).float()
    if keep is not None:
        dx_ref = dx_ref * keep / (1 - p)
    da_ref = gs.t() @ _dropped(x, keep, p, dt)
    db_ref = dy.float().t() @ hs.float()
    for name, got, ref in (("dx", dx, dx_ref), ("dA", da, da_ref), ("dB", db, db_ref)):
        assert torch.isfinite(got).all(), name
        assert rel_err(got, ref) < TOL[dt], (name, rel_err(got, ref))
    # only what is asked for is computed, and the same bits come back (sums over M in a fixed order, whatever else
    # is computed beside; without the rows kernel the counters are cleared by a memset instead)
    dx2, da2, db2 = _C.lora_kernels_backward(dy, x, a, b, hs, mask, s, p, need_x=False, need_a=False, need_b=True,
                                             **shape)
    assert dx2 is None and da2 is None and torch.equal(db2, db)


@pytest.mark.parametrize("dt,adt", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("m,k,n,r", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_forward_kernel_matches_fp32_reference(m, k, n, r, dt, adt, p):
    check_forward(m, k, n, r, dt, adt, p)


@pytest.mark.parametrize("dt,adt", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("m,k,n,r", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_backward_kernels_match_fp32_reference(m, k, n, r, dt, adt, p):
    check_backward(m, k, n, r, dt, adt, p)


@pytest.mark.parametrize("block_rows", [16, 32, 64])
@pytest.mark.parametrize("column_splits", [1, 3])
@pytest.mark.parametrize("m,k,n,r", [(1000, 1024, 2056, 16), (130, 512, 776, 72)])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_every_rows_kernel_shape_matches_fp32_reference(block_rows, column_splits, m, k, n, r, p):
    """Each block shape the launcher can pick (or a probe can force) computes the same thing."""
    shape = {"block_rows": block_rows, "column_splits": column_splits}
    check_forward(m, k, n, r, torch.bfloat16, torch.float32, p, **shape)
    check_backward(m, k, n, r, torch.bfloat16, torch.float32, p, **shape)


def test_the_kernel_entry_points_refuse_tensors_they_would_misread():
    x, a, b = _inputs(64, 256, 128, 16, torch.bfloat16, torch.float32)
    _, hs, mask = _C.lora_kernels_forward(x, a, b, 1.0, 0.1)
    dy = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="bias"):
        _C.lora_kernels_forward(x, a, b, 1.0, 0.0, torch.zeros(127, device="cuda", dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="addend"):
        _C.lora_kernels_forward(x, a, b, 1.0, 0.0, None, torch.zeros(64, 120, device="cuda", dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="dy"):
        _C.lora_kernels_backward(dy[:, :120].contiguous(), x, a, b, hs, mask, 1.0, 0.1)
    with pytest.raises(RuntimeError, match="hs"):
        _C.lora_kernels_backward(dy, x, a, b, hs[:32], mask, 1.0, 0.1)
    with pytest.raises(RuntimeError, match="mask"):
        _C.lora_kernels_backward(dy, x, a, b, hs, mask[:, :-1].contiguous(), 1.0, 0.1)
    with pytest.raises(RuntimeError, match="needs the forward's mask"):
        _C.lora_kernels_backward(dy, x, a, b, hs, None, 1.0, 0.1)
    with pytest.raises(RuntimeError, match="block_rows"):
        _C.lora_kernels_forward(x, a, b, 1.0, 0.0, block_rows=48)
    with pytest.raises(RuntimeError, match="column_splits"):
        _C.lora_kernels_backward(dy, x, a, b, hs, mask, 1.0, 0.1, column_splits=-1)


def test_dropout_bits_keep_rate_independence_and_reproducibility():
    m, k, n, r, p = 4096, 4096, 64, 16, 0.1
    x, a, b = _inputs(m, k, n, r, torch.bfloat16, torch.float32)
    torch.manual_seed(3)
    keep = keep_of(_C.lora_kernels_forward(x, a, b, 1.0, p)[2], k).float()
    sigma = (p * (1 - p) / keep.numel()) ** 0.5
    assert abs(keep.mean().item() - (1 - p)) < 5 * sigma
    for i in range(8):  # each bit of a byte (each 16-bit half of Philox's output words) on its own
        assert abs(keep[:, i::8].mean().item() - (1 - p)) < 5 * sigma * 8**0.5
    both = (keep[:, :-1] * keep[:, 1:]).mean().item()  # neighbours independent
    assert abs(both - (1 - p) ** 2) < 5e-3
    rows = keep.mean(1)  # no row is special
    assert rows.std().item() < 3 * (p * (1 - p) / k) ** 0.5
    torch.manual_seed(3)
    again = keep_of(_C.lora_kernels_forward(x, a, b, 1.0, p)[2], k).float()
    assert torch.equal(again, keep)
    following = keep_of(_C.lora_kernels_forward(x, a, b, 1.0, p)[2], k).float()
    assert not torch.equal(following, keep)  # the generator's offset moved on


@pytest.mark.parametrize("dt,fp32_adapters", [(torch.bfloat16, True), (torch.bfloat16, False), (torch.float16, True)])
@pytest.mark.parametrize("m,k,n,r,bias", [(4096, 4096, 4096, 16, False), (333, 1024, 2048, 64, True),
                                          (1, 4096, 4096, 16, True)])
def test_lora_linear_node_with_kernels_matches_the_aten_route(dt, fp32_adapters, m, k, n, r, bias):
    layer = lora_linear_layer(k, n, r, 0.0, dt, fp32_adapters, bias).train()
    x = torch.randn(m, k, device="cuda", dtype=dt)
    dy = torch.randn(m, n, device="cuda", dtype=dt)
    got, want = lora_fwd_bwd(layer, x, dy, "cuda", kernels=True), lora_fwd_bwd(layer, x, dy, "cuda", kernels=False)
    for name, g, w in zip(("y", "dx", "dA", "dB"), got, want):
        assert g.dtype == w.dtype, name
        assert rel_err(g, w) < 2 * TOL[dt], (name, rel_err(g, w))


@pytest.fixture
def preround_rows():
    """lora_kernels_set_preround_rows for one test, restored after it."""
    before = _C.lora_kernels_preround_rows()
    yield _C.lora_kernels_set_preround_rows
    _C.lora_kernels_set_preround_rows(before)


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("m,k,n,r", [(2048, 2048, 2048, 16), (777, 1024, 3000, 64)])
def test_prerounded_fp32_adapters_give_the_same_numbers(preround_rows, m, k, n, r, p):
    """fp32 adapters rounded by one kernel (launch_lora_round_adapters) before the rows kernel, which then reads them
    as bf16, give what the kernel's own rounding gives, bit for bit: forward kernel, its copies, and the node's forward
    and backward."""
    x, a, b = _inputs(m, k, n, r, torch.bfloat16, torch.float32, seed=3)
    layer = lora_linear_layer(k, n, r, p, torch.bfloat16, True, False).train()
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    runs = []
    for rows in (1 << 62, 0):  # never, then always
        preround_rows(rows)
        torch.manual_seed(7)
        kernel = _C.lora_kernels_forward(x, a, b, 0.5, p, copies=True)
        runs.append((kernel, lora_fwd_bwd(layer, x, dy, "cuda", kernels=True, seed=7)))
    (k_in, node_in), (k_pre, node_pre) = runs
    assert _C.lora_kernels_preround_rows() == 0
    for name, got, want in zip(("y", "hs", "mask", "A copy", "B copy"), k_pre, k_in):
        assert torch.equal(got, want), name
    for name, got, want in zip(("y", "dx", "dA", "dB"), node_pre, node_in):
        assert torch.equal(got, want), name


@pytest.mark.parametrize("m,k,n,r", [(8192, 4096, 4096, 16), (777, 1024, 3000, 64), (100, 520, 264, 12),
                                     (16, 2048, 2048, 128), (300, 64, 8, 1)])
@pytest.mark.parametrize("fp32_adapters", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_reduce_kernel_with_128_column_tiles_matches_fp32_reference(m, k, n, r, fp32_adapters, p):
    """The reduce kernel's 128-column tiles (lora_kernels_set_reduce_cols' other width: half the rows a step) give
    the reference's dA and dB, widths that are not multiples of 128 included, with the same bits whichever of the
    two gradients is asked for."""
    check_backward(m, k, n, r, torch.bfloat16, torch.float32 if fp32_adapters else torch.bfloat16, p, reduce_cols=128)


def test_the_node_takes_the_reduce_column_setting():
    """lora_kernels_set_reduce_cols: the node's backward with 128-column tiles gives the 64-column numbers to bf16
    accuracy (another summation order), the setting reads back and is restored, other widths are refused."""
    before = _C.lora_kernels_reduce_cols()
    assert before == 64  # (the default)
    layer = lora_linear_layer(1024, 3000, 16, 0.1, torch.bfloat16, True, True).train()
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(777, 1024, device="cuda", generator=g).to(torch.bfloat16)
    dy = torch.randn(777, 3000, device="cuda", generator=g).to(torch.bfloat16)
    try:
        runs = []
        for cols in (64, 128):
            _C.lora_kernels_set_reduce_cols(cols)
            assert _C.lora_kernels_reduce_cols() == cols
            runs.append(lora_fwd_bwd(layer, x, dy, "cuda", kernels=True, seed=5))
        with pytest.raises(RuntimeError, match="64 or 128"):
            _C.lora_kernels_set_reduce_cols(96)
    finally:
        _C.lora_kernels_set_reduce_cols(before)
    (y1, dx1, da1, db1), (y2, dx2, da2, db2) = runs
    assert torch.equal(y1, y2) and torch.equal(dx1, dx2)  # (the same bits drawn, the reduce alone differs)
    assert rel_err(da2, da1) < TOL[torch.bfloat16] and rel_err(db2, db1) < TOL[torch.bfloat16]
    with pytest.raises(RuntimeError, match="reduce_cols"):
        _C.lora_kernels_backward(dy, x, layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                                 torch.zeros(777, 16, device="cuda", dtype=torch.bfloat16), None, 1.0, 0.0,
                                 reduce_cols=96)


@pytest.mark.parametrize("m,k,n,r", [(8192, 4096, 4096, 16), (777, 1024, 3000, 8), (100, 520, 264, 12),
                                     (300, 64, 8, 1), (777, 1024, 3000, 64)])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_reduce_kernel_compact_layout_matches_fp32_reference(m, k, n, r, p):
    """lora_kernels_set_reduce_compact: rank ≤ 16 at 64 columns in the compact layout (rank tile unpadded, three
    stages, as many blocks a multiprocessor as fit; the default) and in the padded one give the reference's dA and dB
    with the same bits whichever gradient is asked for; rank 64 ignores the setting. The setting reads back and is
    restored."""
    before = _C.lora_kernels_reduce_compact()
    assert before is True  # (the default)
    try:
        for compact in (False, True):
            _C.lora_kernels_set_reduce_compact(compact)
            assert _C.lora_kernels_reduce_compact() is compact
            check_backward(m, k, n, r, torch.bfloat16, torch.float32, p)
    finally:
        _C.lora_kernels_set_reduce_compact(before)
    assert _C.lora_kernels_reduce_compact() is before


@pytest.mark.parametrize("blocks", [2, 8])
@pytest.mark.parametrize("m,k,n,r", [(1, 4096, 4096, 16), (16, 4096, 4096, 16), (5, 1096, 3000, 64),
                                     (16, 2048, 2048, 128), (9, 256, 520, 12), (300, 1024, 776, 16)])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_rows_kernel_clusters_splitting_k_match_fp32_reference(blocks, m, k, n, r, p):
    """lora_kernels_set_rows_cluster: where 16-row blocks split their columns (decode), clusters of blocks split
    phase 1's K (uneven shares, ranks without a tile, blocks past the last column tile); forward and backward match
    the reference, and the forward draws the same dropout bits and writes the same adapter copies as without
    clusters. (Off GPUs without clusters the setting changes nothing.) Out-of-range settings raise."""
    before = _C.lora_kernels_rows_cluster()
    assert before == 8  # (the default)
    x, a, b = _inputs(m, k, n, r, torch.bfloat16, torch.float32, seed=2)
    addend = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)

    def forward():
        torch.manual_seed(7)
        return _C.lora_kernels_forward(x, a, b, 0.5, p, None, addend, copies=True, block_rows=16)
    try:
        _C.lora_kernels_set_rows_cluster(1)
        plain = forward()
        _C.lora_kernels_set_rows_cluster(blocks)
        assert _C.lora_kernels_rows_cluster() == blocks
        check_forward(m, k, n, r, torch.bfloat16, torch.float32, p, block_rows=16)
        check_backward(m, k, n, r, torch.bfloat16, torch.float32, p, block_rows=16)
        clustered = forward()
    finally:
        _C.lora_kernels_set_rows_cluster(before)
    assert _C.lora_kernels_rows_cluster() == before
    y, hs, mask, a_copy, b_copy = clustered
    assert torch.equal(mask, plain[2]) and torch.equal(a_copy, plain[3]) and torch.equal(b_copy, plain[4])
    assert rel_err(hs, plain[1]) < 1e-2 and rel_err(y, plain[0]) < 1e-2
    for bad in (0, 9):
        with pytest.raises(RuntimeError, match="blocks"):
            _C.lora_kernels_set_rows_cluster(bad)
    assert _C.lora_kernels_rows_cluster() == before


hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                            reason="the decode kernel needs clusters (sm_90+)")


@hopper
@pytest.mark.parametrize("dt,adt", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("m,k,n,r", [(16, 4096, 4096, 16), (1, 4096, 4096, 16), (5, 1056, 1000, 64),
                                     (9, 64, 8, 1), (16, 11008, 4096, 12), (3, 2048, 304, 33)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("spread", [False, True], ids=["chunk-loads", "spread-loads"])
def test_decode_kernel_matches_fp32_reference(m, k, n, r, dt, adt, bias, spread):
    """lora_decode.cu: x·Wᵀ (+ bias) + (s·x·Aᵀ)·Bᵀ in one launch, hs rounded to the compute dtype as the rows kernel
    rounds it; K slices of uneven length and slices without a chunk (K = 64 over 8 blocks), column blocks past N,
    rows 9…15 absent (M = 9), odd ranks. In both load layouts: each thread a chunk whole (the default) and spread
    (lora_kernels_set_decode_spread_loads: a quad's loads 64 contiguous bytes; steps cut short by the end of a K
    slice at K = 1056 and 64), the setting read back and restored."""
    x, a, b = _inputs(m, k, n, r, dt, adt, seed=3)
    w = (torch.randn(n, k, device="cuda") / k**0.5).to(dt)
    bvec = torch.randn(n, device="cuda").to(dt) if bias else None
    s = 2.0 / r**0.5
    poison_allocator()
    before = _C.lora_kernels_decode_spread_loads()
    assert before is False  # (the default: untimed)
    try:
        _C.lora_kernels_set_decode_spread_loads(spread)
        assert _C.lora_kernels_decode_spread_loads() is spread
        y = _C.lora_kernels_decode(x, w, bvec, a, b, s)
    finally:
        _C.lora_kernels_set_decode_spread_loads(before)
    assert _C.lora_kernels_decode_spread_loads() is before
    assert y.shape == (m, n) and y.dtype == dt
    base = x.float() @ w.float().t() + (bvec.float() if bias else 0.0)
    hs = (x.float() @ a.to(dt).float().t() * s).to(dt).float()
    y_ref = base + hs @ b.to(dt).float().t()
    assert torch.isfinite(y).all() and rel_err(y, y_ref) < TOL[dt], rel_err(y, y_ref)
    assert rel_err(base, y_ref) > 10 * TOL[dt]  # (a kernel that dropped the term would fail above)


@hopper
def test_decode_kernel_refuses_what_it_cannot_take():
    x, a, b = _inputs(16, 256, 128, 16, torch.bfloat16, torch.float32)
    w = torch.randn(128, 256, device="cuda", dtype=torch.bfloat16)
    for args in ((torch.cat([x, x[:1]]), w, None, a, b),  # 17 rows
                 (x[:, :248].contiguous(), w[:, :248].contiguous(), None, a[:, :248].contiguous(), b),  # K % 32
                 (x, w, None, torch.randn(65, 256, device="cuda"), torch.randn(128, 65, device="cuda")),  # rank 65
                 (x, w.t().contiguous().t(), None, a, b)):  # W not contiguous
        with pytest.raises(RuntimeError, match="decode kernel does not take"):
            _C.lora_kernels_decode(*args, 1.0)
    with pytest.raises(RuntimeError, match="bias"):
        _C.lora_kernels_decode(x, w, torch.zeros(127, device="cuda", dtype=torch.bfloat16), a, b, 1.0)


@hopper
@pytest.mark.parametrize("m", [1, 16, 17])
@pytest.mark.parametrize("bias", [False, True])
def test_the_node_takes_the_decode_kernel_for_inference(m, bias):
    """lora_kernels_set_decode_kernel (on by default): a LoRA layer's inference forward of at most 16 rows runs the
    decode kernel (17 rows, and training forwards, keep the cuBLAS + rows kernel route) and gives that route's output;
    the setting reads back and is restored."""
    layer = lora_linear_layer(4096, 4096, 16, 0.0, torch.bfloat16, True, bias).eval()
    x = torch.randn(1, m, 4096, device="cuda", dtype=torch.bfloat16)
    before = _C.lora_kernels_decode_kernel()
    assert before is True  # (the default)
    try:
        with torch.no_grad(), pf.ops.use_backend("cuda"):
            _C.lora_kernels_set_decode_kernel(False)
            assert _C.lora_kernels_decode_kernel() is False
            plain = layer(x)
            _C.lora_kernels_set_decode_kernel(True)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                fused = layer(x)
                torch.cuda.synchronize()
        y_train, *_ = lora_fwd_bwd(layer.train(), x, torch.randn_like(plain), "cuda")
    finally:
        _C.lora_kernels_set_decode_kernel(before)
    assert _C.lora_kernels_decode_kernel() is before
    assert fused.shape == plain.shape == (1, m, 4096)
    assert rel_err(fused, plain) < 1e-2 and rel_err(y_train, plain) < 1e-2
    names = " ".join(e.name for e in prof.events())
    assert ("lora_decode_kernel" in names) is (m <= 16), names[:2000]
    if m > 16:
        assert torch.equal(fused, plain)  # (not taken: the same route, the same bits)


@pytest.fixture
def two_pass_rows():
    """lora_kernels_set_two_pass_rows for one test, restored after it. The rows kernel's clusters are off meanwhile:
    their blocks split phase 1's K (another summation order than phase 1 alone walking all of it)."""
    before = _C.lora_kernels_two_pass_rows(), _C.lora_kernels_rows_cluster()
    _C.lora_kernels_set_rows_cluster(1)
    yield _C.lora_kernels_set_two_pass_rows
    _C.lora_kernels_set_two_pass_rows(*before[0])
    _C.lora_kernels_set_rows_cluster(before[1])


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("fp32_adapters", [True, False])
@pytest.mark.parametrize("m,k,n,r,pass2_rows", [(2048, 2048, 2048, 16, 64), (777, 1024, 3000, 64, 32),
                                                (8192, 512, 4096, 16, 0)])
def test_two_pass_rows_kernels_give_the_same_numbers(two_pass_rows, m, k, n, r, pass2_rows, fp32_adapters, p):
    """The rows kernels as two launches (phase 1 alone writing hs / gs, then phase 2 alone reading them back, in
    other row blocks with split columns) give the one-pass kernels' numbers bit for bit: forward kernel with bias and
    addend, its copies, backward kernels, and the node's forward and backward."""
    adt = torch.float32 if fp32_adapters else torch.bfloat16
    x, a, b = _inputs(m, k, n, r, torch.bfloat16, adt, seed=4)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    addend = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    layer = lora_linear_layer(k, n, r, p, torch.bfloat16, fp32_adapters, True).train()
    runs = []
    for rows in (1 << 62, 0):  # never, then always
        two_pass_rows(rows, pass2_rows)
        torch.manual_seed(9)
        fwd = _C.lora_kernels_forward(x, a, b, 0.5, p, copies=True)
        fwd_extra = _C.lora_kernels_forward(x, a, b, 0.5, p, bias=bias, addend=addend)[0]
        _, hs, mask, ac, bc = fwd
        bwd = _C.lora_kernels_backward(dy, x, ac, bc, hs, mask, 0.5, p, fp32_grads=fp32_adapters)
        runs.append((fwd + [fwd_extra], bwd, lora_fwd_bwd(layer, x, dy, "cuda", kernels=True, seed=9)))
    assert _C.lora_kernels_two_pass_rows() == (0, pass2_rows)
    (k1, b1, n1), (k2, b2, n2) = runs
    assert k1[0].abs().amax() > 0 and b1[0].abs().amax() > 0  # (the comparison is of real numbers)
    for name, got, want in zip(("y", "hs", "mask", "A copy", "B copy", "y + bias + addend", "dx", "dA", "dB",
                                "node y", "node dx", "node dA", "node dB"), [*k2, *b2, *n2], [*k1, *b1, *n1]):
        assert torch.equal(got, want), name


@pytest.fixture
def one_gemm_route():
    """The node's one-GEMM route with its kernels registered (Hopper only), for `check(layer, x, dy, seed, ...)`:
    layer fwd+bwd on the route against the default route (the threshold restored after), to bf16 accuracy, with the
    Triton GEMM launched for forward and dx (for forward alone where `dx_dropout` is False and dropout is on: dx on
    the default route after the route's forward). `backend` "auto" for a layer whose flat path only auto mode takes
    (the QLoRA node). `produce`: the GEMMs that make h themselves registered (for fp32 and bf16 adapters) and taken
    from 0 rows, which the node does without dropout: then no rows kernel runs at all. `preround`: fp32 adapters
    rounded first (lora_kernels_set_preround_rows 0), which the producing GEMMs then read in bf16."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA descriptors need a Hopper (sm_90+) GPU")
    from peft_fast.kernels import lora_gemm_tma as G
    from peft_fast.ops import one_gemm

    def check(layer, x, dy, seed, backend="cuda", dx_dropout=True, produce=False, preround=False):
        one_gemm.ensure(x, 16, False, torch.bfloat16)  # (the layer's first call would, and set the rows)
        before = _C.lora_kernels_tma_rows(), _C.lora_kernels_tma_produce_rows(), _C.lora_kernels_preround_rows()
        adapters = (torch.float32, torch.bfloat16)
        try:
            _C.lora_kernels_set_tma_rows(1 << 62)  # the default route
            want = lora_fwd_bwd(layer, x, dy, backend, kernels=True, seed=seed)
            G.register_for_node(_C, torch.device("cuda"), torch.bfloat16, ranks=(16,), dx_dropout=dx_dropout,
                                produce_adapters=adapters if produce else ())
            _C.lora_kernels_set_tma_produce_rows(0 if produce else 1 << 62)  # (else from ensure's rule)
            _C.lora_kernels_set_tma_rows(0)
            if preround:
                _C.lora_kernels_set_preround_rows(0)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                got = lora_fwd_bwd(layer, x, dy, backend, kernels=True, seed=seed)
                torch.cuda.synchronize()
        finally:
            _C.lora_kernels_set_tma_rows(before[0])
            _C.lora_kernels_set_tma_produce_rows(before[1])
            _C.lora_kernels_set_preround_rows(before[2])
        launched = [e.name for e in prof.events() if "lora_gemm_ptr_kernel" in e.name]
        rows_kernels = [e.name for e in prof.events() if "lora_rows" in e.name]
        dropout = any(m.p > 0 for m in layer.modules() if isinstance(m, nn.Dropout))
        assert len(launched) == (1 if dropout and not dx_dropout else 2), launched  # forward and dx
        # (producing: h and gs come from the GEMMs, no shrink before them; else one a direction at least)
        assert (len(rows_kernels) == 0) == (produce and not dropout), rows_kernels
        if produce and not dropout:  # (the rounding kernel: one launch, in the forward)
            rounds = [e.name for e in prof.events() if "round_pair_kernel" in e.name]
            assert len(rounds) == (1 if preround else 0), rounds
        for name, g, w in zip(("y", "dx", "dA", "dB"), got, want):
            assert g.dtype == w.dtype and rel_err(g, w) < 2 * TOL[torch.bfloat16], (name, rel_err(g, w))
    return check


def test_one_gemm_route_skips_gpus_with_less_shared_memory_than_hopper(monkeypatch):
    """The route's 128×256 tiles need a Hopper block's shared memory: where the GPU allows less (a consumer Blackwell,
    ~99 KiB), ops/one_gemm.ensure compiles nothing, warns nothing and leaves the route unfailed (a kernel over the
    limit would fail at its first launch and take the fused kernels off for the process). This Hopper GPU itself
    reports enough."""
    import warnings

    from peft_fast.kernels import lora_gemm_tma
    from peft_fast.ops import dispatch, one_gemm

    if dispatch.ONE_GEMM_MIN_ROWS is None or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the route is off here")
    x = torch.randn(64, 256, device="cuda", dtype=torch.float16)
    assert lora_gemm_tma.device_shared_limit(x.device) >= lora_gemm_tma.HOPPER_SHARED_BYTES
    keys = [(x.get_device(), torch.float16, 8, False), (x.get_device(), torch.float16, 8, False, torch.float16)]
    one_gemm._done.difference_update(keys)
    compiled = []
    monkeypatch.setattr(lora_gemm_tma, "device_shared_limit", lambda device: 101376)
    monkeypatch.setattr(lora_gemm_tma, "register_for_node", lambda *args, **kwargs: compiled.append(args))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            one_gemm.ensure(x, 8, False, torch.float16, torch.float16)
        assert compiled == [] and not one_gemm._failed and set(keys) <= one_gemm._done
    finally:
        one_gemm._done.difference_update(keys)  # (a later call on this GPU registers for real)


def test_one_gemm_route_is_not_set_up_inside_a_cuda_graph_capture():
    """ops/one_gemm.ensure compiles and loads nothing while a CUDA graph is being captured (module loading is no
    capturable work): the key stays unregistered for the next call outside the capture."""
    from peft_fast.ops import dispatch, one_gemm

    if dispatch.ONE_GEMM_MIN_ROWS is None or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the route is off here")
    x = torch.randn(64, 256, device="cuda", dtype=torch.float16)
    key = (x.get_device(), torch.float16, 8, True)
    one_gemm._done.discard(key)
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        one_gemm.ensure(x, 8, True, torch.float16)
        x.mul_(2)
    assert key not in one_gemm._done and not one_gemm._failed
    one_gemm.ensure(x, 8, True, torch.float16)
    assert key in one_gemm._done and not one_gemm._failed


@pytest.mark.parametrize("p,dx_dropout,produce", [(0.0, True, False), (0.1, True, False), (0.1, False, False),
                                                  (0.0, True, True), (0.1, False, True)])
@pytest.mark.parametrize("bias", [False, True])
def test_one_gemm_route_matches_the_default_route(one_gemm_route, p, dx_dropout, produce, bias):
    """The node's one-GEMM route (kernels/lora_gemm_tma.py launched from C++) gives the default
    route's y, dx, dA, dB to bf16 accuracy, with the same dropout bits; and it is the Triton GEMM that ran (with the
    producing kernels, at p 0 the only kernels before the reduce; with dropout the forward reads the shrink's h)."""
    m, k, n = 2048, 1024, 1536
    layer = lora_linear_layer(k, n, 16, p, torch.bfloat16, True, bias).train()
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    one_gemm_route(layer, x, dy, seed=3, dx_dropout=dx_dropout, produce=produce)


def test_one_gemm_route_producing_h_with_bf16_adapters_and_odd_rows(one_gemm_route):
    """Adapters in bf16 (no rounding in the kernel) and a row count that leaves the last row block partial: the
    producer's h of that block is masked, its consumers wait for it like any other."""
    m, k, n = 2000, 1024, 1536
    layer = lora_linear_layer(k, n, 16, 0.0, torch.bfloat16, False, False).train()
    assert layer.lora_A["default"].weight.dtype == torch.bfloat16
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    one_gemm_route(layer, x, dy, seed=4, produce=True)


@pytest.mark.parametrize("bias", [False, True])
def test_one_gemm_route_producing_h_from_adapters_rounded_first(one_gemm_route, bias):
    """fp32 adapters rounded to bf16 by one kernel before the producing forward GEMM, which then reads the copies, as
    the producing dx GEMM does: the default route's y, dx, dA, dB (fp32) to bf16 accuracy."""
    m, k, n = 2048, 1024, 1536
    layer = lora_linear_layer(k, n, 16, 0.0, torch.bfloat16, True, bias).train()
    assert layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    one_gemm_route(layer, x, dy, seed=6, produce=True, preround=True)


def test_one_gemm_route_takes_the_qlora_node_too(one_gemm_route):
    """The QLoRA node's dequantized W goes through the same route: y, dA, dB as on the default route, to bf16
    accuracy, the Triton GEMM launched for forward and dx."""
    pytest.importorskip("bitsandbytes")
    m, k, n, r, dt = 2048, 1024, 768, 16, torch.bfloat16
    base = quantize_linears(nn.Sequential(nn.Linear(k, n, bias=False)), compute_dtype=dt, compress_statistics=True,
                            device="cuda")
    model = pf.get_peft_model(base, pf.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], lora_dropout=0.1))
    layer = model.base_model.model[0].cuda().train()
    nn.init.normal_(layer.lora_B["default"].weight, std=0.5 / r**0.5)
    x = torch.randn(m, k, device="cuda", dtype=dt)
    dy = torch.randn(m, n, device="cuda", dtype=dt)
    one_gemm_route(layer, x, dy, seed=5, backend="auto")
    layer.lora_dropout["default"].p = 0.0
    one_gemm_route(layer, x, dy, seed=5, backend="auto", produce=True)


@pytest.mark.parametrize("fp32_adapters", [True, False])
def test_lora_linear_node_dropout_uses_one_mask_forward_and_backward(fp32_adapters):
    m, k, n, r, p, dt = 2048, 1024, 768, 16, 0.1, torch.bfloat16
    layer = lora_linear_layer(k, n, r, p, dt, fp32_adapters).train()
    x = torch.randn(2, m // 2, k, device="cuda", dtype=dt)
    dy = torch.randn(2, m // 2, n, device="cuda", dtype=dt)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"]
    torch.manual_seed(11)  # the mask the node will draw: same generator state, same bits
    keep = keep_of(_C.lora_kernels_forward(x.reshape(m, k), a.detach(), b.detach(), s, p)[2], k)
    y, dx, da, db = lora_fwd_bwd(layer, x, dy, "cuda", kernels=True, seed=11)
    xd = _dropped(x.reshape(m, k), keep, p, dt)
    hs = xd @ a.to(dt).float().t() * s
    w = layer.base_layer.weight.float()
    y_ref = x.reshape(m, k).float() @ w.t() + hs @ b.to(dt).float().t()
    gs = dy.reshape(m, n).float() @ b.to(dt).float() * s
    dx_ref = dy.reshape(m, n).float() @ w + gs @ a.to(dt).float() * keep / (1 - p)
    for name, got, ref in (("y", y, y_ref), ("dx", dx, dx_ref), ("dA", da, gs.t() @ xd),
                           ("dB", db, dy.reshape(m, n).float().t() @ hs)):
        assert rel_err(got.reshape(ref.shape), ref) < 2 * TOL[dt], (name, rel_err(got.reshape(ref.shape), ref))


def test_qlora_node_with_kernels_matches_reference_with_its_mask():
    pytest.importorskip("bitsandbytes")
    m, k, n, r, p, dt = 2048, 1024, 768, 16, 0.1, torch.bfloat16
    base = quantize_linears(nn.Sequential(nn.Linear(k, n, bias=False)), compute_dtype=dt, compress_statistics=True,
                            device="cuda")
    model = pf.get_peft_model(base, pf.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], lora_dropout=p))
    layer = model.base_model.model[0].cuda().train()
    nn.init.normal_(layer.lora_B["default"].weight, std=0.5 / r**0.5)
    x = torch.randn(m, k, device="cuda", dtype=dt)
    dy = torch.randn(m, n, device="cuda", dtype=dt)
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    with torch.no_grad():
        base_out = layer.base_layer(x).float()
    torch.manual_seed(5)
    keep = keep_of(_C.lora_kernels_forward(x, a.detach(), b.detach(), s, p)[2], k)
    y, _, da, db = lora_fwd_bwd(layer, x, dy, "cuda", kernels=True, seed=5)
    xd = _dropped(x, keep, p, dt)
    hs = xd @ a.to(dt).float().t() * s
    gs = dy.float() @ b.to(dt).float() * s
    for name, got, ref in (("y", y, base_out + hs @ b.to(dt).float().t()), ("dA", da, gs.t() @ xd),
                           ("dB", db, dy.float().t() @ hs)):
        assert rel_err(got, ref) < 2 * TOL[dt], (name, rel_err(got, ref))


def test_dropout_inside_a_captured_cuda_graph_draws_new_bits_each_replay():
    m, k, n, r, p, dt = 64, 1024, 512, 16, 0.5, torch.bfloat16
    x, a, b = _inputs(m, k, n, r, dt, torch.float32)
    _C.lora_kernels_forward(x, a, b, 2.0, p)  # warm-up outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        y, hs, mask = _C.lora_kernels_forward(x, a, b, 2.0, p)
    torch.cuda.current_stream().wait_stream(stream)
    masks = []
    for _ in range(3):
        graph.replay()
        keep = keep_of(mask, k)
        masks.append(keep.clone())
        y_ref = (_dropped(x, keep, p, dt) @ a.to(dt).float().t() * 2.0).to(dt).float() @ b.to(dt).float().t()
        assert rel_err(y, y_ref) < TOL[dt]  # each replay's output is made with that replay's bits
        assert abs(keep.float().mean().item() - (1 - p)) < 0.02
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
