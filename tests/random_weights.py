"""`randomize_`: perturb a model's norms, biases and BatchNorm statistics so that comparing two models checks them."""
import torch


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random norm weights and biases, conv biases and BatchNorm statistics (other weights keep their random
    init), so that every one matters; returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            noise = torch.randn(t.shape, generator=g)
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif name.endswith("running_mean") or (t.dim() == 1 and name.endswith(".bias")):
                t.copy_(0.2 * noise)
            elif t.dim() == 1 and name.endswith(".weight"):
                t.copy_(1 + 0.2 * noise)
    return model.eval()
