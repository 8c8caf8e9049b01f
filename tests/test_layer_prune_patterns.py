"""LayerPrune on residuals written the way third-party code writes them (issue 20 part B): blocks
of Linear layers scored by every weight criterion, block influence (ShortGPT), shortcuts through
nn.Identity, shape asserts and unused shape reads in the branch, extra graph inputs read by
attention, weightless adds (GELU-tanh, embedding sums) that are not blocks, chains that stop at
fxshift's decomposed convs, iterative pruning that saves and loads, fractions that round to 0."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxshift
from fxshift import ConfigError, LayerPrunePass
from fxshift.prune.blocks import find_blocks, node_shapes
from fxshift.prune.criteria import score_blocks
from fxshift.trace import trace

pytestmark = pytest.mark.usefixtures("one_thread")

G = torch.Generator().manual_seed(0)
T = torch.randn(2, 5, 8, generator=G)           # (batch, tokens, channels)
X = torch.randn(2, 3, 16, 16, generator=G)


def _rows(gm, action=None):
    return [r for r in fxshift.report(gm).to_dicts() if r["pass"] == "LayerPrunePass" and action in (None, r["action"])]


def _found(model, x):
    gm = trace(model, (x,))
    return find_blocks(gm, node_shapes(gm, (x,)))


# ----- transformer-style blocks of Linear layers ------------------------------------------------

def gelu_tanh(x):
    """GPT-2's GELU: its inner ``x + 0.044715·x³`` is an add with no weight layer."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class Mlp(nn.Module):
    def __init__(self, c, scale):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(c), nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        with torch.no_grad():
            self.fc1.weight.mul_(scale)
            self.fc2.weight.mul_(scale)

    def forward(self, x):
        return x + self.fc2(gelu_tanh(self.fc1(self.norm(x))))


class Tokens(nn.Module):
    """Token + position embedding (an add of two lookups) then three MLP residuals of Linear layers."""

    def __init__(self, scales=(1.0, 0.05, 1.0)):
        super().__init__()
        self.tok, self.pos = nn.Embedding(11, 8), nn.Embedding(5, 8)
        self.blocks = nn.Sequential(*[Mlp(8, s) for s in scales])
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        return self.head(self.blocks(x).mean(1))


class Lin(nn.Module):
    """Linear-only residual model on (N, T, C) tokens."""

    def __init__(self, scales=(1.0, 0.05, 1.0)):
        super().__init__()
        self.blocks = nn.Sequential(*[Mlp(8, s) for s in scales])
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.blocks(x).mean(1))


IDS = torch.randint(0, 11, (2, 5), generator=G)


def test_weightless_adds_are_not_blocks_and_the_mlp_residual_is_not_nested():
    torch.manual_seed(0)
    blocks, rejected = _found(Tokens().eval(), IDS)
    assert [b.name for b in blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    assert not any("nested" in r.reason or "holds other residual" in r.reason for r in rejected)
    assert sum("no weight layer" in r.reason for r in rejected) == 3  # the GELU-tanh adds
    # the embedding sum: neither operand is computed from the other
    assert any(r.name == "add" and "not computed from" in r.reason for r in rejected)


@pytest.mark.parametrize("criterion", ["l1", "l2", "taylor"])
def test_weight_criteria_score_linear_blocks(criterion):
    torch.manual_seed(0)
    model = Lin().eval()
    calibration = [(T, torch.tensor([0, 2]))]
    gm = fxshift.apply([LayerPrunePass(blocks=1, criterion=criterion, calibration=calibration)], model, T)
    rows = {r["layer"]: r for r in _rows(gm) if r["action"] in ("pruned", "kept")}
    assert all(rows[b]["score"] > 0 for b in ("blocks.0", "blocks.1", "blocks.2"))
    assert rows["blocks.1"]["action"] == "pruned"  # weights scaled by 0.05
    assert gm(T).shape == (2, 3)


def test_default_criterion_works_on_linear_blocks():
    torch.manual_seed(0)
    gm = fxshift.apply([LayerPrunePass(blocks=1)], Lin().eval(), T)
    assert [r["layer"] for r in _rows(gm, "pruned")] == ["blocks.1"]


def test_ensemble_leaves_bn_out_on_blocks_without_batchnorm_and_an_explicit_bn_raises():
    torch.manual_seed(0)
    calibration = [(T, torch.tensor([0, 2]))]
    with pytest.warns(UserWarning, match="'bn' is left out"):
        gm = fxshift.apply([LayerPrunePass(blocks=1, criterion="ensemble", calibration=calibration)], Lin().eval(), T)
    assert [r["layer"] for r in _rows(gm, "pruned")] == ["blocks.1"]
    with pytest.raises(ConfigError, match="no affine BatchNorm"):
        fxshift.apply([LayerPrunePass(blocks=1, criterion=["bn", "l1"], calibration=calibration)], Lin().eval(), T)


class Scaled(nn.Module):
    """y = x + W x with W = a·I: the output is (1 + a)·x, so cos(x, y) = sign(1 + a) exactly."""

    def __init__(self, a):
        super().__init__()
        self.fc = nn.Linear(8, 8, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(a * torch.eye(8))

    def forward(self, x):
        return x + self.fc(x)


class Influence(nn.Module):
    def __init__(self):
        super().__init__()
        self.u1, self.u2, self.u3 = Scaled(0.5), Scaled(-2.0), nn.Sequential(Mlp(8, 1.0))

    def forward(self, x):
        return self.u3(self.u2(self.u1(x))).mean(1)


def test_influence_is_one_minus_mean_cosine():
    torch.manual_seed(0)
    model = Influence().eval()
    gm = trace(model, (T,))
    blocks, _ = find_blocks(gm, node_shapes(gm, (T,)))
    assert [b.name for b in blocks] == ["u1", "u2", "u3.0"]
    scores, _ = score_blocks(gm, blocks, ["influence"], [T, T + 1])  # bare input batches
    assert scores[0] == pytest.approx(0.0, abs=1e-5)   # (1 + 0.5)·x: same direction
    assert scores[1] == pytest.approx(2.0, abs=1e-5)   # -x: opposite direction
    # the MLP unit, against an independent per-token computation
    with torch.no_grad():
        sims = [F.cosine_similarity(h, model.u3(h), dim=-1) for h in (model.u2(model.u1(b)) for b in (T, T + 1))]
    expected = 1 - torch.cat(sims).mean().item()
    assert scores[2] == pytest.approx(expected, abs=1e-5)


def test_influence_pass_removes_the_least_influential_and_needs_data():
    torch.manual_seed(0)
    calibration = [(T, torch.zeros(2, dtype=torch.long))]
    gm = fxshift.apply([LayerPrunePass(blocks=1, criterion="influence", calibration=calibration)], Influence().eval(), T)
    assert [r["layer"] for r in _rows(gm, "pruned")] == ["u1"]
    with pytest.raises(ConfigError, match="calibration"):
        LayerPrunePass(criterion="influence")


# ----- identity residuals written the timm way -------------------------------------------------

class ConvBranch(nn.Module):
    """conv-BN-ReLU-conv with the features of timm's code: a BatchNormAct2d-style shape assert and an
    unused shape read inside the branch, and the shortcut through nn.Identity."""

    def __init__(self, c, assert_ndim=False, shape_read=False, identity=False):
        super().__init__()
        self.a, self.n, self.b = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.Conv2d(c, c, 1)
        self.assert_ndim, self.shape_read = assert_ndim, shape_read
        self.shortcut = nn.Identity() if identity else None

    def forward(self, x):
        h = self.a(x)
        if self.assert_ndim:
            torch._assert(h.ndim == 4, "expected a 4D input")
        if self.shape_read:
            b, c, height, width = h.shape  # noqa: F841 (read, not used)
        h = self.b(torch.relu(self.n(h)))
        return h + (self.shortcut(x) if self.shortcut is not None else x)


class TimmStyle(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.u1, self.u2 = ConvBranch(8, **kw), ConvBranch(8, **kw)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.u2(self.u1(self.stem(x))).mean((2, 3)))


@pytest.mark.parametrize("kw", [dict(identity=True), dict(assert_ndim=True), dict(shape_read=True)],
                         ids=["identity-shortcut", "shape-assert", "unused-shape-read"])
def test_timm_style_identity_residuals_are_blocks(kw):
    torch.manual_seed(0)
    model = TimmStyle(**kw).eval()
    blocks, rejected = _found(model, X)
    assert [b.name for b in blocks] == ["u1", "u2"], [r.reason for r in rejected]
    gm = fxshift.apply([LayerPrunePass(blocks=1)], model, X)
    pruned = _rows(gm, "pruned")[0]["layer"]
    kept = model.u2 if pruned == "u1" else model.u1
    with torch.no_grad():
        expected = model.fc(kept(model.stem(X)).mean((2, 3)))
    torch.testing.assert_close(gm(X), expected, atol=1e-5, rtol=1e-5)
    assert not any(n.target is torch._assert for n in gm.graph.nodes if n.name.startswith(pruned))


class Attn(nn.Module):
    """Attention reading extra graph inputs (timm's ViT passes attn_mask and is_causal)."""

    def __init__(self, c):
        super().__init__()
        self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)

    def forward(self, x, attn_mask=None, is_causal=False):
        q, k, v = self.qkv(x).chunk(3, -1)
        return x + self.proj(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal))


class MaskedViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.b1, self.b2 = Attn(8), Attn(8)

    def forward(self, x, attn_mask=None, is_causal=False):
        return self.b2(self.b1(x, attn_mask, is_causal), attn_mask, is_causal).mean(1)


def test_attention_reading_extra_graph_inputs_is_a_block():
    torch.manual_seed(0)
    model = MaskedViT().eval()
    blocks, rejected = _found(model, T)
    assert [b.name for b in blocks] == ["b1", "b2"], [r.reason for r in rejected]
    gm = fxshift.apply([LayerPrunePass(blocks=1)], model, T)
    assert len(_rows(gm, "pruned")) == 1
    assert {n.op for n in gm.graph.nodes if n.name in ("attn_mask", "is_causal")} == {"placeholder"}
    assert gm(T).shape == (2, 8)


class Projection(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.proj = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1)

    def forward(self, x):
        return self.a(x) + self.proj(x)


def test_projection_shortcut_rejected_as_such():
    blocks, rejected = _found(Projection(), X)
    assert blocks == [] and len(rejected) == 1 and "projection shortcut" in rejected[0].reason


# ----- chains through fxshift's own layers ---------------------------------------------------------

class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def test_chains_stop_at_decomposed_convs():
    from fxshift import TuckerDecomposePass

    torch.manual_seed(0)
    tucker = fxshift.apply([TuckerDecomposePass(rank=0.5, include="features.6")], Plain().eval(), X)
    blocks, _ = find_blocks(tucker, node_shapes(tucker, (X,)))
    assert [b.name for b in blocks] == ["features.3..features.5", "features.6..features.8"]
    gm = fxshift.apply([LayerPrunePass(blocks=1)], tucker, X)
    assert len(_rows(gm, "pruned")) == 1
    removed = _rows(gm, "pruned")[0]["layer"]
    left = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    inside = {"features.3", "features.4", "features.5"} if removed.startswith("features.3") else \
        {"features.6", "features.7", "features.8"}
    assert not left & inside and len({"features.3", "features.6"} & left) == 1


# ----- iterative pruning checkpoints -----------------------------------------------------------

class Deep(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.units = nn.Sequential(*[ConvBranch(8) for _ in range(4)])
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.units(self.stem(x)).mean((2, 3)))


def _deep():
    torch.manual_seed(0)
    model = Deep().eval()
    with torch.no_grad():  # units 1 and 2 are the smallest: l1 removes 1, then 2 (adjacent)
        for i, s in enumerate((3.0, 0.1, 0.2, 3.0)):
            for p in model.units[i].parameters():
                p.mul_(s)
    return model


@pytest.mark.parametrize("how", ["one apply", "two applies"])
def test_iterative_pruning_saves_and_loads(tmp_path, how):
    model = _deep()
    if how == "one apply":
        gm = fxshift.apply([LayerPrunePass(blocks=1), LayerPrunePass(blocks=1)], model, X)
    else:
        gm = fxshift.apply([LayerPrunePass(blocks=1)], fxshift.apply([LayerPrunePass(blocks=1)], model, X), X)
    removed = [e["block"] for e in fxshift.checkpoint.recipe(gm)["removed"]]
    assert removed == ["units.1", "units.2"]
    fxshift.save(gm, tmp_path / "it.pt")
    loaded = fxshift.load(_deep(), tmp_path / "it.pt", X)
    torch.testing.assert_close(loaded(X), gm(X), atol=1e-5, rtol=1e-5)
    assert fxshift.parameter_count(loaded) == fxshift.parameter_count(gm)


def test_adjacent_blocks_in_one_pass_save_and_load(tmp_path):
    gm = fxshift.apply([LayerPrunePass(blocks=2)], _deep(), X)
    fxshift.save(gm, tmp_path / "two.pt")
    torch.testing.assert_close(fxshift.load(_deep(), tmp_path / "two.pt", X)(X), gm(X), atol=1e-5, rtol=1e-5)


# ----- fractions ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fraction, expected", [(0.2, 1), (0.1, 1), (0.5, 2), (0.75, 3)])
def test_fraction_removes_at_least_one_block(fraction, expected):
    gm = fxshift.apply([LayerPrunePass(blocks=fraction)], _deep(), X)
    assert len(_rows(gm, "pruned")) == expected
