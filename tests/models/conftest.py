import pytest
import torch

from refine.models import build_model

TINY = {
    "delta_net": dict(model_type="delta_net", hidden_size=32, num_heads=2, num_hidden_layers=2, vocab_size=50,
                      intermediate_size=48, use_gate=True, conv_size=4),
    "delta_net_noconv": dict(model_type="delta_net", hidden_size=32, num_heads=2, num_hidden_layers=2,
                             vocab_size=50, intermediate_size=48, use_short_conv=False),
    "gated_deltanet": dict(model_type="gated_deltanet", hidden_size=32, num_heads=2, head_dim=16,
                           num_hidden_layers=2, vocab_size=50, intermediate_size=48),
}


@pytest.fixture(params=sorted(TINY))
def tiny_model(request):
    torch.manual_seed(0)
    model = build_model(TINY[request.param], dtype=torch.float64)
    # Random norms and conv weights so that every parameter matters in the comparisons.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model
