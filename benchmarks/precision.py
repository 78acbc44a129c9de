"""Does the precision change what a training step learns? L_cls's and L_rank's gradients on one batch of the
default run, computed in fp32 and under bf16 autocast from the same weights and the same noise draws: their
cosine and norms, on the trainable routers and experts, at initialisation or from checkpoints.

    python -m benchmarks.precision                                     # the default run's model at initialisation
    python -m benchmarks.precision out/last.pt other/last.pt           # the weights of finished runs
    python -m benchmarks.precision --rank_reaches_features=true        # train.py's options build the model at
                                                                       # initialisation; a checkpoint keeps its own
"""
import sys

import torch
import torch.nn.functional as F

import cli
import finetune
import train
import vit
from dfdhr import DFDHRConfig, dfdhr_loss
from predict import load_model


def gradients(model, x, y, *, term, bf16, seed=7):
    """(value of the loss term, {role: flat gradient}) of one forward and backward, the gate noise drawn from
    `seed`: roles are the optimizer's parameter groups that train (experts, token_judges, ...)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = getattr(dfdhr_loss(model(x), y, model.config), term)
    loss.backward()
    out = {}
    for group in model.param_groups(lr=1.0, backbone_lr=1.0):
        out[group["name"]] = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                                        for p in group["params"]])
    return loss.item(), out


def compare(model, x, y):
    """Rows {term, role, value_fp32, value_bf16, norm_fp32, norm_bf16, cosine} for L_cls and L_rank."""
    rows = []
    for term in ("ce", "rank"):
        v32, g32 = gradients(model, x, y, term=term, bf16=False)
        v16, g16 = gradients(model, x, y, term=term, bf16=True)
        for role in g32:
            a, b = g32[role], g16[role]
            if a.norm() == 0 and b.norm() == 0:
                continue  # a term that does not reach this role
            rows.append(dict(term=term, role=role, value_fp32=v32, value_bf16=v16, norm_fp32=a.norm().item(),
                             norm_bf16=b.norm().item(), cosine=F.cosine_similarity(a, b, dim=0).item()))
    return rows


def main(argv):
    checkpoints = [a for a in argv if not a.startswith("--")]
    given, model_given = cli.parse([a for a in argv if a.startswith("--")], train.Settings, DFDHRConfig)
    cfg, config = train.settings(given, model_given)
    torch.manual_seed(cfg.seed)
    fresh = finetune.build_model(cfg.method, config, vit.load_clip(cfg.init_from)).train()
    batch = next(train.batches(train.datasets(cfg, config.image_size)["train"], cfg, step=0, ddp_rank=0, world=1))[1]
    print(f"machine: {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}; one batch of "
          f"{len(batch['label'])} frames of the default run's training set")
    print("| weights | loss | trains | value fp32 | value bf16 | gradient norm fp32 | bf16 | cosine |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ["initialisation", *checkpoints]:
        model = fresh if name == "initialisation" else load_model(name)[0].train()
        for r in compare(model, batch["image"], batch["label"]):
            print(f"| {name} | L_{'cls' if r['term'] == 'ce' else 'rank'} | {r['role']} | {r['value_fp32']:.4f} | "
                  f"{r['value_bf16']:.4f} | {r['norm_fp32']:.3e} | {r['norm_bf16']:.3e} | {r['cosine']:.4f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
