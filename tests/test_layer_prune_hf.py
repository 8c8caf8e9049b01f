"""LayerPrunePass on Hugging Face transformers (captured by torch.export): a residual unit with weights is
removed, the parameter count falls by what the report says, the model still runs at another batch size and
returns its usual output, and save/load rebuilds the pruned structure exactly."""
import pytest
import torch

import fxshift
from fxshift import LayerPrunePass

transformers = pytest.importorskip("transformers")

VOCAB = 96


def bert():
    return transformers.BertModel(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB,
        max_position_embeddings=32))


def distilbert():
    return transformers.DistilBertModel(transformers.DistilBertConfig(
        dim=32, n_layers=3, n_heads=2, hidden_dim=64, vocab_size=VOCAB, max_position_embeddings=32))


def gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=3, n_head=2, vocab_size=VOCAB, n_positions=32, use_cache=False, bos_token_id=0,
        eos_token_id=0))


def first(out):
    return out[0] if isinstance(out, (tuple, list)) else next(iter(out.values()))


@pytest.mark.parametrize("build", [bert, distilbert, gpt2], ids=["bert", "distilbert", "gpt2"])
def test_layer_prune_removes_a_weighted_residual_unit(build, tmp_path):
    torch.manual_seed(0)
    model = build().eval()
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    before = fxshift.parameter_count(model)
    gm = fxshift.apply([LayerPrunePass(blocks=1)], model, (ids,))
    pruned = [r for r in fxshift.report(gm).to_dicts() if r["action"] == "pruned"]
    assert len(pruned) == 1 and pruned[0]["params_before"] > 0 and pruned[0]["params_after"] == 0
    assert fxshift.parameter_count(gm) == before - pruned[0]["params_before"]
    batch4 = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = gm(batch4)
        assert type(out) is type(model(batch4))   # the model's own output class
        assert first(out).shape == first(model(batch4)).shape
        path = tmp_path / "pruned.pt"
        fxshift.save(gm, path)
        loaded = fxshift.load(build().eval(), path, (ids,))   # a torch.export capture needs its inputs again
        assert torch.equal(first(loaded(batch4)), first(out))
