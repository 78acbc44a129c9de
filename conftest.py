"""Fixtures shared by test_dfdhr.py (the component specification) and the tests in tests/."""
import pytest
import torch


@pytest.fixture
def hf_clip():
    """A factory of Hugging Face CLIP image towers with random weights, norms and biases included."""
    transformers = pytest.importorskip("transformers")

    def make(*, width, layers, heads, patch, image, proj, cls="CLIPVisionModelWithProjection"):
        config = transformers.CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width,
                                               num_hidden_layers=layers, num_attention_heads=heads, patch_size=patch,
                                               image_size=image, projection_dim=proj, hidden_act="quick_gelu")
        torch.manual_seed(0)
        model = getattr(transformers, cls)(config).eval()
        with torch.no_grad():  # random norms and biases, so every weight matters
            for name, p in model.named_parameters():
                if "norm" in name or name.endswith("bias"):
                    p.normal_(std=0.1)
        return model

    return make
