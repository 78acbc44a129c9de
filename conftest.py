"""Fixtures shared by test_dfdhr.py (the component specification) and the tests in tests/."""
import pytest
import torch
from threadpoolctl import threadpool_limits  # comes with scikit-learn

from dfdhr import make_config


@pytest.fixture
def small():
    """The small preset's config, the size every model test runs at."""
    return make_config("small")


@pytest.fixture
def inputs():
    """A factory of seeded random inputs for a config: (n, 3, S, S), S its image size."""
    def make(config, n=2, seed=0):
        return torch.randn(n, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(seed))
    return make


@pytest.fixture
def low_t():
    """A soft-rank temperature at which soft ranks, and the soft Spearman coefficient, are the exact ones."""
    return 1e-4


@pytest.fixture
def tiny_run():
    """train.py's arguments for a tiny run: a 4-layer width-64 backbone from scratch on 32 px views,
    a few synthetic videos of the cross-method protocol (its test sets: "in_domain", "cross_method")."""
    return ["--init_from=scratch", "--synthetic_protocol=cross_method", "--width=64", "--heads=2", "--layers=4",
            "--first_routed_layer=2", "--embed_dim=64", "--adapter_rank=8", "--judge_hidden=8", "--view_size=32",
            "--image_size=64", "--synthetic_train_videos=8", "--synthetic_test_videos=4", "--frames_per_video=2",
            "--batch_size=4", "--eval_batch_size=8", "--num_workers=0", "--log_interval=1000", "--dtype=fp32"]


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


@pytest.fixture(scope="module")
def one_thread():
    """Small matrices run on one thread: on a busy machine, a pool of spinning LAPACK/OpenMP threads
    makes a 128 x 128 SVD or a tiny forward pass take seconds instead of milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)
