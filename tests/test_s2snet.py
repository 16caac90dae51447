import pytest
import torch

from aeshield.defenses.s2snet import InputNoise, S2SNet, StageConfig, train_stage1, train_stage2
from aeshield.models.autoencoders import ConvAutoencoder


def _tiny_ae():
    torch.manual_seed(0)
    return ConvAutoencoder(width=4, code=2)


def test_stage2_changes_only_decoder_weights(tiny_mlp_model):
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(2))
    ae = _tiny_ae()
    train_stage1(ae, x, StageConfig(epochs=1, batch_size=32), progress=False)
    before = {k: v.clone() for k, v in ae.state_dict().items()}
    train_stage2(ae, tiny_mlp_model, x, y, StageConfig(epochs=1, batch_size=32, lr=1e-2), loss="ce",
                 progress=False)
    after = ae.state_dict()
    for k, v in before.items():
        if k.startswith("encoder."):
            assert torch.equal(v, after[k]), f"encoder entry {k} changed in stage 2"
    changed = [k for k in before if k.startswith("decoder.") and not torch.equal(before[k], after[k])]
    assert changed, "stage 2 did not train the decoder"
    assert all(p.requires_grad for p in ae.parameters())  # the freeze is undone afterwards


def test_stage2_kl_needs_no_labels_and_lowers_its_loss(tiny_mlp_model):
    from aeshield.defenses.s2snet import stage2_loss

    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    labels_ignored = torch.zeros(64, dtype=torch.long)
    ae = _tiny_ae()
    ae.eval()
    with torch.no_grad():
        first = float(stage2_loss("kl", tiny_mlp_model, ae(x), x, labels_ignored))
    train_stage2(ae, tiny_mlp_model, x, labels_ignored, StageConfig(epochs=3, batch_size=16, lr=1e-2),
                 loss="kl", progress=False)
    ae.eval()
    with torch.no_grad():
        last = float(stage2_loss("kl", tiny_mlp_model, ae(x), x, labels_ignored))
    assert last < first


@pytest.mark.parametrize("kind", ["gaussian", "uniform", "sign"])
def test_noise_layers_stay_in_range_and_scale_with_s(kind):
    x = torch.full((8, 1, 28, 28), 0.5)
    small = (InputNoise(kind, 0.05)(x) - x).abs().mean()
    large = (InputNoise(kind, 0.2)(x) - x).abs().mean()
    out = InputNoise(kind, 0.6)(x)
    assert 0 < small < large
    assert out.min() >= 0 and out.max() <= 1
    if kind != "gaussian":
        assert (InputNoise(kind, 0.05)(x) - x).abs().max() <= 0.05 + 1e-6


def test_noise_layer_rejects_bad_settings_and_marks_pipeline_stochastic():
    with pytest.raises(ValueError, match="unknown noise kind"):
        InputNoise("salt", 0.1)
    assert S2SNet(_tiny_ae(), InputNoise("sign", 0.1)).stochastic
    assert not S2SNet(_tiny_ae()).stochastic


@pytest.fixture
def tiny_mlp_model():
    from conftest import tiny_mlp

    torch.manual_seed(3)
    return tiny_mlp(16).eval()
