"""The repository's layout: no module or package of ours takes the import name of an installed library
(a root `peft.py` once hid the PEFT library from every script run here)."""
import importlib.metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# Libraries of this field a user may well have installed, whether or not this machine has them.
FIELD = {"peft", "evaluate", "datasets", "timm", "accelerate", "transformers", "diffusers", "open_clip", "clip",
         "einops", "baselines", "albumentations", "torchvision", "safetensors", "dlib", "cv2", "sklearn", "scipy", "numpy"}


def test_no_module_or_package_of_ours_shadows_an_installed_library():
    installed = importlib.metadata.packages_distributions()  # import name -> the distributions providing it
    ours = [p.stem for p in ROOT.glob("*.py")] + [p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()]
    assert len(ours) > 10 and {name: installed[name] for name in ours if name in installed} == {}
    assert not set(ours) & FIELD
